//! The planner: from what the agent saw, one queue per worker group (a shard), routing rules
//! that send each queue's jobs to one shard, and what that saves. A pure function of the
//! observation, so every decision here is unit-tested on fixed inputs.
//!
//! Why shards: Redis registers a blocked client once per key it listed and unregisters it the
//! same way when it is served or times out, on its single main thread. A group that listens to
//! its own one queue lists one key per pop, however many job classes it runs.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    cost::Cost,
    names::{queue_name, shard_queue_name},
    observation::{Observation, ServerObservation},
    predict::{predict, Prediction},
    today::{GroupToday, Today},
};

/// Fewer pops than this from all groups together in the window say too little about which
/// queue serves what: a few minutes of a quiet system. Wait, or widen the window.
pub const MIN_POPS: u64 = 100;

/// A window shorter than this is mostly the edges of the agent's readings.
pub const MIN_WINDOW_SECONDS: f64 = 5.0;

/// The keys per pop of a group that listens to its shard queue only.
const KEYS_PER_POP_AFTER: f64 = 1.0;

/// The advice for every server the workers reach.
#[derive(Clone, Debug, PartialEq)]
pub struct Advice {
    pub window_seconds: f64,
    pub since_start: bool,
    /// Whether queue names are real; folded names (`key_0`) cannot become rules.
    pub names_real: bool,
    pub servers: Vec<ServerAdvice>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServerAdvice {
    pub server: String,
    pub today: Today,
    pub cost: Cost,
    pub verdict: Verdict,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Too little to go on; the one-line reason. Said instead of advising.
    Insufficient(String),
    Proposal(Box<Proposal>),
}

impl ServerAdvice {
    pub fn proposal(&self) -> Option<&Proposal> {
        match &self.verdict {
            Verdict::Proposal(p) => Some(p),
            Verdict::Insufficient(_) => None,
        }
    }
}

/// One group under the proposal.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupPlan {
    pub group: String,
    pub processes: u32,
    /// The one queue it will listen to.
    pub shard_queue: String,
    /// The keys whose jobs go to its shard, sorted by queue name.
    pub assigned: Vec<String>,
    /// How many keys it listens to now.
    pub queues_now: usize,
    pub keys_per_pop_now: Option<f64>,
    pub keys_per_pop_predicted: f64,
    pub pops: u64,
    pub pops_per_second: f64,
    pub served: u64,
}

/// One explicit routing rule: these queues' jobs go to `to`.
#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    pub group: String,
    /// Redis keys, sorted by queue name.
    pub keys: Vec<String>,
    pub to: String,
}

