//! The demo's worker groups (real Sidekiq fleets told apart by worker rules on their `-g`
//! tag) and its producer, which pushes jobs as enqueued or routed by the advised rules.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use integration_tests::{resp::Conn, resp::Reply, sidekiq_job, Sidekiq};
use serde_json::Value;

/// (group, Sidekiq tag, threads, whether it listens to the first two queues only in the
/// catch-all layout rather than to all of them). The small group gives the agent a second
/// fan-out, far from the first: the fixed cost of a call is fitted on the two.
const GROUPS: [(&str, &str, u32, bool); 3] = [
    ("default_a", "demo_a", 5, false),
    ("default_b", "demo_b", 5, false),
    ("urgent", "demo_u", 3, true),
];

/// Queues the urgent group listens to in the catch-all layout.
const URGENT_QUEUES: usize = 2;

pub fn queue_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("job_{i}")).collect()
}

/// The agent's worker rules: each group by its fleet's tag in the process title.
pub fn worker_rules_args() -> Vec<&'static str> {
    const RULES: [&str; 6] = [
        "--worker-rule",
        r"default_a:cmdline=\bdemo_a\b",
        "--worker-rule",
        r"default_b:cmdline=\bdemo_b\b",
        "--worker-rule",
        r"urgent:cmdline=\bdemo_u\b",
    ];
    RULES.to_vec()
}

pub struct Groups {
    fleets: Vec<(String, Vec<String>, Sidekiq)>,
}

impl Groups {
    /// Phase 1: the wide groups listen to every queue, the urgent one to the first two.
    pub fn catch_all(port: u16, queues: &[String]) -> Result<Self> {
        let mut fleets = Vec::new();
        for (group, tag, threads, narrow) in GROUPS {
            let listen: Vec<String> = if narrow {
                queues[..URGENT_QUEUES].to_vec()
            } else {
                queues.to_vec()
            };
            let refs: Vec<&str> = listen.iter().map(String::as_str).collect();
            let fleet = Sidekiq::start_tagged(port, Some(tag), &refs, threads);
            fleets.push((group.to_string(), listen, fleet));
        }
        Ok(Self { fleets })
    }

    /// Phase 2: each group listens to what the advice says it should.
    pub fn as_advised(port: u16, advice: &Value) -> Result<Self> {
        let mut fleets = Vec::new();
        for (group, tag, threads, _) in GROUPS {
            let advised = advice["groups"]
                .as_array()
                .and_then(|g| g.iter().find(|g| g["group"] == group))
                .with_context(|| format!("the advice has no group {group}: {advice}"))?;
            let listen: Vec<String> = advised["listen"]
                .as_array()
                .context("a group's listen list")?
                .iter()
                .filter_map(|q| q.as_str().map(str::to_string))
                .collect();
            if listen.is_empty() {
                bail!("the advice gives group {group} no queue to listen to");
            }
            let refs: Vec<&str> = listen.iter().map(String::as_str).collect();
            let fleet = Sidekiq::start_tagged(port, Some(tag), &refs, threads);
            fleets.push((group.to_string(), listen, fleet));
        }
        Ok(Self { fleets })
    }

