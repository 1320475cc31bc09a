//! The probes' own trouble counters, read by the agent as `fanout.probe.*` self-metrics.

use agent_common::sched::{ProbeCounter, PROBE_COUNTER_SLOTS};
use aya_ebpf::{macros::map, maps::PerCpuArray};

#[map]
static PROBE_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(PROBE_COUNTER_SLOTS, 0);

#[inline(always)]
pub fn bump(counter: ProbeCounter) {
    if let Some(slot) = PROBE_COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other CPU writes it, and preemption is off in a BPF program.
        unsafe { *slot += 1 };
    }
}
