//! What a redis-server binary offers: its exported functions (`.dynsym`; distribution builds
//! are stripped but linked with `-rdynamic`) and, from them, which layout of the blocking code
//! it has (see ../shared/REDIS-INTERNALS.md).

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use object::{Object, ObjectSymbol};

use super::{
    block_calls, machine_code,
    unblock_paths::{self, BstateAt, UnblockCoverage},
};
use crate::probe_site::{self, FunctionSites, ProbeSite};

/// Layouts of the blocking code that matter to the probes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// 6.0 / 6.2: `blockForKeys(c, btype, keys, numkeys, timeout, ...)`.
    Redis6,
    /// 7.0: `blockForKeys(c, btype, keys, numkeys, count, timeout, ...)`; BLMPOP exists.
    Redis70,
    /// Redis 7.2 to 8.x and Valkey 7.2: `blockForKeys(c, btype, keys, numkeys, timeout,
    /// unblock_on_nokey)`, `unblockClientOnTimeout` exists, WAITAOF shifted the block types.
    /// Built with LTO by default, so `unblockClient` and `blockForKeys` may be bypassed.
    Redis72Plus,
    /// Valkey 8+: the 7.2 code, but WAIT and WAITAOF are one block type again (the block
    /// types are numbered as in 7.0), told by `blockClientForReplicaAck`.
    Valkey8Plus,
}

impl Family {
    /// Index of `blockForKeys`'s timeout argument.
    pub fn timeout_arg(self) -> u32 {
        match self {
            Family::Redis70 => 5,
            Family::Redis6 | Family::Redis72Plus | Family::Valkey8Plus => 4,
        }
    }

    /// Whether WAITAOF shifted the block types (one more before module, stream and zset).
    fn waitaof_numbering(self) -> bool {
        self == Family::Redis72Plus
    }

