//! The worker side: blocking pops as workers see them (latency, outcome, fan-out, per Redis
//! server), and who listens to which queue.

pub mod listeners;

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::SystemTime,
};

use agent_common::{
    fastpath::{served_key_hash, SERVED_KEY_ONLY_SOURCE, SERVED_KEY_UNKNOWN},
    redis::{KeyHistogram, KEY_BOUNDS},
    resp::{command, listened_keys},
    sched::Log2Histogram,
    worker::{outcome, ConnKey, ConnState, KeysetHeader, Peer},
};

use crate::{
    advise::window::GroupCounts,
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

/// Most key names remembered for naming served keys (their hashes come from the kernel).
const MAX_KEY_NAMES: usize = 200_000;

/// `address:port` of a peer, as servers are named across the worker side.
pub fn server_name(peer: &Peer) -> String {
    format!("{}:{}", peer_address(peer), peer.port)
}

/// Per server (`address:port`) and group: what `fanout advise` counts.
pub type AdviseCounts = BTreeMap<String, BTreeMap<String, GroupCounts>>;

fn group_counts<'a>(out: &'a mut AdviseCounts, peer: &Peer, group: &str) -> &'a mut GroupCounts {
    out.entry(server_name(peer))
        .or_default()
        .entry(group.to_string())
        .or_default()
}

/// A process's keys listed and pops sent (counted per command at send, not per server), per
/// server: all to its one server, or split in proportion to the pops that ended on each; a
/// process none of whose pops ended yet goes to `conn_peer`, its connection's server.
fn sent_by_peer(readings: &WorkerReadings, conn_peer: Option<Peer>) -> Vec<(Peer, u64, u64)> {
    let (keys, sent) = readings
        .keys
        .values()
        .fold((0u64, 0u64), |(k, n), h| (k + h.sum, n + h.count));
    if sent == 0 {
        return Vec::new();
    }
    let mut ended: BTreeMap<Peer, u64> = BTreeMap::new();
    for ((_, _, peer), h) in &readings.durations {
        *ended.entry(*peer).or_default() += h.count;
    }
    let total: u64 = ended.values().sum();
    if total == 0 {
        return conn_peer.map(|p| vec![(p, keys, sent)]).unwrap_or_default();
    }
    if ended.len() == 1 {
        let peer = *ended.keys().next().unwrap_or(&Peer::default());
        return vec![(peer, keys, sent)];
    }
    let share = |x: u64, n: u64| (x as f64 * n as f64 / total as f64).round() as u64;
    ended
        .into_iter()
        .map(|(peer, n)| (peer, share(keys, n), share(sent, n)))
        .collect()
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
    retired_served: BTreeMap<(String, Peer, u64), u64>,
    /// Keys listed and pops sent by exited workers, per group and server.
    retired_sent: BTreeMap<(String, Peer), (u64, u64)>,
    /// Key-name hash -> name, for every key a followed connection listed (bounded).
    key_names: HashMap<u64, Arc<str>>,
    options: ListenerOptions,
    since: SystemTime,
    /// Key lists that could not be parsed (truncated or malformed), for self-metrics.
    pub keyset_errors: u64,
    /// Key lists received (and read).
    pub keysets_received: u64,
}

impl WorkerSide {
    pub fn new(options: ListenerOptions) -> Self {
        Self {
            keysets: HashMap::new(),
            retired_durations: BTreeMap::new(),
            retired_keys: BTreeMap::new(),
            retired_served: BTreeMap::new(),
            retired_sent: BTreeMap::new(),
            key_names: HashMap::new(),
            options,
            since: SystemTime::now(),
            keyset_errors: 0,
            keysets_received: 0,
        }
    }

