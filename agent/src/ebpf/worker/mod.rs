//! The worker side: the probes that follow worker processes' Redis traffic, attached while
//! at least one worker process is tracked (so a host with only Redis pays nothing), fed with
//! the tracked pids, and read back.
//!
//! A worker is followed one of two ways: through the syscall tracepoints ([`tracepoints`]),
//! which every process on the node passes, or through uprobes in its own C library
//! ([`plan`] says which go where; [`attach`] makes them on a thread of its own). The probes
//! on `write()` and `read()` are taken out while no followed connection goes through them:
//! [`narrowing`] decides when, from the kernel's record of the connections (`conn_maps`),
//! and the tracepoints and each worker's `write()` probe (`write_probes`) act on it.

pub mod attach;
mod conn_maps;
pub mod narrowing;
pub mod plan;
pub mod tracepoints;
mod write_probes;

use std::collections::BTreeMap;

use agent_common::{
    maps,
    redis::KeyHistogram,
    sched::Log2Histogram,
    worker::{
        not_resp_slot, via, ConnKey, ConnState, Peer, ServedKey, SslKey, WorkerHistKey,
        WorkerKeysKey, MAX_WORKER_HISTOGRAMS,
    },
};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuHashMap},
    Ebpf,
};

use super::{
    load_programs, remove_keys_where, take_map,
    uprobe_multi::{MultiKind, UprobeMultiLink},
    ProbeError,
};
use crate::proc_reader::net::SocketPeer;
use attach::{
    Answer, LibcAnswer, LibcLinks, LibcRequest, Pending, PendingLinks, SslAnswer, SslLinks,
    SslRequest, WorkerAttacher,
};
use conn_maps::ConnMaps;
use plan::LIBC_UPROBES;
use tracepoints::{SyscallProbes, WORKER_TRACEPOINTS};
use write_probes::WriteProbes;

pub use plan::{uprobe_target, UprobeTarget};

/// How the worker side sees the workers' traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WorkerProbeMode {
    /// The default. On a node where the agent tracks no Redis: the syscall tracepoints, which
    /// cost a worker least (no trap per call) and follow any worker whatever its language. On
    /// a node where it tracks a Redis: uprobes in each worker's own code (its libc, or the C
    /// library functions of a static executable), so that Redis's own reads and writes pass
    /// no probe at all; a worker that has no such code (Go) is then not followed, and says
    /// so, unless `--syscall-probes-beside-redis` lets the tracepoints follow it. Workers
    /// followed through the tracepoints move to uprobes when a Redis appears.
    Auto,
    /// Syscall tracepoints for every worker: any worker, whatever its language or libc, but
    /// every process on the host (Redis included) pays the filter on each read and write.
    Syscalls,
    /// Uprobes in each worker's own code only: only workers pay, but a worker that bypasses
    /// libc (Go) is not seen.
    Libc,
}

/// Workers followed through uprobes at most. With uprobe-multi links each costs 9 links (9
/// fds; about 12 ms to attach, one RCU synchronisation per link to detach, off the agent's
/// loop and overlapped across threads: 100 workers detach in about 1 s). Without them, 17
/// uprobes, each waiting for its own grace period (about 2 s of kernel time per worker).
pub const DEFAULT_MAX_LIBC_WORKERS: usize = 512;

/// How long the syscall tracepoints stay attached after the last worker that needs them is
/// gone. Detaching them waits for RCU grace periods (about 1 s here, on the agent's loop), so
/// workers that come and go (a Resque master forking a child per job) would otherwise have
/// them attached and detached over and over, and new processes picked up late meanwhile.
pub const SYSCALLS_LINGER: std::time::Duration = std::time::Duration::from_secs(30);

/// How long after a worker's OpenSSL probes went in a TLS socket of it may still be unknown
/// to every SSL object (an idle connection made before, not written since) before the worker
/// is said not to be seen: each connection is learnt at its next `SSL_write`.
const TLS_BIND_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// The uprobes that follow one worker: one uprobe-multi link per program, or where those
/// are refused one perf-event uprobe per site, made by the attaching thread.
struct WorkerLinks(Vec<UprobeMultiLink>);

impl WorkerLinks {
    /// Links, or uprobes where each site is one.
    fn len(&self) -> usize {
        self.0
            .iter()
            .map(|link| if link.per_uprobe() { link.count() } else { 1 })
            .sum()
    }

    /// How the log names them (`uprobe` if any is a perf-event uprobe).
    fn kind(&self) -> &'static str {
        let kind = if self.0.iter().any(UprobeMultiLink::per_uprobe) {
            MultiKind::PerUprobe
        } else {
            MultiKind::Multi
        };
        kind.probe_name()
    }
}

/// The uprobes that went into a worker's C library, said in the log once it is followed.
struct LibcAttached {
    pid: u32,
    libc: std::path::PathBuf,
    links: usize,
    kind: &'static str,
}

