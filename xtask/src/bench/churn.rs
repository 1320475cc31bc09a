//! Short-lived workers: how fast the agent picks up workers that live a second or less, and
//! whether attaching to and detaching from many of them stalls its loop.
//!
//! `n` python3 processes matching a worker rule are started over `spread` seconds (0: all at
//! once, the burst of a deployment starting a fleet); each connects to a Redis, does one
//! `BRPOP` with a 0.8 s timeout and exits. From the agent's log
//! (its timestamps) and the spawn times: the time from each worker's start to being tracked and
//! to being followed (its libc uprobes attached, or tracked with the syscall tracepoints
//! attached). Meanwhile /metrics is scraped every 100 ms: a scrape takes the agent's state
//! lock, so a loop stalled in an attach or detach shows as a slow scrape.

use std::{
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use integration_tests::{http_get, Agent, Redis};

use super::{median, NO_REDIS_EXCLUDE};
use crate::agent_log;

#[derive(Clone, Debug, serde::Serialize)]
pub struct ChurnSample {
    pub scenario: String,
    pub workers: usize,
    pub spread_seconds: f64,
    /// Median and longest life of a worker, start to exit.
    pub lifetime_p50_s: f64,
    pub lifetime_max_s: f64,
    /// Most workers alive at once.
    pub max_alive: usize,
    /// Workers the agent tracked (it logged "tracking process").
    pub tracked: usize,
    /// Workers followed: libc uprobes attached, or tracked while the tracepoints are attached.
    pub followed: usize,
    /// Workers tracked but not followed (the agent said why in its log).
    pub not_followed: usize,
    /// How the followed workers were followed ("uprobes", "tracepoints", or both).
    pub followed_via: String,
    /// From a worker's start to being tracked, over the tracked ones.
    pub tracked_p50_s: f64,
    pub tracked_max_s: f64,
    /// From a worker's start to being followed, over the followed ones.
    pub pickup_p50_s: f64,
    pub pickup_max_s: f64,
    /// From a worker's exit to the agent dropping it.
    pub gone_max_s: f64,
    /// /metrics scrapes during the churn, and their latency.
    pub scrapes: usize,
    pub scrape_p50_s: f64,
    pub scrape_max_s: f64,
    pub scrape_failures: usize,
    /// Where the agent's log of this run was saved.
    pub agent_log: String,
}

/// How the agent may make workers' uprobes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Uprobes {
    /// uprobe-multi links where the kernel has them (the default).
    Multi,
    /// uprobe-multi links refused (`FANOUT_UPROBE_MULTI=0`), as on kernels before 6.6: one
    /// perf-event uprobe per probe site.
    PerfEvents,
}

impl Uprobes {
    /// What the agent's environment sets for this kind.
    fn agent_env(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::Multi => &[],
            Self::PerfEvents => &[("FANOUT_UPROBE_MULTI", "0")],
        }
    }

    /// What the name of the saved agent log ends with.
    fn log_suffix(self) -> &'static str {
        match self {
            Self::Multi => "",
            Self::PerfEvents => "-perf-event-uprobes",
        }
    }

    /// What the row's scenario says of it.
    fn label(self) -> &'static str {
        match self {
            Self::Multi => "",
            Self::PerfEvents => {
                ", uprobe-multi refused (as before Linux 6.6): a perf-event uprobe per site"
            }
        }
    }
}

