//! Command-line interface. Flags override the config file, which overrides defaults.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand, ValueEnum};

use crate::export::otlp_config::OtlpProtocol;

#[derive(Debug, Parser)]
#[command(
    name = "fanout",
    version,
    about = "Measures Redis blocking-pop fan-out, per-thread CPU and run-queue delay of Redis and its workers, with eBPF"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (needs root or CAP_BPF + CAP_PERFMON + CAP_SYS_PTRACE + CAP_DAC_READ_SEARCH).
    Run(Box<RunArgs>),
    /// Load every eBPF program into this kernel's verifier without attaching anything, and
    /// report each one: a quick check that this kernel accepts the agent's probes.
    CheckProbes,
    /// A live view of Redis saturation and who causes it, from the agent on this host
    /// (`--once` prints it as text).
    Top(crate::top::TopArgs),
    /// Turn what the agent saw into routing rules for fewer queues per worker, with the Redis
    /// time they save.
    Advise(crate::advise::AdviseArgs),
    /// Print a shell completion script on stdout, e.g. `fanout completions bash >
    /// /etc/bash_completion.d/fanout` (the Debian package installs them for bash, zsh and fish).
    Completions {
        /// The shell to complete for.
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Write the man pages, fanout.1 and one per subcommand (fanout-run.1, ...), into a
    /// directory. Used to build the Debian package.
    #[command(hide = true)]
    Man {
        /// Directory to write them to (created if missing).
        #[arg(long, value_name = "DIR", default_value = ".")]
        dir: PathBuf,
    },
}

/// The completion script for `shell`, generated from the CLI's definition.
pub fn write_completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut cmd, "fanout", out);
}

/// Writes fanout.1 and a page per visible subcommand (fanout-run.1, ...) into `dir`, creating
/// it; returns the files written.
pub fn write_man_pages(dir: &std::path::Path) -> std::io::Result<Vec<PathBuf>> {
    fn write(
        cmd: clap::Command,
        dir: &std::path::Path,
        written: &mut Vec<PathBuf>,
    ) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            write(sub.clone(), dir, written)?;
        }
        let man = clap_mangen::Man::new(cmd)
            .source(format!("fanout {}", env!("CARGO_PKG_VERSION")))
            .manual("Fanout");
        written.push(man.generate_to(dir)?);
        Ok(())
    }
    std::fs::create_dir_all(dir)?;
    // No `help` subcommand page; building sets the subcommands' names to `fanout-run` etc.
    let mut cmd = <Cli as clap::CommandFactory>::command().disable_help_subcommand(true);
    cmd.build();
    let mut written = Vec::new();
    write(cmd, dir, &mut written)?;
    Ok(written)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Default, clap::Args)]
pub struct RunArgs {
    /// TOML config file; flags given here override its values.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Root of the host's /proc (e.g. /host/proc in a container).
    #[arg(long, value_name = "DIR")]
    pub proc_root: Option<PathBuf>,

    /// Address of the Prometheus endpoint (/metrics, /healthz, /readyz). Default 0.0.0.0:9464.
    #[arg(long, value_name = "ADDR")]
    pub prometheus_listen: Option<SocketAddr>,

    /// Do not serve the Prometheus endpoint.
    #[arg(long)]
    pub no_prometheus: bool,

    /// Web config for the Prometheus endpoint, as Prometheus exporters take it
    /// (exporter-toolkit): `tls_server_config` (cert_file, key_file, client_auth_type,
    /// client_ca_file, min_version, max_version) and `basic_auth_users` (bcrypt hashes).
    #[arg(long = "web.config.file", value_name = "FILE")]
    pub web_config_file: Option<PathBuf>,

    /// OTLP endpoint to push metrics to (overrides OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT).
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,

    /// OTLP protocol (overrides OTEL_EXPORTER_OTLP_[METRICS_]PROTOCOL).
    #[arg(long, value_name = "PROTOCOL")]
    pub otlp_protocol: Option<OtlpProtocol>,

    /// Seconds between OTLP pushes (overrides OTEL_METRIC_EXPORT_INTERVAL, which is in ms).
    #[arg(long, value_name = "SECONDS")]
    pub otlp_interval: Option<f64>,

    /// PEM file of the CA(s) that sign the collector's certificate, instead of the system's
    /// roots (overrides OTEL_EXPORTER_OTLP_[METRICS_]CERTIFICATE).
    #[arg(long, value_name = "FILE")]
    pub otlp_certificate: Option<PathBuf>,

    /// PEM client certificate for mTLS (overrides OTEL_EXPORTER_OTLP_[METRICS_]CLIENT_CERTIFICATE).
    #[arg(long, value_name = "FILE", requires = "otlp_client_key")]
    pub otlp_client_certificate: Option<PathBuf>,

    /// PEM private key of the client certificate (overrides OTEL_EXPORTER_OTLP_[METRICS_]CLIENT_KEY).
    #[arg(long, value_name = "FILE", requires = "otlp_client_certificate")]
    pub otlp_client_key: Option<PathBuf>,

    /// For a gRPC endpoint given as host:port: plain text instead of TLS (overrides
    /// OTEL_EXPORTER_OTLP_[METRICS_]INSECURE).
    #[arg(long)]
    pub otlp_insecure: bool,

