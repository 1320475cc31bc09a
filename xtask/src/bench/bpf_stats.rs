//! Where each nanosecond goes: the kernel's own accounting of every eBPF program's runs and run
//! time (`kernel.bpf_stats_enabled`), read before and after a measured window for the programs
//! of one agent process.
//!
//! The accounting is switched on for the window only: it adds two clock reads to every run of
//! every program on the node, so the windows are separate runs, never the A/B runs the ratios
//! come from. It is switched on with `BPF_ENABLE_STATS`, which holds it on for as long as the
//! returned file descriptor is open and composes with anyone else who turned it on (the sysctl
//! keeps a reference of its own), so the bench neither leaves it on nor turns it off under
//! someone else. Kernels without that command get the sysctl, set to 1 and restored after.
//!
//! Which programs are the agent's: the `prog_id`s in its own /proc/<pid>/fdinfo (every loaded
//! program and every link holds one), so a second agent on the node, or a test's, is never
//! counted. The counters themselves come from `bpftool prog show -j`. A program attached at
//! several points (worker_enter_write on write and sendto) is one program with one counter.
//!
//! What the counters do not include: the kernel's own dispatch to the program (the tracepoint
//! call, and for a uprobe the trap into the kernel and back, which is most of a uprobe's cost).
//! The ratios measured without the accounting include everything.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::{FromRawFd, OwnedFd},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result};

use crate::util::command_output;

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// One program's share of a window.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ProgramCost {
    pub name: String,
    pub runs: u64,
    pub run_time_ns: u64,
    pub runs_per_op: f64,
    pub ns_per_run: f64,
    pub ns_per_op: f64,
}

/// Every program of the agent over one window, per operation (request, served pop, job, ...).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StatsSample {
    pub unit: String,
    pub ops: f64,
    pub seconds: f64,
    /// The programs that ran in the window, by name.
    pub programs: Vec<ProgramCost>,
    /// The agent's programs that did not run in the window.
    pub idle_programs: Vec<String>,
    pub total_ns_per_op: f64,
    /// Other `fanout` processes seen at the start or the end of the window: their programs are
    /// not counted here, but the node paid for them.
    pub other_agents: Vec<u32>,
    /// How the accounting was switched on.
    pub enabled_by: String,
}

impl StatsSample {
    pub fn program(&self, name: &str) -> Option<&ProgramCost> {
        self.programs.iter().find(|p| p.name == name)
    }

    /// Runs per operation of the programs whose name starts with `prefix`.
    pub fn runs_per_op_of(&self, prefix: &str) -> f64 {
        self.sum_of(prefix, |p| p.runs_per_op)
    }

    /// Program time per operation of the programs whose name starts with `prefix`, in ns.
    pub fn ns_per_op_of(&self, prefix: &str) -> f64 {
        self.sum_of(prefix, |p| p.ns_per_op)
    }

    fn sum_of(&self, prefix: &str, value: impl Fn(&ProgramCost) -> f64) -> f64 {
        self.programs
            .iter()
            .filter(|p| p.name.starts_with(prefix))
            .map(value)
            .sum()
    }
}

/// The accounting, on while this lives.
struct Enabled {
    _fd: Option<OwnedFd>,
    /// The sysctl's value before, when the sysctl had to be set.
    restore: Option<String>,
    how: String,
}

impl Enabled {
    fn new() -> Result<Self> {
        // union bpf_attr with enable_stats.type = BPF_STATS_RUN_TIME (0); the rest zero.
        let mut attr = [0u64; 16];
        const BPF_ENABLE_STATS: libc::c_long = 32;
        // SAFETY: a zeroed attribute buffer; the kernel reads at most its size.
        let fd = unsafe { sys_bpf(BPF_ENABLE_STATS, &mut attr) };
        if let Ok(fd) = fd {
            return Ok(Self {
                // SAFETY: a new descriptor that nothing else owns.
                _fd: Some(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
                restore: None,
                how: "BPF_ENABLE_STATS".into(),
            });
        }
        let previous = std::fs::read_to_string(SYSCTL)
            .with_context(|| format!("BPF_ENABLE_STATS failed and {SYSCTL} cannot be read"))?
            .trim()
            .to_string();
        if previous != "1" {
            std::fs::write(SYSCTL, "1").with_context(|| format!("cannot write 1 to {SYSCTL}"))?;
        }
        Ok(Self {
            _fd: None,
            restore: (previous != "1").then_some(previous),
            how: "kernel.bpf_stats_enabled".into(),
        })
    }
}

impl Drop for Enabled {
    fn drop(&mut self) {
        if let Some(previous) = &self.restore {
            if let Err(e) = std::fs::write(SYSCTL, previous) {
                eprintln!("[bench] warning: cannot restore {SYSCTL} to {previous}: {e}");
            }
        }
    }
}

/// `prog_id`s held by a process's file descriptors.
fn prog_ids_of(pid: u32) -> BTreeSet<u32> {
    let mut ids = BTreeSet::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return ids;
    };
    for entry in dir.filter_map(|e| e.ok()) {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        ids.extend(info.lines().filter_map(|l| {
            l.strip_prefix("prog_id:")
                .and_then(|v| v.trim().parse::<u32>().ok())
        }));
    }
    ids
}

