//! The Redis side: which probe points each tracked redis-server has, whether their numbers
//! can be trusted, and the `redis.*` metrics built from the kernel's aggregates.

pub mod binary;
pub mod block_calls;
pub mod machine_code;
pub mod unblock_paths;

use std::collections::BTreeMap;

use agent_common::redis::{outcome, phase, point, KEY_BOUNDS};

use crate::{
    collect::log2_to_seconds_between,
    ebpf::redis::{PointState, RedisReadings, POINT_SYMBOLS, SERVING_POINT, UNBLOCK_POINT},
    metrics::{catalog, AttrValue, Attributes, HistogramValue, Point, PointValue, Snapshot},
};
use binary::{BinaryId, Family};

/// Blocking durations are exported from 1.024 us (2^10 ns) to 275 s (2^38 ns).
const DURATION_FIRST_BUCKET: usize = 10;
const DURATION_LAST_BUCKET: usize = 38;

/// A tracked Redis process and its probes.
#[derive(Clone, Debug)]
pub struct RedisTarget {
    pub pid: u32,
    /// Its start time (what tells it from a later process with the same pid).
    pub start_ticks: u64,
    /// `server.port`: the port it listens on, from its listening sockets (see
    /// `proc_reader::net::service_address`); `None` until it has bound one.
    pub port: Option<u16>,
    /// `server.address`: only when it listens on a specific address (not 0.0.0.0 or `::`).
    pub address: Option<std::net::IpAddr>,
    pub binary: Option<BinaryId>,
    pub family: Option<Family>,
    pub points: BTreeMap<&'static str, PointState>,
    /// Its binary was handed to the attaching thread (`points` stay empty until installed).
    pub attach_requested: bool,
    /// Its `/proc/<pid>/exe` link could not be read when it was found: retried at each rescan.
    pub exe_unreadable: bool,
    /// Why nothing could be attached (binary unreadable, no eBPF), if so.
    pub unavailable: Option<String>,
    /// Problems already logged, so each is logged once.
    pub reported: Vec<String>,
    pub since: std::time::SystemTime,
    /// Whether the bookkeeping return probes were attached (`--no-redis-bookkeeping-time`).
    pub bookkeeping_time: bool,
    /// Whether a bookkeeping phase in which the main thread was switched out is told from
    /// one that stayed on its CPU (`RedisMaps::sees_switches`).
    pub sees_switches: bool,
    /// Why the binary's machine code shows unblocks bypassing every probe, if it does.
    pub unblock_bypassed: Option<String>,
}

/// Which metric families can be trusted for one process, and why others cannot.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Verdict {
    pub fanout: bool,
    pub durations: bool,
    pub gauges: bool,
    pub bookkeeping: bool,
    pub problems: Vec<String>,
}

/// Missed unblocks (a client blocking again while still blocked, as far as the probes saw)
/// above this share of blocking calls mean `unblockClient` is bypassed, as in LTO builds.
const MISSED_UNBLOCK_MIN: u64 = 3;
const MISSED_UNBLOCK_PERCENT: u64 = 1;

pub fn unblock_bypassed(hits: &[u64; point::COUNT]) -> bool {
    let missed = hits[point::MISSED_UNBLOCK as usize];
    let blocks = hits[point::BLOCK_FOR_KEYS as usize];
    missed >= MISSED_UNBLOCK_MIN && missed * 100 >= blocks * MISSED_UNBLOCK_PERCENT
}

/// Decides what to export from the attached points, what the binary's code shows
/// (`static_bypass`) and what the probes have seen.
pub fn evaluate(
    points: &BTreeMap<&'static str, PointState>,
    hits: &[u64; point::COUNT],
    static_bypass: Option<&str>,
) -> Verdict {
    let attached = |symbol: &str| points.get(symbol) == Some(&PointState::Attached);
    let mut problems = Vec::new();
    for (symbol, state) in points {
        match state {
            PointState::Attached => {}
            PointState::Missing => {
                problems.push(format!("{symbol} is not exported by this binary"))
            }
            PointState::AttachFailed(e) => {
                problems.push(format!("{symbol} could not be attached: {e}"))
            }
        }
    }
    let block = attached("blockForKeys");
    let mut unblock = attached(UNBLOCK_POINT);
    if unblock {
        if let Some(why) = static_bypass {
            unblock = false;
            problems.push(format!(
                "unblocks bypass unblockClient in this build ({why}); durations, outcomes, \
                 gauges and bookkeeping time are not exported"
            ));
        } else if unblock_bypassed(hits) {
            unblock = false;
            problems.push(format!(
                "unblockClient is bypassed: {} of {} blocking calls were never seen to unblock (an LTO build?); \
                 durations, outcomes, gauges and bookkeeping time are not exported",
                hits[point::MISSED_UNBLOCK as usize],
                hits[point::BLOCK_FOR_KEYS as usize]
            ));
        }
    }
    // The serving window is in `points` only for the layouts that use it.
    let serving = !points.contains_key(SERVING_POINT) || attached(SERVING_POINT);
    let outcomes = attached("replyToBlockedClientTimedOut") && serving;
    Verdict {
        fanout: block,
        durations: block && unblock && outcomes,
        gauges: block && unblock,
        bookkeeping: block && unblock,
        problems,
    }
}

