//! The Redis-side uprobes: attaching them once per binary (every process running that binary
//! is then covered, and attributed by tgid in the kernel), and reading their maps.

use std::collections::{BTreeMap, BTreeSet, HashMap as StdHashMap};

use agent_common::{
    maps, programs,
    redis::{
        point, DurationHistogram, KeyHistogram, KeysCost, PhaseTime, RedisProcState, RedisProcess,
        BTYPE_SLOTS, KEY_BUCKETS, OUTCOMES,
    },
};
use aya::{
    maps::{Array, HashMap, MapData},
    programs::uprobe::{UProbeAttachLocation, UProbeLinkId, UProbeScope},
    Ebpf,
};

use super::{
    attach_uprobe, blocked_clients::BlockedClients, detach_uprobes_in_background, load_programs,
    log_probe_site, take_map, ProbeError,
};
use crate::redis::{
    binary::{BinaryId, RedisBinary},
    unblock_paths::UnblockCoverage,
};

/// One uprobe program and the exported functions it attaches to.
pub struct UprobeSpec {
    pub program: &'static str,
    /// The probe point it belongs to (the `probe` label of `fanout.probe.points`).
    pub point: &'static str,
    /// Every one of these the binary exports gets the program.
    pub symbols: &'static [&'static str],
    /// Used when the binary exports none of `symbols`.
    pub fallback: Option<&'static str>,
    /// The program for the compiler's copy of the function, where the binary has one (see
    /// `unblock_paths`).
    pub on_clone: Option<&'static str>,
    /// Only for the bookkeeping-time measurement (return probes, opt-in).
    pub bookkeeping: bool,
    /// Whether `binary` needs this program at all.
    pub needed: fn(&RedisBinary) -> bool,
    /// The file offsets of the calls to the symbol, probed instead of its entry where the
    /// binary lists them.
    pub at_calls: Option<fn(&RedisBinary) -> Option<&[u64]>>,
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
            on_clone: None,
            bookkeeping,
            needed: |_| true,
            at_calls: None,
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
/// unblocked later, outside any window, and count as `other` either way.) 7.2+ needs no
/// window: `unblockClient`'s own argument says whether a key woke the client.
pub const SERVING_POINT: &str = "serveClientsBlockedOnKey";
pub const SERVE_FUNCTIONS: &[&str] = &[
    "serveClientsBlockedOnListKey",
    "serveClientsBlockedOnSortedSetKey",
    "serveClientsBlockedOnStreamKey",
];
pub const SERVING_FALLBACK: &str = "handleClientsBlockedOnKeys";
pub const UNBLOCK_POINT: &str = "unblockClient";

const fn serving(program: &'static str) -> UprobeSpec {
    UprobeSpec {
        program,
        point: SERVING_POINT,
        symbols: SERVE_FUNCTIONS,
        fallback: Some(SERVING_FALLBACK),
        on_clone: None,
        bookkeeping: false,
        needed: RedisBinary::uses_serving_window,
        at_calls: None,
    }
}

const fn unblock(program: &'static str, on_clone: &'static str, bookkeeping: bool) -> UprobeSpec {
    UprobeSpec {
        program,
        point: UNBLOCK_POINT,
        symbols: &[UNBLOCK_POINT],
        fallback: None,
        on_clone: Some(on_clone),
        bookkeeping,
        needed: |_| true,
        at_calls: None,
    }
}

