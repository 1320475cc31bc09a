//! The running agent: its state (tracked processes, CPU accounting, probes), how discovery
//! changes are applied to it, and how a snapshot of all metrics is taken from it.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use agent_common::sched::ProbeCounter;

use crate::{
    applied::{Applied, Step},
    collect::log2_to_seconds,
    discovery::{Change, Discovery, ScanErrors, TrackedProcess},
    ebpf::{
        redis::{clock_offset_ns, PointState},
        sched::Swept,
        ProbeStatus, Probes,
    },
    export::http_server::MetricsSource,
    metrics::{catalog, prometheus, AttrValue, Attributes, Point, PointValue, Snapshot},
    proc_reader::{ProcRoot, ReadError},
    proc_walk::{ProcWalk, ProcWalked},
    redis::RedisTarget,
    rules::Classification,
    state_lock::{LockWaits, StateGuard},
    thread_cpu::ProcessCpu,
    worker::{ListenerOptions, WorkerSide},
};

/// Counters of the agent's own troubles.
#[derive(Debug, Default)]
pub struct SelfStats {
    pub read_errors: BTreeMap<&'static str, u64>,
    pub folded_threads: u64,
}

impl SelfStats {
    pub fn count_scan(&mut self, errors: &ScanErrors) {
        *self.read_errors.entry("vanished").or_default() += errors.vanished;
        *self.read_errors.entry("failed").or_default() += errors.failed;
    }
    fn count_read(&mut self, error: &ReadError) {
        *self.read_errors.entry(error.kind()).or_default() += 1;
    }
}

pub struct AgentState {
    pub proc: ProcRoot,
    pub discovery: Discovery,
    /// What is set up for each tracked process; discovery's changes are carried out against it.
    applied: Applied,
    cpu: HashMap<u32, ProcessCpu>,
    pub probes: Option<Probes>,
    /// Tracked Redis servers and their blocking probes.
    redis: HashMap<u32, RedisTarget>,
    /// Worker-side accounting (key lists, exited workers' counts).
    pub worker: WorkerSide,
    /// Cumulative counts for `fanout advise`, kept at each snapshot, and their history.
    pub advise: crate::advise::window::AdviseHistory,
    /// Main-thread CPU seconds of each tracked Redis, as of the last snapshot.
    redis_main_cpu: HashMap<u32, f64>,
    /// What could not be attached and why, for the log and self-metrics.
    pub probe_status: Vec<ProbeStatus>,
    pub stats: SelfStats,
    max_thread_names: usize,
    ticks_per_second: f64,
    boot_time: Option<SystemTime>,
}

impl AgentState {
    /// Takes out or puts back workers' `write()`/`read()` probes (see `ebpf::worker::narrowing`), puts
    /// OpenSSL probes on workers newly seen talking TLS, and follows the workers held back
    /// while gone workers' probes were being closed; on the agent's one-second tick, not on
    /// scrapes, which may be rare.
    pub fn adjust_narrowed_probes(&mut self) {
        if let Some(probes) = self.probes.as_mut() {
            probes.worker.adjust_narrowed_probes(&mut probes.ebpf);
            probes.worker.follow_tls(&self.proc);
            let proc = &self.proc;
            probes.worker.retry_held_back(
                &mut probes.ebpf,
                |pid| crate::ebpf::worker::uprobe_target(proc, pid),
                |pid| proc.socket_peers(pid),
            );
        }
    }

    pub fn new(
        proc: ProcRoot,
        discovery: Discovery,
        probes: Option<Probes>,
        probe_status: Vec<ProbeStatus>,
        max_thread_names: usize,
        listeners: ListenerOptions,
    ) -> Self {
        let boot_time = procfs::boot_time_secs()
            .ok()
            .map(|s| UNIX_EPOCH + Duration::from_secs(s));
        Self {
            proc,
            discovery,
            applied: Applied::default(),
            cpu: HashMap::new(),
            probes,
            redis: HashMap::new(),
            worker: WorkerSide::new(listeners),
            advise: crate::advise::window::AdviseHistory::new(std::time::Instant::now()),
            redis_main_cpu: HashMap::new(),
            probe_status,
            stats: SelfStats::default(),
            max_thread_names,
            ticks_per_second: crate::proc_reader::ticks_per_second() as f64,
            boot_time,
        }
    }

    /// Follows discovery changes: the kernel filter, the CPU state, and a log line each. Each
    /// change is carried out against what is set up at its pid ([`Applied::steps_for`]): one
    /// applied late (a rescan's, after an event changed the same pid) neither sets a process up
    /// twice nor tears down another one.
    pub fn apply(&mut self, changes: Vec<Change>) {
        let steps = changes
            .into_iter()
            .flat_map(|change| self.applied.steps_for(change))
            .collect();
        self.carry_out(steps);
    }

