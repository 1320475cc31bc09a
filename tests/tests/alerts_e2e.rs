//! The shipped alert rules, loaded into a real Prometheus (Debian's package) that scrapes the
//! agent while the test drives Redis into saturation and runs worker fleets of different
//! fan-out. Root only; run with `sudo cargo xtask test`.
//!
//! The rules are the shipped file with its time windows shortened: `[1m]`/`[5m]` become
//! `[10s]`, every `for:` becomes 5 s and the recording interval 2 s, so that an alert can
//! fire and resolve within a test. The expressions and thresholds are unchanged.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use integration_tests::{
    http_get, require_root, resp::Conn, wait_for, Agent, Redis, Sidekiq,
};

fn shortened_rules(dir: &Path) -> std::path::PathBuf {
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/alerts/fanout.rules.yml"
    ))
    .unwrap();
    let mut rules = shipped
        .replace("[1m]", "[10s]")
        .replace("[5m]", "[10s]")
        .replace("interval: 30s", "interval: 2s");
    for minutes in ["2m", "5m", "10m", "15m"] {
        rules = rules.replace(&format!("for: {minutes}"), "for: 5s");
    }
    assert!(!rules.contains("for: 1"), "every `for` was shortened");
    let path = dir.join("rules.yml");
    std::fs::write(&path, rules).unwrap();
    path
}

/// Prometheus with the shortened rules, scraping the agent every second.
struct Prometheus {
    _inner: integration_tests::prometheus::Prometheus,
    port: u16,
}

impl Prometheus {
    fn start(agent_port: u16) -> Self {
        let inner = integration_tests::prometheus::Prometheus::start(|dir| {
            let rules = shortened_rules(dir);
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: [\"{}\"]\nscrape_configs:\n  - job_name: fanout\n    static_configs:\n      - targets: [\"127.0.0.1:{agent_port}\"]\n",
                rules.display()
            )
        });
        let port = inner.port;
        Self {
            _inner: inner,
            port,
        }
    }

    /// Active alerts: (name, state, labels).
    fn alerts(&self) -> Vec<(String, String, serde_json::Value)> {
        let (status, body) = http_get(self.port, "/api/v1/alerts").unwrap();
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["labels"]["alertname"].as_str().unwrap().to_string(),
                    a["state"].as_str().unwrap().to_string(),
                    a["labels"].clone(),
                )
            })
            .collect()
    }

    fn firing(&self, name: &str, label: &str, value: &str) -> bool {
        self.alerts()
            .iter()
            .any(|(n, s, l)| n == name && s == "firing" && l[label] == value)
    }
}

#[test]
fn redis_saturation_fires_the_alert_and_it_resolves_when_the_load_stops() {
    require_root();
    let redis = Redis::start(&[]);
    let agent = Agent::start(&[]);
    let prometheus = Prometheus::start(agent.port);
    let pid = redis.pid().to_string();
    assert!(!prometheus.firing("FanoutRedisMainThreadSaturated", "process_pid", &pid));

    // Back-to-back 1 s CPU-bound scripts keep the main thread busy (bounded: 90 s at most).
    let stop = Arc::new(AtomicBool::new(false));
    let port = redis.port;
    let load = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut conn = Conn::connect(port).unwrap();
            let script = "local s = redis.call('TIME') local start = s[1] * 1000000 + s[2] \
                          repeat local n = redis.call('TIME') until n[1] * 1000000 + n[2] - start > 1000000 return 1";
            for _ in 0..90 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                conn.call(&["EVAL", script, "0"]).unwrap();
            }
        })
    };
    wait_for(
        "the saturation alert to fire",
        Duration::from_secs(60),
        || {
            (prometheus.firing("FanoutRedisMainThreadSaturated", "process_pid", &pid)
                && prometheus.alerts().iter().any(|(n, s, l)| {
                    n == "FanoutRedisMainThreadSaturated"
                        && s == "firing"
                        && l["severity"] == "critical"
                }))
            .then_some(())
        },
    );
    // Busy, not starved: the starvation alert stays quiet.
    assert!(!prometheus.firing("FanoutRedisMainThreadStarved", "process_pid", &pid));
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    wait_for(
        "the saturation alert to resolve",
        Duration::from_secs(60),
        || {
            (!prometheus.alerts().iter().any(|(n, _, l)| {
                n == "FanoutRedisMainThreadSaturated" && l["process_pid"] == pid.as_str()
            }))
            .then_some(())
        },
    );
}

#[test]
fn a_fleet_on_440_queues_fires_the_fanout_alert_and_one_on_a_single_queue_does_not() {
    require_root();
    let wide_redis = Redis::start(&[]);
    let narrow_redis = Redis::start(&[]);
    let agent = Agent::start(&[]);
    let prometheus = Prometheus::start(agent.port);
    let queues: Vec<String> = (0..440).map(|i| format!("q{i}")).collect();
    let _wide = Sidekiq::start(
        wide_redis.port,
        &queues.iter().map(String::as_str).collect::<Vec<_>>(),
        2,
    );
    let _narrow = Sidekiq::start(narrow_redis.port, &["only"], 2);
    let (wide_pid, narrow_pid) = (wide_redis.pid().to_string(), narrow_redis.pid().to_string());
    wait_for(
        "the fan-out alert for the wide fleet's Redis",
        Duration::from_secs(60),
        || {
            prometheus
                .firing("FanoutBlockingFanoutHigh", "process_pid", &wide_pid)
                .then_some(())
        },
    );
    // Both Redis servers have been blocking all along (Sidekiq's 2 s BRPOP): only the wide one fires.
    assert!(!prometheus.alerts().iter().any(
        |(n, _, l)| n == "FanoutBlockingFanoutHigh" && l["process_pid"] == narrow_pid.as_str()
    ));
    let (status, body) = http_get(prometheus.port, &format!("/api/v1/query?query=fanout:redis_blocking_keys:mean5m%7Bprocess_pid=%22{narrow_pid}%22%7D")).unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("\"1\""),
        "the narrow fleet lists one key per call: {body}"
    );
}