/// Probe points as data: each entry program and, where it times a phase, its return program.
pub const REDIS_UPROBES: [UprobeSpec; 8] = [
    UprobeSpec::one(programs::REDIS_BLOCK_FOR_KEYS, &["blockForKeys"], false),
    // Part of the same point: blocks whose blockForKeys the compiler inlined (7.2+ LTO).
    UprobeSpec {
        program: programs::REDIS_BLOCK_CLIENT,
        point: "blockForKeys",
        symbols: &["blockClient"],
        fallback: None,
        on_clone: None,
        bookkeeping: false,
        needed: RedisBinary::catches_inlined_blocks,
        at_calls: Some(|binary| binary.block_client_calls.as_deref()),
    },
    UprobeSpec::one(
        programs::REDIS_BLOCK_FOR_KEYS_RETURN,
        &["blockForKeys"],
        true,
    ),
    unblock(
        programs::REDIS_UNBLOCK_CLIENT,
        programs::REDIS_UNBLOCK_CLIENT_REQUEUE,
        false,
    ),
    unblock(
        programs::REDIS_UNBLOCK_CLIENT_RETURN,
        programs::REDIS_UNBLOCK_CLIENT_RETURN,
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

/// Every program a Redis binary may get (the specs' programs and the clone's).
pub fn all_programs() -> impl Iterator<Item = &'static str> {
    REDIS_UPROBES
        .iter()
        .flat_map(|spec| std::iter::once(spec.program).chain(spec.on_clone))
}

/// The probe points in the order the hit counters index them.
pub const POINT_SYMBOLS: [(&str, u32); 4] = [
    ("blockForKeys", point::BLOCK_FOR_KEYS),
    (UNBLOCK_POINT, point::UNBLOCK_CLIENT),
    ("replyToBlockedClientTimedOut", point::REPLY_TIMED_OUT),
    (SERVING_POINT, point::SERVING_WINDOW),
];

/// Whether `point` is used for `binary`: the serving window only where nothing else tells
/// served pops (see `RedisBinary::uses_serving_window`).
pub fn point_used(point: &str, binary: &RedisBinary) -> bool {
    point != SERVING_POINT || binary.uses_serving_window()
}

/// One uprobe to attach: which program, where, and for which point.
pub(super) struct Placement {
    pub program: &'static str,
    pub point: &'static str,
    /// What the log calls it.
    pub function: String,
    pub site: crate::probe_site::ProbeSite,
    pub location: Location,
}

pub(super) enum Location {
    Symbol(&'static str, u64),
    FileOffset(u64),
}

impl Location {
    fn for_aya(&self) -> UProbeAttachLocation<'static> {
        match *self {
            Location::Symbol(symbol, offset) => UProbeAttachLocation::SymbolOffset(symbol, offset),
            Location::FileOffset(offset) => UProbeAttachLocation::AbsoluteOffset(offset),
        }
    }
}

/// Where every probe goes in `binary`, and the points that have nowhere to go.
pub(super) fn placements(
    binary: &RedisBinary,
    bookkeeping_time: bool,
) -> (Vec<Placement>, BTreeMap<&'static str, PointState>) {
    let mut out = Vec::new();
    let mut missing = BTreeMap::new();
    for spec in REDIS_UPROBES
        .iter()
        .filter(|s| bookkeeping_time || !s.bookkeeping)
        .filter(|s| point_used(s.point, binary) && (s.needed)(binary))
    {
        let targets = spec.targets(binary);
        if targets.is_empty() {
            missing.insert(spec.point, PointState::Missing);
            continue;
        }
        for symbol in targets {
            if let Some(calls) = spec.at_calls.and_then(|calls| calls(binary)) {
                // Each call instruction is itself the site: `call` and `jmp` are emulated.
                out.extend(calls.iter().map(|&offset| Placement {
                    program: spec.program,
                    point: spec.point,
                    function: format!("call to {symbol} at file offset {offset:#x}"),
                    site: crate::probe_site::ProbeSite {
                        offset: 0,
                        emulated: true,
                    },
                    location: Location::FileOffset(offset),
                }));
                continue;
            }
            let site = binary.site(symbol);
            out.push(Placement {
                program: spec.program,
                point: spec.point,
                function: symbol.to_string(),
                site,
                location: Location::Symbol(symbol, site.offset),
            });
            // A split function's body is probed as well as its wrapper: callers in the same
            // file call the body directly (see `probe_site::FunctionSites`).
            if let Some(body) = binary.split_body(symbol) {
                out.push(Placement {
                    program: spec.program,
                    point: spec.point,
                    function: format!("{symbol} (split body)"),
                    site: body.site,
                    location: Location::FileOffset(body.file_offset + body.site.offset),
                });
            }
        }
        if let (Some(program), UnblockCoverage::Clone { file_offset, .. }) =
            (spec.on_clone, &binary.unblock)
        {
            out.push(Placement {
                program,
                point: spec.point,
                function: format!("{UNBLOCK_POINT} (compiler's copy)"),
                // Its first instruction is the same `push %rbp` as the original's.
                site: crate::probe_site::ProbeSite::ENTRY,
                location: Location::FileOffset(*file_offset),
            });
        }
    }
    (out, missing)
}

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

/// A binary's probes attached one perf-event uprobe at a time (where uprobe-multi links are
/// refused; the links are otherwise the attaching thread's, see `redis_attach`).
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
    /// Bookkeeping by fan-out bucket (`KeyHistogram::bucket_index`).
    pub bookkeeping_by_keys: [KeysCost; KEY_BUCKETS],
    /// Hits per probe point (indexed by `point::*`).
    pub hits: [u64; point::COUNT],
    pub blocked_clients: u64,
    pub registrations: u64,
}

