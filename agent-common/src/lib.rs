//! Types and constants shared by the eBPF programs (`agent-ebpf`) and the agent.
//!
//! Everything here crosses the kernel boundary byte for byte: `#[repr(C)]`, fixed-width
//! integers, explicit padding, no `bool`. Sizes are asserted at compile time so that a
//! change on one side cannot silently misread the other.
#![no_std]

pub mod args_hash;
pub mod fastpath;
pub mod lifecycle;
mod mix;
pub mod redis;
pub mod resp;
pub mod sched;
pub mod worker;

/// Length of a kernel task name (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;

/// Map names, spelled once for both sides.
pub mod maps {
    /// tgid -> [`crate::sched::TrackedProcess`]: the processes the agent measures.
    pub const TRACKED_PROCESSES: &str = "TRACKED_PROCS";
    /// tid -> [`crate::sched::ThreadState`]: scheduler timestamps of threads of tracked processes.
    pub const THREAD_STATE: &str = "THREAD_STATE";
    /// [`crate::pidset`] of the tracked processes (tgids): the scheduler tracepoints' filter.
    pub const TRACKED_TGIDS: &str = "TRACKED_TGIDS";
    /// [`crate::pidset`] of the threads (tids) that have a [`THREAD_STATE`] entry.
    pub const TRACKED_TIDS: &str = "TRACKED_TIDS";
    /// One [`crate::sched::sched_mode`] word: whether `sched_switch_counters` is the
    /// scheduler program in use.
    pub const SCHED_COUNTERS_ON: &str = "SCHED_CTRS_ON";
    /// Slot -> [`crate::sched::SchedHistograms`] (a per-CPU array).
    pub const SCHED_HISTOGRAMS: &str = "SCHED_HISTS";
    /// [`crate::sched::ThreadGroupKey`] -> its slot in [`SCHED_HISTOGRAMS`].
    pub const SCHED_GROUP_SLOTS: &str = "SCHED_SLOTS";
    /// Queue of free slots of [`SCHED_HISTOGRAMS`], each all zero.
    pub const SCHED_FREE_SLOTS: &str = "SCHED_FREE";
    /// Ring buffer of [`crate::lifecycle::LifecycleEvent`].
    pub const LIFECYCLE_EVENTS: &str = "LIFECYCLE_EVENTS";
    /// tgid -> exec time (ns, monotonic) of Redis-looking processes: their forks are
    /// reported for [`crate::lifecycle::RECENT_EXEC_WINDOW_NS`] after the exec.
    pub const RECENT_EXECS: &str = "RECENT_EXECS";
    /// Per-CPU counters of the probes' own troubles, indexed by [`crate::sched::ProbeCounter`].
    pub const PROBE_COUNTERS: &str = "PROBE_COUNTERS";
    /// tgid -> [`crate::redis::RedisProcState`]: Redis processes with blocking probes, and
    /// everything their probes count.
    pub const REDIS_PROCS: &str = "REDIS_PROCS";
    /// [`crate::redis::BlockedKey`] -> [`crate::redis::BlockedClient`]: clients blocked now, and
    /// clients whose block ended lately (kept to be rewritten at their next block).
    pub const BLOCKED_CLIENTS: &str = "BLOCKED_CLIENTS";
    /// The same as [`BLOCKED_CLIENTS`], for clients beyond its
    /// [`crate::redis::HOT_BLOCKED_CLIENTS`]. (The kernel keeps 15 characters of a map's
    /// name, which is what bpftool finds it by.)
    pub const BLOCKED_SPILL: &str = "BLOCKED_SPILL";
    /// [0] = CLOCK_REALTIME - CLOCK_MONOTONIC in ns, kept current by the agent.
    pub const CLOCK_OFFSET: &str = "CLOCK_OFFSET";
    /// [`crate::pidset`] of the workers followed through the syscall tracepoints.
    pub const SYSCALL_WORKERS: &str = "SYSCALL_WORKERS";
    /// [`crate::worker::ConnKey`] -> [`crate::worker::ConnState`].
    pub const CONNS: &str = "CONNS";
    /// [`crate::worker::ServedKey`] -> served pops.
    pub const SERVED_KEYS: &str = "SERVED_KEYS";
    /// tgid -> connect() calls of a followed worker, for the agent to notice new connections.
    pub const CONNECTS: &str = "CONNECTS";
    /// [`crate::worker::ConnKey`] -> [`crate::worker::Peer`], from connect() or /proc.
    pub const CONN_PEERS: &str = "CONN_PEERS";
    /// Slot ([`crate::worker::not_resp_slot`]) -> tag of a (tgid, fd) a worker writes to
    /// that is not a connection.
    pub const NOT_RESP: &str = "NOT_RESP";
    /// [`crate::worker::ConnKey`] -> 1: sockets of followed workers seen writing TLS
    /// records (Redis over TLS), whose commands cannot be read; for the agent to report.
    pub const TLS_CONNS: &str = "TLS_CONNS";
    /// [`crate::worker::SslKey`] -> descriptor: the socket each SSL object of a followed
    /// worker talks through, learnt at `SSL_set_fd` or from its TLS records' writes.
    pub const SSL_FDS: &str = "SSL_FDS";
    /// Slot -> duration histogram (a per-CPU array).
    pub const WORKER_DURATION_HISTS: &str = "WORKER_DUR_HISTS";
    /// [`crate::worker::WorkerHistKey`] -> its slot in [`WORKER_DURATION_HISTS`].
    pub const WORKER_DURATION_SLOTS: &str = "WK_DUR_SLOTS";
    /// Queue of free slots of [`WORKER_DURATION_HISTS`].
    pub const WORKER_DURATION_FREE: &str = "WK_DUR_FREE";
    /// Slot -> fan-out histogram (a per-CPU array).
    pub const WORKER_KEYS_HISTS: &str = "WORKER_KEYS_HISTS";
    /// [`crate::worker::WorkerKeysKey`] -> its slot in [`WORKER_KEYS_HISTS`].
    pub const WORKER_KEYS_SLOTS: &str = "WK_KEY_SLOTS";
    /// Queue of free slots of [`WORKER_KEYS_HISTS`].
    pub const WORKER_KEYS_FREE: &str = "WK_KEY_FREE";
    /// Ring buffer of key lists ([`crate::worker::KeysetHeader`] + request bytes).
    pub const KEYSET_EVENTS: &str = "KEYSET_EVENTS";
}

