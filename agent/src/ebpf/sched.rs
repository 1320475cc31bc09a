//! The scheduler and lifecycle probes: which processes are tracked (in the kernel), their
//! threads' run-queue delay and on-CPU histograms, and exec/exit events.

use std::collections::BTreeMap;

use agent_common::{
    lifecycle::LifecycleEvent,
    maps, programs,
    sched::{
        sched_mode, ProbeCounter, SchedHistograms, TaskCounters, ThreadGroupKey, ThreadState,
        TrackedProcess, MAX_THREAD_GROUPS, PROBE_COUNTER_SLOTS,
    },
};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    Ebpf,
};

use super::{take_map, ProbeError, ProbeStatus, TracepointSpec};
use crate::kernel_btf::TaskCounterOffsets;

/// `sched_switch` reading the kernel's own per-task counters: the scheduler tracepoint where
/// the kernel's BTF gives their offsets (see [`attach_tracepoints`]).
const SWITCH_COUNTERS: TracepointSpec = TracepointSpec {
    program: programs::SCHED_SWITCH_COUNTERS,
    category: "sched",
    name: "sched_switch",
};

/// `sched_switch` with `sched_wakeup`, timing each wait and stretch with the clock: the
/// scheduler tracepoints where the counters' offsets are not known.
const SWITCH_AND_WAKEUP: [TracepointSpec; 2] = [
    TracepointSpec {
        program: programs::SCHED_SWITCH,
        category: "sched",
        name: "sched_switch",
    },
    TracepointSpec {
        program: programs::SCHED_WAKEUP,
        category: "sched",
        name: "sched_wakeup",
    },
];

const LIFECYCLE: [TracepointSpec; 3] = [
    TracepointSpec {
        program: programs::PROCESS_EXEC,
        category: "sched",
        name: "sched_process_exec",
    },
    TracepointSpec {
        program: programs::PROCESS_EXIT,
        category: "sched",
        name: "sched_process_exit",
    },
    TracepointSpec {
        program: programs::TASK_NEWTASK,
        category: "task",
        name: "task_newtask",
    },
];

/// The programs the agent attaches on a kernel with BTF, as reported when eBPF is unavailable.
pub fn default_programs() -> impl Iterator<Item = &'static str> {
    std::iter::once(SWITCH_COUNTERS.program).chain(LIFECYCLE.iter().map(|t| t.program))
}

/// Names of the object's load-time constants that hold the counters' offsets (see
/// `agent-ebpf/src/sched.rs`).
pub const CPU_NS_OFFSET_GLOBAL: &str = "TASK_CPU_NS_OFFSET";
pub const ARRIVALS_OFFSET_GLOBAL: &str = "TASK_ARRIVALS_OFFSET";

/// Where the kernel keeps its per-task counters, if it keeps them and its BTF says where:
/// what the object is loaded with, before [`attach_tracepoints`] decides with the same answer.
pub fn counter_offsets() -> Result<TaskCounterOffsets, String> {
    if std::env::var("FANOUT_KERNEL_COUNTERS").as_deref() == Ok("absent") {
        // How the tests reach what the agent does on a kernel that keeps no counters or whose
        // BTF does not say where (the clock fallback of the scheduler programs, Redis phases
        // timed by the clock), on a kernel that has them.
        return Err("taken as absent (FANOUT_KERNEL_COUNTERS=absent)".into());
    }
    let offsets = TaskCounterOffsets::of_running_kernel().map_err(|e| e.to_string())?;
    kernel_keeps_counters()?;
    Ok(offsets)
}

/// Attaches the scheduler and lifecycle tracepoints. `sched_switch` alone reads the kernel's
/// counters where `counters` (from [`counter_offsets`], which the object was loaded with)
/// says where they are and the program loads; otherwise `sched_switch` and `sched_wakeup`
/// time the threads themselves (the same histograms, at the cost of a program on every
/// wakeup of the node).
pub fn attach_tracepoints(
    ebpf: &mut Ebpf,
    counters: Result<TaskCounterOffsets, String>,
) -> Vec<ProbeStatus> {
    // The flag goes up before the attach: from the program's first run on, a thread's entry is
    // its to remove.
    let counters = counters.and_then(|offsets| {
        set_sched_mode(ebpf, sched_mode::COUNTERS)?;
        super::attach_tracepoint(ebpf, &SWITCH_COUNTERS)
            .map_err(|e| e.to_string())
            .map(|_| offsets)
    });
    let mut status = match counters {
        Ok(offsets) => {
            tracing::info!(
                cpu_ns_offset = offsets.cpu_ns,
                sched_info_offset = offsets.arrivals_then_run_delay,
                "scheduler: sched_switch reads the kernel's per-task CPU and run-delay counters; sched_wakeup not attached"
            );
            vec![ProbeStatus {
                program: SWITCH_COUNTERS.program,
                attached: true,
                error: None,
            }]
        }
        Err(e) => {
            // The exit program removes the entries again.
            let _ = set_sched_mode(ebpf, sched_mode::CLOCK);
            tracing::warn!(error = %e, "scheduler: cannot read the kernel's per-task counters; timing threads with sched_switch and sched_wakeup instead");
            // The program that could not serve is listed too (`fanout_probes_attached` 0,
            // with its reason at start-up), so that the fallback shows from the metrics.
            let mut status = vec![ProbeStatus {
                program: SWITCH_COUNTERS.program,
                attached: false,
                error: Some(e),
            }];
            status.extend(super::attach_tracepoints(ebpf, &SWITCH_AND_WAKEUP));
            status
        }
    };
    status.extend(super::attach_tracepoints(ebpf, &LIFECYCLE));
    status
}

