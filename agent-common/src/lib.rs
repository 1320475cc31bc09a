//! Types and constants shared by the eBPF programs (`agent-ebpf`) and the agent.
//!
//! Everything here crosses the kernel boundary byte for byte: `#[repr(C)]`, fixed-width
//! integers, explicit padding, no `bool`. Sizes are asserted at compile time so that a
//! change on one side cannot silently misread the other.
#![no_std]

pub mod sched;
pub mod lifecycle;

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
}

/// Program names as they appear in the eBPF object.
pub mod programs {
    pub const SCHED_SWITCH: &str = "sched_switch";
    pub const SCHED_WAKEUP: &str = "sched_wakeup";
    pub const SCHED_WAKEUP_NEW: &str = "sched_wakeup_new";
    pub const PROCESS_EXEC: &str = "sched_process_exec";
    pub const PROCESS_EXIT: &str = "sched_process_exit";
}
