//! Making workers' uprobes (in their libc, and in their OpenSSL once they talk TLS) off the
//! agent's state lock.
//!
//! An uprobe-multi link registers each of its offsets against every process that maps the
//! library: the kernel walks them all and takes each one's mmap lock. With a few dozen
//! processes mapping libc that is 5-20 ms per link, and a worker takes ten; the first worker
//! also waits for the programs' verification and for the library's disassembly. Done under
//! the state lock, 30 workers started at once beside a Redis held it 1.8 s, then 50-100 ms
//! per worker, and a scrape waited 1.9 s for it (50 workers: 3.0 s and 2.9 s). One thread
//! does that work, a worker at a time, and hands back the links, which the state installs in
//! a moment ([`super::WorkerMaps::install`]). The OpenSSL probes go the same way:
//! their programs take most of a second to verify, at the first TLS worker.
//!
//! A uprobe asks no filter (see `worker_tgid` in the probes): the links are live as soon as
//! they are made, before the state seeds the worker's socket peers, as they were when the
//! state made them itself; the seeding mends what they saw meanwhile. Where uprobe-multi links
//! are refused (kernels before 6.6), the thread loads the same programs for perf-event
//! uprobes and makes one per probe site ([`crate::ebpf::perf_uprobe`]), 17 per worker: made under
//! the state lock, as they were before, a burst of 30 workers held it for seconds.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    time::Instant,
};

use super::plan::{
    attach_write_probe, check_libc_plan, fd_path, libc_plan, ssl_plan, UprobeTarget, LIBC_UPROBES,
    READ_DONE_FUNCTIONS, READ_DONE_PROGRAM, SSL_UPROBES, WRITE_PROGRAM,
};
use crate::ebpf::{
    link_closer,
    uprobe_multi::{
        self, LazyPrograms, MapFds, MultiKind, MultiPrograms, ProbeSites, UprobeMultiLink,
    },
    ProbeError,
};
use crate::proc_reader::ProcRoot;
use agent_common::worker::io_site;

/// A worker whose libc probes to make.
#[derive(Debug)]
pub struct LibcRequest {
    pub pid: u32,
    /// Tells this request's answer from the answer to an earlier process with the same pid.
    pub generation: u64,
    pub target: UprobeTarget,
    /// Set when nobody waits for the answer any more (the worker is gone, or exec'd into
    /// another program): the thread skips it. A worker started through wrappers (a pyenv
    /// shim, `env`, a shell) is tracked anew at each exec, and a burst of them would
    /// otherwise queue a request per stage.
    pub cancelled: Arc<AtomicBool>,
}

/// What became of a [`LibcRequest`].
#[derive(Debug)]
pub struct LibcAnswer {
    pub pid: u32,
    pub generation: u64,
    pub outcome: Result<LibcLinks, ProbeError>,
}

/// The probes made for one worker: its uprobe-multi links (or perf-event uprobes), live.
#[derive(Debug)]
pub struct LibcLinks {
    pub libc: PathBuf,
    pub links: Vec<UprobeMultiLink>,
    /// The probe on `write()`, in a link of its own (see `narrowing`); `None` where the
    /// library has no `write` or could not be held open, or where perf-event uprobes carry
    /// no cookie to tell `write` from `send` (before 5.15; `write` is then among `links`, for
    /// good).
    pub write: Option<WriteLink>,
    /// The programs the links run: what the state puts a `write()` probe back with.
    pub programs: Arc<MultiPrograms>,
}

/// A worker seen talking TLS, whose OpenSSL probes to make.
#[derive(Debug)]
pub struct SslRequest {
    pub pid: u32,
    pub generation: u64,
    pub cancelled: Arc<AtomicBool>,
    /// Where to read which libssl the worker maps.
    pub proc: ProcRoot,
}

/// What became of an [`SslRequest`]: its probes, or why its TLS library cannot be probed.
#[derive(Debug)]
pub struct SslAnswer {
    pub pid: u32,
    pub generation: u64,
    pub outcome: Result<SslLinks, String>,
}

