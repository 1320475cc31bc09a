//! The agent's kernel maps as bpftool sees them (Debian package bpftool, installed by setup):
//! what a test reads or writes behind the agent's back.

use std::ffi::OsStr;

/// bpftool's output for `args`; it must succeed.
pub fn bpftool<S: AsRef<OsStr>>(args: impl IntoIterator<Item = S>) -> Vec<u8> {
    let args: Vec<_> = args.into_iter().collect();
    let out = std::process::Command::new("bpftool")
        .args(&args)
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "bpftool {:?}: {}",
        args.iter().map(|a| a.as_ref()).collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The entries of a kernel map of the agent, as bpftool dumps them (each with a "key" and a
/// "value", arrays of hex bytes).
pub fn map_dump(name: &str) -> Vec<serde_json::Value> {
    serde_json::from_slice(&bpftool(["-j", "map", "dump", "name", name])).expect("bpftool's JSON")
}

/// The bytes of an entry's `field` ("key" or "value") in a [`map_dump`].
pub fn entry_bytes(entry: &serde_json::Value, field: &str) -> Vec<u8> {
    entry[field]
        .as_array()
        .unwrap_or_else(|| panic!("no {field} in {entry}"))
        .iter()
        .map(|v| {
            let hex = v.as_str().expect("a hex byte");
            u8::from_str_radix(hex.trim_start_matches("0x"), 16).expect("a hex byte")
        })
        .collect()
}

/// The little-endian `u32` at `at` in `bytes`.
pub fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// The little-endian `u64` at `at` in `bytes`.
pub fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}
