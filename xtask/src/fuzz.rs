//! `cargo xtask fuzz`: the fuzz targets, with cargo-fuzz installed on first use.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Result;

use crate::util::{command_output, run_checked, workspace_root};

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
