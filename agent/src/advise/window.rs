//! The agent's side of `fanout advise`: cumulative counts taken at each snapshot, a bounded
//! history of them, and the [`Observation`] of a window (the difference between now and the
//! reading at the window's start).
//!
//! Counts are keyed by key-name hashes, not names, so the history costs a few numbers per
//! queue; names are looked up once, when an observation is served.

use std::{
    collections::{BTreeMap, VecDeque},
    time::{Duration, Instant},
};

use agent_common::redis::{KeysCost, KEY_BUCKETS};

use super::observation::{
    GroupObservation, KeysBucket, Observation, RedisCost, ServerObservation, VERSION,
};

/// A reading is kept in the history at most this often...
pub const HISTORY_PERIOD: Duration = Duration::from_secs(30);
/// ...and for this long: windows up to 6 hours are served as asked.
pub const HISTORY_SPAN: Duration = Duration::from_secs(6 * 3600);
const HISTORY_READINGS: usize = (HISTORY_SPAN.as_secs() / HISTORY_PERIOD.as_secs()) as usize;

/// What one tracked Redis has done since its probes were set up (cumulative).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RedisCounts {
    pub pid: u32,
    pub port: u16,
    pub version: Option<String>,
    /// Main-thread CPU since the process started, seconds.
    pub main_thread_cpu_seconds: f64,
    /// `None` when the bookkeeping probes are not live.
    pub bookkeeping_seconds: Option<f64>,
    pub blocking_calls: u64,
    pub keys_listed: u64,
    pub served: u64,
    pub by_keys: [KeysCost; KEY_BUCKETS],
}

/// One group's traffic to one server (cumulative), and whom it listens with now.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupCounts {
    pub processes: u32,
    pub connections: u32,
    pub pops: u64,
    /// Pops sent and the keys they listed (both counted at send).
    pub pops_sent: u64,
    pub keys_listed: u64,
    pub served: u64,
    pub timeouts: u64,
    pub errors: u64,
    /// Served pops by key-name hash (`fastpath::served_key_hash`).
    pub served_by_key: BTreeMap<u64, u64>,
    pub unattributed_served: u64,
    /// Hashes of the keys its connections list now.
    pub listened: Vec<u64>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServerCounts {
    pub redis: Option<RedisCounts>,
    pub groups: BTreeMap<String, GroupCounts>,
}

/// Everything `advise` needs, cumulative, at one instant.
#[derive(Clone, Debug, PartialEq)]
pub struct Counts {
    pub taken: Instant,
    /// By `address:port` as the workers reach the server.
    pub servers: BTreeMap<String, ServerCounts>,
}

fn minus(a: u64, b: u64) -> u64 {
    a.saturating_sub(b)
}

impl RedisCounts {
    /// The cost over a window that started at `before` (the same process), or since the
    /// probes were set up (another process: a restart within the window).
    fn since(&self, before: Option<&RedisCounts>) -> RedisCost {
        let base = before.filter(|b| b.pid == self.pid);
        let zero = RedisCounts::default();
        let b = base.unwrap_or(&zero);
        let by_keys = self
            .by_keys
            .iter()
            .zip(b.by_keys.iter())
            .map(|(now, then)| KeysBucket {
                calls: minus(now.calls, then.calls),
                keys: minus(now.keys, then.keys),
                seconds: minus(now.total_ns, then.total_ns) as f64 / 1e9,
            })
            .filter(|k| k.calls > 0)
            .collect();
        RedisCost {
            pid: self.pid,
            port: self.port,
            version: self.version.clone(),
            main_thread_cpu_seconds: (self.main_thread_cpu_seconds
                - if base.is_some() {
                    b.main_thread_cpu_seconds
                } else {
                    0.0
                })
            .max(0.0),
            bookkeeping_seconds: self
                .bookkeeping_seconds
                .map(|s| (s - b.bookkeeping_seconds.unwrap_or(0.0)).max(0.0)),
            blocking_calls: minus(self.blocking_calls, b.blocking_calls),
            keys_listed: minus(self.keys_listed, b.keys_listed),
            served: minus(self.served, b.served),
            by_keys,
        }
    }
}

