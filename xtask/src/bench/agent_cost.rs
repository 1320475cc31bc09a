//! The agent's own cost and speed: CPU and peak RSS under blocking load and with many tracked
//! processes, time to attach to a new Redis and to many running ones, and a real Sidekiq
//! fleet's throughput with and without the agent.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use integration_tests::{resp::Conn, sidekiq_job_of_class, wait_for, Agent, Proc, Redis, Sidekiq};

use crate::agent_log;

use super::{
    blocking::{process_cpu, run_once},
    bpf_stats::{StatsSample, Window},
};

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
    let (sample, _) = run_once(&redis, Some(&agent), 10, 50, rate, seconds, false)?;
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

/// One drain of a Sidekiq fleet.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SidekiqRun {
    pub kind: JobKind,
    pub jobs_per_second: f64,
    /// Redis commands per job during the drain (all from the fleet but for the bench's own
    /// few, which are subtracted).
    pub commands_per_job: f64,
    /// How the agent followed the fleet, from its log ("uprobes", "tracepoints", ...).
    pub followed_via: Option<String>,
    /// Per job, when the run is a bpf_stats window.
    pub stats: Option<StatsSample>,
    /// The agent's own CPU during the drain, as a share of one core (NaN without the agent).
    pub agent_cpu_share: f64,
    /// CPU time per job of the fleet's process and of Redis during the drain, in us (the
    /// threads' schedstat: their time in the kernel, probes and eBPF programs included). Less
    /// at the mercy of this shared machine's scheduling than the jobs per second.
    pub fleet_cpu_us_per_job: f64,
    pub redis_cpu_us_per_job: f64,
    /// Seconds from the probes' attach to the `write()` probe being taken out (before the
    /// drain started), or `None` if it stayed in.
    pub write_probe_out_after: Option<f64>,
}

/// `total_commands_processed` from INFO stats.
fn commands_processed(conn: &mut Conn) -> Result<f64> {
    let info = match conn.call(&["INFO", "stats"])? {
        integration_tests::resp::Reply::Bulk(Some(b)) => String::from_utf8_lossy(&b).into_owned(),
        other => anyhow::bail!("INFO stats: unexpected reply {other:?}"),
    };
    info.lines()
        .find_map(|l| l.strip_prefix("total_commands_processed:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no total_commands_processed in INFO stats")
}

/// What the jobs of a drain do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum JobKind {
    /// Nothing: the fleet's only Redis command per job is its fetch (BRPOP).
    Noop,
    /// Five plain commands each (`integration_tests::REDIS_WORK_JOB_COMMANDS`), on the
    /// connections that also fetch: what following a job's own Redis traffic costs.
    RedisWork,
    /// Nothing, with the fleet on [`MANY_QUEUES`] weighted queues, as GitLab runs Sidekiq: a
    /// weight turns strict order off, so every fetch lists them all, shuffled (the jobs wait
    /// in one of them, the others stay empty).
    NoopWeightedQueues,
    /// Nothing, with the fleet on [`MANY_QUEUES`] queues without weights: Sidekiq's default
    /// strict order, so every fetch is the same BRPOP of them all, about 23 KiB with these
    /// names (the jobs wait in the first).
    NoopStrictQueues,
}

/// How many queues the many-queue fleets listen to: the mission's GitLab-scale fetch.
pub const MANY_QUEUES: usize = 440;

impl JobKind {
    fn class(self) -> &'static str {
        match self {
            Self::Noop | Self::NoopWeightedQueues | Self::NoopStrictQueues => "NoopJob",
            Self::RedisWork => "RedisWorkJob",
        }
    }

    /// The fleet's `-q` arguments; the jobs go to `bench`.
    fn queues(self) -> Vec<String> {
        match self {
            Self::Noop | Self::RedisWork => vec!["bench".into()],
            Self::NoopWeightedQueues => std::iter::once("bench,1".to_string())
                .chain((1..MANY_QUEUES).map(|i| format!("{},1", gitlab_like_queue(i))))
                .collect(),
            Self::NoopStrictQueues => std::iter::once("bench".to_string())
                .chain((1..MANY_QUEUES).map(gitlab_like_queue))
                .collect(),
        }
    }
}

/// A queue name of the shape and length of GitLab's (`pipeline_processing:build_finished`,
/// `cronjob:container_expiration_policy`), distinct for each `i`: 36-71 bytes as a BRPOP
/// lists it (`$NN\r\nqueue:...\r\n`). What a many-queue fetch costs the kernel side depends
/// on its keys' lengths (how many fit in one read), which names like `empty17` (22 bytes)
/// did not show: with them the bench missed a fault that sent most weighted fetches of
/// GitLab-length keys to the tokenizer.
pub fn gitlab_like_queue(i: usize) -> String {
    const AREAS: [&str; 8] = [
        "pipeline_processing",
        "cronjob",
        "authorized_project_update",
        "merge_requests",
        "container_registry",
        "security_scans",
        "jira_connect",
        "package_repositories",
    ];
    const ACTIONS: [&str; 8] = [
        "build_finished",
        "expire_build_artifacts",
        "user_refresh_over_user_range",
        "delete_source_branch",
        "cleanup_tags",
        "store_security_reports",
        "sync_merge_request",
        "process_package_file",
    ];
    format!("{}:{}_{i}", AREAS[i % 8], ACTIONS[(i / 8) % 8])
}

