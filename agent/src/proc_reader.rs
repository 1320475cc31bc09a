//! Reading processes and threads from a /proc tree (the host's, or a committed fixture tree).
//!
//! Processes exit at any moment, so every read may find the process gone: that is reported as
//! [`ReadError::Vanished`], which callers count and skip, never as a failure of the agent.

use std::path::{Path, PathBuf};

use procfs::{process::Process, ProcError};

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
}

impl ProcessInfo {
    /// Basename of the executable, e.g. `redis-check-rdb` for Debian's redis-server symlink.
    pub fn exe_name(&self) -> Option<&str> {
        self.exe.as_deref()?.file_name()?.to_str()
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
            ReadError::Vanished(_) => "vanished",
            ReadError::Failed { .. } => "failed",
        }
    }
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
        let stat = process
            .stat()
            .map_err(|e| ReadError::from_proc(pid, "stat", e))?;
        let cmdline = match process.cmdline() {
            Ok(args) => args,
            Err(e) => match ReadError::from_proc(pid, "cmdline", e) {
                vanished @ ReadError::Vanished(_) => return Err(vanished),
                ReadError::Failed { .. } => Vec::new(),
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
        })
    }

    /// Start time of `pid`, to check that a pid still names the same process.
    pub fn start_time(&self, pid: u32) -> Result<u64, ReadError> {
        let process = self.open(pid)?;
        Ok(process
            .stat()
            .map_err(|e| ReadError::from_proc(pid, "stat", e))?
            .starttime)
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
        for task in tasks {
            let stat = match task.and_then(|t| t.stat()) {
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

    /// Where the process's executable can be opened from the agent's mount namespace: through
    /// `/proc/<pid>/root`, which works for processes in containers as well as on the host.
    pub fn host_path_of(&self, pid: u32, path_in_process: &Path) -> PathBuf {
        let relative = path_in_process.strip_prefix("/").unwrap_or(path_in_process);
        self.root.join(pid.to_string()).join("root").join(relative)
    }
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
        let maps = std::fs::read_to_string(self.root.join(pid.to_string()).join("maps")).ok()?;
        let mapped = maps
            .lines()
            .filter_map(|l| l.split_whitespace().nth(5))
            .find(|p| {
                let name = p.rsplit('/').next().unwrap_or(p);
                name.starts_with("libc.so") || (name.starts_with("libc-") && name.ends_with(".so"))
            });
        if let Some(path) = mapped {
            return Some(self.host_path_of(pid, Path::new(path)));
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

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), the unit of /proc CPU counters.
pub fn ticks_per_second() -> u64 {
    procfs::ticks_per_second()
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn lists_numeric_entries_only() {
        assert_eq!(fixtures().pids().unwrap(), vec![2, 100, 200, 300, 400, 500]);
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

/// Parses one address of `/proc/net/tcp` (`0100007F:1F90`) or `tcp6` (32 hex digits: four
/// 32-bit words in host order).
pub fn parse_proc_net_address(text: &str) -> Option<SocketPeer> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match addr.len() {
        8 => std::net::IpAddr::V4(std::net::Ipv4Addr::from(
            u32::from_str_radix(addr, 16).ok()?.to_le_bytes(),
        )),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok()?;
                chunk.copy_from_slice(&word.to_le_bytes());
            }
            std::net::IpAddr::V6(std::net::Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketPeer { ip, port })
}

/// Socket inode -> remote address, from the text of `/proc/<pid>/net/tcp` or `tcp6`.
pub fn parse_proc_net_tcp(text: &str) -> std::collections::HashMap<u64, SocketPeer> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let peer = parse_proc_net_address(fields.get(2)?)?;
            let inode: u64 = fields.get(9)?.parse().ok()?;
            Some((inode, peer))
        })
        .collect()
}

impl ProcRoot {
    /// The TCP peers of a process's open sockets, by fd: for connections it opened before
    /// the agent started (later ones are seen at connect()).
    pub fn socket_peers(&self, pid: u32) -> Vec<(u32, SocketPeer)> {
        let base = self.root.join(pid.to_string());
        let mut by_inode = std::collections::HashMap::new();
        for table in ["net/tcp", "net/tcp6"] {
            if let Ok(text) = std::fs::read_to_string(base.join(table)) {
                by_inode.extend(parse_proc_net_tcp(&text));
            }
        }
        let Ok(fds) = std::fs::read_dir(base.join("fd")) else {
            return Vec::new();
        };
        fds.filter_map(|entry| {
            let entry = entry.ok()?;
            let fd: u32 = entry.file_name().to_str()?.parse().ok()?;
            let link = std::fs::read_link(entry.path()).ok()?;
            let inode: u64 = link
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            Some((fd, *by_inode.get(&inode)?))
        })
        .collect()
    }
}

#[cfg(test)]
mod net_tests {
    use super::*;

    #[test]
    fn proc_net_tcp_lines_give_remote_peers_by_inode() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                    0: 0100007F:D431 0100007F:18EB 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 0000000000000000 20 4 30 10 -1\n\
                    1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0000000000000000 100 0 0 10 0\n";
        let peers = parse_proc_net_tcp(text);
        assert_eq!(
            peers[&4242],
            SocketPeer {
                ip: "127.0.0.1".parse().unwrap(),
                port: 6379
            }
        );
        assert_eq!(peers[&77].port, 0);
        let v6 = parse_proc_net_address("00000000000000000000000001000000:18EB").unwrap();
        assert_eq!(
            v6,
            SocketPeer {
                ip: "::1".parse().unwrap(),
                port: 6379
            }
        );
        assert!(parse_proc_net_address("zz:1").is_none());
    }
}
