//! Blocking-heavy load: C clients in BRPOP over F keys, a producer pushing at a fixed rate.
//! Measures what each served job costs Redis's main thread, with and without the agent, and
//! the fan-out cost curve (main-thread time per blocking call as a function of keys listed),
//! from /proc, from the agent's own metrics, and from INFO commandstats.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use integration_tests::{resp::Conn, Agent, Redis};

use super::bpf_stats::{StatsSample, Window};

/// One measurement.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct BlockingSample {
    pub keys: usize,
    pub with_agent: bool,
    pub served_per_second: f64,
    /// Main-thread CPU per served job, from /proc (schedstat, us).
    pub main_cpu_us_per_job: f64,
    /// BRPOP usec_per_call over the run, from INFO commandstats.
    pub info_us_per_call: f64,
    /// Registration + unregistration time per blocking call, from the agent (us).
    pub agent_bookkeeping_us_per_call: Option<f64>,
    /// The agent's own CPU over the run, as a share of one core.
    pub agent_cpu_share: Option<f64>,
}

/// User + system CPU seconds from a `stat` file (fields after the comm: utime 11, stime 12;
/// clock ticks of 10 ms).
fn cpu_seconds(stat_path: &str) -> f64 {
    let stat = std::fs::read_to_string(stat_path).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Main-thread CPU seconds of a process (its task with tid == pid): the scheduler's own count
/// in ns (`schedstat`'s first field, its sum_exec_runtime), where `stat`'s utime and stime
/// are 10 ms ticks sampled at each tick: over a 6 s run of 6000 jobs, a tick's worth of
/// sampling luck is 1.7 us per job, as much as the cost being measured. `stat` where the
/// kernel has no schedstat (CONFIG_SCHED_INFO off).
fn main_thread_cpu(pid: u32) -> f64 {
    let task = std::path::PathBuf::from(format!("/proc/{pid}/task/{pid}"));
    schedstat_seconds(&task).unwrap_or_else(|| cpu_seconds(&format!("/proc/{pid}/task/{pid}/stat")))
}

/// A task's CPU seconds from its `schedstat` (the first field, in ns), if the kernel has it.
fn schedstat_seconds(task: &std::path::Path) -> Option<f64> {
    let text = std::fs::read_to_string(task.join("schedstat")).ok()?;
    Some(text.split_whitespace().next()?.parse::<f64>().ok()? / 1e9)
}

/// CPU seconds of a whole process: the sum of its live threads' schedstat (ns), so that a
/// short window is not read in 10 ms ticks (one tick over a 1.5 s drain is a 0.007 share of a
/// core, the size of what is measured). Time of threads that exited in between is lost; the
/// agent's threads live as long as it does. `stat` (ticks, exited threads included) where the
/// kernel has no schedstat.
pub fn process_cpu(pid: u32) -> f64 {
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| dir.flatten().map(|e| e.path()).collect::<Vec<_>>())
        .unwrap_or_default();
    let summed: Option<f64> = threads.iter().map(|t| schedstat_seconds(t)).sum();
    match summed {
        Some(seconds) if !threads.is_empty() => seconds,
        _ => cpu_seconds(&format!("/proc/{pid}/stat")),
    }
}