/// The OpenSSL probes made for one worker: its uprobe-multi links (or perf-event uprobes),
/// live.
#[derive(Debug)]
pub struct SslLinks {
    pub libssl: PathBuf,
    pub links: Vec<UprobeMultiLink>,
}

/// An answer of the attaching thread.
#[derive(Debug)]
pub enum Answer {
    Libc(LibcAnswer),
    Ssl(SslAnswer),
}

impl Answer {
    pub fn pid(&self) -> u32 {
        match self {
            Answer::Libc(answer) => answer.pid,
            Answer::Ssl(answer) => answer.pid,
        }
    }

    /// Closes the links it carries (an answer nobody waits for any more), off the caller's
    /// thread.
    pub fn close(self) {
        let links = match self {
            Answer::Libc(LibcAnswer {
                outcome: Ok(LibcLinks {
                    mut links, write, ..
                }),
                ..
            }) => {
                links.extend(write.map(|w| w.link));
                links
            }
            Answer::Ssl(SslAnswer {
                outcome: Ok(SslLinks { links, .. }),
                ..
            }) => links,
            _ => return,
        };
        link_closer::detach_in_background(links);
    }
}

/// A worker's `write()` probe and the file it went into, held open: it is put back through
/// that file, whatever its path names later (a libc upgraded since).
#[derive(Debug)]
pub struct WriteLink {
    pub file: std::fs::File,
    pub offset: u64,
    pub link: UprobeMultiLink,
}

enum Request {
    /// Load the programs now, before the first worker waits for them; say when done.
    Preload(mpsc::Sender<()>),
    /// A request, and its ticket (closing links holds back until it is done).
    Libc(LibcRequest, link_closer::AttachTicket),
    Ssl(SslRequest, link_closer::AttachTicket),
}

/// The handle the worker side keeps; requests are answered, in order, on the receiver
/// [`WorkerAttacher::start`] returns.
pub struct WorkerAttacher {
    requests: mpsc::Sender<Request>,
}

impl WorkerAttacher {
    /// Starts the attaching thread.
    pub fn start(
        map_fds: Arc<MapFds>,
    ) -> std::io::Result<(Self, tokio::sync::mpsc::UnboundedReceiver<Answer>)> {
        let (requests, incoming) = mpsc::channel();
        let (answers, outcomes) = tokio::sync::mpsc::unbounded_channel();
        let linker = Linker::new(map_fds);
        std::thread::Builder::new()
            .name("worker-attach".into())
            .spawn(move || serve(incoming, answers, linker))?;
        Ok((Self { requests }, outcomes))
    }

    /// Loads the libc programs for uprobe-multi links now (most of a second of
    /// verification), and waits for them: at start, rather than when the first worker beside
    /// a Redis waits for them (and for as long; its first commands would go unseen).
    pub fn preload(&self) {
        let (done, loaded) = mpsc::channel();
        if self.requests.send(Request::Preload(done)).is_ok() {
            let _ = loaded.recv();
        }
    }

    /// Asks for `request`'s worker's libc probes; false when the thread is gone.
    pub fn attach_libc(&self, request: LibcRequest) -> bool {
        self.requests
            .send(Request::Libc(request, link_closer::AttachTicket::new()))
            .is_ok()
    }

    /// Asks for `request`'s worker's OpenSSL probes; false when the thread is gone.
    pub fn attach_ssl(&self, request: SslRequest) -> bool {
        self.requests
            .send(Request::Ssl(request, link_closer::AttachTicket::new()))
            .is_ok()
    }
}

fn serve(
    incoming: mpsc::Receiver<Request>,
    answers: tokio::sync::mpsc::UnboundedSender<Answer>,
    mut linker: Linker,
) {
    while let Ok(request) = incoming.recv() {
        let started = Instant::now();
        let answer = match request {
            Request::Preload(done) => {
                linker.preload();
                let _ = done.send(());
                continue;
            }
            Request::Libc(request, _) if request.cancelled.load(Ordering::Relaxed) => continue,
            Request::Ssl(request, _) if request.cancelled.load(Ordering::Relaxed) => continue,
            Request::Libc(request, _ticket) => Answer::Libc(LibcAnswer {
                pid: request.pid,
                generation: request.generation,
                outcome: linker.link(request.pid, &request.target),
            }),
            Request::Ssl(request, _ticket) => Answer::Ssl(SslAnswer {
                pid: request.pid,
                generation: request.generation,
                outcome: linker.link_ssl(&request),
            }),
        };
        tracing::debug!(
            pid = answer.pid(),
            took_ms = started.elapsed().as_millis() as u64,
            "worker probes made"
        );
        if let Err(unsent) = answers.send(answer) {
            // The agent is shutting down.
            unsent.0.close();
            return;
        }
    }
}