/// The state of each point this binary uses, for `fanout.probe.points`: attached points are
/// `live` once hit, `idle` before; `unreliable` when bypassed.
pub fn point_states(
    points: &BTreeMap<&'static str, PointState>,
    hits: &[u64; point::COUNT],
    static_bypass: bool,
) -> Vec<(&'static str, &'static str)> {
    POINT_SYMBOLS
        .iter()
        .filter_map(|(symbol, index)| {
            let state = match points.get(symbol)? {
                PointState::Attached
                    if *symbol == UNBLOCK_POINT && (static_bypass || unblock_bypassed(hits)) =>
                {
                    "unreliable"
                }
                PointState::Attached if hits[*index as usize] > 0 => "live",
                PointState::Attached => "idle",
                other => other.label(),
            };
            Some((*symbol, state))
        })
        .collect()
}

fn outcome_label(kind: u32) -> &'static str {
    match kind {
        outcome::SERVED => "served",
        outcome::TIMEOUT => "timeout",
        _ => "other",
    }
}

impl RedisTarget {
    fn attributes(&self) -> Attributes {
        let mut attrs: Attributes = vec![("process.pid", AttrValue::from(self.pid))];
        if let Some(address) = self.address {
            attrs.push(("server.address", AttrValue::from(address.to_string())));
        }
        if let Some(port) = self.port {
            attrs.push(("server.port", AttrValue::Int(port as i64)));
        }
        attrs
    }

    /// What `fanout advise` needs of this Redis (cumulative), when its probes can say it:
    /// calls, keys and served counts need the fan-out and outcome verdicts, the bookkeeping
    /// time its own. `main_thread_cpu_seconds` comes from /proc.
    pub fn advise_counts(
        &self,
        readings: Option<&RedisReadings>,
        main_thread_cpu_seconds: f64,
    ) -> Option<crate::advise::window::RedisCounts> {
        let port = self.port?;
        if self.unavailable.is_some() {
            return None;
        }
        let empty = RedisReadings::default();
        let readings = readings.unwrap_or(&empty);
        let verdict = evaluate(
            &self.points,
            &readings.hits,
            self.unblock_bypassed.as_deref(),
        );
        let served = if verdict.durations {
            readings
                .durations
                .iter()
                .filter(|((_, kind), _)| *kind == outcome::SERVED)
                .map(|(_, h)| h.count)
                .sum()
        } else {
            0
        };
        let (calls, keys) = if verdict.fanout {
            readings
                .keys
                .values()
                .fold((0, 0), |(c, k), h| (c + h.count, k + h.sum))
        } else {
            (0, 0)
        };
        let bookkeeping = (verdict.bookkeeping && self.bookkeeping_time).then(|| {
            readings
                .bookkeeping
                .values()
                .map(|t| t.total_ns)
                .sum::<u64>() as f64
                / 1e9
        });
        Some(crate::advise::window::RedisCounts {
            pid: self.pid,
            port,
            version: None,
            main_thread_cpu_seconds,
            bookkeeping_seconds: bookkeeping,
            blocking_calls: calls,
            keys_listed: keys,
            served,
            by_keys: if bookkeeping.is_some() {
                readings.bookkeeping_by_keys
            } else {
                Default::default()
            },
        })
    }

