//! Start-up and the event loop of `fanout run`.

use std::{
    os::fd::AsRawFd,
    sync::{atomic::Ordering, Arc},
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};

use agent_common::lifecycle::LifecycleKind;

use crate::{
    agent::{AgentState, SharedAgent},
    config::Config,
    discovery::Discovery,
    ebpf::{self, ProbeStatus, Probes, Rings},
    export::{
        http_server,
        otlp::{run_exporter, OtlpSender},
    },
    proc_reader::ProcRoot,
};

type Started = (Option<Probes>, Option<Rings>, Vec<ProbeStatus>);

/// Loads and attaches the probes, or says why not. Without probes the agent still measures
/// per-thread CPU from /proc, unless `--require-ebpf` was given.
fn start_probes(config: &Config) -> anyhow::Result<Started> {
    let caps = crate::privileges::Capabilities::current();
    if let Some(caps) = caps {
        let missing = caps.missing();
        if !missing.is_empty() {
            tracing::warn!(missing = %crate::privileges::describe(&missing), "the agent lacks capabilities");
        }
    }
    let attempt = || -> Result<(Probes, Rings), String> {
        if let Some(caps) = caps.filter(|c| !c.ebpf_possible()) {
            let missing: Vec<_> = caps.missing().into_iter().filter(|c| c.ebpf).collect();
            return Err(format!("missing {}", crate::privileges::describe(&missing)));
        }
        ebpf::ensure_tracefs()?;
        Probes::start().map_err(|e| e.to_string())
    };
    match attempt() {
        Ok((probes, ring)) => {
            for status in probes.status.iter().filter(|s| !s.attached) {
                tracing::warn!(
                    probe = status.program,
                    error = status.error.as_deref().unwrap_or(""),
                    "probe not attached"
                );
            }
            if config.require_ebpf && probes.status.iter().any(|s| !s.attached) {
                anyhow::bail!("--require-ebpf: not every eBPF program could be attached (see the warnings above)");
            }
            let status = probes.status.clone();
            if probes.any_attached() {
                Ok((Some(probes), Some(ring), status))
            } else {
                Ok((None, None, status))
            }
        }
        Err(message) => {
            if config.require_ebpf {
                anyhow::bail!("--require-ebpf: {message}");
            }
            tracing::warn!(error = %message, "eBPF unavailable: measuring per-thread CPU from /proc only; run-queue delay, blocking probes and exec/exit events are off");
            let status = ebpf::sched::default_programs()
                .map(|program| ProbeStatus {
                    program,
                    attached: false,
                    error: Some(message.clone()),
                })
                .collect();
            Ok((None, None, status))
        }
    }
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    let proc = ProcRoot::new(&config.proc_root);
    proc.pids()
        .with_context(|| format!("cannot list processes in {}", config.proc_root.display()))?;

    let (mut probes, ring, probe_status) = start_probes(&config)?;
    if let Some(p) = probes.as_mut() {
        p.redis.bookkeeping_time = config.redis_bookkeeping_time;
        p.worker.disabled = !config.worker_probes;
        p.worker.mode = config.worker_probe_mode;
        p.worker.syscalls_beside_redis = config.syscall_probes_beside_redis;
        p.worker.preload_uprobe_programs();
        p.worker.max_libc_workers = config.max_libc_workers;
        p.worker.follow_tls = config.tls_probes;
    }
    let live: Vec<&str> = probe_status
        .iter()
        .filter(|s| s.attached)
        .map(|s| s.program)
        .collect();
    tracing::info!(probes = ?live, "eBPF programs attached: {}/{}", live.len(), probe_status.len());

    let discovery = Discovery::new(proc.clone(), config.rules.clone(), std::process::id());
    let mut state = AgentState::new(
        proc,
        discovery,
        probes,
        probe_status,
        config.max_thread_names_per_process,
        config.listeners,
    );
    state.refresh_clock();
    let (changes, errors) = state.discovery.rescan().context("initial /proc scan")?;
    state.stats.count_scan(&errors);
    state.apply(changes);
    let count = state.discovery.tracked().count();
    tracing::info!(processes = count, "initial scan done");

    let shared = Arc::new(SharedAgent::new(
        state,
        crate::resource::detect(&|k| std::env::var(k).ok(), crate::resource::hostname()),
    ));

    if let Some(addr) = config.prometheus_listen {
        let (local, _server) =
            http_server::serve_with(addr, shared.clone(), config.web_config.clone())
                .await
                .with_context(|| format!("cannot listen on {addr} for the Prometheus endpoint"))?;
        let web = config.web_config.as_ref();
        tracing::info!(
            address = %local,
            tls = web.is_some_and(|w| w.tls.is_some()),
            basic_auth_users = web.map_or(0, |w| w.users.len()),
            "serving Prometheus metrics at /metrics"
        );
    }

    if let Some(otlp) = config.otlp.clone() {
        tracing::info!(endpoint = %otlp.endpoint, protocol = ?otlp.protocol, interval = ?otlp.interval, "pushing OTLP metrics");
        let interval = otlp.interval;
        let sender = OtlpSender::new(otlp)?;
        let source = shared.clone();
        let failures = shared.export_failures.clone();
        tokio::spawn(run_exporter(sender, interval, failures, move || {
            // The snapshot reads /proc synchronously; it is short and bounded by the number of
            // tracked threads, and this task does nothing else meanwhile.
            (
                tokio::task::block_in_place(|| source.snapshot()),
                source.resource.clone(),
            )
        }));
    }

    if let Some(rings) = ring {
        let agent = shared.clone();
        let mut attached = rings.redis_attached;
        tokio::spawn(async move {
            while let Some(one) = attached.recv().await {
                agent.lock("install_redis_probes").install_redis_probes(one);
            }
        });
        let agent = shared.clone();
        let mut attached = rings.worker_attached;
        tokio::spawn(async move {
            while let Some(one) = attached.recv().await {
                agent
                    .lock("install_worker_probes")
                    .install_worker_probes(one);
            }
        });
        let agent = shared.clone();
        tokio::spawn(follow_ring(rings.lifecycle, "lifecycle", move |records| {
            on_lifecycle(&agent, records)
        }));
        let agent = shared.clone();
        tokio::spawn(follow_ring(rings.keysets, "keyset", move |records| {
            on_keysets(&agent, records)
        }));
    }
    shared.ready.store(true, Ordering::Relaxed);

    let mut rescan = tokio::time::interval(config.rescan_interval);
    rescan.tick().await;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut narrowing = tokio::time::interval(NARROWING_TICK);
    narrowing.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = narrowing.tick() => shared.lock("narrowing").adjust_narrowed_probes(),
            _ = rescan.tick() => {
                let walk = shared.lock("address_walk").address_walk();
                let addresses = walk.read().addresses;
                // /proc is read without the lock (see `ProcessReader`); only what changed
                // is read again under it.
                let readings = shared.reader.read_all();
                let changes = {
                    let mut state = shared.lock("rescan");
                    state.refresh_clock();
                    state.set_redis_addresses(addresses);
                    state.retry_unreadable_redis();
                    match readings {
                        Ok(readings) => {
                            let (changes, errors) = state.discovery.rescan_from(readings);
                            state.stats.count_scan(&errors);
                            changes
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "rescan of /proc failed");
                            Vec::new()
                        }
                    }
                };
                // One change at a time: a scrape waits for at most one process's set-up.
                // Lifecycle events are handled in between, so each change is applied only if
                // discovery still holds it (`still_holds`).
                for change in changes {
                    let mut state = shared.lock("rescan_apply");
                    if state.discovery.still_holds(&change) {
                        state.apply(vec![change]);
                    }
                }
                // What is set up now matches discovery, unless a change went astray; and no
                // kernel filter entry outlives its process.
                shared.lock("rescan_mend").mend_tracking();
                shared.lock("blocked_sweep").sweep_blocked_clients();
                // Give freed heap pages back to the kernel (a burst of processes or scrapes
                // otherwise stays in the agent's RSS). Milliseconds at most, every rescan.
                // SAFETY: malloc_trim only releases free memory of the allocator.
                unsafe { libc::malloc_trim(0) };
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    tracing::info!("shutting down; probes detach as the agent exits");
    Ok(())
}

