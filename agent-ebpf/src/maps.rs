//! Maps shared by more than one probe area.

use agent_common::sched::{
    Log2Histogram, ThreadState, TrackedProcess, MAX_TRACKED_PROCESSES, MAX_TRACKED_THREADS,
};
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
};

/// tgid -> tracked process. Written by the agent only: it is the in-kernel filter that keeps
/// untracked processes down to one hash lookup per scheduler event.
#[map]
pub static TRACKED_PROCS: HashMap<u32, TrackedProcess> =
    HashMap::with_max_entries(MAX_TRACKED_PROCESSES, 0);

/// tid -> scheduler timestamps of a thread of a tracked process. Seeded by the agent from
/// /proc when it starts tracking a process, completed by `sched_switch`; entries are removed
/// when the thread exits, and the LRU bounds what a missed exit could leave behind.
#[map]
pub static THREAD_STATE: LruHashMap<u32, ThreadState> =
    LruHashMap::with_max_entries(MAX_TRACKED_THREADS, 0);

/// One all-zero log2 histogram, never written: the template new histogram entries are
/// inserted from (336 bytes is too much for the 512-byte eBPF stack next to other locals).
#[map]
pub static ZERO_LOG2: PerCpuArray<Log2Histogram> = PerCpuArray::with_max_entries(1, 0);
