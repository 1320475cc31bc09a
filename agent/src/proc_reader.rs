//! Reading processes and threads from a /proc tree (the host's, or a committed fixture tree).
//!
//! Processes exit at any moment, so every read may find the process gone: that is reported as
//! [`ReadError::Vanished`], which callers count and skip, never as a failure of the agent.

use std::path::{Path, PathBuf};

use agent_common::sched::TaskCounters;

use procfs::{
    net::{TcpNetEntry, TcpState},
    process::{FDTarget, Process},
    ProcError,
};

/// A process as the agent identifies it: a pid is reused, (pid, start time) is not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcessId {
    pub pid: u32,
    /// Start time in clock ticks since boot (`stat` field 22).
    pub start_time_ticks: u64,
}

/// What discovery needs to know about a process to match it against rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessInfo {
    pub id: ProcessId,
    /// `comm`: the kernel's 15-byte task name.
    pub comm: String,
    /// Executable path as the process sees it (inside its own mount namespace), if readable.
    pub exe: Option<PathBuf>,
    /// Arguments; empty for kernel threads and zombies.
    pub cmdline: Vec<String>,
    /// Session id (`stat` field 6): equal to the pid for a session leader.
    pub session: i32,
    /// Kernel task flags (`stat` field 9), e.g. [`PF_FORKNOEXEC`].
    pub flags: u32,
}

/// `include/linux/sched.h`: set on fork, cleared by exec. A process with it runs its parent's
/// image: a Redis's BGSAVE child, a daemonized server, a Resque job child.
pub const PF_FORKNOEXEC: u32 = 0x0000_0040;

impl ProcessInfo {
    /// Basename of the executable, e.g. `redis-check-rdb` for Debian's redis-server symlink.
    pub fn exe_name(&self) -> Option<&str> {
        self.exe.as_deref()?.file_name()?.to_str()
    }

    /// The program name the process gives itself: the basename of the first word of argv[0].
    /// A process title replaces argv[0] (`redis-server 127.0.0.1:6379`), hence the first word.
    pub fn argv0_name(&self) -> Option<&str> {
        let first = self.cmdline.first()?.split_whitespace().next()?;
        Some(first.rsplit('/').next().unwrap_or(first))
    }

    /// Forked and not (yet) exec'd: it runs its parent's image.
    pub fn forked_without_exec(&self) -> bool {
        self.flags & PF_FORKNOEXEC != 0
    }

    /// Leads its own session (called setsid(), as a daemonizing server does).
    pub fn session_leader(&self) -> bool {
        self.session == self.id.pid as i32
    }
}

/// CPU counters of one thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadSample {
    pub tid: u32,
    pub name: String,
    pub start_time_ticks: u64,
    pub user_ticks: u64,
    pub system_ticks: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The process or thread exited while being read: normal, counted, skipped.
    #[error("process {0} vanished while being read")]
    Vanished(u32),
    /// The process has exited and waits for its parent to reap it (a zombie): nothing to
    /// track, and nothing went wrong reading it, so it is skipped without being counted.
    #[error("process {0} has exited (a zombie its parent has not reaped)")]
    Exited(u32),
    /// Anything else (permissions, malformed content).
    #[error("reading {what} of process {pid}: {message}")]
    Failed {
        pid: u32,
        what: &'static str,
        message: String,
    },
}

impl ReadError {
    fn from_proc(pid: u32, what: &'static str, err: ProcError) -> Self {
        match err {
            ProcError::NotFound(_) => ReadError::Vanished(pid),
            ProcError::Io(ref io, _) if io.kind() == std::io::ErrorKind::NotFound => {
                ReadError::Vanished(pid)
            }
            // ESRCH: the task was reaped between opening its directory and reading a file.
            ProcError::Io(ref io, _) if io.raw_os_error() == Some(libc::ESRCH) => {
                ReadError::Vanished(pid)
            }
            other => ReadError::Failed {
                pid,
                what,
                message: other.to_string(),
            },
        }
    }

    /// A short, bounded label for the read-errors self-metric.
    pub fn kind(&self) -> &'static str {
        match self {
            ReadError::Vanished(_) | ReadError::Exited(_) => "vanished",
            ReadError::Failed { .. } => "failed",
        }
    }
}

/// Reads and parses a `stat` file (of a process or of one of its threads). procfs's parser
/// slices the text between its first '(' and last ')' and panics when they are missing, out
/// of order or at the very ends (found by the `proc` fuzz target); such a text is refused
/// here as malformed before it gets there. A real kernel never writes one, but the agent
/// reads what it cannot vouch for (a `--proc-root` of another machine, a future kernel).
fn read_stat(pid: u32, path: &Path) -> Result<procfs::process::Stat, ReadError> {
    use procfs::FromRead as _;
    let bytes = std::fs::read(path).map_err(|e| {
        ReadError::from_proc(pid, "stat", ProcError::Io(e, Some(path.to_path_buf())))
    })?;
    if !stat_shape_ok(&bytes) {
        return Err(ReadError::Failed {
            pid,
            what: "stat",
            message: "malformed: no \"PID (COMM) STATE ...\" line".to_string(),
        });
    }
    procfs::process::Stat::from_read(&bytes[..]).map_err(|e| ReadError::from_proc(pid, "stat", e))
}

/// `/proc/<pid>/task/<tid>/schedstat`: CPU ns, run-queue wait ns, arrivals on a CPU.
pub fn parse_schedstat(text: &str) -> Option<TaskCounters> {
    let mut fields = text.split_ascii_whitespace().map(|f| f.parse::<u64>().ok());
    let counters = TaskCounters {
        cpu_ns: fields.next()??,
        run_delay_ns: fields.next()??,
        arrivals: fields.next()??,
    };
    fields.next().is_none().then_some(counters)
}

/// Whether a stat text has the shape procfs's parser slices without panicking: a pid, then
/// " (", the name, and a last ')' followed by a space and more.
pub fn stat_shape_ok(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    let (Some(open), Some(close)) = (text.find('('), text.rfind(')')) else {
        return false;
    };
    open >= 2
        && close > open
        && close + 2 <= text.len()
        && text.is_char_boundary(open - 1)
        && text.is_char_boundary(close + 2)
}

