//! Uprobe-multi links (`fanout::ebpf::uprobe_multi`): the agent's worker libc programs loaded a
//! second time for `BPF_TRACE_UPROBE_MULTI`, sharing the maps of the agent's object, attached
//! to a real Python client of a real Redis. Root only; run with
//! `sudo cargo xtask test uprobe_multi`. The attach/detach measurement is ignored by default:
//! `sudo cargo xtask test uprobe_multi_measure -- --ignored --nocapture` (or the cargo test
//! line of the module's docs).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use fanout::ebpf::{
    link_closer,
    uprobe_multi::{self, Error, LoadOptions, MultiPrograms, UprobeMultiLink},
    worker::plan::LIBC_UPROBES,
    Probes,
};
use integration_tests::{mapped_byte, require_root, wait_for, Proc, Redis};

use agent_common::{
    resp::command::BRPOP,
    worker::{outcome, via},
};

/// The map of followed workers of object versions whose programs check it (the libc
/// programs of later versions rely on the uprobes' pid filter and have no such map).
const WORKER_PROCS: &str = "WORKER_PROCS";

fn start_probes() -> Probes {
    let (probes, _rings) = Probes::start().expect("loading the agent's eBPF object");
    probes
}

/// The distinct programs of `LIBC_UPROBES`.
fn libc_programs() -> Vec<&'static str> {
    let mut names: Vec<&str> = LIBC_UPROBES.iter().map(|(p, _)| *p).collect();
    names.sort();
    names.dedup();
    names
}

/// The libc `pid` has mapped, from its maps.
fn libc_of(pid: u32) -> PathBuf {
    wait_for(
        &format!("libc mapped in {pid}"),
        Duration::from_secs(5),
        || {
            let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
            maps.lines()
                .filter_map(|l| l.split_whitespace().nth(5))
                .find(|p| {
                    p.rsplit('/')
                        .next()
                        .is_some_and(|n| n.starts_with("libc.so"))
                })
                .map(PathBuf::from)
        },
    )
}

/// The probe sites of `LIBC_UPROBES` in `libc`, per program, as the agent places them (the
/// symbol's file offset plus the cheap site `probe_site` finds in its prologue).
fn libc_sites(libc: &Path) -> BTreeMap<&'static str, Vec<u64>> {
    let names: Vec<&str> = LIBC_UPROBES.iter().map(|(_, s)| *s).collect();
    let offsets =
        uprobe_multi::resolve_probe_site_offsets(libc, &names).unwrap_or_else(|e| panic!("{e}"));
    let mut out: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (program, symbol) in LIBC_UPROBES {
        let offset = offsets
            .get(symbol)
            .unwrap_or_else(|| panic!("{symbol} not in {}", libc.display()));
        out.entry(program).or_default().push(*offset);
    }
    out
}