    /// Compress OTLP requests: gzip or none (overrides OTEL_EXPORTER_OTLP_[METRICS_]COMPRESSION).
    #[arg(long, value_name = "ALGORITHM", value_parser = ["gzip", "none"])]
    pub otlp_compression: Option<String>,

    /// Worker rule GROUP:comm=NAME, GROUP:exe=NAME or GROUP:cmdline=REGEX; repeatable. Added
    /// before the config file's rules and the defaults (the first matching rule wins).
    #[arg(long = "worker-rule", value_name = "RULE")]
    pub worker_rules: Vec<String>,

    /// Do not track the Redis or Valkey servers this matches: comm=NAME, exe=NAME (the
    /// executable's basename) or cmdline=REGEX; repeatable. Added to the config file's
    /// `[[redis_exclude]]` entries.
    #[arg(long = "redis-exclude", value_name = "KIND=VALUE")]
    pub redis_excludes: Vec<String>,

    /// Do not use the built-in Sidekiq, Resque, RQ and Celery rules.
    #[arg(long)]
    pub no_default_rules: bool,

    /// Export queue (key) names in redis.queue.listeners. Off by default: key names can be
    /// sensitive and numerous.
    #[arg(long)]
    pub export_key_names: bool,

    /// With --export-key-names, at most this many keys per worker group (the rest as "other").
    #[arg(long, value_name = "N")]
    pub max_keys_per_group: Option<usize>,

    /// Do not follow workers' syscalls (no worker.* metrics). The syscall tracepoints run a
    /// filter on every read and write of every process while a worker is tracked, Redis
    /// included: on a node that runs Redis, that taxes each Redis command (see BENCHMARKS.md).
    #[arg(long)]
    pub no_worker_probes: bool,

    /// How workers' traffic is followed: `auto` (the default: the syscall tracepoints on a
    /// node where no Redis is tracked, which cost workers least; uprobes in each worker's own
    /// code where a Redis runs, so that Redis pays nothing), `syscalls` (tracepoints for every
    /// worker; every process on the host then pays a filter on each read and write, Redis
    /// included) or `libc` (uprobes in each worker's libc, or in a static executable's own C
    /// library functions; workers that bypass libc, such as Go, are not seen).
    #[arg(long, value_name = "MODE")]
    pub worker_probe_mode: Option<crate::ebpf::worker::WorkerProbeMode>,

    /// In `auto` mode on a node with Redis, also follow workers that have no code to put
    /// uprobes in (Go binaries) through the syscall tracepoints. Redis then pays their filter on
    /// every read and write it makes.
    #[arg(long)]
    pub syscall_probes_beside_redis: bool,

    /// Follow at most N workers through uprobes (each holds 9 uprobe-multi links, or 17
    /// uprobes on kernels without them). Past it, `auto` follows further workers as if they
    /// had no uprobe target. Default 512.
    #[arg(long, value_name = "N")]
    pub max_libc_workers: Option<usize>,

    /// Do not put uprobes in the TLS library (OpenSSL's libssl) of workers seen talking TLS.
    /// Those probes read a TLS connection's commands and replies in plain text, so that pops
    /// over `rediss://` are counted; each SSL_write and SSL_read then costs two traps.
    #[arg(long)]
    pub no_tls_probes: bool,

    /// Do not time Redis's blocking bookkeeping (redis.blocking.cpu.time). That measurement
    /// needs return probes on blockForKeys and unblockClient: two more probe hits per blocking
    /// call, each a trap into the kernel on Redis's main thread.
    #[arg(long)]
    pub no_redis_bookkeeping_time: bool,

    /// Seconds between full /proc rescans (a safety net behind the exec/exit tracepoints).
    #[arg(long, value_name = "SECONDS")]
    pub rescan_interval: Option<f64>,

    /// Fail instead of falling back to /proc-only measurement when eBPF cannot be loaded.
    #[arg(long)]
    pub require_ebpf: bool,

    /// Log format.
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Log filter (tracing env-filter syntax); RUST_LOG also works.
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_cover_the_subcommands_but_not_the_hidden_one() {
        let mut out = Vec::new();
        write_completions(clap_complete::Shell::Bash, &mut out);
        let script = String::from_utf8(out).unwrap();
        assert!(script.contains("complete -F _fanout"), "{script}");
        for sub in ["run", "check-probes", "top", "advise", "completions"] {
            assert!(script.contains(sub), "{sub} missing");
        }
        assert!(script.contains("--worker-rule"));
        assert!(
            !script.contains("fanout__man"),
            "the hidden `man` is completed"
        );
    }

    #[test]
    fn man_pages_for_the_command_and_each_visible_subcommand() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_man_pages(dir.path()).unwrap();
        let mut names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "fanout-advise.1",
                "fanout-check-probes.1",
                "fanout-completions.1",
                "fanout-run.1",
                "fanout-top.1",
                "fanout.1"
            ]
        );
        let main = std::fs::read_to_string(dir.path().join("fanout.1")).unwrap();
        assert!(main.starts_with(".ie"), "{main}");
        assert!(main.contains(".TH fanout 1"), "{main}");
        assert!(main.contains(env!("CARGO_PKG_VERSION")));
        let run = std::fs::read_to_string(dir.path().join("fanout-run.1")).unwrap();
        assert!(run.contains("worker\\-rule"), "{run}");
    }
}