    /// Adds this process's `redis.*` series and its probe-point states to the snapshot. Logs
    /// each new problem once.
    pub fn emit(&mut self, readings: Option<&RedisReadings>, snapshot: &mut Snapshot) {
        let empty = RedisReadings::default();
        let readings = readings.unwrap_or(&empty);
        let base = self.attributes();
        let epoch = std::time::UNIX_EPOCH;
        if let Some(reason) = &self.unavailable {
            for (symbol, _) in POINT_SYMBOLS {
                let mut attrs = base.clone();
                attrs.push(("probe", symbol.into()));
                attrs.push(("state", "unavailable".into()));
                snapshot.push(
                    catalog::PROBE_POINTS,
                    Point {
                        attributes: attrs,
                        start_time: epoch,
                        value: PointValue::Gauge(1.0),
                    },
                );
            }
            if !self.reported.iter().any(|r| r == reason) {
                tracing::warn!(pid = self.pid, reason = %reason, "no blocking probes for this Redis; exporting no redis.* metrics for it");
                self.reported.push(reason.clone());
            }
            return;
        }
        if self.attach_requested && self.binary.is_none() {
            // Its binary is being inspected and probed (a few ms; longer for a binary not
            // seen before): its points appear once their state is known.
            return;
        }
        let static_bypass = self.unblock_bypassed.as_deref();
        for (symbol, state) in point_states(&self.points, &readings.hits, static_bypass.is_some()) {
            let mut attrs = base.clone();
            attrs.push(("probe", symbol.into()));
            attrs.push(("state", state.into()));
            snapshot.push(
                catalog::PROBE_POINTS,
                Point {
                    attributes: attrs,
                    start_time: epoch,
                    value: PointValue::Gauge(1.0),
                },
            );
        }
        let verdict = evaluate(&self.points, &readings.hits, static_bypass);
        for problem in &verdict.problems {
            if !self.reported.contains(problem) {
                tracing::warn!(pid = self.pid, problem = %problem, "Redis blocking probe problem");
                self.reported.push(problem.clone());
            }
        }
        let Some(family) = self.family else { return };

        if verdict.fanout {
            for (btype, h) in &readings.keys {
                let Some(block_type) = family.block_type(*btype) else {
                    continue;
                };
                let mut attrs = base.clone();
                attrs.insert(0, ("redis.block.type", block_type.into()));
                let value = HistogramValue {
                    bounds: KEY_BOUNDS.iter().map(|b| *b as f64).collect(),
                    counts: h.buckets.to_vec(),
                    sum: h.sum as f64,
                    count: h.count,
                };
                snapshot.push(
                    catalog::REDIS_BLOCKING_KEYS,
                    Point {
                        attributes: attrs,
                        start_time: self.since,
                        value: PointValue::Histogram(value),
                    },
                );
            }
        }
        if verdict.durations {
            for ((btype, kind), h) in &readings.durations {
                let Some(block_type) = family.block_type(*btype) else {
                    continue;
                };
                let mut attrs = base.clone();
                attrs.insert(0, ("redis.block.type", block_type.into()));
                attrs.insert(1, ("outcome", outcome_label(*kind).into()));
                let value = log2_to_seconds_between(h, DURATION_FIRST_BUCKET, DURATION_LAST_BUCKET);
                snapshot.push(
                    catalog::REDIS_BLOCKING_DURATION,
                    Point {
                        attributes: attrs,
                        start_time: self.since,
                        value: PointValue::Histogram(value),
                    },
                );
            }
        }
        if verdict.gauges {
            snapshot.push(
                catalog::REDIS_CLIENTS_BLOCKED,
                Point {
                    attributes: base.clone(),
                    start_time: epoch,
                    value: PointValue::Gauge(readings.blocked_clients as f64),
                },
            );
            snapshot.push(
                catalog::REDIS_BLOCKING_REGISTRATIONS,
                Point {
                    attributes: base.clone(),
                    start_time: epoch,
                    value: PointValue::Gauge(readings.registrations as f64),
                },
            );
        }
        if verdict.bookkeeping && self.bookkeeping_time {
            for (which, label) in [
                (phase::REGISTER, "register"),
                (phase::UNREGISTER, "unregister"),
            ] {
                let time = readings
                    .bookkeeping
                    .get(&which)
                    .copied()
                    .unwrap_or_default();
                let mut attrs = base.clone();
                attrs.push(("redis.blocking.phase", label.into()));
                snapshot.push(
                    catalog::REDIS_BLOCKING_CPU_TIME,
                    Point {
                        attributes: attrs.clone(),
                        start_time: self.since,
                        value: PointValue::Counter(time.total_ns as f64 / 1e9),
                    },
                );
                let switched_out = time.switched_out.min(time.calls);
                let untimed = time.untimed.min(switched_out);
                let by_timing = if self.sees_switches {
                    vec![
                        ("on_cpu", time.calls - switched_out),
                        ("switched_out", switched_out - untimed),
                        ("untimed", untimed),
                    ]
                } else {
                    // The kernel keeps no count to tell them apart: all by the clock.
                    vec![("wall_clock", time.calls)]
                };
                for (timing, phases) in by_timing {
                    let mut attrs = attrs.clone();
                    attrs.push(("timing", timing.into()));
                    snapshot.push(
                        catalog::REDIS_BLOCKING_PHASES,
                        Point {
                            attributes: attrs,
                            start_time: self.since,
                            value: PointValue::Counter(phases as f64),
                        },
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_attached() -> BTreeMap<&'static str, PointState> {
        POINT_SYMBOLS
            .iter()
            .map(|(s, _)| (*s, PointState::Attached))
            .collect()
    }

    fn hits(block: u64, unblock: u64, missed: u64) -> [u64; point::COUNT] {
        let mut h = [0; point::COUNT];
        h[point::BLOCK_FOR_KEYS as usize] = block;
        h[point::UNBLOCK_CLIENT as usize] = unblock;
        h[point::MISSED_UNBLOCK as usize] = missed;
        h
    }

    #[test]
    fn everything_exported_when_all_points_are_attached_and_unblocks_are_seen() {
        let v = evaluate(&all_attached(), &hits(100, 100, 0), None);
        assert_eq!(
            v,
            Verdict {
                fanout: true,
                durations: true,
                gauges: true,
                bookkeeping: true,
                problems: vec![]
            }
        );
    }

    #[test]
    fn a_bypassed_unblock_keeps_fanout_and_drops_the_rest() {
        // LTO build: every client blocks again without its unblock being seen.
        let v = evaluate(&all_attached(), &hits(100, 2, 60), None);
        assert!(v.fanout);
        assert!(!v.durations && !v.gauges && !v.bookkeeping);
        assert!(v.problems[0].contains("bypassed"), "{:?}", v.problems);
        // One stray miss (a client blocked across an agent restart) is not evidence.
        assert!(evaluate(&all_attached(), &hits(100, 99, 1), None).durations);
    }

    #[test]
    fn missing_points_are_named_and_nothing_depending_on_them_is_exported() {
        let mut points = all_attached();
        points.insert(SERVING_POINT, PointState::Missing);
        let v = evaluate(&points, &hits(10, 10, 0), None);
        assert!(v.fanout && v.gauges && !v.durations);
        assert_eq!(
            v.problems,
            vec!["serveClientsBlockedOnKey is not exported by this binary".to_string()]
        );
        let mut points = all_attached();
        points.insert("blockForKeys", PointState::Missing);
        let v = evaluate(&points, &hits(0, 0, 0), None);
        assert!(!v.fanout && !v.durations && !v.gauges && !v.bookkeeping);
    }

    #[test]
    fn point_states_distinguish_idle_live_missing_and_unreliable() {
        let mut points = all_attached();
        points.insert(SERVING_POINT, PointState::Missing);
        let states: BTreeMap<_, _> = point_states(&points, &hits(5, 0, 0), false)
            .into_iter()
            .collect();
        assert_eq!(states["blockForKeys"], "live");
        assert_eq!(states["unblockClient"], "idle");
        assert_eq!(states[SERVING_POINT], "missing");
        let states: BTreeMap<_, _> = point_states(&all_attached(), &hits(100, 0, 50), false)
            .into_iter()
            .collect();
        assert_eq!(states["unblockClient"], "unreliable");
    }

    #[test]
    fn a_layout_without_a_serving_window_needs_none_for_outcomes() {
        // 7.2+: the point is not in the map at all.
        let mut points = all_attached();
        points.remove(SERVING_POINT);
        let v = evaluate(&points, &hits(10, 10, 0), None);
        assert!(v.durations && v.gauges && v.problems.is_empty(), "{v:?}");
        let states: Vec<_> = point_states(&points, &hits(10, 10, 0), false);
        assert_eq!(
            states.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            vec![
                "blockForKeys",
                "unblockClient",
                "replyToBlockedClientTimedOut"
            ]
        );
    }

    #[test]
    fn unblocks_the_machine_code_shows_bypassed_are_unreliable_from_the_start() {
        let v = evaluate(&all_attached(), &hits(0, 0, 0), Some("no copy found"));
        assert!(v.fanout && !v.durations && !v.gauges && !v.bookkeeping);
        assert!(v.problems[0].contains("no copy found"), "{:?}", v.problems);
        let states: BTreeMap<_, _> = point_states(&all_attached(), &hits(0, 0, 0), true)
            .into_iter()
            .collect();
        assert_eq!(states["unblockClient"], "unreliable");
    }
}