/// One multi link per program: 8 entry programs and one return program for 17 sites.
fn attach_all(
    multi: &MultiPrograms,
    libc: &Path,
    sites: &BTreeMap<&'static str, Vec<u64>>,
    pid: u32,
) -> Vec<UprobeMultiLink> {
    sites
        .iter()
        .map(|(program, offsets)| {
            let retprobe = multi.retprobe(program).expect("loaded");
            multi
                .attach(program, libc, offsets, Some(pid), retprobe)
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect()
}

const CLIENT: &str = r#"
import socket, sys
port = int(sys.argv[1])
sys.stdin.readline()
s = socket.create_connection(("127.0.0.1", port))
for i in range(3):
    s.sendall(b"*3\r\n$5\r\nBRPOP\r\n$19\r\nfanout:uprobe-multi\r\n$3\r\n0.3\r\n")
    reply = s.recv(1024)
    assert reply.startswith(b"*-1"), reply
print("done", flush=True)
sys.stdin.readline()
s.sendall(b"*3\r\n$5\r\nBRPOP\r\n$19\r\nfanout:uprobe-multi\r\n$3\r\n0.1\r\n")
assert s.recv(1024).startswith(b"*-1")
print("done", flush=True)
sys.stdin.readline()
"#;

#[test]
fn uprobe_multi_links_on_a_python_client_count_three_brpop_timeouts() {
    require_root();
    if let Err(reason) = uprobe_multi::support() {
        panic!("this machine kind (Linux 6.18) has uprobe-multi links, but: {reason}");
    }
    let redis = Redis::start(&[]);
    let probes = start_probes();
    let programs = libc_programs();
    let multi = MultiPrograms::load(&probes.map_fds, &programs).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        multi.btf_error.is_none(),
        "object BTF not loaded: {:?}",
        multi.btf_error
    );

    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", CLIENT, &redis.port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let pid = child.id();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let _proc = Proc {
        child,
        name: "python client".into(),
    };
    let libc = libc_of(pid);
    let sites = libc_sites(&libc);
    let links = attach_all(&multi, &libc, &sites, pid);
    assert_eq!(links.len(), programs.len());
    assert_eq!(
        links.iter().map(|l| l.count()).sum::<usize>(),
        LIBC_UPROBES.len()
    );
    // What WorkerMaps::track does for a worker followed through its libc, where the programs
    // check a map of workers; otherwise the link's pid filter alone keeps Redis and every
    // other process out.
    if probes.map_fds.get(WORKER_PROCS).is_some() {
        probes
            .map_fds
            .update(WORKER_PROCS, &pid, &via::LIBC)
            .expect("WORKER_PROCS update");
    }

    writeln!(stdin, "go").unwrap();
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        "done",
        "the client's BRPOPs did not all time out"
    );

    let outcomes = |readings: &fanout::ebpf::worker::WorkerReadings| {
        let mut by_outcome = BTreeMap::new();
        for ((command, kind, _peer), hist) in &readings.durations {
            assert_eq!(*command, BRPOP, "only BRPOPs were sent");
            *by_outcome.entry(*kind).or_insert(0u64) += hist.count;
        }
        by_outcome
    };
    let counted = wait_for("3 BRPOP timeouts counted", Duration::from_secs(5), || {
        let readings = probes.worker.read().remove(&pid)?;
        let by_outcome = outcomes(&readings);
        (by_outcome.get(&outcome::TIMEOUT) == Some(&3)).then_some(by_outcome)
    });
    assert_eq!(counted.get(&outcome::SERVED), None, "{counted:?}");
    assert_eq!(counted.get(&outcome::ERROR), None, "{counted:?}");
    // Each one waited about its 0.3 s timeout, measured from the write to the reply.
    let readings = probes.worker.read().remove(&pid).unwrap();
    let sum_ns: u64 = readings.durations.values().map(|h| h.sum_ns).sum();
    let mean = sum_ns as f64 / 3e9;
    assert!((0.29..0.6).contains(&mean), "mean BRPOP wait {mean} s");

    // Nothing is counted once the links are closed.
    let started = Instant::now();
    let n = links.len();
    link_closer::close_links(links);
    eprintln!("closed {n} links in {:?}", started.elapsed());
    writeln!(stdin, "again").unwrap();
    line.clear();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "done");
    std::thread::sleep(Duration::from_millis(200));
    let after = outcomes(&probes.worker.read().remove(&pid).unwrap());
    assert_eq!(
        after, counted,
        "a BRPOP was counted after the links were closed"
    );
    writeln!(stdin, "exit").unwrap();
}

