//! `cargo xtask demo`: the story Fanout is for, measured end to end on its own redis-server
//! and real Sidekiq fleets.
//!
//! 1. Catch-all: two worker groups listen to all N queues (a small group to two of them, as
//!    GitLab layouts have an urgent group beside the catch-all) while jobs arrive on some
//!    queues. `fanout top` shows
//!    it live.
//! 2. `fanout advise` runs on what the agent saw and prints its proposal.
//! 3. The proposal is applied as it says: the producer routes each job by its routing rules,
//!    each group restarts listening to what it says.
//! 4. The summary: predicted against measured, every figure read from the agent.
//!
//! Everything is stopped on the way out, on Ctrl-C too (see [`interrupt`]).

mod figures;
mod fleets;
mod interrupt;

use std::{
    io::IsTerminal as _,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use integration_tests::{Agent, Redis};
use serde_json::Value;

use crate::util::is_root;
use figures::{Phase, Summary};
use fleets::{Groups, Producer, Routing};

/// What a demo run does.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Queues every wide group listens to in phase 1.
    pub queues: usize,
    /// Seconds of load in each phase.
    pub phase_seconds: u64,
    /// Jobs pushed per second (the same in both phases).
    pub jobs_per_second: u32,
}

impl Plan {
    pub fn new(queues: Option<usize>, phase_seconds: Option<u64>, quick: bool) -> Self {
        let (default_queues, default_seconds) = if quick { (100, 25) } else { (440, 60) };
        Self {
            queues: queues.unwrap_or(default_queues).max(4),
            phase_seconds: phase_seconds.unwrap_or(default_seconds).max(10),
            jobs_per_second: 100,
        }
    }
}

/// Runs the demo with the agent binary `bin` (the release build for users; the test command
/// runs it quick on the debug build it tests).
pub fn run(bin: &Path, plan: Plan) -> Result<()> {
    if !is_root() {
        bail!("the demo attaches eBPF programs: run `sudo cargo xtask demo`");
    }
    interrupt::install();
    let outcome = story(bin, plan);
    let interrupted = interrupt::requested();
    interrupt::uninstall();
    if interrupted {
        bail!("interrupted: everything the demo started is stopped");
    }
    outcome
}

fn story(bin: &Path, plan: Plan) -> Result<()> {
    println!(
        "Fanout demo: a redis-server, three real Sidekiq fleets on {} queues, a producer at {} jobs/s, and the agent.",
        plan.queues, plan.jobs_per_second
    );
    let redis = Redis::start(&[]);
    let agent = Agent::start_binary(bin, &fleets::worker_rules_args(), &[]);
    let address = format!("127.0.0.1:{}", agent.port);
    let server = format!("127.0.0.1:{}", redis.port);
    println!("agent metrics: http://{address}/metrics");

    // Phase 1: every group listens to (nearly) everything.
    let queues = fleets::queue_names(plan.queues);
    let mut groups = Groups::catch_all(redis.port, &queues)?;
    println!("\n== phase 1: catch-all ==\n{}", groups.describe());
    let before_1 = figures::observe(&address)?;
    let producer = Producer::start(redis.port, &queues, plan.jobs_per_second, Routing::AsEnqueued);
    watch(bin, &address, plan.phase_seconds)?;
    let pushed_1 = producer.stop();
    fleets::wait_drained(redis.port, Duration::from_secs(30))?;
    let after_1 = figures::observe(&address)?;
    let phase_1 = Phase::between(&before_1, &after_1, &server, pushed_1)?;
    check_interrupt()?;

    // What the agent advises.
    println!("\n== fanout advise ==");
    let status = Command::new(bin)
        .args(["advise", "--address", &address])
        .status()
        .context("fanout advise")?;
    if !status.success() {
        bail!("fanout advise failed ({status})");
    }
    let advice = advise_json(bin, &address)?;
    let server_advice = advice["servers"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["server"] == server.as_str()))
        .cloned()
        .with_context(|| format!("no advice for {server}: {advice}"))?;
    if server_advice["advice"] != "ok" {
        bail!(
            "the agent declined to advise: {}",
            server_advice["reason"].as_str().unwrap_or("no reason given")
        );
    }
    check_interrupt()?;

    // Phase 2: applied as advised.
    let routing = Routing::from_advice(&server_advice)?;
    groups.stop();
    groups = Groups::as_advised(redis.port, &server_advice)?;
    println!("\n== phase 2: as advised ==\n{}", groups.describe());
    let before_2 = figures::observe(&address)?;
    let producer = Producer::start(redis.port, &queues, plan.jobs_per_second, routing);
    watch(bin, &address, plan.phase_seconds)?;
    let pushed_2 = producer.stop();
    fleets::wait_drained(redis.port, Duration::from_secs(30))?;
    let after_2 = figures::observe(&address)?;
    let phase_2 = Phase::between(&before_2, &after_2, &server, pushed_2)?;
    groups.stop();

    let summary = Summary {
        before: phase_1,
        after: phase_2,
        predicted: server_advice["predicted"].clone(),
    };
    println!("\n== predicted and measured ==\n{}", summary.render());
    drop(agent);
    drop(redis);
    Ok(())
}

fn check_interrupt() -> Result<()> {
    if interrupt::requested() {
        bail!("interrupted");
    }
    Ok(())
}

fn advise_json(bin: &Path, address: &str) -> Result<Value> {
    let out = Command::new(bin)
        .args(["advise", "--format", "json", "--address", address])
        .output()
        .context("fanout advise --format json")?;
    if !out.status.success() {
        bail!(
            "fanout advise --format json: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).context("fanout advise's JSON")
}

/// Shows the phase live: `fanout top` in a terminal (quitting it ends the demo), its
/// `--once` text every 10 s otherwise.
fn watch(bin: &Path, address: &str, seconds: u64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    if std::io::stdout().is_terminal() {
        let status = Command::new(bin)
            .args(["top", "--address", address, "--exit-after"])
            .arg(seconds.to_string())
            .status()
            .context("fanout top")?;
        if Instant::now() + Duration::from_secs(1) < deadline {
            // Quit early (q or Ctrl-C in the view): the user wants out.
            interrupt::request();
        }
        if !status.success() {
            bail!("fanout top failed ({status})");
        }
        return check_interrupt();
    }
    while Instant::now() < deadline {
        check_interrupt()?;
        let left = deadline.saturating_duration_since(Instant::now());
        let interval = left.min(Duration::from_secs(10)).as_secs_f64().max(0.5);
        Command::new(bin)
            .args(["top", "--once", "--address", address, "--interval"])
            .arg(format!("{interval:.1}"))
            .status()
            .context("fanout top --once")?;
        println!();
    }
    check_interrupt()
}
