//! The worker-side syscall probes: attached while at least one worker process is tracked
//! (so a host with only Redis pays nothing), fed with the tracked pids, and read back.

use std::collections::BTreeMap;

use agent_common::{
    maps,
    redis::KeyHistogram,
    sched::Log2Histogram,
    worker::{via, ConnKey, ConnState, Peer, WorkerHistKey, WorkerKeysKey},
};
use aya::{
    maps::{HashMap, MapData, PerCpuHashMap},
    programs::{
        trace_point::TracePointLinkId,
        uprobe::{UProbeAttachLocation, UProbeLinkId, UProbeScope},
        TracePoint,
    },
    Ebpf,
};

use super::{attach_tracepoint, load_programs, take_map, ProbeError, TracepointSpec};
use crate::{
    probe_site::{self, ProbeSite},
    proc_reader::SocketPeer,
};

const fn syscall(program: &'static str, name: &'static str) -> TracepointSpec {
    TracepointSpec {
        program,
        category: "syscalls",
        name,
    }
}

/// The syscalls followed, and the program each runs.
pub const WORKER_TRACEPOINTS: [TracepointSpec; 14] = [
    syscall("worker_enter_write", "sys_enter_write"),
    syscall("worker_enter_write", "sys_enter_sendto"),
    syscall("worker_enter_writev", "sys_enter_writev"),
    syscall("worker_enter_sendmsg", "sys_enter_sendmsg"),
    syscall("worker_enter_read", "sys_enter_read"),
    syscall("worker_enter_read", "sys_enter_recvfrom"),
    syscall("worker_enter_readv", "sys_enter_readv"),
    syscall("worker_enter_recvmsg", "sys_enter_recvmsg"),
    syscall("worker_exit_read", "sys_exit_read"),
    syscall("worker_exit_read", "sys_exit_recvfrom"),
    syscall("worker_exit_read", "sys_exit_readv"),
    syscall("worker_exit_read", "sys_exit_recvmsg"),
    syscall("worker_enter_close", "sys_enter_close"),
    syscall("worker_enter_connect", "sys_enter_connect"),
];

/// How the worker side sees the workers' traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WorkerProbeMode {
    /// Each worker through its libc when it has one the probes can attach to, through the
    /// syscall tracepoints otherwise (static or Go binaries). Redis and every other process
    /// pay nothing unless a worker of the second kind is tracked; each libc-followed worker
    /// costs the agent about 2 s of kernel time to detach, so it suits long-lived workers.
    Auto,
    /// Syscall tracepoints (the default): any worker, whatever its language or libc, but every process on
    /// the host (Redis included) pays the filter on each read and write.
    Syscalls,
    /// Uprobes on each worker's libc send/receive functions: only workers pay, but a worker
    /// that bypasses libc (Go) is not seen.
    Libc,
}

/// In `auto` mode, workers followed through their libc at most. Each costs 17 per-process
/// uprobes: about 25 ms to attach, and about 2 s of kernel time to detach (an RCU grace
/// period per uprobe), paid again when the agent exits. That does not scale to hundreds of
/// processes; workers beyond the limit go through the tracepoints.
pub const DEFAULT_MAX_LIBC_WORKERS: usize = 16;

/// How long the syscall tracepoints stay attached after the last worker that needs them is
/// gone. Detaching them waits for RCU grace periods (about 1 s here, on the agent's loop), so
/// workers that come and go (a Resque master forking a child per job) would otherwise have
/// them attached and detached over and over, and new processes picked up late meanwhile.
pub const SYSCALLS_LINGER: std::time::Duration = std::time::Duration::from_secs(30);

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

/// What the kernel holds for one worker process.
#[derive(Clone, Debug, Default)]
pub struct WorkerReadings {
    pub durations: BTreeMap<(u32, u32, Peer), Log2Histogram>,
    pub keys: BTreeMap<u32, KeyHistogram>,
}