/// Whether a link with this id still exists (`BPF_LINK_GET_FD_BY_ID`).
fn link_exists(id: u32) -> bool {
    #[repr(C)]
    struct Attr {
        link_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let attr = Attr {
        link_id: id,
        next_id: 0,
        open_flags: 0,
    };
    const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
    // SAFETY: a valid attr of the given size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_GET_FD_BY_ID,
            &attr as *const Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if fd >= 0 {
        // SAFETY: the fd was just returned to us.
        unsafe { libc::close(fd as i32) };
        true
    } else {
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
        false
    }
}

#[test]
fn uprobe_multi_attach_errors_are_clear_and_never_panic() {
    require_root();
    assert!(uprobe_multi::supported(), "{:?}", uprobe_multi::support());
    let probes = start_probes();

    // Loading.
    let missing = MultiPrograms::load(&probes.map_fds, &["no_such_program"]).unwrap_err();
    assert!(matches!(missing, Error::MissingProgram(_)), "{missing}");
    let tracepoint = MultiPrograms::load(&probes.map_fds, &["worker_enter_write"]).unwrap_err();
    assert!(
        matches!(tracepoint, Error::NotUprobe { .. }),
        "{tracepoint}"
    );
    let no_maps =
        MultiPrograms::load(&uprobe_multi::MapFds::default(), &["worker_libc_close"]).unwrap_err();
    assert!(matches!(no_maps, Error::MissingMap(_)), "{no_maps}");

    let multi = MultiPrograms::load(
        &probes.map_fds,
        &["worker_libc_close", "worker_libc_read_ret"],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let libc = libc_of(std::process::id());
    let close = *uprobe_multi::resolve_file_offsets(&libc, &["close"])
        .unwrap()
        .get("close")
        .unwrap();
    let me = Some(std::process::id());

    let message = |e: Error| -> String {
        let s = e.to_string();
        eprintln!("{s}");
        s
    };
    let e = multi
        .attach(
            "worker_libc_close",
            Path::new("/nonexistent/libc.so.6"),
            &[close],
            me,
            false,
        )
        .unwrap_err();
    let s = message(e);
    assert!(
        s.contains("/nonexistent/libc.so.6") && s.contains("no such file"),
        "{s}"
    );

    let e = multi
        .attach("worker_libc_close", Path::new("/"), &[close], me, false)
        .unwrap_err();
    assert!(message(e).contains("not a regular file"));

    // A pid that existed and is gone.
    let mut gone = Command::new("/bin/true").spawn().unwrap();
    let gone_pid = gone.id();
    gone.wait().unwrap();
    let e = multi
        .attach("worker_libc_close", &libc, &[close], Some(gone_pid), false)
        .unwrap_err();
    let s = message(e);
    assert!(
        s.contains("no such process") && s.contains(&gone_pid.to_string()),
        "{s}"
    );
    let e = multi
        .attach("worker_libc_close", &libc, &[close], Some(u32::MAX), false)
        .unwrap_err();
    assert!(message(e).contains("no such pid"));
    let e = multi
        .attach("worker_libc_close", &libc, &[close], Some(0), false)
        .unwrap_err();
    assert!(message(e).contains("pid 0"));

    let e = multi
        .attach("worker_libc_close", &libc, &[], me, false)
        .unwrap_err();
    assert!(message(e).contains("no offsets"));
    let size = std::fs::metadata(&libc).unwrap().len();
    let e = multi
        .attach("worker_libc_close", &libc, &[size + 4096], me, false)
        .unwrap_err();
    assert!(message(e).contains("refused"));
    let e = multi
        .attach("worker_libc_read_ret", &libc, &[close], me, false)
        .unwrap_err();
    assert!(matches!(e, Error::WrongKind { .. }), "{e}");
    let e = multi
        .attach("worker_libc_write", &libc, &[close], me, false)
        .unwrap_err();
    assert!(matches!(e, Error::NotLoaded { .. }), "{e}");
    let e = multi
        .attach_with_cookies(
            "worker_libc_close",
            &libc,
            &[close],
            Some(&[1, 2]),
            me,
            false,
        )
        .unwrap_err();
    assert!(message(e).contains("cookie"));

    // And the good case, on this very process, detached on a background thread.
    let link = multi
        .attach("worker_libc_close", &libc, &[close], me, false)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(link.count(), 1);
    assert_eq!(link.pid(), me);
    let id = link.id().expect("link id");
    assert!(link_exists(id));
    let started = Instant::now();
    link_closer::detach_in_background(vec![link]);
    let returned = started.elapsed();
    assert!(returned < Duration::from_millis(20), "{returned:?}");
    wait_for(
        "the link closed in the background",
        Duration::from_secs(5),
        || (!link_exists(id)).then_some(()),
    );
    eprintln!(
        "detach_in_background returned in {returned:?}, link gone after {:?}",
        started.elapsed()
    );
}

/// With a pid, only that process gets the breakpoints; closing the link takes them out.
#[test]
fn uprobe_multi_pid_filter_breaks_into_that_process_only() {
    require_root();
    let probes = start_probes();
    let multi = MultiPrograms::load(&probes.map_fds, &["worker_libc_close"])
        .unwrap_or_else(|e| panic!("{e}"));
    let procs = sleepers(2);
    let (a, b) = (procs[0].pid(), procs[1].pid());
    let libc = libc_of(a);
    assert_eq!(libc_of(b), libc);
    let site = uprobe_multi::resolve_probe_site_offsets(&libc, &["close"]).unwrap()["close"];
    let original = std::fs::read(&libc).unwrap()[site as usize];
    assert_ne!(original, 0xcc);
    assert_eq!(mapped_byte(a, &libc, site), original);
    let link = multi
        .attach("worker_libc_close", &libc, &[site], Some(a), false)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(mapped_byte(a, &libc, site), 0xcc, "breakpoint in {a}");
    assert_eq!(
        mapped_byte(b, &libc, site),
        original,
        "no breakpoint in {b}"
    );
    link.detach();
    assert_eq!(mapped_byte(a, &libc, site), original, "breakpoint removed");
}

/// The worker programs pass callbacks to bpf_loop, which the verifier accepts only with BTF
/// func_info: the reason the module loads the object's BTF.
#[test]
fn uprobe_multi_programs_with_bpf_loop_callbacks_need_btf() {
    require_root();
    let probes = start_probes();
    let object = fanout::ebpf::EBPF_OBJECT.expect("built with eBPF");
    let without = MultiPrograms::load_with(
        object,
        &probes.map_fds,
        &["worker_libc_write"],
        LoadOptions {
            btf: false,
            ..LoadOptions::default()
        },
    )
    .unwrap_err();
    let Error::Load { verifier_log, .. } = &without else {
        panic!("{without}")
    };
    assert!(verifier_log.contains("missing btf func_info"), "{without}");
    eprintln!("{without}");
    MultiPrograms::load(&probes.map_fds, &["worker_libc_write"]).unwrap_or_else(|e| panic!("{e}"));
}

// --- measurement -----------------------------------------------------------------------------

/// `n` processes that map libc and wait.
fn sleepers(n: usize) -> Vec<Proc> {
    (0..n)
        .map(|_| Proc {
            child: Command::new("/bin/sleep")
                .arg("600")
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
            name: "sleep".into(),
        })
        .collect()
}

// --- uprobe sessions (research prototype) ----------------------------------------------------

/// Raw bpf(2) for the session prototype, whose program is assembled here (aya-ebpf 0.2.1 has
/// no session support, and the worker programs are not to change).
mod raw {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    pub fn bpf<T>(cmd: u32, attr: &mut T) -> std::io::Result<i64> {
        // SAFETY: a live #[repr(C)] attr of the given size; its pointers outlive the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd as libc::c_long,
                attr as *mut T,
                std::mem::size_of::<T>(),
            )
        };
        if ret < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    }

    fn fd(ret: i64) -> OwnedFd {
        // SAFETY: a new fd from bpf(2).
        unsafe { OwnedFd::from_raw_fd(ret as i32) }
    }

    /// One instruction: opcode, dst, src, offset, immediate.
    pub fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
        u64::from(code)
            | u64::from(dst | (src << 4)) << 8
            | u64::from(off as u16) << 16
            | u64::from(imm as u32) << 32
    }

    /// An array of `n` u64 counters.
    pub fn counters(n: u32) -> OwnedFd {
        #[repr(C)]
        struct Attr {
            map_type: u32,
            key_size: u32,
            value_size: u32,
            max_entries: u32,
        }
        let mut attr = Attr {
            map_type: 2, // BPF_MAP_TYPE_ARRAY
            key_size: 4,
            value_size: 8,
            max_entries: n,
        };
        fd(bpf(0, &mut attr).expect("BPF_MAP_CREATE"))
    }

    pub fn read(map: &OwnedFd, key: u32) -> u64 {
        #[repr(C)]
        struct Attr {
            map_fd: u32,
            _pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        let mut value = 0u64;
        let mut attr = Attr {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            key: &key as *const u32 as u64,
            value: &mut value as *mut u64 as u64,
            flags: 0,
        };
        bpf(1, &mut attr).expect("BPF_MAP_LOOKUP_ELEM");
        value
    }

    /// Loads a kprobe-type program with `expected_attach_type`; the verifier log on failure.
    pub fn load(insns: &[u64], expected_attach_type: u32) -> Result<OwnedFd, String> {
        #[repr(C)]
        #[derive(Default)]
        struct Attr {
            prog_type: u32,
            insn_cnt: u32,
            insns: u64,
            license: u64,
            log_level: u32,
            log_size: u32,
            log_buf: u64,
            kern_version: u32,
            prog_flags: u32,
            prog_name: [u8; 16],
            prog_ifindex: u32,
            expected_attach_type: u32,
        }
        let mut log = vec![0u8; 1 << 16];
        let mut attr = Attr {
            prog_type: 2, // BPF_PROG_TYPE_KPROBE
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: c"GPL".as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            expected_attach_type,
            ..Default::default()
        };
        attr.prog_name[..12].copy_from_slice(b"fanout_sessn");
        bpf(5, &mut attr).map(fd).map_err(|e| {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            format!("{e}: {}", String::from_utf8_lossy(&log[..end]))
        })
    }

    /// BPF_LINK_CREATE of a uprobe-multi or uprobe-session link.
    pub fn link(
        prog: &OwnedFd,
        attach_type: u32,
        path: &std::ffi::CStr,
        offsets: &[u64],
        flags: u32,
        pid: u32,
    ) -> std::io::Result<OwnedFd> {
        #[repr(C)]
        struct Attr {
            prog_fd: u32,
            target_fd: u32,
            attach_type: u32,
            flags: u32,
            path: u64,
            offsets: u64,
            ref_ctr_offsets: u64,
            cookies: u64,
            cnt: u32,
            uprobe_flags: u32,
            pid: u32,
            _pad: u32,
        }
        let mut attr = Attr {
            prog_fd: prog.as_raw_fd() as u32,
            target_fd: 0,
            attach_type,
            flags: 0,
            path: path.as_ptr() as u64,
            offsets: offsets.as_ptr() as u64,
            ref_ctr_offsets: 0,
            cookies: 0,
            cnt: offsets.len() as u32,
            uprobe_flags: flags,
            pid,
            _pad: 0,
        };
        bpf(28, &mut attr).map(fd)
    }
}