    /// Sets processes up (the kernel filter, the CPU state, their probes) or tears them down.
    /// Runs for every batch, an empty one too (an exec or fork event's check that changed
    /// nothing): it is also where syscall probes no worker needs any more are detached.
    fn carry_out(&mut self, steps: Vec<Step>) {
        // Before any worker of this batch is followed: whether a Redis runs here decides how.
        let redis_on_node = self
            .discovery
            .tracked()
            .any(|p| p.class == Classification::RedisServer);
        if let Some(probes) = self.probes.as_mut() {
            let proc = &self.proc;
            probes
                .worker
                .set_redis_on_node(&mut probes.ebpf, redis_on_node, |pid| {
                    crate::ebpf::worker::uprobe_target(proc, pid)
                });
        }
        for step in steps {
            match step {
                Step::SetUp(p) => self.set_up(&p),
                Step::TearDown(p) => self.tear_down(&p),
            }
        }
        if let Some(probes) = self.probes.as_mut() {
            probes.worker.detach_idle_syscalls(&mut probes.ebpf);
        }
    }

    fn set_up(&mut self, p: &TrackedProcess) {
        let pid = p.pid();
        let tids: Vec<u32> = match self.proc.thread_samples(pid) {
            Ok((samples, _)) => samples.iter().map(|s| s.tid).collect(),
            Err(_) => vec![pid],
        };
        let probes = match self.probes.as_mut() {
            Some(probes) => {
                let proc = &self.proc;
                match probes.sched.track(
                    pid,
                    p.info.id.start_time_ticks,
                    &tids,
                    |tid| proc.thread_counters(pid, tid),
                    |tid| proc.thread_alive(pid, tid),
                ) {
                    Ok(()) => "sched",
                    Err(e) => {
                        tracing::warn!(pid, error = %e, "cannot add process to the kernel filter");
                        "none"
                    }
                }
            }
            None => "none",
        };
        tracing::info!(
            pid,
            group = p.group(),
            exe = p.executable_name(),
            comm = %p.info.comm,
            threads = tids.len(),
            probes,
            "tracking process"
        );
        self.cpu.insert(pid, ProcessCpu::default());
        match &p.class {
            Classification::RedisServer => self.start_redis_probes(p),
            Classification::Worker { .. } => {
                if let Some(probes) = self.probes.as_mut() {
                    let proc = &self.proc;
                    match probes.worker.track(
                        &mut probes.ebpf,
                        pid,
                        || crate::ebpf::worker::uprobe_target(proc, pid),
                        || proc.socket_peers(pid),
                    ) {
                        Ok(()) => {}
                        Err(crate::ebpf::ProbeError::Disabled(why)) => {
                            tracing::debug!(pid, "{why}")
                        }
                        Err(e) => {
                            tracing::warn!(pid, error = %e, "worker syscall probes unavailable; no worker-side blocking metrics")
                        }
                    }
                }
            }
        }
    }

    fn tear_down(&mut self, p: &TrackedProcess) {
        let pid = p.pid();
        if let Some(probes) = self.probes.as_mut() {
            probes.sched.untrack(pid);
            if let Some(target) = self.redis.get(&pid) {
                if target.attach_requested {
                    probes.redis_attacher.release(pid);
                }
                probes.redis.release(&mut probes.ebpf, pid, target.binary);
            }
            if let Classification::Worker { group } = &p.class {
                let readings = probes.worker.untrack(pid);
                self.worker.retire(group, readings, pid);
            }
        }
        self.redis.remove(&pid);
        if let Some(cpu) = self.cpu.remove(&pid) {
            self.stats.folded_threads += cpu.folded_threads;
        }
        tracing::info!(
            pid,
            group = p.group(),
            "process gone; its series are dropped"
        );
    }

    /// Brings what is set up back in line with what discovery holds, and frees kernel filter
    /// entries of processes that are not set up; at the end of each rescan, once its changes
    /// are applied. Nothing to do unless a change went astray between discovery and the
    /// set-up, or a scheduler program raced a process's tear-down (`SchedMaps::sweep`): each
    /// mend is logged, so that a race this does not yet know of shows.
    pub fn mend_tracking(&mut self) {
        let steps = self.applied.mend(self.discovery.tracked());
        for step in &steps {
            let (what, p) = match step {
                Step::SetUp(p) => ("set up", p),
                Step::TearDown(p) => ("torn down", p),
            };
            tracing::warn!(
                pid = p.pid(),
                group = p.group(),
                "process {what} at the rescan: its change had gone astray"
            );
        }
        self.carry_out(steps);
        let applied = &self.applied;
        if let Some(probes) = self.probes.as_mut() {
            let swept = probes.sched.sweep(|tgid| applied.has(tgid));
            if swept != Swept::default() {
                tracing::warn!(
                    processes = swept.processes,
                    threads = swept.threads,
                    slots = swept.slots,
                    "kernel filter entries of processes not tracked, freed at the rescan"
                );
            }
        }
    }

    /// Starts tracking a Redis process: its target is recorded at once (its port from its
    /// sockets) and its binary is handed to the attaching thread, whose answer
    /// [`AgentState::install_redis_probes`] installs.
    fn start_redis_probes(&mut self, p: &TrackedProcess) {
        let pid = p.pid();
        let listen = crate::proc_walk::listen_address_given(&self.proc, pid, &p.info.cmdline);
        let mut target = RedisTarget {
            pid,
            start_ticks: p.info.id.start_time_ticks,
            port: listen.map(|(port, _)| port),
            address: listen.and_then(|(_, address)| address),
            binary: None,
            family: None,
            points: Default::default(),
            attach_requested: false,
            exe_unreadable: false,
            unavailable: None,
            reported: Vec::new(),
            since: p.since,
            bookkeeping_time: self
                .probes
                .as_ref()
                .is_some_and(|p| p.redis.bookkeeping_time),
            sees_switches: self.probes.as_ref().is_some_and(|p| p.redis.sees_switches),
            unblock_bypassed: None,
        };
        self.request_redis_attach(&mut target, p.info.exe.clone());
        self.redis.insert(pid, target);
    }