impl LibcAttached {
    fn log(&self) {
        tracing::info!(pid = self.pid, libc = %self.libc.display(), links = self.links, kind = self.kind, "worker libc probes attached");
    }
}

/// What the kernel holds for one worker process.
#[derive(Clone, Debug, Default)]
pub struct WorkerReadings {
    pub durations: BTreeMap<(u32, u32, Peer), Log2Histogram>,
    pub keys: BTreeMap<u32, KeyHistogram>,
    /// Served pops by (Redis, served key hash: `fastpath::served_key_hash` or a reserved value).
    pub served: BTreeMap<(Peer, u64), u64>,
}

pub struct WorkerMaps {
    /// How each followed worker is followed (a `via` value).
    ways: std::collections::HashMap<u32, u32>,
    /// The workers followed through the syscall tracepoints (their fast filter).
    syscall_workers: super::PidSet,
    /// The kernel's record of the followed connections.
    conn_maps: ConnMaps,
    served: PerCpuHashMap<MapData, ServedKey, u64>,
    /// The kernel's cache of descriptors that are not connections (see `NOT_RESP` in the
    /// probes): a socket's slot is cleared when its peer is seeded.
    not_resp: Array<MapData, u64>,
    /// Sockets of followed workers seen writing TLS records (`TLS_CONNS`).
    tls_conns: HashMap<MapData, ConnKey, u32>,
    durations: super::slots::SlotTable<WorkerHistKey, Log2Histogram>,
    keys: super::slots::SlotTable<WorkerKeysKey, KeyHistogram>,
    /// The syscall tracepoints, while attached.
    syscalls: SyscallProbes,
    /// Why the programs could not be loaded, if so: then no worker is followed.
    load_error: Option<String>,
    /// Why the syscall probes could not be attached the last time it was tried.
    pub attach_error: Option<String>,
    /// Turned off by configuration (`--no-worker-probes`).
    pub disabled: bool,
    pub mode: WorkerProbeMode,
    pub max_libc_workers: usize,
    /// Whether the agent tracks a Redis on this node (`auto` then keeps the tracepoints off).
    redis_on_node: bool,
    /// `--syscall-probes-beside-redis`: in `auto`, follow workers that have no uprobe target
    /// through the tracepoints even where a Redis runs.
    pub syscalls_beside_redis: bool,
    /// Workers not followed because a Redis runs on this node.
    unfollowed: std::collections::BTreeSet<u32>,
    /// Workers not probed yet because the perf-event uprobes of gone workers wait to be
    /// closed past the bound (see `link_closer::closes_backlogged`): asked for again once
    /// the closes drain ([`Self::retry_held_back`]).
    held_back: std::collections::BTreeSet<u32>,
    /// Followed workers whose only Redis traffic may be encrypted: they hold TLS connections,
    /// no RESP connection is followed, and their TLS library is not probed (see
    /// [`Self::note_tls_connections`]).
    tls_only: std::collections::BTreeSet<u32>,
    /// Since when no tracked worker has needed the attached syscall tracepoints.
    syscalls_idle_since: Option<std::time::Instant>,
    /// Uprobe links per worker pid.
    libc_links: std::collections::HashMap<u32, WorkerLinks>,
    /// The `write()` probe of each worker followed through uprobe-multi links, in a link of
    /// its own: out while the worker's connections write through `send`/`sendto` only.
    write_probes: WriteProbes,
    /// Makes workers' uprobes off the agent's lock (see [`attach`]).
    attacher: WorkerAttacher,
    /// The workers whose libc uprobes are being made.
    pending_libc: PendingLinks,
    /// The workers whose OpenSSL uprobes are being made.
    pending_ssl: PendingLinks,
    /// The libc programs the uprobe-multi links run (from the first worker's): what a
    /// `write()` probe taken out is put back with.
    libc_programs: Option<std::sync::Arc<super::uprobe_multi::MultiPrograms>>,
    /// Whether workers seen talking TLS get OpenSSL probes (`--no-tls-probes` turns it off).
    pub follow_tls: bool,
    /// The OpenSSL probes of each worker that has them, and when they went in.
    ssl_links: std::collections::HashMap<u32, (WorkerLinks, std::time::Instant)>,
    /// Workers seen talking TLS whose OpenSSL could not be probed, and why: not tried again
    /// while they live.
    ssl_unavailable: std::collections::HashMap<u32, String>,
    /// The descriptor of each SSL object (`SSL_FDS`).
    ssl_fds: HashMap<MapData, SslKey, u32>,
}

