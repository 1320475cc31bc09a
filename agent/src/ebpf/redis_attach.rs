//! Attaching the Redis probes off the agent's state lock.
//!
//! Inspecting a redis-server binary (reading and disassembling some MB of machine code) takes
//! tens of ms, and creating or closing uprobe links waits for the kernel. Done under the
//! state lock, 50 Redis servers started at once held scrapes up for 0.7-0.9 s. One thread
//! does that work, a request at a time, and hands back what the state installs in a moment:
//! the binary as inspected, the process's kernel settings and the probe points' states.
//!
//! The uprobe-multi links of a binary nobody runs any more linger for [`LINGER`] before they
//! are closed: a Redis restarted on the same binary finds its probes in place (live as soon
//! as it is tracked), and no second set of links fires beside a first one still detaching.
//! Where the kernel refuses uprobe-multi links, the result says so and the state attaches
//! one perf-event uprobe per site under its lock (kernels older than 6.6).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    sync::{mpsc, Arc},
    time::{Duration, Instant},
};

use agent_common::redis::RedisProcess;

use super::{
    link_closer,
    redis::{all_programs, placements, Location, Placement, PointState},
    uprobe_multi::{self, LazyPrograms, MapFds, UprobeMultiLink},
};
use crate::redis::binary::{BinaryId, RedisBinary};

/// How long the links of a binary no tracked process runs are kept.
pub const LINGER: Duration = Duration::from_secs(30);

/// A Redis process to probe.
#[derive(Clone, Debug)]
pub struct AttachRequest {
    pub pid: u32,
    /// Its start time, which tells it from a later process with the same pid.
    pub start_ticks: u64,
    /// Its executable, opened from the agent's mount namespace (`/proc/<pid>/root/...`).
    pub exe: PathBuf,
    /// Its `/proc/<pid>/maps`, for where it mapped the binary.
    pub maps: PathBuf,
    /// Attach the return probes that time bookkeeping.
    pub bookkeeping_time: bool,
}

/// What became of an [`AttachRequest`].
#[derive(Debug)]
pub struct Attached {
    pub pid: u32,
    pub start_ticks: u64,
    /// The binary and its probes, or why its binary could not be read.
    pub outcome: Result<Probed, String>,
}

#[derive(Debug)]
pub struct Probed {
    pub binary: Arc<RedisBinary>,
    /// The kernel-side settings for this process, or why there are none.
    pub process: Result<RedisProcess, String>,
    /// Each probe point's state, or `None` when uprobe-multi links were refused: the caller
    /// attaches one uprobe at a time.
    pub points: Option<BTreeMap<&'static str, PointState>>,
}

enum Request {
    Attach(AttachRequest),
    Release(u32),
}

/// The handle the agent's state keeps; requests are answered on the receiver
/// [`RedisAttacher::start`] returns, in order.
pub struct RedisAttacher {
    requests: mpsc::Sender<Request>,
}

impl RedisAttacher {
    /// Starts the attaching thread.
    pub fn start(
        map_fds: Arc<MapFds>,
    ) -> std::io::Result<(Self, tokio::sync::mpsc::UnboundedReceiver<Attached>)> {
        let (requests, incoming) = mpsc::channel();
        let (answers, outcomes) = tokio::sync::mpsc::unbounded_channel();
        let linker = Linker::new(map_fds, LINGER);
        std::thread::Builder::new()
            .name("redis-attach".into())
            .spawn(move || serve(incoming, answers, linker))?;
        Ok((Self { requests }, outcomes))
    }

    /// Asks for `request`'s process to be probed.
    pub fn attach(&self, request: AttachRequest) {
        let pid = request.pid;
        if self.requests.send(Request::Attach(request)).is_err() {
            tracing::warn!(
                pid,
                "the Redis attaching thread is gone; this Redis gets no blocking probes"
            );
        }
    }

    /// Says that `pid` is gone (whether or not its attach was answered yet).
    pub fn release(&self, pid: u32) {
        let _ = self.requests.send(Request::Release(pid));
    }
}