    /// Hands a Redis's binary to the attaching thread, or records why it cannot be. `exe` is
    /// the process's executable link as discovery read it, `None` when it could not.
    fn request_redis_attach(&self, target: &mut RedisTarget, exe: Option<std::path::PathBuf>) {
        let exe = match exe.map_or_else(|| self.proc.exe_link(target.pid), Ok) {
            Ok(exe) => exe,
            Err(e) => {
                // Seen in CI among 50 servers started at once: a server exiting as it was
                // found (a second one on a port already taken), whose link goes as it exits,
                // before it is a zombie (which discovery does not track). A live process whose
                // link fails for a moment is retried at each rescan (`retry_unreadable_redis`);
                // an exiting one is dropped when its exit is seen.
                target.exe_unreadable = true;
                target.unavailable = Some(format!(
                    "its executable link cannot be read ({e}); retried at each rescan"
                ));
                return;
            }
        };
        target.exe_unreadable = false;
        let Some(probes) = self.probes.as_ref() else {
            target.unavailable = Some("eBPF is not available".into());
            return;
        };
        probes
            .redis_attacher
            .attach(crate::ebpf::redis_attach::AttachRequest {
                pid: target.pid,
                start_ticks: target.start_ticks,
                exe: self.proc.host_path_of(target.pid, &exe),
                maps: self.proc.path().join(target.pid.to_string()).join("maps"),
                bookkeeping_time: target.bookkeeping_time,
            });
        target.unavailable = None;
        target.attach_requested = true;
    }

    /// Tries again the Redis processes whose executable link could not be read when they
    /// were found (at each rescan; the same process only: its start time must match).
    pub fn retry_unreadable_redis(&mut self) {
        let waiting: Vec<u32> = self
            .redis
            .values()
            .filter(|t| t.exe_unreadable)
            .map(|t| t.pid)
            .collect();
        for pid in waiting {
            let Some(mut target) = self.redis.remove(&pid) else {
                continue;
            };
            let same_process = self
                .proc
                .process_info(pid)
                .ok()
                .filter(|info| info.id.start_time_ticks == target.start_ticks);
            if let Some(info) = same_process {
                // The link as just read; read once more (for its error) only if it failed.
                self.request_redis_attach(&mut target, info.exe);
                if target.attach_requested {
                    tracing::info!(pid, "Redis executable link readable now: probes requested");
                }
            }
            self.redis.insert(pid, target);
        }
    }

    /// Installs the probes the worker attaching thread made for a worker (see
    /// `ebpf::worker::attach`): its libc probes (it is followed from now), or its OpenSSL ones.
    pub fn install_worker_probes(&mut self, answer: crate::ebpf::worker::attach::Answer) {
        if let Some(probes) = self.probes.as_mut() {
            let proc = &self.proc;
            let pid = answer.pid();
            probes
                .worker
                .install(&mut probes.ebpf, answer, || proc.socket_peers(pid));
        }
    }

    /// Installs what the attaching thread prepared for a Redis process, unless the process
    /// is gone meanwhile (its release is already on its way to the thread).
    pub fn install_redis_probes(&mut self, attached: crate::ebpf::redis_attach::Attached) {
        let Some(target) = self.redis.get_mut(&attached.pid) else {
            return;
        };
        if target.start_ticks != attached.start_ticks
            || !target.attach_requested
            || target.binary.is_some()
        {
            return;
        }
        let Some(probes) = self.probes.as_mut() else {
            return;
        };
        let probed = match attached.outcome {
            Ok(probed) => probed,
            Err(e) => {
                target.unavailable = Some(e);
                return;
            }
        };
        let binary = &probed.binary;
        target.binary = Some(binary.id);
        target.family = binary.family;
        let process = match probed.process {
            Ok(process) => process,
            Err(why) => {
                target.unavailable = Some(why);
                return;
            }
        };
        if let crate::redis::unblock_paths::UnblockCoverage::Bypassed(why) = &binary.unblock {
            target.unblock_bypassed = Some(why.clone());
        }
        target.points = match probed.points {
            Some(points) => points,
            None => probes
                .redis
                .attach_per_uprobe(&mut probes.ebpf, target.pid, binary),
        };
        probes.redis.register(target.pid, process);
        let summary: Vec<String> = target
            .points
            .iter()
            .map(|(s, st)| match st {
                PointState::AttachFailed(e) => format!("{s}=attach_failed ({e})"),
                other => format!("{s}={}", other.label()),
            })
            .collect();
        tracing::info!(
            pid = target.pid,
            port = target.port,
            binary = %binary.path.display(),
            layout = binary.family.map(|f| f.describe()).unwrap_or("no blockForKeys: not a Redis this agent knows"),
            unblock = ?binary.unblock,
            points = %summary.join(" "),
            "Redis blocking probes"
        );
    }