/// The prototype program. Slot 0/1 count runs it judged entry/return by comparing the probed
/// address (`bpf_get_func_ip`) with `pt_regs->ip` (equal only at entry: the kernel sets ip
/// back to the breakpoint for entry handlers; a return handler sees the return address).
/// With `kfunc` (the id of `bpf_session_is_return` in vmlinux BTF), slots 2/3 count what
/// the kfunc says. At entry it returns `entry_ret` (non-zero: skip the return).
fn session_program(map: &std::os::fd::OwnedFd, kfunc: Option<i32>, entry_ret: i32) -> Vec<u64> {
    use raw::insn;
    use std::os::fd::AsRawFd;
    let fd = map.as_raw_fd();
    let bump = |slot_reg: u8| -> Vec<u64> {
        vec![
            insn(0x63, 10, slot_reg, -4, 0), // *(u32 *)(r10 - 4) = slot
            insn(0x18, 1, 1, 0, fd),         // r1 = map (ld_imm64, BPF_PSEUDO_MAP_FD)
            0,
            insn(0xbf, 2, 10, 0, 0), // r2 = r10
            insn(0x07, 2, 0, 0, -4), // r2 += -4
            insn(0x85, 0, 0, 0, 1),  // call bpf_map_lookup_elem
            insn(0x15, 0, 0, 2, 0),  // if r0 == 0 goto +2
            insn(0xb7, 1, 0, 0, 1),  // r1 = 1
            insn(0xdb, 0, 1, 0, 0),  // lock *(u64 *)(r0 + 0) += r1
        ]
    };
    let mut p = vec![
        insn(0xbf, 6, 1, 0, 0),   // r6 = ctx
        insn(0x85, 0, 0, 0, 173), // call bpf_get_func_ip
        insn(0x79, 7, 6, 128, 0), // r7 = regs->ip
        insn(0xb7, 8, 0, 0, 1),   // r8 = 1 (return)
        insn(0x5d, 7, 0, 1, 0),   // if r7 != r0 goto +1
        insn(0xb7, 8, 0, 0, 0),   // r8 = 0 (entry)
    ];
    match kfunc {
        Some(id) => p.extend([
            insn(0x85, 0, 2, 0, id), // call bpf_session_is_return (BPF_PSEUDO_KFUNC_CALL)
            insn(0xbf, 9, 0, 0, 0),  // r9 = r0
            insn(0x57, 9, 0, 0, 1),  // r9 &= 1
            insn(0x07, 9, 0, 0, 2),  // r9 += 2
        ]),
        None => p.push(insn(0xb7, 9, 0, 0, 4)), // r9 = 4 (unused slot)
    }
    p.extend(bump(8));
    p.extend(bump(9));
    p.extend([
        insn(0xb7, 0, 0, 0, entry_ret), // r0 = entry_ret
        insn(0x15, 8, 0, 1, 0),         // if r8 == 0 goto +1
        insn(0xb7, 0, 0, 0, 0),         // r0 = 0
        insn(0x95, 0, 0, 0, 0),         // exit
    ]);
    p
}