/// A /proc tree. `/proc` on a host, `/host/proc` in a container with the host's /proc mounted,
/// or a fixture directory in tests.
#[derive(Clone, Debug)]
pub struct ProcRoot {
    root: PathBuf,
}

impl ProcRoot {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Pids of all processes (numeric directories). Non-numeric entries are ignored.
    pub fn pids(&self) -> std::io::Result<Vec<u32>> {
        let mut pids: Vec<u32> = std::fs::read_dir(&self.root)?
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .collect();
        pids.sort_unstable();
        Ok(pids)
    }

    fn open(&self, pid: u32) -> Result<Process, ReadError> {
        Process::new_with_root(self.root.join(pid.to_string()))
            .map_err(|e| ReadError::from_proc(pid, "directory", e))
    }

    /// Identity and rule-matching facts of a process. A missing exe link (kernel threads, or a
    /// process of another user without CAP_SYS_PTRACE) is not an error: `exe` is `None`.
    pub fn process_info(&self, pid: u32) -> Result<ProcessInfo, ReadError> {
        let process = self.open(pid)?;
        let stat = read_stat(pid, &self.root.join(pid.to_string()).join("stat"))?;
        if self.has_exited(pid, stat.state) {
            return Err(ReadError::Exited(pid));
        }
        let cmdline = match process.cmdline() {
            Ok(args) => args,
            Err(e) => match ReadError::from_proc(pid, "cmdline", e) {
                ReadError::Failed { .. } => Vec::new(),
                vanished => return Err(vanished),
            },
        };
        let exe = process.exe().ok();
        Ok(ProcessInfo {
            id: ProcessId {
                pid,
                start_time_ticks: stat.starttime,
            },
            comm: stat.comm,
            exe,
            cmdline,
            session: stat.session,
            flags: stat.flags,
        })
    }

    /// Whether a process whose leader is in `state` has exited and waits to be reaped (a
    /// zombie): nothing of it runs, its executable link reads as missing, and tracking it would
    /// only report a Redis without probes until its parent reaps it (a server that exits at
    /// start, its port taken, stays a zombie while its parent does not wait). A leader that
    /// called `pthread_exit` is a zombie too while its other threads run: that process is
    /// alive, told by the tasks it still has.
    fn has_exited(&self, pid: u32, state: char) -> bool {
        if !matches!(state, 'Z' | 'X') {
            return false;
        }
        let tasks = self.root.join(pid.to_string()).join("task");
        let others = std::fs::read_dir(tasks).map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .any(|tid| tid != pid)
        });
        // Unreadable: it was reaped meanwhile, which is exited too.
        !others.unwrap_or(false)
    }

    /// Whether the process `id` names still runs: the same start time, not exited. Reads
    /// only its `stat` (and its tasks if it is a zombie), never its memory.
    pub fn still_runs(&self, id: ProcessId) -> bool {
        match read_stat(id.pid, &self.root.join(id.pid.to_string()).join("stat")) {
            Ok(stat) => {
                stat.starttime == id.start_time_ticks && !self.has_exited(id.pid, stat.state)
            }
            Err(_) => false,
        }
    }

    /// The current arguments (or process title) of a process; empty when unreadable.
    pub fn cmdline(&self, pid: u32) -> Vec<String> {
        self.open(pid)
            .and_then(|p| {
                p.cmdline()
                    .map_err(|e| ReadError::from_proc(pid, "cmdline", e))
            })
            .unwrap_or_default()
    }

    /// The executable a process runs, opened through `/proc/<pid>/exe` (which reaches it in
    /// any mount namespace, deleted or not), and its identity: a binary is read once, however
    /// many processes run it.
    pub fn exe_identity(&self, pid: u32) -> Option<(PathBuf, BinaryKey)> {
        use std::os::unix::fs::MetadataExt;
        let path = self.root.join(pid.to_string()).join("exe");
        let meta = std::fs::metadata(&path).ok()?;
        Some((
            path,
            BinaryKey {
                dev: meta.dev(),
                ino: meta.ino(),
                size: meta.size(),
                mtime: meta.mtime(),
            },
        ))
    }

    /// Start time of `pid`, to check that a pid still names the same process.
    pub fn start_time(&self, pid: u32) -> Result<u64, ReadError> {
        Ok(read_stat(pid, &self.root.join(pid.to_string()).join("stat"))?.starttime)
    }

    /// CPU counters of every thread of a process. Threads that exit during the walk are skipped
    /// and counted in the second value; the process itself vanishing is an error.
    pub fn thread_samples(&self, pid: u32) -> Result<(Vec<ThreadSample>, u64), ReadError> {
        let process = self.open(pid)?;
        let tasks = process
            .tasks()
            .map_err(|e| ReadError::from_proc(pid, "task list", e))?;
        let mut samples = Vec::new();
        let mut vanished = 0;
        let task_dir = self.root.join(pid.to_string()).join("task");
        for task in tasks {
            let Ok(task) = task else {
                vanished += 1;
                continue;
            };
            let stat = match read_stat(pid, &task_dir.join(task.tid.to_string()).join("stat")) {
                Ok(stat) => stat,
                Err(_) => {
                    vanished += 1;
                    continue;
                }
            };
            samples.push(ThreadSample {
                tid: stat.pid as u32,
                name: stat.comm,
                start_time_ticks: stat.starttime,
                user_ticks: stat.utime,
                system_ticks: stat.stime,
            });
        }
        if samples.is_empty() {
            // A process always has at least its main thread: none readable means it is gone.
            return Err(ReadError::Vanished(pid));
        }
        Ok((samples, vanished))
    }

    /// Whether a thread of `pid` has not exited: its task entry is there and not a zombie (a
    /// group leader that exited before its other threads stays listed as one).
    pub fn thread_alive(&self, pid: u32, tid: u32) -> bool {
        read_stat(pid, &self.task_file(pid, tid, "stat"))
            .is_ok_and(|stat| !matches!(stat.state, 'Z' | 'X' | 'x'))
    }

    /// A thread's scheduler counters (`/proc/<pid>/task/<tid>/schedstat`); `None` if it is gone
    /// or the file does not parse.
    pub fn thread_counters(&self, pid: u32, tid: u32) -> Option<TaskCounters> {
        parse_schedstat(&std::fs::read_to_string(self.task_file(pid, tid, "schedstat")).ok()?)
    }

    /// `<root>/<pid>/task/<tid>/<name>`.
    fn task_file(&self, pid: u32, tid: u32, name: &str) -> PathBuf {
        self.root
            .join(pid.to_string())
            .join("task")
            .join(tid.to_string())
            .join(name)
    }

    /// The executable path a process runs, as its `/proc/<pid>/exe` link names it; the error
    /// says why it cannot be read (the process exits, or another user's without the right).
    pub fn exe_link(&self, pid: u32) -> std::io::Result<PathBuf> {
        std::fs::read_link(self.root.join(pid.to_string()).join("exe"))
    }

    /// Where the process's executable can be opened from the agent's mount namespace: through
    /// `/proc/<pid>/root`, which works for processes in containers as well as on the host.
    pub fn host_path_of(&self, pid: u32, path_in_process: &Path) -> PathBuf {
        let relative = path_in_process.strip_prefix("/").unwrap_or(path_in_process);
        self.root.join(pid.to_string()).join("root").join(relative)
    }
}