    /// The Redis processes with no known port yet (picked up before they bound one).
    fn unresolved_redis(&self) -> Vec<u32> {
        self.redis
            .values()
            .filter(|t| t.port.is_none())
            .map(|t| t.pid)
            .collect()
    }

    /// Records the ports found for Redis processes that had none.
    pub fn set_redis_addresses(&mut self, found: Vec<(u32, crate::proc_walk::ListenAddress)>) {
        for (pid, (port, address)) in found {
            if let Some(target) = self.redis.get_mut(&pid).filter(|t| t.port.is_none()) {
                target.port = Some(port);
                target.address = address;
                tracing::info!(pid, port, address = ?address, "Redis listening address found");
            }
        }
    }

    /// What to read from /proc for the Redis processes with no port yet (off the lock).
    pub fn address_walk(&self) -> ProcWalk {
        ProcWalk {
            proc: self.proc.clone(),
            processes: Vec::new(),
            unresolved_redis: self.unresolved_redis(),
            maps: None,
        }
    }

    /// What a snapshot reads from /proc (off the lock): every tracked process's threads and
    /// the Redis processes with no port yet.
    pub fn snapshot_walk(&self) -> ProcWalk {
        ProcWalk {
            proc: self.proc.clone(),
            processes: self.discovery.tracked().cloned().collect(),
            unresolved_redis: self.unresolved_redis(),
            maps: self.probes.as_ref().map(|p| p.map_fds.clone()),
        }
    }

    /// Keeps the kernel's view of Unix time current (blocking timeouts are Unix ms).
    /// Also prunes kernel entries that only age (done at each rescan).
    pub fn refresh_clock(&mut self) {
        if let Some(probes) = self.probes.as_mut() {
            probes.redis.set_clock_offset(clock_offset_ns());
            probes.sched.prune_recent_execs();
        }
    }

    fn process_attributes(p: &TrackedProcess) -> Attributes {
        vec![
            ("process.group", AttrValue::from(p.group())),
            (
                "process.executable.name",
                AttrValue::from(p.executable_name()),
            ),
            ("process.pid", AttrValue::from(p.pid())),
        ]
    }

    fn process_start(&self, p: &TrackedProcess) -> SystemTime {
        self.boot_time
            .map(|boot| {
                boot + Duration::from_secs_f64(
                    p.info.id.start_time_ticks as f64 / self.ticks_per_second,
                )
            })
            .unwrap_or(p.since)
    }

    /// Reads everything and returns the metrics. Processes found gone are dropped.
    pub fn snapshot(&mut self) -> Snapshot {
        let walked = self.snapshot_walk().read();
        self.snapshot_from(walked)
    }

    /// Clears the kernel's blocked-client entries that no block needs any more
    /// ([`crate::ebpf::redis::RedisMaps::sweep`]). Runs before every snapshot, for the gauges
    /// and the missed unblocks, and at every rescan, so that entries go without a scraper too.
    pub fn sweep_blocked_clients(&mut self) {
        let Some(probes) = self.probes.as_mut() else {
            return;
        };
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let swept = probes
            .redis
            .sweep(now_ms, crate::ebpf::redis::monotonic_ns());
        if swept > 0 {
            tracing::warn!(clients = swept, "blocked clients still recorded after their deadline: their unblock was not seen; removed and counted as missed unblocks");
        }
    }

