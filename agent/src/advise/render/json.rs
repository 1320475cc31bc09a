//! The advice as neutral JSON, for other job systems and scripts: which group listens to which
//! one queue, which queues route where, and the numbers behind it. Field names are a contract
//! (a demo and tests read them): add fields, never rename them.

use serde::{Deserialize, Serialize};

use crate::advise::{
    fit::FitKind,
    names::queue_name,
    plan::{Advice, ServerAdvice, Verdict},
};

/// The layout version of this JSON.
pub const VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdviceJson {
    pub version: u32,
    pub window_seconds: f64,
    pub since_start: bool,
    pub names_real: bool,
    pub servers: Vec<ServerJson>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServerJson {
    pub server: String,
    /// `"ok"` or `"insufficient"`.
    pub advice: String,
    /// Why there is no advice; `null` with advice.
    pub reason: Option<String>,
    pub groups: Vec<GroupJson>,
    /// Explicit routes in order, then `{"queues": "*", "to": <catch-all shard>}`.
    pub routing: Vec<RouteJson>,
    pub cost: CostJson,
    pub predicted: PredictedJson,
    /// Listened queues that served nothing in the window.
    pub idle_queues: Vec<String>,
    /// Queues two groups or more listen to.
    pub shared_queues: Vec<SharedQueueJson>,
    /// Groups seen popping whose queues are not known: not in the plan.
    pub groups_without_queues: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupJson {
    pub group: String,
    pub shard_queue: String,
    /// The queues the group should listen to (its shard).
    pub listen: Vec<String>,
    pub processes: u32,
    pub catch_all: bool,
    /// How many queues it listens to now, and the ones whose jobs go to its shard.
    pub queues_now: usize,
    pub assigned_queues: Vec<String>,
    pub keys_per_pop_now: Option<f64>,
    pub keys_per_pop_predicted: f64,
    pub pops_per_second: f64,
}

/// `queues` is a list of names, or `"*"` for every job no earlier route takes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RouteQueues {
    Named(Vec<String>),
    Everything(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteJson {
    pub queues: RouteQueues,
    /// The Redis keys of `queues` (absent for `*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<String>>,
    pub to: String,
    pub group: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CostJson {
    /// `seconds per call = per_call + per_key × keys`, microseconds.
    pub per_call_us: Option<f64>,
    pub per_key_us: Option<f64>,
    /// `"fitted"`, `"upper_bound"` or `"none"`.
    pub fit: String,
    /// Why there is no fit, or the correction the fit needed.
    pub note: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PredictedJson {
    /// Blocking bookkeeping, seconds per second (a share of one core).
    pub bookkeeping_seconds_per_second_now: Option<f64>,
    pub bookkeeping_seconds_per_second_predicted: Option<f64>,
    /// Bookkeeping as a share of the main thread's CPU.
    pub main_thread_share_now: Option<f64>,
    pub main_thread_share_predicted: Option<f64>,
    /// Over every group, weighted by their pops.
    pub keys_per_pop_now: Option<f64>,
    pub keys_per_pop_predicted: Option<f64>,
    pub main_thread_us_per_job_now: Option<f64>,
    pub main_thread_us_per_job_predicted: Option<f64>,
    /// Main-thread CPU, seconds per second.
    pub main_thread_cpu_seconds_per_second_now: Option<f64>,
    pub main_thread_cpu_seconds_per_second_predicted: Option<f64>,
    /// What the model saves before the floor at the calls' fixed part, seconds per second.
    pub saved_seconds_per_second: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SharedQueueJson {
    pub queue: String,
    pub groups: Vec<String>,
}

const MICROS: f64 = 1e6;

impl AdviceJson {
    pub fn of(advice: &Advice) -> Self {
        AdviceJson {
            version: VERSION,
            window_seconds: advice.window_seconds,
            since_start: advice.since_start,
            names_real: advice.names_real,
            servers: advice.servers.iter().map(server).collect(),
        }
    }
}

fn server(s: &ServerAdvice) -> ServerJson {
    let (per_call_us, per_key_us, fit, note) = match &s.cost.fit {
        Ok(fit) => (
            Some(fit.per_call_seconds * MICROS),
            Some(fit.per_key_seconds * MICROS),
            fit.kind.as_str(),
            fit.correction.map(|c| c.explain().to_string()),
        ),
        Err(reason) => (None, None, "none", Some(reason.to_string())),
    };
    let cost = CostJson {
        per_call_us,
        per_key_us,
        fit: fit.to_string(),
        note: note.or_else(|| {
            matches!(&s.cost.fit, Ok(f) if f.kind == FitKind::UpperBound).then(|| {
                "one fan-out seen: the fixed part per call cannot be told apart".to_string()
            })
        }),
    };
    let idle_queues = s
        .today
        .idle_queues()
        .map(|q| q.name().to_string())
        .collect();
    let shared_queues = s
        .today
        .shared_queues()
        .map(|q| SharedQueueJson {
            queue: q.name().to_string(),
            groups: q.listeners.clone(),
        })
        .collect();
    let mut predicted = PredictedJson {
        bookkeeping_seconds_per_second_now: s.cost.bookkeeping_per_second,
        bookkeeping_seconds_per_second_predicted: None,
        main_thread_share_now: s.cost.bookkeeping_share_of_main_thread,
        main_thread_share_predicted: None,
        keys_per_pop_now: s.today.keys_per_pop(),
        keys_per_pop_predicted: None,
        main_thread_us_per_job_now: s.cost.main_thread_seconds_per_job.map(|v| v * MICROS),
        main_thread_us_per_job_predicted: None,
        main_thread_cpu_seconds_per_second_now: s.cost.main_thread_cpu_per_second,
        main_thread_cpu_seconds_per_second_predicted: None,
        saved_seconds_per_second: None,
    };
    let proposal = match &s.verdict {
        Verdict::Insufficient(reason) => {
            return ServerJson {
                server: s.server.clone(),
                advice: "insufficient".into(),
                reason: Some(reason.clone()),
                groups: Vec::new(),
                routing: Vec::new(),
                cost,
                predicted,
                idle_queues,
                shared_queues,
                groups_without_queues: Vec::new(),
            };
        }
        Verdict::Proposal(p) => p,
    };
    predicted.keys_per_pop_predicted = proposal.prediction.keys_per_pop_predicted;
    if let Some(t) = &proposal.prediction.time {
        predicted.bookkeeping_seconds_per_second_predicted = Some(t.bookkeeping_predicted);
        predicted.main_thread_share_predicted = t.share_of_main_thread_predicted;
        predicted.main_thread_us_per_job_predicted =
            t.seconds_per_job_predicted.map(|v| v * MICROS);
        predicted.main_thread_cpu_seconds_per_second_predicted = Some(t.main_thread_cpu_predicted);
        predicted.saved_seconds_per_second = Some(t.saved_per_second);
    }
    let groups = proposal
        .groups
        .iter()
        .enumerate()
        .map(|(i, g)| GroupJson {
            group: g.group.clone(),
            shard_queue: g.shard_queue.clone(),
            listen: vec![g.shard_queue.clone()],
            processes: g.processes,
            catch_all: i == proposal.catch_all,
            queues_now: g.queues_now,
            assigned_queues: g
                .assigned
                .iter()
                .map(|k| queue_name(k).to_string())
                .collect(),
            keys_per_pop_now: g.keys_per_pop_now,
            keys_per_pop_predicted: g.keys_per_pop_predicted,
            pops_per_second: g.pops_per_second,
        })
        .collect();
    let catch_all = proposal.catch_all();
    let routing = proposal
        .routes
        .iter()
        .map(|r| RouteJson {
            queues: RouteQueues::Named(r.queue_names().into_iter().map(str::to_string).collect()),
            keys: Some(r.keys.clone()),
            to: r.to.clone(),
            group: r.group.clone(),
        })
        .chain(std::iter::once(RouteJson {
            queues: RouteQueues::Everything("*".into()),
            keys: None,
            to: catch_all.shard_queue.clone(),
            group: catch_all.group.clone(),
        }))
        .collect();
    ServerJson {
        server: s.server.clone(),
        advice: "ok".into(),
        reason: None,
        groups,
        routing,
        cost,
        predicted,
        idle_queues,
        shared_queues,
        groups_without_queues: proposal.unplanned_groups.clone(),
    }
}

/// The advice as pretty JSON, with a final newline.
pub fn render(advice: &Advice) -> String {
    // Serializing these plain structs cannot fail (string keys, no maps of other keys).
    let mut text = serde_json::to_string_pretty(&AdviceJson::of(advice))
        .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advise::{
        fixtures::{group, local_redis, observation, US},
        plan::plan,
    };

    fn advice() -> Advice {
        plan(&observation(
            Some(local_redis(2.0 * US, 0.3 * US, 500, 3, 20.0)),
            vec![
                group("urgent", 2, 400, &["a", "b", "s"], &[("a", 100), ("s", 10)]),
                group("batch", 3, 600, &["c", "d", "s"], &[("c", 300), ("s", 20)]),
            ],
        ))
    }

    #[test]
    fn json_round_trips_and_has_the_fields_the_demo_reads() {
        let text = render(&advice());
        let back: AdviceJson = serde_json::from_str(&text).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        // Read back, it writes the same document (floats compared as parsed from the text:
        // serde_json's default float parsing is not bit-exact).
        assert_eq!(serde_json::to_value(&back).unwrap(), v);
        assert_eq!(
            back.servers[0].routing,
            AdviceJson::of(&advice()).servers[0].routing
        );

        assert_eq!(v["version"], 1);
        assert_eq!(v["window_seconds"], 100.0);
        let s = &v["servers"][0];
        assert_eq!(s["server"], "127.0.0.1:6379");
        assert_eq!(s["advice"], "ok");
        assert!(s["reason"].is_null());
        for field in [
            "group",
            "shard_queue",
            "listen",
            "keys_per_pop_now",
            "keys_per_pop_predicted",
            "pops_per_second",
        ] {
            assert!(s["groups"][0].get(field).is_some(), "groups[].{field}");
        }
        assert_eq!(s["groups"][0]["listen"], serde_json::json!(["batch"]));
        // urgent takes a, b; s (shared: 30 served) goes to batch with c, d.
        assert_eq!(
            s["routing"],
            serde_json::json!([
                {"queues": ["a", "b"], "keys": ["queue:a", "queue:b"], "to": "urgent",
                 "group": "urgent"},
                {"queues": "*", "to": "batch", "group": "batch"}
            ])
        );
        assert_eq!(s["cost"]["fit"], "fitted");
        assert!((s["cost"]["per_key_us"].as_f64().unwrap() - 0.3).abs() < 1e-9);
        assert!((s["cost"]["per_call_us"].as_f64().unwrap() - 2.0).abs() < 1e-9);
        for field in [
            "bookkeeping_seconds_per_second_now",
            "bookkeeping_seconds_per_second_predicted",
            "main_thread_share_now",
            "main_thread_share_predicted",
            "keys_per_pop_now",
            "keys_per_pop_predicted",
            "main_thread_us_per_job_now",
            "main_thread_us_per_job_predicted",
        ] {
            assert!(s["predicted"][field].is_number(), "predicted.{field}");
        }
        assert_eq!(s["predicted"]["keys_per_pop_now"], 3.0);
        assert_eq!(s["predicted"]["keys_per_pop_predicted"], 1.0);
        assert_eq!(s["shared_queues"][0]["queue"], "s");
    }

    #[test]
    fn insufficient_servers_say_why_and_keep_what_was_measured() {
        let advice = plan(&observation(
            Some(local_redis(2.0 * US, 0.3 * US, 500, 3, 20.0)),
            vec![group("g", 1, 10, &["a"], &[])],
        ));
        let v: serde_json::Value = serde_json::from_str(&render(&advice)).unwrap();
        let s = &v["servers"][0];
        assert_eq!(s["advice"], "insufficient");
        assert!(s["reason"]
            .as_str()
            .unwrap()
            .contains("only 10 blocking pops"));
        assert_eq!(s["routing"], serde_json::json!([]));
        assert!(s["predicted"]["bookkeeping_seconds_per_second_now"].is_number());
        assert!(s["predicted"]["bookkeeping_seconds_per_second_predicted"].is_null());
    }

    #[test]
    fn a_remote_redis_has_no_fit_and_says_why() {
        let advice = plan(&observation(
            None,
            vec![group("g", 1, 500, &["a"], &[("a", 5)])],
        ));
        let v: serde_json::Value = serde_json::from_str(&render(&advice)).unwrap();
        let cost = &v["servers"][0]["cost"];
        assert_eq!(cost["fit"], "none");
        assert!(cost["per_key_us"].is_null());
        assert!(cost["note"]
            .as_str()
            .unwrap()
            .contains("not on the agent's host"));
    }
}
