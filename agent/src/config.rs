//! The agent's configuration: defaults, then the TOML file, then flags and OTEL_* env vars.
//! Everything is validated here, before anything is attached.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::Deserialize;

use crate::{
    cli::{LogFormat, RunArgs},
    export::otlp_config::OtlpProtocol,
    export::otlp_config::{parse_compression, OtlpConfig, OtlpEnvError, OtlpOverrides},
    rules::{default_rule_specs, ExcludeSpec, RuleError, RuleSet, RuleSpec, WorkerRule},
};

pub const DEFAULT_PROMETHEUS_PORT: u16 = 9464;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(transparent)]
    Rule(#[from] RuleError),
    #[error(transparent)]
    Otlp(#[from] OtlpEnvError),
    #[error(transparent)]
    WebConfig(#[from] crate::export::web_config::WebConfigError),
    #[error("{name} must be between {min} and {max} seconds, got {value}")]
    BadInterval {
        name: &'static str,
        value: f64,
        min: f64,
        max: f64,
    },
    #[error("max_thread_names_per_process must be between 1 and 1024, got {0}")]
    BadThreadNameLimit(usize),
    #[error("max_keys_per_group must be between 1 and 10000, got {0}")]
    BadKeyLimit(usize),
    #[error("max_libc_workers must be between 0 and 4096, got {0}")]
    BadLibcWorkerLimit(usize),
}

/// The config file. Unknown keys are errors, so that a typo does not silently do nothing.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub proc_root: Option<PathBuf>,
    pub prometheus_listen: Option<SocketAddr>,
    /// An exporter-toolkit web config (TLS, basic auth) for the metrics endpoint.
    pub web_config_file: Option<PathBuf>,
    pub prometheus: Option<bool>,
    pub rescan_interval_secs: Option<f64>,
    pub require_ebpf: Option<bool>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    pub default_worker_rules: Option<bool>,
    pub max_thread_names_per_process: Option<usize>,
    pub export_key_names: Option<bool>,
    pub max_keys_per_group: Option<usize>,
    pub redis_bookkeeping_time: Option<bool>,
    pub worker_probes: Option<bool>,
    pub worker_probe_mode: Option<crate::ebpf::worker::WorkerProbeMode>,
    pub syscall_probes_beside_redis: Option<bool>,
    pub max_libc_workers: Option<usize>,
    pub tls_probes: Option<bool>,
    #[serde(default, rename = "worker_rule")]
    pub worker_rules: Vec<RuleSpec>,
    /// Redis servers not to track (`[[redis_exclude]]`).
    #[serde(default)]
    pub redis_exclude: Vec<ExcludeSpec>,
    #[serde(default)]
    pub otlp: FileOtlp,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileOtlp {
    pub endpoint: Option<String>,
    pub protocol: Option<OtlpProtocol>,
    pub interval_secs: Option<f64>,
    pub timeout_secs: Option<f64>,
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// PEM file of the CA(s) to trust for an https:// endpoint.
    pub certificate: Option<PathBuf>,
    /// PEM client certificate and key, for mTLS.
    pub client_certificate: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// For a gRPC endpoint given as host:port: plain text instead of TLS.
    pub insecure: Option<bool>,
    /// `gzip` or `none`.
    pub compression: Option<String>,
}

/// The resolved configuration the agent runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub proc_root: PathBuf,
    pub prometheus_listen: Option<SocketAddr>,
    /// The endpoint's TLS and basic auth, loaded from `--web.config.file`.
    pub web_config: Option<crate::export::web_config::WebConfig>,
    pub otlp: Option<OtlpConfig>,
    pub rules: RuleSet,
    pub rescan_interval: Duration,
    pub require_ebpf: bool,
    pub log_format: LogFormat,
    pub log_level: String,
    pub max_thread_names_per_process: usize,
    pub listeners: crate::worker::ListenerOptions,
    /// Time blockForKeys/unblockClient with return probes (on unless turned off).
    pub redis_bookkeeping_time: bool,
    /// Follow workers' syscalls (on unless turned off).
    pub worker_probes: bool,
    pub worker_probe_mode: crate::ebpf::worker::WorkerProbeMode,
    /// In `auto` mode beside a Redis, follow workers without a uprobe target through the
    /// syscall tracepoints anyway.
    pub syscall_probes_beside_redis: bool,
    /// How many workers at most are followed through uprobes.
    pub max_libc_workers: usize,
    /// Follow workers' TLS connections through their OpenSSL (on unless turned off).
    pub tls_probes: bool,
}

impl FileConfig {
    pub fn parse(path: &std::path::Path, text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            // toml's messages span several lines with a source excerpt; one line is wanted.
            message: e.message().to_string()
                + &e.span()
                    .map(|s| format!(" (at byte {})", s.start))
                    .unwrap_or_default(),
        })
    }

    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::parse(path, &text)
    }
}