    /// The metrics, from what [`AgentState::snapshot_walk`] read and the kernel's maps.
    /// Processes found gone are dropped; processes no longer tracked since the walk are
    /// skipped.
    pub fn snapshot_from(&mut self, walked: ProcWalked) -> Snapshot {
        let mut snapshot = Snapshot::default();
        let mut gone = Vec::new();

        for (p, samples) in walked.threads {
            let pid = p.pid();
            let still_tracked = self
                .discovery
                .get(pid)
                .is_some_and(|now| now.info.id.start_time_ticks == p.info.id.start_time_ticks);
            if !still_tracked {
                continue;
            }
            let p = &p;
            let samples = match samples {
                Ok((samples, vanished_threads)) => {
                    *self.stats.read_errors.entry("vanished").or_default() += vanished_threads;
                    samples
                }
                Err(e) => {
                    self.stats.count_read(&e);
                    gone.push(pid);
                    continue;
                }
            };
            // The pid may name another process by now.
            if samples
                .iter()
                .find(|s| s.tid == pid)
                .is_some_and(|main| main.start_time_ticks != p.info.id.start_time_ticks)
            {
                gone.push(pid);
                continue;
            }
            let start = self.process_start(p);
            let cpu = self.cpu.entry(pid).or_default();
            cpu.update(&samples, self.max_thread_names);
            if self.redis.contains_key(&pid) {
                // The main thread's name (tid = pid) labels its CPU; I/O and bio threads
                // have names of their own.
                let main = samples
                    .iter()
                    .find(|s| s.tid == pid)
                    .and_then(|s| {
                        cpu.totals()
                            .get(cpu.label_for(&s.name, self.max_thread_names.max(1) - 1))
                    })
                    .map(|t| (t.user + t.system) as f64 / self.ticks_per_second);
                if let Some(seconds) = main {
                    self.redis_main_cpu.insert(pid, seconds);
                }
            }
            let base = Self::process_attributes(p);
            for (thread, ticks) in cpu.totals() {
                for (mode, value) in [("user", ticks.user), ("system", ticks.system)] {
                    let mut attributes = base.clone();
                    attributes.push(("thread.name", AttrValue::from(thread.as_str())));
                    attributes.push(("cpu.mode", AttrValue::from(mode)));
                    snapshot.push(
                        catalog::THREAD_CPU_TIME,
                        Point {
                            attributes,
                            start_time: start,
                            value: PointValue::Counter(value as f64 / self.ticks_per_second),
                        },
                    );
                }
            }
        }

        self.sweep_blocked_clients();
        self.set_redis_addresses(walked.addresses);
        let redis_readings = self
            .probes
            .as_mut()
            .map(|probes| probes.redis.read())
            .unwrap_or_default();
        for target in self.redis.values_mut() {
            target.emit(redis_readings.get(&target.pid), &mut snapshot);
        }

        if let Some(probes) = self.probes.as_mut() {
            probes.worker.detach_idle_syscalls(&mut probes.ebpf);
            probes.worker.note_tls_connections();
            // Connections that predate tracking: look their peers up in /proc.
            for pid in probes.worker.unknown_peer_pids() {
                let sockets = self.proc.socket_peers(pid);
                probes.worker.seed_peers(pid, sockets);
            }
        }
        if let Some(probes) = &self.probes {
            let readings = probes.worker.read();
            let connections = probes.worker.connections();
            let discovery = &self.discovery;
            let group_of = |tgid: u32| match discovery.get(tgid).map(|p| &p.class) {
                Some(Classification::Worker { group }) => Some(group.clone()),
                _ => None,
            };
            let counts = self
                .worker
                .advise_counts(&readings, &connections, &group_of);
            self.worker
                .emit(&readings, &connections, &group_of, &counts, &mut snapshot);
            self.record_advise_counts(counts, &redis_readings);
        }

        if let Some(probes) = &self.probes {
            for ((tgid, thread), hists) in probes.sched.histograms() {
                let Some(p) = self.discovery.get(tgid) else {
                    continue;
                };
                let label = self
                    .cpu
                    .get(&tgid)
                    .map(|c| {
                        c.label_for(&thread, self.max_thread_names.max(1) - 1)
                            .to_string()
                    })
                    .unwrap_or(thread);
                let mut attributes = Self::process_attributes(p);
                attributes.push(("thread.name", AttrValue::from(label)));
                for (descriptor, h) in [
                    (catalog::THREAD_RUNQUEUE_DELAY, &hists.runqueue_delay),
                    (catalog::THREAD_ONCPU_DURATION, &hists.on_cpu),
                ] {
                    push_histogram(
                        &mut snapshot,
                        descriptor,
                        attributes.clone(),
                        p.since,
                        log2_to_seconds(h),
                    );
                }
            }
        }

        for pid in gone {
            let (changes, errors) = self.discovery.check(pid);
            self.stats.count_scan(&errors);
            self.apply(changes);
        }
        self.self_metrics(&mut snapshot);
        for usage in walked.map_usage {
            for (descriptor, value) in [
                (catalog::EBPF_MAP_ENTRIES, usage.entries),
                (catalog::EBPF_MAP_CAPACITY, usage.capacity),
            ] {
                snapshot.push(
                    descriptor,
                    Point {
                        attributes: vec![("map", usage.name.clone().into())],
                        start_time: UNIX_EPOCH,
                        value: PointValue::Gauge(value as f64),
                    },
                );
            }
        }
        snapshot
    }

    /// Keeps the counts `fanout advise` reads: the worker side's per server, each joined
    /// with the tracked Redis that listens on its port (a server no tracked Redis listens on
    /// is remote: listeners only).
    fn record_advise_counts(
        &mut self,
        workers: crate::worker::AdviseCounts,
        redis_readings: &BTreeMap<u32, crate::ebpf::redis::RedisReadings>,
    ) {
        self.redis_main_cpu
            .retain(|pid, _| self.redis.contains_key(pid));
        let servers = workers
            .into_iter()
            .map(|(server, groups)| {
                let port: Option<u16> = server.rsplit_once(':').and_then(|(_, p)| p.parse().ok());
                let mut local = self
                    .redis
                    .values()
                    .filter(|t| t.port.is_some() && t.port == port);
                let redis = match (local.next(), local.next()) {
                    (Some(target), None) => target.advise_counts(
                        redis_readings.get(&target.pid),
                        self.redis_main_cpu.get(&target.pid).copied().unwrap_or(0.0),
                    ),
                    // None, or two on one port (other network namespaces): not told apart.
                    _ => None,
                };
                (
                    server,
                    crate::advise::window::ServerCounts { redis, groups },
                )
            })
            .collect();
        self.advise.record(crate::advise::window::Counts {
            taken: std::time::Instant::now(),
            servers,
        });
    }

