//! The Debian package, built with Debian's own `dpkg-deb` (no cargo-deb): the binary, the
//! systemd unit, a default config kept as a conffile, man pages and shell completions that the
//! binary itself generates (`fanout man`, `fanout completions`), so they always match it.
//! `check_install` installs the package on this machine, exercises it and purges it.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, ensure, Context, Result};

use crate::util::{command_output, workspace_root};

const PACKAGE: &str = "fanout";
/// The workspace's `repository` (a unit test keeps them equal).
const HOMEPAGE: &str = "https://example.invalid/fanout";
const MAINTAINER: &str = "Fanout developers <fanout@example.invalid>";
const BIN: &str = "usr/bin/fanout";
const UNIT: &str = "lib/systemd/system/fanout.service";
const CONFFILE: &str = "etc/fanout/fanout.toml";
const MAN_DIR: &str = "usr/share/man/man1";
/// Where each shell looks for the completions of installed packages.
const COMPLETIONS: [(&str, &str); 3] = [
    ("bash", "usr/share/bash-completion/completions/fanout"),
    ("zsh", "usr/share/zsh/vendor-completions/_fanout"),
    ("fish", "usr/share/fish/vendor_completions.d/fanout.fish"),
];

const DESCRIPTION: &str = "\
eBPF agent for Redis blocking-pop fan-out and per-thread CPU
 Fanout measures, with eBPF, what blocking pops (BRPOP, BLPOP, BLMOVE, ...)
 cost the Redis or Valkey servers on a host: fan-out (keys per call), the
 main thread's bookkeeping time, and per-thread CPU and run-queue delay of
 Redis and of its workers (Sidekiq, Resque, RQ, Celery, or any process a rule
 matches), with the queues each worker group listens to.
 .
 Metrics are served to Prometheus and can be pushed over OTLP. `fanout top`
 shows them live, and `fanout advise` turns them into routing rules.
 .
 The service is installed but neither enabled nor started: edit
 /etc/fanout/fanout.toml, then run `systemctl enable --now fanout`.";

const POSTINST: &str = r#"#!/bin/sh
set -e
if [ "$1" = "configure" ]; then
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null || true
    fi
    if [ -z "$2" ]; then
        echo "fanout: the fanout service is installed but not enabled. Edit /etc/fanout/fanout.toml, then: systemctl enable --now fanout"
    elif [ -d /run/systemd/system ]; then
        # An upgrade: a running agent moves to the new binary.
        systemctl try-restart fanout.service >/dev/null || true
    fi
fi
exit 0
"#;

const PRERM: &str = r#"#!/bin/sh
set -e
if [ "$1" = "remove" ] && [ -d /run/systemd/system ]; then
    systemctl stop fanout.service >/dev/null 2>&1 || true
fi
exit 0
"#;

const POSTRM: &str = r#"#!/bin/sh
set -e
if [ "$1" = "remove" ] || [ "$1" = "purge" ]; then
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null || true
    fi
fi
if [ "$1" = "purge" ]; then
    # What `systemctl enable fanout` made; the unit itself is gone by now.
    rm -f /etc/systemd/system/multi-user.target.wants/fanout.service
    rmdir /etc/fanout 2>/dev/null || true
fi
exit 0
"#;

