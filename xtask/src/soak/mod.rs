//! `cargo xtask soak`: the agent on real parts while faults are injected on a schedule, with
//! its resources recorded over time and what it must survive checked as figures.
//!
//! The run, in phases:
//! 1. `warm-up`: four Redis servers (one that lives through the run, one in the foreground,
//!    one daemonized, one in its own mount and PID namespace) under plain and blocking load,
//!    the OTLP collector up, Prometheus scraping the agent every second.
//! 2. The agent is killed with SIGKILL; nothing it loaded may stay in the kernel. It is
//!    started again; 50 Redis servers are started and killed at once (the burst) while
//!    /metrics is scraped every 20 ms; after a second warm-up the baseline is taken and the
//!    exact client starts on the long-lived Redis (its calls tallied client-side).
//! 3. `churn`: the three other servers restarted in turn (each once per period), a Sidekiq
//!    fleet started and stopped, a parent forking a child per job, a raw client closing
//!    connections mid-pop, the collector cycling up, down and black hole.
//! 4. `quiet`: the churn stops, the load goes on; the final sample must be back at the
//!    baseline. The agent's blocking counts of the long-lived Redis are compared with the
//!    tally, then the agent is stopped and the kernel must be as before it started.

mod collector;
mod load;
mod report;
mod sample;
mod servers;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use integration_tests::{free_port, http_get, Agent, Redis, RedisBuild, Sidekiq};

use crate::agent_log;
use collector::{Collector, Mood};
use sample::Sample;
use servers::{Server, Style};

/// How long the clients are paused before the baseline and the final sample: a second for
/// reads in flight, plus the time the agent keeps a client's blocked-client entry after its
/// block ended (`ENDED_KEEP_NS` in the agent's `ebpf::blocked_clients`, 5 s), swept at the next
/// scrape (Prometheus scrapes every second here).
const PAUSED_SETTLE: Duration = Duration::from_secs(7);

/// How long, how often, and where to write.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Plan {
    pub minutes: f64,
    /// Each restartable Redis is restarted once per period, the collector changes mood once
    /// per period, the Sidekiq fleet starts or stops once per period.
    pub period_s: f64,
    pub warm_up_s: f64,
    pub quiet_s: f64,
    pub sample_every_s: f64,
    pub quick: bool,
}

impl Plan {
    pub fn new(minutes: Option<f64>, quick: bool) -> Self {
        let minutes = minutes.unwrap_or(if quick { 3.0 } else { 30.0 });
        Plan {
            minutes,
            period_s: if quick { 30.0 } else { 60.0 },
            warm_up_s: if quick { 15.0 } else { 30.0 },
            quiet_s: if quick { 30.0 } else { 60.0 },
            sample_every_s: 10.0,
            quick,
        }
    }

    fn churn_s(&self) -> f64 {
        (self.minutes * 60.0 - 2.0 * self.warm_up_s - self.quiet_s).max(self.period_s)
    }
}

/// One restart of a Redis, and how long until the agent had probes on the new process.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Restart {
    pub at_s: f64,
    pub style: Style,
    pub pid: u32,
    /// From the restart's start (the new process spawned) to the agent reporting its
    /// blockForKeys attached, seen by polling /metrics every 25 ms.
    pub probed_after_ms: Option<f64>,
}

/// One Sidekiq fleet start, and how long until the agent tracked and followed it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FleetStart {
    pub at_s: f64,
    pub pid: u32,
    pub tracked_after_ms: Option<f64>,
    pub followed_after_ms: Option<f64>,
}

/// 50 Redis servers started together and killed together while /metrics is scraped every
/// 20 ms from another thread.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Burst {
    pub servers: usize,
    /// From the first spawn until the agent reported every server's probes attached.
    pub all_probed_after_ms: Option<f64>,
    /// From the kill until every server's series were gone.
    pub all_released_after_ms: Option<f64>,
    pub scrapes: usize,
    pub slowest_scrape_ms: f64,
    pub failed_scrapes: usize,
}

