//! Types and constants shared by the eBPF programs (`agent-ebpf`) and the agent.
//!
//! Everything here crosses the kernel boundary byte for byte: `#[repr(C)]`, fixed-width
//! integers, explicit padding, no `bool`. Sizes are asserted at compile time so that a
//! change on one side cannot silently misread the other.
#![no_std]

pub mod lifecycle;
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
    /// [`crate::sched::ThreadGroupKey`] -> [`crate::sched::SchedHistograms`] (per CPU).
    pub const SCHED_HISTOGRAMS: &str = "SCHED_HISTS";
    /// Ring buffer of [`crate::lifecycle::LifecycleEvent`].
    pub const LIFECYCLE_EVENTS: &str = "LIFECYCLE_EVENTS";
    /// Per-CPU counters of the probes' own troubles, indexed by [`crate::sched::ProbeCounter`].
    pub const PROBE_COUNTERS: &str = "PROBE_COUNTERS";
    /// tgid -> [`crate::redis::RedisProcess`]: Redis processes with blocking probes.
    pub const REDIS_PROCS: &str = "REDIS_PROCS";
    /// [`crate::redis::BlockedKey`] -> [`crate::redis::BlockedClient`]: clients blocked now.
    pub const BLOCKED_CLIENTS: &str = "BLOCKED_CLIENTS";
    /// [`crate::redis::RedisHistKey`] -> [`crate::redis::KeyHistogram`] (per CPU).
    pub const REDIS_KEYS_HISTS: &str = "REDIS_KEYS_HISTS";
    /// [`crate::redis::RedisHistKey`] -> [`crate::redis::DurationHistogram`] (per CPU).
    pub const REDIS_DURATION_HISTS: &str = "REDIS_DUR_HISTS";
    /// [`crate::redis::RedisHistKey`] (kind = phase) -> [`crate::redis::PhaseTime`] (per CPU).
    pub const REDIS_BOOKKEEPING: &str = "REDIS_BOOKKEEPING";
    /// (tgid << 32 | point) -> hits (per CPU).
    pub const REDIS_PROBE_HITS: &str = "REDIS_PROBE_HITS";
    /// [0] = CLOCK_REALTIME - CLOCK_MONOTONIC in ns, kept current by the agent.
    pub const CLOCK_OFFSET: &str = "CLOCK_OFFSET";
    /// tgid -> 1: worker processes whose syscalls are followed.
    pub const WORKER_PROCS: &str = "WORKER_PROCS";
    /// [`crate::worker::ConnKey`] -> [`crate::worker::ConnState`].
    pub const CONNS: &str = "CONNS";
    /// [`crate::worker::ConnKey`] -> [`crate::worker::Peer`], from connect() or /proc.
    pub const CONN_PEERS: &str = "CONN_PEERS";
    /// [`crate::worker::WorkerHistKey`] -> duration histogram (per CPU).
    pub const WORKER_DURATION_HISTS: &str = "WORKER_DUR_HISTS";
    /// [`crate::worker::WorkerKeysKey`] -> fan-out histogram (per CPU).
    pub const WORKER_KEYS_HISTS: &str = "WORKER_KEYS_HISTS";
    /// Ring buffer of key lists ([`crate::worker::KeysetHeader`] + request bytes).
    pub const KEYSET_EVENTS: &str = "KEYSET_EVENTS";
}

/// Program names as they appear in the eBPF object.
pub mod programs {
    pub const SCHED_SWITCH: &str = "sched_switch";
    pub const SCHED_WAKEUP: &str = "sched_wakeup";
    pub const SCHED_WAKEUP_NEW: &str = "sched_wakeup_new";
    pub const PROCESS_EXEC: &str = "sched_process_exec";
    pub const PROCESS_EXIT: &str = "sched_process_exit";
    pub const REDIS_BLOCK_FOR_KEYS: &str = "redis_block_for_keys";
    pub const REDIS_BLOCK_FOR_KEYS_RETURN: &str = "redis_block_for_keys_ret";
    pub const REDIS_UNBLOCK_CLIENT: &str = "redis_unblock_client";
    pub const REDIS_UNBLOCK_CLIENT_RETURN: &str = "redis_unblock_client_ret";
    pub const REDIS_UNBLOCK_CLIENT_REQUEUE: &str = "redis_unblock_client_requeue";
    pub const REDIS_REPLY_TIMED_OUT: &str = "redis_reply_timed_out";
    pub const REDIS_SERVING: &str = "redis_serving";
    pub const REDIS_SERVING_RETURN: &str = "redis_serving_ret";
}