    /// The `redis.block.type` of a raw `btype`, or `None` for blocking that is not on keys.
    pub fn block_type(self, btype: u32) -> Option<&'static str> {
        let shift = self.waitaof_numbering() as u32;
        match btype {
            1 => Some("list"),
            b if b == 3 + shift => Some("module"),
            b if b == 4 + shift => Some("stream"),
            b if b == 5 + shift => Some("zset"),
            _ => None,
        }
    }

    /// How this layout tells that a key woke a client (an `agent_common::redis::served_by`).
    pub fn served_by(self) -> u32 {
        use agent_common::redis::served_by;
        match self {
            Family::Redis6 | Family::Redis70 => served_by::SERVING_WINDOW,
            Family::Redis72Plus | Family::Valkey8Plus => served_by::REPROCESS_ARGUMENT,
        }
    }

    /// Whether the serving window is probed (the serve functions, or their fallback).
    pub fn uses_serving_window(self) -> bool {
        self.served_by() == agent_common::redis::served_by::SERVING_WINDOW
    }

    /// Whether a woken client can block again in the same call (7.2+ wakes every client of
    /// a ready key and re-runs its command).
    pub fn reblocks(self) -> bool {
        matches!(self, Family::Redis72Plus | Family::Valkey8Plus)
    }

    /// Offset of `keys` in the blocking state.
    fn bstate_keys(self) -> u32 {
        match self {
            Family::Valkey8Plus => 32,
            _ => 24,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Family::Redis6 => "redis 6.x layout",
            Family::Redis70 => "redis 7.0 layout",
            Family::Redis72Plus => "redis 7.2+ layout",
            Family::Valkey8Plus => "valkey 8+ layout",
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
    /// Where `unblockClient` returns to in the serve functions (virtual addresses in the
    /// file; see `unblock_paths::serving_returns`).
    pub serving_returns: Vec<u64>,
    /// The page-aligned virtual address of the segment at file offset 0.
    pub first_load_address: Option<u64>,
    /// Where `client->bstate` is (7.2+; see `unblock_paths::bstate_offset`).
    pub bstate: Option<BstateAt>,
    /// Where the "re-processing a command" flag is: (byte offset in `struct client`, mask).
    pub reprocessing: Option<(u32, u32)>,
    /// The file offsets of the calls to `blockClient` outside `blockForKeys`, probed instead
    /// of its entry where all were found (see `block_calls`).
    pub block_client_calls: Option<Vec<u64>>,
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
    "blockClient",
    "blockClientForReplicaAck",
];

/// Decides the family from the exported symbols; `None` when `blockForKeys` is absent.
pub fn family_of(symbols: &BTreeSet<String>) -> Option<Family> {
    if !symbols.contains("blockForKeys") {
        None
    } else if symbols.contains("blockClientForReplicaAck") {
        Some(Family::Valkey8Plus)
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
        let functions = machine_code::Functions::read(&file);
        let unblock = unblock_paths::unblock_coverage(&file, &functions);
        let serving_returns = unblock_paths::serving_returns(&file, &functions);
        let first_load_address = machine_code::first_load_address(&file);
        let bstate = unblock_paths::bstate_offset(&file, &functions);
        let reprocessing = unblock_paths::reprocessing_flag(&file, &functions);
        let mut binary = Self {
            path: path.to_path_buf(),
            id: BinaryId {
                dev: meta.dev(),
                ino: meta.ino(),
            },
            symbols,
            family,
            sites,
            unblock,
            serving_returns,
            first_load_address,
            bstate,
            reprocessing,
            block_client_calls: None,
        };
        // Read only where blockClient is probed at all (the whole text is decoded).
        if binary.catches_inlined_blocks() {
            binary.block_client_calls = block_calls::block_client_calls(&file, &functions);
        }
        Ok(binary)
    }

    pub fn has(&self, symbol: &str) -> bool {
        self.symbols.contains(symbol)
    }

    /// How this binary tells that a key woke a client: the layout's way, except that the
    /// serve functions' return addresses replace the serving window where they were found
    /// (and fit the kernel's slots).
    pub fn served_by(&self) -> Option<u32> {
        use agent_common::redis::{served_by, MAX_SERVING_RETURNS};
        let family = self.family?;
        Some(
            if family.uses_serving_window()
                && !self.serving_returns.is_empty()
                && self.serving_returns.len() <= MAX_SERVING_RETURNS
                && self.first_load_address.is_some()
            {
                served_by::RETURN_ADDRESS
            } else {
                family.served_by()
            },
        )
    }

    /// Whether `blockClient` is probed, for the blocks the compiler inlined `blockForKeys`
    /// into: 7.2+ (whose `blockingState` and `dict` layouts the kernel side reads), where the
    /// `bstate` offset was found.
    pub fn catches_inlined_blocks(&self) -> bool {
        self.family.is_some_and(Family::reblocks) && self.bstate.is_some()
    }

    /// Whether the serving window is probed: where the layout needs it and the return
    /// addresses do not replace it, or where the layout is unknown (so that its absence is
    /// reported).
    pub fn uses_serving_window(&self) -> bool {
        self.served_by()
            .is_none_or(|s| s == agent_common::redis::served_by::SERVING_WINDOW)
    }

    /// The kernel-side settings for process `pid` running this binary. `load_bias` is where
    /// the process mapped it (see `load_bias`); needed with `served_by::RETURN_ADDRESS`.
    pub fn process_settings(
        &self,
        load_bias: Option<u64>,
    ) -> Result<agent_common::redis::RedisProcess, String> {
        use agent_common::redis::served_by;
        let Some(family) = self.family else {
            // Without blockForKeys nothing fires; the settings do not matter.
            return Ok(Default::default());
        };
        let mut settings = agent_common::redis::RedisProcess {
            timeout_arg: family.timeout_arg(),
            served_by: self.served_by().unwrap_or(family.served_by()),
            serving_returns: [0; agent_common::redis::MAX_SERVING_RETURNS],
            ..Default::default()
        };
        if let (true, Some((offset, mask))) = (family.reblocks(), self.reprocessing) {
            settings.reprocessing_offset = offset;
            settings.reprocessing_mask = mask;
        }
        if let (true, Some(bstate)) = (self.catches_inlined_blocks(), self.bstate) {
            let (offset, pointer) = match bstate {
                BstateAt::Embedded(o) => (o, false),
                BstateAt::Pointer(o) => (o, true),
            };
            settings.bstate_offset = offset;
            settings.bstate_is_pointer = pointer as u32;
            settings.bstate_keys = family.bstate_keys();
            settings.key_btypes = (1..8)
                .filter(|b| family.block_type(*b).is_some_and(|t| t != "module"))
                .fold(0, |mask, b| mask | 1 << b);
            settings.block_client_at_calls = u32::from(self.block_client_calls.is_some());
        }
        if settings.served_by == served_by::RETURN_ADDRESS {
            let bias = load_bias.ok_or_else(|| {
                "where the process mapped its binary is unknown, so served pops cannot be told"
                    .to_string()
            })?;
            for (slot, vaddr) in settings
                .serving_returns
                .iter_mut()
                .zip(&self.serving_returns)
            {
                *slot = bias.wrapping_add(*vaddr);
            }
        }
        Ok(settings)
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

/// Where process `pid` mapped the binary `id`: the start of its mapping at file offset 0 in
/// `maps` (the text of /proc/<pid>/maps, parsed by procfs line by line) minus that segment's
/// virtual address.
pub fn load_bias(maps: &str, id: BinaryId, first_load_address: u64) -> Option<u64> {
    crate::proc_reader::maps::memory_maps(maps.as_bytes()).find_map(|map| {
        let (major, minor) = map.dev;
        (map.offset == 0
            && map.inode == id.ino
            && libc::makedev(major as u32, minor as u32) == id.dev)
            .then(|| map.address.0.wrapping_sub(first_load_address))
    })
}

/// The port a Redis says it serves: from its process title (`redis-server 127.0.0.1:6379`,
/// `redis-server *:6380 [cluster]`) or, before it has set one, from a `--port N` argument.
/// Only a hint: the title can be anything (`proc-title-template`), and the port in use comes
/// from the listening sockets (`proc_reader::net::service_address`).
pub fn port_from_title(cmdline: &[String]) -> Option<u16> {
    let title = cmdline.join(" ");
    let words: Vec<&str> = title.split_whitespace().collect();
    words
        .iter()
        .find_map(|word| {
            word.rsplit_once(':')
                // `host:port`, not a bare IPv6 address such as `::1`.
                .filter(|(host, _)| !host.is_empty() && !host.ends_with(':'))
                .and_then(|(_, port)| port.parse().ok())
        })
        .or_else(|| {
            words
                .windows(2)
                .find(|w| w[0] == "--port")
                .and_then(|w| w[1].parse().ok())
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
        assert!(!Family::Redis70.reblocks() && Family::Redis72Plus.reblocks());
        assert_eq!(Family::Valkey8Plus.block_type(4), Some("stream"));
        assert_eq!(Family::Valkey8Plus.block_type(5), Some("zset"));
        assert_eq!(Family::Valkey8Plus.block_type(3), Some("module"));
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
        let args = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
        assert_eq!(
            port_from_title(&args("/usr/bin/redis-server --bind ::1 --port 7001")),
            Some(7001)
        );
        assert_eq!(port_from_title(&args("redis-server /etc/redis.conf")), None);
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

    #[test]
    fn load_bias_comes_from_the_mapping_at_file_offset_zero_of_that_binary() {
        let maps = "\
55d0c0a00000-55d0c0a8f000 r--p 00000000 fe:01 1234 /usr/bin/redis-check-rdb
55d0c0a8f000-55d0c0c9a000 r-xp 0008f000 fe:01 1234 /usr/bin/redis-check-rdb
7f0000000000-7f0000028000 r--p 00000000 fe:01 999 /usr/lib/x86_64-linux-gnu/libc.so.6
";
        let id = BinaryId {
            dev: libc::makedev(0xfe, 0x01),
            ino: 1234,
        };
        assert_eq!(load_bias(maps, id, 0), Some(0x55d0c0a00000));
        // A non-PIE binary mapped where its segment says: no bias.
        let fixed = "00400000-00452000 r--p 00000000 fe:01 1234 /opt/redis-server\n";
        assert_eq!(load_bias(fixed, id, 0x400000), Some(0));
        let other = BinaryId {
            dev: id.dev,
            ino: 1,
        };
        assert_eq!(load_bias(maps, other, 0), None);
        assert_eq!(load_bias("garbage\n\n", id, 0), None);
    }
}