    /// The observation of the last `window` for `fanout advise` (None: since the start), as
    /// of the last snapshot; key names real or folded (`key_0`, ...).
    pub fn advise_observation(
        &self,
        window: Option<Duration>,
        names_real: bool,
    ) -> Option<crate::advise::observation::Observation> {
        if names_real {
            let name_of = |h: u64| self.worker.key_name(h).map(|n| n.to_string());
            self.advise.observation(window, true, &name_of)
        } else {
            // Stable within one answer: the n-th distinct hash met is key_n.
            let folded = std::cell::RefCell::new(HashMap::<u64, usize>::new());
            let name_of = |h: u64| {
                self.worker.key_name(h)?;
                let mut f = folded.borrow_mut();
                let n = f.len();
                Some(format!("key_{}", *f.entry(h).or_insert(n)))
            };
            self.advise.observation(window, false, &name_of)
        }
    }

    fn self_metrics(&self, snapshot: &mut Snapshot) {
        let epoch = UNIX_EPOCH;
        let mut per_group: BTreeMap<&str, u64> = BTreeMap::new();
        for p in self.discovery.tracked() {
            *per_group.entry(p.group()).or_default() += 1;
        }
        for (group, n) in per_group {
            snapshot.push(
                catalog::PROCESSES_TRACKED,
                Point {
                    attributes: vec![("process.group", group.into())],
                    start_time: epoch,
                    value: PointValue::Gauge(n as f64),
                },
            );
        }
        for status in &self.probe_status {
            snapshot.push(
                catalog::PROBES_ATTACHED,
                Point {
                    attributes: vec![("probe", status.program.into())],
                    start_time: epoch,
                    value: PointValue::Gauge(if status.attached { 1.0 } else { 0.0 }),
                },
            );
        }
        for (kind, n) in &self.stats.read_errors {
            snapshot.push(
                catalog::PROC_READ_ERRORS,
                Point {
                    attributes: vec![("kind", (*kind).into())],
                    start_time: epoch,
                    value: PointValue::Counter(*n as f64),
                },
            );
        }
        snapshot.push(
            catalog::EVENTS_LOST,
            Point {
                attributes: vec![("reason", "keyset_unparsable".into())],
                start_time: epoch,
                value: PointValue::Counter(self.worker.keyset_errors as f64),
            },
        );
        snapshot.push(
            catalog::WORKER_KEY_LISTS,
            Point {
                attributes: vec![],
                start_time: epoch,
                value: PointValue::Counter(self.worker.keysets_received as f64),
            },
        );
        let folded: u64 =
            self.stats.folded_threads + self.cpu.values().map(|c| c.folded_threads).sum::<u64>();
        snapshot.push(
            catalog::THREAD_NAMES_OVERFLOW,
            Point {
                attributes: vec![],
                start_time: epoch,
                value: PointValue::Counter(folded as f64),
            },
        );
        if let Some(probes) = &self.probes {
            for (reason, count) in [
                ("redis_on_node", probes.worker.unfollowed()),
                ("tls", probes.worker.unfollowed_tls()),
                ("probe_backlog", probes.worker.held_back()),
            ] {
                snapshot.push(
                    catalog::WORKERS_UNFOLLOWED,
                    Point {
                        attributes: vec![("reason", reason.into())],
                        start_time: epoch,
                        value: PointValue::Gauge(count as f64),
                    },
                );
            }
            snapshot.push(
                catalog::PROBES_CLOSING,
                Point {
                    attributes: vec![],
                    start_time: epoch,
                    value: PointValue::Gauge(crate::ebpf::link_closer::closes_pending() as f64),
                },
            );
            for (via, call, count) in probes.worker.probes_off() {
                snapshot.push(
                    catalog::WORKERS_PROBE_OFF,
                    Point {
                        attributes: vec![("via", via.into()), ("call", call.into())],
                        start_time: epoch,
                        value: PointValue::Gauge(count as f64),
                    },
                );
            }
            for (reason, counter) in [
                ("histogram_map_full", ProbeCounter::HistogramMapFull),
                (
                    "thread_state_insert_failed",
                    ProbeCounter::ThreadStateInsertFailed,
                ),
                ("lifecycle_ring_full", ProbeCounter::LifecycleEventsLost),
                (
                    "blocked_client_map_full",
                    ProbeCounter::BlockedClientInsertFailed,
                ),
                ("resp_desync", ProbeCounter::RespDesync),
                ("keyset_ring_full", ProbeCounter::KeysetLost),
                ("overlapping_pop", ProbeCounter::OverlappingPop),
                ("connection_map_full", ProbeCounter::ConnInsertFailed),
                ("served_keys_map_full", ProbeCounter::ServedKeysFull),
                ("sched_switch_missed", ProbeCounter::SchedSwitchMissed),
            ] {
                snapshot.push(
                    catalog::EVENTS_LOST,
                    Point {
                        attributes: vec![("reason", reason.into())],
                        start_time: epoch,
                        value: PointValue::Counter(probes.sched.counter(counter) as f64),
                    },
                );
            }
        }
    }
}

