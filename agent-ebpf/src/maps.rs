//! Maps shared by more than one probe area, and the flags they are used with.

use agent_common::pidset;
use agent_common::sched::{
    ThreadState, TrackedProcess, MAX_TRACKED_PROCESSES, MAX_TRACKED_THREADS,
};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, Queue},
    programs::TracePointContext,
    EbpfContext,
};

/// `BPF_RB_NO_WAKEUP`: submit a ring buffer record without waking the reader (a wakeup is an
/// irq_work self-IPI; the agent reads its ring buffers every 10 ms instead).
pub const BPF_RB_NO_WAKEUP: u64 = 1;

/// tgid -> tracked process. Written by the agent only: it is the in-kernel filter that keeps
/// untracked processes down to one hash lookup per scheduler event.
#[map]
pub static TRACKED_PROCS: HashMap<u32, TrackedProcess> =
    HashMap::with_max_entries(MAX_TRACKED_PROCESSES, 0);

/// tid -> scheduler state of a thread of a tracked process: the kernel's counters at its last
/// switch out (`sched_switch_counters`), or timestamps (`sched_switch` and `sched_wakeup`,
/// without BTF). Seeded by the agent from /proc when it starts tracking a process, completed
/// by the `sched_switch` program; entries are removed
/// when the thread exits, and the LRU bounds what a missed exit could leave behind.
#[map]
pub static THREAD_STATE: LruHashMap<u32, ThreadState> =
    LruHashMap::with_max_entries(MAX_TRACKED_THREADS, 0);

/// The tracked processes as a pid bitmap, written by the agent only: what the scheduler
/// tracepoints, which run for every context switch on the host, check first.
#[map]
pub static TRACKED_TGIDS: Array<u64> = Array::with_max_entries(pidset::WORDS, 0);

/// The threads that have a `THREAD_STATE` entry, as a tid bitmap: lets `sched_switch` and
/// `sched_wakeup` (the pair used without BTF) pass over every incoming or woken task they do
/// not follow without a hash lookup; `sched_switch_counters` only looks at the outgoing task,
/// by tgid, and does not read it (it still sets the bits of threads it meets). The agent seeds it from
/// /proc; `sched_switch` adds a thread it meets for the first time and the exit tracepoint
/// removes it. Those two kernel writers update a word without an atomic operation, so two CPUs
/// adding threads of the same 64-tid block at the same instant can lose one bit: that thread
/// is then measured from its next switch out, as a thread the agent had not seen yet.
#[map]
pub static TRACKED_TIDS: Array<u64> = Array::with_max_entries(pidset::WORDS, 0);

/// Whether `pid` is in the bitmap `set` (one inlined array load).
#[inline(always)]
pub fn pid_in(set: &Array<u64>, pid: u32) -> bool {
    match set.get(pidset::word(pid)) {
        Some(word) => *word & pidset::bit(pid) != 0,
        None => false,
    }
}

/// Adds `pid` to or removes it from `set` (not atomic: see `TRACKED_TIDS`).
#[inline(always)]
pub fn pid_set(set: &Array<u64>, pid: u32, present: bool) {
    if let Some(word) = set.get_ptr_mut(pidset::word(pid)) {
        unsafe {
            if present {
                *word |= pidset::bit(pid);
            } else {
                *word &= !pidset::bit(pid);
            }
        }
    }
}

/// A field of a tracepoint record, loaded straight from the context: the verifier allows
/// aligned reads there, and they cost a load where `read_at` costs a helper call.
#[inline(always)]
pub fn tp_field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    unsafe { core::ptr::read(ctx.as_ptr().add(offset) as *const T) }
}

/// The slot of `key` in a slotted per-CPU histogram array (see
/// `agent_common::sched::SchedHistograms`): found in `slots`, or taken from `free` (all zero)
/// and recorded there. `None` when no slot is free (counted as a full histogram map).
#[inline(never)]
pub fn take_slot<K>(slots: &HashMap<K, u32>, free: &Queue<u32>, key: &K) -> Option<u32> {
    if let Some(slot) = unsafe { slots.get(key) } {
        return Some(*slot);
    }
    let Ok(Some(slot)) = free.pop() else {
        crate::counters::bump(agent_common::sched::ProbeCounter::HistogramMapFull);
        return None;
    };
    const BPF_NOEXIST: u64 = 1;
    if slots.insert(key, &slot, BPF_NOEXIST).is_ok() {
        return Some(slot);
    }
    // Another CPU created the key meanwhile (or the map is full): give the slot back.
    let _ = free.push(slot, 0);
    match unsafe { slots.get(key) } {
        Some(slot) => Some(*slot),
        None => {
            crate::counters::bump(agent_common::sched::ProbeCounter::HistogramMapFull);
            None
        }
    }
}

/// `key`'s slot through a cache (1 + the slot; 0 when empty): the cached slot, or the one
/// [`take_slot`] finds or takes, then cached. `key` is only built on a miss.
#[inline(always)]
pub fn cached_slot<K>(
    cache: &mut u32,
    slots: &HashMap<K, u32>,
    free: &Queue<u32>,
    key: impl FnOnce() -> K,
) -> Option<u32> {
    if *cache != 0 {
        return Some(*cache - 1);
    }
    let slot = take_slot(slots, free, &key())?;
    *cache = slot + 1;
    Some(slot)
}
