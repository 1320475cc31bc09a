//! What `fanout top` shows, computed from two readings: one row per Redis, one per worker
//! group, and the agent's health. Rates and percentiles need both readings; with one, only
//! gauges are known and the view says so.

use std::collections::BTreeSet;

use super::{
    reading::{Histogram, Reading, Series},
    stats::{histogram_increase, increase, max_bound, merge, quantile},
};

/// The alert rules' thresholds (deploy/alerts/fanout.rules.yml), so that the view turns
/// warning and critical where the alerts would.
pub const MAIN_THREAD_WARNING: f64 = 0.8;
pub const MAIN_THREAD_CRITICAL: f64 = 0.95;
pub const BOOKKEEPING_WARNING: f64 = 0.2;
pub const RUNQUEUE_MEAN_WARNING_S: f64 = 0.001;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct RedisRow {
    pub pid: u32,
    pub port: Option<u16>,
    /// Main thread, in cores (user + system), and its split.
    pub main_cpu: Option<f64>,
    pub main_user: Option<f64>,
    pub main_system: Option<f64>,
    pub runqueue_p99_s: Option<f64>,
    pub io_threads_cpu: Option<f64>,
    pub bio_threads_cpu: Option<f64>,
    pub clients_blocked: Option<f64>,
    pub registrations: Option<f64>,
    pub pops_per_s: Option<f64>,
    pub keys_mean: Option<f64>,
    /// The upper bound of the highest bucket that had a pop ("at most").
    pub keys_max: Option<f64>,
    /// Shares of blocking pops that ended served, timed out, or otherwise.
    pub served: Option<f64>,
    pub timeout: Option<f64>,
    pub other: Option<f64>,
    /// Blocking bookkeeping as a share of the main thread.
    pub bookkeeping: Option<f64>,
    /// Probe points not live or idle, as `probe=state`.
    pub points_not_live: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkerRow {
    pub group: String,
    pub processes: Option<f64>,
    pub pops_per_s: Option<f64>,
    pub keys_mean: Option<f64>,
    pub served_p50_s: Option<f64>,
    pub served_p99_s: Option<f64>,
    pub timeout_p99_s: Option<f64>,
    /// Pops that ended in an error during the interval.
    pub errors: Option<f64>,
    pub queues: Option<f64>,
    /// Queues this group shares with other groups (summed over peers).
    pub shared: Option<f64>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Health {
    /// Redis probe points missing, unreliable, failed or unavailable.
    pub points_not_live: usize,
    /// eBPF programs that could not be attached.
    pub programs_not_attached: usize,
    pub events_lost: f64,
    pub events_lost_in_interval: Option<f64>,
    pub export_failures: f64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct View {
    pub redis: Vec<RedisRow>,
    pub workers: Vec<WorkerRow>,
    pub health: Health,
    /// Seconds between the two readings; `None` with a single reading.
    pub interval_s: Option<f64>,
    pub agent_version: String,
    /// Metrics this view uses that the agent did not send (an older or newer agent, or
    /// no eBPF): their columns stay empty.
    pub missing: Vec<&'static str>,
}

const THREAD_CPU: &str = "process.thread.cpu.time";
const RUNQUEUE: &str = "process.thread.runqueue.delay";
const REDIS_KEYS: &str = "redis.blocking.keys";
const REDIS_DURATION: &str = "redis.blocking.duration";
const REDIS_BLOCKED: &str = "redis.clients.blocked";
const REDIS_REGISTRATIONS: &str = "redis.blocking.registrations";
const REDIS_BOOKKEEPING: &str = "redis.blocking.cpu.time";
const PROBE_POINTS: &str = "fanout.probe.points";
const WORKER_DURATION: &str = "worker.blocking_pop.duration";
const WORKER_KEYS: &str = "worker.blocking_pop.keys";
const WORKER_QUEUES: &str = "worker.queues.listened";
const QUEUES_SHARED: &str = "worker.queues.shared";
const PROCESSES: &str = "fanout.processes.tracked";
const PROBES_ATTACHED: &str = "fanout.probes.attached";
const EVENTS_LOST: &str = "fanout.events.lost";
const EXPORT_FAILURES: &str = "fanout.export.failures";

/// The metrics a full view needs: the ones every agent with eBPF sends.
const EXPECTED: [&str; 6] = [
    THREAD_CPU,
    RUNQUEUE,
    PROBES_ATTACHED,
    PROCESSES,
    EVENTS_LOST,
    EXPORT_FAILURES,
];

/// The Redis server group's name (see `rules`).
const REDIS_GROUP: &str = "redis";

fn pid_of(s: &Series) -> Option<u32> {
    s.attr("process.pid")?.parse().ok()
}

/// The same series in the previous reading (same attributes).
fn previous<'a>(prev: Option<&'a Reading>, name: &str, s: &Series) -> Option<&'a Series> {
    prev?
        .series(name)
        .iter()
        .find(|p| p.attributes == s.attributes)
}

/// A Redis main thread is named after its program (the kernel keeps 15 bytes).
fn is_main_thread(thread: &str, executable: Option<&str>) -> bool {
    thread == "redis-server"
        || thread == "valkey-server"
        || executable.is_some_and(|e| e.chars().take(15).eq(thread.chars()))
}

/// Counter increase per second of the series of `name` that `keep` accepts.
fn rate(
    prev: Option<&Reading>,
    cur: &Reading,
    dt: Option<f64>,
    name: &str,
    keep: impl Fn(&Series) -> bool,
) -> Option<f64> {
    let dt = dt?;
    let mut total = 0.0;
    let mut any = false;
    for s in cur.series(name).iter().filter(|s| keep(s)) {
        let Some(now) = s.number() else { continue };
        let before = previous(prev, name, s)
            .and_then(Series::number)
            .unwrap_or(0.0);
        total += increase(before, now);
        any = true;
    }
    any.then_some(total / dt)
}

/// Merged histogram increases of the series of `name` that `keep` accepts.
fn histogram_delta(
    prev: Option<&Reading>,
    cur: &Reading,
    name: &str,
    keep: impl Fn(&Series) -> bool,
) -> Option<Histogram> {
    prev?;
    let mut merged = None;
    for s in cur.series(name).iter().filter(|s| keep(s)) {
        let Some(h) = s.histogram() else { continue };
        let before = previous(prev, name, s).and_then(Series::histogram);
        if let Some(d) = histogram_increase(before, h) {
            merge(&mut merged, &d);
        }
    }
    merged
}

fn gauge_sum(cur: &Reading, name: &str, keep: impl Fn(&Series) -> bool) -> Option<f64> {
    let values: Vec<f64> = cur
        .series(name)
        .iter()
        .filter(|s| keep(s))
        .filter_map(Series::number)
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

impl View {
    /// The view from the latest reading `cur` and, for rates, the one before it.
    pub fn compute(prev: Option<&Reading>, cur: &Reading) -> View {
        let dt = prev
            .map(|p| cur.time_ms.saturating_sub(p.time_ms) as f64 / 1000.0)
            .filter(|dt| *dt > 0.0);
        let prev = prev.filter(|_| dt.is_some());
        let mut view = View {
            interval_s: dt,
            agent_version: cur.agent_version.clone(),
            missing: EXPECTED
                .iter()
                .copied()
                .filter(|m| !cur.metrics.contains_key(*m))
                .collect(),
            ..Default::default()
        };

        // Redis rows: every pid the agent reports as a Redis.
        let mut pids: BTreeSet<u32> = cur
            .series(THREAD_CPU)
            .iter()
            .filter(|s| s.attr("process.group") == Some(REDIS_GROUP))
            .filter_map(pid_of)
            .collect();
        pids.extend(cur.series(PROBE_POINTS).iter().filter_map(pid_of));
        for pid in pids {
            view.redis.push(redis_row(prev, cur, dt, pid));
        }

        // Worker groups: every group with worker-side series or tracked processes, except
        // Redis itself.
        let mut groups: BTreeSet<String> = BTreeSet::new();
        for name in [WORKER_DURATION, WORKER_KEYS, WORKER_QUEUES] {
            groups.extend(
                cur.series(name)
                    .iter()
                    .filter_map(|s| s.attr("process.group").map(str::to_string)),
            );
        }
        groups.extend(
            cur.series(PROCESSES)
                .iter()
                .filter_map(|s| s.attr("process.group"))
                .filter(|g| *g != REDIS_GROUP)
                .map(str::to_string),
        );
        for group in groups {
            view.workers.push(worker_row(prev, cur, dt, &group));
        }

        let bad_point = |s: &Series| {
            s.number() == Some(1.0)
                && matches!(
                    s.attr("state"),
                    Some("missing" | "unreliable" | "attach_failed" | "unavailable")
                )
        };
        view.health = Health {
            points_not_live: cur
                .series(PROBE_POINTS)
                .iter()
                .filter(|s| bad_point(s))
                .count(),
            programs_not_attached: cur
                .series(PROBES_ATTACHED)
                .iter()
                .filter(|s| s.number() == Some(0.0))
                .count(),
            events_lost: gauge_sum(cur, EVENTS_LOST, |_| true).unwrap_or(0.0),
            events_lost_in_interval: rate(prev, cur, dt, EVENTS_LOST, |_| true)
                .zip(dt)
                .map(|(r, dt)| r * dt),
            export_failures: gauge_sum(cur, EXPORT_FAILURES, |_| true).unwrap_or(0.0),
        };
        view
    }
}

fn redis_row(prev: Option<&Reading>, cur: &Reading, dt: Option<f64>, pid: u32) -> RedisRow {
    let mine = |s: &Series| pid_of(s) == Some(pid);
    let port = [REDIS_KEYS, REDIS_BLOCKED, PROBE_POINTS, REDIS_DURATION]
        .iter()
        .flat_map(|name| cur.series(name))
        .filter(|s| mine(s))
        .find_map(|s| s.attr("server.port")?.parse().ok());
    let main = |s: &Series| {
        mine(s)
            && s.attr("thread.name")
                .is_some_and(|t| is_main_thread(t, s.attr("process.executable.name")))
    };
    let mode = |m: &'static str| move |s: &Series| main(s) && s.attr("cpu.mode") == Some(m);
    let main_user = rate(prev, cur, dt, THREAD_CPU, mode("user"));
    let main_system = rate(prev, cur, dt, THREAD_CPU, mode("system"));
    let main_cpu = main_user.zip(main_system).map(|(u, s)| u + s);
    let threads_named = |prefix: &'static str| {
        move |s: &Series| mine(s) && s.attr("thread.name").is_some_and(|t| t.starts_with(prefix))
    };
    let keys = histogram_delta(prev, cur, REDIS_KEYS, mine);
    let outcome = |o: &'static str| {
        histogram_delta(prev, cur, REDIS_DURATION, move |s| {
            mine(s) && s.attr("outcome") == Some(o)
        })
        .map(|h| h.count as f64)
    };
    let (served, timeout, other) = (outcome("served"), outcome("timeout"), outcome("other"));
    let ended = served.unwrap_or(0.0) + timeout.unwrap_or(0.0) + other.unwrap_or(0.0);
    let share = |n: Option<f64>| (ended > 0.0).then(|| n.unwrap_or(0.0) / ended);
    let bookkeeping = rate(prev, cur, dt, REDIS_BOOKKEEPING, mine);
    let mut points_not_live: Vec<String> = cur
        .series(PROBE_POINTS)
        .iter()
        .filter(|s| mine(s) && s.number() == Some(1.0))
        .filter_map(|s| {
            let state = s.attr("state")?;
            (!matches!(state, "live" | "idle"))
                .then(|| format!("{}={state}", s.attr("probe").unwrap_or("?")))
        })
        .collect();
    points_not_live.sort();
    RedisRow {
        pid,
        port,
        main_cpu,
        main_user,
        main_system,
        runqueue_p99_s: histogram_delta(prev, cur, RUNQUEUE, main).and_then(|h| quantile(0.99, &h)),
        io_threads_cpu: rate(prev, cur, dt, THREAD_CPU, threads_named("io_thd")),
        bio_threads_cpu: rate(prev, cur, dt, THREAD_CPU, threads_named("bio_")),
        clients_blocked: gauge_sum(cur, REDIS_BLOCKED, mine),
        registrations: gauge_sum(cur, REDIS_REGISTRATIONS, mine),
        pops_per_s: keys.as_ref().zip(dt).map(|(h, dt)| h.count as f64 / dt),
        keys_mean: keys
            .as_ref()
            .filter(|h| h.count > 0)
            .map(|h| h.sum / h.count as f64),
        keys_max: keys.as_ref().and_then(max_bound),
        served: share(served),
        timeout: share(timeout),
        other: share(other),
        bookkeeping: bookkeeping
            .zip(main_cpu)
            .filter(|(_, m)| *m > 0.0)
            .map(|(b, m)| b / m),
        points_not_live,
    }
}