pub struct WorkerMaps {
    procs: HashMap<MapData, u32, u32>,
    conns: HashMap<MapData, ConnKey, ConnState>,
    peers: HashMap<MapData, ConnKey, Peer>,
    durations: PerCpuHashMap<MapData, WorkerHistKey, Log2Histogram>,
    keys: PerCpuHashMap<MapData, WorkerKeysKey, KeyHistogram>,
    links: Vec<(&'static str, TracePointLinkId)>,
    /// Why the programs could not be loaded, if so: then no worker is followed.
    load_error: Option<String>,
    /// Why the syscall probes could not be attached the last time it was tried.
    pub attach_error: Option<String>,
    /// Turned off by configuration (`--no-worker-probes`).
    pub disabled: bool,
    pub mode: WorkerProbeMode,
    pub max_libc_workers: usize,
    /// Since when no tracked worker has needed the attached syscall tracepoints.
    syscalls_idle_since: Option<std::time::Instant>,
    /// Libc-mode uprobe links per worker pid.
    libc_links: std::collections::HashMap<u32, Vec<(&'static str, UProbeLinkId)>>,
    libc_sites: std::collections::HashMap<
        (u64, u64),
        std::sync::Arc<BTreeMap<String, probe_site::FunctionSites>>,
    >,
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
    pub fn new(ebpf: &mut Ebpf) -> Result<Self, ProbeError> {
        let programs = WORKER_TRACEPOINTS
            .iter()
            .map(|spec| spec.program)
            .chain(LIBC_UPROBES.iter().map(|(program, _)| *program));
        let load_error = load_programs(ebpf, programs);
        if let Some(e) = &load_error {
            tracing::warn!(error = %e, "worker probes cannot be loaded; no worker-side blocking metrics");
        }
        Ok(Self {
            procs: take_map(ebpf, maps::WORKER_PROCS)?,
            conns: take_map(ebpf, maps::CONNS)?,
            peers: take_map(ebpf, maps::CONN_PEERS)?,
            durations: take_map(ebpf, maps::WORKER_DURATION_HISTS)?,
            keys: take_map(ebpf, maps::WORKER_KEYS_HISTS)?,
            links: Vec::new(),
            load_error,
            attach_error: None,
            disabled: false,
            mode: WorkerProbeMode::Syscalls,
            max_libc_workers: DEFAULT_MAX_LIBC_WORKERS,
            syscalls_idle_since: None,
            libc_links: std::collections::HashMap::new(),
            libc_sites: std::collections::HashMap::new(),
        })
    }

    pub fn attached(&self) -> bool {
        !self.links.is_empty()
    }

    /// Starts following a worker, the way the mode says: through its libc (found by `libc`,
    /// which is only asked when needed) or through the syscall tracepoints (attached with the
    /// first worker that needs them); seeds the peers of its open sockets, and adds it to the
    /// kernel filter with the way it is followed.
    pub fn track(
        &mut self,
        ebpf: &mut Ebpf,
        pid: u32,
        libc: impl FnOnce() -> Option<std::path::PathBuf>,
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
        let way = match self.mode {
            WorkerProbeMode::Libc => {
                self.attach_libc(ebpf, pid, libc())?;
                via::LIBC
            }
            WorkerProbeMode::Syscalls => {
                self.attach_syscalls(ebpf)?;
                via::SYSCALLS
            }
            WorkerProbeMode::Auto if self.libc_links.len() >= self.max_libc_workers => {
                if self.libc_links.len() == self.max_libc_workers && !self.attached() {
                    tracing::info!(limit = self.max_libc_workers, "as many workers as --max-libc-workers are followed through their libc; more go through the syscall tracepoints");
                }
                self.attach_syscalls(ebpf)?;
                via::SYSCALLS
            }
            WorkerProbeMode::Auto => match self.attach_libc(ebpf, pid, libc()) {
                Ok(()) => via::LIBC,
                Err(reason) => {
                    tracing::info!(pid, %reason, "following this worker through the syscall tracepoints instead of its libc");
                    self.attach_syscalls(ebpf)?;
                    via::SYSCALLS
                }
            },
        };
        if let Err(e) = self.procs.insert(pid, way, 0) {
            self.forget(ebpf, pid);
            return Err(ProbeError::Map {
                name: maps::WORKER_PROCS,
                message: e.to_string(),
            });
        }
        // After the filter is set: connections made from now on are seen at connect(), the
        // ones made before are in /proc.
        self.seed_peers(pid, sockets());
        Ok(())
    }

    /// Attaches the syscall tracepoints unless they are already attached.
    fn attach_syscalls(&mut self, ebpf: &mut Ebpf) -> Result<(), ProbeError> {
        self.syscalls_idle_since = None;
        if !self.links.is_empty() {
            return Ok(());
        }
        for spec in &WORKER_TRACEPOINTS {
            match attach_tracepoint(ebpf, spec) {
                Ok(link) => self.links.push((spec.program, link)),
                Err(e) => {
                    self.detach_syscalls(ebpf);
                    self.attach_error = Some(e.to_string());
                    return Err(e);
                }
            }
        }
        self.attach_error = None;
        tracing::info!(
            syscalls = WORKER_TRACEPOINTS.len(),
            "worker syscall probes attached"
        );
        Ok(())
    }

    /// Attaches the libc uprobes to one worker process.
    fn attach_libc(
        &mut self,
        ebpf: &mut Ebpf,
        pid: u32,
        libc: Option<std::path::PathBuf>,
    ) -> Result<(), ProbeError> {
        let libc = libc.ok_or(ProbeError::Disabled(
            "the worker maps no libc (a static or Go binary?); its traffic is not followed",
        ))?;
        let scope = UProbeScope::OneProcess(
            std::num::NonZeroU32::new(pid).ok_or(ProbeError::Disabled("pid 0"))?,
        );
        let sites = self.libc_sites(&libc);
        let mut links = Vec::new();
        for (program, symbol) in LIBC_UPROBES {
            let site = sites.get(symbol).map_or(ProbeSite::ENTRY, |s| s.entry);
            let location = UProbeAttachLocation::SymbolOffset(symbol, site.offset);
            let result = super::attach_uprobe(ebpf, program, location, &libc, scope);
            match result {
                Ok(link) => links.push((program, link)),
                Err(e) => tracing::debug!(pid, symbol, error = %e, "libc function not probed"),
            }
        }
        if links.is_empty() {
            return Err(ProbeError::Attach {
                program: "worker_libc_*",
                category: "uprobe",
                name: "libc",
                message: format!("nothing could be attached in {}", libc.display()),
            });
        }
        tracing::info!(pid, libc = %libc.display(), uprobes = links.len(), "worker libc probes attached");
        self.libc_links.insert(pid, links);
        Ok(())
    }

    /// The probe sites in a libc, computed once per file (dev, inode): a fleet of workers
    /// shares one or two libcs.
    fn libc_sites(
        &mut self,
        libc: &std::path::Path,
    ) -> std::sync::Arc<BTreeMap<String, probe_site::FunctionSites>> {
        use std::os::unix::fs::MetadataExt;
        let id = std::fs::metadata(libc)
            .map(|m| (m.dev(), m.ino()))
            .unwrap_or_default();
        if let Some(sites) = self.libc_sites.get(&id) {
            return sites.clone();
        }
        let names: Vec<&str> = LIBC_UPROBES.iter().map(|(_, symbol)| *symbol).collect();
        let sites = match std::fs::read(libc)
            .map_err(|e| e.to_string())
            .and_then(|data| {
                object::File::parse(&*data)
                    .map(|file| probe_site::sites_in(&file, &names))
                    .map_err(|e| e.to_string())
            }) {
            Ok(sites) => sites,
            Err(error) => {
                tracing::info!(libc = %libc.display(), %error, "cannot read libc's code; probing function entries");
                BTreeMap::new()
            }
        };
        for (symbol, site) in &sites {
            super::log_probe_site(symbol, site.entry, libc);
        }
        let sites = std::sync::Arc::new(sites);
        if id != (0, 0) {
            self.libc_sites.insert(id, sites.clone());
        }
        sites
    }

    /// Records peers found in /proc for connections the kernel did not see being made.
    pub fn seed_peers(&mut self, pid: u32, sockets: Vec<(u32, SocketPeer)>) {
        for (fd, peer) in sockets {
            // BPF_NOEXIST: what connect() recorded wins.
            let _ = self
                .peers
                .insert(ConnKey { tgid: pid, fd }, peer_from(peer), 1);
        }
    }

    /// Processes with followed connections whose peer is not known yet.
    pub fn unknown_peer_pids(&self) -> std::collections::BTreeSet<u32> {
        self.conns
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, c)| c.peer.family == 0)
            .map(|(k, _)| k.tgid)
            .collect()
    }