/// A 10-thread Sidekiq fleet draining `jobs` jobs of `kind`, without the agent (`agent_args`
/// None) or with it, started with `agent_args`; with `with_stats`, the drain is a bpf_stats
/// window.
pub fn sidekiq_run(
    bin: &std::path::Path,
    agent_args: Option<&[&str]>,
    jobs: u64,
    kind: JobKind,
    with_stats: bool,
) -> Result<SidekiqRun> {
    let redis = Redis::start(&[]);
    let agent = agent_args.map(|args| Agent::start_binary(bin, args, &[]));
    let queues = kind.queues();
    let queues: Vec<&str> = queues.iter().map(String::as_str).collect();
    let sidekiq = Sidekiq::start(redis.port, &queues, 10);
    // An agent told not to follow traffic only tracks the fleet (its scheduler programs).
    let follows_traffic = !agent_args.is_some_and(|args| args.contains(&"--no-worker-probes"));
    let followed_via = agent.as_ref().map(|a| {
        let pid = sidekiq.pid();
        let limit = Instant::now() + Duration::from_secs(20);
        loop {
            let log = a.log();
            let via = agent_log::followed_via(&log, pid);
            if via != "unknown" || Instant::now() > limit {
                break via.to_string();
            }
            if !follows_traffic
                && agent_log::parse(&log)
                    .pids
                    .get(&pid)
                    .is_some_and(|e| e.tracked.is_some())
            {
                break "not followed (tracked only)".to_string();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    // The steady state is measured: a fleet's write() probe (its own uprobe, or the node's
    // sys_enter_write) is taken out about a second after its first commands (its connections
    // send through sendto; write() carries its logs). Wait for that, or say that it did not
    // happen.
    let write_probe_out_after = match (&agent, followed_via.as_deref()) {
        (Some(a), Some("uprobes" | "tracepoints")) => {
            let limit = Instant::now() + Duration::from_secs(10);
            loop {
                let after = agent_log::write_probe_out_after(&a.log(), sidekiq.pid());
                if after.is_some() || Instant::now() > limit {
                    break after;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        _ => None,
    };
    // Fill a queue the fleet does not listen to (pipelined), then rename it in at once.
    let mut conn = Conn::connect(redis.port)?;
    for chunk in (0..jobs).collect::<Vec<_>>().chunks(500) {
        for jid in chunk {
            let job = sidekiq_job_of_class(kind.class(), "bench", *jid);
            conn.send(&["LPUSH", "queue:staging", &job])?;
        }
        for _ in chunk {
            conn.read()?;
        }
    }
    let commands0 = commands_processed(&mut conn)?;
    let window = match (&agent, with_stats) {
        (Some(a), true) => Some(Window::start(a.proc.pid())?),
        _ => None,
    };
    let agent_cpu0 = agent.as_ref().map(|a| process_cpu(a.proc.pid()));
    let (fleet_cpu0, redis_cpu0) = (process_cpu(sidekiq.pid()), process_cpu(redis.pid()));
    let started = Instant::now();
    conn.call(&["RENAME", "queue:staging", "queue:bench"])?;
    // The bench's own commands in the count: the first INFO, the RENAME, each LLEN.
    let mut own = 2.0;
    loop {
        own += 1.0;
        if let integration_tests::resp::Reply::Integer(0) = conn.call(&["LLEN", "queue:bench"])? {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            anyhow::bail!("the Sidekiq queue did not drain in 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let seconds = started.elapsed().as_secs_f64();
    let per_job_us = |cpu: f64, cpu0: f64| (cpu - cpu0) / jobs as f64 * 1e6;
    let fleet_cpu_us_per_job = per_job_us(process_cpu(sidekiq.pid()), fleet_cpu0);
    let redis_cpu_us_per_job = per_job_us(process_cpu(redis.pid()), redis_cpu0);
    let agent_cpu_share = match (&agent, agent_cpu0) {
        (Some(a), Some(cpu0)) => (process_cpu(a.proc.pid()) - cpu0) / seconds,
        _ => f64::NAN,
    };
    let stats = window.map(|w| w.finish(jobs as f64, "job")).transpose()?;
    let commands = commands_processed(&mut conn)? - commands0 - own;
    drop(sidekiq);
    drop(agent);
    Ok(SidekiqRun {
        kind,
        jobs_per_second: jobs as f64 / seconds,
        commands_per_job: commands / jobs as f64,
        followed_via,
        stats,
        agent_cpu_share,
        fleet_cpu_us_per_job,
        redis_cpu_us_per_job,
        write_probe_out_after,
    })
}