pub fn peer_from(p: SocketPeer) -> Peer {
    let mut peer = Peer {
        family: 0,
        port: p.port,
        addr: [0; 16],
    };
    match p.ip {
        std::net::IpAddr::V4(v4) => {
            peer.family = 2;
            peer.addr[..4].copy_from_slice(&v4.octets());
        }
        std::net::IpAddr::V6(v6) => {
            peer.family = 10;
            peer.addr = v6.octets();
        }
    }
    peer
}

/// `server.address` of a peer.
pub fn peer_address(peer: &Peer) -> String {
    match peer.family {
        2 => std::net::Ipv4Addr::new(peer.addr[0], peer.addr[1], peer.addr[2], peer.addr[3])
            .to_string(),
        10 => std::net::Ipv6Addr::from(peer.addr).to_string(),
        1 => "unix".into(),
        _ => "unknown".into(),
    }
}

impl WorkerMaps {
    /// Takes the maps and loads (verifies) the programs now, so that attaching them when the
    /// first worker appears is quick.
    pub fn new(ebpf: &mut Ebpf, attacher: WorkerAttacher) -> Result<Self, ProbeError> {
        let programs = WORKER_TRACEPOINTS
            .iter()
            .map(|spec| spec.program)
            .chain(LIBC_UPROBES.iter().map(|(program, _)| *program));
        let load_error = load_programs(ebpf, programs);
        if let Some(e) = &load_error {
            tracing::warn!(error = %e, "worker probes cannot be loaded; no worker-side blocking metrics");
        }
        Ok(Self {
            ways: std::collections::HashMap::new(),
            syscall_workers: super::PidSet::new(ebpf, maps::SYSCALL_WORKERS)?,
            conn_maps: ConnMaps {
                conns: take_map(ebpf, maps::CONNS)?,
                peers: take_map(ebpf, maps::CONN_PEERS)?,
                connects: take_map(ebpf, maps::CONNECTS)?,
            },
            served: take_map(ebpf, maps::SERVED_KEYS)?,
            not_resp: take_map(ebpf, maps::NOT_RESP)?,
            tls_conns: take_map(ebpf, maps::TLS_CONNS)?,
            durations: super::slots::SlotTable::new(
                ebpf,
                (
                    maps::WORKER_DURATION_SLOTS,
                    maps::WORKER_DURATION_HISTS,
                    maps::WORKER_DURATION_FREE,
                ),
                MAX_WORKER_HISTOGRAMS,
                Log2Histogram::ZERO,
            )?,
            keys: super::slots::SlotTable::new(
                ebpf,
                (
                    maps::WORKER_KEYS_SLOTS,
                    maps::WORKER_KEYS_HISTS,
                    maps::WORKER_KEYS_FREE,
                ),
                MAX_WORKER_HISTOGRAMS,
                KeyHistogram::ZERO,
            )?,
            syscalls: SyscallProbes::default(),
            load_error,
            attach_error: None,
            disabled: false,
            mode: WorkerProbeMode::Auto,
            max_libc_workers: DEFAULT_MAX_LIBC_WORKERS,
            redis_on_node: false,
            syscalls_beside_redis: false,
            unfollowed: Default::default(),
            held_back: Default::default(),
            tls_only: Default::default(),
            syscalls_idle_since: None,
            libc_links: std::collections::HashMap::new(),
            write_probes: WriteProbes::default(),
            attacher,
            pending_libc: Default::default(),
            pending_ssl: Default::default(),
            libc_programs: None,
            follow_tls: true,
            ssl_links: std::collections::HashMap::new(),
            ssl_unavailable: std::collections::HashMap::new(),
            ssl_fds: take_map(ebpf, maps::SSL_FDS)?,
        })
    }

    pub fn attached(&self) -> bool {
        self.syscalls.attached()
    }

    /// Starts following a worker, the way the mode says: through uprobes in its own code
    /// (found by `target`, which is only asked when needed; they are made on the attaching
    /// thread, and the worker is followed once [`Self::install`] has their answer) or
    /// through the syscall tracepoints (attached with the first worker that needs them).
    pub fn track(
        &mut self,
        ebpf: &mut Ebpf,
        pid: u32,
        target: impl FnOnce() -> Option<UprobeTarget>,
        sockets: impl FnOnce() -> Vec<(u32, SocketPeer)>,
    ) -> Result<(), ProbeError> {
        if self.disabled {
            return Err(ProbeError::Disabled(
                "worker syscall probes are turned off (--no-worker-probes)",
            ));
        }
        if let Some(e) = &self.load_error {
            return Err(ProbeError::Load(e.clone()));
        }
        if self.through_syscalls() {
            self.attach_syscalls(ebpf)?;
            return self.start_following(pid, via::SYSCALLS, sockets, None);
        }
        match self.request_libc(pid, target, false) {
            Ok(()) => Ok(()),
            Err(reason) => {
                let way = self.libc_refused(ebpf, pid, reason)?;
                self.start_following(pid, way, sockets, None)
            }
        }
    }

