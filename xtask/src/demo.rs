//! `cargo xtask demo`: a Redis, two real Sidekiq fleets (one listening to 20 queues, one to a
//! single queue), a producer, and the agent; every few seconds it prints what the agent sees.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use integration_tests::{enqueue_sidekiq_job, prom::Scrape, Agent, Redis, Sidekiq};

use crate::util::{build_agent, is_root};

const CPU: &str = "process_thread_cpu_time_seconds_total";
const RUNQ_SUM: &str = "process_thread_runqueue_delay_seconds_sum";
const RUNQ_COUNT: &str = "process_thread_runqueue_delay_seconds_count";

type Key = (String, String, String);

fn per_thread(scrape: &Scrape, name: &str) -> BTreeMap<Key, f64> {
    let mut out = BTreeMap::new();
    for s in scrape.find(name, &[]) {
        let key = (
            s.labels["process_group"].clone(),
            s.labels["process_pid"].clone(),
            s.labels["thread_name"].clone(),
        );
        *out.entry(key).or_default() += s.value;
    }
    out
}

fn print_table(before: &Scrape, after: &Scrape, seconds: f64) {
    let (cpu0, cpu1) = (per_thread(before, CPU), per_thread(after, CPU));
    let (rs0, rs1) = (per_thread(before, RUNQ_SUM), per_thread(after, RUNQ_SUM));
    let (rc0, rc1) = (
        per_thread(before, RUNQ_COUNT),
        per_thread(after, RUNQ_COUNT),
    );
    println!(
        "{:<10} {:>7} {:<16} {:>8} {:>14} {:>10}",
        "group", "pid", "thread", "cpu %", "runq mean us", "wakeups/s"
    );
    for (key, value) in &cpu1 {
        let cpu = (value - cpu0.get(key).copied().unwrap_or(0.0)) / seconds * 100.0;
        let waits = rc1.get(key).copied().unwrap_or(0.0) - rc0.get(key).copied().unwrap_or(0.0);
        let delay = rs1.get(key).copied().unwrap_or(0.0) - rs0.get(key).copied().unwrap_or(0.0);
        let mean = if waits > 0.0 {
            format!("{:.1}", delay / waits * 1e6)
        } else {
            "-".into()
        };
        println!(
            "{:<10} {:>7} {:<16} {:>8.1} {:>14} {:>10.0}",
            key.0,
            key.1,
            key.2,
            cpu,
            mean,
            waits / seconds
        );
    }
    println!();
    // The blocking side, per worker group (as the workers see it) and per Redis.
    let group_sum = |scrape: &Scrape, name: &str, extra: &[(&str, &str)], group: &str| {
        let mut m = vec![("process_group", group)];
        m.extend_from_slice(extra);
        scrape.sum(name, &m)
    };
    println!(
        "{:<10} {:>10} {:>12} {:>10} {:>16}",
        "group", "pops/s", "keys/pop", "served %", "served mean ms"
    );
    for group in after.label_values("worker_blocking_pop_keys_count", &[], "process_group") {
        let d = |name: &str, extra: &[(&str, &str)]| {
            group_sum(after, name, extra, &group) - group_sum(before, name, extra, &group)
        };
        let pops = d("worker_blocking_pop_duration_seconds_count", &[]);
        let served = d(
            "worker_blocking_pop_duration_seconds_count",
            &[("outcome", "served")],
        );
        let keys = d("worker_blocking_pop_keys_sum", &[])
            / d("worker_blocking_pop_keys_count", &[]).max(1.0);
        let mean_served = d(
            "worker_blocking_pop_duration_seconds_sum",
            &[("outcome", "served")],
        ) / served.max(1.0);
        println!(
            "{:<10} {:>10.1} {:>12.0} {:>10.0} {:>16.1}",
            group,
            pops / seconds,
            keys,
            100.0 * served / pops.max(1.0),
            mean_served * 1e3
        );
    }
    for pid in after.label_values("redis_blocking_keys_count", &[], "process_pid") {
        let d = |name: &str| {
            after.sum(name, &[("process_pid", &pid)]) - before.sum(name, &[("process_pid", &pid)])
        };
        let calls = d("redis_blocking_keys_count");
        println!(
            "redis pid {pid}: {:.0} blocking calls/s, {:.0} keys per call, {:.0} clients blocked now ({:.0} key registrations), bookkeeping {:.2}% of a core",
            calls / seconds,
            d("redis_blocking_keys_sum") / calls.max(1.0),
            after.sum("redis_clients_blocked", &[("process_pid", &pid)]),
            after.sum("redis_blocking_registrations", &[("process_pid", &pid)]),
            100.0 * d("redis_blocking_cpu_time_seconds_total") / seconds
        );
    }
    println!();
}

pub fn run(seconds: u64) -> Result<()> {
    if !is_root() {
        bail!("the demo attaches eBPF programs: run `sudo cargo xtask demo`");
    }
    let bin = build_agent(true)?;
    println!("starting redis-server, Sidekiq fleets 'wide' (20 queues) and 'narrow' (1 queue), and the agent");
    let redis = Redis::start(&["--io-threads", "2"]);
    let wide_queues: Vec<String> = (0..20).map(|i| format!("wide{i}")).collect();
    let wide_refs: Vec<&str> = wide_queues.iter().map(String::as_str).collect();
    let _wide = Sidekiq::start_tagged(redis.port, Some("wide"), &wide_refs, 5);
    let _narrow = Sidekiq::start_tagged(redis.port, Some("narrow"), &["narrow"], 5);
    let agent = Agent::start_binary(
        &bin,
        &[
            "--worker-rule",
            r"wide:cmdline=sidekiq.*\bwide\b",
            "--worker-rule",
            r"narrow:cmdline=sidekiq.*\bnarrow\b",
        ],
        &[],
    );
    println!(
        "agent metrics: http://127.0.0.1:{}/metrics (for {seconds} s)\n",
        agent.port
    );

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut jid = 0u64;
    let mut before = agent.scrape();
    let mut window = Instant::now();
    while Instant::now() < deadline {
        // About 100 jobs a second, spread over both fleets' queues.
        jid += 1;
        let queue = if jid.is_multiple_of(2) {
            "narrow".to_string()
        } else {
            format!("wide{}", jid % 20)
        };
        enqueue_sidekiq_job(&redis, &queue, jid);
        std::thread::sleep(Duration::from_millis(10));
        if window.elapsed() >= Duration::from_secs(5) {
            let after = agent.scrape();
            print_table(&before, &after, window.elapsed().as_secs_f64());
            before = after;
            window = Instant::now();
        }
    }
    println!("enqueued {jid} jobs; stopping everything");
    Ok(())
}
