//! The planner on fixed observations.

use super::*;
use crate::advise::{
    cost::REMOTE_REDIS,
    fixtures::{group, local_redis, observation, US, WINDOW},
};

fn only_server(advice: &Advice) -> &ServerAdvice {
    assert_eq!(advice.servers.len(), 1);
    &advice.servers[0]
}

fn proposal(advice: &Advice) -> &Proposal {
    match &only_server(advice).verdict {
        Verdict::Proposal(p) => p,
        Verdict::Insufficient(reason) => panic!("insufficient: {reason}"),
    }
}

fn reason(advice: &Advice) -> &str {
    match &only_server(advice).verdict {
        Verdict::Insufficient(reason) => reason,
        Verdict::Proposal(p) => panic!("expected too little data, got {p:?}"),
    }
}

fn plan_of<'a>(p: &'a Proposal, name: &str) -> &'a GroupPlan {
    p.groups.iter().find(|g| g.group == name).unwrap()
}

fn keys(names: &[&str]) -> Vec<String> {
    names.iter().map(|q| format!("queue:{q}")).collect()
}

#[test]
fn disjoint_groups_keep_their_queues_and_list_one_key_each() {
    let obs = observation(
        Some(local_redis(2.0 * US, 0.3 * US, 500, 3, 20.0)),
        vec![
            group("Urgent", 2, 400, &["a", "b"], &[("a", 100), ("b", 50)]),
            group("batch", 3, 600, &["c", "d", "e"], &[("c", 300)]),
        ],
    );
    let advice = plan(&obs);
    let today = &only_server(&advice).today;
    assert_eq!(today.shared_queues().count(), 0);
    let p = proposal(&advice);
    assert!(!p.shared_split);
    // batch served most: the catch-all, with no explicit rule.
    assert_eq!(p.catch_all().group, "batch");
    assert_eq!(p.catch_all().shard_queue, "batch");
    assert_eq!(plan_of(p, "batch").assigned, keys(&["c", "d", "e"]));
    assert_eq!(
        p.routes,
        vec![Route {
            group: "Urgent".into(),
            keys: keys(&["a", "b"]),
            to: "urgent".into(),
        }]
    );
    for g in &p.groups {
        assert_eq!(g.keys_per_pop_predicted, 1.0, "{}", g.group);
    }
    assert_eq!(plan_of(p, "Urgent").keys_per_pop_now, Some(2.0));
    // (400 × 2 + 600 × 3) / 1000 now, 1 after.
    assert_eq!(p.prediction.keys_per_pop_now, Some(2.6));
    assert_eq!(p.prediction.keys_per_pop_predicted, Some(1.0));
}

#[test]
fn shared_queues_are_split_by_traffic_keeping_each_groups_share() {
    // Both listen to q1, q2, q3; A served 600 pops, B 400: A's capacity 600, B's 400.
    let obs = observation(
        None,
        vec![
            group(
                "A",
                4,
                1000,
                &["q1", "q2", "q3"],
                &[("q1", 300), ("q2", 200), ("q3", 100)],
            ),
            group(
                "B",
                2,
                800,
                &["q1", "q2", "q3"],
                &[("q1", 200), ("q2", 100), ("q3", 100)],
            ),
        ],
    );
    let advice = plan(&obs);
    let today = &only_server(&advice).today;
    let shared: Vec<&str> = today.shared_queues().map(|q| q.name()).collect();
    assert_eq!(shared, ["q1", "q2", "q3"]);
    assert_eq!(today.queues[0].served, 500);
    assert_eq!(today.queues[0].listeners, ["A", "B"]);
    let p = proposal(&advice);
    assert!(p.shared_split);
    // q1 (500): A 500/600 = 0.83 < B 500/400 = 1.25 → A.
    // q2 (300): A 800/600 = 1.33 > B 300/400 = 0.75 → B.
    // q3 (200): A 700/600 = 1.17 < B 500/400 = 1.25 → A.
    assert_eq!(plan_of(p, "A").assigned, keys(&["q1", "q3"]));
    assert_eq!(plan_of(p, "B").assigned, keys(&["q2"]));
    assert_eq!(p.catch_all().group, "A");
    assert_eq!(p.routes.len(), 1);
    assert_eq!(p.routes[0].queue_names(), ["q2"]);
    assert_eq!(p.routes[0].to, "b");
}

