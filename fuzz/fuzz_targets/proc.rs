//! Fuzzes the agent's /proc readers, the other parser that reads bytes it does not control
//! (a process may write anything into its own title, and /proc files of other kernels
//! differ). Most of them hand the bytes to the procfs crate, which has panicked on malformed
//! input before: the agent's shape checks must keep it from doing so. The first input byte
//! chooses which file of a fixture process is replaced by the rest of the input: stat, a
//! thread's stat, cmdline, status, net/tcp, net/tcp6, maps, or the target of a socket fd's
//! link. Every reader over that tree must return a value or an error, never panic; the seeds
//! are the committed fixtures (see `cargo xtask fuzz`).
#![no_main]

use std::{
    ffi::OsStr,
    os::unix::{ffi::OsStrExt, fs::symlink},
    path::PathBuf,
    sync::OnceLock,
};

use fanout::{
    privileges::Capabilities,
    proc_reader::{net::parse_proc_net_tcp, ProcRoot},
    redis::binary::{load_bias, BinaryId},
};
use libfuzzer_sys::fuzz_target;

const PID: u32 = 100;

/// The files the first byte chooses from, with the fixture's content as their default.
const FILES: [(&str, &[u8]); 7] = [
    ("stat", include_bytes!("../../agent/tests/fixtures/proc/100/stat")),
    ("task/100/stat", include_bytes!("../../agent/tests/fixtures/proc/100/task/100/stat")),
    ("cmdline", include_bytes!("../../agent/tests/fixtures/proc/100/cmdline")),
    ("status", include_bytes!("../../agent/tests/fixtures/proc/100/status")),
    ("net/tcp", include_bytes!("../../agent/tests/fixtures/proc/100/net/tcp")),
    ("net/tcp6", include_bytes!("../../agent/tests/fixtures/proc/100/net/tcp6")),
    ("maps", include_bytes!("../../agent/tests/fixtures/proc/100/maps")),
];

/// The eighth choice (after the files, so that the seeds' first bytes keep their meaning):
/// the target of this fd's link, by default a listening socket of the fixture's net/tcp.
const LINK: (&str, &[u8]) = ("fd/6", b"socket:[1001]");

/// A fixture process tree in a temporary directory, made once per fuzzing process.
fn root() -> &'static PathBuf {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("fanout-fuzz-proc-{}", std::process::id()));
        let process = dir.join(PID.to_string());
        for sub in ["task/100", "net", "fd"] {
            std::fs::create_dir_all(process.join(sub)).unwrap();
        }
        std::fs::write(process.join("comm"), "redis-server\n").unwrap();
        for (fd, inode) in [(7, 1002), (8, 1003), (9, 1004)] {
            let _ = symlink(format!("socket:[{inode}]"), process.join("fd").join(fd.to_string()));
        }
        dir
    })
}

fuzz_target!(|input: &[u8]| {
    let Some((&which, content)) = input.split_first() else {
        return;
    };
    let which = which as usize % (FILES.len() + 1);
    let dir = root();
    let process = dir.join(PID.to_string());
    for (i, (name, default)) in FILES.iter().enumerate() {
        let bytes = if i == which { content } else { default };
        std::fs::write(process.join(name), bytes).unwrap();
    }
    // A link target is a C string of at most PATH_MAX bytes: others cannot be put in place.
    let target = if which == FILES.len() { content } else { LINK.1 };
    if target.is_empty() || target.len() >= 4096 || target.contains(&0) {
        return;
    }
    let link = process.join(LINK.0);
    let _ = std::fs::remove_file(&link);
    symlink(OsStr::from_bytes(target), &link).unwrap();

    let proc = ProcRoot::new(dir);
    let _ = proc.process_info(PID);
    let _ = proc.thread_samples(PID);
    let _ = proc.cmdline(PID);
    let _ = proc.start_time(PID);
    let _ = proc.listening_sockets(PID);
    let _ = proc.socket_peers(PID);
    // No exe in the tree: the maps are read.
    let _ = proc.libc_path(PID);

    match FILES.get(which).map(|(name, _)| *name) {
        Some("status") => {
            let _ = Capabilities::from_status(&String::from_utf8_lossy(content));
        }
        Some("net/tcp" | "net/tcp6") => {
            let _ = parse_proc_net_tcp(content);
        }
        Some("maps") => {
            let text = String::from_utf8_lossy(content);
            let id = BinaryId { dev: 0x801, ino: 1234 };
            let _ = load_bias(&text, id, 0);
            let _ = load_bias(&text, id, 0x3c000);
        }
        _ => {}
    }
});
