//! Scheduler accounting: on-CPU slices and run-queue delay per thread group.

use crate::COMM_LEN;

/// Number of log2 buckets of a nanosecond histogram. Bucket `i` counts values `v` with
/// `2^(i-1) <= v < 2^i` (bucket 0 counts `v == 0`), so 40 buckets reach 2^39 ns (about 9
/// minutes); larger values fall into the last bucket.
pub const HIST_BUCKETS: usize = 40;

/// Most thread groups (tgid, thread name) the kernel aggregates at once. A Redis has about ten,
/// a Sidekiq process a few dozen; 16384 covers hundreds of tracked processes. When full, new
/// groups are counted in [`ProbeCounter::HistogramMapFull`] instead of measured.
pub const MAX_THREAD_GROUPS: u32 = 16384;

/// Most threads of tracked processes whose scheduler state is kept (an LRU map).
pub const MAX_TRACKED_THREADS: u32 = 65536;

/// Most processes the agent tracks at once.
pub const MAX_TRACKED_PROCESSES: u32 = 4096;

/// Value of `TRACKED_PROCS`: which tracked process a tgid is.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackedProcess {
    /// Process start time in clock ticks since boot (`/proc/<pid>/stat` field 22), so that a
    /// reused pid is never taken for the process the agent decided to track.
    pub start_time_ticks: u64,
}

/// Key of the scheduler histograms: one per thread name within a process.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ThreadGroupKey {
    pub tgid: u32,
    pub comm: [u8; COMM_LEN],
    pub _pad: u32,
}

/// A log2 histogram of nanoseconds with its exact sum and count.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Log2Histogram {
    pub count: u64,
    pub sum_ns: u64,
    pub buckets: [u64; HIST_BUCKETS],
}

impl Log2Histogram {
    pub const ZERO: Self = Self {
        count: 0,
        sum_ns: 0,
        buckets: [0; HIST_BUCKETS],
    };

    /// Index of the bucket that counts `value_ns`.
    #[inline(always)]
    pub fn bucket_index(value_ns: u64) -> usize {
        let bits = (64 - value_ns.leading_zeros()) as usize;
        if bits >= HIST_BUCKETS {
            HIST_BUCKETS - 1
        } else {
            bits
        }
    }

    /// Exclusive upper bound, in nanoseconds, of bucket `index` (`None` for the last bucket).
    pub fn bucket_upper_bound_ns(index: usize) -> Option<u64> {
        if index + 1 >= HIST_BUCKETS {
            None
        } else {
            Some(1u64 << index)
        }
    }

    #[inline(always)]
    pub fn record(&mut self, value_ns: u64) {
        self.count += 1;
        self.sum_ns += value_ns;
        let index = Self::bucket_index(value_ns);
        // The bound check keeps the eBPF verifier satisfied; bucket_index never exceeds it.
        if index < HIST_BUCKETS {
            self.buckets[index] += 1;
        }
    }

    /// Takes back one [`record`](Self::record) of `value_ns`. The kernel does this on
    /// whichever CPU it runs, so one CPU's copy can wrap below zero: merged sums (wrapping)
    /// are exact.
    #[inline(always)]
    pub fn unrecord(&mut self, value_ns: u64) {
        self.count = self.count.wrapping_sub(1);
        self.sum_ns = self.sum_ns.wrapping_sub(value_ns);
        let index = Self::bucket_index(value_ns);
        if index < HIST_BUCKETS {
            self.buckets[index] = self.buckets[index].wrapping_sub(1);
        }
    }

    /// Adds another histogram into this one (merging per-CPU values), wrapping: see
    /// [`unrecord`](Self::unrecord).
    pub fn merge(&mut self, other: &Self) {
        self.count = self.count.wrapping_add(other.count);
        self.sum_ns = self.sum_ns.wrapping_add(other.sum_ns);
        for (mine, theirs) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *mine = mine.wrapping_add(*theirs);
        }
    }
}