#[test]
fn equal_ratios_go_to_the_larger_group_then_by_name() {
    // One shared queue and equal capacities: the name decides.
    let obs = observation(
        None,
        vec![
            group("y", 1, 100, &["s"], &[("s", 50)]),
            group("x", 1, 100, &["s"], &[("s", 50)]),
        ],
    );
    let p = plan(&obs);
    let p = proposal(&p);
    assert_eq!(plan_of(p, "x").assigned, keys(&["s"]));
    assert!(plan_of(p, "y").assigned.is_empty());
}

#[test]
fn idle_shared_queues_are_reported_and_left_to_the_catch_all() {
    let obs = observation(
        None,
        vec![
            group("big", 2, 500, &["x", "idle", "quiet"], &[("x", 300)]),
            group("small", 1, 300, &["y", "idle", "quiet"], &[("y", 100)]),
        ],
    );
    let advice = plan(&obs);
    let today = &only_server(&advice).today;
    let idle: Vec<&str> = today.idle_queues().map(|q| q.name()).collect();
    assert_eq!(idle, ["idle", "quiet"]);
    let p = proposal(&advice);
    assert_eq!(p.catch_all().group, "big");
    assert_eq!(plan_of(p, "big").assigned, keys(&["idle", "quiet", "x"]));
    // No explicit rule names the idle queues: the `*` rule covers them.
    assert_eq!(p.routes.len(), 1);
    assert_eq!(p.routes[0].queue_names(), ["y"]);
}

#[test]
fn a_single_group_gets_one_catch_all_rule() {
    let obs = observation(
        None,
        vec![group("sidekiq", 4, 900, &["a", "b", "c"], &[("a", 10)])],
    );
    let p = plan(&obs);
    let p = proposal(&p);
    assert!(p.routes.is_empty());
    assert_eq!(p.catch_all().shard_queue, "sidekiq");
    assert_eq!(p.catch_all().keys_per_pop_predicted, 1.0);
}

#[test]
fn the_catch_all_is_the_busiest_then_the_larger_then_by_name() {
    let obs = observation(
        None,
        vec![
            group("b", 3, 100, &["q"], &[("q", 10)]),
            group("a", 3, 100, &["r"], &[("r", 10)]),
            group("c", 2, 100, &["s"], &[("s", 10)]),
        ],
    );
    let p = plan(&obs);
    assert_eq!(proposal(&p).catch_all().group, "a");
}

#[test]
fn a_shard_never_takes_the_name_of_a_queue_routed_elsewhere() {
    // Group "default" is not the catch-all; a queue named "default" goes to "main".
    let obs = observation(
        None,
        vec![
            group("main", 2, 500, &["default", "a"], &[("default", 300)]),
            group("default", 1, 200, &["b"], &[("b", 50)]),
        ],
    );
    let p = plan(&obs);
    let p = proposal(&p);
    assert_eq!(plan_of(p, "default").shard_queue, "default_2");
    assert_eq!(plan_of(p, "main").shard_queue, "main");
}

#[test]
fn too_little_data_is_said_instead_of_advising() {
    let few = observation(None, vec![group("g", 1, 50, &["a"], &[("a", 5)])]);
    assert!(
        reason(&plan(&few)).contains("only 50 blocking pops"),
        "{}",
        reason(&plan(&few))
    );

    let mut short = observation(None, vec![group("g", 1, 500, &["a"], &[("a", 5)])]);
    short.window_seconds = 2.0;
    assert!(reason(&plan(&short)).contains("too short"));

    let unknown = observation(None, vec![group("g", 1, 500, &[], &[])]);
    assert!(reason(&plan(&unknown)).contains("no worker group with known queues"));

    let mut blind = group("g", 1, 500, &["a"], &[]);
    blind.unattributed_served = 200;
    blind.served = 200;
    let blind = observation(None, vec![blind]);
    assert!(reason(&plan(&blind)).contains("none of the 200 served pops"));
}