/// The attaching thread's state: the programs, and the probe sites of each library.
struct Linker {
    map_fds: Arc<MapFds>,
    multi: LazyPrograms,
    /// [`READ_DONE_PROGRAM`], loaded on its own: its failing must not take the others with it.
    read_done: LazyPrograms,
    /// File offsets of the probe sites in each libc (or static executable), by (dev, inode):
    /// a fleet of workers shares one or two.
    sites: HashMap<(u64, u64), Arc<ProbeSites>>,
    /// The OpenSSL programs, loaded when the first worker talks TLS.
    ssl_multi: LazyPrograms,
    /// The same for each libssl.
    ssl_sites: HashMap<(u64, u64), Arc<ProbeSites>>,
}

impl Linker {
    fn new(map_fds: Arc<MapFds>) -> Self {
        Self {
            map_fds,
            multi: Default::default(),
            read_done: Default::default(),
            sites: HashMap::new(),
            ssl_multi: Default::default(),
            ssl_sites: HashMap::new(),
        }
    }

    fn preload(&mut self) {
        if self.programs_loaded() {
            self.read_done_loaded();
        }
    }

    /// Loads the libc programs the first time (for uprobe-multi links, else for perf-event
    /// uprobes); whether they are.
    fn programs_loaded(&mut self) -> bool {
        let names: Vec<&str> = LIBC_UPROBES.iter().map(|(p, _)| *p).collect();
        self.multi
            .get_or_per_uprobe(
                &self.map_fds,
                &names,
                "workers' libc probes are attached one uprobe at a time (each takes an RCU grace period to detach)",
                "workers' libc probes did not load: workers are followed through the syscall tracepoints",
            )
            .is_some()
    }

    /// Loads [`READ_DONE_PROGRAM`] the first time; whether it is.
    fn read_done_loaded(&mut self) -> bool {
        self.read_done
            .get_or_per_uprobe(
                &self.map_fds,
                &[READ_DONE_PROGRAM],
                "the probe where reads returned is attached one uprobe at a time",
                "reads are probed at their entry and return (the program for where they returned did not load)",
            )
            .is_some()
    }