    /// Whether a worker tracked now is followed through the syscall tracepoints (else through
    /// uprobes).
    fn through_syscalls(&self) -> bool {
        match self.mode {
            WorkerProbeMode::Syscalls => true,
            WorkerProbeMode::Auto => !self.redis_on_node,
            WorkerProbeMode::Libc => false,
        }
    }

    /// Follows `pid` the way `way` says from now: adds it to the kernel filter and seeds the
    /// peers of its open sockets.
    fn start_following(
        &mut self,
        pid: u32,
        way: u32,
        sockets: impl FnOnce() -> Vec<(u32, SocketPeer)>,
        libc: Option<LibcAttached>,
    ) -> Result<(), ProbeError> {
        self.ways.insert(pid, way);
        if let Err(e) = self.syscall_workers.set(pid, way == via::SYSCALLS) {
            self.ways.remove(&pid);
            self.forget(pid);
            return Err(ProbeError::Map {
                name: maps::SYSCALL_WORKERS,
                message: e.to_string(),
            });
        }
        // After the filter is set: connections made from now on are seen at connect(), the
        // ones made before are in /proc.
        self.seed_peers(pid, sockets());
        // Said once the worker is fully followed: a write made before its sockets' peers were
        // seeded is taken for one to a file, until its next.
        if let Some(attached) = libc {
            attached.log();
        }
        Ok(())
    }

    /// Asks the attaching thread for `pid`'s libc uprobes, unless it has no C library to put
    /// them in or as many workers as `--max-libc-workers` have theirs. `moving`: it was
    /// followed through the tracepoints until now.
    fn request_libc(
        &mut self,
        pid: u32,
        target: impl FnOnce() -> Option<UprobeTarget>,
        moving: bool,
    ) -> Result<(), ProbeError> {
        if self.libc_links.len() + self.pending_libc.len() >= self.max_libc_workers {
            return Err(ProbeError::Disabled(
                "as many workers as --max-libc-workers are followed through uprobes",
            ));
        }
        let target = target().ok_or(ProbeError::Disabled(
            "the worker maps no libc and its executable has no C library functions (a Go binary?)",
        ))?;
        let (generation, cancelled) = self.pending_libc.start(pid, moving);
        let request = LibcRequest {
            pid,
            generation,
            target,
            cancelled,
        };
        if !self.attacher.attach_libc(request) {
            self.pending_libc.forget(pid);
            return Err(ProbeError::Load(
                "the thread that attaches workers' libc probes is gone".into(),
            ));
        }
        Ok(())
    }

    /// What follows a worker whose libc uprobes could not go in (`reason`): in `auto`, the
    /// syscall tracepoints if `--syscall-probes-beside-redis` lets them, else nothing (it is
    /// counted as not followed); in `libc` mode, nothing. Returns the way it is followed.
    fn libc_refused(
        &mut self,
        ebpf: &mut Ebpf,
        pid: u32,
        reason: ProbeError,
    ) -> Result<u32, ProbeError> {
        if self.mode != WorkerProbeMode::Auto {
            return Err(reason);
        }
        if self.syscalls_beside_redis {
            tracing::info!(pid, %reason, "following this worker through the syscall tracepoints (--syscall-probes-beside-redis): the Redis on this node pays their filter on every read and write");
            self.attach_syscalls(ebpf)?;
            return Ok(via::SYSCALLS);
        }
        tracing::warn!(pid, %reason, "this worker is not followed: a Redis runs on this node and the syscall tracepoints would tax every request it serves (--syscall-probes-beside-redis follows it anyway)");
        self.unfollowed.insert(pid);
        Err(ProbeError::Disabled(
            "worker not followed beside Redis: no uprobe target",
        ))
    }

    /// Installs what the attaching thread made for a worker (its libc probes, or its OpenSSL
    /// ones). An answer nobody waits for any more (the worker is gone, or its pid was tracked
    /// again since) has its links closed. `sockets` lists the worker's open sockets.
    pub fn install(
        &mut self,
        ebpf: &mut Ebpf,
        answer: Answer,
        sockets: impl FnOnce() -> Vec<(u32, SocketPeer)>,
    ) {
        let waited_for = match &answer {
            Answer::Libc(a) => self.pending_libc.answered(a.pid, a.generation),
            Answer::Ssl(a) => self.pending_ssl.answered(a.pid, a.generation),
        };
        let Some(pending) = waited_for else {
            answer.close();
            return;
        };
        match answer {
            Answer::Libc(answer) => self.install_libc(ebpf, answer, pending, sockets),
            Answer::Ssl(answer) => self.install_ssl(answer),
        }
    }