/// Whether the kernel maintains the counters: kernels before 5.14 built without schedstats
/// keep `sched_info` frozen unless delay accounting is on. This thread has run, so its own
/// arrival count is not zero where they are kept.
fn kernel_keeps_counters() -> Result<(), String> {
    let path = "/proc/thread-self/schedstat";
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    match crate::proc_reader::parse_schedstat(&text) {
        Some(c) if c.arrivals > 0 => Ok(()),
        Some(_) => Err(format!(
            "{path}: the kernel does not count arrivals on a CPU"
        )),
        None => Err(format!("{path}: unexpected content {text:?}")),
    }
}

/// Tells the exit program which scheduler program is in use (`sched_mode`).
fn set_sched_mode(ebpf: &mut Ebpf, mode: u32) -> Result<(), String> {
    let map = ebpf
        .map_mut(maps::SCHED_COUNTERS_ON)
        .ok_or_else(|| format!("map {} missing", maps::SCHED_COUNTERS_ON))?;
    let mut flag: Array<&mut MapData, u32> = Array::try_from(map).map_err(|e| e.to_string())?;
    flag.set(0, mode, 0).map_err(|e| e.to_string())
}

/// What [`SchedMaps::sweep`] freed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub processes: usize,
    pub threads: usize,
    /// Histogram slots (thread groups).
    pub slots: usize,
}

/// Per-CPU values merged, keyed by (tgid, thread name).
pub type MergedHistograms = BTreeMap<(u32, String), SchedHistograms>;

/// The scheduler maps: the in-kernel process filter, thread states, histograms, counters.
pub struct SchedMaps {
    tracked: HashMap<MapData, u32, TrackedProcess>,
    /// The scheduler programs' filters: tracked tgids, and tids with a thread state.
    tracked_tgids: super::PidSet,
    tracked_tids: super::PidSet,
    threads: HashMap<MapData, u32, ThreadState>,
    /// Histograms per (tgid, thread name), in slots.
    histograms: super::slots::SlotTable<ThreadGroupKey, SchedHistograms>,
    counters: PerCpuArray<MapData, u64>,
    /// Redis-looking processes by exec time (for their forks, see the kernel side); entries
    /// past their window are pruned here, at no cost to the kernel.
    recent_execs: HashMap<MapData, u32, u64>,
}