/// (name, run_cnt, run_time_ns) of every loaded program, by id.
fn read_programs() -> Result<BTreeMap<u32, (String, u64, u64)>> {
    let out = command_output(Command::new("bpftool").args(["prog", "show", "-j"]))
        .context("bpftool (installed by `cargo xtask setup`)")?;
    let list: serde_json::Value = serde_json::from_str(&out).context("bpftool's JSON")?;
    Ok(list
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .filter_map(|p| {
            let id = p.get("id")?.as_u64()? as u32;
            let name = p.get("name")?.as_str()?.to_string();
            let runs = p.get("run_cnt").and_then(|v| v.as_u64()).unwrap_or(0);
            let ns = p.get("run_time_ns").and_then(|v| v.as_u64()).unwrap_or(0);
            Some((id, (name, runs, ns)))
        })
        .collect())
}

/// `fanout` processes other than `ours`.
pub fn other_agents(ours: Option<u32>) -> Vec<u32> {
    command_output(Command::new("pgrep").args(["-x", "fanout"]))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|p| Some(*p) != ours)
        .collect()
}

/// A measured window: the accounting is on from [`Window::start`] to [`Window::finish`].
pub struct Window {
    enabled: Enabled,
    agent_pid: u32,
    ids: BTreeSet<u32>,
    before: BTreeMap<u32, (String, u64, u64)>,
    started: Instant,
    others: BTreeSet<u32>,
}

impl Window {
    pub fn start(agent_pid: u32) -> Result<Self> {
        let others = other_agents(Some(agent_pid)).into_iter().collect();
        let enabled = Enabled::new()?;
        let ids = prog_ids_of(agent_pid);
        let before = read_programs()?;
        Ok(Self {
            enabled,
            agent_pid,
            ids,
            before,
            started: Instant::now(),
            others,
        })
    }

    /// Ends the window; `ops` operations of `unit` happened in it.
    pub fn finish(mut self, ops: f64, unit: &str) -> Result<StatsSample> {
        let after = read_programs()?;
        let seconds = self.started.elapsed().as_secs_f64();
        let how = self.enabled.how.clone();
        drop(self.enabled);
        // Programs loaded during the window count from zero.
        self.ids.extend(prog_ids_of(self.agent_pid));
        self.others.extend(other_agents(Some(self.agent_pid)));
        let mut by_name: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for id in &self.ids {
            let Some((name, runs1, ns1)) = after.get(id) else {
                continue;
            };
            let (runs0, ns0) = self
                .before
                .get(id)
                .map(|(_, r, n)| (*r, *n))
                .unwrap_or((0, 0));
            let e = by_name.entry(name.clone()).or_default();
            e.0 += runs1.saturating_sub(runs0);
            e.1 += ns1.saturating_sub(ns0);
        }
        let ops = ops.max(1.0);
        let mut programs = Vec::new();
        let mut idle_programs = Vec::new();
        for (name, (runs, ns)) in by_name {
            if runs == 0 {
                idle_programs.push(name);
                continue;
            }
            programs.push(ProgramCost {
                name,
                runs,
                run_time_ns: ns,
                runs_per_op: runs as f64 / ops,
                ns_per_run: ns as f64 / runs as f64,
                ns_per_op: ns as f64 / ops,
            });
        }
        let total_ns_per_op = programs.iter().map(|p| p.ns_per_op).sum();
        Ok(StatsSample {
            unit: unit.into(),
            ops,
            seconds,
            programs,
            idle_programs,
            total_ns_per_op,
            other_agents: self.others.into_iter().collect(),
            enabled_by: how,
        })
    }
}

