//! On-CPU stretches and run-queue delay of the threads of tracked processes, aggregated in the
//! kernel into per-CPU log2 histograms keyed by (tgid, thread name).
//!
//! Two ways, one chosen by the agent:
//!
//! - [`sched_switch_counters`] alone (the default where the kernel has BTF). The kernel keeps
//!   counters per task: its CPU time, its time waiting for a CPU and its arrivals on a CPU (the
//!   fields of `/proc/<pid>/task/<tid>/schedstat`). For the task being switched out they are
//!   current when `sched_switch` fires: its CPU time was brought up to date as it was
//!   dequeued or put back, and the other two change only at arrivals, its last one being
//!   before this switch. (The incoming task's are not: its arrival is accounted after the
//!   tracepoint. Only the outgoing task's are read.) Between two switches out of a thread
//!   there is exactly one stretch on a CPU and the one wait that preceded it, so the
//!   counters' growth since the last switch out is that stretch and that wait; the kernel's
//!   count of arrivals on a CPU, read with them, confirms that exactly one lies between. Only the task being switched out is looked at, no clock is
//!   read and `sched_wakeup` is not attached at all: every wakeup of the node costs nothing.
//! - [`sched_switch`] with [`sched_wakeup`] (kernels without BTF). A thread becomes runnable
//!   when it is woken (`sched_wakeup`) or preempted while still runnable (`sched_switch` with a
//!   running `prev_state`); its run-queue delay ends when `sched_switch` puts it on a CPU. Its
//!   on-CPU stretch ends at the next `sched_switch` away.

use agent_common::{
    sched::{
        sched_mode, Log2Histogram, ProbeCounter, SchedHistograms, TaskCounters, ThreadGroupKey,
        ThreadState, MAX_THREAD_GROUPS,
    },
    COMM_LEN,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, generated::bpf_get_current_task_btf},
    macros::{map, tracepoint},
    maps::{Array, HashMap, PerCpuArray, Queue},
    programs::TracePointContext,
};

use crate::{
    counters::bump,
    maps::{cached_slot, pid_in, pid_set, tp_field, THREAD_STATE, TRACKED_TGIDS, TRACKED_TIDS},
};

/// The histograms of each thread group, by slot (see `SchedHistograms`).
#[map]
static SCHED_HISTS: PerCpuArray<SchedHistograms> =
    PerCpuArray::with_max_entries(MAX_THREAD_GROUPS, 0);
#[map]
static SCHED_SLOTS: HashMap<ThreadGroupKey, u32> = HashMap::with_max_entries(MAX_THREAD_GROUPS, 0);
/// Free slots of `SCHED_HISTS` (all zero), filled by the agent.
#[map]
static SCHED_FREE: Queue<u32> = Queue::with_max_entries(MAX_THREAD_GROUPS, 0);
/// `sched_mode::COUNTERS` while [`sched_switch_counters`] is the scheduler program (the agent
/// sets it before the attach, and clears it if the attach fails): it tells the exit program
/// who removes a thread's entry (`counters_in_use`).
#[map]
static SCHED_CTRS_ON: Array<u32> = Array::with_max_entries(1, 0);

/// The offsets in `task_struct` of the kernel's counters, as load-time constants (set by the
/// agent from the kernel's BTF before it loads the object, `aya::EbpfLoader::override_global`;
/// 0 when unknown). Read-only data is known to the verifier, which then lets
/// [`sched_switch_counters`] load the counters straight from the task (a `task_struct` field
/// it checks against the kernel's BTF) instead of calling `bpf_probe_read_kernel` twice:
/// about 20 ns less per switch of a tracked thread. Non-zero here so that they are placed in
/// `.rodata`, not `.bss`.
#[no_mangle]
static TASK_CPU_NS_OFFSET: u64 = u64::MAX;
#[no_mangle]
static TASK_ARRIVALS_OFFSET: u64 = u64::MAX;
/// Above any field of `task_struct`: an offset not set by the agent.
const MAX_TASK_OFFSET: u64 = 1 << 16;

