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
