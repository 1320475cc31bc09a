//! Developer and operator tasks: `cargo xtask setup|run|test|bench|demo|deb`.
//!
//! Every task that builds or runs the agent first runs `setup`, which brings a fresh machine
//! to a buildable, testable state and says what it did at each step.

mod agent_log;
mod bench;
mod checks;
mod deb;
mod demo;
mod fuzz;
mod setup;
mod soak;
mod test_suite;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "xtask",
    about = "Fanout's build, run, test, bench and demo tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent): rust-src, bpf-linker, Debian packages.
    Setup,
    /// Build the agent (release) and run it on this host as root; extra args go to `fanout run`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: unit tests, then the root-only integration tests against real Redis,
    /// Sidekiq and OTLP receivers.
    Test {
        /// Only the unit tests (no root needed).
        #[arg(long)]
        unit_only: bool,
        /// Passed to the integration test binary as a name filter.
        filter: Option<String>,
    },
    /// Measure the agent's overhead on Redis (A/B, alternating, same invocation).
    Bench {
        /// A shorter run (fewer rounds, fewer requests).
        #[arg(long)]
        quick: bool,
        /// Only one section, printed rather than written to BENCHMARKS.md (for iterating on
        /// the worker-side probes, or on what a served pop costs Redis); `commands` repeats
        /// the worker-side program time per plain command alone; `churn` runs the short-lived
        /// workers and the burst of 100 workers started at once. With FANOUT_BENCH_COMPARE
        /// set to another build of the agent, `blocking` and `commands` also run it in
        /// alternating order and print both builds' program times (A/B in the same minutes).
        #[arg(long, value_parser = ["sidekiq", "blocking", "commands", "churn"])]
        only: Option<String>,
    },
    /// Run the agent on real parts for a while under injected faults (Redis restarts, worker
    /// churn, collector outages, SIGKILL) and write RELIABILITY.md with the figures.
    Soak {
        /// How long, in minutes (default 30; 3 with --quick).
        #[arg(long, value_parser = clap::value_parser!(u32).range(2..=1440))]
        minutes: Option<u32>,
        /// The short run the test command includes (written under target/soak-quick/).
        #[arg(long)]
        quick: bool,
    },
    /// Fuzz the RESP tokenizer shared by the eBPF programs and the agent, and the /proc readers
    /// (cargo fuzz, nightly).
    Fuzz {
        /// Inputs to run.
        #[arg(long, default_value_t = 1_000_000)]
        runs: u64,
    },
    /// Build the Debian package target/debian/fanout_<version>_<arch>.deb (release binary,
    /// systemd unit, /etc/fanout/fanout.toml as a conffile, man pages, shell completions).
    Deb {
        /// From the debug binary instead, into target/debian/debug/ (quicker; what the test
        /// command packages).
        #[arg(long)]
        debug: bool,
        /// Then install it on this machine with dpkg -i, run it, remove and purge it (root).
        #[arg(long)]
        check: bool,
    },
    /// The story, measured: Sidekiq fleets in a catch-all layout, `fanout advise` on what the
    /// agent saw, its proposal applied, and predicted against measured.
    Demo {
        /// Queues the catch-all groups listen to (default 440; 100 with --quick).
        #[arg(long, value_parser = clap::value_parser!(u64).range(4..=5000))]
        queues: Option<u64>,
        /// Seconds of load per phase (default 60; 25 with --quick).
        #[arg(long, value_parser = clap::value_parser!(u64).range(10..=3600))]
        phase_seconds: Option<u64>,
        /// A short run (under 3 minutes once built), unattended.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Task::Setup => setup::setup(),
        Task::Run { args } => {
            setup::setup()?;
            let bin = util::build_agent(true)?;
            util::exec_agent(&bin, &args)
        }
        Task::Test { unit_only, filter } => {
            setup::setup()?;
            test_suite::run_tests(unit_only, filter.as_deref())
        }
        Task::Bench { quick, only } => {
            setup::setup()?;
            match only.as_deref() {
                Some("sidekiq") => bench::run_sidekiq_only(quick),
                Some("blocking") => bench::run_blocking_only(quick),
                Some("commands") => bench::run_commands_only(quick),
                Some("churn") => bench::run_churn_only(),
                _ => bench::run(quick),
            }
        }
        Task::Soak { minutes, quick } => {
            setup::setup()?;
            // The full run measures what users run (release); the quick one, part of the
            // test command, the debug build the tests use.
            let bin = util::build_agent(!quick)?;
            soak::run(&bin, soak::Plan::new(minutes.map(f64::from), quick))
        }
        Task::Fuzz { runs } => {
            setup::setup()?;
            fuzz::fuzz(runs)
        }
        Task::Deb { debug, check } => {
            setup::setup()?;
            let bin = util::build_agent(!debug)?;
            let deb = deb::build_in_target(&bin, debug)?;
            println!("{}", deb.display());
            if check {
                deb::check(&deb)?;
            }
            Ok(())
        }
        Task::Demo {
            queues,
            phase_seconds,
            quick,
        } => {
            setup::setup()?;
            let bin = util::build_agent(true)?;
            demo::run(
                &bin,
                demo::Plan::new(queues.map(|q| q as usize), phase_seconds, quick),
            )
        }
    }
}