/// How often workers' `write()`/`read()` probes are looked at (`ebpf::worker::narrowing`): a new
/// connection of a worker whose probe is out waits at most this long for it to come back.
const NARROWING_TICK: std::time::Duration = std::time::Duration::from_secs(1);

/// How often the ring buffers are read. The kernel side submits records without waking the
/// reader (`BPF_RB_NO_WAKEUP`): a wakeup is an irq_work self-IPI, which under this project's
/// hypervisor is a VM exit that cost about 25 us inside `sched_process_exec` for every exec on
/// the node (0.8 us without). Reading every 10 ms instead adds at most that to a pick-up, and
/// costs the agent about 100 cheap wakeups a second.
const RING_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// Reads a ring buffer every [`RING_POLL`], handing each non-empty batch to `handle`.
async fn follow_ring(
    mut ring: RingBuf<MapData>,
    name: &'static str,
    mut handle: impl FnMut(Vec<Vec<u8>>),
) {
    tracing::debug!(ring = name, fd = ring.as_raw_fd(), "following ring buffer");
    let mut tick = tokio::time::interval(RING_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut records = Vec::new();
        while let Some(item) = ring.next() {
            records.push(item.to_vec());
        }
        if !records.is_empty() {
            handle(records);
        }
    }
}

/// When a forked child is looked at, after its fork event: a child that execs right away
/// (a worker shelling out) is then already its new program, and one that sets its title or
/// calls setsid() right after fork (Redis's BGSAVE child, a daemonizing redis-server) has
/// done so. A child not tracked at the first look is looked at once more, in case it had not
/// run yet (a loaded node); the /proc rescan remains the safety net.
const FORK_LOOKS: [std::time::Duration; 2] = [
    std::time::Duration::from_millis(100),
    std::time::Duration::from_millis(900),
];

