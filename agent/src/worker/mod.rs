//! The worker side: blocking pops as workers see them (latency, outcome, fan-out, per Redis
//! server), and who listens to which queue.

pub mod listeners;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::SystemTime,
};

use agent_common::{
    redis::{KeyHistogram, KEY_BOUNDS},
    resp::{command, listened_keys},
    sched::Log2Histogram,
    worker::{outcome, ConnKey, ConnState, KeysetHeader, Peer},
};

use crate::{
    collect::log2_to_seconds_between,
    ebpf::worker::{peer_address, WorkerReadings},
    metrics::{catalog, AttrValue, HistogramValue, Point, PointValue, Snapshot},
};
use listeners::{ConnListening, ListenerReport};

/// Pop latencies are exported from 1.024 us (2^10 ns) to 275 s (2^38 ns).
const FIRST_BUCKET: usize = 10;
const LAST_BUCKET: usize = 38;

fn outcome_label(o: u32) -> &'static str {
    match o {
        outcome::SERVED => "served",
        outcome::TIMEOUT => "timeout",
        _ => "error",
    }
}

/// A connection's key list, as last sent by the kernel.
#[derive(Clone, Debug)]
struct Keyset {
    signature: u64,
    keys: Arc<Vec<String>>,
}

/// Options of the listener report.
#[derive(Clone, Copy, Debug)]
pub struct ListenerOptions {
    /// Export key names (`--export-key-names`); off by default.
    pub export_key_names: bool,
    /// At most this many keys per group, the rest as `other`.
    pub max_keys_per_group: usize,
}

pub struct WorkerSide {
    keysets: HashMap<ConnKey, Keyset>,
    /// Counts of workers that exited, kept so that group totals never go down.
    retired_durations: BTreeMap<(String, u32, u32, Peer), Log2Histogram>,
    retired_keys: BTreeMap<(String, u32), KeyHistogram>,
    options: ListenerOptions,
    since: SystemTime,
    /// Key lists that could not be parsed (truncated or malformed), for self-metrics.
    pub keyset_errors: u64,
}

impl WorkerSide {
    pub fn new(options: ListenerOptions) -> Self {
        Self {
            keysets: HashMap::new(),
            retired_durations: BTreeMap::new(),
            retired_keys: BTreeMap::new(),
            options,
            since: SystemTime::now(),
            keyset_errors: 0,
        }
    }

    /// A key list from the kernel: the request bytes of a blocking call.
    pub fn on_keyset(&mut self, header: &KeysetHeader, bytes: &[u8]) {
        let mut keys = Vec::with_capacity(header.keys as usize);
        match listened_keys(bytes, |k| {
            keys.push(String::from_utf8_lossy(k).into_owned())
        }) {
            Some(call) if call.signature == header.signature => {
                self.keysets.insert(
                    ConnKey {
                        tgid: header.tgid,
                        fd: header.fd,
                    },
                    Keyset {
                        signature: header.signature,
                        keys: Arc::new(keys),
                    },
                );
            }
            _ => self.keyset_errors += 1,
        }
    }

    /// Keeps an exiting worker's counts in its group's totals.
    pub fn retire(&mut self, group: &str, readings: WorkerReadings, pid: u32) {
        for ((cmd, result, peer), h) in readings.durations {
            self.retired_durations
                .entry((group.to_string(), cmd, result, peer))
                .or_insert(Log2Histogram::ZERO)
                .merge(&h);
        }
        for (cmd, h) in readings.keys {
            self.retired_keys
                .entry((group.to_string(), cmd))
                .or_insert(KeyHistogram::ZERO)
                .merge(&h);
        }
        self.keysets.retain(|k, _| k.tgid != pid);
    }

    /// Adds the `worker.*` and `redis.queue.listeners` series.
    pub fn emit(
        &mut self,
        readings: &BTreeMap<u32, WorkerReadings>,
        connections: &[(ConnKey, ConnState)],
        group_of: &dyn Fn(u32) -> Option<String>,
        snapshot: &mut Snapshot,
    ) {
        let mut durations = self.retired_durations.clone();
        let mut keys = self.retired_keys.clone();
        for (tgid, r) in readings {
            let Some(group) = group_of(*tgid) else {
                continue;
            };
            for ((cmd, result, peer), h) in &r.durations {
                durations
                    .entry((group.clone(), *cmd, *result, *peer))
                    .or_insert(Log2Histogram::ZERO)
                    .merge(h);
            }
            for (cmd, h) in &r.keys {
                keys.entry((group.clone(), *cmd))
                    .or_insert(KeyHistogram::ZERO)
                    .merge(h);
            }
        }
        for ((group, cmd, result, peer), h) in &durations {
            let attributes = vec![
                ("process.group", AttrValue::from(group.as_str())),
                ("redis.command", AttrValue::from(command::name(*cmd))),
                ("outcome", AttrValue::from(outcome_label(*result))),
                ("server.address", AttrValue::from(peer_address(peer))),
                ("server.port", AttrValue::Int(peer.port as i64)),
            ];
            let value = log2_to_seconds_between(h, FIRST_BUCKET, LAST_BUCKET);
            snapshot.push(
                catalog::WORKER_POP_DURATION,
                Point {
                    attributes,
                    start_time: self.since,
                    value: PointValue::Histogram(value),
                },
            );
        }
        for ((group, cmd), h) in &keys {
            let attributes = vec![
                ("process.group", AttrValue::from(group.as_str())),
                ("redis.command", AttrValue::from(command::name(*cmd))),
            ];
            let value = HistogramValue {
                bounds: KEY_BOUNDS.iter().map(|b| *b as f64).collect(),
                counts: h.buckets.to_vec(),
                sum: h.sum as f64,
                count: h.count,
            };
            snapshot.push(
                catalog::WORKER_POP_KEYS,
                Point {
                    attributes,
                    start_time: self.since,
                    value: PointValue::Histogram(value),
                },
            );
        }

        // Forget key lists of connections the kernel no longer follows.
        let live: std::collections::HashSet<ConnKey> =
            connections.iter().map(|(k, _)| *k).collect();
        self.keysets.retain(|k, _| live.contains(k));
        let listening: Vec<ConnListening> = connections
            .iter()
            .filter_map(|(key, conn)| {
                let group = group_of(key.tgid)?;
                let keyset = self
                    .keysets
                    .get(key)
                    .filter(|k| k.signature == conn.keyset_sent)?;
                Some(ConnListening {
                    group,
                    pid: key.tgid,
                    server: format!("{}:{}", peer_address(&conn.peer), conn.peer.port),
                    keys: keyset.keys.clone(),
                    blocked: conn.pop.active != 0,
                })
            })
            .collect();
        ListenerReport::build(&listening, self.options.max_keys_per_group)
            .emit(self.options.export_key_names, snapshot);
    }
}