    /// Makes `pid`'s probes in `target`: one uprobe-multi link per program (one attach and
    /// one detach synchronisation for all of a program's functions). All or nothing.
    fn link(&mut self, pid: u32, target: &UprobeTarget) -> Result<LibcLinks, ProbeError> {
        let libc = target.path().to_path_buf();
        let sites = self.sites(&libc);
        if !self.programs_loaded() {
            return Err(ProbeError::Attach {
                program: WRITE_PROGRAM,
                category: "uprobe",
                name: "libc",
                message: "the workers' libc programs did not load (see the log)".into(),
            });
        }
        // Reads are probed where their system call returned if that program loads; else at
        // entry and return.
        let plan = libc_plan(&sites, self.read_done_loaded());
        check_libc_plan(&plan, &libc)?;
        let (Some(multi), Some(programs)) = (self.multi.loaded_programs(), self.multi.shared())
        else {
            unreachable!("loaded above");
        };
        if multi.kind() == MultiKind::PerUprobe && link_closer::closes_backlogged() {
            return Err(ProbeError::ClosesBacklogged {
                pending: link_closer::closes_pending(),
                limit: link_closer::max_closes_pending(),
            });
        }
        // Perf-event uprobes on a kernel before 5.15 carry no cookie to tell `write` from
        // `send`: `write` stays in with the rest, as where it cannot be held open.
        let cookies = multi.kind() != MultiKind::PerUprobe
            || multi
                .program_fd(WRITE_PROGRAM)
                .is_some_and(crate::ebpf::perf_uprobe::cookies_supported);
        let write_offset = cookies
            .then(|| sites.entries.get("write").copied())
            .flatten();
        // The file the `write` probe goes into, held open (see `WriteLink`). Without it,
        // `write` stays in for good.
        let held = std::fs::File::open(&libc).ok();
        let write_path = held.as_ref().map_or_else(|| libc.clone(), fd_path);
        let mut links = Vec::new();
        let mut write_link = None;
        for (program, offsets) in &plan {
            let retprobe = multi.retprobe(program).unwrap_or(false);
            let attached = if *program == READ_DONE_PROGRAM {
                match self.read_done.loaded_programs() {
                    Some(read_done) => read_done
                        .attach(program, &libc, offsets, Some(pid), false)
                        .map(Some),
                    None => Ok(None),
                }
            } else if *program == WRITE_PROGRAM {
                // `write` in a link of its own, which can go while `send` and `sendto` stay
                // (see `narrowing`); cookies tell them apart.
                let sockets: Vec<u64> = offsets
                    .iter()
                    .copied()
                    .filter(|o| Some(*o) != write_offset)
                    .collect();
                let cookies = vec![io_site::SOCKET as u64; sockets.len()];
                write_offset
                    .map(|offset| attach_write_probe(multi, &write_path, offset, pid))
                    .transpose()
                    .and_then(|link| {
                        write_link = link;
                        if sockets.is_empty() {
                            return Ok(None);
                        }
                        multi
                            .attach_with_cookies(
                                program,
                                &libc,
                                &sockets,
                                Some(&cookies),
                                Some(pid),
                                retprobe,
                            )
                            .map(Some)
                    })
            } else {
                multi
                    .attach(program, &libc, offsets, Some(pid), retprobe)
                    .map(Some)
            };
            match attached {
                Ok(link) => links.extend(link),
                Err(e) => {
                    links.extend(write_link);
                    link_closer::detach_in_background(links);
                    return Err(ProbeError::Attach {
                        program,
                        category: multi.kind().probe_name(),
                        name: "libc",
                        message: e.to_string(),
                    });
                }
            }
        }
        let write = match (write_link, write_offset, held) {
            (Some(link), Some(offset), Some(file)) => Some(WriteLink { file, offset, link }),
            (write_link, _, _) => {
                links.extend(write_link);
                None
            }
        };
        Ok(LibcLinks {
            libc,
            links,
            write,
            programs,
        })
    }

    /// Makes [`SSL_UPROBES`] in the libssl the worker maps (read from its `/proc/<pid>/maps`).
    fn link_ssl(&mut self, request: &SslRequest) -> Result<SslLinks, String> {
        use std::os::unix::fs::MetadataExt;
        let pid = request.pid;
        let libssl = request.proc.libssl_path(pid).ok_or_else(|| {
            "the worker maps no libssl (a TLS library built into it, or another one)".to_string()
        })?;
        let id = std::fs::metadata(&libssl)
            .map(|m| (m.dev(), m.ino()))
            .map_err(|e| format!("{}: {e}", libssl.display()))?;
        let sites = match self.ssl_sites.get(&id) {
            Some(sites) => sites.clone(),
            None => {
                let names: Vec<&str> = SSL_UPROBES.iter().map(|(_, symbol)| *symbol).collect();
                let sites = Arc::new(
                    uprobe_multi::resolve_probe_sites(&libssl, &names)
                        .map_err(|e| e.to_string())?,
                );
                self.ssl_sites.insert(id, sites.clone());
                sites
            }
        };
        let plan = ssl_plan(&sites)
            .ok_or_else(|| format!("{} has no SSL_write/SSL_read to probe", libssl.display()))?;
        let names: Vec<&str> = SSL_UPROBES.iter().map(|(p, _)| *p).collect();
        let Some(multi) = self.ssl_multi.get_or_per_uprobe(
            &self.map_fds,
            &names,
            "OpenSSL probes are attached one uprobe at a time",
            "the OpenSSL programs did not load: TLS workers' commands are not followed",
        ) else {
            return Err("the OpenSSL programs did not load (see the log)".into());
        };
        let mut links = Vec::new();
        for (program, offsets) in &plan {
            let retprobe = multi.retprobe(program).unwrap_or(false);
            match multi.attach(program, &libssl, offsets, Some(pid), retprobe) {
                Ok(link) => links.push(link),
                Err(e) => {
                    link_closer::detach_in_background(links);
                    return Err(e.to_string());
                }
            }
        }
        Ok(SslLinks { libssl, links })
    }

