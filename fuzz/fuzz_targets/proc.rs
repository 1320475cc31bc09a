//! Fuzzes the agent's /proc readers, the other parser that reads bytes it does not control
//! (a process may write anything into its own title, and /proc files of other kernels
//! differ). The first input byte chooses which file of a fixture process is replaced by the
//! rest of the input: stat, a thread's stat, cmdline, status, net/tcp, net/tcp6 or maps.
//! Every reader over that tree must return a value or an error, never panic; the seeds are
//! the committed fixtures (see `cargo xtask fuzz`).
#![no_main]

use std::{os::unix::fs::symlink, path::PathBuf, sync::OnceLock};

use fanout::{
    privileges::Capabilities,
    proc_reader::{parse_proc_net_tcp, ProcRoot},
    redis::binary::{load_bias, BinaryId},
};
use libfuzzer_sys::fuzz_target;

const PID: u32 = 100;

/// The files the first byte chooses from, with the fixture's content as their default.
const FILES: [(&str, &[u8]); 7] = [
    ("stat", include_bytes!("../../agent/tests/fixtures/proc/100/stat")),
    ("task/100/stat", include_bytes!("../../agent/tests/fixtures/proc/100/task/100/stat")),
    ("cmdline", include_bytes!("../../agent/tests/fixtures/proc/100/cmdline")),
    ("status", b"Name:\tredis-server\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\n"),
    ("net/tcp", include_bytes!("../../agent/tests/fixtures/proc/100/net/tcp")),
    ("net/tcp6", include_bytes!("../../agent/tests/fixtures/proc/100/net/tcp6")),
    ("maps", b"55b7a5a00000-55b7a5a3c000 r--p 00000000 08:01 1234 /usr/bin/redis-server\n55b7a5a3c000-55b7a5b5c000 r-xp 0003c000 08:01 1234 /usr/bin/redis-server\n"),
];

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
        for (fd, inode) in [(3, 27001), (4, 27002), (5, 4242)] {
            let _ = symlink(format!("socket:[{inode}]"), process.join("fd").join(fd.to_string()));
        }
        dir
    })
}

fuzz_target!(|input: &[u8]| {
    let Some((&which, content)) = input.split_first() else {
        return;
    };
    let which = which as usize % FILES.len();
    let dir = root();
    let process = dir.join(PID.to_string());
    for (i, (name, default)) in FILES.iter().enumerate() {
        let bytes = if i == which { content } else { default };
        std::fs::write(process.join(name), bytes).unwrap();
    }

    let proc = ProcRoot::new(dir);
    let _ = proc.process_info(PID);
    let _ = proc.thread_samples(PID);
    let _ = proc.cmdline(PID);
    let _ = proc.start_time(PID);
    let _ = proc.listening_sockets(PID);
    let _ = proc.socket_peers(PID);

    let text = String::from_utf8_lossy(content);
    match FILES[which].0 {
        "status" => {
            let _ = Capabilities::from_status(&text);
        }
        "net/tcp" | "net/tcp6" => {
            let _ = parse_proc_net_tcp(&text);
        }
        "maps" => {
            let id = BinaryId { dev: 0x801, ino: 1234 };
            let _ = load_bias(&text, id, 0);
            let _ = load_bias(&text, id, 0x3c000);
        }
        _ => {}
    }
});
