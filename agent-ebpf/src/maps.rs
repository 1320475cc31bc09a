//! Maps shared by more than one probe area.

use agent_common::sched::{ThreadState, TrackedProcess, MAX_TRACKED_PROCESSES, MAX_TRACKED_THREADS};
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap},
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
