//! `cargo xtask bench`: what the agent costs Redis and workers, and what fan-out costs Redis,
//! measured A/B in one invocation, with the targets of issue 10 marked met or MISSED.
//!
//! Every "with agent" figure is paired with a "without agent" run of the same load in the
//! same invocation, alternating the order between rounds so that drift of a shared machine
//! hits both sides alike. Results are medians with min-max, written to BENCHMARKS.md and
//! bench-results.json with the machine's description, and the fan-out cost curve to
//! bench-fanout-cost.png. Loads are bounded in time and requests, on loopback only, and every
//! process started is stopped.
//!
//! Where the time goes comes from the kernel's per-program accounting (`bpf_stats`), in
//! separate runs of the same loads (the accounting itself costs every program run two clock
//! reads, which must not touch the ratios): runs per request, per served pop, per job and per
//! context switch, and ns per run, for every program of the bench's agent.

mod agent_cost;
mod blocking;
mod bpf_stats;
mod churn;
pub(crate) mod plot;
pub(crate) mod report;
mod untracked;

use std::{collections::BTreeMap, path::Path, process::Command, time::Instant};

use anyhow::{bail, Context, Result};
use integration_tests::{wait_for, Agent, Proc, Redis, RedisBuild};

use crate::util::{build_agent, command_output, is_root};
use agent_cost::{JobKind, SidekiqRun};
use blocking::{process_cpu, BlockingSample};
use bpf_stats::{StatsSample, Window};

pub struct Load {
    name: &'static str,
    args: Vec<String>,
    /// Requests one run sends (redis-benchmark's -n per test, times the tests).
    requests: f64,
}

/// Which agent a plain-traffic run has attached.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Variant {
    Without,
    /// The agent tracking this Redis (scheduler, lifecycle and Redis uprobes).
    Agent,
    /// The same, plus a tracked worker on the same host, in the default worker probe mode
    /// (auto: beside a tracked Redis, through the worker's own libc, so Redis pays nothing).
    AgentWithWorker,
    /// A tracked worker followed through the syscall tracepoints (`--worker-probe-mode
    /// syscalls`), so every read/write of Redis pays their filter.
    AgentWithSyscallWorkerProbes,
}

const VARIANTS: [Variant; 4] = [
    Variant::Without,
    Variant::Agent,
    Variant::AgentWithWorker,
    Variant::AgentWithSyscallWorkerProbes,
];

/// What makes this machine "a node without Redis" for the agent: every Redis and Valkey server
/// excluded, the bench's own and any other on this shared machine (one that some test starts
/// would otherwise make it a node with Redis midway).
pub const NO_REDIS_EXCLUDE: &str = "cmdline=.";

/// The Sidekiq runs: without the agent, and the agent three ways.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum SidekiqVariant {
    Without,
    /// Default mode on a node with Redis: the fleet followed through uprobes in its libc.
    DefaultBesideRedis,
    /// Default mode on a node "without Redis": every server excluded, so the agent
    /// tracks none and follows the fleet through the syscall tracepoints.
    DefaultNoRedis,
    /// `--worker-probe-mode syscalls` beside a tracked Redis (the old default).
    SyscallsBesideRedis,
    /// `--no-worker-probes` beside a tracked Redis: the fleet's threads are tracked by the
    /// scheduler programs, its traffic is not followed. Splits the default's cost in two.
    SchedOnlyBesideRedis,
}

/// Jobs per Sidekiq drain in a full run: about 3 s at this machine's pace. Shorter drains
/// (10000 jobs, 1.5 s) gave ratios that moved by 0.09 between runs of the same code.
const SIDEKIQ_JOBS: u64 = 20000;

pub const SIDEKIQ_VARIANTS: [SidekiqVariant; 5] = [
    SidekiqVariant::Without,
    SidekiqVariant::DefaultBesideRedis,
    SidekiqVariant::DefaultNoRedis,
    SidekiqVariant::SyscallsBesideRedis,
    SidekiqVariant::SchedOnlyBesideRedis,
];

impl SidekiqVariant {
    /// How the report names it.
    pub fn label(self) -> &'static str {
        match self {
            Self::Without => "without agent",
            Self::DefaultBesideRedis => "default mode, node with Redis",
            Self::DefaultNoRedis => "default mode, node without Redis",
            Self::SyscallsBesideRedis => "`syscalls` mode, node with Redis",
            Self::SchedOnlyBesideRedis => "`--no-worker-probes`, node with Redis",
        }
    }

    fn agent_args(self) -> Option<&'static [&'static str]> {
        match self {
            Self::Without => None,
            Self::DefaultBesideRedis => Some(&[]),
            Self::DefaultNoRedis => Some(&["--redis-exclude", NO_REDIS_EXCLUDE]),
            Self::SyscallsBesideRedis => Some(&["--worker-probe-mode", "syscalls"]),
            Self::SchedOnlyBesideRedis => Some(&["--no-worker-probes"]),
        }
    }
}

pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

/// Median of the per-pair ratios `numerator[i] / denominator[i]` (pairs ran in the same round).
pub fn paired_ratio(numerator: &[f64], denominator: &[f64]) -> f64 {
    let ratios: Vec<f64> = numerator
        .iter()
        .zip(denominator)
        .map(|(n, d)| n / d)
        .collect();
    median(&ratios)
}

pub fn min_max(v: &[f64]) -> (f64, f64) {
    (
        v.iter().copied().fold(f64::INFINITY, f64::min),
        v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    )
}

/// Requests per second of one redis-benchmark run (its CSV output: the mean over its tests).
fn redis_benchmark(port: u16, load: &Load) -> Result<f64> {
    let out = command_output(
        Command::new("redis-benchmark")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "--csv"])
            .args(&load.args),
    )?;
    let line = out
        .lines()
        .nth(1)
        .with_context(|| format!("no result from redis-benchmark: {out}"))?;
    Ok(line
        .split(',')
        .nth(1)
        .context("malformed CSV")?
        .trim_matches('"')
        .parse()?)
}

/// The agent for a plain-traffic variant, and the idle worker it tracks (if any).
fn start_agent(bin: &Path, variant: Variant) -> Option<(Agent, Option<Proc>)> {
    match variant {
        Variant::Without => None,
        Variant::Agent => Some((Agent::start_binary(bin, &[], &[]), None)),
        Variant::AgentWithWorker | Variant::AgentWithSyscallWorkerProbes => {
            let idle = std::process::Command::new("sleep")
                .arg("3599")
                .spawn()
                .expect("sleep");
            let mut args = vec!["--worker-rule", "benchidle:cmdline=^sleep 3599$"];
            if variant == Variant::AgentWithSyscallWorkerProbes {
                args.extend(["--worker-probe-mode", "syscalls"]);
            }
            let agent = Agent::start_binary(bin, &args, &[]);
            wait_for(
                "the idle worker tracked",
                std::time::Duration::from_secs(10),
                || {
                    (agent.scrape().sum(
                        "fanout_processes_tracked",
                        &[("process_group", "benchidle")],
                    ) == 1.0)
                        .then_some(())
                },
            );
            Some((
                agent,
                Some(Proc {
                    child: idle,
                    name: "idle worker".into(),
                }),
            ))
        }
    }
}

/// Waits until the agent has its probes on `redis`.
pub(crate) fn wait_for_redis_probes(agent: &Agent, redis: &Redis) {
    let pid = redis.pid().to_string();
    wait_for(
        "probes on the bench Redis",
        std::time::Duration::from_secs(10),
        || {
            (agent
                .scrape()
                .find("fanout_probe_points", &[("process_pid", &pid)])
                .count()
                > 0)
            .then_some(())
        },
    );
}

/// bpf_stats of the plain loads under one agent variant, per request.
pub struct PlainStats {
    pub variant: Variant,
    /// How the agent followed the idle worker (from its log).
    pub worker_followed_via: String,
    /// One per load, in the order of the loads.
    pub per_load: Vec<StatsSample>,
}