/// Everything the report states.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Outcome {
    pub samples: Vec<Sample>,
    pub restarts: Vec<Restart>,
    pub fleets: Vec<FleetStart>,
    /// Before any agent ran: (programs, links, tracefs probe events) system-wide.
    pub kernel_before: (u64, u64, u64),
    /// A few seconds after the SIGKILL, and after the final SIGTERM.
    pub kernel_after_sigkill: (u64, u64, u64),
    pub kernel_after_exit: (u64, u64, u64),
    /// Client-side tally of the long-lived Redis against the agent's counts:
    /// (served, timeout, closed, errors) and (served, timeout, other, blocking calls).
    pub tally: (u64, u64, u64, u64),
    pub counted: (u64, u64, u64, u64),
    /// Collector: requests accepted while up, connections swallowed as a black hole, and
    /// the agent's count of failed pushes.
    pub otlp_accepted: u64,
    pub otlp_swallowed: u64,
    pub otlp_failures: u64,
    /// Prometheus: scrapes of the agent, failed ones (the SIGKILL gap), slowest.
    pub prometheus_scrapes: u64,
    pub prometheus_failed_scrapes: u64,
    pub prometheus_slowest_scrape_s: f64,
    /// The agent's own count of waits for its state lock above 200 ms, by which of its users
    /// waited (the lock's sites: scrape, rescan, an event handler...); only sites that did.
    pub lock_waits_over_200ms_by_site: Vec<(String, u64)>,
    /// The processes the agent's log says it tracks at the end, each as "pid fields (state)"
    /// with its state in /proc then ("gone" if it has none): what a map above its baseline
    /// at the end holds.
    pub tracked_at_end: Vec<String>,
    /// The agent's warnings that a rescan mended its tracking (`agent_log::tracking_mends`).
    pub tracking_mends: Vec<String>,
    pub forked_jobs: u64,
    pub mid_pop_closes: u64,
    /// The burst: 50 Redis servers started at once, probed, then killed at once.
    pub burst: Option<Burst>,
    pub checks: Vec<Check>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Check {
    pub what: String,
    pub passed: bool,
    pub figure: String,
}

pub fn run(bin: &std::path::Path, plan: Plan) -> Result<()> {
    if !crate::util::is_root() {
        bail!("the soak attaches eBPF programs and needs root: run `sudo cargo xtask soak`");
    }
    if let Ok(out) =
        crate::util::command_output(std::process::Command::new("pgrep").args(["-f", "fanout run"]))
    {
        if !out.trim().is_empty() {
            bail!("another `fanout run` is running (pids {}): stop it first, the soak counts every eBPF program on the node", out.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    }
    let out_dir = if plan.quick {
        crate::util::workspace_root().join("target/soak-quick")
    } else {
        crate::util::workspace_root()
    };
    std::fs::create_dir_all(&out_dir)?;
    eprintln!(
        "[soak] {} minutes ({} mode): period {} s; writing to {}",
        plan.minutes,
        if plan.quick { "quick" } else { "full" },
        plan.period_s,
        out_dir.display()
    );
    let outcome = soak(bin, &plan)?;
    report::write(&out_dir, &plan, &outcome)?;
    let failed: Vec<&Check> = outcome.checks.iter().filter(|c| !c.passed).collect();
    for c in &outcome.checks {
        eprintln!(
            "[soak] {} {}: {}",
            if c.passed { "ok  " } else { "FAIL" },
            c.what,
            c.figure
        );
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} soak checks failed (see {})",
            failed.len(),
            outcome.checks.len(),
            out_dir.join(report::MARKDOWN).display()
        );
    }
    Ok(())
}

fn kernel_now() -> (u64, u64, u64) {
    (
        sample::bpf_programs(),
        sample::bpf_links(),
        sample::tracefs_probe_events(),
    )
}

