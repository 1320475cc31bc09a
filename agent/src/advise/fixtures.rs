//! Observations for the tests: small, fixed, with totals that add up.

use std::collections::BTreeMap;

use super::observation::{
    GroupObservation, KeysBucket, Observation, RedisCost, ServerObservation, VERSION,
};

pub const US: f64 = 1e-6;
pub const WINDOW: f64 = 100.0;

/// A group listening to `queues` (bare names, stored as Sidekiq keys `queue:NAME`), that
/// served `served` pops from each listed queue and listed every queue on each of `pops` pops.
pub fn group(
    name: &str,
    processes: u32,
    pops: u64,
    queues: &[&str],
    served: &[(&str, u64)],
) -> GroupObservation {
    let served_by_queue: BTreeMap<String, u64> = served
        .iter()
        .map(|(q, n)| (format!("queue:{q}"), *n))
        .collect();
    let total_served = served_by_queue.values().sum();
    GroupObservation {
        group: name.to_string(),
        processes,
        connections: processes,
        pops,
        pops_sent: pops,
        keys_listed: pops * queues.len() as u64,
        served: total_served,
        timeouts: pops.saturating_sub(total_served),
        errors: 0,
        queues: queues.iter().map(|q| format!("queue:{q}")).collect(),
        served_by_queue,
        unattributed_served: 0,
    }
}

/// A local Redis whose calls cost `a + b × keys`, with calls of 1 key and of `keys` keys.
pub fn local_redis(a: f64, b: f64, calls: u64, keys: u64, cpu: f64) -> RedisCost {
    let buckets = vec![
        KeysBucket {
            calls: 1000,
            keys: 1000,
            seconds: 1000.0 * (a + b),
        },
        KeysBucket {
            calls,
            keys: calls * keys,
            seconds: calls as f64 * (a + b * keys as f64),
        },
    ];
    RedisCost {
        pid: 42,
        port: 6379,
        version: Some("7.2.4".into()),
        main_thread_cpu_seconds: cpu,
        bookkeeping_seconds: Some(buckets.iter().map(|b| b.seconds).sum()),
        blocking_calls: 1000 + calls,
        keys_listed: 1000 + calls * keys,
        served: 2000,
        by_keys: buckets,
    }
}

pub fn observation(redis: Option<RedisCost>, groups: Vec<GroupObservation>) -> Observation {
    Observation {
        version: VERSION,
        window_seconds: WINDOW,
        since_start: true,
        names_real: true,
        servers: vec![ServerObservation {
            server: "127.0.0.1:6379".into(),
            redis,
            groups,
        }],
    }
}
