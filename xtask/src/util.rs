//! Small helpers shared by the tasks.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Runs a command and returns its stdout, failing on a non-zero exit.
pub fn command_output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command with inherited output, failing on a non-zero exit.
pub fn run_checked(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Builds the `fanout` binary (with its embedded eBPF object) and returns its path.
pub fn build_agent(release: bool) -> Result<PathBuf> {
    let root = workspace_root();
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root)
        .args(["build", "--package", "agent", "--bin", "fanout"]);
    if release {
        cmd.arg("--release");
    }
    run_checked(&mut cmd)?;
    Ok(root
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("fanout"))
}

/// Replaces this process with the agent.
pub fn exec_agent(bin: &Path, args: &[String]) -> Result<()> {
    if !is_root() {
        eprintln!("[run] warning: not root; the agent will fall back to /proc-only measurement or fail to attach probes");
    }
    use std::os::unix::process::CommandExt as _;
    let mut cmd = Command::new(bin);
    cmd.arg("run").args(args);
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot exec {}", bin.display()))
}

/// Unit tests everywhere, then the root-only integration tests, one at a time.
pub fn run_tests(unit_only: bool, filter: Option<&str>) -> Result<()> {
    let root = workspace_root();
    eprintln!("[test] unit tests");
    run_checked(Command::new("cargo").current_dir(&root).args([
        "test",
        "--workspace",
        "--exclude",
        "agent-ebpf",
        "--exclude",
        "integration-tests",
    ]))?;
    if unit_only {
        return Ok(());
    }
    if !is_root() {
        bail!("the integration tests attach eBPF programs and need root: run `sudo cargo xtask test` (or `cargo xtask test --unit-only`)");
    }
    let bin = build_agent(false)?;
    eprintln!("[test] deployment checks");
    crate::checks::deploy_checks(&bin)?;
    eprintln!(
        "[test] integration tests (root, one at a time) with {}",
        bin.display()
    );
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root)
        .args(["test", "--package", "integration-tests", "--"])
        .arg("--test-threads=1")
        .env("FANOUT_BIN", &bin)
        .env("FANOUT_INTEGRATION", "1")
        // Where setup installed Redis 6.2 for the version matrix.
        .env(
            integration_tests::REDIS62_VENV_VAR,
            integration_tests::redis62_venv(),
        )
        // And Redis 8.2, Valkey 8.1 and Valkey 9.1 (PyPI's prebuilt servers).
        .env(
            integration_tests::PYPI_SERVERS_VENV_VAR,
            integration_tests::pypi_servers_venv(),
        );
    if let Some(f) = filter {
        cmd.arg(f);
    }
    run_checked(&mut cmd)
}

/// Runs the RESP fuzz target for `runs` inputs, installing cargo-fuzz first if needed.
pub fn fuzz(runs: u64) -> Result<()> {
    if command_output(Command::new("cargo").args(["fuzz", "--version"])).is_err() {
        eprintln!("[fuzz] installing cargo-fuzz");
        run_checked(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let root = workspace_root();
    run_checked(
        Command::new("cargo")
            .current_dir(root.join("fuzz"))
            .args(["+nightly", "fuzz", "run", "resp", "--"])
            .arg(format!("-runs={runs}"))
            .arg("-max_len=4096"),
    )
}