fn push_histogram(
    snapshot: &mut Snapshot,
    descriptor: crate::metrics::Descriptor,
    attributes: Attributes,
    start: SystemTime,
    value: crate::metrics::HistogramValue,
) {
    // Two kernel keys can fold into one label ("other"): merge them.
    if let Some(metric) = snapshot
        .metrics
        .iter_mut()
        .find(|m| m.descriptor.name == descriptor.name)
    {
        if let Some(existing) = metric
            .points
            .iter_mut()
            .find(|p| p.attributes == attributes)
        {
            if let PointValue::Histogram(h) = &mut existing.value {
                for (a, b) in h.counts.iter_mut().zip(value.counts.iter()) {
                    *a += b;
                }
                h.sum += value.sum;
                h.count += value.count;
                return;
            }
        }
    }
    snapshot.push(
        descriptor,
        Point {
            attributes,
            start_time: start,
            value: PointValue::Histogram(value),
        },
    );
}

/// The agent as shared between the HTTP server, the exporter and the event loop.
pub struct SharedAgent {
    /// A fair lock: a scrape waiting for it gets it at the holder's next release, where a
    /// std Mutex let the event loop take it back at once for each of 50 new processes.
    /// Take it with [`SharedAgent::lock`].
    state: parking_lot::Mutex<AgentState>,
    pub resource: Attributes,
    pub ready: AtomicBool,
    /// Failed OTLP pushes.
    pub export_failures: Arc<AtomicU64>,
    /// Scrapes of /metrics that failed to render.
    render_failures: AtomicU64,
    /// How long each site waited for the state lock.
    lock_waits: LockWaits,
    /// The latest snapshot and when it was finished: requests that arrive while one is being
    /// taken share it (several scrapers and the OTLP push cost one walk of /proc and the maps).
    latest: parking_lot::Mutex<Option<(std::time::Instant, Arc<Snapshot>)>>,
    /// Reads new processes for discovery before the state is locked (see
    /// [`crate::discovery::ProcessReader`]).
    pub reader: crate::discovery::ProcessReader,
}

impl SharedAgent {
    pub fn new(state: AgentState, resource: Attributes) -> Self {
        Self {
            reader: state.discovery.reader(),
            state: parking_lot::Mutex::new(state),
            resource,
            ready: Default::default(),
            export_failures: Default::default(),
            render_failures: Default::default(),
            lock_waits: Default::default(),
            latest: Default::default(),
        }
    }

    /// Takes the state lock for `site`, timing the wait.
    pub fn lock(&self, site: &'static str) -> StateGuard<'_, AgentState> {
        StateGuard::take(&self.state, site, &self.lock_waits)
    }

    /// A snapshot at most one snapshot's time older than this call: the one being taken when
    /// it arrived (single flight: concurrent scrapes and pushes share it), else a new one.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        let asked = std::time::Instant::now();
        let mut latest = self.latest.lock();
        if let Some((finished, snapshot)) = latest.as_ref() {
            // Finished after this call arrived: it was being taken meanwhile.
            if *finished >= asked {
                return snapshot.clone();
            }
        }
        let snapshot = Arc::new(self.take_snapshot());
        *latest = Some((std::time::Instant::now(), snapshot.clone()));
        snapshot
    }

    fn take_snapshot(&self) -> Snapshot {
        let walk = self.lock("snapshot_walk").snapshot_walk();
        let walked = walk.read();
        let mut snapshot = self.lock("snapshot").snapshot_from(walked);
        for (exporter, failures) in [
            ("otlp", &*self.export_failures),
            ("prometheus", &self.render_failures),
        ] {
            snapshot.push(
                catalog::EXPORT_FAILURES,
                Point {
                    attributes: vec![("exporter", exporter.into())],
                    start_time: UNIX_EPOCH,
                    value: PointValue::Counter(failures.load(Ordering::Relaxed) as f64),
                },
            );
        }
        for (site, value) in self.lock_waits.histograms() {
            snapshot.push(
                catalog::STATE_LOCK_WAIT,
                Point {
                    attributes: vec![("site", site.into())],
                    start_time: UNIX_EPOCH,
                    value: PointValue::Histogram(value),
                },
            );
        }
        snapshot
    }
}