/// Everything one invocation measured.
pub struct Results {
    pub quick: bool,
    pub rounds: usize,
    pub loads: Vec<Load>,
    /// [load][variant][round] requests per second.
    pub plain: Vec<Vec<Vec<f64>>>,
    /// [load][variant][round] Redis CPU per request (all its threads, schedstat), us: what the
    /// agent costs Redis itself, apart from the benchmark client that shares its CPUs.
    pub plain_redis_cpu: Vec<Vec<Vec<f64>>>,
    pub plain_agent_cpu: Vec<f64>,
    pub plain_stats: Vec<PlainStats>,
    pub fanouts: Vec<usize>,
    pub clients: usize,
    pub rate: u32,
    pub seconds: f64,
    pub blocking: Vec<BlockingSample>,
    /// Per fan-out, one bpf_stats run, per served pop.
    pub blocking_stats: Vec<(usize, StatsSample)>,
    /// The blocking rounds at 1 key on [`LTO_BUILD`], and one bpf_stats run of them.
    pub blocking_lto: Vec<BlockingSample>,
    pub blocking_lto_stats: StatsSample,
    pub jobs: u64,
    /// [variant][round].
    pub sidekiq: Vec<Vec<SidekiqRun>>,
    /// One bpf_stats run per variant with an agent.
    pub sidekiq_stats: Vec<(SidekiqVariant, SidekiqRun)>,
    /// One bpf_stats run of jobs that send plain commands, per `WORK_JOB_VARIANTS`.
    pub sidekiq_work_stats: Vec<(SidekiqVariant, SidekiqRun)>,
    /// One bpf_stats run of no-op jobs with the fleet on weighted queues (GitLab's shape),
    /// per `WORK_JOB_VARIANTS`.
    pub sidekiq_weighted_stats: Vec<(SidekiqVariant, SidekiqRun)>,
    /// The same with the fleet on as many queues in strict order (no weights), per
    /// `WORK_JOB_VARIANTS`.
    pub sidekiq_strict_stats: Vec<(SidekiqVariant, SidekiqRun)>,
    pub costs: Vec<agent_cost::CostSample>,
    pub attach: (f64, f64),
    pub untracked: Vec<untracked::UntrackedSample>,
    /// Ping-pong round trips/s (without the agent, with it), accounting off, per round.
    pub untracked_pace: Vec<(f64, f64)>,
    pub churn: Vec<churn::ChurnSample>,
    /// kernel.bpf_stats_enabled when the bench started (1 means someone else had it on: the
    /// A/B runs then paid the accounting too).
    pub stats_sysctl_at_start: String,
    /// What the accounting itself adds to each program run, in ns
    /// (`bpf_stats::accounting_ns_per_run`); `None` when it could not be measured.
    pub accounting_ns_per_run: Option<f64>,
    /// Other `fanout` processes seen at a checkpoint between sections.
    pub other_agents_seen: Vec<u32>,
    pub duration_seconds: f64,
}

/// Saves an agent's log under target/bench-logs/ for a look after the run; returns the path.
pub fn save_agent_log(name: &str, log: &str) -> String {
    let dir = crate::util::workspace_root().join("target/bench-logs");
    let path = dir.join(format!("{name}.log"));
    match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, log)) {
        Ok(()) => path.display().to_string(),
        Err(e) => format!("not saved: {e}"),
    }
}