/// Builds `fanout_<version>_<arch>.deb` in `out_dir` from the binary `bin`, and returns its path.
pub fn build(bin: &Path, out_dir: &Path) -> Result<PathBuf> {
    let root_dir = workspace_root();
    let version = debian_version(&binary_version(bin)?);
    let arch = command_output(Command::new("dpkg").arg("--print-architecture"))?
        .trim()
        .to_string();
    fs::create_dir_all(out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    let work = tempfile::Builder::new()
        .prefix(".fanout-deb-")
        .tempdir_in(out_dir)?;
    // dpkg-shlibdeps wants a source tree: debian/control, and the package's files under
    // debian/<package>/.
    fs::create_dir(work.path().join("debian"))?;
    fs::write(
        work.path().join("debian/control"),
        format!("Source: {PACKAGE}\n\nPackage: {PACKAGE}\nArchitecture: any\n"),
    )?;
    let pkg = work.path().join("debian").join(PACKAGE);

    // The binary, stripped as dh_strip does.
    let staged_bin = pkg.join(BIN);
    fs::create_dir_all(staged_bin.parent().unwrap())?;
    crate::util::run_checked(
        Command::new("strip")
            .args([
                "--strip-unneeded",
                "--remove-section=.comment",
                "--remove-section=.note",
                "-o",
            ])
            .arg(&staged_bin)
            .arg(bin),
    )?;

    let unit = fs::read_to_string(root_dir.join("deploy/systemd/fanout.service"))?;
    write(&pkg.join(UNIT), packaged_unit(&unit)?.as_bytes())?;
    write(
        &pkg.join(CONFFILE),
        &fs::read(root_dir.join("deploy/systemd/fanout.toml"))?,
    )?;

    // Man pages and completions, from the binary.
    let man = work.path().join("man");
    let listed = command_output(Command::new(bin).arg("man").arg("--dir").arg(&man))?;
    let mut pages: Vec<PathBuf> = listed.lines().map(PathBuf::from).collect();
    pages.sort();
    ensure!(
        pages.iter().any(|p| p.ends_with("fanout.1")),
        "`fanout man` wrote no fanout.1: {listed}"
    );
    for page in &pages {
        let name = page.file_name().unwrap().to_string_lossy();
        write(
            &pkg.join(MAN_DIR).join(format!("{name}.gz")),
            &gzip(&fs::read(page)?)?,
        )?;
    }
    for (shell, path) in COMPLETIONS {
        let script = command_output(Command::new(bin).args(["completions", shell]))?;
        ensure!(
            !script.is_empty(),
            "`fanout completions {shell}` printed nothing"
        );
        write(&pkg.join(path), script.as_bytes())?;
    }
    // Dates from the last commit (or SOURCE_DATE_EPOCH), so that a rebuild of the same commit
    // gives the same package.
    let epoch = source_date_epoch(&root_dir)?;
    let date = |format: &str| {
        command_output(Command::new("date").env("LC_ALL", "C").args([
            "-u",
            "-d",
            &format!("@{epoch}"),
            format,
        ]))
        .map(|d| d.trim().to_string())
    };
    write(
        &pkg.join("usr/share/doc/fanout/copyright"),
        copyright(&date("+%Y")?).as_bytes(),
    )?;
    write(
        &pkg.join("usr/share/doc/fanout/changelog.gz"),
        &gzip(changelog(&version, &date("-R")?).as_bytes())?,
    )?;
    write(
        &pkg.join("usr/share/doc/fanout/README.md.gz"),
        &gzip(&fs::read(root_dir.join("README.md"))?)?,
    )?;

    // Control files.
    let depends = shlib_depends(work.path())?;
    let control = pkg.join("DEBIAN");
    let installed_kib = installed_size_kib(&pkg)?;
    write(
        &control.join("control"),
        control_text(&version, &arch, &depends, installed_kib).as_bytes(),
    )?;
    write(
        &control.join("conffiles"),
        format!("/{CONFFILE}\n").as_bytes(),
    )?;
    write(&control.join("md5sums"), md5sums(&pkg)?.as_bytes())?;
    for (name, script) in [("postinst", POSTINST), ("prerm", PRERM), ("postrm", POSTRM)] {
        let path = control.join(name);
        write(&path, script.as_bytes())?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
    }
    fs::set_permissions(&staged_bin, fs::Permissions::from_mode(0o755))?;
    set_dir_modes(&pkg)?;

    let deb = out_dir.join(format!("{PACKAGE}_{version}_{arch}.deb"));
    crate::util::run_checked(
        Command::new("dpkg-deb")
            .args(["--build", "--root-owner-group"])
            .env("SOURCE_DATE_EPOCH", epoch.to_string())
            .arg(&pkg)
            .arg(&deb)
            .stdout(Stdio::null()),
    )?;
    Ok(deb)
}

/// `fanout 0.1.0` -> `0.1.0`.
fn binary_version(bin: &Path) -> Result<String> {
    let out = command_output(Command::new(bin).arg("--version"))?;
    parse_version(&out).with_context(|| format!("{} --version said {out:?}", bin.display()))
}

fn parse_version(out: &str) -> Option<String> {
    let version = out.trim().strip_prefix("fanout ")?;
    (!version.is_empty() && !version.contains(char::is_whitespace)).then(|| version.to_string())
}

/// A Cargo version as a Debian one: a pre-release sorts before its release (`~`), and build
/// metadata goes after `+`, which Debian allows as it is.
fn debian_version(cargo: &str) -> String {
    match cargo.split_once('-') {
        Some((release, pre)) => format!("{release}~{pre}"),
        None => cargo.to_string(),
    }
}

/// The repository's unit as installed by the package: the binary in /usr/bin, the manual
/// install's header replaced, and the man pages as its documentation. Everything else (the
/// capability bounds and hardening) is kept as it is.
fn packaged_unit(unit: &str) -> Result<String> {
    const MANUAL_BIN: &str = "/usr/local/bin/fanout";
    ensure!(
        unit.lines()
            .any(|l| l.starts_with(&format!("ExecStart={MANUAL_BIN} "))),
        "deploy/systemd/fanout.service has no `ExecStart={MANUAL_BIN} ...` line to rewrite"
    );
    let mut out = String::from(
        "# Fanout, installed by its Debian package, with the same capability bounds as the\n\
         # Kubernetes DaemonSet. Configure /etc/fanout/fanout.toml, then:\n\
         #   systemctl enable --now fanout\n\
         # Local changes belong in `systemctl edit fanout`: this file is replaced on upgrade.\n",
    );
    for line in unit.lines().skip_while(|l| l.starts_with('#')) {
        if line.starts_with("Documentation=") {
            out.push_str("Documentation=man:fanout(1) man:fanout-run(1)\n");
        } else {
            out.push_str(&line.replace(MANUAL_BIN, "/usr/bin/fanout"));
            out.push('\n');
        }
    }
    Ok(out)
}

fn control_text(version: &str, arch: &str, depends: &str, installed_kib: u64) -> String {
    format!(
        "Package: {PACKAGE}\n\
         Version: {version}\n\
         Architecture: {arch}\n\
         Maintainer: {MAINTAINER}\n\
         Installed-Size: {installed_kib}\n\
         Depends: {depends}\n\
         Section: admin\n\
         Priority: optional\n\
         Homepage: {HOMEPAGE}\n\
         Description: {DESCRIPTION}\n"
    )
}

/// SOURCE_DATE_EPOCH if set, else the last commit's time, else now.
fn source_date_epoch(root: &Path) -> Result<u64> {
    if let Some(epoch) = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|e| e.parse().ok())
    {
        return Ok(epoch);
    }
    let commit =
        command_output(
            Command::new("git")
                .current_dir(root)
                .args(["log", "-1", "--format=%ct"]),
        );
    match commit.ok().and_then(|c| c.trim().parse().ok()) {
        Some(epoch) => Ok(epoch),
        None => Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs()),
    }
}

