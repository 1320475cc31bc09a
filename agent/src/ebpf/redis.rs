//! The Redis-side uprobes: attaching them once per binary (every process running that binary
//! is then covered, and attributed by tgid in the kernel), and reading their maps.

use std::collections::{BTreeMap, BTreeSet, HashMap as StdHashMap};

use agent_common::{
    maps, programs,
    redis::{
        point, BlockedClient, BlockedKey, DurationHistogram, KeyHistogram, PhaseTime, RedisHistKey,
        RedisProcess,
    },
    sched::Log2Histogram,
};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuHashMap},
    programs::uprobe::{UProbeAttachLocation, UProbeLinkId, UProbeScope},
    Ebpf,
};

use super::{attach_uprobe, detach_uprobe, load_programs, log_probe_site, take_map, ProbeError};
use crate::redis::binary::{BinaryId, RedisBinary};

/// One uprobe program and the exported functions it attaches to.
pub struct UprobeSpec {
    pub program: &'static str,
    /// The probe point it belongs to (the `probe` label of `fanout.probe.points`).
    pub point: &'static str,
    /// Every one of these the binary exports gets the program.
    pub symbols: &'static [&'static str],
    /// Used when the binary exports none of `symbols`.
    pub fallback: Option<&'static str>,
    /// Only for the bookkeeping-time measurement (return probes, opt-in).
    pub bookkeeping: bool,
}

impl UprobeSpec {
    const fn one(
        program: &'static str,
        symbol: &'static [&'static str; 1],
        bookkeeping: bool,
    ) -> Self {
        UprobeSpec {
            program,
            point: symbol[0],
            symbols: symbol,
            fallback: None,
            bookkeeping,
        }
    }

    /// The functions of `binary` this program goes on; empty when it has none of them.
    pub fn targets(&self, binary: &RedisBinary) -> Vec<&'static str> {
        let present: Vec<&'static str> = self
            .symbols
            .iter()
            .copied()
            .filter(|s| binary.has(s))
            .collect();
        if present.is_empty() {
            self.fallback
                .filter(|s| binary.has(s))
                .into_iter()
                .collect()
        } else {
            present
        }
    }
}

/// The serving window's point. A write serves the clients blocked on its key inside one of
/// [`SERVE_FUNCTIONS`], which Redis calls only for a key somebody waits on. Builds that do not
/// export them get `handleClientsBlockedOnKeys`, which also works but is called on every
/// event-loop iteration by 7.0's `beforeSleep`, so there ordinary traffic pays two probe hits
/// per iteration. (`serveClientsBlockedOnKeyByModule` is left out: module-blocked clients are
/// unblocked later, outside any window, and count as `other` either way.)
pub const SERVING_POINT: &str = "serveClientsBlockedOnKey";
pub const SERVE_FUNCTIONS: &[&str] = &[
    "serveClientsBlockedOnListKey",
    "serveClientsBlockedOnSortedSetKey",
    "serveClientsBlockedOnStreamKey",
];
pub const SERVING_FALLBACK: &str = "handleClientsBlockedOnKeys";

const fn serving(program: &'static str) -> UprobeSpec {
    UprobeSpec {
        program,
        point: SERVING_POINT,
        symbols: SERVE_FUNCTIONS,
        fallback: Some(SERVING_FALLBACK),
        bookkeeping: false,
    }
}

/// Probe points as data: each entry program and, where it times a phase, its return program.
pub const REDIS_UPROBES: [UprobeSpec; 7] = [
    UprobeSpec::one(programs::REDIS_BLOCK_FOR_KEYS, &["blockForKeys"], false),
    UprobeSpec::one(
        programs::REDIS_BLOCK_FOR_KEYS_RETURN,
        &["blockForKeys"],
        true,
    ),
    UprobeSpec::one(programs::REDIS_UNBLOCK_CLIENT, &["unblockClient"], false),
    UprobeSpec::one(
        programs::REDIS_UNBLOCK_CLIENT_RETURN,
        &["unblockClient"],
        true,
    ),
    UprobeSpec::one(
        programs::REDIS_REPLY_TIMED_OUT,
        &["replyToBlockedClientTimedOut"],
        false,
    ),
    serving(programs::REDIS_SERVING),
    serving(programs::REDIS_SERVING_RETURN),
];

/// The probe points in the order the hit counters index them.
pub const POINT_SYMBOLS: [(&str, u32); 4] = [
    ("blockForKeys", point::BLOCK_FOR_KEYS),
    ("unblockClient", point::UNBLOCK_CLIENT),
    ("replyToBlockedClientTimedOut", point::REPLY_TIMED_OUT),
    (SERVING_POINT, point::SERVING_WINDOW),
];

