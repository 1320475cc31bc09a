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

/// Packages `bin` as a .deb: under target/debian/ (target/debian/debug/ for a debug binary).
pub fn build_deb(bin: &Path, debug: bool) -> Result<PathBuf> {
    let mut out = workspace_root().join("target/debian");
    if debug {
        out.push("debug");
    }
    crate::deb::build(bin, &out)
}

/// Installs, exercises and purges the package on this machine.
pub fn check_deb(deb: &Path) -> Result<()> {
    crate::deb::check_install(deb)?;
    eprintln!("[test] debian package: ok");
    Ok(())
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
    eprintln!("[test] debian package: build from the debug binary, dpkg -i, run, dpkg -r, dpkg -P");
    check_deb(&build_deb(&bin, true)?)?;
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

/// Runs each fuzz target for `runs` inputs, installing cargo-fuzz first if needed: `resp`
/// (the RESP tokenizer shared by the eBPF programs and the agent) and `proc` (the /proc
/// readers), the latter seeded from the committed /proc fixtures.
pub fn fuzz(runs: u64) -> Result<()> {
    if command_output(Command::new("cargo").args(["fuzz", "--version"])).is_err() {
        eprintln!("[fuzz] installing cargo-fuzz");
        run_checked(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let root = workspace_root();
    let proc_corpus = proc_fuzz_seeds(&root)?;
    for (target, corpus, max_len) in [("resp", None, 4096), ("proc", Some(proc_corpus), 16384)] {
        eprintln!("[fuzz] {target}: {runs} inputs");
        let mut cmd = Command::new("cargo");
        cmd.current_dir(root.join("fuzz"))
            // The agent's library without its eBPF object: the proc target needs none.
            .env("AYA_BUILD_SKIP", "1")
            .args(["+nightly", "fuzz", "run", target]);
        if let Some(corpus) = corpus {
            cmd.arg(corpus);
        }
        run_checked(
            cmd.arg("--")
                .arg(format!("-runs={runs}"))
                .arg(format!("-max_len={max_len}")),
        )?;
    }
    Ok(())
}

/// The `proc` target's seeds: each file of each committed fixture process, prefixed with the
/// byte that makes the target put it in place (the order of its `FILES`).
fn proc_fuzz_seeds(root: &Path) -> Result<PathBuf> {
    let corpus = root.join("target/fuzz-corpus/proc");
    std::fs::create_dir_all(&corpus)?;
    let fixtures = root.join("agent/tests/fixtures/proc");
    let files = [
        "stat",
        "task/{pid}/stat",
        "cmdline",
        "status",
        "net/tcp",
        "net/tcp6",
        "maps",
    ];
    for entry in std::fs::read_dir(&fixtures)? {
        let dir = entry?.path();
        let Some(pid) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            continue;
        };
        for (which, name) in files.iter().enumerate() {
            let Ok(content) = std::fs::read(dir.join(name.replace("{pid}", &pid))) else {
                continue;
            };
            let mut seed = vec![which as u8];
            seed.extend(content);
            std::fs::write(corpus.join(format!("fixture-{pid}-{which}")), seed)?;
        }
    }
    Ok(corpus)
}
