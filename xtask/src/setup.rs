//! `cargo xtask setup`: the checked recipe of ../shared/TOOLCHAIN.md, made idempotent.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::util::{command_output, is_root, run_checked, workspace_root};

/// The bpf-linker release this project is checked with.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the tests and demo use (real Redis, Sidekiq, Prometheus) and the tools
/// used to look at what happens (bpftool, perf, strace), and gcc with a static libc for a test
/// worker that has no libc.so to probe.
const DEBIAN_PACKAGES: &[&str] = &[
    "redis-server",
    "redis-tools",
    "ruby-sidekiq",
    "prometheus",
    "bpftool",
    "strace",
    "python3",
    "python3-venv",
    "util-linux",
    "systemd",
    "fonts-dejavu-core",
    "gcc",
    "libc6-dev",
];
/// Python tools for the deployment checks, pinned, in a venv under target/.
const PYTHON_TOOLS: &[&str] = &["kubernetes-validate==1.37.0"];

fn step(message: &str) {
    eprintln!("[setup] {message}");
}

pub fn setup() -> Result<()> {
    nightly_rust_src()?;
    bpf_linker()?;
    debian_packages()?;
    python_tools()?;
    tracefs();
    step("done");
    Ok(())
}

fn nightly_sysroot() -> Result<PathBuf> {
    let sysroot = command_output(Command::new("rustc").args(["+nightly", "--print", "sysroot"])).context(
        "the nightly Rust toolchain is needed to build eBPF programs; install it with `rustup toolchain install nightly --profile minimal`",
    )?;
    Ok(PathBuf::from(sysroot.trim()))
}

fn nightly_rust_src() -> Result<()> {
    let sysroot = match nightly_sysroot() {
        Ok(s) => s,
        Err(_) => {
            step("nightly toolchain missing: rustup toolchain install nightly --profile minimal");
            run_checked(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]))?;
            nightly_sysroot()?
        }
    };
    let library = sysroot.join("lib/rustlib/src/rust/library");
    if library.join("core").is_dir() {
        step("rust-src for nightly: present");
        return Ok(());
    }
    step("rust-src for nightly: rustup component add rust-src --toolchain nightly");
    if run_checked(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
    .is_ok()
        && library.join("core").is_dir()
    {
        return Ok(());
    }
    // The shared folder carries the same component for the machine's nightly, for when the
    // download is refused.
    let version = command_output(Command::new("rustc").args(["+nightly", "--version"]))?;
    let tarball =
        workspace_root().join("../shared/toolchain/rust-src-1.97.0-nightly-2026-05-19.tar.xz");
    if version.contains("e50aa6fba") && tarball.is_file() {
        step(&format!(
            "rust-src download refused; unpacking {}",
            tarball.display()
        ));
        run_checked(
            Command::new("tar")
                .arg("-xJf")
                .arg(&tarball)
                .arg("-C")
                .arg(sysroot.join("lib/rustlib")),
        )?;
        if library.join("core").is_dir() {
            return Ok(());
        }
    }
    bail!("rust-src for the nightly toolchain could not be installed: run `rustup component add rust-src --toolchain nightly` where the Rust distribution server is reachable")
}

fn bpf_linker() -> Result<()> {
    let installed = command_output(Command::new("bpf-linker").arg("--version")).ok();
    if let Some(v) = &installed {
        if v.contains(BPF_LINKER_VERSION) {
            step(&format!("bpf-linker {BPF_LINKER_VERSION}: present"));
            return Ok(());
        }
        step(&format!(
            "bpf-linker is {}, want {BPF_LINKER_VERSION}: reinstalling",
            v.trim()
        ));
    }
    // Built against the nightly toolchain's own libLLVM, so no system LLVM is needed.
    let syslib = nightly_sysroot()?.join("lib");
    let llvm = std::fs::read_dir(&syslib)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find(|n| n.starts_with("libLLVM-") && n.ends_with(".so"))
        .with_context(|| {
            format!(
                "no libLLVM-*.so in {}: is the nightly toolchain complete?",
                syslib.display()
            )
        })?;
    let llvm_lib = llvm
        .trim_start_matches("lib")
        .trim_end_matches(".so")
        .to_string();
    let major = llvm_lib
        .trim_start_matches("LLVM-")
        .split(['-', '.'])
        .next()
        .unwrap_or_default()
        .to_string();
    step(&format!(
        "bpf-linker {BPF_LINKER_VERSION}: building against {llvm_lib} (about a minute)"
    ));
    let rustflags = format!(
        "-L {} -l dylib={llvm_lib} -C link-arg=-Wl,-rpath,{}",
        syslib.display(),
        syslib.display()
    );
    run_checked(
        Command::new("cargo")
            .args([
                "+nightly",
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{major},no-llvm-linking"))
            .env("RUSTFLAGS", rustflags),
    )
    .context("building bpf-linker failed; see TOOLCHAIN.md")?;
    Ok(())
}

fn debian_packages() -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            command_output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .map(|s| !s.contains("install ok installed"))
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        step("Debian packages: present");
        return Ok(());
    }
    if !is_root() {
        bail!("missing Debian packages {missing:?}; install them as root: apt-get update && apt-get install -y {}", missing.join(" "));
    }
    step(&format!(
        "Debian packages: apt-get install {}",
        missing.join(" ")
    ));
    run_checked(Command::new("apt-get").args(["update", "-q"]))?;
    run_checked(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    // Debian starts a redis-server and a prometheus on install; the tests start their own on
    // other ports, and these would only add noise to measurements.
    for service in ["redis-server", "prometheus", "prometheus-node-exporter"] {
        let _ = Command::new("systemctl")
            .args(["disable", "--now", service])
            .output();
    }
    Ok(())
}

fn python_tools() -> Result<()> {
    let venv = crate::checks::tools_venv();
    let marker = venv.join(".fanout-tools");
    let wanted = PYTHON_TOOLS.join("\n");
    if std::fs::read_to_string(&marker).is_ok_and(|have| have == wanted) {
        step("Python tools (kubernetes-validate): present");
        return Ok(());
    }
    step(&format!(
        "Python tools: python3 -m venv {} && pip install {}",
        venv.display(),
        PYTHON_TOOLS.join(" ")
    ));
    run_checked(
        Command::new("/usr/bin/python3")
            .args(["-m", "venv"])
            .arg(&venv),
    )?;
    run_checked(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet"])
            .args(PYTHON_TOOLS),
    )?;
    std::fs::write(marker, wanted)?;
    Ok(())
}

fn tracefs() {
    if std::path::Path::new("/sys/kernel/tracing/events").exists() {
        step("tracefs: mounted");
    } else if is_root() {
        let ok = Command::new("mount")
            .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
            .status()
            .is_ok_and(|s| s.success());
        step(if ok {
            "tracefs: mounted at /sys/kernel/tracing"
        } else {
            "tracefs: could not mount (the agent will try again)"
        });
    } else {
        step("tracefs: not mounted (the agent mounts it when run as root)");
    }
}
