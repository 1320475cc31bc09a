//! The agent's own cost and speed: CPU and peak RSS under blocking load and with many tracked
//! processes, time to attach to a new Redis and to many running ones, and a real Sidekiq
//! fleet's throughput with and without the agent.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Result;
use integration_tests::{resp::Conn, sidekiq_job, wait_for, Agent, Proc, Redis, Sidekiq};

use super::blocking::{process_cpu, run_once};

/// A memory figure of a process from /proc/<pid>/status, in MiB.
fn status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Peak resident set of a process, in MiB (VmHWM).
pub fn peak_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmHWM:")
}

/// Resident set of a process now, in MiB (VmRSS).
pub fn rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmRSS:")
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct CostSample {
    pub scenario: String,
    pub agent_cpu_share: f64,
    pub agent_peak_rss_mib: f64,
    /// At the end of the scenario, after it ran under load.
    pub agent_rss_mib: f64,
}

/// Agent CPU and RSS while Redis serves `rate` blocking pops per second.
pub fn under_pops(bin: &std::path::Path, rate: u32, seconds: f64) -> Result<CostSample> {
    let redis = Redis::start(&[]);
    let agent = Agent::start_binary(bin, &[], &[]);
    let sample = run_once(&redis, Some(&agent), 10, 50, rate, seconds)?;
    Ok(CostSample {
        scenario: format!("{rate} blocking pops/s (50 clients, 10 keys)"),
        agent_cpu_share: sample.agent_cpu_share.unwrap_or(f64::NAN),
        agent_peak_rss_mib: peak_rss_mib(agent.proc.pid()),
        agent_rss_mib: rss_mib(agent.proc.pid()),
    })
}

/// Agent CPU and RSS with `n` tracked processes, scraped every second.
pub fn with_processes(bin: &std::path::Path, n: usize, seconds: f64) -> Result<CostSample> {
    let sleepers: Vec<Proc> = (0..n)
        .map(|_| Proc {
            child: Command::new("sleep")
                .arg("3598")
                .stdout(Stdio::null())
                .spawn()
                .expect("sleep"),
            name: "sleeper".into(),
        })
        .collect();
    let agent = Agent::start_binary(
        bin,
        &["--worker-rule", "benchmany:cmdline=^sleep 3598$"],
        &[],
    );
    wait_for("all sleepers tracked", Duration::from_secs(30), || {
        (agent.scrape().sum(
            "fanout_processes_tracked",
            &[("process_group", "benchmany")],
        ) as usize
            == n)
            .then_some(())
    });
    let cpu0 = process_cpu(agent.proc.pid());
    let started = Instant::now();
    while started.elapsed().as_secs_f64() < seconds {
        let _ = agent.metrics_text();
        std::thread::sleep(Duration::from_secs(1));
    }
    let share = (process_cpu(agent.proc.pid()) - cpu0) / started.elapsed().as_secs_f64();
    let (peak, rss) = (peak_rss_mib(agent.proc.pid()), rss_mib(agent.proc.pid()));
    drop(sleepers);
    Ok(CostSample {
        scenario: format!("{n} tracked processes, scraped every second"),
        agent_cpu_share: share,
        agent_peak_rss_mib: peak,
        agent_rss_mib: rss,
    })
}

/// Seconds from a redis-server's spawn to its blocking probes being attached (as the agent's
/// endpoint reports), and from the agent's start to probes on `many` running servers.
pub fn attach_latency(bin: &std::path::Path, many: usize) -> Result<(f64, f64)> {
    let agent = Agent::start_binary(bin, &[], &[]);
    let spawned = Instant::now();
    let redis = Redis::start(&[]);
    let pid = redis.pid().to_string();
    wait_for("probes on the new redis", Duration::from_secs(10), || {
        (agent.scrape().sum(
            "fanout_probe_points",
            &[
                ("process_pid", &pid),
                ("probe", "blockForKeys"),
                ("state", "idle"),
            ],
        ) == 1.0)
            .then_some(())
    });
    let one = spawned.elapsed().as_secs_f64();
    drop(agent);
    let servers: Vec<Redis> = (0..many).map(|_| Redis::start(&[])).collect();
    let started = Instant::now();
    let agent = Agent::start_binary(bin, &[], &[]);
    wait_for("probes on every server", Duration::from_secs(60), || {
        let s = agent.scrape();
        (s.find(
            "fanout_probe_points",
            &[("probe", "blockForKeys"), ("state", "idle")],
        )
        .count()
            > many)
            .then_some(())
    });
    let all = started.elapsed().as_secs_f64();
    drop(servers);
    Ok((one, all))
}

/// Jobs per second a real Sidekiq fleet (10 threads) drains from a queue of `jobs` no-op jobs.
/// Jobs per second of a 10-thread Sidekiq fleet draining `jobs` no-op jobs, without the agent
/// (`agent_args` None) or with it, started with `agent_args`.
pub fn sidekiq_jobs_per_second(
    bin: &std::path::Path,
    agent_args: Option<&[&str]>,
    jobs: u64,
) -> Result<f64> {
    let redis = Redis::start(&[]);
    let agent = agent_args.map(|args| Agent::start_binary(bin, args, &[]));
    let sidekiq = Sidekiq::start(redis.port, &["bench"], 10);
    if let Some(a) = &agent {
        let pid = sidekiq.pid().to_string();
        wait_for("the fleet tracked", Duration::from_secs(20), || {
            (a.scrape()
                .find("worker_blocking_pop_keys_count", &[])
                .count()
                > 0
                || a.scrape()
                    .find(
                        "process_thread_cpu_time_seconds_total",
                        &[("process_pid", &pid)],
                    )
                    .count()
                    > 0)
            .then_some(())
        });
    }
    // Fill a queue the fleet does not listen to (pipelined), then rename it in at once.
    let mut conn = Conn::connect(redis.port)?;
    for chunk in (0..jobs).collect::<Vec<_>>().chunks(500) {
        for jid in chunk {
            conn.send(&["LPUSH", "queue:staging", &sidekiq_job("bench", *jid)])?;
        }
        for _ in chunk {
            conn.read()?;
        }
    }
    let started = Instant::now();
    redis.command(&["RENAME", "queue:staging", "queue:bench"]);
    wait_for("the queue to drain", Duration::from_secs(120), || {
        (redis.command(&["LLEN", "queue:bench"]) == ":0\r\n").then_some(())
    });
    Ok(jobs as f64 / started.elapsed().as_secs_f64())
}
