use std::process::ExitCode;

use clap::Parser as _;
use fanout::{
    cli::{Cli, Command, LogFormat},
    config::{Config, FileConfig},
};
use tracing_subscriber::EnvFilter;

/// Exit code for invalid flags, config or rules (the same code clap uses for bad flags).
const EXIT_USAGE: u8 = 2;

/// `fanout top`: a one-line error and exit 1 when the agent cannot be read.
fn top(args: &fanout::top::TopArgs) -> ExitCode {
    match fanout::top::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fanout: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `fanout advise`: a one-line error and exit 1 when the agent cannot be read. Too little data
/// is printed as the answer and exits 0.
fn advise(args: &fanout::advise::AdviseArgs) -> ExitCode {
    match fanout::advise::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fanout: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `fanout man --dir DIR`: the man pages, one path written per line.
fn man(dir: &std::path::Path) -> ExitCode {
    match fanout::cli::write_man_pages(dir) {
        Ok(written) => {
            for path in written {
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "fanout: error: cannot write man pages to {}: {e}",
                dir.display()
            );
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Command::Run(args) => *args,
        Command::CheckProbes => return check_probes(),
        Command::Top(args) => return top(&args),
        Command::Advise(args) => return advise(&args),
        Command::Completions { shell } => {
            fanout::cli::write_completions(shell, &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Command::Man { dir } => return man(&dir),
    };

    let file = match &args.config {
        Some(path) => FileConfig::load(path),
        None => Ok(FileConfig::default()),
    };
    let config =
        match file.and_then(|file| Config::resolve(&args, file, &|k| std::env::var(k).ok())) {
            Ok(config) => config,
            Err(e) => {
                eprintln!("fanout: error: {e}");
                return ExitCode::from(EXIT_USAGE);
            }
        };

    let filter = match std::env::var("RUST_LOG")
        .ok()
        .filter(|_| args.log_level.is_none())
    {
        Some(env) => EnvFilter::try_new(env),
        None => EnvFilter::try_new(&config.log_level),
    };
    let filter = match filter {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "fanout: error: invalid log filter {:?}: {e}",
                config.log_level
            );
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }

    // Two workers, and a bounded pool for blocking work (a scrape's render, an OTLP push's
    // snapshot): more concurrent scrapes wait rather than add threads.
    // At most two malloc arenas: glibc gives each thread that meets contention an arena of
    // its own (up to 8 per core) and keeps their freed pages, so a burst of concurrent
    // scrapes left the agent 10 MB larger for good (the soak's RSS check).
    // SAFETY: mallopt only sets an allocator parameter; called before other threads exist.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    const RUNTIME_THREAD_NAME: &str = "fanout-rt";
    const RUNTIME_BLOCKING_THREADS: usize = 4;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(RUNTIME_BLOCKING_THREADS)
        .thread_name(RUNTIME_THREAD_NAME)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fanout: error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fanout::run::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("fanout: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `fanout check-probes`: every program through the verifier, one line each.
fn check_probes() -> ExitCode {
    match fanout::ebpf::check_all_programs() {
        Ok(results) => {
            let mut failed = 0;
            for (name, result) in &results {
                match result {
                    Ok(insns) => println!("ok      {name} ({insns} instructions verified)"),
                    Err(e) => {
                        failed += 1;
                        let lines: Vec<&str> = e.lines().collect();
                        println!("FAILED  {name}: {}", lines.first().unwrap_or(&""));
                        // The verifier gives its reason at the end of its log.
                        for line in &lines[lines.len().saturating_sub(16).max(1)..] {
                            println!("        {line}");
                        }
                    }
                }
            }
            // The stack of each program's deepest call chain, from the object: a kernel that
            // gives the program a private stack accepts more than one that does not.
            match fanout::ebpf::stack_depth::deepest_chains(
                fanout::ebpf::EBPF_OBJECT.unwrap_or(&[]),
            ) {
                Ok(chains) => {
                    let limit = fanout::ebpf::stack_depth::MAX_CHAIN_BYTES;
                    for chain in chains.iter().filter(|c| c.bytes > limit) {
                        failed += 1;
                        println!(
                            "FAILED  {}: {} bytes on its deepest call chain ({}), above the {limit} a kernel without private BPF stacks allows",
                            chain.program,
                            chain.bytes,
                            chain.describe()
                        );
                    }
                    if let Some(deepest) = chains.first() {
                        println!(
                            "stack   deepest call chain {} of {limit} bytes: {}",
                            deepest.bytes,
                            deepest.describe()
                        );
                    }
                }
                Err(e) => {
                    failed += 1;
                    println!("FAILED  reading the call chains' stack from the object: {e}");
                }
            }
            println!("{} programs, {failed} rejected", results.len());
            if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("fanout: error: {e}");
            ExitCode::FAILURE
        }
    }
}