    /// Installs a worker's libc probes: they go in and it is followed from now; where they
    /// could not be made, it is followed as its mode falls back to.
    fn install_libc(
        &mut self,
        ebpf: &mut Ebpf,
        answer: LibcAnswer,
        pending: Pending,
        sockets: impl FnOnce() -> Vec<(u32, SocketPeer)>,
    ) {
        let pid = answer.pid;
        if let Err(reason @ ProbeError::ClosesBacklogged { .. }) = &answer.outcome {
            if self.held_back.is_empty() {
                tracing::warn!(pid, %reason, "this worker is not followed yet: fanout.workers.unfollowed{{reason=\"probe_backlog\"}} counts the workers waiting");
            } else {
                tracing::debug!(pid, %reason, "this worker is not followed yet");
            }
            if pending.moving {
                // Followed through the tracepoints until now, which a Redis on the node rules
                // out.
                self.forget(pid);
            }
            self.held_back.insert(pid);
            return;
        }
        let attached = answer.outcome.map(|links| self.take_libc_links(pid, links));
        let followed = match attached {
            Ok(attached) => {
                let followed = self.start_following(pid, via::LIBC, sockets, Some(attached));
                if followed.is_ok() && pending.moving {
                    tracing::info!(pid, "a Redis is tracked on this node: worker moved from the syscall tracepoints to uprobes");
                }
                followed
            }
            Err(reason) if pending.moving => {
                self.no_longer_followed(pid, &reason);
                return;
            }
            Err(reason) => self
                .libc_refused(ebpf, pid, reason)
                .and_then(|way| self.start_following(pid, way, sockets, None)),
        };
        match followed {
            Ok(()) => {}
            Err(ProbeError::Disabled(why)) => tracing::debug!(pid, "{why}"),
            Err(e) => {
                tracing::warn!(pid, error = %e, "worker probes unavailable; no worker-side blocking metrics for this worker")
            }
        }
    }

    /// A worker that was followed through the tracepoints and cannot be through uprobes, now
    /// that a Redis runs on the node.
    fn no_longer_followed(&mut self, pid: u32, reason: &ProbeError) {
        tracing::warn!(pid, %reason, "a Redis is tracked on this node: this worker cannot be followed through uprobes and is no longer followed (--syscall-probes-beside-redis follows it anyway)");
        self.forget(pid);
        self.unfollowed.insert(pid);
    }

    /// Tells the worker side whether a Redis is tracked on this node. When one appears, `auto`
    /// moves the workers it follows through the tracepoints to uprobes (or stops following
    /// those it cannot), and detaches the tracepoints at once: Redis pays for them otherwise.
    pub fn set_redis_on_node(
        &mut self,
        ebpf: &mut Ebpf,
        present: bool,
        target_of: impl Fn(u32) -> Option<UprobeTarget>,
    ) {
        let appeared = present && !self.redis_on_node;
        self.redis_on_node = present;
        if !appeared || self.mode != WorkerProbeMode::Auto || self.syscalls_beside_redis {
            return;
        }
        let movers: Vec<u32> = self
            .ways
            .iter()
            .filter(|(_, way)| **way == via::SYSCALLS)
            .map(|(pid, _)| *pid)
            .collect();
        for pid in movers {
            // Off the tracepoints first, then onto uprobes once the attaching thread has made
            // them: never followed both ways at once (the bytes would be parsed twice). What
            // it sends or reads in between is not seen; the connection then resynchronises at
            // its next command.
            let _ = self.syscall_workers.set(pid, false);
            self.ways.remove(&pid);
            if let Err(reason) = self.request_libc(pid, || target_of(pid), true) {
                self.no_longer_followed(pid, &reason);
            }
        }
        if self.attached() && !self.syscall_workers() {
            self.syscalls_idle_since = None;
            self.syscalls.detach(ebpf);
        }
    }

    /// Tracked workers not followed because a Redis runs on this node.
    pub fn unfollowed(&self) -> usize {
        self.unfollowed.len()
    }

    /// Tracked workers not probed yet because gone workers' probes wait to be closed.
    pub fn held_back(&self) -> usize {
        self.held_back.len()
    }

    /// Tracks again the workers held back by the closes' backlog, once it has drained under
    /// half of its bound or they no longer need uprobes (on the agent's one-second tick): as
    /// [`Self::track`], with `target` and `sockets` its arguments for a pid.
    pub fn retry_held_back(
        &mut self,
        ebpf: &mut Ebpf,
        mut target: impl FnMut(u32) -> Option<UprobeTarget>,
        mut sockets: impl FnMut(u32) -> Vec<(u32, SocketPeer)>,
    ) {
        // Or at once if they would now be followed through the tracepoints (the Redis on the
        // node is gone).
        if self.held_back.is_empty()
            || !(super::link_closer::closes_drained() || self.through_syscalls())
        {
            return;
        }
        let pids = std::mem::take(&mut self.held_back);
        tracing::info!(
            workers = pids.len(),
            "the probes of gone workers are released: following the workers held back"
        );
        for pid in pids {
            match self.track(ebpf, pid, || target(pid), || sockets(pid)) {
                Ok(()) => {}
                Err(ProbeError::Disabled(why)) => tracing::debug!(pid, "{why}"),
                Err(e) => {
                    tracing::warn!(pid, error = %e, "worker probes unavailable; no worker-side blocking metrics for this worker")
                }
            }
        }
    }