/// What the accounting itself adds to one program run, in ns: the two clock reads and the
/// counter update around every run while it is on. Measured on an empty program (`r0 = 0;
/// exit`, a socket filter) that `BPF_PROG_TEST_RUN` runs [`TEST_RUNS`] times in a kernel loop
/// timed as a whole, once with the accounting off and once on, [`TEST_ROUNDS`] times
/// alternating; the median of the per-round differences. `None` when the sysctl says the
/// accounting is on already (nothing to compare with) or the kernel refuses the test run. A
/// holder of `BPF_ENABLE_STATS` does not show in the sysctl: under one, the difference comes
/// out near 0.
pub fn accounting_ns_per_run() -> Result<Option<f64>> {
    if std::fs::read_to_string(SYSCTL).is_ok_and(|v| v.trim() == "1") {
        return Ok(None);
    }
    let Ok(program) = load_empty_program() else {
        return Ok(None);
    };
    let mut added = Vec::with_capacity(TEST_ROUNDS);
    for _ in 0..TEST_ROUNDS {
        let Ok(off) = test_run_ns(&program) else {
            return Ok(None);
        };
        let on = {
            let _enabled = Enabled::new()?;
            test_run_ns(&program)
        };
        let Ok(on) = on else {
            return Ok(None);
        };
        added.push(on - off);
    }
    added.sort_by(f64::total_cmp);
    Ok(Some(added[added.len() / 2]))
}

/// bpf(2) with a `union bpf_attr` prefix of 128 bytes (the rest zero-filled by the kernel);
/// returns what the command returns.
///
/// # Safety
/// Every pointer written into `attr` must be valid for the command for the whole call.
unsafe fn sys_bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> std::io::Result<i64> {
    let rc = libc::syscall(
        libc::SYS_bpf,
        cmd,
        attr.as_mut_ptr(),
        std::mem::size_of_val(attr) as libc::c_long,
    );
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Runs per test run of [`accounting_ns_per_run`] (about 20 ms with the accounting on).
pub const TEST_RUNS: u32 = 300_000;
/// Alternations of [`accounting_ns_per_run`].
pub const TEST_ROUNDS: usize = 7;

/// `r0 = 0; exit` loaded as a socket filter (the simplest type `BPF_PROG_TEST_RUN` runs).
fn load_empty_program() -> std::io::Result<OwnedFd> {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
    let insns: [u64; 2] = [0x0000_0000_0000_00b7, 0x0000_0000_0000_0095];
    let license = b"GPL\0";
    // union bpf_attr: prog_type, insn_cnt, insns, license; the rest zero.
    let mut attr = [0u64; 16];
    attr[0] = BPF_PROG_TYPE_SOCKET_FILTER as u64 | (insns.len() as u64) << 32;
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    // SAFETY: the pointers in `attr` outlive the call.
    let fd = unsafe { sys_bpf(BPF_PROG_LOAD, &mut attr) }?;
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// ns per run of [`TEST_RUNS`] runs of `program` on a 64-byte packet, as the kernel timed
/// the loop.
fn test_run_ns(program: &OwnedFd) -> std::io::Result<f64> {
    use std::os::fd::AsRawFd;
    const BPF_PROG_TEST_RUN: libc::c_long = 10;
    let packet = [0u8; 64];
    // union bpf_attr's test: prog_fd, retval, data_size_in, data_size_out (u32 each), data_in,
    // data_out (u64 each), repeat, duration (u32 each); the rest zero.
    let mut attr = [0u64; 16];
    attr[0] = program.as_raw_fd() as u64;
    attr[1] = packet.len() as u64;
    attr[2] = packet.as_ptr() as u64;
    attr[4] = TEST_RUNS as u64;
    // SAFETY: the packet outlives the call; the kernel writes retval and duration into
    // `attr`.
    unsafe { sys_bpf(BPF_PROG_TEST_RUN, &mut attr) }?;
    // duration: the u32 at byte 36, the high half of the fifth word.
    Ok((attr[4] >> 32) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test-run measurement needs root (loading a program). As root, with the
    /// accounting off (as on a quiet machine), it measures a cost per run that is positive
    /// and less than a microsecond.
    #[test]
    fn the_accounting_cost_is_measured_as_root() {
        if !crate::util::is_root() {
            eprintln!(
                "NOT RUN: the_accounting_cost_is_measured_as_root needs root to load a BPF program"
            );
            return;
        }
        if std::fs::read_to_string(SYSCTL).is_ok_and(|v| v.trim() == "1") {
            assert_eq!(
                accounting_ns_per_run().unwrap(),
                None,
                "on already: not measured"
            );
            return;
        }
        let program = load_empty_program().expect("an empty socket filter loads");
        assert!(test_run_ns(&program).unwrap() > 0.0);
        let ns = accounting_ns_per_run()
            .unwrap()
            .expect("measured while the accounting is off");
        assert!(ns > 0.0 && ns < 1000.0, "{ns} ns per run");
    }
}
