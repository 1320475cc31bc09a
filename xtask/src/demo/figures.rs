//! The demo's figures, every one read from the agent: the observation it serves
//! (`/api/v1/advise`, cumulative since it started) before and after each phase, and the
//! difference between the two.

use std::collections::BTreeMap;

use anyhow::{bail, Context as _, Result};
use integration_tests::http_get;
use serde_json::Value;

/// The agent's observation since its start.
pub fn observe(address: &str) -> Result<Value> {
    let port: u16 = address
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .context("the agent's port")?;
    let (status, body) = http_get(port, "/api/v1/advise").context("ask the agent")?;
    if status != 200 {
        bail!("the agent answered HTTP {status}: {body}");
    }
    serde_json::from_str(&body).context("the agent's observation")
}

fn number(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// Per group: (pops, keys listed, served), cumulative.
fn groups(server: &Value) -> BTreeMap<String, (f64, f64, f64)> {
    server["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| {
            (
                g["group"].as_str().unwrap_or("").to_string(),
                (number(&g["pops"]), number(&g["keys_listed"]), number(&g["served"])),
            )
        })
        .collect()
}

fn find_server<'a>(obs: &'a Value, server: &str) -> Option<&'a Value> {
    obs["servers"].as_array()?.iter().find(|s| s["server"] == server)
}

/// One phase as the agent measured it.
#[derive(Clone, Debug)]
pub struct Phase {
    pub seconds: f64,
    pub jobs_pushed: u64,
    pub served: f64,
    pub pops: f64,
    pub keys_listed: f64,
    pub main_thread_cpu_seconds: f64,
    pub redis_served: f64,
    pub bookkeeping_seconds: f64,
}

impl Phase {
    pub fn between(before: &Value, after: &Value, server: &str, jobs_pushed: u64) -> Result<Self> {
        let now = find_server(after, server)
            .with_context(|| format!("the agent saw nothing of {server}: {after}"))?;
        let then = find_server(before, server);
        let (g_now, g_then) = (groups(now), then.map(groups).unwrap_or_default());
        let mut phase = Phase {
            seconds: number(&after["window_seconds"]) - number(&before["window_seconds"]),
            jobs_pushed,
            served: 0.0,
            pops: 0.0,
            keys_listed: 0.0,
            main_thread_cpu_seconds: 0.0,
            redis_served: 0.0,
            bookkeeping_seconds: 0.0,
        };
        for (group, (pops, keys, served)) in &g_now {
            let (p0, k0, s0) = g_then.get(group).copied().unwrap_or_default();
            phase.pops += pops - p0;
            phase.keys_listed += keys - k0;
            phase.served += served - s0;
        }
        let redis = &now["redis"];
        if redis.is_null() {
            bail!("the agent does not track the Redis behind {server}");
        }
        let then_redis = then.map(|t| &t["redis"]);
        let field = |name: &str| {
            number(&redis[name]) - then_redis.map(|r| number(&r[name])).unwrap_or(0.0)
        };
        phase.main_thread_cpu_seconds = field("main_thread_cpu_seconds");
        phase.redis_served = field("served");
        phase.bookkeeping_seconds = field("bookkeeping_seconds");
        Ok(phase)
    }

    pub fn keys_per_pop(&self) -> f64 {
        self.keys_listed / self.pops.max(1.0)
    }
    pub fn main_thread_us_per_job(&self) -> f64 {
        self.main_thread_cpu_seconds / self.redis_served.max(1.0) * 1e6
    }
    /// Bookkeeping as a share of one core (of the main thread's wall time).
    pub fn bookkeeping_share(&self) -> f64 {
        self.bookkeeping_seconds / self.seconds.max(1e-9)
    }
    pub fn jobs_per_second(&self) -> f64 {
        self.served / self.seconds.max(1e-9)
    }
}

pub struct Summary {
    pub before: Phase,
    pub after: Phase,
    /// The advice's `predicted` object.
    pub predicted: Value,
}

fn percent_off(measured: f64, predicted: f64) -> String {
    if predicted.abs() < 1e-12 {
        return "-".into();
    }
    format!("{:+.0}%", (measured - predicted) / predicted * 100.0)
}

impl Summary {
    pub fn render(&self) -> String {
        let p = &self.predicted;
        let rows: [(&str, f64, Option<f64>, f64, usize); 4] = [
            (
                "keys per blocking pop",
                self.before.keys_per_pop(),
                p["keys_per_pop_predicted"].as_f64(),
                self.after.keys_per_pop(),
                1,
            ),
            (
                "Redis main-thread us per job",
                self.before.main_thread_us_per_job(),
                p["main_thread_us_per_job_predicted"].as_f64(),
                self.after.main_thread_us_per_job(),
                1,
            ),
            (
                "blocking bookkeeping, % of a core",
                self.before.bookkeeping_share() * 100.0,
                p["bookkeeping_seconds_per_second_predicted"]
                    .as_f64()
                    .map(|v| v * 100.0),
                self.after.bookkeeping_share() * 100.0,
                3,
            ),
            (
                "jobs processed per second",
                self.before.jobs_per_second(),
                None,
                self.after.jobs_per_second(),
                1,
            ),
        ];
        let mut out = format!(
            "{:<36} {:>14} {:>14} {:>14} {:>10}\n",
            "", "phase 1", "predicted", "phase 2", "vs pred."
        );
        for (name, before, predicted, after, decimals) in rows {
            let shown = |v: f64| format!("{v:.decimals$}");
            out.push_str(&format!(
                "{:<36} {:>14} {:>14} {:>14} {:>10}\n",
                name,
                shown(before),
                predicted.map(shown).unwrap_or_else(|| "-".into()),
                shown(after),
                predicted
                    .map(|pr| percent_off(after, pr))
                    .unwrap_or_else(|| "-".into()),
            ));
        }
        out.push_str(&format!(
            "\nphase 1: {:.0} s, {} jobs pushed, {:.0} served; phase 2: {:.0} s, {} pushed, {:.0} served.\nEvery figure is read from the agent (/api/v1/advise before and after each phase); the prediction is fanout advise's.\n",
            self.before.seconds,
            self.before.jobs_pushed,
            self.before.served,
            self.after.seconds,
            self.after.jobs_pushed,
            self.after.served
        ));
        out
    }
}