/// A link filtered to one pid runs its program in that process only, not in a child it forks
/// (a Resque master forks one per job). The child inherits the breakpoints with the memory,
/// and the kernel filters at each hit; unlike aya's perf-event uprobes, whose filter takes
/// the breakpoint out of the child at its first hit, a multi link leaves it there, so the
/// child pays a trap per call (without running the program) until it execs or exits.
#[test]
fn uprobe_multi_forked_child_does_not_run_the_program() {
    require_root();
    let mut probes = start_probes();
    for multi in [true, false] {
        let (parent, child, before, after, entries) = fork_case(&mut probes, multi);
        eprintln!(
            "{}: parent {parent}: {entries} entries counted for its 500 reads; forked child {child}: byte at the site {before:#x} after fork, {after:#x} after its 1000 reads",
            if multi { "multi link" } else { "aya uprobe" }
        );
        assert_eq!(before, 0xcc);
        if multi {
            assert!((500..600).contains(&entries), "{entries}");
            assert_eq!(
                after, 0xcc,
                "the kernel took the breakpoint out of the child"
            );
        } else {
            assert_ne!(after, 0xcc, "aya's uprobe left the breakpoint in the child");
        }
    }
}

/// Runs a python that forks a child doing 1000 reads, then does 500 itself, with a probe on
/// its `read` (a counting multi link, or aya's uprobe of `worker_libc_read`): (parent,
/// child, the child's byte at the site before and after its reads, entries counted).
fn fork_case(probes: &mut Probes, multi: bool) -> (u32, u32, u8, u8, u64) {
    let script = r#"
import os, sys, time
fd = os.open("/dev/zero", os.O_RDONLY)
sys.stdin.readline()
child = os.fork()
if child == 0:
    print(os.getpid(), flush=True)
    time.sleep(0.5)
    for _ in range(1000):
        os.read(fd, 1)
    print("child-done", flush=True)
    time.sleep(0.5)
    os._exit(0)
os.waitpid(child, 0)
for _ in range(500):
    os.read(fd, 1)
print("done", flush=True)
sys.stdin.readline()
"#;
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let pid = child.id();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let _proc = Proc {
        child,
        name: "forking python".into(),
    };
    let libc = libc_of(pid);
    let site = uprobe_multi::resolve_probe_site_offsets(&libc, &["read"]).unwrap()["read"];
    let c_libc = std::ffi::CString::new(libc.to_str().unwrap()).unwrap();
    let map = raw::counters(8);
    let mut aya_links = Vec::new();
    let mut link = None;
    if multi {
        let prog = raw::load(
            &session_program(&map, None, 0),
            uprobe_multi::BPF_TRACE_UPROBE_MULTI,
        )
        .expect("counting program");
        link = Some(
            raw::link(
                &prog,
                uprobe_multi::BPF_TRACE_UPROBE_MULTI,
                &c_libc,
                &[site],
                0,
                pid,
            )
            .expect("link"),
        );
    } else {
        aya_links = uprobe_multi::attach_per_uprobe(
            &mut probes.ebpf,
            "worker_libc_read",
            &libc,
            &[site],
            Some(pid),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let mut line = String::new();
    let mut next = |line: &mut String| {
        line.clear();
        stdout.read_line(line).unwrap();
        line.trim().to_string()
    };
    writeln!(stdin, "go").unwrap();
    let forked: u32 = next(&mut line).parse().unwrap();
    let before = mapped_byte(forked, &libc, site);
    assert_eq!(next(&mut line), "child-done");
    let after = mapped_byte(forked, &libc, site);
    assert_eq!(next(&mut line), "done");
    let entries = raw::read(&map, 0);
    drop(link);
    for (program, l) in aya_links {
        fanout::ebpf::detach_uprobe(&mut probes.ebpf, program, l);
    }
    writeln!(stdin, "exit").unwrap();
    (pid, forked, before, after, entries)
}
