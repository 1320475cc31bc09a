//! `cargo xtask test`: the README's test command, from the unit tests to the root-only
//! integration tests, the deployment checks, the package, the demo and the soak.

use std::process::Command;

use anyhow::{bail, Result};

use crate::util::{build_agent, is_root, run_checked, workspace_root};

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
    eprintln!("[test] debian package: build from the debug binary, dpkg -i, run, dpkg -r, dpkg -P");
    crate::deb::check(&crate::deb::build_in_target(&bin, true)?)?;
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
        // A filtered run is a developer's loop: no soak.
        return run_checked(&mut cmd);
    }
    run_checked(&mut cmd)?;
    eprintln!("[test] demo, quick mode (catch-all, fanout advise, the advice applied)");
    crate::demo::run(&bin, crate::demo::Plan::new(None, None, true))?;
    eprintln!("[test] soak, quick mode (3 minutes of faults; report in target/soak-quick/)");
    crate::soak::run(&bin, crate::soak::Plan::new(None, true))
}