/// Waits (bounded) until the kernel holds what it held before: closing a link or unloading
/// a program completes asynchronously after the last fd is closed.
fn kernel_settles(before: (u64, u64, u64)) -> (u64, u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = kernel_now();
        if now == before || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The tests' Prometheus, scraping the agent through file-based discovery: its target is
/// written when the agent runs, and the file is rewritten when the agent's port changes.
struct Prometheus {
    server: integration_tests::prometheus::Prometheus,
    targets: std::path::PathBuf,
}

impl Prometheus {
    fn start() -> Result<Self> {
        let mut targets = std::path::PathBuf::new();
        let server = integration_tests::prometheus::Prometheus::start(|dir| {
            targets = dir.join("targets.json");
            std::fs::write(&targets, "[]").expect("write Prometheus's target file");
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\nscrape_configs:\n  - job_name: fanout\n    file_sd_configs:\n      - files: [\"{}\"]\n        refresh_interval: 1s\n",
                targets.display()
            )
        });
        Ok(Prometheus { server, targets })
    }

    fn scrape(&self, agent_port: u16) -> Result<()> {
        let tmp = self.targets.with_extension("tmp");
        std::fs::write(
            &tmp,
            format!("[{{\"targets\": [\"127.0.0.1:{agent_port}\"]}}]"),
        )?;
        std::fs::rename(tmp, &self.targets)?;
        Ok(())
    }

    /// One instant query's first value.
    fn query(&self, q: &str) -> Option<f64> {
        let encoded: String = q
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (status, body) =
            http_get(self.server.port, &format!("/api/v1/query?query={encoded}")).ok()?;
        if status != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

/// The state of blockForKeys of `pid`, if the agent reports it.
fn block_for_keys(agent_port: u16, pid: u32) -> Option<String> {
    let (_, body) = http_get(agent_port, "/metrics").ok()?;
    let scrape = integration_tests::prom::Scrape::parse(&body);
    let pid = pid.to_string();
    let state = scrape
        .find(
            "fanout_probe_points",
            &[("process_pid", &pid), ("probe", "blockForKeys")],
        )
        .find(|s| s.value == 1.0)
        .map(|s| s.labels["state"].clone());
    state
}

const WORKER_TAG: &str = "fanout-soak-worker";

fn start_agent(bin: &std::path::Path, collector: &Collector) -> Agent {
    let rule = format!("soakfork:cmdline={WORKER_TAG}");
    Agent::start_binary(
        bin,
        &[
            "--worker-rule",
            &rule,
            "--otlp-endpoint",
            &format!("http://127.0.0.1:{}", collector.port),
            "--otlp-protocol",
            "http/protobuf",
            "--otlp-interval",
            "2",
        ],
        // A black-holed push gives up after 1 s.
        &[("OTEL_EXPORTER_OTLP_TIMEOUT", "1000")],
    )
}

fn soak(bin: &std::path::Path, plan: &Plan) -> Result<Outcome> {
    let mut outcome = Outcome {
        kernel_before: kernel_now(),
        ..Default::default()
    };
    let began = Instant::now();
    let dir = tempfile::tempdir()?;
    let debian = RedisBuild::V7_0.binary();
    let lto = RedisBuild::V7_4.binary();

    // The long-lived server: only the exact client blocks on it.
    let steady = Redis::start(&[]);
    let mut restartable = vec![
        Server::start(Style::Foreground, &debian, dir.path(), free_port())?,
        Server::start(Style::Daemonized, &lto, dir.path(), free_port())?,
        Server::start(Style::Namespaced, &debian, dir.path(), free_port())?,
    ];
    let collector = Collector::start()?;
    let prometheus = Prometheus::start()?;

    let ports: Vec<u16> = restartable.iter().map(|s| s.port).collect();
    let mut loads = Loads::start(steady.port, &ports);

    let mut agent = start_agent(bin, &collector);
    prometheus.scrape(agent.port)?;
    let mut next_sample = Instant::now();
    let mut sampled = |agent: &Agent, phase: &str, outcome: &mut Outcome, force: bool| {
        if force || Instant::now() >= next_sample {
            let s = sample::take(began.elapsed(), phase, agent.proc.pid(), agent.port);
            eprintln!(
                "[soak] {:>5.0} s {phase:<8} rss {} KiB, {} fds, {} threads, {} series, scrape {:.0} ms",
                s.t, s.rss_kib, s.fds, s.threads, s.series, s.scrape_ms
            );
            outcome.samples.push(s);
            next_sample = Instant::now() + Duration::from_secs_f64(plan.sample_every_s);
        }
    };
    let pause = |seconds: f64,
                 agent: &Agent,
                 phase: &str,
                 outcome: &mut Outcome,
                 sampled: &mut dyn FnMut(&Agent, &str, &mut Outcome, bool)| {
        let until = Instant::now() + Duration::from_secs_f64(seconds);
        while Instant::now() < until {
            sampled(agent, phase, outcome, false);
            std::thread::sleep(Duration::from_millis(200));
        }
    };

    // 1. Warm-up, then SIGKILL.
    pause(
        plan.warm_up_s,
        &agent,
        "warm-up",
        &mut outcome,
        &mut sampled,
    );
    eprintln!("[soak] SIGKILL to the agent");
    let _ = agent.proc.child.kill();
    let _ = agent.proc.child.wait();
    outcome.kernel_after_sigkill = kernel_settles(outcome.kernel_before);
    drop(agent);

    // 2. Started again; the burst (50 Redis servers at once: the agent's peak, which sets
    // its allocator's high-water mark), then the baseline after a second warm-up. "Back to
    // the baseline" then tests for leaks, not for memory the allocator keeps after a peak;
    // the report states that separately (RSS before and after the burst).
    let mut agent = start_agent(bin, &collector);
    prometheus.scrape(agent.port)?;
    pause(5.0, &agent, "warm-up", &mut outcome, &mut sampled);
    sampled(&agent, "pre-burst", &mut outcome, true);
    outcome.burst = Some(burst(&agent, &debian, dir.path(), BURST_SERVERS)?);
    pause(
        plan.warm_up_s,
        &agent,
        "warm-up",
        &mut outcome,
        &mut sampled,
    );
    // Baseline and final are taken with every client paused: the maps then hold only what
    // live processes need, not blocked clients or reads in flight.
    loads.stop();
    std::thread::sleep(PAUSED_SETTLE);
    sampled(&agent, "baseline", &mut outcome, true);
    let baseline = outcome.samples.last().cloned().unwrap_or_default();
    let mut loads = Loads::start(steady.port, &ports);
    let tally = Arc::new(load::Tally::default());
    let stop_exact = Arc::new(AtomicBool::new(false));
    let exact = load::exact_blocking(steady.port, stop_exact.clone(), tally.clone());

    // 3. Churn.
    let stop_churn = Arc::new(AtomicBool::new(false));
    let closer = load::mid_pop_closer(restartable[0].port, stop_churn.clone());
    let mut forking = load::forking_parent(restartable[0].port, WORKER_TAG, 5)?;
    let churn_until = Instant::now() + Duration::from_secs_f64(plan.churn_s());
    let step = Duration::from_secs_f64(plan.period_s / 3.0);
    let mut next_step = Instant::now() + step;
    let mut steps = 0usize;
    let mut fleet: Option<Sidekiq> = None;
    // (pid, wall-clock spawn time) of each fleet, to compare with the agent's log.
    let mut fleet_spawns: Vec<(u32, f64)> = Vec::new();
    while Instant::now() < churn_until {
        sampled(&agent, "churn", &mut outcome, false);
        if Instant::now() < next_step {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        next_step += step;
        // A restart every step, each server in turn: each once per period.
        let server = &mut restartable[steps % 3];
        let at_s = began.elapsed().as_secs_f64();
        let started = server.restart()?;
        let pid = server.pid;
        let deadline = started + Duration::from_secs(5);
        let mut probed_after_ms = None;
        while Instant::now() < deadline {
            if matches!(
                block_for_keys(agent.port, pid).as_deref(),
                Some("idle" | "live")
            ) {
                probed_after_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        eprintln!(
            "[soak] {at_s:>5.0} s restarted the {:?} Redis (pid {pid}): probed after {}",
            server.style,
            probed_after_ms.map_or("never (5 s)".to_string(), |ms| format!("{ms:.0} ms"))
        );
        outcome.restarts.push(Restart {
            at_s,
            style: server.style,
            pid,
            probed_after_ms,
        });
        // The collector's mood changes every step too: up, down, black hole.
        collector.set(collector.mood().next());
        // The fleet starts or stops every other step.
        if steps % 2 == 1 {
            match fleet.take() {
                Some(mut f) => f.proc.stop(),
                None => {
                    let spawned = agent_log::now_utc();
                    let at_s = began.elapsed().as_secs_f64();
                    // It listens on the foreground server, restarted under it (Sidekiq
                    // reconnects).
                    let f = Sidekiq::start(restartable[0].port, &["soak_a", "soak_b", "soak_c"], 2);
                    outcome.fleets.push(FleetStart {
                        at_s,
                        pid: f.pid(),
                        tracked_after_ms: None,
                        followed_after_ms: None,
                    });
                    fleet_spawns.push((f.pid(), spawned));
                    fleet = Some(f);
                }
            }
        }
        steps += 1;
    }

    // 4. Quiet: the churn stops, the load goes on.
    stop_churn.store(true, Ordering::Relaxed);
    outcome.mid_pop_closes = closer.join().unwrap_or(0);
    let _ = forking.kill();
    let _ = forking.wait();
    if let Some(mut f) = fleet.take() {
        f.proc.stop();
    }
    collector.set(Mood::Up);
    pause(plan.quiet_s, &agent, "quiet", &mut outcome, &mut sampled);
    stop_exact.store(true, Ordering::Relaxed);
    let _ = exact.join();
    loads.stop();
    std::thread::sleep(PAUSED_SETTLE);
    sampled(&agent, "final", &mut outcome, true);
    let last = outcome.samples.last().cloned().unwrap_or_default();

    // The exact client's calls against the agent's counts.
    let scrape = agent.scrape();
    let pid = steady.pid().to_string();
    let by = |outcome_label: &str| {
        scrape.sum(
            "redis_blocking_duration_seconds_count",
            &[("process_pid", &pid), ("outcome", outcome_label)],
        ) as u64
    };
    outcome.counted = (
        by("served"),
        by("timeout"),
        by("other"),
        scrape.sum("redis_blocking_keys_count", &[("process_pid", &pid)]) as u64,
    );
    outcome.tally = (
        tally.served.load(Ordering::Relaxed),
        tally.timeout.load(Ordering::Relaxed),
        tally.closed.load(Ordering::Relaxed),
        tally.errors.load(Ordering::Relaxed),
    );
    outcome.otlp_failures =
        scrape.sum("fanout_export_failures_total", &[("exporter", "otlp")]) as u64;
    outcome.lock_waits_over_200ms_by_site = scrape
        .label_values("fanout_state_lock_wait_seconds_count", &[], "site")
        .into_iter()
        .map(|site| {
            let m = [("site", site.as_str())];
            let count = scrape.sum("fanout_state_lock_wait_seconds_count", &m);
            let within = scrape.sum(
                "fanout_state_lock_wait_seconds_bucket",
                &[("site", site.as_str()), ("le", "0.2")],
            );
            (site, (count - within) as u64)
        })
        .filter(|(_, over)| *over > 0)
        .collect();
    outcome.otlp_accepted = collector.accepted.load(Ordering::Relaxed);
    outcome.otlp_swallowed = collector.swallowed.load(Ordering::Relaxed);

    // Worker pick-up, from the agent's log.
    let log = agent.log();
    outcome.tracked_at_end = agent_log::tracked_at_end(&log)
        .into_iter()
        .map(|(pid, fields)| {
            let state = servers::process_state(pid).map_or("gone".into(), String::from);
            format!("{pid} {fields} ({state})")
        })
        .collect();
    outcome.tracking_mends = agent_log::tracking_mends(&log);
    let events = agent_log::parse(&log);
    for (pid, spawned) in fleet_spawns {
        if let Some(f) = outcome.fleets.iter_mut().find(|f| f.pid == pid) {
            let e = events.pids.get(&pid);
            f.tracked_after_ms = e.and_then(|e| e.tracked).map(|t| (t - spawned) * 1000.0);
            f.followed_after_ms = e
                .and_then(|e| {
                    e.libc_probes
                        .or(e.tracked.filter(|_| events.syscalls_attached.is_some()))
                })
                .map(|t| (t - spawned) * 1000.0);
        }
    }
    let window = format!("{}s", began.elapsed().as_secs() + 5);
    outcome.prometheus_scrapes = prometheus
        .query(&format!("count_over_time(up{{job=\"fanout\"}}[{window}])"))
        .unwrap_or(0.0) as u64;
    outcome.prometheus_failed_scrapes = prometheus
        .query(&format!(
            "count_over_time((up{{job=\"fanout\"}} == 0)[{window}:1s])"
        ))
        .unwrap_or(0.0) as u64;
    outcome.prometheus_slowest_scrape_s = prometheus
        .query(&format!(
            "max_over_time(scrape_duration_seconds{{job=\"fanout\"}}[{window}])"
        ))
        .unwrap_or(f64::NAN);

    // The agent stops; the kernel must be as before.
    agent.proc.stop();
    outcome.kernel_after_exit = kernel_settles(outcome.kernel_before);
    drop(restartable);
    outcome.checks = report::checks(&outcome, &baseline, &last);
    Ok(outcome)
}

/// The plain and blocking clients on every server, stopped and started as a whole.
struct Loads {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl Loads {
    /// Plain load on the long-lived server; plain and blocking load on the others.
    fn start(steady: u16, restartable: &[u16]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = vec![load::looping_client(steady, false, stop.clone())];
        for &port in restartable {
            threads.push(load::looping_client(port, false, stop.clone()));
            threads.push(load::looping_client(port, true, stop.clone()));
        }
        Loads { stop, threads }
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Loads {
    fn drop(&mut self) {
        self.stop();
    }
}

const BURST_SERVERS: usize = 50;

/// Starts `n` Redis servers at once, waits until the agent has probes on all of them, kills
/// them all, and waits until they are all dropped, with /metrics scraped every 20 ms from
/// another thread throughout.
fn burst(
    agent: &Agent,
    binary: &std::path::Path,
    dir: &std::path::Path,
    n: usize,
) -> Result<Burst> {
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = {
        let (stop, port) = (stop.clone(), agent.port);
        std::thread::spawn(move || {
            let (mut latencies, mut failed) = (Vec::new(), 0);
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match http_get(port, "/metrics") {
                    Ok((200, _)) => latencies.push(t.elapsed().as_secs_f64() * 1000.0),
                    _ => failed += 1,
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            (latencies, failed)
        })
    };
    let started = Instant::now();
    let mut servers = Vec::new();
    for _ in 0..n {
        let port = free_port();
        let child = integration_tests::redis_server_command(binary, port, Some(dir))
            .spawn()
            .context("start a burst Redis")?;
        servers.push(child);
    }
    let pids: Vec<String> = servers.iter().map(|c| c.id().to_string()).collect();
    let attached = |scrape: &integration_tests::prom::Scrape, pid: &str| {
        scrape
            .find(
                "fanout_probe_points",
                &[("process_pid", pid), ("probe", "blockForKeys")],
            )
            .any(|s| s.value == 1.0)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut all_probed_after_ms = None;
    while Instant::now() < deadline {
        let scrape = agent.scrape();
        if pids.iter().all(|pid| attached(&scrape, pid)) {
            all_probed_after_ms = Some(started.elapsed().as_secs_f64() * 1000.0);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let killed = Instant::now();
    for child in &mut servers {
        let _ = child.kill();
    }
    for child in &mut servers {
        let _ = child.wait();
    }
    let mut all_released_after_ms = None;
    while Instant::now() < killed + Duration::from_secs(30) {
        let scrape = agent.scrape();
        if pids.iter().all(|pid| !attached(&scrape, pid)) {
            all_released_after_ms = Some(killed.elapsed().as_secs_f64() * 1000.0);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (latencies, failed_scrapes) = scraper.join().unwrap_or_default();
    let burst = Burst {
        servers: n,
        all_probed_after_ms,
        all_released_after_ms,
        scrapes: latencies.len(),
        slowest_scrape_ms: latencies.iter().copied().fold(0.0, f64::max),
        failed_scrapes,
    };
    eprintln!("[soak] burst of {n} Redis servers: {burst:?}");
    Ok(burst)
}
