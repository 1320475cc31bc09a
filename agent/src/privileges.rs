//! What the agent may do: its effective capabilities, read from /proc/self/status (parsed by
//! procfs), checked before anything is loaded so that a missing one is named instead of
//! surfacing as EPERM.

/// A capability the agent uses, and what for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    pub bit: u32,
    pub name: &'static str,
    pub needed_for: &'static str,
    /// Without it, no eBPF at all (the agent falls back to /proc).
    pub ebpf: bool,
}

pub const CAP_DAC_READ_SEARCH: Capability = Capability {
    bit: 2,
    name: "CAP_DAC_READ_SEARCH",
    needed_for: "reading other users' /proc files and binaries",
    ebpf: false,
};
pub const CAP_SYS_PTRACE: Capability = Capability {
    bit: 19,
    name: "CAP_SYS_PTRACE",
    needed_for: "reading /proc/<pid>/exe and /proc/<pid>/root of other users' processes",
    ebpf: false,
};
pub const CAP_SYS_ADMIN: Capability = Capability {
    bit: 21,
    name: "CAP_SYS_ADMIN",
    needed_for: "eBPF on kernels older than 5.8, mounting tracefs",
    ebpf: false,
};
pub const CAP_PERFMON: Capability = Capability {
    bit: 38,
    name: "CAP_PERFMON",
    needed_for: "attaching tracepoints and uprobes",
    ebpf: true,
};
pub const CAP_BPF: Capability = Capability {
    bit: 39,
    name: "CAP_BPF",
    needed_for: "loading eBPF programs and maps",
    ebpf: true,
};

pub const REQUIRED: [Capability; 4] = [CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    effective: u64,
}

impl Capabilities {
    /// The effective capabilities in a `/proc/<pid>/status` text, parsed by procfs; `None`
    /// when it is not one (procfs wants the fields every kernel writes, Name to CapEff). Its
    /// status parser only splits lines and parses numbers (procfs-core 0.18: no slicing, no
    /// unwrap), so no shape check precedes it; the `proc` fuzz target feeds it arbitrary bytes.
    pub fn from_status(status: &str) -> Option<Self> {
        use procfs::FromRead as _;
        let status = procfs::process::Status::from_read(status.as_bytes()).ok()?;
        Some(Self {
            effective: status.capeff,
        })
    }

    /// This process's, from `/proc/self/status` (the agent's own /proc, whatever the
    /// `--proc-root`).
    pub fn current() -> Option<Self> {
        let status = procfs::process::Process::myself().ok()?.status().ok()?;
        Some(Self {
            effective: status.capeff,
        })
    }

    pub fn has(&self, cap: Capability) -> bool {
        self.effective & (1u64 << cap.bit) != 0
    }

    /// Required capabilities this process lacks. CAP_SYS_ADMIN stands in for CAP_BPF and
    /// CAP_PERFMON, as on kernels that predate them.
    pub fn missing(&self) -> Vec<Capability> {
        REQUIRED
            .iter()
            .copied()
            .filter(|c| !self.has(*c) && !(c.ebpf && self.has(CAP_SYS_ADMIN)))
            .collect()
    }

    /// Whether eBPF can be loaded at all.
    pub fn ebpf_possible(&self) -> bool {
        self.missing().iter().all(|c| !c.ebpf)
    }
}

/// One line naming missing capabilities and what each is for.
pub fn describe(missing: &[Capability]) -> String {
    missing
        .iter()
        .map(|c| format!("{} ({})", c.name, c.needed_for))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real status text (the fixture redis-server's), with `hex` as its CapEff.
    fn caps(hex: &str) -> Capabilities {
        let status = include_str!("../tests/fixtures/proc/100/status")
            .replace("CapEff:\t0000000000000000", &format!("CapEff:\t{hex}"));
        Capabilities::from_status(&status).unwrap()
    }

    #[test]
    fn root_has_everything() {
        let root = caps("000001ffffffffff");
        assert!(root.missing().is_empty());
        assert!(root.ebpf_possible());
    }

    #[test]
    fn the_minimal_set_is_enough() {
        let bits = (1u64 << 39) | (1 << 38) | (1 << 19) | (1 << 2);
        let minimal = caps(&format!("{bits:016x}"));
        assert!(minimal.missing().is_empty());
    }

    #[test]
    fn missing_bpf_and_perfmon_are_named_and_stop_ebpf() {
        let bits = (1u64 << 19) | (1 << 2);
        let c = caps(&format!("{bits:016x}"));
        let names: Vec<_> = c.missing().iter().map(|c| c.name).collect();
        assert_eq!(names, ["CAP_BPF", "CAP_PERFMON"]);
        assert!(!c.ebpf_possible());
        assert!(describe(&c.missing())
            .starts_with("CAP_BPF (loading eBPF programs and maps), CAP_PERFMON"));
    }

    #[test]
    fn sys_admin_stands_in_for_bpf_and_perfmon() {
        let bits = (1u64 << 21) | (1 << 19) | (1 << 2);
        assert!(caps(&format!("{bits:016x}")).missing().is_empty());
    }

    #[test]
    fn unprivileged_lacks_all_four() {
        assert_eq!(caps("0000000000000000").missing().len(), 4);
        assert!(Capabilities::from_status("no caps here").is_none());
    }

    #[test]
    fn this_process_status_is_read() {
        assert!(Capabilities::current().is_some());
    }

    /// Malformed status texts give `None`, never a panic: a CapEff that is not hex or too
    /// wide, a missing field, truncation at every byte, a line without a colon.
    #[test]
    fn a_malformed_status_is_none_not_a_panic() {
        let status = include_str!("../tests/fixtures/proc/100/status");
        assert_eq!(
            Capabilities::from_status(status).map(|c| c.effective),
            Some(0)
        );
        for (from, to) in [
            ("CapEff:\t0000000000000000", "CapEff:\tzz"),
            ("CapEff:\t0000000000000000", "CapEff:\t10000000000000000"),
            ("CapEff:\t0000000000000000", "CapEff:"),
            ("CapEff:\t0000000000000000\n", ""),
            ("Uid:\t101\t101\t101\t101", "Uid:\t101"),
            ("SigQ:\t0/31457", "SigQ:\t0"),
            ("Threads:\t6", "Threads"),
        ] {
            assert!(status.contains(from), "{from}");
            let bad = status.replace(from, to);
            assert!(Capabilities::from_status(&bad).is_none(), "{to:?}");
        }
        for end in 0..status.len() {
            let _ = Capabilities::from_status(&status[..end]);
        }
        let with_extra = format!("{status}Future_field:\tsomething new\n");
        assert!(Capabilities::from_status(&with_extra).is_some());
    }
}