/// The current thread's arrivals on a CPU (`sched_info.pcount`), or 0 where the agent found
/// no counters (the kernel does not keep them, or its BTF does not say where): two reads that
/// differ mean the thread was switched out in between. A plain load through the BTF pointer,
/// as in [`counted_switch_out`].
#[inline(always)]
pub fn current_arrivals() -> u64 {
    let offset = unsafe { core::ptr::read_volatile(&TASK_ARRIVALS_OFFSET) };
    if offset == 0 || offset >= MAX_TASK_OFFSET {
        return 0;
    }
    let task = unsafe { bpf_get_current_task_btf() } as *const u8;
    unsafe { core::ptr::read(task.add(offset as usize) as *const u64) }
}

// /sys/kernel/tracing/events/sched/sched_switch/format (Linux 6.18):
//   field:char prev_comm[16];  offset:8;  size:16
//   field:pid_t prev_pid;      offset:24; size:4
//   field:long prev_state;     offset:32; size:8
//   field:char next_comm[16];  offset:40; size:16
//   field:pid_t next_pid;      offset:56; size:4
const SWITCH_PREV_COMM: usize = 8;
const SWITCH_PREV_PID: usize = 24;
const SWITCH_PREV_STATE: usize = 32;
const SWITCH_NEXT_COMM: usize = 40;
const SWITCH_NEXT_PID: usize = 56;

// /sys/kernel/tracing/events/sched/sched_wakeup/format:
//   field:pid_t pid; offset:24; size:4
const WAKEUP_PID: usize = 24;

/// `prev_state` of a task switched out while runnable: TASK_RUNNING (0), or TASK_REPORT_MAX
/// (0x100), which the kernel reports for a preempted task. The low byte holds the sleep states.
#[inline(always)]
fn still_runnable(prev_state: i64) -> bool {
    prev_state & 0xff == 0
}