    /// Followed workers that hold TLS connections, no RESP connection the probes follow, and
    /// whose TLS library is not probed (`--no-tls-probes`, or no libssl to probe): if their
    /// Redis is reached over TLS (`rediss://`), their commands are encrypted where the probes
    /// read them, and none of their blocking pops is counted from the worker side.
    pub fn unfollowed_tls(&self) -> usize {
        self.tls_only.len()
    }

    /// Looks at the sockets the kernel saw writing TLS records (`TLS_CONNS`) and says, once per
    /// worker, which workers may talk to their Redis over TLS unseen: those with TLS
    /// connections, no followed RESP connection, and no OpenSSL probes. (A worker whose Redis
    /// connections are followed may hold TLS ones too, to an HTTPS API: it is not one of
    /// them.)
    pub fn note_tls_connections(&mut self) {
        let mut tls: BTreeMap<u32, Vec<ConnKey>> = BTreeMap::new();
        for key in self.tls_conns.keys().filter_map(Result::ok) {
            if self.ways.contains_key(&key.tgid) {
                tls.entry(key.tgid).or_default().push(key);
            }
        }
        if tls.is_empty() {
            self.tls_only.clear();
            return;
        }
        let with_resp: std::collections::BTreeSet<u32> = self
            .connections()
            .into_iter()
            .map(|(key, _)| key.tgid)
            .collect();
        // The TLS sockets an SSL object is known to talk through: their plain text is seen.
        let bound: std::collections::BTreeSet<ConnKey> = if self.ssl_links.is_empty() {
            Default::default()
        } else {
            self.ssl_fds
                .iter()
                .filter_map(Result::ok)
                .map(|(k, fd)| ConnKey { tgid: k.tgid, fd })
                .collect()
        };
        let mut now = std::collections::BTreeSet::new();
        for (pid, keys) in tls {
            // Only where its TLS is not followed: the OpenSSL probes are turned off or could
            // not be attached to it (one not looked at yet is within a second of its first
            // TLS write), or they have been in for a while and a TLS socket of it is still
            // not known to any SSL object; and only while no RESP connection of it is
            // followed.
            let why = match self.ssl_unavailable.get(&pid) {
                _ if !self.follow_tls => "turned off (--no-tls-probes)",
                Some(why) => why.as_str(),
                None => match self.ssl_links.get(&pid) {
                    Some((_, since))
                        if since.elapsed() >= TLS_BIND_GRACE
                            && keys.iter().any(|k| !bound.contains(k)) =>
                    {
                        "attached, but a TLS socket is not written through SSL_write or set with SSL_set_fd (memory BIOs, as asyncio's)"
                    }
                    _ => continue,
                },
            };
            if with_resp.contains(&pid) {
                continue;
            }
            if !self.tls_only.contains(&pid) {
                let peers: Vec<String> = keys
                    .iter()
                    .map(|key| match self.conn_maps.peers.get(key, 0) {
                        Ok(peer) => format!("{}:{}", peer_address(&peer), peer.port),
                        Err(_) => "unknown".into(),
                    })
                    .collect();
                tracing::warn!(
                    pid,
                    ?peers,
                    tls_probes = why,
                    "worker holds TLS connections and no plain RESP one, and its TLS is not followed (tls_probes says why): if its Redis is reached over TLS, its commands are encrypted where the probes read them, and its blocking pops are not counted from the worker side (the Redis side still counts them where the agent runs beside that Redis)"
                );
            }
            now.insert(pid);
        }
        self.tls_only = now;
    }

    /// Asks for OpenSSL probes on the followed workers the kernel saw writing TLS records
    /// (`TLS_CONNS`) that have none yet (made on the attaching thread, which reads which
    /// libssl each maps from `proc`). Once per worker: one whose TLS library cannot be probed
    /// (it maps no libssl: OpenSSL built into it, another TLS library) is said once and left
    /// as it is.
    pub fn follow_tls(&mut self, proc: &crate::proc_reader::ProcRoot) {
        if !self.follow_tls {
            return;
        }
        let pids: std::collections::BTreeSet<u32> = self
            .tls_conns
            .keys()
            .filter_map(Result::ok)
            .map(|k| k.tgid)
            .filter(|pid| {
                self.ways.contains_key(pid)
                    && !self.ssl_links.contains_key(pid)
                    && !self.ssl_unavailable.contains_key(pid)
                    && !self.pending_ssl.contains(*pid)
            })
            .collect();
        for pid in pids {
            let (generation, cancelled) = self.pending_ssl.start(pid, false);
            let request = SslRequest {
                pid,
                generation,
                cancelled,
                proc: proc.clone(),
            };
            if !self.attacher.attach_ssl(request) {
                self.pending_ssl.forget(pid);
                self.ssl_unavailable.insert(
                    pid,
                    "the thread that attaches workers' probes is gone".into(),
                );
            }
        }
    }