fn worker_row(prev: Option<&Reading>, cur: &Reading, dt: Option<f64>, group: &str) -> WorkerRow {
    let mine = |s: &Series| s.attr("process.group") == Some(group);
    let by_outcome = |o: &'static str| {
        histogram_delta(prev, cur, WORKER_DURATION, move |s| {
            mine(s) && s.attr("outcome") == Some(o)
        })
    };
    let all = histogram_delta(prev, cur, WORKER_DURATION, mine);
    let served = by_outcome("served");
    let keys = histogram_delta(prev, cur, WORKER_KEYS, mine);
    let queues = gauge_sum(cur, WORKER_QUEUES, mine);
    WorkerRow {
        group: group.to_string(),
        processes: gauge_sum(cur, PROCESSES, mine),
        pops_per_s: all.as_ref().zip(dt).map(|(h, dt)| h.count as f64 / dt),
        keys_mean: keys
            .as_ref()
            .filter(|h| h.count > 0)
            .map(|h| h.sum / h.count as f64),
        served_p50_s: served.as_ref().and_then(|h| quantile(0.5, h)),
        served_p99_s: served.as_ref().and_then(|h| quantile(0.99, h)),
        timeout_p99_s: by_outcome("timeout")
            .as_ref()
            .and_then(|h| quantile(0.99, h)),
        // Zero, not unknown, once pops were seen and none failed.
        errors: all
            .as_ref()
            .map(|_| by_outcome("error").map_or(0.0, |h| h.count as f64)),
        queues,
        // Zero when the group's queues are known and no other group shares one.
        shared: gauge_sum(cur, QUEUES_SHARED, mine).or(queues.map(|_| 0.0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::top::reading::Value;
    use std::collections::BTreeMap;

    fn series(attrs: &[(&str, &str)], value: Value) -> Series {
        Series {
            attributes: attrs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value,
        }
    }

    fn hist(bounds: &[f64], counts: &[u64], sum: f64) -> Value {
        Value::Histogram(Histogram {
            bounds: bounds.to_vec(),
            counts: counts.to_vec(),
            sum,
            count: counts.iter().sum(),
        })
    }

    /// A Redis (pid 7) and a worker group at time `ms`: main-thread CPU `user`/`system`
    /// seconds, `pops` blocking pops of 20 keys each (half served, half timed out).
    fn reading(ms: u64, user: f64, system: f64, pops: u64) -> Reading {
        let main = |mode: &str| {
            series(
                &[
                    ("process.group", "redis"),
                    ("process.pid", "7"),
                    ("process.executable.name", "redis-server"),
                    ("thread.name", "redis-server"),
                    ("cpu.mode", mode),
                ],
                Value::Number(if mode == "user" { user } else { system }),
            )
        };
        let redis = [
            ("process.pid", "7"),
            ("server.port", "6379"),
            ("redis.block.type", "list"),
        ];
        let outcome = |o: &str| {
            let mut a = redis.to_vec();
            a.push(("outcome", o));
            series(&a, hist(&[0.1, 1.0], &[pops / 2, 0, 0], 0.01 * pops as f64))
        };
        let mut metrics = BTreeMap::new();
        metrics.insert(THREAD_CPU.to_string(), vec![main("user"), main("system")]);
        metrics.insert(
            REDIS_KEYS.to_string(),
            vec![series(
                &redis,
                hist(&[1.0, 20.0, 50.0], &[0, pops, 0, 0], 20.0 * pops as f64),
            )],
        );
        metrics.insert(
            REDIS_DURATION.to_string(),
            vec![outcome("served"), outcome("timeout")],
        );
        metrics.insert(
            REDIS_BOOKKEEPING.to_string(),
            vec![series(
                &[("process.pid", "7"), ("redis.blocking.phase", "register")],
                Value::Number(user / 10.0),
            )],
        );
        metrics.insert(
            WORKER_DURATION.to_string(),
            vec![series(
                &[("process.group", "sidekiq"), ("outcome", "served")],
                hist(&[0.001, 0.01, 0.1], &[0, pops, 0, 0], 0.005 * pops as f64),
            )],
        );
        metrics.insert(
            WORKER_QUEUES.to_string(),
            vec![series(&[("process.group", "sidekiq")], Value::Number(20.0))],
        );
        Reading {
            time_ms: ms,
            agent_version: "0.1.0".into(),
            metrics,
        }
    }

    #[test]
    fn rates_and_shares_come_from_the_difference_of_two_readings() {
        let a = reading(10_000, 100.0, 20.0, 1000);
        let b = reading(12_000, 101.2, 20.4, 1400);
        let v = View::compute(Some(&a), &b);
        assert_eq!(v.interval_s, Some(2.0));
        let r = &v.redis[0];
        assert_eq!((r.pid, r.port), (7, Some(6379)));
        assert!((r.main_cpu.unwrap() - 0.8).abs() < 1e-9, "{:?}", r.main_cpu);
        assert!((r.main_user.unwrap() - 0.6).abs() < 1e-9);
        assert_eq!(r.pops_per_s, Some(200.0));
        assert_eq!(r.keys_mean, Some(20.0));
        assert_eq!(r.keys_max, Some(20.0));
        assert_eq!(
            (r.served, r.timeout, r.other),
            (Some(0.5), Some(0.5), Some(0.0))
        );
        // 0.12 s of bookkeeping in 2 s against 0.8 cores: 7.5% of the main thread.
        assert!(
            (r.bookkeeping.unwrap() - 0.075).abs() < 1e-9,
            "{:?}",
            r.bookkeeping
        );
        let w = &v.workers[0];
        assert_eq!(w.group, "sidekiq");
        assert_eq!(w.pops_per_s, Some(200.0));
        assert_eq!(w.errors, Some(0.0));
        assert_eq!(w.queues, Some(20.0));
        // Everything in (1 ms, 10 ms]: p50 halfway.
        assert!(
            (w.served_p50_s.unwrap() - 0.0055).abs() < 1e-9,
            "{:?}",
            w.served_p50_s
        );
    }

    #[test]
    fn one_reading_gives_gauges_only_and_a_restart_counts_from_zero() {
        let a = reading(10_000, 100.0, 20.0, 1000);
        let v = View::compute(None, &a);
        assert_eq!(v.interval_s, None);
        assert_eq!(v.redis[0].main_cpu, None);
        assert_eq!(v.redis[0].pops_per_s, None);
        assert_eq!(v.workers[0].queues, Some(20.0));
        // The Redis restarted between the readings (same pid, as in a container): its
        // counters start again, and what they hold now is the increase.
        let b = reading(11_000, 0.5, 0.1, 10);
        let v = View::compute(Some(&a), &b);
        assert!((v.redis[0].main_cpu.unwrap() - 0.6).abs() < 1e-9);
        assert_eq!(v.redis[0].pops_per_s, Some(10.0));
        assert!(v.missing.contains(&RUNQUEUE), "{:?}", v.missing);
    }
}