fn serve(
    incoming: mpsc::Receiver<Request>,
    answers: tokio::sync::mpsc::UnboundedSender<Attached>,
    mut linker: Linker,
) {
    loop {
        let wait = linker
            .next_expiry()
            .map_or(Duration::from_secs(3600), |at| {
                at.saturating_duration_since(Instant::now())
            });
        match incoming.recv_timeout(wait) {
            Ok(Request::Attach(request)) => {
                let started = Instant::now();
                let attached = linker.attach(&request);
                tracing::debug!(
                    pid = request.pid,
                    took_ms = started.elapsed().as_millis() as u64,
                    "Redis probes prepared"
                );
                if answers.send(attached).is_err() {
                    return;
                }
            }
            Ok(Request::Release(pid)) => linker.release(pid, Instant::now()),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        linker.expire(Instant::now());
    }
}

/// One binary: as inspected, its links, and who runs it.
struct Linked {
    binary: Arc<RedisBinary>,
    links: Vec<UprobeMultiLink>,
    /// `None`: links refused, the state attaches per uprobe.
    points: Option<BTreeMap<&'static str, PointState>>,
    users: BTreeSet<u32>,
    idle_since: Option<Instant>,
}

/// The attaching thread's state: binaries inspected and linked, by file identity.
struct Linker {
    map_fds: Arc<MapFds>,
    multi: LazyPrograms,
    linger: Duration,
    binaries: HashMap<BinaryId, Linked>,
    users: HashMap<u32, BinaryId>,
}

impl Linker {
    fn new(map_fds: Arc<MapFds>, linger: Duration) -> Self {
        Self {
            map_fds,
            multi: Default::default(),
            linger,
            binaries: HashMap::new(),
            users: HashMap::new(),
        }
    }

    fn attach(&mut self, request: &AttachRequest) -> Attached {
        let outcome = self.probe(request);
        Attached {
            pid: request.pid,
            start_ticks: request.start_ticks,
            outcome,
        }
    }

    fn probe(&mut self, request: &AttachRequest) -> Result<Probed, String> {
        let meta = std::fs::metadata(&request.exe)
            .map_err(|e| format!("{}: {e}", request.exe.display()))?;
        let id = BinaryId {
            dev: meta.dev(),
            ino: meta.ino(),
        };
        if !self.binaries.contains_key(&id) {
            let binary = RedisBinary::inspect(&request.exe).map_err(|e| e.to_string())?;
            let (links, points) = match self.link(&binary, request.bookkeeping_time) {
                Ok((links, points)) => (links, Some(points)),
                Err(reason) => {
                    if self.multi.loaded() {
                        tracing::info!(path = %binary.path.display(), %reason, "Redis probes: uprobe-multi links refused; attaching one uprobe at a time");
                    }
                    (Vec::new(), None)
                }
            };
            self.binaries.insert(
                id,
                Linked {
                    binary: Arc::new(binary),
                    links,
                    points,
                    users: BTreeSet::new(),
                    idle_since: Some(Instant::now()),
                },
            );
        }
        let linked = self.binaries.get_mut(&id).expect("inserted above");
        let mut binary = linked.binary.clone();
        if linked.points.is_none() && binary.path != request.exe {
            // Per-uprobe attaching opens the binary by path: this process's own.
            let mut own = (*binary).clone();
            own.path = request.exe.clone();
            binary = Arc::new(own);
        }
        let load_bias = binary.first_load_address.and_then(|first| {
            let maps = std::fs::read_to_string(&request.maps).ok()?;
            crate::redis::binary::load_bias(&maps, id, first)
        });
        let process = binary.process_settings(load_bias);
        let points = linked.points.clone();
        if process.is_ok() {
            linked.users.insert(request.pid);
            linked.idle_since = None;
            if let Some(previous) = self.users.insert(request.pid, id) {
                if previous != id {
                    // A pid reused without its release seen: not expected, but stay exact.
                    self.forget_user(request.pid, previous, Instant::now());
                }
            }
        }
        Ok(Probed {
            binary,
            process,
            points,
        })
    }

    /// Attaches `binary`'s probes as one uprobe-multi link per program: a link needs no more
    /// than CAP_BPF and CAP_PERFMON (a perf-event uprobe needs CAP_SYS_ADMIN too), and
    /// detaches with one RCU grace period for all its sites. All or nothing.
    fn link(
        &mut self,
        binary: &RedisBinary,
        bookkeeping_time: bool,
    ) -> Result<(Vec<UprobeMultiLink>, BTreeMap<&'static str, PointState>), String> {
        let (placements, mut points) = placements(binary, bookkeeping_time);
        let symbols: Vec<&str> = placements
            .iter()
            .filter_map(|p| match p.location {
                Location::Symbol(symbol, _) => Some(symbol),
                Location::FileOffset(_) => None,
            })
            .collect();
        let symbol_offsets = uprobe_multi::resolve_file_offsets(&binary.path, &symbols)
            .map_err(|e| e.to_string())?;
        let mut by_program: BTreeMap<&'static str, Vec<u64>> = BTreeMap::new();
        for placement in &placements {
            by_program
                .entry(placement.program)
                .or_default()
                .push(file_offset(placement, &symbol_offsets)?);
        }
        let names: Vec<&str> = all_programs().collect();
        let multi = self
            .multi
            .get(
                &self.map_fds,
                &names,
                "Redis probes are attached one perf-event uprobe at a time (that needs CAP_SYS_ADMIN under a capability set)",
            )
            .ok_or_else(|| "no uprobe-multi programs".to_string())?;
        let mut links = Vec::new();
        for (program, mut offsets) in by_program {
            offsets.sort_unstable();
            offsets.dedup();
            let retprobe = multi
                .retprobe(program)
                .ok_or_else(|| format!("{program}: not loaded for uprobe-multi"))?;
            match multi.attach(program, &binary.path, &offsets, None, retprobe) {
                Ok(link) => links.push(link),
                Err(e) => {
                    link_closer::close_links(links);
                    return Err(format!("{program}: {e}"));
                }
            }
        }
        for placement in &placements {
            if !points.contains_key(placement.point) {
                super::log_probe_site(&placement.function, placement.site, &binary.path);
            }
            points
                .entry(placement.point)
                .or_insert(PointState::Attached);
        }
        tracing::debug!(path = %binary.path.display(), links = links.len(), "Redis probes attached as uprobe-multi links");
        Ok((links, points))
    }

    fn release(&mut self, pid: u32, now: Instant) {
        if let Some(id) = self.users.remove(&pid) {
            self.forget_user(pid, id, now);
        }
    }

    fn forget_user(&mut self, pid: u32, id: BinaryId, now: Instant) {
        if let Some(linked) = self.binaries.get_mut(&id) {
            linked.users.remove(&pid);
            if linked.users.is_empty() {
                linked.idle_since = Some(now);
            }
        }
    }

    /// When the next idle binary's links are due to close.
    fn next_expiry(&self) -> Option<Instant> {
        self.binaries
            .values()
            .filter_map(|l| l.idle_since)
            .min()
            .map(|since| since + self.linger)
    }

    /// Closes (in the background) the links of binaries idle for [`LINGER`] and forgets them.
    fn expire(&mut self, now: Instant) {
        let linger = self.linger;
        let due: Vec<BinaryId> = self
            .binaries
            .iter()
            .filter(|(_, l)| l.idle_since.is_some_and(|since| now >= since + linger))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            if let Some(linked) = self.binaries.remove(&id) {
                tracing::debug!(path = %linked.binary.path.display(), links = linked.links.len(), "no tracked Redis runs this binary any more: detaching its probes");
                link_closer::detach_in_background(linked.links);
            }
        }
    }
}