#[tracepoint]
pub fn sched_switch(ctx: TracePointContext) -> u32 {
    // The common case, a switch between two tasks nobody tracks, costs two field loads, one
    // helper call and two inlined bitmap loads.
    let prev_pid: i32 = tp_field(&ctx, SWITCH_PREV_PID);
    let next_pid: i32 = tp_field(&ctx, SWITCH_NEXT_PID);
    // At this tracepoint `current` is still the task being switched out.
    let prev_tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let prev_tracked = prev_pid > 0 && pid_in(&TRACKED_TGIDS, prev_tgid);
    let next_tracked = next_pid > 0 && pid_in(&TRACKED_TIDS, next_pid as u32);
    if !prev_tracked && !next_tracked {
        return 0;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if prev_tracked {
        switched_out(&ctx, prev_tgid, prev_pid as u32, now);
    }
    if next_tracked {
        switched_in(&ctx, next_pid as u32, now);
    }
    0
}

/// `sched_switch` on its own: the stretch on a CPU that just ended and the wait before it,
/// from the kernel's own counters of the task being switched out (see the module's doc).
#[tracepoint]
pub fn sched_switch_counters(ctx: TracePointContext) -> u32 {
    // The common case, a task nobody tracks, costs one field load, one helper call and one
    // inlined bitmap load.
    let prev_pid: i32 = tp_field(&ctx, SWITCH_PREV_PID);
    // At this tracepoint `current` is still the task being switched out.
    let prev_tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if prev_pid <= 0 || !pid_in(&TRACKED_TGIDS, prev_tgid) {
        return 0;
    }
    let _ = counted_switch_out(&ctx, prev_tgid, prev_pid as u32);
    0
}

/// `prev_state` of a task switched out for the last time: the tracepoint reports its exit
/// state as EXIT_DEAD (0x10) or EXIT_ZOMBIE (0x20). Its entry must not outlive it.
#[inline(always)]
fn exiting(prev_state: i64) -> bool {
    prev_state & 0x30 != 0
}

#[inline(always)]
fn counted_switch_out(ctx: &TracePointContext, tgid: u32, tid: u32) -> Option<()> {
    let (cpu_offset, arrivals_offset) = unsafe {
        (
            core::ptr::read_volatile(&TASK_CPU_NS_OFFSET),
            core::ptr::read_volatile(&TASK_ARRIVALS_OFFSET),
        )
    };
    if cpu_offset == 0
        || arrivals_offset == 0
        || cpu_offset >= MAX_TASK_OFFSET
        || arrivals_offset >= MAX_TASK_OFFSET
    {
        return None;
    }
    // A BTF pointer: the verifier checks each load against `task_struct`'s fields (the
    // offsets are constants to it) and lets it through as a plain load. `sched_info.run_delay`
    // follows `pcount` (the agent checks).
    let task = unsafe { bpf_get_current_task_btf() } as *const u8;
    let (cpu_ns, arrivals, run_delay_ns) = unsafe {
        (
            core::ptr::read(task.add(cpu_offset as usize) as *const u64),
            core::ptr::read(task.add(arrivals_offset as usize) as *const u64),
            core::ptr::read(task.add(arrivals_offset as usize + 8) as *const u64),
        )
    };
    let now = TaskCounters {
        cpu_ns,
        run_delay_ns,
        arrivals,
    };
    let comm = comm_words(ctx, SWITCH_PREV_COMM);
    let last_switch = exiting(tp_field(ctx, SWITCH_PREV_STATE));
    match THREAD_STATE.get_ptr_mut(&tid) {
        // A thread of the process the entry was made for (a reused tid starts over).
        Some(state) if unsafe { (*state).tgid } == tgid => {
            let state = unsafe { &mut *state };
            let last = state.counters_at_switch_out;
            // Exactly one arrival since the counters were last read: exactly one wait and one
            // stretch lie between. None means the thread was running when the agent read
            // them from /proc (its stretch began before), more means switches were missed.
            if last.cpu_ns != 0
                && arrivals == last.arrivals + 1
                && cpu_ns >= last.cpu_ns
                && run_delay_ns >= last.run_delay_ns
            {
                record_stretch(
                    state,
                    tgid,
                    comm,
                    cpu_ns - last.cpu_ns,
                    run_delay_ns - last.run_delay_ns,
                );
            } else if last.cpu_ns != 0 && arrivals > last.arrivals + 1 {
                bump(ProbeCounter::SchedSwitchMissed);
            }
            state.counters_at_switch_out = now;
            if last_switch {
                // Its last stretch is recorded: `sched_process_exit` leaves the entry to this
                // program where it runs (see `counters_in_use`).
                forget_thread(tid);
            }
        }
        _ => {
            // First sight of this thread: the counters are the baseline of its next stretch.
            let mut state = ThreadState {
                tgid,
                counters_at_switch_out: now,
                ..ThreadState::default()
            };
            // The kernel zeroes them when a thread is created: after its first arrival they
            // are exactly its first wait and its first stretch (so a thread that lived for one
            // stretch is measured too).
            if arrivals == 1 {
                record_stretch(&mut state, tgid, comm, cpu_ns, run_delay_ns);
            }
            if !last_switch {
                remember_thread(tid, &state);
            }
        }
    }
    Some(())
}

/// Whether `sched_switch_counters` is the scheduler program in use (`SCHED_CTRS_ON`): then a
/// thread's entry goes at its last switch, not at its exit.
#[inline(always)]
pub fn counters_in_use() -> bool {
    SCHED_CTRS_ON
        .get(0)
        .is_some_and(|mode| *mode == sched_mode::COUNTERS)
}

/// One stretch on a CPU and the wait before it, into the thread's group's histograms.
#[inline(always)]
fn record_stretch(state: &mut ThreadState, tgid: u32, comm: [u64; 2], on_cpu: u64, waited: u64) {
    if let Some(hists) = histograms_of(state, tgid, comm) {
        unsafe {
            (*hists).on_cpu.record(on_cpu);
            (*hists).runqueue_delay.record(waited);
        }
    }
}

#[inline(always)]
fn switched_out(ctx: &TracePointContext, tgid: u32, tid: u32, now: u64) {
    let prev_state: i64 = tp_field(ctx, SWITCH_PREV_STATE);
    let runnable_since = if still_runnable(prev_state) { now } else { 0 };
    match THREAD_STATE.get_ptr_mut(&tid) {
        Some(state) => {
            let state = unsafe { &mut *state };
            if state.on_cpu_since_ns != 0 && now > state.on_cpu_since_ns {
                if let Some(hists) = histograms_of(state, tgid, comm_words(ctx, SWITCH_PREV_COMM)) {
                    unsafe { (*hists).on_cpu.record(now - state.on_cpu_since_ns) };
                }
            }
            state.on_cpu_since_ns = 0;
            state.runnable_since_ns = runnable_since;
            if exiting(prev_state) {
                // Made again after `sched_process_exit` if the thread was preempted between
                // its exit and its last switch.
                forget_thread(tid);
            }
        }
        None if exiting(prev_state) => {}
        None => {
            // First sight of this thread: its stretch start is unknown, so nothing is
            // recorded until it comes back on a CPU.
            remember_thread(
                tid,
                &ThreadState {
                    tgid,
                    runnable_since_ns: runnable_since,
                    ..ThreadState::default()
                },
            );
        }
    }
}

#[inline(always)]
fn switched_in(ctx: &TracePointContext, tid: u32, now: u64) {
    let Some(state) = THREAD_STATE.get_ptr_mut(&tid) else {
        // Its entry was evicted or removed: the bit is stale.
        pid_set(&TRACKED_TIDS, tid, false);
        return;
    };
    let state = unsafe { &mut *state };
    // The tid may have been reused by a task of another process since the bit was set.
    if !pid_in(&TRACKED_TGIDS, state.tgid) {
        return;
    }
    if state.runnable_since_ns != 0 && now > state.runnable_since_ns {
        let tgid = state.tgid;
        if let Some(hists) = histograms_of(state, tgid, comm_words(ctx, SWITCH_NEXT_COMM)) {
            unsafe {
                (*hists)
                    .runqueue_delay
                    .record(now - state.runnable_since_ns)
            };
        }
    }
    state.runnable_since_ns = 0;
    state.on_cpu_since_ns = now;
}

/// Stores the state of a thread `sched_switch` sees for the first time, and marks it in
/// `TRACKED_TIDS` (a refused insert is counted).
#[inline(always)]
fn remember_thread(tid: u32, state: &ThreadState) {
    if THREAD_STATE.insert(&tid, state, 0).is_err() {
        bump(ProbeCounter::ThreadStateInsertFailed);
        return;
    }
    pid_set(&TRACKED_TIDS, tid, true);
}

/// Removes a thread's state at its last switch.
#[inline(always)]
fn forget_thread(tid: u32) {
    let _ = THREAD_STATE.remove(&tid);
    pid_set(&TRACKED_TIDS, tid, false);
}

/// The wakee is identified by tid only; it is measured if its thread is already known.
/// (`sched_wakeup_new` is not used: there `current` is the parent, and a forked child of a
/// tracked process would be taken for one of its threads.)
#[tracepoint]
pub fn sched_wakeup(ctx: TracePointContext) -> u32 {
    let pid: i32 = tp_field(&ctx, WAKEUP_PID);
    if pid <= 0 || !pid_in(&TRACKED_TIDS, pid as u32) {
        return 0;
    }
    if let Some(state) = THREAD_STATE.get_ptr_mut(&(pid as u32)) {
        let state = unsafe { &mut *state };
        if state.runnable_since_ns == 0 {
            state.runnable_since_ns = unsafe { bpf_ktime_get_ns() };
        }
    }
    0
}

/// A thread name in the tracepoint's record, as two words (two loads, no helper call).
#[inline(always)]
fn comm_words(ctx: &TracePointContext, offset: usize) -> [u64; 2] {
    [tp_field(ctx, offset), tp_field(ctx, offset + 8)]
}

/// The histograms of the thread's group: through the slot the thread remembers, or, the
/// first time and after a rename, through the group's key (taking a free slot for a new
/// group).
#[inline(always)]
fn histograms_of(
    state: &mut ThreadState,
    tgid: u32,
    comm: [u64; 2],
) -> Option<*mut SchedHistograms> {
    if state.comm_words != comm {
        state.slot_plus_one = 0;
        state.comm_words = comm;
    }
    let slot = cached_slot(&mut state.slot_plus_one, &SCHED_SLOTS, &SCHED_FREE, || {
        ThreadGroupKey {
            tgid,
            comm: unsafe { core::mem::transmute::<[u64; 2], [u8; COMM_LEN]>(comm) },
            _pad: 0,
        }
    })?;
    SCHED_HISTS.get_ptr_mut(slot)
}

// Keeps the helper in use so that the type is checked against the shared definition.
const _: fn(u64) -> usize = Log2Histogram::bucket_index;
