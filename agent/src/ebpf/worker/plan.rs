//! Which uprobes follow a worker and where they go: the process's C library (or its own
//! executable when static), the program on each function, and the plan of (program,
//! offsets) pairs that the attaching thread ([`super::attach`]) turns into links.

use agent_common::worker::io_site;

use crate::ebpf::{uprobe_multi, ProbeError};

/// Where a worker's uprobes go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UprobeTarget {
    /// The C library the process maps.
    SharedLibc(std::path::PathBuf),
    /// A static executable, which carries the C library functions itself.
    OwnExecutable(std::path::PathBuf),
}

/// Where `pid`'s uprobes would go: the libc it maps, or, for a static executable, the
/// executable itself (it carries the C library's `write`, `read`, ... when it was linked
/// against one; whether it does is found out when attaching). `None` for Go binaries, whose
/// runtime makes its system calls itself.
pub fn uprobe_target(proc: &crate::proc_reader::ProcRoot, pid: u32) -> Option<UprobeTarget> {
    if let Some(libc) = proc.libc_path(pid) {
        return Some(UprobeTarget::SharedLibc(libc));
    }
    let exe = proc.path().join(pid.to_string()).join("exe");
    match crate::proc_reader::maps::exe_kind(&exe) {
        Ok(crate::proc_reader::maps::ExeKind::Static) => Some(UprobeTarget::OwnExecutable(exe)),
        _ => None,
    }
}

impl UprobeTarget {
    pub fn path(&self) -> &std::path::Path {
        match self {
            UprobeTarget::SharedLibc(p) | UprobeTarget::OwnExecutable(p) => p,
        }
    }
}

/// (program, libc function) pairs attached per worker process in libc mode.
pub const LIBC_UPROBES: [(&str, &str); 17] = [
    ("worker_libc_write", "write"),
    ("worker_libc_write", "send"),
    ("worker_libc_write", "sendto"),
    ("worker_libc_writev", "writev"),
    ("worker_libc_sendmsg", "sendmsg"),
    ("worker_libc_read", "read"),
    ("worker_libc_read", "recv"),
    ("worker_libc_read", "recvfrom"),
    ("worker_libc_readv", "readv"),
    ("worker_libc_recvmsg", "recvmsg"),
    ("worker_libc_read_ret", "read"),
    ("worker_libc_read_ret", "recv"),
    ("worker_libc_read_ret", "recvfrom"),
    ("worker_libc_read_ret", "readv"),
    ("worker_libc_read_ret", "recvmsg"),
    ("worker_libc_close", "close"),
    ("worker_libc_connect", "connect"),
];

/// (program, OpenSSL function) pairs attached to a followed worker once it is seen talking
/// TLS (see [`super::WorkerMaps::follow_tls`]): the plain text of its TLS connections, where it
/// hands it to the library and gets it back.
pub const SSL_UPROBES: [(&str, &str); 9] = [
    ("worker_ssl_enter", "SSL_write"),
    ("worker_ssl_enter", "SSL_read"),
    ("worker_ssl_enter_ex", "SSL_write_ex"),
    ("worker_ssl_enter_ex", "SSL_read_ex"),
    ("worker_ssl_write_ret", "SSL_write"),
    ("worker_ssl_write_ret", "SSL_write_ex"),
    ("worker_ssl_read_ret", "SSL_read"),
    ("worker_ssl_read_ret", "SSL_read_ex"),
    ("worker_ssl_set_fd", "SSL_set_fd"),
];

/// Which [`SSL_UPROBES`] go on which offsets of a libssl whose probe sites are `sites` (a
/// function the library lacks is left out: OpenSSL 1.1.0 has no `_ex` forms); `None` when
/// writes or reads could not be followed at all.
pub(super) fn ssl_plan(sites: &uprobe_multi::ProbeSites) -> Option<Vec<(&'static str, Vec<u64>)>> {
    let mut plan = Vec::new();
    for (program, symbol) in SSL_UPROBES {
        if let Some(offset) = sites.entries.get(symbol) {
            add_to_plan(&mut plan, program, &[*offset]);
        }
    }
    let has = |p: &str| plan.iter().any(|(name, _)| *name == p);
    (has("worker_ssl_write_ret") && has("worker_ssl_read_ret")).then_some(plan)
}