    /// Installs a worker's OpenSSL probes, or notes why its TLS library cannot be probed.
    fn install_ssl(&mut self, answer: SslAnswer) {
        let pid = answer.pid;
        let attached = answer
            .outcome
            .map(|SslLinks { libssl, links }| (libssl, WorkerLinks(links)));
        match attached {
            Ok((libssl, links)) => {
                tracing::info!(pid, libssl = %libssl.display(), links = links.len(), kind = links.kind(), "worker talks TLS: its TLS connections are followed through OpenSSL from their next command");
                self.ssl_links
                    .insert(pid, (links, std::time::Instant::now()));
            }
            Err(why) => {
                tracing::info!(pid, reason = %why, "worker talks TLS and its TLS library cannot be probed");
                self.ssl_unavailable.insert(pid, why);
            }
        }
    }

    /// Attaches the syscall tracepoints unless they are already attached (then puts back
    /// what was taken out: a worker starts being followed).
    ///
    /// The error is kept for the status: only a first attach can fail (then nothing stays
    /// attached), so once attached there is none.
    fn attach_syscalls(&mut self, ebpf: &mut Ebpf) -> Result<(), ProbeError> {
        self.syscalls_idle_since = None;
        let attached = self.syscalls.attach(ebpf);
        self.attach_error = attached.as_ref().err().map(ToString::to_string);
        attached
    }

    /// Takes in the libc probes the attaching thread made for `pid`.
    fn take_libc_links(&mut self, pid: u32, links: LibcLinks) -> LibcAttached {
        let LibcLinks {
            libc,
            links,
            write,
            programs,
        } = links;
        self.libc_programs.get_or_insert(programs);
        if let Some(write) = write {
            self.write_probes.insert(pid, write);
        }
        let links = WorkerLinks(links);
        let attached = LibcAttached {
            pid,
            links: links.len() + usize::from(self.write_probes.contains(pid)),
            kind: links.kind(),
            libc,
        };
        self.libc_links.insert(pid, links);
        attached
    }

    /// Loads the libc programs for uprobe-multi links now (most of a second of verification):
    /// at start, rather than when the first worker beside a Redis waits for them.
    pub fn preload_uprobe_programs(&mut self) {
        if !self.disabled && self.mode != WorkerProbeMode::Syscalls {
            self.attacher.preload();
        }
    }

    /// Records peers found in /proc for connections the kernel did not see being made.
    /// Their descriptors' slots in the kernel's cache of non-connections are cleared: one
    /// may be left by an earlier process with the same pid, or written between the worker's
    /// first followed write and this seeding.
    pub fn seed_peers(&mut self, pid: u32, sockets: Vec<(u32, SocketPeer)>) {
        for (fd, peer) in sockets {
            let key = ConnKey { tgid: pid, fd };
            // BPF_NOEXIST: what connect() recorded wins.
            let _ = self.conn_maps.peers.insert(key, peer_from(peer), 1);
            let (slot, tag) = not_resp_slot(&key);
            if self.not_resp.get(&slot, 0).ok() == Some(tag) {
                let _ = self.not_resp.set(slot, 0, 0);
            }
        }
    }

