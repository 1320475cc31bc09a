//! Checks of the deployment files, run by `cargo xtask test`: the alert rules (promtool check
//! and unit tests), the Kubernetes manifests against the Kubernetes schemas (offline, with the
//! kubernetes-validate package's bundled schemas), the Helm chart (lint, renders validated the
//! same way, no drift from the manifests), the systemd unit (systemd-analyze), and the
//! collector config's pipelines.

use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

use crate::util::workspace_root;

/// The Kubernetes version the manifests are checked against.
const KUBERNETES_VERSION: &str = "1.30.0";

/// Values files (in the chart) the chart is also linted, rendered and validated with, beside
/// its defaults.
const HELM_VALUES: &[&str] = &["ci/nondefault-values.yaml"];
/// The values set of `HELM_VALUES` that enables the PrometheusRule, whose rules promtool checks.
const HELM_RULES_SET: &str = "nondefault";

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
    helm_chart(&root, &deploy, &mut check);
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

/// The Helm chart, without a `helm` binary (none can be installed here): helm_check.py drives
/// helm-python-sdk, which embeds the Helm v4 engine, so lint and render are Helm's own.
/// - `helm lint` (strict) and a render with the default values and with each file of
///   `HELM_VALUES`, written under target/helm-check/; the script also checks the custom
///   resources' structure (a ServiceMonitor selecting the chart's Service and port, a
///   PrometheusRule holding only rule groups) and the agent's TOML in the ConfigMap;
/// - each render's core objects against the Kubernetes schemas, exactly as the plain manifests
///   (kubernetes-validate --strict, same version); the custom resources have no schema there;
/// - the PrometheusRule's rules with `promtool check rules`;
/// - no drift: the default render equals deploy/kubernetes/ object by object (what may differ,
///   Helm's labels and the like, is listed in helm_check.py's `compare_object`), and the
///   PrometheusRule equals deploy/alerts/fanout.rules.yml.
fn helm_chart(root: &Path, deploy: &Path, check: &mut impl FnMut(&str, Result<()>)) {
    let chart = deploy.join("helm/fanout");
    let script = root.join("xtask/src/helm_check.py");
    let out = root.join("target/helm-check");
    let _ = std::fs::remove_dir_all(&out);
    let python = tools_venv().join("bin/python");
    check(
        "helm lint and render",
        run(
            "helm lint and render",
            Command::new(&python)
                .arg(&script)
                .arg("render")
                .arg(&chart)
                .arg(&out)
                .arg(KUBERNETES_VERSION)
                .args(HELM_VALUES.iter().map(|v| chart.join(v))),
        ),
    );
    let sets = std::iter::once("default").chain(HELM_VALUES.iter().map(|v| {
        let file = v.rsplit('/').next().unwrap_or(v);
        file.trim_end_matches(".yaml").trim_end_matches("-values")
    }));
    for set in sets {
        let name = format!("helm render ({set} values) against the Kubernetes schemas");
        let rendered = out.join(format!("{set}.yaml"));
        check(
            &name,
            if rendered.is_file() {
                run(
                    &name,
                    Command::new(tools_venv().join("bin/kubernetes-validate"))
                        .args(["--strict", "-k", KUBERNETES_VERSION])
                        .arg(&rendered),
                )
            } else {
                Err(anyhow::anyhow!("{} was not rendered", rendered.display()))
            },
        );
    }
    let rules = out.join(format!("{HELM_RULES_SET}.rules.yml"));
    check(
        "helm PrometheusRule rules",
        if rules.is_file() {
            run(
                "helm PrometheusRule rules",
                Command::new("promtool")
                    .arg("check")
                    .arg("rules")
                    .arg(&rules),
            )
        } else {
            Err(anyhow::anyhow!("{} was not rendered", rules.display()))
        },
    );
    check(
        "helm chart against the plain manifests",
        run(
            "helm chart against the plain manifests",
            Command::new(&python)
                .arg(&script)
                .arg("drift")
                .arg(&chart)
                .arg(deploy),
        ),
    );
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