/// An executable file as the kernel identifies it, plus size and mtime so that an inode reused
/// for another file is not taken for the old one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BinaryKey {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: i64,
}

/// Which of `wanted` an ELF file defines, from `.dynsym` (kept by stripped builds linked with
/// `-rdynamic`, as Redis is) and `.symtab` when present. `None` when the file has no symbol
/// table at all (a stripped static binary): then nothing can be said from its symbols. Only the
/// headers and the symbol tables are read, not the whole file.
pub fn defined_symbols(
    path: &Path,
    wanted: &[&str],
) -> std::io::Result<Option<std::collections::BTreeSet<String>>> {
    use object::{Object, ObjectSymbol};
    let file = std::fs::File::open(path)?;
    let cache = object::ReadCache::new(file);
    let elf = object::File::parse(&cache)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    let mut any = false;
    let found = elf
        .dynamic_symbols()
        .chain(elf.symbols())
        .inspect(|_| any = true)
        .filter(|s| s.is_definition())
        .filter_map(|s| s.name().ok())
        .filter(|name| wanted.contains(name))
        .map(String::from)
        .collect();
    Ok(any.then_some(found))
}

/// How an executable does its I/O, as far as libc probes are concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExeKind {
    /// Dynamically linked: its reads and writes go through the libc.so it maps.
    Dynamic,
    /// Statically linked: there is no libc.so to probe.
    Static,
    /// A Go binary: its runtime makes network syscalls itself, even when it links libc (cgo).
    Go,
}

/// Classifies an executable from its ELF headers (read lazily: Go binaries can be large).
pub fn exe_kind(path: &Path) -> std::io::Result<ExeKind> {
    use object::Object;
    let file = std::fs::File::open(path)?;
    let cache = object::ReadCache::new(file);
    let elf = object::File::parse(&cache)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    if elf.section_by_name(".go.buildinfo").is_some()
        || elf.section_by_name(".gopclntab").is_some()
        || elf.section_by_name(".note.go.buildid").is_some()
    {
        return Ok(ExeKind::Go);
    }
    // A program interpreter (ld.so) means shared libraries; static-pie binaries have a
    // .dynamic section but no interpreter.
    Ok(if elf.section_by_name(".interp").is_some() {
        ExeKind::Dynamic
    } else {
        ExeKind::Static
    })
}

impl ProcRoot {
    /// The TLS library (OpenSSL's libssl) `pid` maps, as a path the agent can open; `None`
    /// when it maps none (it links no TLS library, or one built into it, or has not loaded
    /// it yet).
    pub fn libssl_path(&self, pid: u32) -> Option<PathBuf> {
        let maps = std::fs::read(self.root.join(pid.to_string()).join("maps")).ok()?;
        let path = mapped_files(&maps).find(|p| is_libssl(p))?;
        Some(self.host_path_of(pid, &path))
    }

    /// The C library through which a process does its I/O, as a path the agent can open
    /// (through `/proc/<pid>/root`): the one in `/proc/<pid>/maps`, or, for a process seen at
    /// exec before its loader ran, where distributions put it. `None` for static and Go
    /// executables, which do their I/O without one.
    pub fn libc_path(&self, pid: u32) -> Option<PathBuf> {
        let exe = self.root.join(pid.to_string()).join("exe");
        match exe_kind(&exe) {
            Ok(ExeKind::Dynamic) => {}
            Ok(_) => return None,
            // Unreadable: fall through to what the maps say.
            Err(_) => {}
        }
        let maps = std::fs::read(self.root.join(pid.to_string()).join("maps")).ok()?;
        if let Some(path) = mapped_files(&maps).find(|p| is_libc(p)) {
            return Some(self.host_path_of(pid, &path));
        }
        // Seen at exec, before the dynamic loader has mapped it: look where distributions put
        // it, inside the process's own root. Uprobes on that file fire once it is mapped.
        const USUAL: [&str; 4] = [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "/lib64/libc.so.6",
            "/usr/lib64/libc.so.6",
        ];
        USUAL
            .iter()
            .map(|p| self.host_path_of(pid, Path::new(p)))
            .find(|p| p.exists())
    }
}

/// The mappings of a `/proc/<pid>/maps` text. procfs parses each line on its own, so that a
/// line it cannot read (not UTF-8, truncated, or one [`maps_line_shape_ok`] refuses) is skipped
/// rather than losing the whole table. On its own, a line can also never be taken for an smaps
/// `Key: value kB` attribute of the mapping before it, whose value procfs multiplies by 1024
/// unchecked (an overflow panic in debug builds).
pub fn memory_maps(maps: &[u8]) -> impl Iterator<Item = procfs::process::MemoryMap> + '_ {
    use procfs::FromRead as _;
    maps.split(|&b| b == b'\n').filter_map(|line| {
        let line = std::str::from_utf8(line).ok()?;
        if !maps_line_shape_ok(line) {
            return None;
        }
        procfs::process::MemoryMaps::from_read(line.as_bytes())
            .ok()?
            .into_iter()
            .next()
    })
}