/// usr/share/doc/fanout/changelog: a native package's, one entry for this version (the
/// project's history is its git log).
fn changelog(version: &str, rfc2822_date: &str) -> String {
    format!(
        "{PACKAGE} ({version}) unstable; urgency=medium\n\
         \n  \
         * Built from the Fanout repository: its history is the project's git log.\n\
         \n \
         -- {MAINTAINER}  {rfc2822_date}\n"
    )
}

fn copyright(year: &str) -> String {
    format!(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
         Upstream-Name: {PACKAGE}\n\
         Source: {HOMEPAGE}\n\
         \n\
         Files: *\n\
         Copyright: {year} Fanout developers\n\
         License: Apache-2.0\n \
         On Debian systems, the full text of the Apache License, Version 2.0 can be\n \
         found in /usr/share/common-licenses/Apache-2.0.\n"
    )
}

/// The shared libraries' packages the binary needs, as `dpkg-shlibdeps` finds them from the
/// libraries' symbols files (e.g. `libc6 (>= 2.34), libgcc-s1 (>= 4.2)`).
fn shlib_depends(work: &Path) -> Result<String> {
    let out = command_output(
        Command::new("dpkg-shlibdeps")
            .current_dir(work)
            .args(["-O", "-e"])
            .arg(Path::new("debian").join(PACKAGE).join(BIN)),
    )
    .context("dpkg-shlibdeps (from dpkg-dev: apt-get install dpkg-dev)")?;
    out.lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .map(str::to_string)
        .filter(|d| d.contains("libc6"))
        .with_context(|| format!("dpkg-shlibdeps found no libc6 dependency: {out:?}"))
}

/// `gzip -9n`: best compression, no name or timestamp (reproducible).
fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write as _;
    let mut child = Command::new("gzip")
        .arg("-9n")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("gzip")?;
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output()?;
    writer.join().expect("gzip writer")?;
    ensure!(out.status.success(), "gzip failed with {}", out.status);
    Ok(out.stdout)
}