    /// Stops following a worker and returns what the kernel had counted for it, so that
    /// group totals can keep it. Detaches the probes after the last worker.
    pub fn untrack(&mut self, ebpf: &mut Ebpf, pid: u32) -> WorkerReadings {
        let readings = self.read().remove(&pid).unwrap_or_default();
        let _ = self.procs.remove(&pid);
        let conns: Vec<ConnKey> = self
            .conns
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.tgid == pid)
            .collect();
        for k in conns {
            let _ = self.conns.remove(&k);
        }
        let peers: Vec<ConnKey> = self
            .peers
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.tgid == pid)
            .collect();
        for k in peers {
            let _ = self.peers.remove(&k);
        }
        let durations: Vec<WorkerHistKey> = self
            .durations
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.tgid == pid)
            .collect();
        for k in durations {
            let _ = self.durations.remove(&k);
        }
        let keys: Vec<WorkerKeysKey> = self
            .keys
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.tgid == pid)
            .collect();
        for k in keys {
            let _ = self.keys.remove(&k);
        }
        self.forget(ebpf, pid);
        readings
    }

    /// Detaches what only `pid` used: its libc uprobes, and the syscall tracepoints once no
    /// tracked worker is followed through them.
    fn forget(&mut self, ebpf: &mut Ebpf, pid: u32) {
        if let Some(links) = self.libc_links.remove(&pid) {
            super::detach_uprobes_in_background(ebpf, links);
        }
        if self.attached() && !self.syscall_workers() {
            self.syscalls_idle_since
                .get_or_insert_with(std::time::Instant::now);
        }
    }

    fn syscall_workers(&self) -> bool {
        self.procs
            .iter()
            .filter_map(Result::ok)
            .any(|(_, way)| way & via::SYSCALLS != 0)
    }

    /// Detaches the syscall tracepoints once no worker has needed them for [`SYSCALLS_LINGER`].
    pub fn detach_idle_syscalls(&mut self, ebpf: &mut Ebpf) {
        match self.syscalls_idle_since {
            Some(since) if since.elapsed() >= SYSCALLS_LINGER && !self.syscall_workers() => {
                self.syscalls_idle_since = None;
                self.detach_syscalls(ebpf);
            }
            _ => {}
        }
    }

    fn detach_syscalls(&mut self, ebpf: &mut Ebpf) {
        if self.links.is_empty() {
            return;
        }
        for (program, link) in self.links.drain(..) {
            if let Some(Ok(p)) = ebpf.program_mut(program).map(<&mut TracePoint>::try_from) {
                let _ = p.detach(link);
            }
        }
        tracing::info!("no worker is followed through the syscall tracepoints any more: detached");
    }

    /// Histograms per tgid, merged over CPUs.
    pub fn read(&self) -> BTreeMap<u32, WorkerReadings> {
        let mut out: BTreeMap<u32, WorkerReadings> = BTreeMap::new();
        for (key, per_cpu) in self.durations.iter().filter_map(Result::ok) {
            let entry = out
                .entry(key.tgid)
                .or_default()
                .durations
                .entry((key.command, key.outcome, key.peer))
                .or_insert(Log2Histogram::ZERO);
            per_cpu.iter().for_each(|v| entry.merge(v));
        }
        for (key, per_cpu) in self.keys.iter().filter_map(Result::ok) {
            let entry = out
                .entry(key.tgid)
                .or_default()
                .keys
                .entry(key.command)
                .or_insert(KeyHistogram::ZERO);
            per_cpu.iter().for_each(|v| entry.merge(v));
        }
        out
    }

    /// Followed RESP connections and their state.
    pub fn connections(&self) -> Vec<(ConnKey, ConnState)> {
        self.conns
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, c)| c.kind == agent_common::worker::conn_kind::RESP)
            .collect()
    }
}