/// The files a `/proc/<pid>/maps` text maps, without the " (deleted)" the kernel appends to
/// a replaced file (the path is then that of its replacement, which is what can be opened).
fn mapped_files(maps: &[u8]) -> impl Iterator<Item = PathBuf> + '_ {
    use procfs::process::MMapPath;
    memory_maps(maps).filter_map(|map| {
        let MMapPath::Path(path) = map.pathname else {
            return None;
        };
        match path.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
            Some(replaced) => Some(PathBuf::from(replaced)),
            None => Some(path),
        }
    })
}

/// Whether one `maps` line has the shape procfs's parser reads without panicking: it slices
/// the pathnames `[stack:TID]` and `/SYSVKEY…` at byte offsets (procfs-core 0.18,
/// `MMapPath::from`), which panics on a short `/SYSV` name or on a multi-byte character at an
/// offset. A kernel writes neither; a `--proc-root` of unknown origin might.
fn maps_line_shape_ok(line: &str) -> bool {
    match line.splitn(6, ' ').nth(5).map(str::trim) {
        Some(path) if path.starts_with("[stack:") => path.get(1..path.len() - 1).is_some(),
        Some(path) if path.starts_with("/SYSV") => path.get(5..13).is_some(),
        _ => true,
    }
}

/// OpenSSL's TLS library by its file name: `libssl.so.3`, `libssl.so.1.1`.
fn is_libssl(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|name| name.starts_with("libssl.so"))
}