/// Exec, fork and exit events: check, check a little later, or drop the pids they name.
fn on_lifecycle(shared: &Arc<SharedAgent>, records: Vec<Vec<u8>>) {
    let mut forked = Vec::new();
    for event in records
        .iter()
        .filter_map(|r| ebpf::sched::decode_lifecycle(r))
    {
        // An exec'd process is read before the lock is taken (see `ProcessReader`), and
        // the lock is taken per event: 50 processes started at once are set up one after
        // the other, with scrapes answered in between.
        let exec = matches!(event.kind(), Some(LifecycleKind::Exec));
        let reading = exec.then(|| shared.reader.read(event.pid));
        let mut state = shared.lock("lifecycle");
        match event.kind() {
            Some(LifecycleKind::Exec) => {
                if let Some(reading) = reading {
                    check_reading(&mut state, reading)
                }
            }
            Some(LifecycleKind::Fork) => forked.push(event.pid),
            Some(LifecycleKind::Exit) => {
                if let Some(change) = state.discovery.forget(event.pid) {
                    state.apply(vec![change]);
                }
            }
            None => {}
        }
    }
    if !forked.is_empty() {
        tracing::debug!(pids = ?forked, "forked processes to look at");
        tokio::spawn(look_at_forked(shared.clone(), forked));
    }
}

/// Re-examines one pid from what was read of it; short-lived processes vanish before they
/// are read: normal, not counted.
fn check_reading(state: &mut crate::agent::AgentState, reading: crate::discovery::Reading) {
    let (changes, errors) = state.discovery.check_reading(reading);
    *state.stats.read_errors.entry("failed").or_default() += errors.failed;
    state.apply(changes);
}

/// Checks forked children at [`FORK_LOOKS`], as long as they are not tracked and exist.
async fn look_at_forked(shared: Arc<SharedAgent>, mut pids: Vec<u32>) {
    for delay in FORK_LOOKS {
        tokio::time::sleep(delay).await;
        let readings: Vec<_> = pids.iter().map(|&pid| shared.reader.read(pid)).collect();
        let mut state = shared.lock("forked");
        for reading in readings {
            check_reading(&mut state, reading);
        }
        let proc = state.proc.clone();
        pids.retain(|&pid| {
            !state.discovery.is_tracked(pid) && proc.path().join(pid.to_string()).exists()
        });
        if pids.is_empty() {
            return;
        }
    }
    tracing::debug!(pids = ?pids, "forked processes not tracked");
}

/// Key lists of worker connections.
fn on_keysets(shared: &SharedAgent, records: Vec<Vec<u8>>) {
    let mut state = shared.lock("keysets");
    for record in records {
        let size = std::mem::size_of::<agent_common::worker::KeysetHeader>();
        if record.len() < size {
            continue;
        }
        // SAFETY: length checked; the header is plain old data, read unaligned.
        let header: agent_common::worker::KeysetHeader =
            unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
        let len = (header.len as usize).min(record.len() - size);
        state.worker.on_keyset(&header, &record[size..size + len]);
    }
}