    /// The probe sites in a libc, as file offsets, computed once per file (dev, inode).
    fn sites(&mut self, libc: &std::path::Path) -> Arc<ProbeSites> {
        use std::os::unix::fs::MetadataExt;
        let id = std::fs::metadata(libc)
            .map(|m| (m.dev(), m.ino()))
            .unwrap_or_default();
        if let Some(sites) = self.sites.get(&id) {
            return sites.clone();
        }
        let names: Vec<&str> = LIBC_UPROBES.iter().map(|(_, symbol)| *symbol).collect();
        let sites = uprobe_multi::resolve_probe_sites(libc, &names).unwrap_or_else(|e| {
            tracing::info!(libc = %libc.display(), error = %e, "cannot read the C library's code; its workers are not followed through uprobes");
            Default::default()
        });
        let done: Vec<&str> = READ_DONE_FUNCTIONS
            .into_iter()
            .filter(|f| sites.syscall_exits.contains_key(*f))
            .collect();
        tracing::info!(libc = %libc.display(), reads_probed_where_they_returned = ?done, "C library probe sites found");
        let sites = Arc::new(sites);
        if id != (0, 0) {
            self.sites.insert(id, sites.clone());
        }
        sites
    }
}

/// The workers whose probes are being made, by pid.
#[derive(Debug, Default)]
pub struct PendingLinks {
    by_pid: HashMap<u32, (Pending, Arc<AtomicBool>)>,
    issued: u64,
}

/// One worker waiting for its probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending {
    pub generation: u64,
    /// It was followed through the syscall tracepoints until a Redis appeared on the node.
    pub moving: bool,
}

impl PendingLinks {
    /// Notes that `pid`'s probes are asked for; returns the request's generation and the
    /// flag that cancels it.
    pub fn start(&mut self, pid: u32, moving: bool) -> (u64, Arc<AtomicBool>) {
        self.issued += 1;
        let generation = self.issued;
        let cancelled = Arc::new(AtomicBool::new(false));
        let pending = Pending { generation, moving };
        if let Some((_, earlier)) = self.by_pid.insert(pid, (pending, cancelled.clone())) {
            earlier.store(true, Ordering::Relaxed);
        }
        (generation, cancelled)
    }

    /// The wait an answer ends: `None` when nobody waits for it any more (its worker is gone
    /// or was asked for again since).
    pub fn answered(&mut self, pid: u32, generation: u64) -> Option<Pending> {
        match self.by_pid.get(&pid) {
            Some((pending, _)) if pending.generation == generation => {
                self.by_pid.remove(&pid).map(|(pending, _)| pending)
            }
            _ => None,
        }
    }

    /// `pid` no longer waits (it is no longer tracked): its request is cancelled.
    pub fn forget(&mut self, pid: u32) {
        if let Some((_, cancelled)) = self.by_pid.remove(&pid) {
            cancelled.store(true, Ordering::Relaxed);
        }
    }

    pub fn len(&self) -> usize {
        self.by_pid.len()
    }

    pub fn contains(&self, pid: u32) -> bool {
        self.by_pid.contains_key(&pid)
    }