/// Writes a file with mode 0644, creating its directories.
fn write(path: &Path, data: &[u8]) -> Result<()> {
    fs::create_dir_all(path.parent().unwrap())?;
    fs::write(path, data).with_context(|| format!("write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))?;
    Ok(())
}

/// Every file under `dir` (not DEBIAN/), relative to it, sorted.
fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            if rel == Path::new("DEBIAN") {
                continue;
            }
            if path.is_dir() {
                walk(root, &path, out)?;
            } else {
                out.push(rel);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

fn set_dir_modes(dir: &Path) -> Result<()> {
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            set_dir_modes(&path)?;
        }
    }
    Ok(())
}

/// As dpkg-gencontrol counts it: each file's size rounded up to KiB, plus 1 per directory.
fn installed_size_kib(pkg: &Path) -> Result<u64> {
    let files = files(pkg)?;
    let mut dirs = std::collections::BTreeSet::new();
    let mut kib = 0;
    for f in &files {
        kib += fs::metadata(pkg.join(f))?.len().div_ceil(1024);
        dirs.extend(f.ancestors().skip(1).filter(|a| !a.as_os_str().is_empty()));
    }
    Ok(kib + dirs.len() as u64)
}

/// DEBIAN/md5sums for every file but the conffile (dpkg keeps its own hash of those).
fn md5sums(pkg: &Path) -> Result<String> {
    let files: Vec<PathBuf> = files(pkg)?
        .into_iter()
        .filter(|f| f != Path::new(CONFFILE))
        .collect();
    command_output(Command::new("md5sum").current_dir(pkg).args(&files))
}

/// `dpkg-query`'s status of the package: None when dpkg knows nothing of it.
fn package_status() -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", PACKAGE])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let status = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !status.is_empty() && !status.ends_with("not-installed"))
        .then_some(status)
}

/// Purges the package when dropped, so that a failed check leaves nothing installed.
struct PurgeGuard;

impl Drop for PurgeGuard {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .args(["--purge", PACKAGE])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn dpkg(args: &[&str], deb: Option<&Path>) -> Result<String> {
    let mut cmd = Command::new("dpkg");
    cmd.args(args)
        .args(deb)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null());
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(out.status.success(), "{cmd:?} failed: {}", said.trim());
    Ok(said)
}

