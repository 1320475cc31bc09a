//! Blocking pops observed inside redis-server (uprobes on its exported functions; see
//! ../shared/REDIS-INTERNALS.md). Only blocking paths are probed: nothing here runs for
//! ordinary commands.
//!
//! - `blockForKeys(c, btype, keys, numkeys, ...)`: a call blocks. Records fan-out, starts the
//!   clock, and times the registration (with its return probe).
//! - `replyToBlockedClientTimedOut(c)`: a timeout reply, or CLIENT UNBLOCK before the deadline.
//! - The serving window, in which a write serves the clients blocked on its key:
//!   `serveClientsBlockedOn{List,SortedSet,Stream}Key()`, called only for a key someone waits
//!   on, or, on builds that do not export them, `handleClientsBlockedOnKeys()` (which 7.0's
//!   `beforeSleep` calls on every event-loop iteration, so it costs ordinary traffic too).
//! - `unblockClient(c)`: the block ends; the outcome follows from the above. Its return probe
//!   times the unregistration. In 7.2+ its second argument says whether a key woke the client
//!   (`served_by::REPROCESS_ARGUMENT`), so those builds need no serving window. LTO builds of
//!   7.4 send most unblocks to a compiler-made clone of it, which the agent finds in the
//!   machine code and probes with `redis_unblock_client_requeue` (its argument is folded in).

use agent_common::redis::{
    flags, outcome, phase, point, served_by, BlockedClient, BlockedKey, DurationHistogram,
    KeyHistogram, PhaseTime, RedisHistKey, RedisProcess, WokenClient, CLIENT_FLAGS_OFFSET,
    MAX_BLOCKED_CLIENTS, MAX_REDIS_HISTOGRAMS, MAX_REDIS_PROCESSES, REBLOCK_WINDOW_NS,
};
use agent_common::sched::ProbeCounter;
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{map, uprobe, uretprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuHashMap},
    programs::{ProbeContext, RetProbeContext},
};

use crate::counters::bump;

/// `BPF_NOEXIST`: create a map entry only if the key is absent.
const BPF_NOEXIST: u64 = 1;

#[map]
static REDIS_PROCS: HashMap<u32, RedisProcess> = HashMap::with_max_entries(MAX_REDIS_PROCESSES, 0);

#[map]
static BLOCKED_CLIENTS: LruHashMap<BlockedKey, BlockedClient> =
    LruHashMap::with_max_entries(MAX_BLOCKED_CLIENTS, 0);

#[map]
static REDIS_KEYS_HISTS: PerCpuHashMap<RedisHistKey, KeyHistogram> =
    PerCpuHashMap::with_max_entries(MAX_REDIS_HISTOGRAMS, 0);

#[map]
static REDIS_DUR_HISTS: PerCpuHashMap<RedisHistKey, DurationHistogram> =
    PerCpuHashMap::with_max_entries(MAX_REDIS_HISTOGRAMS, 0);

#[map]
static REDIS_BOOKKEEPING: PerCpuHashMap<RedisHistKey, PhaseTime> =
    PerCpuHashMap::with_max_entries(MAX_REDIS_HISTOGRAMS, 0);

#[map]
static REDIS_PROBE_HITS: PerCpuHashMap<u64, u64> =
    PerCpuHashMap::with_max_entries(MAX_REDIS_PROCESSES * point::COUNT as u32, 0);

#[map]
static CLOCK_OFFSET: Array<i64> = Array::with_max_entries(1, 0);

/// tid -> whether the thread is inside the serving window (1) or not (0).
#[map]
static SERVING: LruHashMap<u32, u32> = LruHashMap::with_max_entries(MAX_REDIS_PROCESSES, 0);

/// tid -> the client a key woke last on that thread (7.2+), see `WokenClient`.
#[map]
static LAST_WOKEN: LruHashMap<u32, WokenClient> =
    LruHashMap::with_max_entries(MAX_REDIS_PROCESSES, 0);

/// (tid << 32 | phase) -> entry time, for the return probes.
#[map]
static PHASE_START: LruHashMap<u64, u64> = LruHashMap::with_max_entries(MAX_REDIS_PROCESSES * 4, 0);