/// A C library by its file name: `libc.so.6`, or glibc's old `libc-2.31.so`.
fn is_libc(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    name.starts_with("libc.so") || (name.starts_with("libc-") && name.ends_with(".so"))
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), the unit of /proc CPU counters.
pub fn ticks_per_second() -> u64 {
    procfs::ticks_per_second()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_is_three_counters_or_nothing() {
        assert_eq!(
            super::parse_schedstat("268069205 61071065 1793\n"),
            Some(agent_common::sched::TaskCounters {
                cpu_ns: 268069205,
                run_delay_ns: 61071065,
                arrivals: 1793
            })
        );
        for bad in [
            "",
            "1 2",
            "1 2 3 4",
            "1 -2 3",
            "a b c",
            "1 2 18446744073709551616",
        ] {
            assert_eq!(super::parse_schedstat(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn executables_are_classified_by_their_elf_headers() {
        // This test binary is a dynamically linked Rust program.
        assert_eq!(
            exe_kind(&std::env::current_exe().unwrap()).unwrap(),
            ExeKind::Dynamic
        );
        let script = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(script.path(), b"#!/bin/sh\n").unwrap();
        assert!(exe_kind(script.path()).is_err(), "not an ELF file");
        assert!(exe_kind(Path::new("/nonexistent")).is_err());
    }

    fn fixtures() -> ProcRoot {
        ProcRoot::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/proc"))
    }

    /// A live thread, a group leader that exited before its other thread (a zombie), a tid
    /// the process does not have, and a process that is not there.
    #[test]
    fn a_thread_is_alive_while_its_task_entry_is_there_and_not_a_zombie() {
        let proc = fixtures();
        assert!(proc.thread_alive(100, 102));
        assert!(proc.thread_alive(810, 811));
        assert!(!proc.thread_alive(810, 810));
        assert!(!proc.thread_alive(100, 999));
        assert!(!proc.thread_alive(999, 999));
    }

    #[test]
    fn lists_numeric_entries_only() {
        assert_eq!(
            fixtures().pids().unwrap(),
            vec![2, 100, 200, 300, 400, 500, 600, 610, 700, 710, 720, 800, 810]
        );
    }

    #[test]
    fn reads_identity_exe_and_cmdline() {
        let info = fixtures().process_info(100).unwrap();
        assert_eq!(
            info.id,
            ProcessId {
                pid: 100,
                start_time_ticks: 64108
            }
        );
        assert_eq!(info.comm, "redis-server");
        assert_eq!(info.exe_name(), Some("redis-check-rdb"));
        assert_eq!(info.cmdline, vec!["redis-server 127.0.0.1:6379"]);
        assert_eq!(info.argv0_name(), Some("redis-server"));
        assert!(info.session_leader());
    }

    #[test]
    fn fork_without_exec_and_session_from_stat() {
        // A BGSAVE child: forked, not exec'd, in its parent's session.
        let child = fixtures().process_info(600).unwrap();
        assert!(child.forked_without_exec());
        assert!(!child.session_leader());
        assert_eq!(child.argv0_name(), Some("redis-rdb-bgsave"));
        // An exec'd copy run by path: argv[0]'s basename.
        let copy = fixtures().process_info(700).unwrap();
        assert!(!copy.forked_without_exec());
        assert_eq!(copy.argv0_name(), Some("redis-server-7.4.1"));
        assert_eq!(copy.comm, "redis-server-7.");
    }

    #[test]
    fn listening_sockets_are_the_processes_own_listeners() {
        let listeners = fixtures().listening_sockets(100);
        let expected: Vec<std::net::SocketAddr> = vec![
            "127.0.0.1:6379".parse().unwrap(),
            "127.0.0.1:16379".parse().unwrap(),
            "[::1]:6379".parse().unwrap(),
        ];
        let mut expected = expected;
        expected.sort();
        // Not sshd's 0.0.0.0:22 (another process's socket in the same namespace), not the
        // accepted connection.
        assert_eq!(listeners, expected);
        // The title's port, bound to loopback on both families: the IPv4 address.
        assert_eq!(
            service_address(&listeners, Some(6379)),
            Some((6379, Some("127.0.0.1".parse().unwrap())))
        );
        // No hint: the lowest port, not the cluster bus.
        assert_eq!(service_address(&listeners, None).unwrap().0, 6379);
        // A hint it does not listen on is ignored.
        assert_eq!(service_address(&listeners, Some(7000)).unwrap().0, 6379);
        // None yet (not bound, or gone), and processes without net or fd entries.
        assert!(fixtures().listening_sockets(400).is_empty());
        assert!(fixtures().listening_sockets(999).is_empty());
        assert_eq!(service_address(&[], Some(6379)), None);
    }

    #[test]
    fn service_address_only_when_bound_to_a_specific_address() {
        let addrs = |list: &[&str]| -> Vec<std::net::SocketAddr> {
            list.iter().map(|a| a.parse().unwrap()).collect()
        };
        // Redis's default `bind * -::*`.
        assert_eq!(
            service_address(&addrs(&["0.0.0.0:6379", "[::]:6379"]), Some(6379)),
            Some((6379, None))
        );
        assert_eq!(
            service_address(&addrs(&["10.0.0.5:6380", "[::]:6380"]), None),
            Some((6380, None))
        );
        // tls-port below port: the title's port wins.
        assert_eq!(
            service_address(&addrs(&["10.0.0.5:6379", "10.0.0.5:6380"]), Some(6380)),
            Some((6380, Some("10.0.0.5".parse().unwrap())))
        );
        assert_eq!(
            service_address(&addrs(&["[::ffff:10.0.0.5]:6379"]), None),
            Some((6379, Some("10.0.0.5".parse().unwrap())))
        );
    }

    #[test]
    fn symbols_of_a_real_elf() {
        let me = std::env::current_exe().unwrap();
        // This test binary defines main, not Redis's functions.
        let found = defined_symbols(&me, &["main", "processCommand"])
            .unwrap()
            .expect("a symbol table");
        assert!(!found.contains("processCommand"));
        let text = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(text.path(), b"#!/bin/sh\n").unwrap();
        assert!(defined_symbols(text.path(), &["main"]).is_err());
        if let Ok(redis) = std::fs::canonicalize("/usr/bin/redis-server") {
            let found = defined_symbols(&redis, &crate::rules::SERVER_SYMBOLS)
                .unwrap()
                .unwrap();
            assert_eq!(found.len(), 2, "{}: {found:?}", redis.display());
        }
    }

    #[test]
    fn comm_with_spaces_and_parentheses() {
        let info = fixtures().process_info(300).unwrap();
        assert_eq!(info.comm, "tricky) (name");
        assert_eq!(info.id.start_time_ticks, 80000);
    }

    #[test]
    fn kernel_thread_has_no_exe_and_no_cmdline() {
        let info = fixtures().process_info(2).unwrap();
        assert_eq!(info.exe, None);
        assert!(info.cmdline.is_empty());
    }

    #[test]
    fn per_thread_cpu_counters() {
        let (threads, vanished) = fixtures().thread_samples(100).unwrap();
        assert_eq!(vanished, 0);
        let mut names: Vec<_> = threads
            .iter()
            .map(|t| (t.tid, t.name.as_str(), t.user_ticks, t.system_ticks))
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec![
                (100, "redis-server", 432, 4),
                (102, "bio_close_file", 0, 0),
                (103, "bio_aof_fsync", 0, 0),
                (104, "bio_lazy_free", 0, 1),
                (105, "jemalloc_bg_thd", 0, 0),
                (106, "io_thd_1", 7, 3),
            ]
        );
    }

    #[test]
    fn a_thread_that_exits_mid_read_is_skipped_and_counted() {
        let (threads, vanished) = fixtures().thread_samples(500).unwrap();
        assert_eq!(threads.len(), 1);
        assert_eq!(threads[0].tid, 500);
        assert_eq!(vanished, 1);
    }

    #[test]
    fn an_exited_process_not_yet_reaped_is_not_a_process_to_track() {
        let proc = ProcRoot::new("/proc");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Until its exit, `true` is a live process; then a zombie until the wait below.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let seen = loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            let zombie = stat[stat.rfind(')').unwrap() + 2..].starts_with('Z');
            if zombie || std::time::Instant::now() > deadline {
                break zombie;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert!(seen, "`true` did not exit within 10 s");
        assert!(matches!(proc.process_info(pid), Err(ReadError::Exited(p)) if p == pid));
        child.wait().unwrap();
        // Our own process is alive whatever its threads do.
        assert!(proc.process_info(std::process::id()).is_ok());
    }

    #[test]
    fn a_process_that_vanished_mid_read_is_reported_as_vanished() {
        // Its stat is there but its task directory is gone.
        assert!(fixtures().process_info(400).is_ok());
        assert!(matches!(
            fixtures().thread_samples(400),
            Err(ReadError::Vanished(400))
        ));
        // And one that is not there at all.
        assert!(matches!(
            fixtures().process_info(999),
            Err(ReadError::Vanished(999))
        ));
        assert_eq!(ReadError::Vanished(1).kind(), "vanished");
    }

    #[test]
    fn executables_are_reached_through_the_process_root() {
        let path = fixtures().host_path_of(100, Path::new("/usr/bin/redis-check-rdb"));
        assert!(
            path.ends_with("proc/100/root/usr/bin/redis-check-rdb"),
            "{}",
            path.display()
        );
    }
}

/// The remote end of a TCP socket, from `/proc/<pid>/net/tcp{,6}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketPeer {
    pub ip: std::net::IpAddr,
    pub port: u16,
}

impl From<std::net::SocketAddr> for SocketPeer {
    fn from(address: std::net::SocketAddr) -> Self {
        Self {
            ip: address.ip(),
            port: address.port(),
        }
    }
}

/// Socket inode -> entry, from the text of `/proc/<pid>/net/tcp` or `tcp6`. procfs parses the
/// table, but one line at a time: given the whole table (as `Process::tcp` does), it refuses
/// all of it for a single line it cannot read (truncated, not hex, not UTF-8, a TCP state
/// newer than the crate), where only that line should be skipped. Its parser only splits and
/// parses numbers (procfs-core 0.18: no slicing at offsets the text decides, unwraps only of
/// fixed-length slices), so no shape check precedes it; the `proc` fuzz target feeds it
/// arbitrary lines.
pub fn parse_proc_net_tcp(text: &[u8]) -> std::collections::HashMap<u64, TcpNetEntry> {
    use procfs::FromBufReadSI as _;
    let system = procfs::current_system_info();
    text.split(|&b| b == b'\n')
        // The header.
        .skip(1)
        .filter_map(|line| {
            // procfs skips the first line it is given, the header: an empty one here.
            let one = std::io::Read::chain(&b"\n"[..], line);
            let entries = procfs::net::TcpNetEntries::from_buf_read(one, system).ok()?;
            entries.0.into_iter().next()
        })
        .map(|entry| (entry.inode, entry))
        .collect()
}

/// Which address a server serves on, from its listening sockets: `preferred_port` (what its
/// title or arguments say) when it listens there, else its lowest listening port (a Redis
/// cluster bus listens on port + 10000). The address is given only when every listener on that
/// port is bound to a specific address, not to 0.0.0.0 or `::`; with several, the lowest
/// (IPv4 first).
pub fn service_address(
    listeners: &[std::net::SocketAddr],
    preferred_port: Option<u16>,
) -> Option<(u16, Option<std::net::IpAddr>)> {
    let port = preferred_port
        .filter(|p| listeners.iter().any(|l| l.port() == *p))
        .or_else(|| listeners.iter().map(|l| l.port()).min())?;
    let on_port: Vec<std::net::IpAddr> = listeners
        .iter()
        .filter(|l| l.port() == port)
        .map(|l| l.ip().to_canonical())
        .collect();
    let address = if on_port.iter().any(|ip| ip.is_unspecified()) {
        None
    } else {
        on_port.into_iter().min()
    };
    Some((port, address))
}

impl ProcRoot {
    /// (fd, socket inode) of each socket a process has open. procfs reads the fd links and
    /// skips those it cannot read (closed meanwhile) or parse; its link parser takes no
    /// slices of the text, so there is nothing to check before it.
    fn socket_inodes(&self, pid: u32) -> Vec<(u32, u64)> {
        let Ok(fds) = self
            .open(pid)
            .and_then(|process| process.fd().map_err(|e| ReadError::from_proc(pid, "fd", e)))
        else {
            return Vec::new();
        };
        fds.filter_map(|fd| {
            let fd = fd.ok()?;
            match fd.target {
                FDTarget::Socket(inode) => Some((u32::try_from(fd.fd).ok()?, inode)),
                _ => None,
            }
        })
        .collect()
    }

    /// The TCP sockets of the network namespace `pid` is in, by inode. The tables are read
    /// here rather than with `Process::tcp`, to be parsed line by line (see
    /// [`parse_proc_net_tcp`]).
    fn tcp_sockets(&self, pid: u32) -> std::collections::HashMap<u64, TcpNetEntry> {
        let base = self.root.join(pid.to_string());
        let mut by_inode = std::collections::HashMap::new();
        for table in ["net/tcp", "net/tcp6"] {
            if let Ok(text) = std::fs::read(base.join(table)) {
                by_inode.extend(parse_proc_net_tcp(&text));
            }
        }
        by_inode
    }

    /// The TCP peers of a process's open sockets, by fd: for connections it opened before
    /// the agent started (later ones are seen at connect()).
    pub fn socket_peers(&self, pid: u32) -> Vec<(u32, SocketPeer)> {
        let fds = self.socket_inodes(pid);
        if fds.is_empty() {
            return Vec::new();
        }
        let by_inode = self.tcp_sockets(pid);
        fds.into_iter()
            .filter_map(|(fd, inode)| Some((fd, by_inode.get(&inode)?.remote_address.into())))
            .collect()
    }

    /// The TCP addresses a process listens on: sockets in LISTEN state among its own fds (a
    /// forked child that closed its copies, such as a Redis BGSAVE child, has none). Sorted,
    /// without duplicates.
    pub fn listening_sockets(&self, pid: u32) -> Vec<std::net::SocketAddr> {
        let fds = self.socket_inodes(pid);
        if fds.is_empty() {
            return Vec::new();
        }
        let by_inode = self.tcp_sockets(pid);
        let mut listeners: Vec<std::net::SocketAddr> = fds
            .iter()
            .filter_map(|(_, inode)| by_inode.get(inode))
            .filter(|s| s.state == TcpState::Listen)
            .map(|s| s.local_address)
            .collect();
        listeners.sort_unstable();
        listeners.dedup();
        listeners
    }
}

#[cfg(test)]
mod net_tests {
    use super::*;

    const HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";

    fn peer(ip: &str, port: u16) -> SocketPeer {
        SocketPeer {
            ip: ip.parse().unwrap(),
            port,
        }
    }

    #[test]
    fn proc_net_tcp_lines_give_remote_peers_by_inode() {
        let text = format!(
            "{HEADER}   0: 0100007F:D431 0100007F:18EB 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 20 4 30 10 -1\n\
             \x20  1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0000000000000000 100 0 0 10 0\n"
        );
        let sockets = parse_proc_net_tcp(text.as_bytes());
        assert_eq!(
            SocketPeer::from(sockets[&4242].remote_address),
            peer("127.0.0.1", 6379)
        );
        assert_eq!(sockets[&4242].local_address.port(), 54321);
        assert_eq!(sockets[&4242].state, TcpState::Established);
        assert_eq!(sockets[&77].remote_address.port(), 0);
        assert_eq!(sockets[&77].local_address.port(), 8080);
        assert_eq!(sockets[&77].state, TcpState::Listen);
        let v6 = format!(
            "{HEADER}   0: 00000000000000000000000001000000:18EB 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 1004 1 0000000000000000 100 0 0 10 0\n"
        );
        assert_eq!(
            SocketPeer::from(parse_proc_net_tcp(v6.as_bytes())[&1004].local_address),
            peer("::1", 6379)
        );
    }

    /// Each malformed line is skipped on its own, without a panic; the good lines around
    /// them are kept. A line with more columns than today's kernels write is read.
    #[test]
    fn malformed_proc_net_tcp_lines_are_skipped_not_fatal() {
        let good = "   0: 0100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 1001 1 0000000000000000 100 0 0 10 0";
        let bad = [
            // Truncated, at several points.
            "   1: 0100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101",
            "   1: 0100007F:18EB 00000000:0000",
            "   1: 0100007F:18",
            "   1:",
            // Not hex, wrong widths, no port.
            "   1: zz00007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 1002 1",
            "   1: 0100007F:18EB 00000000:0000 0Z 00000000:00000000 00:00000000 00000000   101        0 1002 1",
            "   1: 100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 1002 1",
            "   1: 0100007F 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 1002 1",
            "   1: 0100007F:FFFFF 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 1002 1",
            "   1: é100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 1002 1",
            "   1: 0100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 -1 1",
            // A state procfs does not know.
            "   1: 0100007F:18EB 00000000:0000 0D 00000000:00000000 00:00000000 00000000   101        0 1002 1",
            "",
        ];
        for line in bad {
            let text = format!("{HEADER}{good}\n{line}\n");
            let sockets = parse_proc_net_tcp(text.as_bytes());
            assert_eq!(sockets.keys().collect::<Vec<_>>(), [&1001], "{line:?}");
        }
        let not_utf8 = [
            HEADER.as_bytes(),
            b"   1: \xff\xfe\n",
            good.as_bytes(),
            b"\n",
        ]
        .concat();
        assert_eq!(parse_proc_net_tcp(&not_utf8).len(), 1);
        let extra = format!("{HEADER}{good} extra columns 1 2 3\n");
        assert_eq!(
            parse_proc_net_tcp(extra.as_bytes())[&1001].state,
            TcpState::Listen
        );
        // Only a header, or nothing at all.
        assert!(parse_proc_net_tcp(HEADER.as_bytes()).is_empty());
        assert!(parse_proc_net_tcp(b"").is_empty());
        assert!(
            parse_proc_net_tcp(good.as_bytes()).is_empty(),
            "its first line is a header"
        );
    }

    /// A process tree in a temporary directory, with process 100's fds and net/tcp.
    fn process_with_fds(links: &[(&str, &str)], tcp: &str) -> (tempfile::TempDir, ProcRoot) {
        let dir = tempfile::tempdir().unwrap();
        let process = dir.path().join("100");
        std::fs::create_dir_all(process.join("fd")).unwrap();
        std::fs::create_dir_all(process.join("net")).unwrap();
        for (fd, target) in links {
            std::os::unix::fs::symlink(target, process.join("fd").join(fd)).unwrap();
        }
        std::fs::write(process.join("net/tcp"), format!("{HEADER}{tcp}")).unwrap();
        let proc = ProcRoot::new(dir.path());
        (dir, proc)
    }

    #[test]
    fn socket_fds_come_from_the_fd_links_and_odd_links_are_skipped() {
        let tcp = "   0: 0100007F:18EB 0100007F:D431 01 00000000:00000000 00:00000000 00000000   101        0 1003 1 0000000000000000 100 0 0 10 0\n\
                   \x20  1: 0100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 1001 1 0000000000000000 100 0 0 10 0\n";
        let (_dir, proc) = process_with_fds(
            &[
                ("6", "socket:[1001]"),
                ("8", "socket:[1003]"),
                // A socket in no TCP table (a UNIX socket, or UDP).
                ("9", "socket:[5000]"),
                ("3", "socket:[not-a-number]"),
                ("4", "socket:[]"),
                ("5", "socket:"),
                ("7", "socket:[18446744073709551616]"),
                ("10", "pipe:[1001]"),
                ("11", "/dev/null"),
                ("12", "anon_inode:[eventpoll]"),
                ("-1", "socket:[1003]"),
                ("not-an-fd", "socket:[1003]"),
            ],
            tcp,
        );
        let mut inodes = proc.socket_inodes(100);
        inodes.sort_unstable();
        assert_eq!(inodes, [(6, 1001), (8, 1003), (9, 5000)]);
        let mut peers = proc.socket_peers(100);
        peers.sort_unstable_by_key(|(fd, _)| *fd);
        // A listener's "peer" is 0.0.0.0:0, as the table says.
        assert_eq!(
            peers,
            [(6, peer("0.0.0.0", 0)), (8, peer("127.0.0.1", 54321))]
        );
        assert_eq!(
            proc.listening_sockets(100),
            ["127.0.0.1:6379".parse::<std::net::SocketAddr>().unwrap()]
        );
        // Gone: no fds, no peers.
        assert!(proc.socket_inodes(101).is_empty());
        assert!(proc.socket_peers(101).is_empty());
    }

    #[test]
    fn a_malformed_tcp_table_loses_only_its_bad_lines() {
        let tcp = "   0: 0100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 1001 1 0000000000000000 100 0 0 10 0\n\
                   \x20  1: 0100007F:18EB 0100007F:D431 01 00000000:000\n\
                   \x20  2: 0100007F:3FFB 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 1002 1 0000000000000000 100 0 0 10 0\n\
                   garbage\n";
        let (_dir, proc) = process_with_fds(&[("6", "socket:[1001]"), ("7", "socket:[1002]")], tcp);
        assert_eq!(
            proc.listening_sockets(100),
            [
                "127.0.0.1:6379".parse::<std::net::SocketAddr>().unwrap(),
                "127.0.0.1:16379".parse().unwrap()
            ]
        );
    }
}

#[cfg(test)]
mod maps_tests {
    use super::*;

    const LIBC: &str = "7f3c1e84e000-7f3c1e9a3000 r-xp 00026000 08:01 5678                       /usr/lib/x86_64-linux-gnu/libc.so.6";

    /// Process 100 with the given maps and no exe (so that the maps are read).
    fn with_maps(maps: &[u8]) -> (tempfile::TempDir, ProcRoot) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("100")).unwrap();
        std::fs::write(dir.path().join("100/maps"), maps).unwrap();
        let proc = ProcRoot::new(dir.path());
        (dir, proc)
    }

    fn mapped_libc(proc: &ProcRoot) -> Option<PathBuf> {
        let root = proc.path().join("100/root");
        Some(proc.libc_path(100)?.strip_prefix(root).ok()?.to_path_buf())
    }

    #[test]
    fn the_mapped_libc_is_found_in_the_fixture_maps() {
        let fixture = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/proc/100/maps"
        ))
        .unwrap();
        let (_dir, proc) = with_maps(&fixture);
        assert_eq!(
            mapped_libc(&proc).as_deref(),
            Some(Path::new("usr/lib/x86_64-linux-gnu/libc.so.6"))
        );
        let files: Vec<PathBuf> = mapped_files(&fixture).collect();
        assert_eq!(files.len(), 11, "{files:?}");
        // Old glibc names, and a libc replaced on disk since it was mapped.
        for (line, expected) in [
            (
                "7f0000000000-7f0000001000 r-xp 00000000 08:01 9 /lib/x86_64-linux-gnu/libc-2.31.so",
                "lib/x86_64-linux-gnu/libc-2.31.so",
            ),
            (
                "7f0000000000-7f0000001000 r-xp 00000000 08:01 9   /usr/lib/libc.so.6 (deleted)",
                "usr/lib/libc.so.6",
            ),
        ] {
            let (_dir, proc) = with_maps(line.as_bytes());
            assert_eq!(mapped_libc(&proc).as_deref(), Some(Path::new(expected)));
        }
    }

    /// Lines procfs's maps parser would panic on (a pathname it slices at byte offsets), or
    /// that it cannot read, are skipped one by one: the libc line after them is still found.
    #[test]
    fn malformed_maps_lines_are_skipped_not_fatal() {
        let bad: [&[u8]; 14] = [
            b"7f0000000000-7f0000001000 rw-p 00000000 00:00 0 [stack:\xc3\xa9",
            b"7f0000000000-7f0000001000 rw-p 00000000 00:00 0 [stack:1\xc3\xa9",
            b"7f0000000000-7f0000001000 rw-s 00000000 00:01 0 /SYSV1",
            b"7f0000000000-7f0000001000 rw-s 00000000 00:01 0 /SYSV0000000\xc3\xa9 (deleted)",
            // An smaps attribute line, which procfs multiplies by 1024 unchecked (it is read
            // on its own here, with no mapping for it to belong to).
            b"Size: 99999999999999999999 kB",
            b"Rss: 18446744073709551615 kB",
            // Truncated, not hex, not UTF-8, empty.
            b"7f0000000000-7f0000001000 r-xp 00000000 08:01",
            b"7f0000000000 r-xp 00000000 08:01 5678 /usr/lib/libc.so.6",
            b"zz0000000000-7f0000001000 r-xp 00000000 08:01 5678 /usr/lib/libc.so.6",
            b"7f0000000000-7f0000001000 r-xp 0000000g 08:01 5678 /usr/lib/libc.so.6",
            b"7f0000000000-7f0000001000 r-xp 00000000 08:01 -1 /usr/lib/libc.so.6",
            b"7f0000000000-7f0000001000 r-xp 00000000 08:01 5678 /usr/lib/\xff/libc.so.6",
            b"",
            b"\n\n",
        ];
        for line in bad {
            let maps = [line, b"\n", LIBC.as_bytes(), b"\n"].concat();
            let (_dir, proc) = with_maps(&maps);
            assert_eq!(
                mapped_libc(&proc).as_deref(),
                Some(Path::new("usr/lib/x86_64-linux-gnu/libc.so.6")),
                "{:?}",
                String::from_utf8_lossy(line)
            );
        }
        assert!(!maps_line_shape_ok(
            "7f0000000000-7f0000001000 rw-p 00000000 00:00 0 [stack:\u{e9}"
        ));
        assert!(!maps_line_shape_ok(
            "7f0000000000-7f0000001000 rw-s 00000000 00:01 0 /SYSV1"
        ));
        assert!(maps_line_shape_ok(
            "7f0000000000-7f0000001000 rw-p 00000000 00:00 0 [stack:123]"
        ));
        assert!(maps_line_shape_ok(
            "7f0000000000-7f0000001000 rw-s 00000000 00:01 32769 /SYSV0000162e (deleted)"
        ));
        assert!(maps_line_shape_ok(LIBC));
        // Unreadable maps: no libc, as before.
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(ProcRoot::new(dir.path()).libc_path(100), None);
    }
}

