//! What a redis-server binary offers: its exported functions (`.dynsym`; distribution builds
//! are stripped but linked with `-rdynamic`) and, from them, which layout of the blocking code
//! it has (see ../shared/REDIS-INTERNALS.md).

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use object::{Object, ObjectSymbol};

use super::unblock_paths::{self, UnblockCoverage};
use crate::probe_site::{self, FunctionSites, ProbeSite};

/// Layouts of the blocking code that matter to the probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// 6.0 / 6.2: `blockForKeys(c, btype, keys, numkeys, timeout, ...)`.
    Redis6,
    /// 7.0: `blockForKeys(c, btype, keys, numkeys, count, timeout, ...)`; BLMPOP exists.
    Redis70,
    /// 7.2, 7.4 and Valkey: `blockForKeys(c, btype, keys, numkeys, timeout, unblock_on_nokey)`,
    /// `unblockClientOnTimeout` exists, WAITAOF shifted the block types. Built with LTO by
    /// default, so `unblockClient` may be bypassed (detected at run time).
    Redis72Plus,
}

impl Family {
    /// Index of `blockForKeys`'s timeout argument.
    pub fn timeout_arg(self) -> u32 {
        match self {
            Family::Redis70 => 5,
            Family::Redis6 | Family::Redis72Plus => 4,
        }
    }

    /// The `redis.block.type` of a raw `btype`, or `None` for blocking that is not on keys.
    pub fn block_type(self, btype: u32) -> Option<&'static str> {
        match (self, btype) {
            (_, 1) => Some("list"),
            (Family::Redis6 | Family::Redis70, 3) | (Family::Redis72Plus, 4) => Some("module"),
            (Family::Redis6 | Family::Redis70, 4) | (Family::Redis72Plus, 5) => Some("stream"),
            (Family::Redis6 | Family::Redis70, 5) | (Family::Redis72Plus, 6) => Some("zset"),
            _ => None,
        }
    }

    /// How this layout tells that a key woke a client (an `agent_common::redis::served_by`).
    pub fn served_by(self) -> u32 {
        use agent_common::redis::served_by;
        match self {
            Family::Redis6 | Family::Redis70 => served_by::SERVING_WINDOW,
            Family::Redis72Plus => served_by::REPROCESS_ARGUMENT,
        }
    }

    /// Whether the serving window is probed (the serve functions, or their fallback).
    pub fn uses_serving_window(self) -> bool {
        self.served_by() == agent_common::redis::served_by::SERVING_WINDOW
    }

    /// The `client->flags` bit of a woken client re-running its command, for layouts whose
    /// woken clients can block again (7.2+ wakes every client of a ready key).
    pub fn reprocessing_flag(self) -> u64 {
        match self {
            Family::Redis6 | Family::Redis70 => 0,
            Family::Redis72Plus => agent_common::redis::CLIENT_REPROCESSING_COMMAND,
        }
    }

    /// The kernel-side settings for a process of this layout.
    pub fn process_settings(self) -> agent_common::redis::RedisProcess {
        agent_common::redis::RedisProcess {
            timeout_arg: self.timeout_arg(),
            served_by: self.served_by(),
            reprocessing_flag: self.reprocessing_flag(),
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Family::Redis6 => "redis 6.x layout",
            Family::Redis70 => "redis 7.0 layout",
            Family::Redis72Plus => "redis 7.2+/valkey layout",
        }
    }
}

/// A binary as the kernel identifies it, so that one attachment serves every process running it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BinaryId {
    pub dev: u64,
    pub ino: u64,
}

#[derive(Clone, Debug)]
pub struct RedisBinary {
    /// Path the agent opens it by (through `/proc/<pid>/root`).
    pub path: PathBuf,
    pub id: BinaryId,
    /// Exported function names the probes care about.
    pub symbols: BTreeSet<String>,
    pub family: Option<Family>,
    /// Where in each probed function the probe goes (see `probe_site`).
    pub sites: BTreeMap<String, FunctionSites>,
    /// Whether unblocks bypass the exported `unblockClient` (see `unblock_paths`).
    pub unblock: UnblockCoverage,
}

#[derive(Debug, thiserror::Error)]
pub enum BinaryError {
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path} is not a readable ELF file: {message}")]
    Elf { path: PathBuf, message: String },
}

/// Every function name any probe or version check uses.
pub const INTERESTING_SYMBOLS: &[&str] = &[
    "blockForKeys",
    "unblockClient",
    "replyToBlockedClientTimedOut",
    "handleClientsBlockedOnKeys",
    "serveClientsBlockedOnListKey",
    "serveClientsBlockedOnSortedSetKey",
    "serveClientsBlockedOnStreamKey",
    "blmpopCommand",
    "unblockClientOnTimeout",
    "unblockClientOnError",
];

/// Decides the family from the exported symbols; `None` when `blockForKeys` is absent.
pub fn family_of(symbols: &BTreeSet<String>) -> Option<Family> {
    if !symbols.contains("blockForKeys") {
        None
    } else if symbols.contains("unblockClientOnTimeout") {
        Some(Family::Redis72Plus)
    } else if symbols.contains("blmpopCommand") {
        Some(Family::Redis70)
    } else {
        Some(Family::Redis6)
    }
}