/// Program names as they appear in the eBPF object.
pub mod programs {
    pub const SCHED_SWITCH: &str = "sched_switch";
    pub const SCHED_WAKEUP: &str = "sched_wakeup";
    /// `sched_switch` alone, reading the kernel's own counters (the default with BTF).
    pub const SCHED_SWITCH_COUNTERS: &str = "sched_switch_counters";
    pub const SCHED_WAKEUP_NEW: &str = "sched_wakeup_new";
    pub const PROCESS_EXEC: &str = "sched_process_exec";
    pub const PROCESS_EXIT: &str = "sched_process_exit";
    pub const TASK_NEWTASK: &str = "task_newtask";
    pub const REDIS_BLOCK_FOR_KEYS: &str = "redis_block_for_keys";
    pub const REDIS_BLOCK_FOR_KEYS_RETURN: &str = "redis_block_for_keys_ret";
    pub const REDIS_UNBLOCK_CLIENT: &str = "redis_unblock_client";
    pub const REDIS_UNBLOCK_CLIENT_RETURN: &str = "redis_unblock_client_ret";
    pub const REDIS_UNBLOCK_CLIENT_REQUEUE: &str = "redis_unblock_client_requeue";
    pub const REDIS_BLOCK_CLIENT: &str = "redis_block_client";
    pub const REDIS_REPLY_TIMED_OUT: &str = "redis_reply_timed_out";
    pub const REDIS_SERVING: &str = "redis_serving";
    pub const REDIS_SERVING_RETURN: &str = "redis_serving_ret";
}

/// Sets of pids as bitmaps in an eBPF array map: one `u64` word per 64 pids. A lookup in an
/// array map is inlined by the verifier into a bounds check and a load, where a hash lookup is
/// a function call that hashes the key (100-300 ns each on the VM this was measured on); that
/// matters in programs that run for every process on the host, such as the syscall and
/// scheduler tracepoints, where nearly every caller is not in the set.
pub mod pidset {
    /// Words of a set: pids below 2^22, the kernel's PID_MAX_LIMIT on 64-bit (512 KiB).
    pub const WORDS: u32 = 1 << 16;

    /// The word holding `pid`'s bit.
    #[inline(always)]
    pub fn word(pid: u32) -> u32 {
        pid >> 6
    }

    /// `pid`'s bit in its word.
    #[inline(always)]
    pub fn bit(pid: u32) -> u64 {
        1u64 << (pid & 63)
    }
}