    /// A key list from the kernel: the request bytes of a blocking call.
    pub fn on_keyset(&mut self, header: &KeysetHeader, bytes: &[u8]) {
        let mut keys = Vec::with_capacity(header.keys as usize);
        match listened_keys(bytes, |k| {
            keys.push(String::from_utf8_lossy(k).into_owned())
        }) {
            Some(call) if call.signature == header.signature => {
                self.keysets_received += 1;
                for key in &keys {
                    if self.key_names.len() >= MAX_KEY_NAMES {
                        break;
                    }
                    self.key_names
                        .entry(served_key_hash(key.as_bytes()))
                        .or_insert_with(|| Arc::from(key.as_str()));
                }
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
        for (peer, keys, sent) in sent_by_peer(&readings, None) {
            let e = self
                .retired_sent
                .entry((group.to_string(), peer))
                .or_default();
            e.0 += keys;
            e.1 += sent;
        }
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
        // A bare-element serve names the connection's only source key: resolve it while the
        // process's key lists are still known.
        for ((peer, hash), n) in readings.served {
            let hash = self.resolve_only_source(pid, &peer, hash);
            *self
                .retired_served
                .entry((group.to_string(), peer, hash))
                .or_default() += n;
        }
        self.keysets.retain(|k, _| k.tgid != pid);
    }

    /// The name of a served-key hash, if a followed connection ever listed it.
    pub fn key_name(&self, hash: u64) -> Option<Arc<str>> {
        self.key_names.get(&hash).cloned()
    }

    /// The hash of the key a bare-element serve (BLMOVE, BRPOPLPUSH) came from: the only key
    /// of the process's key list (any of its connections with one key); other hashes as
    /// they are.
    fn resolve_only_source(&self, tgid: u32, _peer: &Peer, hash: u64) -> u64 {
        if hash != SERVED_KEY_ONLY_SOURCE {
            return hash;
        }
        self.keysets
            .iter()
            .filter(|(k, set)| k.tgid == tgid && set.keys.len() == 1)
            .map(|(_, set)| served_key_hash(set.keys[0].as_bytes()))
            .next()
            .unwrap_or(SERVED_KEY_UNKNOWN)
    }

    /// Per server and group, the cumulative counts `fanout advise` works from: pops by
    /// outcome, keys listed, served pops by key, and whom the group listens with now.
    pub fn advise_counts(
        &self,
        readings: &BTreeMap<u32, WorkerReadings>,
        connections: &[(ConnKey, ConnState)],
        group_of: &dyn Fn(u32) -> Option<String>,
    ) -> AdviseCounts {
        let mut out = AdviseCounts::new();
        let add_pops = |out: &mut AdviseCounts, group: &str, peer: &Peer, result: u32, n: u64| {
            let g = group_counts(out, peer, group);
            g.pops += n;
            match result {
                outcome::SERVED => g.served += n,
                outcome::TIMEOUT => g.timeouts += n,
                _ => g.errors += n,
            }
        };
        let add_served = |out: &mut AdviseCounts, group: &str, peer: &Peer, hash: u64, n: u64| {
            let g = group_counts(out, peer, group);
            if hash == SERVED_KEY_UNKNOWN || hash == SERVED_KEY_ONLY_SOURCE {
                g.unattributed_served += n;
            } else {
                *g.served_by_key.entry(hash).or_default() += n;
            }
        };
        for ((group, _, result, peer), h) in &self.retired_durations {
            add_pops(&mut out, group, peer, *result, h.count);
        }
        for ((group, peer, hash), n) in &self.retired_served {
            add_served(&mut out, group, peer, *hash, *n);
        }
        for ((group, peer), (keys, sent)) in &self.retired_sent {
            let g = group_counts(&mut out, peer, group);
            g.keys_listed += keys;
            g.pops_sent += sent;
        }
        for (tgid, r) in readings {
            let Some(group) = group_of(*tgid) else {
                continue;
            };
            for ((_, result, peer), h) in &r.durations {
                add_pops(&mut out, &group, peer, *result, h.count);
            }
            for ((peer, hash), n) in &r.served {
                let hash = self.resolve_only_source(*tgid, peer, *hash);
                add_served(&mut out, &group, peer, hash, *n);
            }
            let conn_peer = connections
                .iter()
                .find(|(k, c)| k.tgid == *tgid && c.peer.family != 0)
                .map(|(_, c)| c.peer);
            for (peer, keys, sent) in sent_by_peer(r, conn_peer) {
                let g = group_counts(&mut out, &peer, &group);
                g.keys_listed += keys;
                g.pops_sent += sent;
            }
        }
        // Whom each group listens with now.
        let mut processes: BTreeMap<(String, String), std::collections::BTreeSet<u32>> =
            BTreeMap::new();
        for (key, conn) in connections {
            let Some(group) = group_of(key.tgid) else {
                continue;
            };
            let Some(keyset) = self
                .keysets
                .get(key)
                .filter(|k| k.signature == conn.keyset_sent)
            else {
                continue;
            };
            let server = server_name(&conn.peer);
            let g = out
                .entry(server.clone())
                .or_default()
                .entry(group.clone())
                .or_default();
            g.connections += 1;
            g.listened
                .extend(keyset.keys.iter().map(|k| served_key_hash(k.as_bytes())));
            g.listened.sort_unstable();
            g.listened.dedup();
            processes
                .entry((server, group))
                .or_default()
                .insert(key.tgid);
        }
        for ((server, group), pids) in processes {
            if let Some(g) = out.get_mut(&server).and_then(|s| s.get_mut(&group)) {
                g.processes = pids.len() as u32;
            }
        }
        out
    }

    /// Adds `worker.blocking_pop.served`: per group and server, and per key (its name, the
    /// busiest `max_keys_per_group` of the group, the rest as `other`) only with
    /// `--export-key-names`.
    fn emit_served(&self, counts: &AdviseCounts, snapshot: &mut Snapshot) {
        for (server, groups) in counts {
            let (address, port) = server.rsplit_once(':').unwrap_or((server.as_str(), "0"));
            let port: i64 = port.parse().unwrap_or(0);
            for (group, g) in groups {
                let base = vec![
                    ("process.group", AttrValue::from(group.as_str())),
                    ("server.address", AttrValue::from(address)),
                    ("server.port", AttrValue::Int(port)),
                ];
                let mut push = |key: Option<&str>, n: u64| {
                    let mut attributes = base.clone();
                    if let Some(key) = key {
                        attributes.push(("redis.key", AttrValue::from(key)));
                    }
                    snapshot.push(
                        catalog::WORKER_POP_SERVED,
                        Point {
                            attributes,
                            start_time: self.since,
                            value: PointValue::Counter(n as f64),
                        },
                    );
                };
                if !self.options.export_key_names {
                    let total = g.served_by_key.values().sum::<u64>() + g.unattributed_served;
                    push(None, total);
                    continue;
                }
                let mut named: BTreeMap<String, u64> = BTreeMap::new();
                let mut unknown = g.unattributed_served;
                for (hash, n) in &g.served_by_key {
                    match self.key_name(*hash) {
                        Some(name) => *named.entry(name.to_string()).or_default() += n,
                        None => unknown += n,
                    }
                }
                let mut ranked: Vec<(String, u64)> = named.into_iter().collect();
                ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                let limit = self.options.max_keys_per_group.max(1);
                let other: u64 = ranked.iter().skip(limit).map(|(_, n)| n).sum();
                for (name, n) in ranked.iter().take(limit) {
                    push(Some(name), *n);
                }
                if other > 0 {
                    push(Some(listeners::OTHER_KEYS), other);
                }
                if unknown > 0 {
                    push(Some("unknown"), unknown);
                }
            }
        }
    }

    /// Adds the `worker.*` and `redis.queue.listeners` series; `counts` is
    /// [`WorkerSide::advise_counts`] of the same readings.
    pub fn emit(
        &mut self,
        readings: &BTreeMap<u32, WorkerReadings>,
        connections: &[(ConnKey, ConnState)],
        group_of: &dyn Fn(u32) -> Option<String>,
        counts: &AdviseCounts,
        snapshot: &mut Snapshot,
    ) {
        self.emit_served(counts, snapshot);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::PointValue;

    fn brpop(keys: &[&str]) -> Vec<u8> {
        let mut out = format!("*{}\r\n$5\r\nBRPOP\r\n", keys.len() + 2).into_bytes();
        for k in keys.iter().chain(std::iter::once(&"2")) {
            out.extend(format!("${}\r\n{k}\r\n", k.len()).bytes());
        }
        out
    }

    fn peer(port: u16) -> Peer {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        Peer {
            family: 2,
            port,
            addr,
        }
    }

    /// A worker side that knows the key list of (pid 7, fd 3) and the counts the kernel
    /// would hold for pid 7: 5 pops served by q:a, 2 by q:b, 1 of unknown key, 3 timeouts.
    fn fixture(
        export_key_names: bool,
        max_keys_per_group: usize,
    ) -> (WorkerSide, BTreeMap<u32, WorkerReadings>) {
        let mut side = WorkerSide::new(ListenerOptions {
            export_key_names,
            max_keys_per_group,
        });
        let request = brpop(&["q:a", "q:b", "q:c"]);
        let call = listened_keys(&request, |_| {}).unwrap();
        side.on_keyset(
            &KeysetHeader {
                tgid: 7,
                fd: 3,
                signature: call.signature,
                len: request.len() as u32,
                keys: 3,
            },
            &request,
        );
        let mut r = WorkerReadings::default();
        let p = peer(6379);
        r.served.insert((p, served_key_hash(b"q:a")), 5);
        r.served.insert((p, served_key_hash(b"q:b")), 2);
        r.served.insert((p, SERVED_KEY_UNKNOWN), 1);
        let mut served = Log2Histogram::ZERO;
        for _ in 0..8 {
            served.record(1_000_000);
        }
        let mut timeouts = Log2Histogram::ZERO;
        for _ in 0..3 {
            timeouts.record(2_000_000_000);
        }
        r.durations
            .insert((command::BRPOP, outcome::SERVED, p), served);
        r.durations
            .insert((command::BRPOP, outcome::TIMEOUT, p), timeouts);
        let mut keys = KeyHistogram::ZERO;
        for _ in 0..12 {
            keys.record(3);
        }
        r.keys.insert(command::BRPOP, keys);
        (side, BTreeMap::from([(7, r)]))
    }

    fn served_points(side: &WorkerSide, counts: &AdviseCounts) -> Vec<(Option<String>, f64)> {
        let mut snapshot = Snapshot::default();
        side.emit_served(counts, &mut snapshot);
        let mut points: Vec<(Option<String>, f64)> = snapshot
            .metric("worker.blocking_pop.served")
            .unwrap()
            .points
            .iter()
            .map(|p| {
                let key =
                    p.attributes
                        .iter()
                        .find(|(k, _)| *k == "redis.key")
                        .map(|(_, v)| match v {
                            AttrValue::Str(s) => s.clone(),
                            AttrValue::Int(i) => i.to_string(),
                        });
                let PointValue::Counter(v) = p.value else {
                    panic!("a counter")
                };
                (key, v)
            })
            .collect();
        points.sort_by(|a, b| a.0.cmp(&b.0));
        points
    }

    #[test]
    fn advise_counts_per_server_and_group_with_keys_per_pop_at_send() {
        let (side, readings) = fixture(false, 50);
        let group_of = |_: u32| Some("sidekiq".to_string());
        let counts = side.advise_counts(&readings, &[], &group_of);
        let g = &counts["127.0.0.1:6379"]["sidekiq"];
        assert_eq!((g.pops, g.served, g.timeouts, g.errors), (11, 8, 3, 0));
        // 12 pops sent (one still waiting), 3 keys each.
        assert_eq!((g.pops_sent, g.keys_listed), (12, 36));
        assert_eq!(g.served_by_key[&served_key_hash(b"q:a")], 5);
        assert_eq!(g.unattributed_served, 1);
        assert_eq!(
            side.key_name(served_key_hash(b"q:c")).as_deref(),
            Some("q:c")
        );
    }

    #[test]
    fn served_pops_are_exported_per_group_and_by_key_only_when_names_are() {
        let group_of = |_: u32| Some("sidekiq".to_string());
        let (side, readings) = fixture(false, 50);
        let counts = side.advise_counts(&readings, &[], &group_of);
        assert_eq!(served_points(&side, &counts), vec![(None, 8.0)]);

        let (side, readings) = fixture(true, 50);
        let counts = side.advise_counts(&readings, &[], &group_of);
        assert_eq!(
            served_points(&side, &counts),
            vec![
                (Some("q:a".into()), 5.0),
                (Some("q:b".into()), 2.0),
                (Some("unknown".into()), 1.0)
            ]
        );
        // Past the per-group limit, the quieter keys fold into "other".
        let (side, readings) = fixture(true, 1);
        let counts = side.advise_counts(&readings, &[], &group_of);
        assert_eq!(
            served_points(&side, &counts),
            vec![
                (Some("other".into()), 2.0),
                (Some("q:a".into()), 5.0),
                (Some("unknown".into()), 1.0)
            ]
        );
    }

    #[test]
    fn an_exited_workers_counts_stay_in_its_group() {
        let group_of = |_: u32| Some("sidekiq".to_string());
        let (mut side, mut readings) = fixture(false, 50);
        let r = readings.remove(&7).unwrap();
        side.retire("sidekiq", r, 7);
        let counts = side.advise_counts(&readings, &[], &group_of);
        let g = &counts["127.0.0.1:6379"]["sidekiq"];
        assert_eq!(
            (g.pops, g.served, g.pops_sent, g.keys_listed),
            (11, 8, 12, 36)
        );
        assert_eq!(g.served_by_key[&served_key_hash(b"q:b")], 2);
    }
}
