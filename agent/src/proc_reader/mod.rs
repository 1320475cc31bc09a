//! Reading processes and threads from a /proc tree (the host's, or a committed fixture tree).
//!
//! Processes exit at any moment, so every read may find the process gone: that is reported as
//! [`ReadError::Vanished`], which callers count and skip, never as a failure of the agent.

use std::path::{Path, PathBuf};

use agent_common::sched::TaskCounters;

use procfs::{process::Process, ProcError};

pub mod maps;
pub mod net;

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