/// One churn of `n` workers over `spread` seconds (0: all at once), beside a tracked Redis
/// (uprobes) or with every Redis excluded (tracepoints).
pub fn measure(
    bin: &std::path::Path,
    beside_redis: bool,
    n: usize,
    spread: f64,
    uprobes: Uprobes,
) -> Result<ChurnSample> {
    let redis = Redis::start(&[]);
    // Unique to this run, so that nothing else on the node matches the rule.
    let tag = format!("fanout-bench-churn-worker-{}", std::process::id());
    let rule = format!("benchchurn:cmdline={tag}");
    let mut args = vec!["--worker-rule", rule.as_str()];
    if !beside_redis {
        args.extend(["--redis-exclude", NO_REDIS_EXCLUDE]);
    }
    let agent = Agent::start_binary(bin, &args, uprobes.agent_env());
    if beside_redis {
        super::wait_for_redis_probes(&agent, &redis);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let scraper = {
        let (stop, port) = (stop.clone(), agent.port);
        thread::spawn(move || {
            let mut latencies = Vec::new();
            let mut failures = 0;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                match http_get(port, "/metrics") {
                    Ok((200, _)) => latencies.push(t.elapsed().as_secs_f64()),
                    _ => failures += 1,
                }
                thread::sleep(Duration::from_millis(100));
            }
            (latencies, failures)
        })
    };

    let script = r#"import socket
s = socket.create_connection(("127.0.0.1", PORT))
s.sendall(b"*3\r\n$5\r\nBRPOP\r\n$14\r\nbench:churn:q0\r\n$3\r\n0.8\r\n")
s.recv(64)
"#
    .replace("PORT", &redis.port.to_string());
    // Debian's python3 (setup installs it), not a version manager's shim on PATH: a pyenv shim
    // is a bash script that forks a dozen processes before it execs python, each of which the
    // rule would match too.
    let python = ["/usr/bin/python3", "/bin/python3"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .unwrap_or("python3");
    // (spawn time, child, exit time), times in seconds since the epoch.
    let mut children: Vec<(f64, Child, Option<f64>)> = Vec::new();
    let reap = |children: &mut Vec<(f64, Child, Option<f64>)>| {
        for (_, child, exited) in children.iter_mut().filter(|c| c.2.is_none()) {
            if let Ok(Some(_)) = child.try_wait() {
                *exited = Some(agent_log::now_utc());
            }
        }
    };
    let started = Instant::now();
    for i in 0..n {
        let due = Duration::from_secs_f64(spread * i as f64 / n as f64);
        while started.elapsed() < due {
            reap(&mut children);
            thread::sleep(Duration::from_millis(5));
        }
        let at = agent_log::now_utc();
        let child = Command::new(python)
            .args(["-c", &script, &tag])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("python3")?;
        children.push((at, child, None));
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while children.iter().any(|c| c.2.is_none()) && Instant::now() < deadline {
        reap(&mut children);
        thread::sleep(Duration::from_millis(5));
    }
    for (_, child, exited) in children.iter_mut().filter(|c| c.2.is_none()) {
        let _ = child.kill();
        let _ = child.wait();
        *exited = Some(agent_log::now_utc());
    }
    // Let the agent drop the last ones.
    thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let (scrape_latencies, scrape_failures) = scraper
        .join()
        .map_err(|_| anyhow::anyhow!("scrape thread panicked"))?;

    let log = agent.log();
    let name = match (beside_redis, spread > 0.0) {
        (true, true) => "churn-beside-redis",
        (false, true) => "churn-no-redis",
        (true, false) => "burst-beside-redis",
        (false, false) => "burst-no-redis",
    };
    let name = format!("{name}{}", uprobes.log_suffix());
    let saved = super::save_agent_log(&name, &log);
    let events = agent_log::parse(&log);
    let mut lifetimes = Vec::new();
    let (mut tracked, mut pickups, mut gone) = (Vec::new(), Vec::new(), Vec::new());
    let (mut not_followed, mut via_libc, mut via_tracepoints) = (0, 0, 0);
    for (spawned, child, exited) in &children {
        let exited = exited.unwrap_or(*spawned);
        lifetimes.push(exited - spawned);
        let Some(e) = events.pids.get(&child.id()) else {
            continue;
        };
        let Some(t) = e.tracked else {
            continue;
        };
        tracked.push(t - spawned);
        if let Some(g) = e.gone {
            gone.push(g - exited);
        }
        if let Some(p) = e.libc_probes {
            via_libc += 1;
            pickups.push(p - spawned);
        } else if e.not_followed.is_some() {
            not_followed += 1;
        } else if let Some(attached) = events.syscalls_attached {
            via_tracepoints += 1;
            pickups.push(t.max(attached) - spawned);
        }
    }
    // Most workers alive at once.
    let mut edges: Vec<(f64, i32)> = children
        .iter()
        .flat_map(|(s, _, e)| [(*s, 1), (e.unwrap_or(*s), -1)])
        .collect();
    edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let max_alive = edges
        .iter()
        .scan(0, |alive, (_, d)| {
            *alive += d;
            Some(*alive)
        })
        .max()
        .unwrap_or(0) as usize;
    let max = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
    let followed_via = match (via_libc, via_tracepoints) {
        (0, 0) => "none".to_string(),
        (_, 0) => "uprobes".to_string(),
        (0, _) => "tracepoints".to_string(),
        (l, t) => format!("uprobes ({l}) and tracepoints ({t})"),
    };
    drop(agent);
    drop(redis);
    Ok(ChurnSample {
        scenario: format!(
            "{}{}{}",
            if beside_redis {
                "beside a tracked Redis (default mode: uprobes)"
            } else {
                "no Redis tracked (default mode: tracepoints)"
            },
            if spread > 0.0 {
                String::new()
            } else {
                format!(", all {n} started at once")
            },
            uprobes.label()
        ),
        workers: n,
        spread_seconds: spread,
        lifetime_p50_s: median(&lifetimes),
        lifetime_max_s: max(&lifetimes),
        max_alive,
        tracked: tracked.len(),
        followed: pickups.len(),
        not_followed,
        followed_via,
        tracked_p50_s: median(&tracked),
        tracked_max_s: max(&tracked),
        pickup_p50_s: median(&pickups),
        pickup_max_s: max(&pickups),
        gone_max_s: max(&gone),
        scrapes: scrape_latencies.len(),
        scrape_p50_s: median(&scrape_latencies),
        scrape_max_s: max(&scrape_latencies),
        scrape_failures,
        agent_log: saved,
    })
}