/// The program probed where `read`, `recv` and `recvfrom` have returned from their system
/// call, in place of their entry and return probes (`worker_libc_read` and
/// `worker_libc_read_ret`), when the C library's code allows it (see
/// [`crate::probe_site::syscall_exit_sites`]).
pub const READ_DONE_PROGRAM: &str = "worker_libc_read_done";

/// The read functions [`READ_DONE_PROGRAM`] can take over (plain buffer, fd in `rdi`).
pub(super) const READ_DONE_FUNCTIONS: [&str; 3] = ["read", "recv", "recvfrom"];

/// Which libc programs go on which offsets: [`LIBC_UPROBES`] at each function's entry site,
/// except that a read whose every system call returns where it can be probed gets
/// [`READ_DONE_PROGRAM`] there instead of its entry and return probes, when `read_done` (the
/// program loaded). In [`LIBC_UPROBES`] order, programs without offsets left out.
pub(super) fn libc_plan(
    sites: &uprobe_multi::ProbeSites,
    read_done: bool,
) -> Vec<(&'static str, Vec<u64>)> {
    let mut plan = Vec::new();
    let mut add = |program: &'static str, new: &[u64]| add_to_plan(&mut plan, program, new);
    for (program, symbol) in LIBC_UPROBES {
        let Some(offset) = sites.entries.get(symbol) else {
            continue;
        };
        let exits = (read_done && READ_DONE_FUNCTIONS.contains(&symbol))
            .then(|| sites.syscall_exits.get(symbol))
            .flatten();
        match (exits, program) {
            (Some(exits), "worker_libc_read") => add(READ_DONE_PROGRAM, exits),
            (Some(_), _) => {}
            (None, _) => add(program, &[*offset]),
        }
    }
    plan
}