impl MetricsSource for SharedAgent {
    fn render_prometheus(&self) -> String {
        prometheus::render(&self.snapshot(), &self.resource)
    }
    fn render_json(&self) -> String {
        crate::metrics::json::render(&self.snapshot(), &self.resource, SystemTime::now())
    }
    fn render_advise(&self, window: Option<Duration>, names_real: bool) -> String {
        // A fresh snapshot first: the counts are taken with it.
        self.snapshot();
        let observation = self.lock("advise").advise_observation(window, names_real);
        let observation = observation.unwrap_or_else(|| crate::advise::observation::Observation {
            version: crate::advise::observation::VERSION,
            names_real,
            since_start: true,
            ..Default::default()
        });
        serde_json::to_string(&observation).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
    fn count_render_failure(&self) {
        self.render_failures.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{default_rule_specs, RuleSet};

    use crate::discovery::tests::proc_with_redis;

    /// A copy of the fixture tree's Redis (pid 100) whose exe link is missing, as a live
    /// process's link was once in CI.
    fn proc_with_unreadable_redis_exe() -> tempfile::TempDir {
        let root = proc_with_redis();
        std::fs::remove_file(root.path().join("100/exe")).unwrap();
        root
    }

    /// The agent's state after its first scan of `root` (without eBPF).
    fn scanned_state(root: &std::path::Path) -> AgentState {
        let proc = ProcRoot::new(root);
        let rules = RuleSet::new(&default_rule_specs()).unwrap();
        let discovery = Discovery::new(proc.clone(), rules, 1);
        let listeners = ListenerOptions {
            export_key_names: false,
            max_keys_per_group: 10,
        };
        let mut state = AgentState::new(proc, discovery, None, Vec::new(), 10, listeners);
        let (changes, _) = state.discovery.rescan().unwrap();
        state.apply(changes);
        state
    }

    #[test]
    fn a_redis_whose_exe_link_was_unreadable_is_tried_again_at_the_next_rescan() {
        let root = proc_with_unreadable_redis_exe();
        let mut state = scanned_state(root.path());
        let target = &state.redis[&100];
        assert!(target.exe_unreadable);
        let reason = target.unavailable.as_deref().unwrap();
        assert!(
            reason.starts_with("its executable link cannot be read (No such file"),
            "{reason}"
        );
        assert!(reason.ends_with("retried at each rescan"), "{reason}");

        // Still unreadable: still waiting, nothing else changed.
        state.retry_unreadable_redis();
        assert!(state.redis[&100].exe_unreadable);

        // Readable now: the retry goes on to attaching (here, with no eBPF, to saying so).
        std::os::unix::fs::symlink("/usr/bin/redis-server", root.path().join("100/exe")).unwrap();
        state.retry_unreadable_redis();
        let target = &state.redis[&100];
        assert!(!target.exe_unreadable);
        assert_eq!(target.unavailable.as_deref(), Some("eBPF is not available"));
    }

    #[test]
    fn a_retry_does_not_take_a_new_process_with_the_same_pid_for_the_old_one() {
        let root = proc_with_unreadable_redis_exe();
        let mut state = scanned_state(root.path());
        assert!(state.redis[&100].exe_unreadable);

        // Pid 100 now belongs to a process started later (field 22 of stat, start time).
        let stat_path = root.path().join("100/stat");
        let stat = std::fs::read_to_string(&stat_path).unwrap();
        std::fs::write(&stat_path, stat.replace(" 64108 ", " 99999 ")).unwrap();
        std::os::unix::fs::symlink("/usr/bin/redis-server", root.path().join("100/exe")).unwrap();
        state.retry_unreadable_redis();
        assert!(
            state.redis[&100].exe_unreadable,
            "left to discovery to replace"
        );
    }

    /// A rescan finds pid 100's Redis gone and queues its Removed; before that is applied, an
    /// exec event's check finds a new Redis at pid 100 and sets it up at once. The rescan's
    /// Removed, applied last, must not tear the new one down: discovery still holds it, so
    /// nothing would ever set it up again.
    #[test]
    fn a_late_removed_leaves_the_new_process_at_its_pid_set_up() {
        let root = proc_with_redis();
        let mut state = scanned_state(root.path());
        assert_eq!(state.redis[&100].start_ticks, 64108);

        let away = root.path().join("100.away");
        std::fs::rename(root.path().join("100"), &away).unwrap();
        let (queued, _) = state.discovery.rescan().unwrap();
        assert!(matches!(queued.as_slice(), [Change::Removed(p)] if p.pid() == 100));

        // Pid 100 again, now a process started later (field 22 of stat, start time).
        std::fs::rename(&away, root.path().join("100")).unwrap();
        let stat_path = root.path().join("100/stat");
        let stat = std::fs::read_to_string(&stat_path).unwrap();
        std::fs::write(&stat_path, stat.replace(" 64108 ", " 99999 ")).unwrap();
        let (checked, _) = state.discovery.check(100);
        state.apply(checked);
        assert_eq!(state.redis[&100].start_ticks, 99999);

        for change in queued {
            assert!(
                state.discovery.still_holds(&change),
                "the pid is another's now"
            );
            state.apply(vec![change]);
        }
        assert_eq!(state.redis[&100].start_ticks, 99999, "still set up");
        assert!(state.cpu.contains_key(&100));
        assert!(
            state.applied.mend(state.discovery.tracked()).is_empty(),
            "set-up and discovery agree"
        );
    }

    /// A change lost between discovery and the set-up (none is known now: this is the net
    /// under the ones not found yet) is mended at the end of the next rescan, both ways.
    #[test]
    fn a_change_that_went_astray_is_mended_at_the_rescan() {
        let root = proc_with_redis();
        let mut state = scanned_state(root.path());
        assert!(state.redis.contains_key(&100) && state.cpu.contains_key(&100));

        // Dropped from discovery, its Removed lost: torn down at the mend.
        let _lost = state.discovery.forget(100);
        state.mend_tracking();
        assert!(!state.redis.contains_key(&100) && !state.cpu.contains_key(&100));

        // Held again, its Added lost: set up at the mend.
        let _lost = state.discovery.check(100);
        state.mend_tracking();
        assert!(state.redis.contains_key(&100) && state.cpu.contains_key(&100));
        state.mend_tracking();
        assert!(state.redis.contains_key(&100), "nothing left to mend");
    }
}