#[test]
fn a_remote_redis_gets_keys_per_pop_but_no_time() {
    let obs = observation(
        None,
        vec![
            group("a", 1, 300, &["x", "y"], &[("x", 30)]),
            group("b", 1, 300, &["y", "z"], &[("z", 30)]),
        ],
    );
    let advice = plan(&obs);
    let server = only_server(&advice);
    assert_eq!(server.cost.fit, Err(REMOTE_REDIS));
    assert_eq!(server.cost.bookkeeping_per_second, None);
    let p = proposal(&advice);
    assert_eq!(p.prediction.time, None);
    assert_eq!(p.prediction.keys_per_pop_now, Some(2.0));
    assert_eq!(p.prediction.keys_per_pop_predicted, Some(1.0));
}

#[test]
fn the_saving_is_calls_times_cost_per_key_times_keys_removed() {
    // 3 groups listening to 440 keys each, 10 pops/s each (1000 pops in 100 s), on a Redis
    // whose calls cost 2 us + 0.3 us × keys.
    let queues: Vec<String> = (0..440).map(|i| format!("q{i}")).collect();
    let queues: Vec<&str> = queues.iter().map(String::as_str).collect();
    let groups = ["g1", "g2", "g3"]
        .iter()
        .enumerate()
        .map(|(i, name)| group(name, 2, 1000, &queues, &[(queues[i], 100)]))
        .collect();
    let obs = observation(
        Some(local_redis(2.0 * US, 0.3 * US, 3000, 440, 50.0)),
        groups,
    );
    let advice = plan(&obs);
    let p = proposal(&advice);
    let time = p
        .prediction
        .time
        .as_ref()
        .expect("a local Redis with bookkeeping");
    let close = |found: f64, expected: f64| (found - expected).abs() <= 1e-12 * expected.abs();
    assert!(close(time.per_key_seconds, 0.3 * US), "{time:?}");
    assert!(close(time.per_call_seconds, 2.0 * US), "{time:?}");
    assert_eq!(time.terms.len(), 3);
    for term in &time.terms {
        assert!(close(term.calls_per_second, 10.0));
        assert_eq!(term.keys_now, 440.0);
        assert_eq!(term.keys_predicted, 1.0);
    }
    let saved = 30.0 * 0.3e-6 * 439.0;
    assert!(close(time.saved_per_second, saved), "{time:?}");
    // Bookkeeping now: (1000 × 2.3 us + 3000 × 134 us) / 100 s.
    let now = (1000.0 * 2.3e-6 + 3000.0 * 134e-6) / WINDOW;
    assert!(close(time.bookkeeping_now, now), "{time:?}");
    assert!(!time.floored);
    assert!(close(time.bookkeeping_predicted, now - saved), "{time:?}");
    assert!(close(time.main_thread_cpu_now, 0.5));
    assert!(
        close(time.main_thread_cpu_predicted, 0.5 - saved),
        "{time:?}"
    );
    assert!(close(time.share_of_main_thread_now.unwrap(), now / 0.5));
    // 50 s of main thread over 2000 served jobs: 25 ms each now.
    assert!(close(time.seconds_per_job_now.unwrap(), 0.025));
    assert!(close(
        time.seconds_per_job_predicted.unwrap(),
        (0.5 - saved) * WINDOW / 2000.0
    ));
}

#[test]
fn the_prediction_never_goes_below_the_fixed_part_of_the_calls() {
    let mut redis = local_redis(2.0 * US, 0.3 * US, 3000, 440, 50.0);
    // Measured bookkeeping far below what the model would save.
    redis.bookkeeping_seconds = Some(0.01);
    let queues: Vec<String> = (0..440).map(|i| format!("q{i}")).collect();
    let queues: Vec<&str> = queues.iter().map(String::as_str).collect();
    let obs = observation(
        Some(redis),
        vec![group("g", 1, 1000, &queues, &[("q0", 10)])],
    );
    let advice = plan(&obs);
    let time = proposal(&advice).prediction.time.clone().unwrap();
    assert!(time.floored);
    // 2 us × 10 calls/s.
    assert!(
        (time.bookkeeping_predicted - 20.0 * US).abs() < 1e-15,
        "{time:?}"
    );
}