impl Route {
    /// The queue names, as the rules name them.
    pub fn queue_names(&self) -> Vec<&str> {
        self.keys.iter().map(|k| queue_name(k)).collect()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Proposal {
    /// Every group with known queues, by name.
    pub groups: Vec<GroupPlan>,
    /// Index in `groups` of the catch-all: the last rule, `*`, goes to its shard.
    pub catch_all: usize,
    /// Explicit rules, by group name; the catch-all has none (`*` covers its queues).
    pub routes: Vec<Route>,
    /// Whether groups shared queues, which the planner then split by traffic.
    pub shared_split: bool,
    /// Groups seen popping whose queues are not known: left as they are.
    pub unplanned_groups: Vec<String>,
    pub prediction: Prediction,
}

impl Proposal {
    pub fn catch_all(&self) -> &GroupPlan {
        &self.groups[self.catch_all]
    }
}

/// Plans every server of the observation, each on its own.
pub fn plan(obs: &Observation) -> Advice {
    Advice {
        window_seconds: obs.window_seconds,
        since_start: obs.since_start,
        names_real: obs.names_real,
        servers: obs
            .servers
            .iter()
            .map(|s| plan_server(s, obs.window_seconds))
            .collect(),
    }
}

fn plan_server(server: &ServerObservation, window_seconds: f64) -> ServerAdvice {
    let today = Today::of(server, window_seconds);
    let cost = Cost::of(server, window_seconds);
    let verdict = match too_little(&today, window_seconds) {
        Some(reason) => Verdict::Insufficient(reason),
        None => Verdict::Proposal(Box::new(propose(&today, &cost))),
    };
    ServerAdvice {
        server: server.server.clone(),
        today,
        cost,
        verdict,
    }
}

/// The honest limits: when what was seen cannot carry a proposal, the reason.
fn too_little(today: &Today, window_seconds: f64) -> Option<String> {
    if !today.groups.iter().any(|g| !g.queues.is_empty()) {
        return Some(
            "no worker group with known queues: the agent has not seen a blocking pop's key \
             list from any worker on this server"
                .into(),
        );
    }
    if window_seconds.is_nan() || window_seconds < MIN_WINDOW_SECONDS {
        return Some(format!(
            "a window of {window_seconds:.1} s is too short (at least {MIN_WINDOW_SECONDS} s): \
             wait, or ask for a longer --window"
        ));
    }
    if today.pops < MIN_POPS {
        return Some(format!(
            "only {} blocking pops in the window (at least {MIN_POPS} needed to tell which \
             queues serve): wait, or ask for a longer --window",
            today.pops
        ));
    }
    if today.attributed_served == 0 && today.unattributed_served > 0 {
        return Some(format!(
            "none of the {} served pops could be told by queue (their replies were too long \
             for the kernel's window): no per-queue traffic to split the queues by",
            today.unattributed_served
        ));
    }
    None
}

/// The catch-all: the group that served most (then more processes, then name).
fn catch_all_index(groups: &[&GroupToday]) -> usize {
    let mut best = 0;
    for (i, g) in groups.iter().enumerate().skip(1) {
        let b = groups[best];
        let better = g
            .served
            .cmp(&b.served)
            .then(g.processes.cmp(&b.processes))
            .then(b.group.cmp(&g.group));
        if better.is_gt() {
            best = i;
        }
    }
    best
}

fn propose(today: &Today, cost: &Cost) -> Proposal {
    let planned: Vec<&GroupToday> = today
        .groups
        .iter()
        .filter(|g| !g.queues.is_empty())
        .collect();
    let index_of: BTreeMap<&str, usize> = planned
        .iter()
        .enumerate()
        .map(|(i, g)| (g.group.as_str(), i))
        .collect();
    let catch_all = catch_all_index(&planned);
    let capacity: Vec<f64> = planned.iter().map(|g| g.served.max(1) as f64).collect();
    let mut load = vec![0.0_f64; planned.len()];
    let mut assigned: Vec<Vec<&str>> = vec![Vec::new(); planned.len()];

    // 1. A queue one group listens to stays with it.
    let mut shared_served = Vec::new();
    for q in &today.queues {
        let candidates: Vec<usize> = q
            .listeners
            .iter()
            .filter_map(|l| index_of.get(l.as_str()).copied())
            .collect();
        match candidates.as_slice() {
            [] => {}
            [only] => {
                assigned[*only].push(&q.key);
                load[*only] += q.served as f64;
            }
            // 3. Idle and shared: nobody can say whose it is, so the catch-all takes it.
            _ if q.is_idle() => assigned[catch_all].push(&q.key),
            _ => shared_served.push((q, candidates)),
        }
    }
    // 2. Shared queues with traffic, the busiest first: each to the listener that stays least
    // loaded for its capacity, so each group keeps about its share of the jobs.
    shared_served.sort_by(|(a, _), (b, _)| b.served.cmp(&a.served).then(a.key.cmp(&b.key)));
    for (q, candidates) in shared_served {
        let served = q.served as f64;
        let ratio = |i: usize| (load[i] + served) / capacity[i];
        let Some(&chosen) = candidates.iter().min_by(|&&a, &&b| {
            ratio(a)
                .total_cmp(&ratio(b))
                .then(capacity[b].total_cmp(&capacity[a]))
                .then(planned[a].group.cmp(&planned[b].group))
        }) else {
            continue;
        };
        assigned[chosen].push(&q.key);
        load[chosen] += served;
    }

    let shard_queues = shard_names(&planned, &assigned);
    let groups: Vec<GroupPlan> = planned
        .iter()
        .zip(assigned)
        .zip(shard_queues)
        .map(|((g, mut keys), shard_queue)| {
            keys.sort_by(|a, b| queue_name(a).cmp(queue_name(b)).then(a.cmp(b)));
            GroupPlan {
                group: g.group.clone(),
                processes: g.processes,
                shard_queue,
                assigned: keys.into_iter().map(str::to_string).collect(),
                queues_now: g.queues.len(),
                keys_per_pop_now: g.keys_per_pop(),
                keys_per_pop_predicted: KEYS_PER_POP_AFTER,
                pops: g.pops,
                pops_per_second: g.pops_per_second,
                served: g.served,
            }
        })
        .collect();
    let routes = groups
        .iter()
        .enumerate()
        .filter(|(i, g)| *i != catch_all && !g.assigned.is_empty())
        .map(|(_, g)| Route {
            group: g.group.clone(),
            keys: g.assigned.clone(),
            to: g.shard_queue.clone(),
        })
        .collect();
    let keys_after: BTreeMap<&str, f64> = groups
        .iter()
        .map(|g| (g.group.as_str(), g.keys_per_pop_predicted))
        .collect();
    let prediction = predict(today, cost, &keys_after);
    Proposal {
        groups,
        catch_all,
        routes,
        shared_split: today.shared_queues().next().is_some(),
        unplanned_groups: today
            .groups
            .iter()
            .filter(|g| g.queues.is_empty() && g.pops > 0)
            .map(|g| g.group.clone())
            .collect(),
        prediction,
    }
}

/// One shard queue name per group: from its name, unique, and never the name of a queue whose
/// jobs go to another group (its old jobs would then feed the wrong shard).
fn shard_names(planned: &[&GroupToday], assigned: &[Vec<&str>]) -> Vec<String> {
    let mut taken = BTreeSet::new();
    planned
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let foreign: BTreeSet<&str> = assigned
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .flat_map(|(_, keys)| keys.iter().map(|k| queue_name(k)))
                .collect();
            let base = shard_queue_name(&g.group);
            let mut name = base.clone();
            let mut n = 2;
            while taken.contains(&name) || foreign.contains(name.as_str()) {
                name = format!("{base}_{n}");
                n += 1;
            }
            taken.insert(name.clone());
            name
        })
        .collect()
}

#[cfg(test)]
mod tests;