    /// Processes with followed connections whose peer is not known yet.
    pub fn unknown_peer_pids(&self) -> std::collections::BTreeSet<u32> {
        self.conn_maps
            .conns
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, c)| c.peer.family == 0)
            .map(|(k, _)| k.tgid)
            .collect()
    }

    /// Stops following a worker and returns what the kernel had counted for it, so that
    /// group totals can keep it. Detaches the probes after the last worker.
    pub fn untrack(&mut self, pid: u32) -> WorkerReadings {
        self.unfollowed.remove(&pid);
        self.held_back.remove(&pid);
        self.tls_only.remove(&pid);
        let readings = self.read().remove(&pid).unwrap_or_default();
        self.ways.remove(&pid);
        remove_keys_where(&mut self.conn_maps.conns, |k| k.tgid == pid);
        remove_keys_where(&mut self.conn_maps.peers, |k| k.tgid == pid);
        // Or a later process with its pid would be taken for a TLS worker.
        remove_keys_where(&mut self.tls_conns, |k| k.tgid == pid);
        remove_keys_where(&mut self.ssl_fds, |k| k.tgid == pid);
        self.ssl_unavailable.remove(&pid);
        let _ = self.conn_maps.connects.remove(&pid);
        // A per-CPU map: not one `remove_keys_where` takes.
        let served: Vec<ServedKey> = self
            .served
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.tgid == pid)
            .collect();
        for k in served {
            let _ = self.served.remove(&k);
        }
        self.durations.release(|k| k.tgid == pid);
        self.keys.release(|k| k.tgid == pid);
        self.forget(pid);
        readings
    }

    /// Detaches what only `pid` used: its libc uprobes, and the syscall tracepoints once no
    /// tracked worker is followed through them.
    fn forget(&mut self, pid: u32) {
        let _ = self.syscall_workers.set(pid, false);
        // Its links, if they are still being made, are closed when their answer comes.
        self.pending_libc.forget(pid);
        self.pending_ssl.forget(pid);
        if let Some(link) = self.write_probes.remove(pid) {
            super::link_closer::detach_in_background(vec![link]);
        }
        let ssl_links = self.ssl_links.remove(&pid).map(|(links, _)| links);
        for WorkerLinks(links) in [self.libc_links.remove(&pid), ssl_links]
            .into_iter()
            .flatten()
        {
            super::link_closer::detach_in_background(links);
        }
        if self.attached() && !self.syscall_workers() {
            self.syscalls_idle_since
                .get_or_insert_with(std::time::Instant::now);
        }
    }

    fn syscall_workers(&self) -> bool {
        self.ways.values().any(|way| way & via::SYSCALLS != 0)
    }

    /// Detaches the syscall tracepoints once no worker has needed them for [`SYSCALLS_LINGER`].
    pub fn detach_idle_syscalls(&mut self, ebpf: &mut Ebpf) {
        match self.syscalls_idle_since {
            Some(since) if since.elapsed() >= SYSCALLS_LINGER && !self.syscall_workers() => {
                self.syscalls_idle_since = None;
                self.syscalls.detach(ebpf);
            }
            _ => {}
        }
    }

    /// Histograms per tgid, merged over CPUs.
    pub fn read(&self) -> BTreeMap<u32, WorkerReadings> {
        let mut out: BTreeMap<u32, WorkerReadings> = BTreeMap::new();
        for (key, per_cpu) in self.durations.entries() {
            let entry = out
                .entry(key.tgid)
                .or_default()
                .durations
                .entry((key.command, key.outcome, key.peer))
                .or_insert(Log2Histogram::ZERO);
            per_cpu.iter().for_each(|v| entry.merge(v));
        }
        for (key, per_cpu) in self.keys.entries() {
            let entry = out
                .entry(key.tgid)
                .or_default()
                .keys
                .entry(key.command)
                .or_insert(KeyHistogram::ZERO);
            per_cpu.iter().for_each(|v| entry.merge(v));
        }
        for (key, per_cpu) in self.served.iter().filter_map(Result::ok) {
            *out.entry(key.tgid)
                .or_default()
                .served
                .entry((key.peer, key.key_hash))
                .or_default() += per_cpu.iter().sum::<u64>();
        }
        out
    }

    /// Takes out or puts back the probes on `write()` and `read()` (see [`narrowing`]): each
    /// uprobe follower's own link on `write` (`write_probes`), and the `write`/`read`
    /// tracepoints for those followed through the tracepoints (one probe for all of them, and
    /// for every process on the node: `SyscallProbes::adjust`). Called every second; the
    /// connection maps are walked only when a probe is due (a connect(), or a decision still
    /// pending: see [`narrowing::Schedule`]).
    pub fn adjust_narrowed_probes(&mut self, ebpf: &mut Ebpf) {
        self.write_probes
            .adjust(&self.conn_maps, self.libc_programs.as_deref());
        let pids: std::collections::BTreeSet<u32> = self
            .ways
            .iter()
            .filter(|(_, way)| **way == via::SYSCALLS)
            .map(|(pid, _)| *pid)
            .collect();
        self.syscalls.adjust(ebpf, &pids, &self.conn_maps);
    }

    /// Followed workers whose calls of `call` ("write" or "read") are not probed, by how they
    /// are followed: (`via`, `call`, count).
    pub fn probes_off(&self) -> Vec<(&'static str, &'static str, usize)> {
        let syscall_workers = self
            .ways
            .values()
            .filter(|way| **way == via::SYSCALLS)
            .count();
        let tracepoints = |index: usize| {
            if self.syscalls.group_out(index) {
                syscall_workers
            } else {
                0
            }
        };
        vec![
            ("uprobes", "write", self.write_probes.out()),
            ("tracepoints", "write", tracepoints(0)),
            ("tracepoints", "read", tracepoints(1)),
        ]
    }

    /// Followed RESP connections and their state.
    pub fn connections(&self) -> Vec<(ConnKey, ConnState)> {
        self.conn_maps
            .conns
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, c)| c.kind == agent_common::worker::conn_kind::RESP)
            .collect()
    }
}