fn refuse_beside_another_agent() -> Result<()> {
    let others = bpf_stats::other_agents(None);
    if !others.is_empty() {
        bail!(
            "another fanout agent is running (pid {}): its eBPF programs would run beside the \
             bench's own agent and double every cost measured. Stop it (or wait for the tests \
             that started it) and run the bench again",
            others
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// Checks that the bench can run here and builds the agent it measures.
fn prepare() -> Result<std::path::PathBuf> {
    if !is_root() {
        bail!("the benchmark attaches eBPF programs: run `sudo cargo xtask bench`");
    }
    refuse_beside_another_agent()?;
    let bin = build_agent(true)?;
    // The build can take minutes: look again.
    refuse_beside_another_agent()?;
    Ok(bin)
}

/// Rounds of the blocking-heavy load at each fan-out, without and with the agent (in
/// alternating order).
fn blocking_rounds(
    bin: &Path,
    build: RedisBuild,
    rounds: usize,
    fanouts: &[usize],
    (clients, rate): (usize, u32),
    seconds: f64,
    log: &dyn Fn(&str),
) -> Result<Vec<BlockingSample>> {
    let mut blocking: Vec<BlockingSample> = Vec::new();
    for (round, keys) in (0..rounds).flat_map(|r| fanouts.iter().map(move |k| (r, *k))) {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for with_agent in order {
            let redis = Redis::start_build(build, &[]);
            let agent = with_agent.then(|| Agent::start_binary(bin, &[], &[]));
            if let Some(a) = &agent {
                wait_for_redis_probes(a, &redis);
            }
            let (sample, _) =
                blocking::run_once(&redis, agent.as_ref(), keys, clients, rate, seconds, false)?;
            blocking.push(sample);
        }
        log(&format!(
            "blocking round {}/{rounds}, {keys} keys, Redis {}",
            round + 1,
            build.version()
        ));
    }
    Ok(blocking)
}

/// One with-agent run of the blocking load on `build`, with the kernel's accounting on: the
/// agent's programs per served pop.
fn blocking_stats_run(
    bin: &Path,
    build: RedisBuild,
    keys: usize,
    (clients, rate): (usize, u32),
    seconds: f64,
) -> Result<StatsSample> {
    let redis = Redis::start_build(build, &[]);
    let agent = Agent::start_binary(bin, &[], &[]);
    wait_for_redis_probes(&agent, &redis);
    let (_, stats) = blocking::run_once(&redis, Some(&agent), keys, clients, rate, seconds, true)?;
    stats.context("no bpf_stats window")
}

/// The upstream LTO build the blocking load also runs on (at 1 key): what most people run,
/// where the compiler moved code the probes depend on (see the agent's `redis::block_calls`).
pub const LTO_BUILD: RedisBuild = RedisBuild::V7_4;

/// The blocking section alone, printed: what a served pop adds to Redis's main thread, paired
/// per round, at 1 and 440 keys on Debian's 7.0 and at 1 key on the upstream LTO build, and
/// the programs per served pop at 1 key on each.
pub fn run_blocking_only(quick: bool) -> Result<()> {
    let other = compared_build()?;
    let bin = prepare()?;
    let (rounds, seconds) = if quick { (2, 3.0) } else { (5, 6.0) };
    let load = (50, 1000);
    let log = |what: &str| eprintln!("[bench] {what}");
    for (build, fanouts) in [
        (RedisBuild::V7_0, &[1usize, 440][..]),
        (LTO_BUILD, &[1][..]),
    ] {
        let samples = blocking_rounds(&bin, build, rounds, fanouts, load, seconds, &log)?;
        for &keys in fanouts {
            let cpu = |with: bool| -> Vec<f64> {
                samples
                    .iter()
                    .filter(|s| s.keys == keys && s.with_agent == with)
                    .map(|s| s.main_cpu_us_per_job)
                    .collect()
            };
            let (without, with) = (cpu(false), cpu(true));
            let added: Vec<f64> = with.iter().zip(&without).map(|(w, wo)| w - wo).collect();
            println!(
                "Redis {}, {keys} keys: main thread us per job without {without:.1?}, with {with:.1?}; added (paired) median {:.1} of {added:.1?}; ratio {:.3}",
                build.version(),
                median(&added),
                paired_ratio(&without, &with)
            );
        }
        let stats = blocking_stats_run(&bin, build, 1, load, seconds)?;
        println!("Redis {}, 1 key, per served pop:", build.version());
        for p in &stats.programs {
            println!(
                "  {:<28} {:.3} runs x {:.0} ns = {:.1} ns",
                p.name, p.runs_per_op, p.ns_per_run, p.ns_per_op
            );
        }
        if let Some(other) = &other {
            // The same bpf_stats run, `rounds + 1` times per build in alternating order.
            let bins = [bin.clone(), other.clone()];
            let mut samples = vec![Vec::new(); bins.len()];
            for round in 0..=rounds {
                for b in alternating(bins.len(), round) {
                    samples[b].push(blocking_stats_run(&bins[b], build, 1, load, seconds)?);
                }
            }
            for (b, bin) in bins.iter().enumerate() {
                println!(
                    "Redis {}, 1 key, {}: ns per run over {} runs",
                    build.version(),
                    bin.display(),
                    samples[b].len()
                );
                print_ns_per_run(&ns_per_run_by_program(&samples[b], "redis_"));
            }
        }
    }
    Ok(())
}

/// Another build of the agent to measure against this one (`FANOUT_BENCH_COMPARE`), in the
/// sections that print rather than write BENCHMARKS.md. A path that is not a file is refused
/// before any round runs, not met minutes in.
fn compared_build() -> Result<Option<std::path::PathBuf>> {
    let Some(path) = std::env::var_os("FANOUT_BENCH_COMPARE").map(std::path::PathBuf::from) else {
        return Ok(None);
    };
    if !path.is_file() {
        bail!(
            "FANOUT_BENCH_COMPARE={}: not a file (another build of `fanout`)",
            path.display()
        );
    }
    Ok(Some(path))
}

/// The order of `n` builds in round `round`: reversed every other round, so that neither
/// always runs first (after a cold start or a warm one).
fn alternating(n: usize, round: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

/// Each program's ns per run across `samples`, by name: the programs whose name starts with
/// `prefix` and that ran at least once per operation in some sample (not the rare ones, exec
/// or exit, whose ns per run is one run's).
fn ns_per_run_by_program(samples: &[StatsSample], prefix: &str) -> BTreeMap<String, Vec<f64>> {
    let mut by_program: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for sample in samples {
        for p in &sample.programs {
            if p.name.starts_with(prefix) && p.runs_per_op >= 0.5 {
                by_program
                    .entry(p.name.clone())
                    .or_default()
                    .push(p.ns_per_run);
            }
        }
    }
    by_program
}

fn print_ns_per_run(by_program: &BTreeMap<String, Vec<f64>>) {
    for (name, runs) in by_program {
        println!("    {name:28} median {:5.0} of {runs:.0?}", median(runs));
    }
}

/// Workers that come and go (100 over 8 s), followed both ways, and 100 started at once
/// beside a tracked Redis: each worker's uprobes are made off the agent's loop, which a
/// burst must not stall. Then the two beside a Redis again with uprobe-multi links refused
/// (as before Linux 6.6): one perf-event uprobe per probe site.
fn churn_samples(bin: &Path) -> Result<Vec<churn::ChurnSample>> {
    use churn::Uprobes::{Multi, PerfEvents};
    const WORKERS: usize = 100;
    Ok(vec![
        churn::measure(bin, true, WORKERS, 8.0, Multi)?,
        churn::measure(bin, false, WORKERS, 8.0, Multi)?,
        churn::measure(bin, true, WORKERS, 0.0, Multi)?,
        churn::measure(bin, true, WORKERS, 8.0, PerfEvents)?,
        churn::measure(bin, true, WORKERS, 0.0, PerfEvents)?,
    ])
}

/// The churn section alone (short-lived workers and the burst), printed as its table; with
/// `FANOUT_BENCH_COMPARE`, the other build's table after it.
pub fn run_churn_only() -> Result<()> {
    let other = compared_build()?;
    let mut bins = vec![prepare()?];
    bins.extend(other);
    for bin in &bins {
        let churn = churn_samples(bin)?;
        let mut table = String::new();
        let (ok, measured) = report::churn_table(&mut table, &churn);
        println!("{}:\n{table}", bin.display());
        println!(
            "target 5: {} ({})\n",
            if ok { "met" } else { "MISSED" },
            measured.join("; ")
        );
    }
    Ok(())
}

/// The Sidekiq section alone: its rounds and one bpf_stats run per agent variant, printed.
pub fn run_sidekiq_only(quick: bool) -> Result<()> {
    let bin = prepare()?;
    let (rounds, jobs) = if quick { (2, 3000) } else { (5, SIDEKIQ_JOBS) };
    let (runs, stats) = sidekiq_section(&bin, rounds, jobs, &|what: &str| {
        eprintln!("[bench] {what}")
    })?;
    let jobs_per_second =
        |i: usize| -> Vec<f64> { runs[i].iter().map(|s| s.jobs_per_second).collect() };
    let without = jobs_per_second(0);
    for (i, variant) in SIDEKIQ_VARIANTS.iter().enumerate() {
        let v = jobs_per_second(i);
        let cpu: Vec<f64> = runs[i].iter().map(|s| s.agent_cpu_share).collect();
        let out: Vec<Option<f64>> = runs[i].iter().map(|s| s.write_probe_out_after).collect();
        let work_cpu = |i: usize| -> Vec<f64> {
            runs[i]
                .iter()
                .map(|s| s.fleet_cpu_us_per_job + s.redis_cpu_us_per_job)
                .collect()
        };
        println!(
            "{variant:?}: {:.0} jobs/s (median of {v:?}), ratio {:.3}, fleet+Redis CPU {:.1} us per job (ratio {:.3}), agent CPU {:.3} of a core, write() probe out after {out:?} s",
            median(&v),
            paired_ratio(&v, &without),
            median(&work_cpu(i)),
            paired_ratio(&work_cpu(0), &work_cpu(i)),
            median(&cpu)
        );
    }
    let log = |what: &str| eprintln!("[bench] {what}");
    let work = default_mode_stats(&bin, jobs, JobKind::RedisWork, &log)?;
    let weighted = default_mode_stats(&bin, jobs, JobKind::NoopWeightedQueues, &log)?;
    let strict = default_mode_stats(&bin, jobs, JobKind::NoopStrictQueues, &log)?;
    for (variant, run) in stats.iter().chain(&work).chain(&weighted).chain(&strict) {
        let Some(s) = &run.stats else { continue };
        println!(
            "{variant:?}, {:?} jobs: worker-side programs {:.3} us per job, all programs {:.3} us per job, {:.2} commands per job",
            run.kind,
            s.ns_per_op_of("worker_") / 1e3 + 0.0,
            s.total_ns_per_op / 1e3,
            run.commands_per_job
        );
        for p in &s.programs {
            println!(
                "    {:28} {:6.3} runs x {:6.0} ns = {:7.1} ns",
                p.name, p.runs_per_op, p.ns_per_run, p.ns_per_op
            );
        }
    }
    Ok(())
}

/// Worker-side program time per plain command alone: for each default-mode variant, `rounds`
/// pairs of bpf_stats drains (no-op jobs, then jobs that send plain commands), printed with
/// each program's ns per run and the pair's difference per added command. Medians over the
/// rounds, because one pair on this shared machine moves by tens of ns. With
/// `FANOUT_BENCH_COMPARE` set to another build of the agent, every round runs both (in
/// alternating order), so that a change to the probes is measured A/B in the same minutes.
pub fn run_commands_only(quick: bool) -> Result<()> {
    let other = compared_build()?;
    let mut bins = vec![prepare()?];
    bins.extend(other);
    let (rounds, jobs) = if quick { (3, 3000) } else { (5, 6000) };
    let accounting = bpf_stats::accounting_ns_per_run()?;
    match accounting {
        Some(ns) => println!("the accounting itself adds {ns:.0} ns to each program run (an empty program, BPF_PROG_TEST_RUN, accounting off and on)"),
        None => println!("the accounting's own cost per program run could not be measured (it was on already, or the kernel refused the test run)"),
    }
    for variant in WORK_JOB_VARIANTS {
        let mut per_command = vec![Vec::new(); bins.len()];
        // Per build: the no-op drains' samples and the others'.
        let mut noop_samples = vec![Vec::new(); bins.len()];
        let mut work_samples = vec![Vec::new(); bins.len()];
        for round in 0..rounds {
            for b in alternating(bins.len(), round) {
                let bin = &bins[b];
                let noop =
                    agent_cost::sidekiq_run(bin, variant.agent_args(), jobs, JobKind::Noop, true)?;
                let work = agent_cost::sidekiq_run(
                    bin,
                    variant.agent_args(),
                    jobs,
                    JobKind::RedisWork,
                    true,
                )?;
                let (Some(before), Some(after)) = (noop.stats, work.stats) else {
                    anyhow::bail!("{variant:?}: a drain ran without its bpf_stats window");
                };
                let added = work.commands_per_job - noop.commands_per_job;
                let us =
                    (after.ns_per_op_of("worker_") - before.ns_per_op_of("worker_")) / added / 1e3;
                let runs =
                    (after.runs_per_op_of("worker_") - before.runs_per_op_of("worker_")) / added;
                per_command[b].push(us);
                noop_samples[b].push(before);
                work_samples[b].push(after);
                eprintln!(
                    "[bench] {variant:?} round {}/{rounds}, {}: {us:.3} us per plain command ({runs:.2} program runs; {added:.2} added commands per job)",
                    round + 1,
                    bin.display(),
                );
            }
        }
        for (b, bin) in bins.iter().enumerate() {
            println!(
                "{variant:?}, {}: worker-side us per plain command: median {:.3} of {:.3?}",
                bin.display(),
                median(&per_command[b]),
                per_command[b]
            );
            // Every program that runs for each job, the scheduler's too.
            println!("  ns per run, no-op jobs:");
            print_ns_per_run(&ns_per_run_by_program(&noop_samples[b], ""));
            println!("  ns per run, jobs that send plain commands:");
            print_ns_per_run(&ns_per_run_by_program(&work_samples[b], ""));
        }
    }
    Ok(())
}

/// Rounds of the Sidekiq drain (variants alternating in order), then one bpf_stats run per
/// agent variant.
#[allow(clippy::type_complexity)]
fn sidekiq_section(
    bin: &Path,
    rounds: usize,
    jobs: u64,
    log: &dyn Fn(&str),
) -> Result<(Vec<Vec<SidekiqRun>>, Vec<(SidekiqVariant, SidekiqRun)>)> {
    let mut sidekiq: Vec<Vec<SidekiqRun>> = vec![Vec::new(); SIDEKIQ_VARIANTS.len()];
    for round in 0..rounds {
        for i in alternating(SIDEKIQ_VARIANTS.len(), round) {
            sidekiq[i].push(agent_cost::sidekiq_run(
                bin,
                SIDEKIQ_VARIANTS[i].agent_args(),
                jobs,
                JobKind::Noop,
                false,
            )?);
        }
        log(&format!("sidekiq round {}/{rounds}", round + 1));
    }
    let mut sidekiq_stats = Vec::new();
    for variant in &SIDEKIQ_VARIANTS[1..] {
        sidekiq_stats.push((
            *variant,
            agent_cost::sidekiq_run(bin, variant.agent_args(), jobs, JobKind::Noop, true)?,
        ));
    }
    log("sidekiq, bpf_stats");
    Ok((sidekiq, sidekiq_stats))
}

/// The agent variants whose cost per plain command is measured (default mode, both kinds of
/// node).
pub const WORK_JOB_VARIANTS: [SidekiqVariant; 2] = [
    SidekiqVariant::DefaultBesideRedis,
    SidekiqVariant::DefaultNoRedis,
];

/// One bpf_stats drain of `kind` jobs per variant of `WORK_JOB_VARIANTS`: jobs that send
/// plain commands (`JobKind::RedisWork`: with the no-op drains, what each further command
/// costs) or a fleet on many queues (`JobKind::NoopWeightedQueues`: each fetch lists them all
/// in a new order, which the repeat shortcut of a fixed fetch cannot take;
/// `JobKind::NoopStrictQueues`: each fetch repeats the same long list).
fn default_mode_stats(
    bin: &Path,
    jobs: u64,
    kind: JobKind,
    log: &dyn Fn(&str),
) -> Result<Vec<(SidekiqVariant, SidekiqRun)>> {
    let mut stats = Vec::new();
    for variant in WORK_JOB_VARIANTS {
        stats.push((
            variant,
            agent_cost::sidekiq_run(bin, variant.agent_args(), jobs, kind, true)?,
        ));
    }
    log(&format!("sidekiq, {kind:?} jobs, bpf_stats"));
    Ok(stats)
}

pub fn run(quick: bool) -> Result<()> {
    let bin = prepare()?;
    let stats_sysctl_at_start = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .unwrap_or_default()
        .trim()
        .to_string();
    let accounting_ns_per_run = bpf_stats::accounting_ns_per_run()?;
    let started = Instant::now();
    // At each checkpoint: progress, and whether another agent has started meanwhile.
    let other_agents_seen = std::cell::RefCell::new(std::collections::BTreeSet::new());
    let log = |what: &str| {
        let others = bpf_stats::other_agents(None);
        if !others.is_empty() {
            eprintln!("[bench] WARNING: another fanout agent is running (pid {others:?}): the figures of this section are off by its cost");
        }
        other_agents_seen.borrow_mut().extend(others);
        eprintln!("[bench] {what} ({:.0} s)", started.elapsed().as_secs_f64());
    };
    let (rounds, requests, seconds) = if quick {
        (2, 80_000u64, 3.0)
    } else {
        (5, 300_000, 6.0)
    };
    let loads = vec![
        Load {
            name: "GET/SET, 50 clients",
            args: ["-t", "get,set", "-c", "50", "-n", &requests.to_string()]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            requests: 2.0 * requests as f64,
        },
        Load {
            name: "GET, 50 clients, pipelined x16",
            args: [
                "-t",
                "get",
                "-c",
                "50",
                "-P",
                "16",
                "-n",
                &(requests * 4).to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            requests: 4.0 * requests as f64,
        },
    ];

    // 1. Plain traffic.
    let redis = Redis::start(&[]);
    let mut plain: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); VARIANTS.len()]; loads.len()];
    let mut plain_redis_cpu = plain.clone();
    let mut plain_agent_cpu: Vec<f64> = Vec::new();
    for round in 0..rounds {
        let mut order = VARIANTS.to_vec();
        if round % 2 == 1 {
            order.reverse();
        }
        for variant in order {
            let agent = start_agent(&bin, variant);
            if let Some((a, _)) = &agent {
                wait_for_redis_probes(a, &redis);
            }
            let index = VARIANTS.iter().position(|v| *v == variant).unwrap();
            for (i, load) in loads.iter().enumerate() {
                let cpu0 = agent.as_ref().map(|(a, _)| process_cpu(a.proc.pid()));
                let redis_cpu0 = process_cpu(redis.pid());
                let t = Instant::now();
                plain[i][index].push(redis_benchmark(redis.port, load)?);
                plain_redis_cpu[i][index]
                    .push((process_cpu(redis.pid()) - redis_cpu0) * 1e6 / load.requests);
                if let (Some((a, _)), Some(c0)) = (&agent, cpu0) {
                    plain_agent_cpu
                        .push((process_cpu(a.proc.pid()) - c0) / t.elapsed().as_secs_f64());
                }
            }
        }
        log(&format!("plain traffic round {}/{rounds}", round + 1));
    }
    // Where the time goes, per request, with a tracked worker both ways.
    let mut plain_stats = Vec::new();
    for variant in [
        Variant::AgentWithWorker,
        Variant::AgentWithSyscallWorkerProbes,
    ] {
        let (agent, idle) = start_agent(&bin, variant).expect("an agent variant");
        wait_for_redis_probes(&agent, &redis);
        let mut per_load = Vec::new();
        for load in &loads {
            let window = Window::start(agent.proc.pid())?;
            redis_benchmark(redis.port, load)?;
            per_load.push(window.finish(load.requests, "request")?);
        }
        let worker_followed_via = idle
            .as_ref()
            .map(|w| crate::agent_log::followed_via(&agent.log(), w.pid()).to_string())
            .unwrap_or_default();
        plain_stats.push(PlainStats {
            variant,
            worker_followed_via,
            per_load,
        });
    }
    log("plain traffic, bpf_stats");
    drop(redis);

    // 2. Blocking-heavy traffic and the fan-out cost curve.
    let fanouts = vec![1usize, 10, 100, 440, 1000];
    let (clients, rate) = (50, 1000);
    let blocking = blocking_rounds(
        &bin,
        RedisBuild::V7_0,
        rounds,
        &fanouts,
        (clients, rate),
        seconds,
        &log,
    )?;
    let mut blocking_stats = Vec::new();
    for &keys in &fanouts {
        let stats = blocking_stats_run(&bin, RedisBuild::V7_0, keys, (clients, rate), seconds)?;
        blocking_stats.push((keys, stats));
    }
    log("blocking, bpf_stats");
    // The same load at 1 key on the upstream LTO build.
    let blocking_lto = blocking_rounds(
        &bin,
        LTO_BUILD,
        rounds,
        &[1],
        (clients, rate),
        seconds,
        &log,
    )?;
    let blocking_lto_stats = blocking_stats_run(&bin, LTO_BUILD, 1, (clients, rate), seconds)?;
    log("blocking on the LTO build, bpf_stats");

    // 3. A real Sidekiq fleet draining no-op jobs.
    let jobs = if quick { 3000 } else { SIDEKIQ_JOBS };
    let (sidekiq, sidekiq_stats) = sidekiq_section(&bin, rounds, jobs, &log)?;
    let sidekiq_work_stats = default_mode_stats(&bin, jobs, JobKind::RedisWork, &log)?;
    let sidekiq_weighted_stats = default_mode_stats(&bin, jobs, JobKind::NoopWeightedQueues, &log)?;
    let sidekiq_strict_stats = default_mode_stats(&bin, jobs, JobKind::NoopStrictQueues, &log)?;

    // 4. The agent's own cost, and 5. attach latency.
    let costs = vec![
        agent_cost::under_pops(&bin, 1000, seconds)?,
        agent_cost::under_pops(&bin, 10000, seconds)?,
        agent_cost::with_processes(&bin, 500, seconds * 2.0)?,
    ];
    log("agent cost");
    let attach = agent_cost::attach_latency(&bin, 50)?;
    log("attach latency");

    // 6. Short-lived workers, followed both ways, and a burst.
    let churn = churn_samples(&bin)?;
    log("worker churn");

    // 7. The scheduler programs on untracked tasks.
    let switch_seconds = if quick { 2.0 } else { 4.0 };
    let untracked = vec![
        untracked::measure(&bin, false, switch_seconds)?,
        untracked::measure(&bin, true, switch_seconds)?,
    ];
    let untracked_pace = untracked::paired_rounds(&bin, rounds, switch_seconds / 2.0)?;
    log("untracked context switches");

    report::write(&Results {
        quick,
        rounds,
        loads,
        plain,
        plain_redis_cpu,
        plain_agent_cpu,
        plain_stats,
        fanouts,
        clients,
        rate,
        seconds,
        blocking,
        blocking_stats,
        blocking_lto,
        blocking_lto_stats,
        jobs,
        sidekiq,
        sidekiq_stats,
        sidekiq_work_stats,
        sidekiq_weighted_stats,
        sidekiq_strict_stats,
        costs,
        attach,
        untracked,
        untracked_pace,
        churn,
        stats_sysctl_at_start,
        accounting_ns_per_run,
        other_agents_seen: other_agents_seen.into_inner().into_iter().collect(),
        duration_seconds: started.elapsed().as_secs_f64(),
    })
}