/// Longest interval or timeout accepted (about 31 years): timers past it overflow.
const MAX_SECONDS: f64 = 1e9;

/// A number of seconds in `[min, MAX_SECONDS]`. The minimum keeps a timer from firing
/// continuously: a value that rounds to zero would stop the agent's loop (tokio refuses a
/// zero period) and a tiny one would busy-loop it.
fn seconds(name: &'static str, value: f64, min: f64) -> Result<Duration, ConfigError> {
    if value.is_finite() && value >= min && value <= MAX_SECONDS {
        Ok(Duration::from_secs_f64(value))
    } else {
        Err(ConfigError::BadInterval {
            name,
            value,
            min,
            max: MAX_SECONDS,
        })
    }
}

impl Config {
    /// Resolves flags over file over defaults, reading OTEL_* variables through `env`.
    pub fn resolve(
        args: &RunArgs,
        file: FileConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut specs: Vec<RuleSpec> = args
            .worker_rules
            .iter()
            .map(|f| WorkerRule::parse_flag(f))
            .collect::<Result<_, _>>()?;
        specs.extend(file.worker_rules);
        let use_defaults = !args.no_default_rules && file.default_worker_rules.unwrap_or(true);
        if use_defaults {
            specs.extend(default_rule_specs());
        }
        let mut excludes: Vec<ExcludeSpec> = args
            .redis_excludes
            .iter()
            .map(|f| ExcludeSpec::parse_flag(f))
            .collect::<Result<_, _>>()?;
        excludes.extend(file.redis_exclude);
        let rules = RuleSet::new(&specs)?.with_redis_exclusions(&excludes)?;

        let prometheus_enabled = !args.no_prometheus && file.prometheus.unwrap_or(true);
        let prometheus_listen = prometheus_enabled.then(|| {
            args.prometheus_listen
                .or(file.prometheus_listen)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], DEFAULT_PROMETHEUS_PORT)))
        });

        let web_config = args
            .web_config_file
            .clone()
            .or(file.web_config_file)
            .map(|path| crate::export::web_config::WebConfig::load(&path))
            .transpose()?;

        let overrides = OtlpOverrides {
            endpoint: args.otlp_endpoint.clone().or(file.otlp.endpoint),
            protocol: args.otlp_protocol.or(file.otlp.protocol),
            interval: args
                .otlp_interval
                .or(file.otlp.interval_secs)
                .map(|s| seconds("otlp interval", s, 0.1))
                .transpose()?,
            timeout: file
                .otlp
                .timeout_secs
                .map(|s| seconds("otlp timeout", s, 0.001))
                .transpose()?,
            headers: file.otlp.headers,
            certificate: args.otlp_certificate.clone().or(file.otlp.certificate),
            client_certificate: args
                .otlp_client_certificate
                .clone()
                .or(file.otlp.client_certificate),
            client_key: args.otlp_client_key.clone().or(file.otlp.client_key),
            insecure: if args.otlp_insecure {
                Some(true)
            } else {
                file.otlp.insecure
            },
            compression: args
                .otlp_compression
                .as_deref()
                .map(|c| parse_compression("--otlp-compression", c))
                .or_else(|| {
                    file.otlp
                        .compression
                        .as_deref()
                        .map(|c| parse_compression("[otlp] compression", c))
                })
                .transpose()?,
        };
        let otlp = OtlpConfig::resolve(overrides, env)?;

        let max_thread_names_per_process = file.max_thread_names_per_process.unwrap_or(64);
        if !(1..=1024).contains(&max_thread_names_per_process) {
            return Err(ConfigError::BadThreadNameLimit(
                max_thread_names_per_process,
            ));
        }

        let max_keys_per_group = args
            .max_keys_per_group
            .or(file.max_keys_per_group)
            .unwrap_or(50);
        if !(1..=10000).contains(&max_keys_per_group) {
            return Err(ConfigError::BadKeyLimit(max_keys_per_group));
        }
        let max_libc_workers = args
            .max_libc_workers
            .or(file.max_libc_workers)
            .unwrap_or(crate::ebpf::worker::DEFAULT_MAX_LIBC_WORKERS);
        if max_libc_workers > 4096 {
            return Err(ConfigError::BadLibcWorkerLimit(max_libc_workers));
        }
        let listeners = crate::worker::ListenerOptions {
            export_key_names: args.export_key_names || file.export_key_names.unwrap_or(false),
            max_keys_per_group,
        };

        Ok(Self {
            listeners,
            redis_bookkeeping_time: !args.no_redis_bookkeeping_time
                && file.redis_bookkeeping_time.unwrap_or(true),
            worker_probes: !args.no_worker_probes && file.worker_probes.unwrap_or(true),
            worker_probe_mode: args
                .worker_probe_mode
                .or(file.worker_probe_mode)
                .unwrap_or(crate::ebpf::worker::WorkerProbeMode::Auto),
            syscall_probes_beside_redis: args.syscall_probes_beside_redis
                || file.syscall_probes_beside_redis.unwrap_or(false),
            max_libc_workers,
            tls_probes: !args.no_tls_probes && file.tls_probes.unwrap_or(true),
            proc_root: args
                .proc_root
                .clone()
                .or(file.proc_root)
                .unwrap_or_else(|| PathBuf::from("/proc")),
            prometheus_listen,
            web_config,
            otlp,
            rules,
            rescan_interval: seconds(
                "rescan interval",
                args.rescan_interval
                    .or(file.rescan_interval_secs)
                    .unwrap_or(10.0),
                0.1,
            )?,
            require_ebpf: args.require_ebpf || file.require_ebpf.unwrap_or(false),
            log_format: args
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Text),
            log_level: args
                .log_level
                .clone()
                .or(file.log_level)
                .unwrap_or_else(|| "info".into()),
            max_thread_names_per_process,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(text: &str) -> Result<FileConfig, ConfigError> {
        FileConfig::parse(Path::new("fanout.toml"), text)
    }

    #[test]
    fn defaults_without_file_or_flags() {
        let config = Config::resolve(&RunArgs::default(), FileConfig::default(), &no_env).unwrap();
        assert_eq!(config.proc_root, PathBuf::from("/proc"));
        assert_eq!(
            config.prometheus_listen,
            Some("0.0.0.0:9464".parse().unwrap())
        );
        assert!(
            config.otlp.is_none(),
            "OTLP push is off until an endpoint is configured"
        );
        assert_eq!(config.rescan_interval, Duration::from_secs(10));
        assert_eq!(
            config.rules.groups().collect::<Vec<_>>(),
            ["sidekiq", "resque", "rq", "celery"]
        );
    }

    #[test]
    fn file_values_apply_and_flags_override_them() {
        let file = parse(
            r#"
            proc_root = "/host/proc"
            prometheus_listen = "127.0.0.1:9000"
            rescan_interval_secs = 30
            default_worker_rules = false
            [[worker_rule]]
            group = "billing"
            cmdline = "billing"
            [otlp]
            endpoint = "http://collector:4318"
            protocol = "http/protobuf"
            interval_secs = 15
            "#,
        )
        .unwrap();
        let args = RunArgs {
            prometheus_listen: Some("127.0.0.1:9999".parse().unwrap()),
            worker_rules: vec!["mail:comm=mailer".into()],
            ..Default::default()
        };
        let config = Config::resolve(&args, file, &no_env).unwrap();
        assert_eq!(config.proc_root, PathBuf::from("/host/proc"));
        assert_eq!(
            config.prometheus_listen,
            Some("127.0.0.1:9999".parse().unwrap())
        );
        assert_eq!(config.rescan_interval, Duration::from_secs(30));
        assert_eq!(
            config.rules.groups().collect::<Vec<_>>(),
            ["mail", "billing"]
        );
        let otlp = config.otlp.unwrap();
        assert_eq!(otlp.endpoint, "http://collector:4318/v1/metrics");
        assert_eq!(otlp.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(otlp.interval, Duration::from_secs(15));
    }

    #[test]
    fn otlp_tls_and_compression_from_the_file_and_flags() {
        let file = parse(
            "[otlp]\nendpoint = \"collector:4317\"\nprotocol = \"grpc\"\ninsecure = true\ncompression = \"gzip\"\ncertificate = \"/etc/fanout/ca.pem\"",
        )
        .unwrap();
        let otlp = Config::resolve(&RunArgs::default(), file, &no_env)
            .unwrap()
            .otlp
            .unwrap();
        assert_eq!(otlp.endpoint, "http://collector:4317");
        assert_eq!(
            otlp.compression,
            crate::export::otlp_config::OtlpCompression::Gzip
        );
        assert_eq!(
            otlp.tls.certificate.as_deref(),
            Some(std::path::Path::new("/etc/fanout/ca.pem"))
        );
        // The flag wins; a bad value in the file is an error.
        let args = RunArgs {
            otlp_compression: Some("none".into()),
            ..Default::default()
        };
        let file = parse("[otlp]\nendpoint = \"https://c:4318\"\ncompression = \"gzip\"").unwrap();
        let otlp = Config::resolve(&args, file, &no_env).unwrap().otlp.unwrap();
        assert_eq!(
            otlp.compression,
            crate::export::otlp_config::OtlpCompression::None
        );
        let file =
            parse("[otlp]\nendpoint = \"https://c:4318\"\ncompression = \"brotli\"").unwrap();
        assert!(Config::resolve(&RunArgs::default(), file, &no_env).is_err());
    }

    #[test]
    fn worker_probe_mode_and_libc_worker_limit() {
        use crate::ebpf::worker::{WorkerProbeMode, DEFAULT_MAX_LIBC_WORKERS};
        let config = Config::resolve(&RunArgs::default(), FileConfig::default(), &no_env).unwrap();
        assert_eq!(config.worker_probe_mode, WorkerProbeMode::Auto);
        assert!(!config.syscall_probes_beside_redis);
        assert_eq!(config.max_libc_workers, DEFAULT_MAX_LIBC_WORKERS);
        let file = parse(
            "worker_probe_mode = \"syscalls\"\nmax_libc_workers = 8\nsyscall_probes_beside_redis = true",
        )
        .unwrap();
        let config = Config::resolve(&RunArgs::default(), file, &no_env).unwrap();
        assert_eq!(config.worker_probe_mode, WorkerProbeMode::Syscalls);
        assert!(config.syscall_probes_beside_redis);
        assert_eq!(config.max_libc_workers, 8);
        let args = RunArgs {
            max_libc_workers: Some(0),
            ..Default::default()
        };
        let file = parse("max_libc_workers = 8").unwrap();
        assert_eq!(
            Config::resolve(&args, file, &no_env)
                .unwrap()
                .max_libc_workers,
            0,
            "the flag wins"
        );
        let args = RunArgs {
            max_libc_workers: Some(5000),
            ..Default::default()
        };
        let err = Config::resolve(&args, FileConfig::default(), &no_env)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "max_libc_workers must be between 0 and 4096, got 5000");
    }

    #[test]
    fn tls_probes_are_on_unless_the_file_or_the_flag_turns_them_off() {
        let resolve = |args: &RunArgs, file: &str| {
            Config::resolve(args, parse(file).unwrap(), &no_env)
                .unwrap()
                .tls_probes
        };
        let off = RunArgs {
            no_tls_probes: true,
            ..Default::default()
        };
        assert!(resolve(&RunArgs::default(), ""));
        assert!(resolve(&RunArgs::default(), "tls_probes = true"));
        assert!(!resolve(&RunArgs::default(), "tls_probes = false"));
        assert!(!resolve(&off, ""));
        assert!(!resolve(&off, "tls_probes = true"), "the flag wins");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_one_line_errors() {
        let err = parse("prometheus_lisen = \"x\"").unwrap_err().to_string();
        assert!(err.contains("unknown field `prometheus_lisen`"), "{err}");
        assert!(!err.contains('\n'), "{err}");
        let err = parse("prometheus_listen = \"not an address\"")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("config file fanout.toml:"), "{err}");
        let err = parse("[[worker_rule]]\ngroup = \"x\"\nregex = \"y\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `regex`"), "{err}");
    }

    #[test]
    fn invalid_rules_and_intervals_fail_resolution() {
        let file = parse("[[worker_rule]]\ngroup = \"x\"\ncmdline = \"(\"").unwrap();
        let err = Config::resolve(&RunArgs::default(), file, &no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid cmdline regex"), "{err}");
        let args = RunArgs {
            rescan_interval: Some(0.0),
            ..Default::default()
        };
        let err = Config::resolve(&args, FileConfig::default(), &no_env)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "rescan interval must be between 0.1 and 1000000000 seconds, got 0"
        );
        // Edges that once became a zero period (a panic in the agent's loop or its export
        // task), and ones that overflow a timer.
        for (rescan, otlp) in [
            (Some(1e-10), None),
            (None, Some(1e-10)),
            (Some(-1.0), None),
            (None, Some(f64::NAN)),
            (Some(1e300), None),
            (None, Some(f64::INFINITY)),
        ] {
            let args = RunArgs {
                rescan_interval: rescan,
                otlp_interval: otlp,
                otlp_endpoint: Some("http://127.0.0.1:4318".into()),
                ..Default::default()
            };
            let err = Config::resolve(&args, FileConfig::default(), &no_env)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("must be between"),
                "{rescan:?} {otlp:?}: {err}"
            );
        }
        let file = parse("max_thread_names_per_process = 0").unwrap();
        assert!(Config::resolve(&RunArgs::default(), file, &no_env).is_err());
    }

    /// How a numeric setting is given.
    enum Via {
        Flag(fn(&mut RunArgs, f64)),
        /// A config file; `{}` is replaced by the value.
        File(&'static str),
        /// An environment variable in milliseconds.
        Env(&'static str),
    }

    /// Every numeric setting, its valid range, and whether it takes whole numbers only. The
    /// walk below gives each its edges; a setting added without a row here is a setting whose
    /// edges nobody checked.
    fn numeric_settings() -> Vec<(&'static str, Via, f64, f64, bool)> {
        vec![
            (
                "--rescan-interval",
                Via::Flag(|a, v| a.rescan_interval = Some(v)),
                0.1,
                1e9,
                false,
            ),
            (
                "rescan_interval_secs",
                Via::File("rescan_interval_secs = {}"),
                0.1,
                1e9,
                false,
            ),
            (
                "--otlp-interval",
                Via::Flag(|a, v| a.otlp_interval = Some(v)),
                0.1,
                1e9,
                false,
            ),
            (
                "[otlp] interval_secs",
                Via::File("[otlp]\ninterval_secs = {}"),
                0.1,
                1e9,
                false,
            ),
            (
                "[otlp] timeout_secs",
                Via::File("[otlp]\ntimeout_secs = {}"),
                0.001,
                1e9,
                false,
            ),
            (
                "OTEL_METRIC_EXPORT_INTERVAL",
                Via::Env("OTEL_METRIC_EXPORT_INTERVAL"),
                1.0,
                1e12,
                true,
            ),
            (
                "OTEL_METRIC_EXPORT_TIMEOUT",
                Via::Env("OTEL_METRIC_EXPORT_TIMEOUT"),
                1.0,
                1e12,
                true,
            ),
            (
                "OTEL_EXPORTER_OTLP_TIMEOUT",
                Via::Env("OTEL_EXPORTER_OTLP_TIMEOUT"),
                1.0,
                1e12,
                true,
            ),
            (
                "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT",
                Via::Env("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT"),
                1.0,
                1e12,
                true,
            ),
            (
                "max_thread_names_per_process",
                Via::File("max_thread_names_per_process = {}"),
                1.0,
                1024.0,
                true,
            ),
            (
                "--max-keys-per-group",
                Via::Flag(|a, v| a.max_keys_per_group = Some(v as usize)),
                1.0,
                10000.0,
                true,
            ),
            (
                "max_keys_per_group",
                Via::File("max_keys_per_group = {}"),
                1.0,
                10000.0,
                true,
            ),
            (
                "--max-libc-workers",
                Via::Flag(|a, v| a.max_libc_workers = Some(v as usize)),
                0.0,
                4096.0,
                true,
            ),
            (
                "max_libc_workers",
                Via::File("max_libc_workers = {}"),
                0.0,
                4096.0,
                true,
            ),
        ]
    }

    /// Resolves a config with `value` given `via`, OTLP on (so that its settings are read).
    fn resolve_with(via: &Via, value: &str) -> Result<Config, String> {
        let mut args = RunArgs {
            otlp_endpoint: Some("http://127.0.0.1:4318".into()),
            ..Default::default()
        };
        let mut file_text = String::new();
        let mut env_pair: Option<(&str, String)> = None;
        match via {
            Via::Flag(set) => set(&mut args, value.parse::<f64>().map_err(|e| e.to_string())?),
            Via::File(template) => file_text = template.replace("{}", value),
            Via::Env(name) => env_pair = Some((name, value.to_string())),
        }
        let file = parse(&file_text).map_err(|e| e.to_string())?;
        let env = move |k: &str| {
            env_pair
                .as_ref()
                .filter(|(n, _)| *n == k)
                .map(|(_, v)| v.clone())
        };
        Config::resolve(&args, file, &env).map_err(|e| e.to_string())
    }

    fn format_value(v: f64, integer: bool) -> String {
        if integer && v.is_finite() {
            format!("{}", v as i64)
        } else if v.is_nan() {
            "nan".into()
        } else if v.is_infinite() {
            if v > 0.0 {
                "inf".into()
            } else {
                "-inf".into()
            }
        } else {
            format!("{v:?}")
        }
    }

    #[test]
    fn every_numeric_setting_takes_its_range_and_refuses_its_edges_in_one_line() {
        for (name, via, min, max, integer) in numeric_settings() {
            // Flags of whole numbers are usize: clap refuses what does not fit before this
            // layer (tests/cli.rs walks those).
            let flag_of_usize = integer && matches!(via, Via::Flag(_));
            let mut valid = vec![min, max];
            if !integer {
                valid.push((min * max).sqrt());
            }
            for v in valid {
                let text = format_value(v, integer);
                assert!(
                    resolve_with(&via, &text).is_ok(),
                    "{name} = {text} is in range and must be taken: {:?}",
                    resolve_with(&via, &text).err()
                );
            }
            let mut invalid = vec![max + if integer { 1.0 } else { max * 1e-6 }];
            if !(flag_of_usize && min == 0.0) {
                invalid.push(min - if integer { 1.0 } else { min * 1e-3 });
            }
            if !flag_of_usize {
                invalid.extend([-1.0, f64::INFINITY, 1e300]);
                if !matches!(via, Via::Env(_)) || integer {
                    invalid.push(f64::NAN);
                }
                if !integer {
                    invalid.extend([0.0, 1e-10, -0.0]);
                }
            }
            for v in invalid {
                let text = format_value(v, integer);
                match resolve_with(&via, &text) {
                    Ok(_) => panic!("{name} = {text} is out of range and must be refused"),
                    Err(e) => assert!(
                        !e.contains('\n') && !e.is_empty(),
                        "{name} = {text}: a one-line error, got {e:?}"
                    ),
                }
            }
            // Not numbers at all.
            if !matches!(via, Via::Flag(_)) {
                for text in ["1.5x", "\"ten\""] {
                    let text = if matches!(via, Via::Env(_)) {
                        text.trim_matches('"')
                    } else {
                        text
                    };
                    let e = resolve_with(&via, text).expect_err(text);
                    assert!(!e.contains('\n'), "{name} = {text}: {e:?}");
                }
                if integer {
                    let e = resolve_with(&via, "1.5").expect_err("a fraction");
                    assert!(!e.contains('\n'), "{name} = 1.5: {e:?}");
                }
            }
        }
    }

    #[test]
    fn redis_exclusions_from_file_and_flags() {
        let file = parse("[[redis_exclude]]\nexe = \"redis-server-7.4.1\"\n").unwrap();
        assert_eq!(file.redis_exclude.len(), 1);
        let args = RunArgs {
            redis_excludes: vec!["cmdline=:6390\\b".into()],
            ..Default::default()
        };
        assert!(Config::resolve(&args, file, &no_env).is_ok());
        let err = parse("[[redis_exclude]]\ngroup = \"x\"\ncomm = \"y\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `group`"), "{err}");
        let file = parse("[[redis_exclude]]\ncmdline = \"(\"").unwrap();
        let err = Config::resolve(&RunArgs::default(), file, &no_env)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("redis_exclude rule: invalid cmdline regex"),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
        let file = parse("[[redis_exclude]]\n").unwrap();
        let err = Config::resolve(&RunArgs::default(), file, &no_env)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "redis_exclude rule has no matcher: give at least one of comm, exe, cmdline"
        );
        let args = RunArgs {
            redis_excludes: vec!["port=6379".into()],
            ..Default::default()
        };
        let err = Config::resolve(&args, FileConfig::default(), &no_env)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "invalid --redis-exclude \"port=6379\": expected comm=NAME, exe=NAME or cmdline=REGEX"
        );
    }

    #[test]
    fn prometheus_can_be_disabled() {
        let args = RunArgs {
            no_prometheus: true,
            ..Default::default()
        };
        assert_eq!(
            Config::resolve(&args, FileConfig::default(), &no_env)
                .unwrap()
                .prometheus_listen,
            None
        );
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = FileConfig::load(Path::new("/nonexistent/fanout.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("cannot read config file /nonexistent/fanout.toml:"),
            "{err}"
        );
    }
}