/// Name bytes up to the first NUL, lossily decoded.
pub fn comm_to_string(comm: &[u8]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

impl SchedMaps {
    /// Removes the recently-exec'd entries whose window has passed (they are ignored by the
    /// kernel anyway, and would otherwise stay until the LRU evicts them). Returns how many.
    pub fn prune_recent_execs(&mut self) -> usize {
        let now = monotonic_ns();
        let window = agent_common::lifecycle::RECENT_EXEC_WINDOW_NS;
        let stale: Vec<u32> = self
            .recent_execs
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, exec_ns)| now.saturating_sub(*exec_ns) > window)
            .map(|(pid, _)| pid)
            .collect();
        stale
            .into_iter()
            .filter(|pid| self.recent_execs.remove(pid).is_ok())
            .count()
    }

    pub fn new(ebpf: &mut Ebpf) -> Result<Self, ProbeError> {
        Ok(Self {
            tracked: take_map(ebpf, maps::TRACKED_PROCESSES)?,
            tracked_tgids: super::PidSet::new(ebpf, maps::TRACKED_TGIDS)?,
            tracked_tids: super::PidSet::shared(ebpf, maps::TRACKED_TIDS)?,
            threads: take_map(ebpf, maps::THREAD_STATE)?,
            recent_execs: take_map(ebpf, maps::RECENT_EXECS)?,
            histograms: super::slots::SlotTable::new(
                ebpf,
                (
                    maps::SCHED_GROUP_SLOTS,
                    maps::SCHED_HISTOGRAMS,
                    maps::SCHED_FREE_SLOTS,
                ),
                MAX_THREAD_GROUPS,
                SchedHistograms::ZERO,
            )?,
            counters: take_map(ebpf, maps::PROBE_COUNTERS)?,
        })
    }

    /// Starts measuring a process: its tgid goes into the in-kernel filter and its current
    /// threads are seeded, so that threads already asleep are measured from their next wakeup.
    ///
    /// Each thread is seeded with its counters as `read_counters` finds them in /proc, read
    /// after the tgid is in the filter: they are the baseline of its next stretch where
    /// `sched_switch` reads the kernel's counters. A thread switched out meanwhile already has
    /// an exact entry, which the seed does not replace (BPF_NOEXIST); one running when read is
    /// recognised at its switch out (no arrival since) and skipped once.
    ///
    /// A thread listed in `tids` may have exited before its seed is written, and then its
    /// exit found nothing to remove: each seed written is checked with `thread_alive` once
    /// written, and taken out again if the thread is gone. One that exits after that check
    /// meets its entry at its last switch, as any tracked thread does.
    pub fn track(
        &mut self,
        tgid: u32,
        start_time_ticks: u64,
        tids: &[u32],
        read_counters: impl Fn(u32) -> Option<TaskCounters>,
        thread_alive: impl Fn(u32) -> bool,
    ) -> Result<(), ProbeError> {
        let map_err = |name: &'static str| {
            move |e: aya::maps::MapError| ProbeError::Map {
                name,
                message: e.to_string(),
            }
        };
        self.tracked
            .insert(tgid, TrackedProcess { start_time_ticks }, 0)
            .map_err(map_err(maps::TRACKED_PROCESSES))?;
        self.tracked_tgids
            .set(tgid, true)
            .map_err(map_err(maps::TRACKED_TGIDS))?;
        for &tid in tids {
            // BPF_NOEXIST: a thread the kernel already knows keeps what it has.
            let inserted = self.threads.insert(
                tid,
                ThreadState {
                    tgid,
                    counters_at_switch_out: read_counters(tid).unwrap_or_default(),
                    ..Default::default()
                },
                1, /* BPF_NOEXIST */
            );
            if inserted.is_ok() && !thread_alive(tid) {
                let _ = self.threads.remove(&tid);
                continue;
            }
            if inserted.is_ok() || self.threads.get(&tid, 0).is_ok() {
                let _ = self.tracked_tids.set(tid, true);
            }
        }
        Ok(())
    }

    /// Frees the kernel filter entries of processes that are not tracked (`is_tracked` says
    /// which are): a process entry left by a set-up or tear-down gone astray, thread states a
    /// scheduler program wrote while their process was being untracked (it had found the tgid
    /// tracked just before), and histogram slots of such groups. One pass over each map.
    /// Returns what was freed.
    pub fn sweep(&mut self, is_tracked: impl Fn(u32) -> bool) -> Swept {
        let processes: Vec<u32> = self
            .tracked
            .keys()
            .filter_map(Result::ok)
            .filter(|tgid| !is_tracked(*tgid))
            .collect();
        self.free_groups(&processes, |tgid| !is_tracked(tgid))
    }

    /// Stops measuring a process and frees everything the kernel holds for it.
    pub fn untrack(&mut self, tgid: u32) {
        self.free_groups(&[tgid], |group| group == tgid);
    }

    /// Takes `processes` out of the filter, and frees the thread states and histogram slots
    /// of every group `gone` selects.
    fn free_groups(&mut self, processes: &[u32], gone: impl Fn(u32) -> bool) -> Swept {
        for tgid in processes {
            let _ = self.tracked_tgids.set(*tgid, false);
            let _ = self.tracked.remove(tgid);
        }
        // The threads first: they remember their groups' slots.
        let threads: Vec<u32> = self
            .threads
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, state)| gone(state.tgid))
            .map(|(tid, _)| tid)
            .collect();
        for tid in &threads {
            let _ = self.threads.remove(tid);
            let _ = self.tracked_tids.set(*tid, false);
        }
        let slots = self.histograms.release(|k| gone(k.tgid));
        Swept {
            processes: processes.len(),
            threads: threads.len(),
            slots,
        }
    }

    /// Histograms of all tracked thread groups, merged over CPUs.
    pub fn histograms(&self) -> MergedHistograms {
        let mut merged = MergedHistograms::new();
        for (key, per_cpu) in self.histograms.entries() {
            let entry = merged
                .entry((key.tgid, comm_to_string(&key.comm)))
                .or_insert(SchedHistograms::ZERO);
            for value in per_cpu.iter() {
                entry.on_cpu.merge(&value.on_cpu);
                entry.runqueue_delay.merge(&value.runqueue_delay);
            }
        }
        merged
    }

    /// The probes' own trouble counters, summed over CPUs.
    pub fn counter(&self, counter: ProbeCounter) -> u64 {
        debug_assert!((counter as u32) < PROBE_COUNTER_SLOTS);
        self.counters
            .get(&(counter as u32), 0)
            .map(|values| values.iter().sum())
            .unwrap_or(0)
    }
}

/// Decodes one ring-buffer record.
pub fn decode_lifecycle(bytes: &[u8]) -> Option<LifecycleEvent> {
    if bytes.len() < std::mem::size_of::<LifecycleEvent>() {
        return None;
    }
    // SAFETY: length checked; LifecycleEvent is plain old data, read unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<LifecycleEvent>()) })
}

/// CLOCK_MONOTONIC in ns: the kernel's `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