/// The state of one probe point in one binary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PointState {
    /// Attached (entry and, where used, return probe).
    Attached,
    /// The function is not exported by this binary.
    Missing,
    /// The kernel refused the attachment.
    AttachFailed(String),
}

impl PointState {
    pub fn label(&self) -> &'static str {
        match self {
            PointState::Attached => "attached",
            PointState::Missing => "missing",
            PointState::AttachFailed(_) => "attach_failed",
        }
    }
}

struct Attachment {
    links: Vec<(&'static str, UProbeLinkId)>,
    points: BTreeMap<&'static str, PointState>,
    users: BTreeSet<u32>,
}

/// What the kernel holds for one Redis process.
#[derive(Clone, Debug, Default)]
pub struct RedisReadings {
    /// Fan-out per raw btype.
    pub keys: BTreeMap<u32, KeyHistogram>,
    /// Blocking time per (raw btype, outcome).
    pub durations: BTreeMap<(u32, u32), DurationHistogram>,
    /// Bookkeeping per phase.
    pub bookkeeping: BTreeMap<u32, PhaseTime>,
    /// Hits per probe point (indexed by `point::*`).
    pub hits: [u64; point::COUNT],
    pub blocked_clients: u64,
    pub registrations: u64,
}

pub struct RedisMaps {
    procs: HashMap<MapData, u32, RedisProcess>,
    blocked: HashMap<MapData, BlockedKey, BlockedClient>,
    keys: PerCpuHashMap<MapData, RedisHistKey, KeyHistogram>,
    durations: PerCpuHashMap<MapData, RedisHistKey, DurationHistogram>,
    bookkeeping: PerCpuHashMap<MapData, RedisHistKey, PhaseTime>,
    hits: PerCpuHashMap<MapData, u64, u64>,
    clock: Array<MapData, i64>,
    attachments: StdHashMap<BinaryId, Attachment>,
    /// Why the uprobe programs could not be loaded, if they could not.
    load_error: Option<String>,
    /// Attach the return probes that time registration and unregistration.
    pub bookkeeping_time: bool,
}

impl RedisMaps {
    pub fn new(ebpf: &mut Ebpf) -> Result<Self, ProbeError> {
        let load_error = load_programs(ebpf, REDIS_UPROBES.iter().map(|spec| spec.program));
        Ok(Self {
            procs: take_map(ebpf, maps::REDIS_PROCS)?,
            blocked: take_map(ebpf, maps::BLOCKED_CLIENTS)?,
            keys: take_map(ebpf, maps::REDIS_KEYS_HISTS)?,
            durations: take_map(ebpf, maps::REDIS_DURATION_HISTS)?,
            bookkeeping: take_map(ebpf, maps::REDIS_BOOKKEEPING)?,
            hits: take_map(ebpf, maps::REDIS_PROBE_HITS)?,
            clock: take_map(ebpf, maps::CLOCK_OFFSET)?,
            attachments: StdHashMap::new(),
            load_error,
            bookkeeping_time: true,
        })
    }

    /// Attaches the uprobes to `binary` unless another process already brought them, and
    /// starts attributing hits in process `pid`. Returns the state of each probe point.
    pub fn attach(
        &mut self,
        ebpf: &mut Ebpf,
        pid: u32,
        binary: &RedisBinary,
        process: RedisProcess,
    ) -> BTreeMap<&'static str, PointState> {
        if let Some(error) = &self.load_error {
            return POINT_SYMBOLS
                .iter()
                .map(|(s, _)| (*s, PointState::AttachFailed(error.clone())))
                .collect();
        }
        if !self.attachments.contains_key(&binary.id) {
            let mut links = Vec::new();
            let mut points: BTreeMap<&'static str, PointState> = BTreeMap::new();
            for spec in REDIS_UPROBES
                .iter()
                .filter(|s| self.bookkeeping_time || !s.bookkeeping)
            {
                let targets = spec.targets(binary);
                if targets.is_empty() {
                    points.insert(spec.point, PointState::Missing);
                    continue;
                }
                // A split function's body is probed as well as its wrapper: callers in the same
                // file call the body directly (see `probe_site::FunctionSites`).
                let locations = targets.into_iter().flat_map(|symbol| {
                    let site = binary.site(symbol);
                    let body = binary.split_body(symbol).map(|body| {
                        (
                            symbol,
                            body.site,
                            UProbeAttachLocation::AbsoluteOffset(
                                body.file_offset + body.site.offset,
                            ),
                        )
                    });
                    std::iter::once((
                        symbol,
                        site,
                        UProbeAttachLocation::SymbolOffset(symbol, site.offset),
                    ))
                    .chain(body)
                });
                for (symbol, site, location) in locations {
                    let result = attach_uprobe(
                        ebpf,
                        spec.program,
                        location,
                        &binary.path,
                        UProbeScope::AllProcesses,
                    );
                    if !points.contains_key(spec.point) {
                        log_probe_site(symbol, site, &binary.path);
                    }
                    match result {
                        Ok(link) => {
                            links.push((spec.program, link));
                            points.entry(spec.point).or_insert(PointState::Attached);
                        }
                        Err(e) => {
                            points.insert(
                                spec.point,
                                PointState::AttachFailed(format!("{symbol}: {e}")),
                            );
                        }
                    }
                }
            }
            self.attachments.insert(
                binary.id,
                Attachment {
                    links,
                    points,
                    users: BTreeSet::new(),
                },
            );
        }
        let attachment = self
            .attachments
            .get_mut(&binary.id)
            .expect("inserted above");
        attachment.users.insert(pid);
        if let Err(e) = self.procs.insert(pid, process, 0) {
            tracing::warn!(pid, error = %e, "cannot register Redis process for blocking probes");
        }
        attachment.points.clone()
    }