impl GroupCounts {
    fn since(
        &self,
        group: &str,
        before: Option<&GroupCounts>,
        name_of: &dyn Fn(u64) -> Option<String>,
    ) -> GroupObservation {
        let zero = GroupCounts::default();
        let b = before.unwrap_or(&zero);
        let mut served_by_queue: BTreeMap<String, u64> = BTreeMap::new();
        let mut unattributed = minus(self.unattributed_served, b.unattributed_served);
        for (hash, n) in &self.served_by_key {
            let n = minus(*n, b.served_by_key.get(hash).copied().unwrap_or(0));
            if n == 0 {
                continue;
            }
            match name_of(*hash) {
                Some(name) => *served_by_queue.entry(name).or_default() += n,
                None => unattributed += n,
            }
        }
        let mut queues: Vec<String> = self.listened.iter().filter_map(|h| name_of(*h)).collect();
        queues.sort();
        queues.dedup();
        GroupObservation {
            group: group.to_string(),
            processes: self.processes,
            connections: self.connections,
            pops: minus(self.pops, b.pops),
            pops_sent: minus(self.pops_sent, b.pops_sent),
            keys_listed: minus(self.keys_listed, b.keys_listed),
            served: minus(self.served, b.served),
            timeouts: minus(self.timeouts, b.timeouts),
            errors: minus(self.errors, b.errors),
            queues,
            served_by_queue,
            unattributed_served: unattributed,
        }
    }
}

impl Counts {
    /// The observation of the window from `before` (None: since the agent started) to this
    /// reading. `name_of` turns a key hash into the name to show.
    pub fn since(
        &self,
        before: Option<&Counts>,
        window_seconds: f64,
        names_real: bool,
        name_of: &dyn Fn(u64) -> Option<String>,
    ) -> Observation {
        let servers = self
            .servers
            .iter()
            .map(|(server, now)| {
                let then = before.and_then(|b| b.servers.get(server));
                ServerObservation {
                    server: server.clone(),
                    redis: now
                        .redis
                        .as_ref()
                        .map(|r| r.since(then.and_then(|t| t.redis.as_ref()))),
                    groups: now
                        .groups
                        .iter()
                        .map(|(group, g)| {
                            g.since(group, then.and_then(|t| t.groups.get(group)), name_of)
                        })
                        .collect(),
                }
            })
            .collect();
        Observation {
            version: VERSION,
            window_seconds,
            since_start: before.is_none(),
            names_real,
            servers,
        }
    }
}

/// The latest reading and a bounded history of earlier ones.
#[derive(Debug)]
pub struct AdviseHistory {
    started: Instant,
    readings: VecDeque<Counts>,
    latest: Option<Counts>,
}

impl AdviseHistory {
    pub fn new(started: Instant) -> Self {
        Self {
            started,
            readings: VecDeque::new(),
            latest: None,
        }
    }

    /// Keeps `counts` as the latest, and in the history when the last kept one is at least
    /// [`HISTORY_PERIOD`] older.
    pub fn record(&mut self, counts: Counts) {
        let due = self
            .readings
            .back()
            .is_none_or(|last| counts.taken.duration_since(last.taken) >= HISTORY_PERIOD);
        if due {
            if self.readings.len() >= HISTORY_READINGS {
                self.readings.pop_front();
            }
            self.readings.push_back(counts.clone());
        }
        self.latest = Some(counts);
    }