pub struct RedisMaps {
    procs: HashMap<MapData, u32, RedisProcState>,
    blocked: BlockedClients,
    clock: Array<MapData, i64>,
    /// Per tgid: the (btype, outcome) duration histograms exported so far. A histogram whose
    /// only count was taken back (a woken client that blocked again) stays exported, at zero.
    exported_durations: StdHashMap<u32, BTreeSet<(u32, u32)>>,
    attachments: StdHashMap<BinaryId, Attachment>,
    /// Per tgid: blocked clients removed by [`RedisMaps::sweep`], that is unblocks no
    /// probe saw. Counted as missed unblocks.
    unseen_unblocks: StdHashMap<u32, u64>,
    /// Why the uprobe programs could not be loaded, if they could not.
    load_error: Option<String>,
    /// Attach the return probes that time registration and unregistration.
    pub bookkeeping_time: bool,
    /// Whether the probes can tell a bookkeeping phase in which Redis's main thread was
    /// switched out: the object was loaded with the offset of the kernel's count of a
    /// thread's arrivals on a CPU. Otherwise every phase keeps its wall time.
    pub sees_switches: bool,
}

impl RedisMaps {
    pub fn new(ebpf: &mut Ebpf) -> Result<Self, ProbeError> {
        let load_error = load_programs(ebpf, all_programs());
        Ok(Self {
            procs: take_map(ebpf, maps::REDIS_PROCS)?,
            blocked: BlockedClients::new(ebpf)?,
            clock: take_map(ebpf, maps::CLOCK_OFFSET)?,
            exported_durations: StdHashMap::new(),
            attachments: StdHashMap::new(),
            unseen_unblocks: StdHashMap::new(),
            load_error,
            bookkeeping_time: true,
            sees_switches: false,
        })
    }