impl RedisBinary {
    pub fn inspect(path: &Path) -> Result<Self, BinaryError> {
        let read = |e: std::io::Error| BinaryError::Read {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        let data = std::fs::read(path).map_err(read)?;
        let file = object::File::parse(&*data).map_err(|e| BinaryError::Elf {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        // .dynsym first (stripped builds), .symtab too when the binary has it.
        let symbols: BTreeSet<String> = file
            .dynamic_symbols()
            .chain(file.symbols())
            .filter(|s| s.is_definition())
            .filter_map(|s| s.name().ok())
            .filter(|name| INTERESTING_SYMBOLS.contains(name))
            .map(String::from)
            .collect();
        let family = family_of(&symbols);
        let sites = probe_site::sites_in(&file, INTERESTING_SYMBOLS);
        let unblock = unblock_paths::unblock_coverage(&file);
        Ok(Self {
            path: path.to_path_buf(),
            id: BinaryId {
                dev: meta.dev(),
                ino: meta.ino(),
            },
            symbols,
            family,
            sites,
            unblock,
        })
    }

    pub fn has(&self, symbol: &str) -> bool {
        self.symbols.contains(symbol)
    }

    /// Where to probe `symbol`: its entry unless a cheaper site was found.
    pub fn site(&self, symbol: &str) -> ProbeSite {
        self.sites.get(symbol).map_or(ProbeSite::ENTRY, |s| s.entry)
    }

    /// The split-off body `symbol` tail-jumps into, if it is such a wrapper.
    pub fn split_body(&self, symbol: &str) -> Option<probe_site::SplitBody> {
        self.sites.get(symbol).and_then(|s| s.split_body)
    }
}

/// The port in a Redis process title such as `redis-server 127.0.0.1:6379` or `redis-server *:6380 [cluster]`.
pub fn port_from_title(cmdline: &[String]) -> Option<u16> {
    let title = cmdline.join(" ");
    title.split_whitespace().find_map(|word| {
        word.rsplit_once(':')
            .and_then(|(_, port)| port.parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn family_follows_the_symbols_each_version_exports() {
        assert_eq!(family_of(&set(&["unblockClient"])), None);
        assert_eq!(
            family_of(&set(&["blockForKeys", "unblockClient"])),
            Some(Family::Redis6)
        );
        assert_eq!(
            family_of(&set(&["blockForKeys", "blmpopCommand"])),
            Some(Family::Redis70)
        );
        assert_eq!(
            family_of(&set(&[
                "blockForKeys",
                "blmpopCommand",
                "unblockClientOnTimeout"
            ])),
            Some(Family::Redis72Plus)
        );
    }

    #[test]
    fn timeout_argument_and_block_types_per_family() {
        assert_eq!(Family::Redis70.timeout_arg(), 5);
        assert_eq!(Family::Redis6.timeout_arg(), 4);
        assert_eq!(Family::Redis72Plus.timeout_arg(), 4);
        assert!(Family::Redis70.uses_serving_window() && Family::Redis6.uses_serving_window());
        assert!(!Family::Redis72Plus.uses_serving_window());
        assert_eq!(Family::Redis70.reprocessing_flag(), 0);
        assert_eq!(Family::Redis72Plus.reprocessing_flag(), 1 << 50);
        assert_eq!(Family::Redis70.block_type(1), Some("list"));
        assert_eq!(Family::Redis70.block_type(5), Some("zset"));
        assert_eq!(Family::Redis70.block_type(4), Some("stream"));
        assert_eq!(Family::Redis72Plus.block_type(6), Some("zset"));
        assert_eq!(
            Family::Redis72Plus.block_type(3),
            None,
            "WAITAOF is not key blocking"
        );
        assert_eq!(
            Family::Redis70.block_type(2),
            None,
            "WAIT is not key blocking"
        );
    }

    #[test]
    fn ports_from_process_titles() {
        let t = |s: &str| vec![s.to_string()];
        assert_eq!(
            port_from_title(&t("redis-server 127.0.0.1:6390")),
            Some(6390)
        );
        assert_eq!(port_from_title(&t("redis-server *:6379")), Some(6379));
        assert_eq!(
            port_from_title(&t("valkey-server [::1]:7000 [cluster]")),
            Some(7000)
        );
        assert_eq!(port_from_title(&t("redis-server unixsocket")), None);
    }

    #[test]
    fn inspects_a_real_elf_and_finds_no_redis_symbols_in_it() {
        let me = std::env::current_exe().unwrap();
        let binary = RedisBinary::inspect(&me).unwrap();
        assert_eq!(binary.family, None);
        assert!(RedisBinary::inspect(Path::new("/nonexistent")).is_err());
        let not_elf = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(not_elf.path(), b"#!/bin/sh\n").unwrap();
        assert!(matches!(
            RedisBinary::inspect(not_elf.path()),
            Err(BinaryError::Elf { .. })
        ));
    }
}
