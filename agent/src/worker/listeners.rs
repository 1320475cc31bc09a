//! Who listens to which queue: per worker group, the keys its connections block on, how many
//! processes and how many currently blocked connections listen to each, and which groups'
//! key sets overlap (what a routing-rules migration needs to know).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use crate::metrics::{catalog, AttrValue, Point, PointValue, Snapshot};

/// One followed connection whose key list is known.
#[derive(Clone, Debug)]
pub struct ConnListening {
    pub group: String,
    pub pid: u32,
    /// `address:port` of the Redis it waits on: the same key on two servers is two queues.
    pub server: String,
    pub keys: Arc<Vec<String>>,
    pub blocked: bool,
}

/// The label of keys beyond the per-group limit.
pub const OTHER_KEYS: &str = "other";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupListening {
    /// Per key: processes listening, connections blocked on it now.
    pub per_key: BTreeMap<String, (usize, usize)>,
    pub processes: usize,
    pub blocked_connections: usize,
    pub distinct_keys: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenerReport {
    pub groups: BTreeMap<String, GroupListening>,
    /// (group, other group) -> keys both listen to on the same server.
    pub shared: BTreeMap<(String, String), usize>,
}

impl ListenerReport {
    pub fn build(conns: &[ConnListening], max_keys_per_group: usize) -> Self {
        // group -> (server, key) -> (processes, blocked connections)
        let mut per_group: BTreeMap<&str, BTreeMap<(&str, &str), (BTreeSet<u32>, usize)>> =
            BTreeMap::new();
        let mut processes: BTreeMap<&str, BTreeSet<u32>> = BTreeMap::new();
        let mut blocked: BTreeMap<&str, usize> = BTreeMap::new();
        for c in conns {
            processes.entry(&c.group).or_default().insert(c.pid);
            *blocked.entry(&c.group).or_default() += c.blocked as usize;
            let keys = per_group.entry(&c.group).or_default();
            for k in c.keys.iter() {
                let entry = keys.entry((&c.server, k)).or_default();
                entry.0.insert(c.pid);
                entry.1 += c.blocked as usize;
            }
        }
        let mut report = ListenerReport::default();
        for (group, keys) in &per_group {
            // Busiest keys first; past the limit they fold into "other".
            let mut ranked: Vec<(&str, usize, usize)> = keys
                .iter()
                .map(|((_, k), (p, b))| (*k, p.len(), *b))
                .collect();
            ranked.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.cmp(b.0)));
            let mut g = GroupListening {
                processes: processes.get(group).map_or(0, BTreeSet::len),
                blocked_connections: blocked.get(group).copied().unwrap_or(0),
                distinct_keys: keys.len(),
                ..Default::default()
            };
            let limit = max_keys_per_group.max(1);
            let mut other_pids: BTreeSet<u32> = BTreeSet::new();
            let mut other_blocked = 0;
            for (i, (key, p, b)) in ranked.iter().enumerate() {
                if i < limit {
                    let e = g.per_key.entry(key.to_string()).or_default();
                    e.0 = e.0.max(*p);
                    e.1 += b;
                } else {
                    other_pids.extend(
                        keys.iter()
                            .filter(|((_, k), _)| k == key)
                            .flat_map(|(_, (pids, _))| pids.iter().copied()),
                    );
                    other_blocked += b;
                }
            }
            if !other_pids.is_empty() {
                g.per_key
                    .insert(OTHER_KEYS.to_string(), (other_pids.len(), other_blocked));
            }
            report.groups.insert(group.to_string(), g);
        }
        for (a, ka) in &per_group {
            for (b, kb) in &per_group {
                if a != b {
                    let shared = ka.keys().filter(|k| kb.contains_key(k)).count();
                    report.shared.insert((a.to_string(), b.to_string()), shared);
                }
            }
        }
        report
    }

    pub fn emit(&self, export_key_names: bool, snapshot: &mut Snapshot) {
        let epoch = std::time::UNIX_EPOCH;
        let gauge = |v: usize| PointValue::Gauge(v as f64);
        for (group, g) in &self.groups {
            let base = || vec![("process.group", AttrValue::from(group.as_str()))];
            if export_key_names {
                for (key, (p, b)) in &g.per_key {
                    for (kind, v) in [("process", *p), ("blocked_connection", *b)] {
                        let mut attributes = base();
                        attributes.push(("redis.key", AttrValue::from(key.as_str())));
                        attributes.push(("listener", AttrValue::from(kind)));
                        snapshot.push(
                            catalog::QUEUE_LISTENERS,
                            Point {
                                attributes,
                                start_time: epoch,
                                value: gauge(v),
                            },
                        );
                    }
                }
            } else {
                for (kind, v) in [
                    ("process", g.processes),
                    ("blocked_connection", g.blocked_connections),
                ] {
                    let mut attributes = base();
                    attributes.push(("listener", AttrValue::from(kind)));
                    snapshot.push(
                        catalog::QUEUE_LISTENERS,
                        Point {
                            attributes,
                            start_time: epoch,
                            value: gauge(v),
                        },
                    );
                }
            }
            snapshot.push(
                catalog::WORKER_QUEUES,
                Point {
                    attributes: base(),
                    start_time: epoch,
                    value: gauge(g.distinct_keys),
                },
            );
        }
        for ((a, b), n) in &self.shared {
            let attributes = vec![
                ("process.group", AttrValue::from(a.as_str())),
                ("peer.group", AttrValue::from(b.as_str())),
            ];
            snapshot.push(
                catalog::QUEUES_SHARED,
                Point {
                    attributes,
                    start_time: epoch,
                    value: gauge(*n),
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(group: &str, pid: u32, server: &str, keys: &[&str], blocked: bool) -> ConnListening {
        ConnListening {
            group: group.into(),
            pid,
            server: server.into(),
            keys: Arc::new(keys.iter().map(|s| s.to_string()).collect()),
            blocked,
        }
    }

    #[test]
    fn processes_and_blocked_connections_per_key() {
        let conns = vec![
            conn("web", 1, "r:6379", &["q:a", "q:b"], true),
            conn("web", 1, "r:6379", &["q:a", "q:b"], false),
            conn("web", 2, "r:6379", &["q:a"], true),
        ];
        let r = ListenerReport::build(&conns, 10);
        let g = &r.groups["web"];
        assert_eq!(
            (g.processes, g.blocked_connections, g.distinct_keys),
            (2, 2, 2)
        );
        assert_eq!(g.per_key["q:a"], (2, 2));
        assert_eq!(g.per_key["q:b"], (1, 1));
    }

    #[test]
    fn overlapping_groups_are_reported_and_disjoint_ones_are_not() {
        let conns = vec![
            conn("mailers", 1, "r:6379", &["q:mail", "q:default"], true),
            conn("billing", 2, "r:6379", &["q:billing", "q:default"], true),
            conn("search", 3, "r:6379", &["q:search"], true),
            // Same name on another server: another queue.
            conn("reports", 4, "other:6379", &["q:default"], true),
        ];
        let r = ListenerReport::build(&conns, 10);
        assert_eq!(r.shared[&("mailers".into(), "billing".into())], 1);
        assert_eq!(r.shared[&("billing".into(), "mailers".into())], 1);
        assert_eq!(r.shared[&("mailers".into(), "search".into())], 0);
        assert_eq!(r.shared[&("mailers".into(), "reports".into())], 0);
    }

    #[test]
    fn keys_past_the_limit_fold_into_other() {
        let keys: Vec<String> = (0..440).map(|i| format!("q{i}")).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let conns = vec![
            conn("wide", 1, "r:1", &refs, true),
            conn("wide", 2, "r:1", &refs[..5], false),
        ];
        let r = ListenerReport::build(&conns, 10);
        let g = &r.groups["wide"];
        assert_eq!(g.per_key.len(), 11);
        assert_eq!(g.distinct_keys, 440);
        // The five keys both processes listen to rank first.
        assert_eq!(g.per_key["q0"], (2, 1));
        // 430 keys past the first 10, each with the one blocked connection of process 1.
        assert_eq!(g.per_key[OTHER_KEYS], (1, 430));
    }
}