    pub fn describe(&self) -> String {
        self.fleets
            .iter()
            .map(|(group, listen, _)| {
                let shown: Vec<&str> = listen.iter().take(3).map(String::as_str).collect();
                let more = listen.len().saturating_sub(shown.len());
                format!(
                    "  {group:<10} sidekiq -q {}{}",
                    shown.join(" -q "),
                    if more > 0 {
                        format!(" ... ({more} more)")
                    } else {
                        String::new()
                    }
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn stop(&mut self) {
        for (_, _, fleet) in &mut self.fleets {
            fleet.proc.stop();
        }
        self.fleets.clear();
    }
}

/// Where the producer puts a job enqueued for a queue.
pub enum Routing {
    AsEnqueued,
    /// The advised routing rules: the first rule that names the queue, else the catch-all.
    Rules {
        rules: Vec<(BTreeSet<String>, String)>,
        otherwise: String,
    },
}

impl Routing {
    pub fn from_advice(advice: &Value) -> Result<Self> {
        let mut rules = Vec::new();
        let mut otherwise = None;
        for rule in advice["routing"].as_array().context("the advice's routing")? {
            let to = rule["to"].as_str().context("a rule's target")?.to_string();
            match &rule["queues"] {
                Value::String(s) if s == "*" => otherwise = Some(to),
                Value::Array(queues) => rules.push((
                    queues
                        .iter()
                        .filter_map(|q| q.as_str().map(str::to_string))
                        .collect(),
                    to,
                )),
                other => bail!("a routing rule's queues: {other}"),
            }
        }
        Ok(Routing::Rules {
            rules,
            otherwise: otherwise.context("the advice has no catch-all rule")?,
        })
    }

    fn route<'a>(&'a self, queue: &'a str) -> &'a str {
        match self {
            Routing::AsEnqueued => queue,
            Routing::Rules { rules, otherwise } => rules
                .iter()
                .find(|(queues, _)| queues.contains(queue))
                .map_or(otherwise.as_str(), |(_, to)| to.as_str()),
        }
    }
}

/// The queues jobs are enqueued for, with their weights: a few busy ones, some quiet ones,
/// the urgent group's two among them; most queues get nothing, as in real fleets.
fn active_queues(queues: &[String]) -> Vec<(String, u32)> {
    let n = queues.len();
    let quarter = n / 4;
    [
        (0, 30),
        (1, 10),
        (quarter.saturating_sub(1), 5),
        (quarter, 25),
        (quarter + 1, 15),
        (n / 2, 8),
        (n / 2 + 3, 4),
        (n - 1, 3),
    ]
    .into_iter()
    .filter(|(i, _)| *i < n)
    .map(|(i, w)| (queues[i].clone(), w))
    .collect::<BTreeMap<_, _>>()
    .into_iter()
    .collect()
}

pub struct Producer {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<u64>,
}

impl Producer {
    pub fn start(port: u16, queues: &[String], per_second: u32, routing: Routing) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let weighted = active_queues(queues);
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let Ok(mut conn) = Conn::connect(port) else {
                    return 0;
                };
                let cycle: Vec<&str> = weighted
                    .iter()
                    .flat_map(|(q, w)| std::iter::repeat_n(q.as_str(), *w as usize))
                    .collect();
                let period = Duration::from_secs_f64(1.0 / per_second.max(1) as f64);
                let start = Instant::now();
                let mut jid = 0u64;
                while !stop.load(Ordering::Relaxed) && !super::interrupt::requested() {
                    let queue = routing.route(cycle[jid as usize % cycle.len()]);
                    jid += 1;
                    let _ = conn.call(&["SADD", "queues", queue]);
                    let _ = conn.call(&["LPUSH", &format!("queue:{queue}"), &sidekiq_job(queue, jid)]);
                    // Paced against the clock, not per sleep: the rate holds on a busy machine.
                    let due = start + period * jid as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
                jid
            }
        });
        Self { stop, thread }
    }

    /// Stops and returns the jobs pushed.
    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or(0)
    }
}

/// Waits until every Sidekiq queue is empty (the phase's jobs all ran).
pub fn wait_drained(port: u16, limit: Duration) -> Result<()> {
    let mut conn = Conn::connect(port).context("connect to Redis")?;
    let deadline = Instant::now() + limit;
    loop {
        let keys = match conn.call(&["KEYS", "queue:*"])? {
            Reply::Array(Some(keys)) => keys,
            _ => Vec::new(),
        };
        let mut left = 0i64;
        for key in keys {
            if let Reply::Bulk(Some(name)) = key {
                if let Reply::Integer(n) = conn.call(&["LLEN", &String::from_utf8_lossy(&name)])? {
                    left += n;
                }
            }
        }
        if left == 0 {
            return Ok(());
        }
        if Instant::now() > deadline || super::interrupt::requested() {
            bail!("{left} jobs still queued after {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