/// Value of `SCHED_HISTS`, a per-CPU array indexed by slot. `SCHED_SLOTS` maps each
/// [`ThreadGroupKey`] to its slot; the kernel takes free slots from `SCHED_FREE`, which
/// the agent fills at start and refills (after zeroing them) when a process goes. A thread
/// remembers its slot, so a context switch costs an array index, not a hash of its key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedHistograms {
    /// Length of each stretch a thread ran on a CPU before being switched out.
    pub on_cpu: Log2Histogram,
    /// Time from becoming runnable (woken, or preempted while runnable) to running.
    pub runqueue_delay: Log2Histogram,
}

impl SchedHistograms {
    pub const ZERO: Self = Self {
        on_cpu: Log2Histogram::ZERO,
        runqueue_delay: Log2Histogram::ZERO,
    };
}

/// Value of `THREAD_STATE`: when the thread last became runnable / started running.
/// Zero means "not known", e.g. the agent attached while the thread was already running.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadState {
    pub tgid: u32,
    /// 1 + the `SCHED_HISTS` slot of the thread's group, as last found; 0 when not found yet.
    pub slot_plus_one: u32,
    pub runnable_since_ns: u64,
    pub on_cpu_since_ns: u64,
    /// The thread name the slot was found for, as two words: a renamed thread looks its
    /// group up again.
    pub comm_words: [u64; 2],
    /// The kernel's own counters of the thread as they were at its last switch out (or as the
    /// agent read them from /proc when it started tracking); all zero when not known.
    pub counters_at_switch_out: TaskCounters,
}

/// A task's scheduler counters, kept by the kernel whatever the agent does: what
/// `/proc/<pid>/task/<tid>/schedstat` prints, in its order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskCounters {
    /// Nanoseconds on a CPU (`se.sum_exec_runtime`).
    pub cpu_ns: u64,
    /// Nanoseconds runnable but waiting for a CPU (`sched_info.run_delay`).
    pub run_delay_ns: u64,
    /// Arrivals on a CPU (`sched_info.pcount`): each ends one wait and starts one stretch.
    pub arrivals: u64,
}

/// Values of the `SCHED_CTRS_ON` flag: which scheduler program the agent attached.
pub mod sched_mode {
    /// `sched_switch` and `sched_wakeup` time the threads with the clock (or nothing is
    /// attached yet).
    pub const CLOCK: u32 = 0;
    /// `sched_switch_counters` reads the kernel's per-task counters.
    pub const COUNTERS: u32 = 1;
}

/// Indexes into the `PROBE_COUNTERS` per-CPU array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeCounter {
    /// A histogram could not be created because the map was full.
    HistogramMapFull = 0,
    /// A thread's state could not be stored (LRU map insert failed).
    ThreadStateInsertFailed = 1,
    /// A lifecycle event was dropped because the ring buffer was full.
    LifecycleEventsLost = 2,
    /// A blocked Redis client could not be recorded (LRU map insert failed).
    BlockedClientInsertFailed = 3,
    /// A worker connection's bytes stopped parsing as RESP; it is re-synchronised at the next
    /// write that starts a command.
    RespDesync = 4,
    /// A key list could not be sent to user space (ring buffer full).
    KeysetLost = 5,
    /// A blocking pop was sent while another was still waiting on the same connection.
    OverlappingPop = 6,
    /// A connection could not be followed (map insert failed).
    ConnInsertFailed = 7,
    /// A served pop could not be counted by its key (the served-keys map was full).
    ServedKeysFull = 8,
    /// `sched_switch_counters` found more than one arrival on a CPU since a thread's last
    /// switch out: switches went by unseen (the kernel skips a program that would nest in
    /// another on the same CPU), and the stretches between are not recorded.
    SchedSwitchMissed = 9,
}

pub const PROBE_COUNTER_SLOTS: u32 = 16;

const _: () = assert!(core::mem::size_of::<ThreadGroupKey>() == 24);
const _: () = assert!(core::mem::size_of::<Log2Histogram>() == 16 + 8 * HIST_BUCKETS);
const _: () = assert!(core::mem::size_of::<ThreadState>() == 64);
const _: () = assert!(core::mem::size_of::<TrackedProcess>() == 8);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for TrackedProcess {}
    unsafe impl aya::Pod for ThreadGroupKey {}
    unsafe impl aya::Pod for SchedHistograms {}
    unsafe impl aya::Pod for ThreadState {}
    unsafe impl aya::Pod for TaskCounters {}
    unsafe impl aya::Pod for Log2Histogram {}
}
