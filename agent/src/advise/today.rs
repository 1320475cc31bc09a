//! How the workers listen to one server now: per group and per queue, as rates over the window.

use std::collections::{BTreeMap, BTreeSet};

use super::{names::queue_name, observation::ServerObservation};

/// One worker group as it listens now.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupToday {
    pub group: String,
    pub processes: u32,
    /// The keys it listens to, sorted, each once.
    pub queues: Vec<String>,
    pub pops: u64,
    /// Pops sent (counted at send, as `keys_listed` is): the divisor of keys per pop.
    pub pops_sent: u64,
    pub keys_listed: u64,
    pub served: u64,
    pub pops_per_second: f64,
    pub served_per_second: f64,
}

impl GroupToday {
    /// Keys listed per pop; `None` without pops.
    pub fn keys_per_pop(&self) -> Option<f64> {
        keys_per_pop(self.keys_listed, self.pops_sent, self.pops)
    }
}

/// Keys per pop: over the pops sent when the agent counts them (the keys are counted at send
/// too), else over the pops that ended (an older agent).
fn keys_per_pop(keys_listed: u64, pops_sent: u64, pops: u64) -> Option<f64> {
    let divisor = if pops_sent > 0 { pops_sent } else { pops };
    (divisor > 0).then(|| keys_listed as f64 / divisor as f64)
}

/// One listened queue.
#[derive(Clone, Debug, PartialEq)]
pub struct QueueToday {
    /// The Redis key.
    pub key: String,
    /// Pops it served in the window, from every group.
    pub served: u64,
    pub served_per_second: f64,
    /// The groups that listen to it, sorted.
    pub listeners: Vec<String>,
}

impl QueueToday {
    /// The queue's name in its job system (`queue:mailers` is `mailers`).
    pub fn name(&self) -> &str {
        queue_name(&self.key)
    }
    /// Listened to, yet served nothing in the window.
    pub fn is_idle(&self) -> bool {
        self.served == 0
    }
    /// Listened to by two groups or more.
    pub fn is_shared(&self) -> bool {
        self.listeners.len() >= 2
    }
}

/// One server's listeners now.
#[derive(Clone, Debug, PartialEq)]
pub struct Today {
    /// Sorted by name.
    pub groups: Vec<GroupToday>,
    /// Every listened queue, most served first (then by key).
    pub queues: Vec<QueueToday>,
    pub pops: u64,
    pub pops_sent: u64,
    pub keys_listed: u64,
    pub served: u64,
    /// Served pops whose key is known, and those whose key is not.
    pub attributed_served: u64,
    pub unattributed_served: u64,
}

/// `count / window` as a rate; 0 for an empty window (the planner refuses those anyway).
pub fn per_second(count: f64, window_seconds: f64) -> f64 {
    if window_seconds > 0.0 && window_seconds.is_finite() {
        count / window_seconds
    } else {
        0.0
    }
}

impl Today {
    pub fn of(server: &ServerObservation, window_seconds: f64) -> Self {
        let mut groups: Vec<GroupToday> = server
            .groups
            .iter()
            .map(|g| GroupToday {
                group: g.group.clone(),
                processes: g.processes,
                queues: g
                    .queues
                    .iter()
                    .cloned()
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect(),
                pops: g.pops,
                pops_sent: g.pops_sent,
                keys_listed: g.keys_listed,
                served: g.served,
                pops_per_second: per_second(g.pops as f64, window_seconds),
                served_per_second: per_second(g.served as f64, window_seconds),
            })
            .collect();
        groups.sort_by(|a, b| a.group.cmp(&b.group));

        let mut listeners: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for g in &server.groups {
            for key in &g.queues {
                listeners
                    .entry(key.as_str())
                    .or_default()
                    .insert(g.group.as_str());
            }
        }
        // A queue's traffic counts every group's pops from it, listening now or not.
        let mut served_by_key: BTreeMap<&str, u64> = BTreeMap::new();
        for g in &server.groups {
            for (key, served) in &g.served_by_queue {
                *served_by_key.entry(key.as_str()).or_default() += served;
            }
        }
        let mut queues: Vec<QueueToday> = listeners
            .into_iter()
            .map(|(key, groups)| {
                let served = served_by_key.get(key).copied().unwrap_or(0);
                QueueToday {
                    key: key.to_string(),
                    served,
                    served_per_second: per_second(served as f64, window_seconds),
                    listeners: groups.into_iter().map(str::to_string).collect(),
                }
            })
            .collect();
        queues.sort_by(|a, b| b.served.cmp(&a.served).then_with(|| a.key.cmp(&b.key)));

        let sum = |f: fn(&super::observation::GroupObservation) -> u64| -> u64 {
            server.groups.iter().map(f).sum()
        };
        Today {
            groups,
            queues,
            pops: sum(|g| g.pops),
            pops_sent: sum(|g| g.pops_sent),
            keys_listed: sum(|g| g.keys_listed),
            served: sum(|g| g.served),
            attributed_served: sum(|g| g.served_by_queue.values().sum()),
            unattributed_served: sum(|g| g.unattributed_served),
        }
    }

    /// Keys per pop over all groups, weighted by their pops; `None` without pops.
    pub fn keys_per_pop(&self) -> Option<f64> {
        keys_per_pop(self.keys_listed, self.pops_sent, self.pops)
    }

    pub fn idle_queues(&self) -> impl Iterator<Item = &QueueToday> {
        self.queues.iter().filter(|q| q.is_idle())
    }

    pub fn shared_queues(&self) -> impl Iterator<Item = &QueueToday> {
        self.queues.iter().filter(|q| q.is_shared())
    }

    pub fn queue(&self, key: &str) -> Option<&QueueToday> {
        self.queues.iter().find(|q| q.key == key)
    }
}