    /// Stops attributing to `pid`, frees its kernel state, and detaches from the binary when
    /// no tracked process runs it any more.
    pub fn release(&mut self, ebpf: &mut Ebpf, pid: u32, binary: BinaryId) {
        let _ = self.procs.remove(&pid);
        let stale: Vec<BlockedKey> = self
            .blocked
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.tgid == pid)
            .collect();
        for k in stale {
            let _ = self.blocked.remove(&k);
        }
        for map in [
            &mut self.keys as &mut dyn RemoveByTgid,
            &mut self.durations,
            &mut self.bookkeeping,
        ] {
            map.remove_tgid(pid);
        }
        for p in 0..point::COUNT as u64 {
            let _ = self.hits.remove(&(((pid as u64) << 32) | p));
        }
        let Some(attachment) = self.attachments.get_mut(&binary) else {
            return;
        };
        attachment.users.remove(&pid);
        if attachment.users.is_empty() {
            let attachment = self.attachments.remove(&binary).expect("present");
            for (program, link) in attachment.links {
                detach_uprobe(ebpf, program, link);
            }
        }
    }

    /// Keeps the kernel's monotonic-to-Unix-time offset current (timeouts are Unix ms).
    pub fn set_clock_offset(&mut self, offset_ns: i64) {
        let _ = self.clock.set(0, offset_ns, 0);
    }

    /// Reads everything the kernel holds, per tgid.
    pub fn read(&self) -> BTreeMap<u32, RedisReadings> {
        let mut out: BTreeMap<u32, RedisReadings> = BTreeMap::new();
        for (key, per_cpu) in self.keys.iter().filter_map(Result::ok) {
            let entry = out
                .entry(key.tgid)
                .or_default()
                .keys
                .entry(key.btype)
                .or_insert(KeyHistogram::ZERO);
            per_cpu.iter().for_each(|v| entry.merge(v));
        }
        for (key, per_cpu) in self.durations.iter().filter_map(Result::ok) {
            let entry = out
                .entry(key.tgid)
                .or_default()
                .durations
                .entry((key.btype, key.kind))
                .or_insert(Log2Histogram::ZERO);
            per_cpu.iter().for_each(|v| entry.merge(v));
        }
        for (key, per_cpu) in self.bookkeeping.iter().filter_map(Result::ok) {
            let entry = out
                .entry(key.tgid)
                .or_default()
                .bookkeeping
                .entry(key.kind)
                .or_default();
            for v in per_cpu.iter() {
                entry.total_ns += v.total_ns;
                entry.calls += v.calls;
            }
        }
        for (key, per_cpu) in self.hits.iter().filter_map(Result::ok) {
            let (tgid, p) = ((key >> 32) as u32, (key & 0xffff_ffff) as usize);
            if p < point::COUNT {
                out.entry(tgid).or_default().hits[p] += per_cpu.iter().sum::<u64>();
            }
        }
        for (key, client) in self.blocked.iter().filter_map(Result::ok) {
            let r = out.entry(key.tgid).or_default();
            r.blocked_clients += 1;
            r.registrations += client.numkeys as u64;
        }
        out
    }
}

trait RemoveByTgid {
    fn remove_tgid(&mut self, tgid: u32);
}

impl<V: aya::Pod> RemoveByTgid for PerCpuHashMap<MapData, RedisHistKey, V> {
    fn remove_tgid(&mut self, tgid: u32) {
        let stale: Vec<RedisHistKey> = self
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.tgid == tgid)
            .collect();
        for k in stale {
            let _ = self.remove(&k);
        }
    }
}

/// CLOCK_REALTIME minus CLOCK_MONOTONIC, in ns.
pub fn clock_offset_ns() -> i64 {
    let read = |clock| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid pointer to a timespec.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec as i64 * 1_000_000_000 + ts.tv_nsec as i64
    };
    read(libc::CLOCK_REALTIME) - read(libc::CLOCK_MONOTONIC)
}
