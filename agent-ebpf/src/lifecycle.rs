//! Process exec and exit, pushed to the agent through a ring buffer so that discovery reacts
//! within milliseconds. Exec events are sent for every process (rules match on cmdline, which
//! the kernel cannot see cheaply); exits only for tracked processes.

use agent_common::{
    lifecycle::{LifecycleEvent, LifecycleKind, LIFECYCLE_RING_BYTES},
    sched::ProbeCounter,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::RingBuf,
    programs::TracePointContext,
};

use crate::{
    counters::bump,
    maps::{THREAD_STATE, TRACKED_PROCS},
};

#[map]
static LIFECYCLE_EVENTS: RingBuf = RingBuf::with_byte_size(LIFECYCLE_RING_BYTES, 0);

// /sys/kernel/tracing/events/sched/sched_process_exec/format:
//   field:pid_t pid;     offset:12; size:4
const EXEC_PID: usize = 12;
// /sys/kernel/tracing/events/sched/sched_process_exit/format:
//   field:pid_t pid;       offset:24; size:4
//   field:bool group_dead; offset:32; size:1
const EXIT_PID: usize = 24;
const EXIT_GROUP_DEAD: usize = 32;

#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    if let Ok(pid) = unsafe { ctx.read_at::<i32>(EXEC_PID) } {
        send(LifecycleKind::Exec, pid as u32);
    }
    0
}

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let Ok(tid) = (unsafe { ctx.read_at::<i32>(EXIT_PID) }) else {
        return 0;
    };
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if unsafe { TRACKED_PROCS.get(&tgid) }.is_none() {
        return 0;
    }
    let _ = THREAD_STATE.remove(&(tid as u32));
    let group_dead: u8 = unsafe { ctx.read_at(EXIT_GROUP_DEAD) }.unwrap_or(0);
    if group_dead != 0 {
        send(LifecycleKind::Exit, tgid);
    }
    0
}

#[inline(always)]
fn send(kind: LifecycleKind, pid: u32) {
    let event = LifecycleEvent {
        kind: kind as u32,
        pid,
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
    };
    if LIFECYCLE_EVENTS
        .output::<LifecycleEvent>(&event, 0)
        .is_err()
    {
        bump(ProbeCounter::LifecycleEventsLost);
    }
}
