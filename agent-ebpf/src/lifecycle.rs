//! Process exec, fork and exit, pushed to the agent through a ring buffer so that discovery
//! reacts within milliseconds. Exec events are sent for every process (rules match on
//! cmdline, which the kernel cannot see cheaply); forks only when the parent is tracked or is
//! a Redis-looking process that exec'd moments ago; exits only for tracked processes.

use agent_common::{
    lifecycle::{
        LifecycleEvent, LifecycleKind, LIFECYCLE_RING_BYTES, RECENT_EXECS_ENTRIES,
        RECENT_EXEC_WINDOW_NS,
    },
    sched::ProbeCounter,
    COMM_LEN,
};
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::{LruHashMap, RingBuf},
    programs::TracePointContext,
};

use crate::{
    counters::bump,
    maps::{pid_in, pid_set, BPF_RB_NO_WAKEUP, THREAD_STATE, TRACKED_TGIDS, TRACKED_TIDS},
};


#[map]
static LIFECYCLE_EVENTS: RingBuf = RingBuf::with_byte_size(LIFECYCLE_RING_BYTES, 0);

/// tgid -> exec time (ns) of processes whose task name looks like Redis or Valkey. Their forks
/// are reported during `RECENT_EXEC_WINDOW_NS` even before the agent tracks them: a daemonizing
/// redis-server forks the real server and exits within milliseconds of its exec.
#[map]
static RECENT_EXECS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(RECENT_EXECS_ENTRIES, 0);

// /sys/kernel/tracing/events/sched/sched_process_exec/format:
//   field:pid_t pid;     offset:12; size:4
const EXEC_PID: usize = 12;
// /sys/kernel/tracing/events/sched/sched_process_exit/format:
//   field:pid_t pid;       offset:24; size:4
//   field:bool group_dead; offset:32; size:1
const EXIT_PID: usize = 24;
const EXIT_GROUP_DEAD: usize = 32;
// /sys/kernel/tracing/events/task/task_newtask/format (runs in the parent's context):
//   field:pid_t pid;        offset:8;  size:4   (the new task's tid: its tgid unless a thread)
//   field:u64 clone_flags;  offset:32; size:8
const NEWTASK_PID: usize = 8;
const NEWTASK_CLONE_FLAGS: usize = 32;
/// include/uapi/linux/sched.h
const CLONE_THREAD: u64 = 0x0001_0000;

#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    if let Ok(pid) = unsafe { ctx.read_at::<i32>(EXEC_PID) } {
        send(LifecycleKind::Exec, pid as u32);
        // The task name is the exec'd file's basename by now.
        if let Ok(comm) = bpf_get_current_comm() {
            if looks_like_redis(&comm) {
                let now = unsafe { bpf_ktime_get_ns() };
                let _ = RECENT_EXECS.insert(&(pid as u32), &now, 0);
            }
        }
    }
    0
}

/// A new task. Threads (the bulk of task creation on a busy node) return after one compare;
/// processes cost one or two hash lookups, and only forks of tracked or just-exec'd
/// Redis-looking processes reach user space.
#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    let Ok(flags) = (unsafe { ctx.read_at::<u64>(NEWTASK_CLONE_FLAGS) }) else {
        return 0;
    };
    if flags & CLONE_THREAD != 0 {
        return 0;
    }
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !pid_in(&TRACKED_TGIDS, parent) {
        let Some(&exec_ns) = (unsafe { RECENT_EXECS.get(&parent) }) else {
            return 0;
        };
        let now = unsafe { bpf_ktime_get_ns() };
        if now.wrapping_sub(exec_ns) > RECENT_EXEC_WINDOW_NS {
            return 0;
        }
    }
    if let Ok(child) = unsafe { ctx.read_at::<i32>(NEWTASK_PID) } {
        send(LifecycleKind::Fork, child as u32);
    }
    0
}

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let Ok(tid) = (unsafe { ctx.read_at::<i32>(EXIT_PID) }) else {
        return 0;
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if !pid_in(&TRACKED_TGIDS, tgid) {
        return 0;
    }
    // Where the scheduler program reads the kernel's counters, it removes the entry itself at
    // the thread's last switch, after recording its last stretch.
    if !crate::sched::counters_in_use() {
        let _ = THREAD_STATE.remove(&(tid as u32));
        pid_set(&TRACKED_TIDS, tid as u32, false);
    }
    // The exiting task is the current one: its worker-side read slot goes with it.
    crate::worker::forget_thread(bpf_get_current_pid_tgid());
    let group_dead: u8 = unsafe { ctx.read_at(EXIT_GROUP_DEAD) }.unwrap_or(0);
    if group_dead != 0 {
        send(LifecycleKind::Exit, tgid);
    }
    0
}

/// Whether a task name contains "redis" or "valkey", in any case: the same names user space
/// looks for first (`rules::looks_like_redis`), here on the 15 bytes the kernel has.
#[inline(always)]
fn looks_like_redis(comm: &[u8; COMM_LEN]) -> bool {
    contains_lowercase(comm, b"redis") || contains_lowercase(comm, b"valkey")
}

/// `needle` (lowercase ASCII letters) occurs in `haystack`, ignoring ASCII case. OR-ing 0x20
/// lowercases letters; no other byte maps onto a lowercase letter that way. Written without
/// branches (XOR differences, and `diff - 1` borrowing into the top bit only when `diff` is
/// 0): the verifier then walks one straight path instead of one per early exit.
#[inline(always)]
fn contains_lowercase<const N: usize>(haystack: &[u8; COMM_LEN], needle: &[u8; N]) -> bool {
    let mut found: u64 = 0;
    let mut start = 0;
    while start + N <= COMM_LEN {
        let mut diff: u64 = 0;
        let mut i = 0;
        while i < N {
            diff |= ((haystack[start + i] | 0x20) ^ needle[i]) as u64;
            i += 1;
        }
        found |= diff.wrapping_sub(1) >> 63;
        start += 1;
    }
    found != 0
}

#[inline(always)]
fn send(kind: LifecycleKind, pid: u32) {
    let event = LifecycleEvent {
        kind: kind as u32,
        pid,
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
    };
    // No wakeup: the agent reads the ring on a timer (see `run::RING_POLL`); a wakeup costs
    // an IPI, a VM exit under a hypervisor, in every process that execs.
    if LIFECYCLE_EVENTS
        .output::<LifecycleEvent>(&event, BPF_RB_NO_WAKEUP)
        .is_err()
    {
        bump(ProbeCounter::LifecycleEventsLost);
    }
}