    /// The observation of the last `window` (None: since the agent started). A window longer
    /// than the history reaches back to the oldest reading kept, or to the start.
    pub fn observation(
        &self,
        window: Option<Duration>,
        names_real: bool,
        name_of: &dyn Fn(u64) -> Option<String>,
    ) -> Option<Observation> {
        let latest = self.latest.as_ref()?;
        let start_window = latest.taken.duration_since(self.started).as_secs_f64();
        let Some(window) = window else {
            return Some(latest.since(None, start_window, names_real, name_of));
        };
        let wanted = latest.taken.checked_sub(window);
        // The newest reading at or before the window's start: the window is at least as long
        // as asked.
        let base = wanted.and_then(|at| self.readings.iter().rev().find(|r| r.taken <= at));
        match base {
            Some(b) => Some(latest.since(
                Some(b),
                latest.taken.duration_since(b.taken).as_secs_f64(),
                names_real,
                name_of,
            )),
            None => Some(latest.since(None, start_window, names_real, name_of)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(at: Instant, pops: u64, served_a: u64, cpu: f64, pid: u32) -> Counts {
        let mut by_keys = [KeysCost::ZERO; KEY_BUCKETS];
        by_keys[8] = KeysCost {
            calls: pops,
            keys: pops * 440,
            total_ns: pops * 100_000,
            phases: pops * 2,
        };
        let group = GroupCounts {
            processes: 2,
            connections: 10,
            pops,
            pops_sent: pops,
            keys_listed: pops * 440,
            served: served_a + 1,
            timeouts: pops - served_a - 1,
            errors: 0,
            served_by_key: BTreeMap::from([(11, served_a), (12, 1)]),
            unattributed_served: 0,
            listened: vec![11, 12, 13],
        };
        Counts {
            taken: at,
            servers: BTreeMap::from([(
                "127.0.0.1:6379".to_string(),
                ServerCounts {
                    redis: Some(RedisCounts {
                        pid,
                        port: 6379,
                        version: None,
                        main_thread_cpu_seconds: cpu,
                        bookkeeping_seconds: Some(pops as f64 * 1e-4),
                        blocking_calls: pops,
                        keys_listed: pops * 440,
                        served: served_a + 1,
                        by_keys,
                    }),
                    groups: BTreeMap::from([("sidekiq".to_string(), group)]),
                },
            )]),
        }
    }

    fn names(h: u64) -> Option<String> {
        match h {
            11 => Some("queue:a".into()),
            12 => Some("queue:b".into()),
            13 => Some("queue:c".into()),
            _ => None,
        }
    }

    #[test]
    fn a_window_is_the_difference_from_the_reading_at_its_start() {
        let t0 = Instant::now();
        let mut h = AdviseHistory::new(t0);
        h.record(counts(t0 + Duration::from_secs(10), 100, 40, 1.0, 7));
        h.record(counts(t0 + Duration::from_secs(20), 150, 60, 1.5, 7)); // not kept: too soon
        h.record(counts(t0 + Duration::from_secs(45), 300, 100, 3.0, 7));
        h.record(counts(t0 + Duration::from_secs(80), 500, 180, 5.0, 7));

        let all = h.observation(None, true, &names).unwrap();
        assert!(all.since_start);
        assert_eq!(all.window_seconds, 80.0);
        let g = &all.servers[0].groups[0];
        assert_eq!((g.pops, g.served), (500, 181));
        assert_eq!(g.served_by_queue["queue:a"], 180);
        assert_eq!(g.queues, vec!["queue:a", "queue:b", "queue:c"]);

        // 40 s back from 80 s is 40 s: the newest reading at or before it is the one at 10 s.
        let w = h
            .observation(Some(Duration::from_secs(40)), true, &names)
            .unwrap();
        assert!(!w.since_start);
        assert_eq!(w.window_seconds, 70.0);
        let g = &w.servers[0].groups[0];
        assert_eq!((g.pops, g.served, g.timeouts), (400, 140, 260));
        assert_eq!(g.served_by_queue["queue:a"], 140);
        assert!(
            !g.served_by_queue.contains_key("queue:b"),
            "no new serve of b"
        );
        let r = w.servers[0].redis.as_ref().unwrap();
        assert!((r.main_thread_cpu_seconds - 4.0).abs() < 1e-9);
        assert_eq!(r.by_keys.len(), 1);
        assert_eq!((r.by_keys[0].calls, r.by_keys[0].keys), (400, 400 * 440));
        assert!((r.bookkeeping_seconds.unwrap() - 0.04).abs() < 1e-9);

        // Longer than anything kept: since the start.
        let long = h
            .observation(Some(Duration::from_secs(3600)), true, &names)
            .unwrap();
        assert!(long.since_start);
    }

    #[test]
    fn a_restarted_redis_counts_from_its_new_start_and_unknown_hashes_are_unattributed() {
        let t0 = Instant::now();
        let mut h = AdviseHistory::new(t0);
        h.record(counts(t0 + Duration::from_secs(10), 100, 40, 9.0, 7));
        let mut later = counts(t0 + Duration::from_secs(50), 300, 100, 2.0, 8);
        if let Some(g) = later
            .servers
            .values_mut()
            .next()
            .unwrap()
            .groups
            .get_mut("sidekiq")
        {
            g.served_by_key.insert(99, 5);
        }
        h.record(later);
        let w = h
            .observation(Some(Duration::from_secs(40)), true, &names)
            .unwrap();
        let r = w.servers[0].redis.as_ref().unwrap();
        assert_eq!(r.pid, 8);
        assert_eq!(r.main_thread_cpu_seconds, 2.0, "the new process's own CPU");
        assert_eq!(r.blocking_calls, 300);
        assert_eq!(w.servers[0].groups[0].unattributed_served, 5);
    }

    #[test]
    fn the_history_is_bounded() {
        let t0 = Instant::now();
        let mut h = AdviseHistory::new(t0);
        for i in 0..(HISTORY_READINGS as u64 + 50) {
            h.record(counts(
                t0 + HISTORY_PERIOD * (i as u32 + 1),
                i + 2,
                1,
                0.0,
                7,
            ));
        }
        assert_eq!(h.readings.len(), HISTORY_READINGS);
    }
}