    pub fn is_empty(&self) -> bool {
        self.by_pid.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_counts_only_for_the_request_still_waiting() {
        let mut pending = PendingLinks::default();
        let (first, first_cancelled) = pending.start(10, false);
        assert!(!first_cancelled.load(Ordering::Relaxed));
        // The process is gone and a new one got its pid before the answer came.
        pending.forget(10);
        assert!(
            first_cancelled.load(Ordering::Relaxed),
            "the thread skips it"
        );
        let (second, second_cancelled) = pending.start(10, true);
        assert_ne!(first, second);
        // Asked again without being forgotten (an exec): the earlier request is cancelled.
        let (third, _) = pending.start(11, false);
        let (fourth, _) = pending.start(11, false);
        assert_eq!(pending.answered(11, third), None);
        assert!(pending.answered(11, fourth).is_some());
        assert!(!second_cancelled.load(Ordering::Relaxed));
        assert_eq!(pending.answered(10, first), None, "the old answer is stale");
        assert_eq!(pending.len(), 1, "and the new request still waits");
        assert_eq!(
            pending.answered(10, second),
            Some(Pending {
                generation: second,
                moving: true
            })
        );
        assert!(pending.is_empty());
        assert_eq!(pending.answered(10, second), None, "answered once");
        assert_eq!(pending.answered(11, second), None);
    }

    /// The C library this test binary maps, and an attaching thread without eBPF programs
    /// (none are loaded in unit tests).
    fn own_libc_and_attacher() -> (
        PathBuf,
        WorkerAttacher,
        tokio::sync::mpsc::UnboundedReceiver<Answer>,
    ) {
        let libc = crate::proc_reader::ProcRoot::new("/proc")
            .libc_path(std::process::id())
            .expect("the test binary maps the C library");
        let (attacher, answers) =
            WorkerAttacher::start(Arc::new(MapFds::default())).expect("thread starts");
        (libc, attacher, answers)
    }

    /// A request cancelled before the thread gets to it is skipped: the next one is answered
    /// first.
    #[test]
    fn a_cancelled_request_is_not_answered() {
        let me = std::process::id();
        let (libc, attacher, mut answers) = own_libc_and_attacher();
        for (generation, cancelled) in [(1, true), (2, false)] {
            assert!(attacher.attach_libc(LibcRequest {
                pid: me,
                generation,
                target: UprobeTarget::SharedLibc(libc.clone()),
                cancelled: Arc::new(AtomicBool::new(cancelled)),
            }));
        }
        let Some(Answer::Libc(answer)) = answers.blocking_recv() else {
            panic!("a libc answer")
        };
        assert_eq!(answer.generation, 2);
    }

    /// A worker that maps no libssl (this test binary) gets an answer that says so; the
    /// state then says its TLS is not followed.
    #[test]
    fn a_worker_without_libssl_is_answered_that_its_tls_cannot_be_probed() {
        let me = std::process::id();
        let proc = ProcRoot::new("/proc");
        assert_eq!(
            proc.libssl_path(me),
            None,
            "this test binary links no OpenSSL"
        );
        let (_, attacher, mut answers) = own_libc_and_attacher();
        assert!(attacher.attach_ssl(SslRequest {
            pid: me,
            generation: 3,
            cancelled: Default::default(),
            proc,
        }));
        let Some(Answer::Ssl(answer)) = answers.blocking_recv() else {
            panic!("an OpenSSL answer")
        };
        assert_eq!((answer.pid, answer.generation), (me, 3));
        assert!(answer.outcome.unwrap_err().contains("maps no libssl"));
    }

    /// Without eBPF programs (none are loaded here) the thread answers that they did not
    /// load; the probe sites of the C library this test runs on were found all the same.
    #[test]
    fn without_programs_the_answer_says_they_did_not_load() {
        let me = std::process::id();
        let (libc, attacher, mut answers) = own_libc_and_attacher();
        attacher.preload();
        assert!(attacher.attach_libc(LibcRequest {
            pid: me,
            generation: 7,
            target: UprobeTarget::SharedLibc(libc.clone()),
            cancelled: Default::default(),
        }));
        let Some(Answer::Libc(answer)) = answers.blocking_recv() else {
            panic!("a libc answer")
        };
        assert_eq!((answer.pid, answer.generation), (me, 7));
        let error = answer
            .outcome
            .expect_err("no programs to attach")
            .to_string();
        assert!(error.contains("did not load"), "{error}");
        let sites = Linker::new(Arc::new(MapFds::default())).sites(&libc);
        for symbol in ["write", "read", "connect", "close"] {
            assert!(
                sites.entries.contains_key(symbol),
                "{symbol} found in {}",
                libc.display()
            );
        }
    }
}