    /// Attaches the uprobes to `binary` one perf-event uprobe per site, unless another
    /// process already brought them, for process `pid`: the fallback where uprobe-multi links
    /// are refused. Returns the state of each probe point.
    pub fn attach_per_uprobe(
        &mut self,
        ebpf: &mut Ebpf,
        pid: u32,
        binary: &RedisBinary,
    ) -> BTreeMap<&'static str, PointState> {
        if let Some(error) = &self.load_error {
            return POINT_SYMBOLS
                .iter()
                .filter(|(s, _)| point_used(s, binary))
                .map(|(s, _)| (*s, PointState::AttachFailed(error.clone())))
                .collect();
        }
        if !self.attachments.contains_key(&binary.id) {
            let mut links = Vec::new();
            let (placements, mut points) = placements(binary, self.bookkeeping_time);
            for placement in placements {
                let result = attach_uprobe(
                    ebpf,
                    placement.program,
                    placement.location.for_aya(),
                    &binary.path,
                    UProbeScope::AllProcesses,
                );
                if !points.contains_key(placement.point) {
                    log_probe_site(&placement.function, placement.site, &binary.path);
                }
                match result {
                    Ok(link) => {
                        links.push((placement.program, link));
                        points
                            .entry(placement.point)
                            .or_insert(PointState::Attached);
                    }
                    Err(e) => {
                        points.insert(
                            placement.point,
                            PointState::AttachFailed(format!("{}: {e}", placement.function)),
                        );
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
        attachment.points.clone()
    }

    /// Starts attributing hits in process `pid` to it, with its settings.
    pub fn register(&mut self, pid: u32, process: RedisProcess) {
        if let Err(e) = self.procs.insert(pid, RedisProcState::new(process), 0) {
            tracing::warn!(pid, error = %e, "cannot register Redis process for blocking probes");
        }
    }

    /// Stops attributing to `pid`, frees its kernel state, and detaches per-uprobe probes
    /// from the binary when no tracked process runs it any more.
    pub fn release(&mut self, ebpf: &mut Ebpf, pid: u32, binary: Option<BinaryId>) {
        let _ = self.procs.remove(&pid);
        self.blocked.release(pid);
        self.exported_durations.remove(&pid);
        self.unseen_unblocks.remove(&pid);
        let Some(attachment) = binary.and_then(|b| self.attachments.get_mut(&b)) else {
            return;
        };
        attachment.users.remove(&pid);
        if attachment.users.is_empty() {
            let binary = binary.expect("found above");
            let attachment = self.attachments.remove(&binary).expect("present");
            // Each uprobe waits for an RCU grace period as it goes: off the agent's loop.
            detach_uprobes_in_background(ebpf, attachment.links);
        }
    }

    /// Removes the blocked-client entries that no block needs any more
    /// ([`BlockedClients::sweep`]), and returns how many it removed as missed unblocks (each
    /// counted as one of its process).
    pub fn sweep(&mut self, now_unix_ms: i64, now_mono_ns: u64) -> u64 {
        let missed = self.blocked.sweep(now_unix_ms, now_mono_ns);
        for tgid in &missed {
            *self.unseen_unblocks.entry(*tgid).or_default() += 1;
        }
        missed.len() as u64
    }

    /// Keeps the kernel's monotonic-to-Unix-time offset current (timeouts are Unix ms).
    pub fn set_clock_offset(&mut self, offset_ns: i64) {
        let _ = self.clock.set(0, offset_ns, 0);
    }

    /// Reads everything the kernel holds, per tgid.
    pub fn read(&mut self) -> BTreeMap<u32, RedisReadings> {
        let mut out: BTreeMap<u32, RedisReadings> = BTreeMap::new();
        for (tgid, state) in self.procs.iter().filter_map(Result::ok) {
            let r = out.entry(tgid).or_default();
            let exported = self.exported_durations.entry(tgid).or_default();
            for slot in 0..BTYPE_SLOTS {
                let btype = slot as u32;
                if state.keys[slot].count != 0 {
                    r.keys.insert(btype, state.keys[slot]);
                }
                for kind in 0..OUTCOMES {
                    let h = &state.durations[slot][kind];
                    let key = (btype, kind as u32);
                    if h.count != 0 || exported.contains(&key) {
                        exported.insert(key);
                        r.durations.insert(key, *h);
                    }
                }
            }
            for which in 0..2u32 {
                r.bookkeeping
                    .insert(which, state.bookkeeping[which as usize]);
            }
            r.hits = state.hits;
            r.bookkeeping_by_keys = state.bookkeeping_by_keys;
        }
        for (key, client) in self.blocked.entries() {
            if !client.is_blocked() {
                continue;
            }
            let r = out.entry(key.tgid).or_default();
            r.blocked_clients += 1;
            r.registrations += client.numkeys as u64;
        }
        for (tgid, unseen) in &self.unseen_unblocks {
            out.entry(*tgid).or_default().hits[point::MISSED_UNBLOCK as usize] += unseen;
        }
        out
    }
}

/// CLOCK_REALTIME minus CLOCK_MONOTONIC, in ns.
pub fn clock_offset_ns() -> i64 {
    clock_ns(libc::CLOCK_REALTIME) - clock_ns(libc::CLOCK_MONOTONIC)
}

/// CLOCK_MONOTONIC in ns: the clock of the probes' `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC) as u64
}

fn clock_ns(clock: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i64 * 1_000_000_000 + ts.tv_nsec as i64
}