fn file_offset(placement: &Placement, symbols: &BTreeMap<String, u64>) -> Result<u64, String> {
    match placement.location {
        Location::FileOffset(offset) => Ok(offset),
        Location::Symbol(symbol, within) => symbols
            .get(symbol)
            .map(|start| start + within)
            .ok_or_else(|| format!("{symbol}: not in the symbol table")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linker(linger: Duration) -> Linker {
        Linker::new(Arc::new(MapFds::default()), linger)
    }

    fn request(pid: u32, exe: PathBuf) -> AttachRequest {
        AttachRequest {
            pid,
            start_ticks: 1,
            maps: PathBuf::from(format!("/proc/{pid}/maps")),
            exe,
            bookkeeping_time: false,
        }
    }

    /// A binary with no Redis symbols is inspected once, and its entry lingers after its
    /// last user before it is forgotten. (No eBPF here: the links are refused, which is the
    /// per-uprobe answer.)
    #[test]
    fn an_inspected_binary_is_reused_while_used_and_forgotten_after_the_linger() {
        let me = std::env::current_exe().unwrap();
        let mut linker = linker(Duration::from_secs(30));
        let t0 = Instant::now();
        let first = linker.attach(&request(10, me.clone()));
        let probed = first.outcome.expect("own binary is readable");
        assert_eq!(probed.binary.family, None);
        assert!(probed.process.is_ok());
        assert_eq!(linker.binaries.len(), 1);
        let second = linker.attach(&request(11, me.clone())).outcome.unwrap();
        assert!(
            Arc::ptr_eq(&probed.binary, &second.binary),
            "inspected once"
        );
        linker.release(10, t0);
        assert_eq!(linker.next_expiry(), None, "pid 11 still runs it");
        linker.release(11, t0);
        assert_eq!(linker.next_expiry(), Some(t0 + Duration::from_secs(30)));
        linker.expire(t0 + Duration::from_secs(29));
        assert_eq!(linker.binaries.len(), 1, "lingering");
        // A restart within the linger reuses it and cancels the expiry.
        let again = linker.attach(&request(12, me.clone())).outcome.unwrap();
        assert!(Arc::ptr_eq(&probed.binary, &again.binary));
        assert_eq!(linker.next_expiry(), None);
        linker.release(12, t0 + Duration::from_secs(40));
        linker.expire(t0 + Duration::from_secs(70));
        assert!(linker.binaries.is_empty());
        assert!(linker.users.is_empty());
    }

    #[test]
    fn an_unreadable_binary_is_an_error_and_nothing_is_kept() {
        let mut linker = linker(Duration::from_secs(30));
        let out = linker.attach(&request(10, PathBuf::from("/nonexistent/redis-server")));
        assert!(out
            .outcome
            .unwrap_err()
            .contains("/nonexistent/redis-server"));
        assert!(linker.binaries.is_empty());
        linker.release(10, Instant::now());
        assert!(linker.users.is_empty());
    }
}