/// Whether a libc plan can follow a worker: a read (both sides of it, or where it returned)
/// and a write are needed, or nothing is followed.
pub(super) fn check_libc_plan(
    plan: &[(&'static str, Vec<u64>)],
    libc: &std::path::Path,
) -> Result<(), ProbeError> {
    let has = |p: &str| plan.iter().any(|(name, _)| *name == p);
    let reads = (has("worker_libc_read") && has("worker_libc_read_ret")) || has(READ_DONE_PROGRAM);
    if has(WRITE_PROGRAM) && reads {
        return Ok(());
    }
    Err(ProbeError::Attach {
        program: "worker_libc_*",
        category: "uprobe",
        name: "libc",
        message: format!(
            "{} has no write/read functions to probe (a stripped static binary?)",
            libc.display()
        ),
    })
}

/// Adds `offsets` to `program`'s in a plan of (program, offsets) pairs: a program attached to
/// several functions is one link (or one list of uprobes).
fn add_to_plan(plan: &mut Vec<(&'static str, Vec<u64>)>, program: &'static str, offsets: &[u64]) {
    match plan.iter_mut().find(|(p, _)| *p == program) {
        Some((_, list)) => list.extend_from_slice(offsets),
        None => plan.push((program, offsets.to_vec())),
    }
}

/// The program on `write`, `send` and `sendto`.
pub(super) const WRITE_PROGRAM: &str = "worker_libc_write";

/// The path of an open file through the agent's own descriptor: it names that file even if
/// its original path now names another.
pub(super) fn fd_path(file: &std::fs::File) -> std::path::PathBuf {
    use std::os::fd::AsRawFd;
    format!("/proc/self/fd/{}", file.as_raw_fd()).into()
}

/// Attaches the probe on `write` of one worker, with the cookie that names it.
pub(super) fn attach_write_probe(
    multi: &uprobe_multi::MultiPrograms,
    libc: &std::path::Path,
    offset: u64,
    pid: u32,
) -> Result<uprobe_multi::UprobeMultiLink, uprobe_multi::Error> {
    multi.attach_with_cookies(
        WRITE_PROGRAM,
        libc,
        &[offset],
        Some(&[io_site::GENERIC as u64]),
        Some(pid),
        false,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ebpf::uprobe_multi::ProbeSites;

    /// Every libc function at entry site 100 + its index; exits for the named reads.
    fn sites(exits: &[&str]) -> ProbeSites {
        let mut sites = ProbeSites::default();
        for (i, (_, symbol)) in LIBC_UPROBES.iter().enumerate() {
            sites.entries.insert(symbol.to_string(), 100 + i as u64);
        }
        for (i, symbol) in exits.iter().enumerate() {
            let at = 1000 + 10 * i as u64;
            sites
                .syscall_exits
                .insert(symbol.to_string(), vec![at, at + 1]);
        }
        sites
    }

    fn offsets_of<'a>(plan: &'a [(&str, Vec<u64>)], program: &str) -> Option<&'a Vec<u64>> {
        plan.iter().find(|(p, _)| *p == program).map(|(_, o)| o)
    }

    #[test]
    fn openssl_probes_go_on_the_functions_the_library_has() {
        let with = |symbols: &[(&str, u64)]| {
            let mut sites = ProbeSites::default();
            for (symbol, offset) in symbols {
                sites.entries.insert(symbol.to_string(), *offset);
            }
            ssl_plan(&sites)
        };
        // OpenSSL 3: both forms; each call's entry and return, and SSL_set_fd.
        let plan = with(&[
            ("SSL_write", 10),
            ("SSL_read", 20),
            ("SSL_write_ex", 30),
            ("SSL_read_ex", 40),
            ("SSL_set_fd", 50),
        ])
        .unwrap();
        assert_eq!(offsets_of(&plan, "worker_ssl_enter"), Some(&vec![10, 20]));
        assert_eq!(
            offsets_of(&plan, "worker_ssl_enter_ex"),
            Some(&vec![30, 40])
        );
        assert_eq!(
            offsets_of(&plan, "worker_ssl_write_ret"),
            Some(&vec![10, 30])
        );
        assert_eq!(
            offsets_of(&plan, "worker_ssl_read_ret"),
            Some(&vec![20, 40])
        );
        assert_eq!(offsets_of(&plan, "worker_ssl_set_fd"), Some(&vec![50]));
        // OpenSSL 1.1.0: no `_ex` forms.
        let plan = with(&[("SSL_write", 10), ("SSL_read", 20), ("SSL_set_fd", 50)]).unwrap();
        assert_eq!(offsets_of(&plan, "worker_ssl_enter_ex"), None);
        assert_eq!(offsets_of(&plan, "worker_ssl_write_ret"), Some(&vec![10]));
        // Reads or writes missing: nothing to follow.
        assert_eq!(with(&[("SSL_write", 10), ("SSL_set_fd", 50)]), None);
        assert_eq!(with(&[("SSL_read_ex", 10)]), None);
        assert_eq!(with(&[]), None);
    }

    #[test]
    fn reads_with_exit_sites_lose_their_entry_and_return_probes() {
        let sites = sites(&["read", "recv", "recvfrom"]);
        let plan = libc_plan(&sites, true);
        let entry = |symbol: &str| sites.entries[symbol];
        assert_eq!(
            offsets_of(&plan, READ_DONE_PROGRAM),
            Some(&vec![1000, 1001, 1010, 1011, 1020, 1021])
        );
        assert_eq!(offsets_of(&plan, "worker_libc_read"), None);
        // readv and recvmsg keep both ends.
        assert_eq!(
            offsets_of(&plan, "worker_libc_read_ret"),
            Some(&vec![entry("readv"), entry("recvmsg")])
        );
        assert_eq!(
            offsets_of(&plan, "worker_libc_write"),
            Some(&vec![entry("write"), entry("send"), entry("sendto")])
        );
        // 17 entries in LIBC_UPROBES: 3 reads and 3 returns replaced by 6 exit sites.
        assert_eq!(plan.iter().map(|(_, o)| o.len()).sum::<usize>(), 17);
    }

    #[test]
    fn without_the_program_or_the_sites_reads_keep_entry_and_return() {
        for (exits, read_done) in [(&["read", "recv", "recvfrom"][..], false), (&[][..], true)] {
            let sites = sites(exits);
            let plan = libc_plan(&sites, read_done);
            assert_eq!(offsets_of(&plan, READ_DONE_PROGRAM), None);
            assert_eq!(offsets_of(&plan, "worker_libc_read").map(Vec::len), Some(3));
            assert_eq!(
                offsets_of(&plan, "worker_libc_read_ret").map(Vec::len),
                Some(5)
            );
        }
        // Mixed: recv has no exit site, so it keeps both ends while the others do not.
        let sites = sites(&["read", "recvfrom"]);
        let plan = libc_plan(&sites, true);
        assert_eq!(
            offsets_of(&plan, "worker_libc_read"),
            Some(&vec![sites.entries["recv"]])
        );
        assert_eq!(
            offsets_of(&plan, "worker_libc_read_ret").map(Vec::len),
            Some(3)
        );
        assert_eq!(offsets_of(&plan, READ_DONE_PROGRAM).map(Vec::len), Some(4));
    }
}
