//! What the agent may do: its effective capabilities, read from /proc/self/status, checked
//! before anything is loaded so that a missing one is named instead of surfacing as EPERM.

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
    /// Parses the `CapEff:` line of a `/proc/<pid>/status` text.
    pub fn from_status(status: &str) -> Option<Self> {
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))?
            .trim();
        u64::from_str_radix(hex, 16)
            .ok()
            .map(|effective| Self { effective })
    }

    pub fn current() -> Option<Self> {
        Self::from_status(&std::fs::read_to_string("/proc/self/status").ok()?)
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

    fn caps(hex: &str) -> Capabilities {
        Capabilities::from_status(&format!(
            "Name:\tfanout\nCapInh:\t0000000000000000\nCapEff:\t{hex}\nCapBnd:\t000001ffffffffff\n"
        ))
        .unwrap()
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
}