/// (calls, usec) of BRPOP from INFO commandstats.
fn brpop_stats(redis: &Redis) -> (f64, f64) {
    let mut conn = Conn::connect(redis.port).expect("connect");
    let info = match conn.call(&["INFO", "commandstats"]) {
        Ok(integration_tests::resp::Reply::Bulk(Some(b))) => {
            String::from_utf8_lossy(&b).into_owned()
        }
        _ => String::new(),
    };
    let line = info
        .lines()
        .find(|l| l.starts_with("cmdstat_brpop:"))
        .unwrap_or("");
    let field = |name: &str| {
        line.split([':', ','])
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    (field("calls"), field("usec"))
}

/// The agent's (bookkeeping seconds, blocking calls) for one Redis pid.
fn agent_bookkeeping(agent: &Agent, pid: u32) -> (f64, f64) {
    let s = agent.scrape();
    let pid = pid.to_string();
    (
        s.sum(
            "redis_blocking_cpu_time_seconds_total",
            &[("process_pid", &pid)],
        ),
        s.sum("redis_blocking_keys_count", &[("process_pid", &pid)]),
    )
}

/// Runs `clients` BRPOP loops over `keys` keys and a producer at `rate` pushes/s for
/// `seconds`, bounded in time and requests. Returns the sample and, with `with_stats` (and an
/// agent), the agent's programs over the measured window, per served pop.
pub fn run_once(
    redis: &Redis,
    agent: Option<&Agent>,
    keys: usize,
    clients: usize,
    rate: u32,
    seconds: f64,
    with_stats: bool,
) -> Result<(BlockingSample, Option<StatsSample>)> {
    let names: Arc<Vec<String>> = Arc::new((0..keys).map(|i| format!("bench:q{i}")).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let port = redis.port;
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            let (names, stop, served) = (names.clone(), stop.clone(), served.clone());
            thread::spawn(move || -> Result<()> {
                let mut conn = Conn::connect(port)?;
                let mut args: Vec<&str> = vec!["BRPOP"];
                args.extend(names.iter().map(String::as_str));
                args.push("1");
                while !stop.load(Ordering::Relaxed) {
                    if !conn.call(&args)?.is_nil() {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(())
            })
        })
        .collect();
    // Let every client block before measuring.
    thread::sleep(Duration::from_millis(300));
    let pid = redis.pid();
    let (cpu0, (calls0, usec0)) = (main_thread_cpu(pid), brpop_stats(redis));
    let agent0 = agent.map(|a| (agent_bookkeeping(a, pid), process_cpu(a.proc.pid())));
    let served0 = served.load(Ordering::Relaxed);
    let window = match agent {
        Some(a) if with_stats => Some(Window::start(a.proc.pid())?),
        _ => None,
    };
    let started = Instant::now();
    let mut producer = Conn::connect(port)?;
    let target = names.last().context("no keys")?.clone();
    let mut pushed = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        // Pace in 10 ms steps.
        let due = (started.elapsed().as_secs_f64() * rate as f64) as u64;
        while pushed < due {
            producer.call(&["LPUSH", &target, "job"])?;
            pushed += 1;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let wall = started.elapsed().as_secs_f64();
    let jobs = (served.load(Ordering::Relaxed) - served0).max(1) as f64;
    let stats = window.map(|w| w.finish(jobs, "served pop")).transpose()?;
    let (cpu1, (calls1, usec1)) = (main_thread_cpu(pid), brpop_stats(redis));
    let agent1 = agent.map(|a| (agent_bookkeeping(a, pid), process_cpu(a.proc.pid())));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    }
    let _ = producer.call(&["DEL", &target]);
    let (bookkeeping, agent_cpu) = match (agent0, agent1) {
        (Some(((b0, c0), p0)), Some(((b1, c1), p1))) => (
            Some(if c1 > c0 {
                (b1 - b0) / (c1 - c0) * 1e6
            } else {
                0.0
            }),
            Some((p1 - p0) / wall),
        ),
        _ => (None, None),
    };
    let sample = BlockingSample {
        keys,
        with_agent: agent.is_some(),
        served_per_second: jobs / wall,
        main_cpu_us_per_job: (cpu1 - cpu0) / jobs * 1e6,
        info_us_per_call: if calls1 > calls0 {
            (usec1 - usec0) / (calls1 - calls0)
        } else {
            0.0
        },
        agent_bookkeeping_us_per_call: bookkeeping,
        agent_cpu_share: agent_cpu,
    };
    Ok((sample, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_of_this_process_and_its_main_thread() {
        let me = std::process::id();
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(30) {
            std::hint::black_box(0u64);
        }
        let (main, all) = (main_thread_cpu(me), process_cpu(me));
        assert!(main > 0.0 && all > 0.0, "main {main}, all {all}");
        // The test's own thread spun; the process total includes it.
        assert!(all >= 0.02, "all {all}");
    }
}
