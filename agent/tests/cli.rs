//! The command line as a user meets it: help, version, and one-line errors with exit code 2 for
//! anything invalid, before anything is attached. These need no root.

use std::process::{Command, Output};

fn fanout(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run fanout")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_usage_error(out: &Output, expected: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "exit code; stderr: {err}");
    assert!(err.contains(expected), "expected {expected:?} in {err:?}");
}

fn assert_one_line_usage_error(out: &Output, expected: &str) {
    assert_usage_error(out, expected);
    let err = stderr(out);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err:?}"
    );
    assert!(err.starts_with("fanout: error: "), "{err:?}");
}

#[test]
fn version_and_help() {
    let out = fanout(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("fanout {}", env!("CARGO_PKG_VERSION"))
    );
    let out = fanout(&["run", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--config",
        "--prometheus-listen",
        "--otlp-endpoint",
        "--worker-rule",
        "--proc-root",
        "--log-format",
    ] {
        assert!(help.contains(flag), "{flag} missing from help");
    }
}

#[test]
fn unknown_flag_exits_2() {
    assert_usage_error(&fanout(&["run", "--no-such-flag"]), "--no-such-flag");
}

#[test]
fn invalid_flag_value_exits_2() {
    assert_usage_error(
        &fanout(&["run", "--prometheus-listen", "nowhere"]),
        "invalid value 'nowhere'",
    );
    assert_usage_error(
        &fanout(&["run", "--otlp-protocol", "http/json"]),
        "invalid value 'http/json'",
    );
}

#[test]
fn invalid_worker_rule_exits_2_with_one_line() {
    assert_one_line_usage_error(
        &fanout(&["run", "--worker-rule", "billing:cmdline=(oops"]),
        "invalid cmdline regex",
    );
    assert_one_line_usage_error(
        &fanout(&["run", "--worker-rule", "nocolon"]),
        "invalid --worker-rule \"nocolon\"",
    );
}

#[test]
fn invalid_config_file_exits_2_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fanout.toml");
    std::fs::write(
        &path,
        "prometheus_listen = \"127.0.0.1:1\"\n[[worker_rule]]\ngroup = \"redis\"\ncomm = \"x\"\n",
    )
    .unwrap();
    assert_one_line_usage_error(
        &fanout(&["run", "--config", path.to_str().unwrap()]),
        "reserved group name",
    );
    std::fs::write(&path, "this is not toml").unwrap();
    assert_one_line_usage_error(
        &fanout(&["run", "--config", path.to_str().unwrap()]),
        "config file",
    );
    assert_one_line_usage_error(
        &fanout(&["run", "--config", "/nonexistent.toml"]),
        "cannot read config file /nonexistent.toml",
    );
}

#[test]
fn invalid_otel_environment_exits_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_fanout"))
        .args(["run"])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
        .output()
        .unwrap();
    assert_one_line_usage_error(&out, "OTEL_EXPORTER_OTLP_PROTOCOL");
}

/// Every numeric flag at its edges: out of range is the usual one-line error, not a number
/// (or a negative count) is clap's usage error; both exit 2 before anything is attached.
/// The unit test `every_numeric_setting_takes_its_range_and_refuses_its_edges_in_one_line`
/// walks the same settings from the config file and the environment.
#[test]
fn numeric_flags_at_their_edges_exit_2_before_anything_starts() {
    let out_of_range = [
        (
            "--rescan-interval",
            "0",
            "rescan interval must be between 0.1 and 1000000000 seconds, got 0",
        ),
        ("--rescan-interval", "0.09", "got 0.09"),
        ("--rescan-interval", "1e-10", "got 0.0000000001"),
        ("--rescan-interval", "-1", "got -1"),
        ("--rescan-interval", "1000000001", "got 1000000001"),
        ("--rescan-interval", "inf", "got inf"),
        ("--rescan-interval", "NaN", "got NaN"),
        (
            "--otlp-interval",
            "0.01",
            "otlp interval must be between 0.1 and",
        ),
        ("--otlp-interval", "1e300", "otlp interval must be between"),
        (
            "--max-keys-per-group",
            "0",
            "max_keys_per_group must be between 1 and 10000, got 0",
        ),
        ("--max-keys-per-group", "10001", "got 10001"),
        (
            "--max-libc-workers",
            "4097",
            "max_libc_workers must be between 0 and 4096, got 4097",
        ),
    ];
    for (flag, value, expected) in out_of_range {
        let out = fanout(&["run", &format!("{flag}={value}")]);
        assert_one_line_usage_error(&out, expected);
    }
    for (flag, value) in [
        ("--max-keys-per-group", "-1"),
        ("--max-keys-per-group", "1.5"),
        ("--max-libc-workers", "-1"),
        ("--max-libc-workers", "99999999999999999999999"),
        ("--rescan-interval", "ten"),
    ] {
        let out = fanout(&["run", &format!("{flag}={value}")]);
        assert_usage_error(&out, &format!("invalid value '{value}'"));
    }
}

#[test]
fn top_without_an_agent_is_a_one_line_error_saying_how_to_start_one() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = free.local_addr().unwrap().to_string();
    drop(free);
    let out = fanout(&["top", "--once", "--address", &address]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err:?}");
    assert!(
        err.starts_with(&format!(
            "fanout: error: no Fanout agent answers at {address}"
        )),
        "{err}"
    );
    assert!(err.contains("fanout run"), "{err}");
    // Its interval has a range like every numeric flag.
    assert_usage_error(
        &fanout(&["top", "--interval", "0"]),
        "must be between 0.2 and 3600 seconds",
    );
}