/// Installs the package with `dpkg -i` on this machine (root), runs the installed binary, checks
/// the files it put in place, removes it (the conffile stays) and purges it (nothing stays).
/// The package is purged even when a check fails. Refuses to run if a `fanout` package or
/// files of a manual install are already there.
pub fn check_install(deb: &Path) -> Result<()> {
    ensure!(crate::util::is_root(), "installing the package needs root");
    if let Some(status) = package_status() {
        bail!(
            "a {PACKAGE} package is already on this machine ({status}); the check installs and \
             purges its own, so remove that one first (dpkg --purge {PACKAGE})"
        );
    }
    for path in [BIN, UNIT, "etc/fanout"] {
        let path = Path::new("/").join(path);
        ensure!(
            !path.exists(),
            "{} exists but belongs to no package (a manual install?); the check would \
             overwrite and then purge it, so move it away first",
            path.display()
        );
    }
    let expected = command_output(
        Command::new("dpkg-deb")
            .arg("--field")
            .arg(deb)
            .arg("Version"),
    )?
    .trim()
    .to_string();
    let guard = PurgeGuard;

    let said = dpkg(&["--install"], Some(deb))?;
    ensure!(
        said.contains("systemctl enable --now fanout"),
        "postinst did not say how to enable the service: {said}"
    );
    ensure!(
        package_status().as_deref() == Some("install ok installed"),
        "after dpkg -i: {:?}",
        package_status()
    );
    let bin = Path::new("/").join(BIN);
    let version = binary_version(&bin)?;
    ensure!(
        debian_version(&version) == expected,
        "/{BIN} --version says {version}, the package is {expected}"
    );
    let probes = Command::new(&bin).arg("check-probes").output()?;
    ensure!(
        probes.status.success(),
        "/{BIN} check-probes failed ({}): {}{}",
        probes.status,
        String::from_utf8_lossy(&probes.stdout),
        String::from_utf8_lossy(&probes.stderr)
    );

    // The man pages, rendered by man itself.
    for page in ["fanout", "fanout-run", "fanout-check-probes"] {
        let path = Path::new("/").join(MAN_DIR).join(format!("{page}.1.gz"));
        let text = command_output(
            Command::new("man")
                .args(["-P", "cat", "-l"])
                .arg(&path)
                .env("LANG", "C")
                .env("MANWIDTH", "100"),
        )?;
        ensure!(
            text.contains(page) && text.contains("SYNOPSIS"),
            "man -l {}: {text}",
            path.display()
        );
    }
    let text = command_output(
        Command::new("man")
            .args(["-P", "cat", "fanout"])
            .env("LANG", "C"),
    )?;
    ensure!(text.contains("fanout-run(1)"), "man fanout: {text}");

    // Completions: bash parses and registers them; the others are in place.
    let bash = Path::new("/").join(COMPLETIONS[0].1);
    let registered = command_output(
        Command::new("bash")
            .arg("-c")
            .arg(r#"bash -n "$1" && source "$1" && complete -p fanout"#)
            .arg("bash")
            .arg(&bash),
    )?;
    ensure!(
        registered.contains("-F _fanout fanout"),
        "{} registers no completion: {registered}",
        bash.display()
    );
    for (_, path) in &COMPLETIONS[1..] {
        let path = Path::new("/").join(path);
        ensure!(path.is_file(), "{} missing", path.display());
    }

    // The unit, as systemd reads it (its man pages must now resolve too).
    let unit = Path::new("/").join(UNIT);
    let text = fs::read_to_string(&unit)?;
    ensure!(
        text.contains("ExecStart=/usr/bin/fanout run --config /etc/fanout/fanout.toml"),
        "{}: {text}",
        unit.display()
    );
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .context("systemd-analyze")?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    ensure!(
        verify.status.success() && said.trim().is_empty(),
        "systemd-analyze verify {}: {said}",
        unit.display()
    );

    // The conffile: registered, then edited as an admin would.
    let conffile = Path::new("/").join(CONFFILE);
    let conffiles =
        command_output(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", PACKAGE]))?;
    ensure!(
        conffiles.contains(&format!("/{CONFFILE} ")),
        "{} is not a conffile: {conffiles:?}",
        conffile.display()
    );
    let mut edited = fs::read_to_string(&conffile)?;
    edited.push_str("# edited by the package check\n");
    fs::write(&conffile, &edited)?;

    // Remove: the files go, the edited conffile stays.
    dpkg(&["--remove", PACKAGE], None)?;
    ensure!(
        package_status().as_deref() == Some("deinstall ok config-files"),
        "after dpkg -r: {:?}",
        package_status()
    );
    for path in [
        BIN,
        UNIT,
        "usr/share/man/man1/fanout.1.gz",
        COMPLETIONS[0].1,
    ] {
        let path = Path::new("/").join(path);
        ensure!(!path.exists(), "{} left after dpkg -r", path.display());
    }
    ensure!(
        fs::read_to_string(&conffile).ok().as_deref() == Some(edited.as_str()),
        "{} not kept as edited by dpkg -r",
        conffile.display()
    );

    // Purge: nothing left.
    dpkg(&["--purge", PACKAGE], None)?;
    ensure!(
        !Path::new("/etc/fanout").exists(),
        "/etc/fanout left after dpkg -P"
    );
    let status = Command::new("dpkg")
        .args(["-s", PACKAGE])
        .stdin(Stdio::null())
        .output()?;
    let said = String::from_utf8_lossy(&status.stderr);
    ensure!(
        !status.status.success() && said.contains("is not installed"),
        "after dpkg -P, dpkg -s {PACKAGE}: {}{said}",
        String::from_utf8_lossy(&status.stdout)
    );
    drop(guard);
    Ok(())
}

/// Packages `bin` as a .deb: under target/debian/ (target/debian/debug/ for a debug binary).
pub fn build_in_target(bin: &Path, debug: bool) -> Result<PathBuf> {
    let mut out = crate::util::workspace_root().join("target/debian");
    if debug {
        out.push("debug");
    }
    build(bin, &out)
}

/// Installs, exercises and purges the package on this machine.
pub fn check(deb: &Path) -> Result<()> {
    check_install(deb)?;
    eprintln!("[test] debian package: ok");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo_unit() -> String {
        fs::read_to_string(workspace_root().join("deploy/systemd/fanout.service")).unwrap()
    }

    #[test]
    fn packaged_unit_runs_usr_bin_and_keeps_the_hardening() {
        let repo = repo_unit();
        let unit = packaged_unit(&repo).unwrap();
        assert!(
            unit.contains("\nExecStart=/usr/bin/fanout run --config /etc/fanout/fanout.toml\n"),
            "{unit}"
        );
        assert!(!unit.contains("/usr/local/bin"), "{unit}");
        assert!(unit.contains("\nDocumentation=man:fanout(1) man:fanout-run(1)\n"));
        assert!(unit.starts_with("# Fanout, installed by its Debian package"));
        // Every setting other than ExecStart and Documentation is the repository's, in order.
        let settings = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|l| {
                    !l.starts_with('#')
                        && !l.starts_with("ExecStart=")
                        && !l.starts_with("Documentation=")
                })
                .map(str::to_string)
                .collect()
        };
        assert_eq!(settings(&unit), settings(&repo));
        for hardening in [
            "CapabilityBoundingSet=",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "MemoryMax=",
        ] {
            assert!(unit.contains(hardening), "{hardening} lost");
        }
    }

    #[test]
    fn packaged_unit_refuses_a_unit_without_the_expected_exec_start() {
        let unit = repo_unit().replace("ExecStart=/usr/local/bin/fanout", "ExecStart=/opt/fanout");
        assert!(packaged_unit(&unit).is_err());
    }

    #[test]
    fn control_file() {
        let text = control_text(
            "0.1.0",
            "amd64",
            "libc6 (>= 2.34), libgcc-s1 (>= 4.2)",
            4321,
        );
        let fields: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with(' '))
            .map(|l| l.split_once(": ").unwrap().0)
            .collect();
        assert_eq!(
            fields,
            [
                "Package",
                "Version",
                "Architecture",
                "Maintainer",
                "Installed-Size",
                "Depends",
                "Section",
                "Priority",
                "Homepage",
                "Description"
            ]
        );
        assert!(text.starts_with("Package: fanout\nVersion: 0.1.0\nArchitecture: amd64\n"));
        assert!(text.contains("\nInstalled-Size: 4321\n"));
        assert!(text.contains("\nDepends: libc6 (>= 2.34), libgcc-s1 (>= 4.2)\n"));
        assert!(text.contains("\nSection: admin\nPriority: optional\n"));
        assert!(text.ends_with(".\n") && !text.ends_with("\n\n"));
        // The synopsis is one short line; the long text's lines start with a space, short
        // enough for dpkg -s and apt show, blank lines as " .".
        let description: Vec<&str> = text
            .split("Description: ")
            .nth(1)
            .unwrap()
            .lines()
            .collect();
        assert!(description[0].len() <= 80 && !description[0].ends_with('.'));
        for line in &description[1..] {
            assert!(
                line.starts_with(' ') && line.len() <= 80 && line.trim() != "",
                "{line:?}"
            );
        }
    }

    #[test]
    fn versions() {
        assert_eq!(parse_version("fanout 0.1.0\n").as_deref(), Some("0.1.0"));
        assert_eq!(parse_version("other 0.1.0"), None);
        assert_eq!(parse_version("fanout \n"), None);
        assert_eq!(debian_version("0.1.0"), "0.1.0");
        assert_eq!(debian_version("1.2.0-rc.1"), "1.2.0~rc.1");
    }

    #[test]
    fn homepage_and_license_are_the_workspace_ones() {
        let manifest = fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
        assert!(manifest.contains(&format!("repository = \"{HOMEPAGE}\"")));
        assert!(manifest.contains("license = \"Apache-2.0\""));
        assert!(copyright("2026")
            .contains("\nCopyright: 2026 Fanout developers\nLicense: Apache-2.0\n"));
    }

    #[test]
    fn changelog_entry() {
        assert_eq!(
            changelog("0.1.0", "Mon, 30 Nov 2026 05:37:36 +0000"),
            "fanout (0.1.0) unstable; urgency=medium\n\
             \n  \
             * Built from the Fanout repository: its history is the project's git log.\n\
             \n \
             -- Fanout developers <fanout@example.invalid>  Mon, 30 Nov 2026 05:37:36 +0000\n"
        );
    }

    #[test]
    fn maintainer_scripts_are_plain_sh_that_parses() {
        for script in [POSTINST, PRERM, POSTRM] {
            assert!(script.starts_with("#!/bin/sh\nset -e\n"));
            let status = Command::new("sh")
                .args(["-n", "-c", script])
                .status()
                .unwrap();
            assert!(status.success(), "{script}");
        }
        // Installing never enables or starts the service.
        assert!(
            !POSTINST.contains("enable --now fanout.service")
                && !POSTINST.contains("systemctl start")
        );
    }
}
