//! Checks of the deployment files, run by `cargo xtask test`: the alert rules (promtool check
//! and unit tests), the Kubernetes manifests against the Kubernetes schemas (offline, with the
//! kubernetes-validate package's bundled schemas), the systemd unit (systemd-analyze), and the
//! collector config's pipelines.

use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

use crate::util::workspace_root;

/// The Kubernetes version the manifests are checked against.
const KUBERNETES_VERSION: &str = "1.30.0";

/// Where setup installs the Python tools (a venv, so nothing touches the system Python).
pub fn tools_venv() -> std::path::PathBuf {
    workspace_root().join("target/tools/venv")
}

fn run(name: &str, cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("{name}: cannot run {cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("{name} failed:\n{text}");
    }
    eprintln!("[checks] {name}: ok");
    Ok(())
}

pub fn deploy_checks(fanout_bin: &Path) -> Result<()> {
    let root = workspace_root();
    let deploy = root.join("deploy");
    let mut passed = 0;
    let mut failures = Vec::new();
    let mut check = |name: &str, result: Result<()>| match result {
        Ok(()) => passed += 1,
        Err(e) => {
            eprintln!("[checks] {name}: FAILED\n{e:#}");
            failures.push(name.to_string());
        }
    };

    check(
        "promtool check rules",
        run(
            "promtool check rules",
            Command::new("promtool")
                .arg("check")
                .arg("rules")
                .arg(deploy.join("alerts/fanout.rules.yml")),
        ),
    );
    check(
        "promtool test rules",
        run(
            "promtool test rules",
            Command::new("promtool")
                .current_dir(deploy.join("alerts/tests"))
                .args(["test", "rules", "fanout.test.yml"]),
        ),
    );
    check(
        "kubernetes manifests",
        run(
            "kubernetes-validate",
            Command::new(tools_venv().join("bin/kubernetes-validate"))
                .args(["--strict", "-k", KUBERNETES_VERSION])
                .arg(deploy.join("kubernetes/fanout.yaml")),
        ),
    );
    check(
        "systemd unit",
        systemd_unit(&deploy.join("systemd/fanout.service"), fanout_bin),
    );
    check(
        "collector config",
        run(
            "collector config",
            Command::new(tools_venv().join("bin/python"))
                .arg(root.join("xtask/src/check_collector.py"))
                .arg(deploy.join("otel-collector/config.yaml")),
        ),
    );
    eprintln!("checks: {passed} passed, {} failed", failures.len());
    if !failures.is_empty() {
        bail!("deployment checks failed: {}", failures.join(", "));
    }
    Ok(())
}

/// `systemd-analyze verify` on the unit with its ExecStart pointed at the built binary. It
/// warns (and exits 0) on unknown keys, so any output is a failure.
fn systemd_unit(unit: &Path, fanout_bin: &Path) -> Result<()> {
    let text = std::fs::read_to_string(unit)?;
    let dir = std::env::temp_dir().join(format!("fanout-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let copy = dir.join("fanout.service");
    std::fs::write(
        &copy,
        text.replace("/usr/local/bin/fanout", &fanout_bin.display().to_string()),
    )?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .context("systemd-analyze")?;
    let _ = std::fs::remove_dir_all(&dir);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !said.trim().is_empty() {
        bail!("systemd-analyze verify: {said}");
    }
    eprintln!("[checks] systemd unit: ok");
    Ok(())
}