#[inline(always)]
fn ids() -> (u32, u32) {
    let id = bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

#[inline(always)]
fn hit(tgid: u32, probe: u32) {
    let key = ((tgid as u64) << 32) | probe as u64;
    match REDIS_PROBE_HITS.get_ptr_mut(&key) {
        Some(n) => unsafe { *n += 1 },
        None => {
            let _ = REDIS_PROBE_HITS.insert(&key, &1, 0);
        }
    }
}

#[inline(always)]
fn now_unix_ms(now_ns: u64) -> i64 {
    // CLOCK_REALTIME is ahead of CLOCK_MONOTONIC on any machine booted after 1970, so the
    // sum is positive; eBPF has no signed division.
    let offset = CLOCK_OFFSET.get(0).copied().unwrap_or(0) as u64;
    (now_ns.wrapping_add(offset) / 1_000_000) as i64
}

#[uprobe]
pub fn redis_block_for_keys(ctx: ProbeContext) -> u32 {
    let (tgid, tid) = ids();
    let Some(process) = (unsafe { REDIS_PROCS.get(&tgid) }) else {
        return 0;
    };
    hit(tgid, point::BLOCK_FOR_KEYS);
    let now = unsafe { bpf_ktime_get_ns() };
    let (Some(client), Some(btype), Some(numkeys)) =
        (ctx.arg::<u64>(0), ctx.arg::<u32>(1), ctx.arg::<u32>(3))
    else {
        return 0;
    };
    // Both candidates are read, then one is picked: a conditional read would be compiled into
    // a load at a computed offset from the context, which the verifier rejects.
    let fifth: i64 = ctx.arg(4).unwrap_or(0);
    let sixth: i64 = ctx.arg(5).unwrap_or(0);
    let (fifth, sixth) = unsafe {
        (
            core::ptr::read_volatile(&fifth),
            core::ptr::read_volatile(&sixth),
        )
    };
    let deadline_ms = if process.timeout_arg == 5 {
        sixth
    } else {
        fifth
    };

    let key = BlockedKey {
        tgid,
        _pad: 0,
        client,
    };
    if process.reprocessing_flag != 0 && reblocked(tid, &key, process.reprocessing_flag, now) {
        start_phase(tid, phase::REGISTER, now);
        return 0;
    }
    let blocked = BlockedClient {
        start_ns: now,
        deadline_ms,
        numkeys,
        btype,
        flags: 0,
        _pad: 0,
    };
    // One map operation in the common case: insert only if absent. An entry already there
    // means the client blocked twice without being seen to unblock in between.
    if BLOCKED_CLIENTS.insert(&key, &blocked, BPF_NOEXIST).is_err() {
        if unsafe { BLOCKED_CLIENTS.get(&key) }.is_some() {
            hit(tgid, point::MISSED_UNBLOCK);
        }
        if BLOCKED_CLIENTS.insert(&key, &blocked, 0).is_err() {
            bump(ProbeCounter::BlockedClientInsertFailed);
        }
    }

    let hist_key = RedisHistKey {
        tgid,
        btype,
        kind: outcome::NONE,
        _pad: 0,
    };
    match REDIS_KEYS_HISTS.get_ptr_mut(&hist_key) {
        Some(h) => unsafe { (*h).record(numkeys) },
        None => {
            let mut h = KeyHistogram::ZERO;
            h.record(numkeys);
            if REDIS_KEYS_HISTS.insert(&hist_key, &h, 0).is_err() {
                bump(ProbeCounter::HistogramMapFull);
            }
        }
    }
    start_phase(tid, phase::REGISTER, now);
    0
}

#[uretprobe]
pub fn redis_block_for_keys_ret(_ctx: RetProbeContext) -> u32 {
    end_phase(phase::REGISTER);
    0
}

#[uprobe]
pub fn redis_reply_timed_out(ctx: ProbeContext) -> u32 {
    let (tgid, _) = ids();
    if unsafe { REDIS_PROCS.get(&tgid) }.is_none() {
        return 0;
    }
    hit(tgid, point::REPLY_TIMED_OUT);
    let Some(client) = ctx.arg::<u64>(0) else {
        return 0;
    };
    if let Some(blocked) = BLOCKED_CLIENTS.get_ptr_mut(&BlockedKey {
        tgid,
        _pad: 0,
        client,
    }) {
        let blocked = unsafe { &mut *blocked };
        // Redis times out a client when its own clock passes the deadline; CLIENT UNBLOCK
        // replies the same way but earlier. 2 ms of slack absorbs clock-reading differences.
        let now_ms = now_unix_ms(unsafe { bpf_ktime_get_ns() });
        blocked.flags |= if blocked.deadline_ms > 0 && now_ms + 2 >= blocked.deadline_ms {
            flags::TIMED_OUT
        } else {
            flags::UNBLOCKED_EARLY
        };
    }
    0
}

#[uprobe]
pub fn redis_serving(_ctx: ProbeContext) -> u32 {
    let (tgid, tid) = ids();
    if unsafe { REDIS_PROCS.get(&tgid) }.is_none() {
        return 0;
    }
    hit(tgid, point::SERVING_WINDOW);
    // The entry stays once made; later calls flip it in place (cheaper than insert/delete).
    match SERVING.get_ptr_mut(&tid) {
        Some(depth) => unsafe { *depth = 1 },
        None => {
            let _ = SERVING.insert(&tid, &1, 0);
        }
    }
    0
}

#[uretprobe]
pub fn redis_serving_ret(_ctx: RetProbeContext) -> u32 {
    let (_, tid) = ids();
    if let Some(depth) = SERVING.get_ptr_mut(&tid) {
        unsafe { *depth = 0 };
    }
    0
}

#[uprobe]
pub fn redis_unblock_client(ctx: ProbeContext) -> u32 {
    // `unblockClient(c)` in 6.x/7.0, `unblockClient(c, queue_for_reprocessing)` in 7.2+.
    let requeue = ctx.arg::<u64>(1).map_or(1, |v| v as u32);
    unblock(&ctx, Some(requeue))
}

/// The LTO clone of `unblockClient` (`unblockClient.constprop.0` in a 7.4 build): the same
/// code with `queue_for_reprocessing = 1` folded in, so its second register means nothing.
#[uprobe]
pub fn redis_unblock_client_requeue(ctx: ProbeContext) -> u32 {
    unblock(&ctx, None)
}

/// The block of client `ctx.arg(0)` ends. `requeue` is `unblockClient`'s second argument
/// where the probed code has it.
#[inline(always)]
fn unblock(ctx: &ProbeContext, requeue: Option<u32>) -> u32 {
    let (tgid, tid) = ids();
    let Some(process) = (unsafe { REDIS_PROCS.get(&tgid) }) else {
        return 0;
    };
    hit(tgid, point::UNBLOCK_CLIENT);
    let Some(client) = ctx.arg::<u64>(0) else {
        return 0;
    };
    let key = BlockedKey {
        tgid,
        _pad: 0,
        client,
    };
    // Clients blocked before the agent attached, and non-key blocking (WAIT, modules that do
    // not block on keys), have no entry: nothing is known about them.
    let Some(blocked) = (unsafe { BLOCKED_CLIENTS.get(&key) }).copied() else {
        return 0;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let woken = if process.served_by == served_by::REPROCESS_ARGUMENT {
        requeue == Some(0)
    } else {
        unsafe { SERVING.get(&tid) }.is_some_and(|depth| *depth != 0)
    };
    let result = if blocked.flags & flags::TIMED_OUT != 0 {
        outcome::TIMEOUT
    } else if blocked.flags & flags::UNBLOCKED_EARLY != 0 {
        outcome::OTHER
    } else if woken {
        outcome::SERVED
    } else {
        outcome::OTHER
    };
    let elapsed = now.saturating_sub(blocked.start_ns);
    record_duration(
        RedisHistKey {
            tgid,
            btype: blocked.btype,
            kind: result,
            _pad: 0,
        },
        elapsed,
    );
    let _ = BLOCKED_CLIENTS.remove(&key);
    if result == outcome::SERVED && process.reprocessing_flag != 0 {
        remember_woken(tid, client, now, blocked);
    }
    start_phase(tid, phase::UNREGISTER, now);
    0
}

/// Keeps what a woken client's call was, in case it blocks again (see `reblocked`). The entry
/// of a thread is made once and rewritten in place.
#[inline(always)]
fn remember_woken(tid: u32, client: u64, now: u64, blocked: BlockedClient) {
    let woken = WokenClient {
        client,
        woken_ns: now,
        blocked,
    };
    match LAST_WOKEN.get_ptr_mut(&tid) {
        Some(slot) => unsafe { *slot = woken },
        None => {
            let _ = LAST_WOKEN.insert(&tid, &woken, 0);
        }
    }
}

/// 7.2+ wakes every client blocked on a key that became ready and re-runs its command; one
/// that finds nothing (another client took the element, a stream entry below its ID) blocks
/// again, with `CLIENT_REPROCESSING_COMMAND` set and its first deadline kept. That is the same
/// call: its provisional `served` is taken back and its entry restored, and the fan-out is not
/// counted twice. Returns whether this block was such a re-block.
#[inline(always)]
fn reblocked(tid: u32, key: &BlockedKey, reprocessing_flag: u64, now: u64) -> bool {
    let Some(woken) = LAST_WOKEN.get_ptr_mut(&tid) else {
        return false;
    };
    let woken = unsafe { &mut *woken };
    if woken.client != key.client || now.saturating_sub(woken.woken_ns) > REBLOCK_WINDOW_NS {
        return false;
    }
    let client_flags: u64 =
        match unsafe { bpf_probe_read_user((key.client + CLIENT_FLAGS_OFFSET) as *const u64) } {
            Ok(f) => f,
            Err(_) => return false,
        };
    if client_flags & reprocessing_flag == 0 {
        return false;
    }
    let blocked = woken.blocked;
    // Used up: a later block of this client is a new call.
    woken.client = 0;
    let served = RedisHistKey {
        tgid: key.tgid,
        btype: blocked.btype,
        kind: outcome::SERVED,
        _pad: 0,
    };
    if let Some(h) = REDIS_DUR_HISTS.get_ptr_mut(&served) {
        unsafe { (*h).unrecord(woken.woken_ns.saturating_sub(blocked.start_ns)) };
    }
    if BLOCKED_CLIENTS.insert(key, &blocked, 0).is_err() {
        bump(ProbeCounter::BlockedClientInsertFailed);
    }
    hit(key.tgid, point::REBLOCKED);
    true
}

#[uretprobe]
pub fn redis_unblock_client_ret(_ctx: RetProbeContext) -> u32 {
    end_phase(phase::UNREGISTER);
    0
}

#[inline(always)]
fn record_duration(key: RedisHistKey, ns: u64) {
    if let Some(h) = REDIS_DUR_HISTS.get_ptr_mut(&key) {
        unsafe { (*h).record(ns) };
        return;
    }
    let Some(zero) = crate::maps::ZERO_LOG2.get(0) else {
        return;
    };
    if REDIS_DUR_HISTS.insert(&key, zero, 0).is_err() {
        bump(ProbeCounter::HistogramMapFull);
        return;
    }
    if let Some(h) = REDIS_DUR_HISTS.get_ptr_mut(&key) {
        unsafe { (*h).record(ns) };
    }
}

/// Entries of PHASE_START are made once per (thread, phase) and then rewritten in place: an
/// LRU insert and delete per call cost more than the rest of the probe.
#[inline(always)]
fn start_phase(tid: u32, which: u32, now: u64) {
    let key = ((tid as u64) << 32) | which as u64;
    match PHASE_START.get_ptr_mut(&key) {
        Some(start) => unsafe { *start = now },
        None => {
            let _ = PHASE_START.insert(&key, &now, 0);
        }
    }
}

#[inline(always)]
fn end_phase(which: u32) {
    let (tgid, tid) = ids();
    let start_key = ((tid as u64) << 32) | which as u64;
    let Some(start) = PHASE_START.get_ptr_mut(&start_key) else {
        return;
    };
    let start = unsafe { core::mem::replace(&mut *start, 0) };
    if start == 0 {
        return;
    }
    let elapsed = unsafe { bpf_ktime_get_ns() }.saturating_sub(start);
    let key = RedisHistKey {
        tgid,
        btype: 0,
        kind: which,
        _pad: 0,
    };
    match REDIS_BOOKKEEPING.get_ptr_mut(&key) {
        Some(t) => unsafe {
            (*t).total_ns += elapsed;
            (*t).calls += 1;
        },
        None => {
            let _ = REDIS_BOOKKEEPING.insert(
                &key,
                &PhaseTime {
                    total_ns: elapsed,
                    calls: 1,
                },
                0,
            );
        }
    }
}