#[cfg(test)]
mod stat_shape_tests {
    use super::*;

    /// The shapes procfs's stat parser would panic on (the first from the `proc` fuzz target:
    /// a last ')' before the first '(').
    #[test]
    fn stat_texts_procfs_cannot_slice_are_refused_and_real_ones_pass() {
        assert!(stat_shape_ok(b"100 (redis-server) S 1 100 100 0 -1"));
        assert!(
            stat_shape_ok(b"100 (a) (b)) R 1"),
            "a name with parens, as prctl allows"
        );
        for bad in [
            &b"\x94\x0b\x00\x00\x00-aper) S 100 1 1 (0 -1 4194368"[..],
            b"(redis) S 1",
            b"100 (redis)",
            b"100 (redis",
            b"100 redis) S",
            b"",
            b"\xff(\xff)",
            // The second: a multi-byte character right after the last ')'.
            &b"\x012 (kthreadd)\x943\x91-ap \xa8 1 2 2 0 -1"[..],
        ] {
            assert!(!stat_shape_ok(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn a_malformed_stat_is_a_read_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let process = dir.path().join("100");
        std::fs::create_dir_all(process.join("task/100")).unwrap();
        std::fs::write(process.join("stat"), "100 x) S (1").unwrap();
        std::fs::write(process.join("task/100/stat"), "100 x) S (1").unwrap();
        let proc = ProcRoot::new(dir.path());
        assert!(matches!(
            proc.process_info(100),
            Err(ReadError::Failed { what: "stat", .. })
        ));
        assert!(proc.start_time(100).is_err());
        assert!(proc.thread_samples(100).is_err());
    }
}
