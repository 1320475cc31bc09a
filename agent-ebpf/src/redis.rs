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
    flags, outcome, phase, phase_cost, point, served_by, BlockedClient, BlockedKey, KeyHistogram,
    RedisProcState, RedisProcess, WokenClient, BSTATE_TIMEOUT, DICT_USED, HOT_BLOCKED_CLIENTS,
    KEY_BUCKETS, MAX_BLOCKED_CLIENTS, MAX_REDIS_PROCESSES, MAX_SERVING_RETURNS, OUTCOMES,
    REBLOCK_WINDOW_NS,
};
use agent_common::sched::ProbeCounter;
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{map, uprobe, uretprobe},
    maps::{Array, HashMap},
    programs::{ProbeContext, RetProbeContext},
};

use crate::{counters::bump, sched::current_arrivals};

/// `BPF_F_NO_PREALLOC`: entries are allocated as they are added, not reserved at load.
const BPF_F_NO_PREALLOC: u32 = 1;

/// tgid -> the process's settings and counters. Written by the agent when it starts tracking
/// a Redis process, then only updated in place here.
#[map]
static REDIS_PROCS: HashMap<u32, RedisProcState> =
    HashMap::with_max_entries(MAX_REDIS_PROCESSES, BPF_F_NO_PREALLOC);

/// Clients blocked now, and clients whose block ended lately (`BlockedClient::ended_ns`),
/// kept so that their next block is a write in place. A plain hash (not LRU): entries whose
/// unblock was missed are found by the agent (past their deadline) or by the next block of
/// the same client, and the agent removes entries ended a few seconds ago. Small, so that
/// its buckets are in the kernel's direct map (see `HOT_BLOCKED_CLIENTS`); entries are
/// allocated as clients come, so both tiers together hold only what is in use.
#[map]
static BLOCKED_CLIENTS: HashMap<BlockedKey, BlockedClient> =
    HashMap::with_max_entries(HOT_BLOCKED_CLIENTS, BPF_F_NO_PREALLOC);

/// Clients that found `BLOCKED_CLIENTS` full. Looked in only when a client is not there:
/// a client's first block, and the clients beyond the first tier's room.
#[map]
static BLOCKED_SPILL: HashMap<BlockedKey, BlockedClient> =
    HashMap::with_max_entries(MAX_BLOCKED_CLIENTS, BPF_F_NO_PREALLOC);

/// A client's entry, in whichever tier holds it.
#[inline(always)]
fn blocked_entry(key: &BlockedKey) -> Option<*mut BlockedClient> {
    match BLOCKED_CLIENTS.get_ptr_mut(key) {
        Some(entry) => Some(entry),
        None => BLOCKED_SPILL.get_ptr_mut(key),
    }
}

/// Adds the entry of a client neither tier holds: in the first tier while it has room.
#[inline(always)]
fn insert_blocked(key: &BlockedKey, blocked: &BlockedClient) {
    if BLOCKED_CLIENTS.insert(key, blocked, 0).is_err()
        && BLOCKED_SPILL.insert(key, blocked, 0).is_err()
    {
        bump(ProbeCounter::BlockedClientInsertFailed);
    }
}

#[map]
static CLOCK_OFFSET: Array<i64> = Array::with_max_entries(1, 0);

/// The calling Redis process's state, or `None` for a process that is not tracked (the
/// uprobes are per binary, and `redis-check-rdb` runs the same file).
#[inline(always)]
fn current() -> Option<(u32, &'static mut RedisProcState)> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let state = REDIS_PROCS.get_ptr_mut(&tgid)?;
    Some((tgid, unsafe { &mut *state }))
}

#[inline(always)]
fn hit(state: &mut RedisProcState, probe: u32) {
    let p = probe as usize;
    if p < point::COUNT {
        state.hits[p] += 1;
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
    let Some((tgid, state)) = current() else {
        return 0;
    };
    hit(state, point::BLOCK_FOR_KEYS);
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
    let deadline_ms = if state.settings.timeout_arg == 5 {
        sixth
    } else {
        fifth
    };

    start_phase(state, phase::REGISTER, now, numkeys);
    // blockForKeys ends with blockClient(c): a probe on blockClient's entry must not count
    // this block again. Where the calls are probed instead, blockForKeys's own is not.
    if state.settings.block_client_at_calls == 0 {
        state.registering = client;
    }
    record_block(tgid, state, client, btype, numkeys, deadline_ms, now);
    0
}

/// `blockClient(c, btype)` (7.2+): where the compiler inlined `blockForKeys` into a command
/// (LTO builds inline it into `blmoveGenericCommand`, so BLMOVE and BRPOPLPUSH never call
/// it), this is the only probe that sees the block. It sits on the calls to `blockClient`
/// other than `blockForKeys`'s where the agent found them all (the arguments are in the
/// same registers there), else on its entry. The keys and the deadline are read from
/// `c->bstate`, whose offset the agent found in the machine code. Blocks that went through
/// `blockForKeys` were counted there, and blocks not on keys (WAIT, CLIENT PAUSE, modules'
/// own) are none of ours.
#[uprobe]
pub fn redis_block_client(ctx: ProbeContext) -> u32 {
    let Some((tgid, state)) = current() else {
        return 0;
    };
    let (Some(client), Some(btype)) = (ctx.arg::<u64>(0), ctx.arg::<u32>(1)) else {
        return 0;
    };
    if state.registering == client {
        state.registering = 0;
        return 0;
    }
    let offset = state.settings.bstate_offset as u64;
    if offset == 0 || btype >= 32 || state.settings.key_btypes & (1 << btype) == 0 {
        return 0;
    }
    let read = |at: u64| unsafe { bpf_probe_read_user(at as *const u64) }.unwrap_or(0);
    let bstate = if state.settings.bstate_is_pointer != 0 {
        read(client + offset)
    } else {
        client + offset
    };
    if bstate == 0 {
        return 0;
    }
    let deadline_ms = read(bstate + BSTATE_TIMEOUT) as i64;
    let keys = read(bstate + state.settings.bstate_keys as u64);
    if keys == 0 {
        return 0;
    }
    let numkeys = read(keys + DICT_USED).wrapping_add(read(keys + DICT_USED + 8)) as u32;
    hit(state, point::BLOCK_FOR_KEYS);
    let now = unsafe { bpf_ktime_get_ns() };
    record_block(tgid, state, client, btype, numkeys, deadline_ms, now);
    0
}

/// A client blocks on `numkeys` keys until `deadline_ms`.
///
/// A client's entry stays when its block ends (marked ended, see `unblock`): a worker blocks
/// again on the same connection within seconds, and its entry is rewritten in place. One
/// look-up per block; an insert only for a client not seen lately.
#[inline(always)]
fn record_block(
    tgid: u32,
    state: &mut RedisProcState,
    client: u64,
    btype: u32,
    numkeys: u32,
    deadline_ms: i64,
    now: u64,
) {
    let key = BlockedKey {
        tgid,
        _pad: 0,
        client,
    };
    let entry = blocked_entry(&key);
    let again = if state.settings.reprocessing_mask != 0 {
        reblocked(state, &key, now)
    } else {
        None
    };
    let blocked = match again {
        Some(again) => again,
        None => {
            // Still blocked: the client blocked twice without being seen to unblock.
            if let Some(entry) = entry {
                if unsafe { &*entry }.is_blocked() {
                    hit(state, point::MISSED_UNBLOCK);
                }
            }
            state.keys[RedisProcState::btype_slot(btype)].record(numkeys);
            BlockedClient {
                start_ns: now,
                ended_ns: 0,
                deadline_ms,
                numkeys,
                btype,
                flags: 0,
                _pad: 0,
            }
        }
    };
    match entry {
        // Redis blocks and unblocks a process's clients on its main thread, so no other probe
        // writes this entry meanwhile; the agent only deletes entries, those ended seconds
        // ago or blocked past their deadline (the agent's `BlockedClients::sweep`).
        Some(entry) => unsafe { *entry = blocked },
        None => insert_blocked(&key, &blocked),
    }
}

#[uretprobe]
pub fn redis_block_for_keys_ret(_ctx: RetProbeContext) -> u32 {
    if let Some((_, state)) = current() {
        end_phase(state, phase::REGISTER);
    }
    0
}

#[uprobe]
pub fn redis_reply_timed_out(ctx: ProbeContext) -> u32 {
    let Some((tgid, state)) = current() else {
        return 0;
    };
    hit(state, point::REPLY_TIMED_OUT);
    let Some(client) = ctx.arg::<u64>(0) else {
        return 0;
    };
    if let Some(blocked) = blocked_entry(&BlockedKey {
        tgid,
        _pad: 0,
        client,
    }) {
        let blocked = unsafe { &mut *blocked };
        if !blocked.is_blocked() {
            return 0;
        }
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
    if let Some((_, state)) = current() {
        hit(state, point::SERVING_WINDOW);
        state.serving = 1;
    }
    0
}

#[uretprobe]
pub fn redis_serving_ret(_ctx: RetProbeContext) -> u32 {
    if let Some((_, state)) = current() {
        state.serving = 0;
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
    let Some((tgid, state)) = current() else {
        return 0;
    };
    hit(state, point::UNBLOCK_CLIENT);
    let Some(client) = ctx.arg::<u64>(0) else {
        return 0;
    };
    let key = BlockedKey {
        tgid,
        _pad: 0,
        client,
    };
    // Clients blocked before the agent attached, and non-key blocking (WAIT, modules that do
    // not block on keys), have no entry, or one whose last block ended: nothing is known
    // about them.
    let Some(entry) = blocked_entry(&key) else {
        return 0;
    };
    let entry = unsafe { &mut *entry };
    if !entry.is_blocked() {
        return 0;
    }
    let blocked = *entry;
    let now = unsafe { bpf_ktime_get_ns() };
    let woken = match state.settings.served_by {
        served_by::REPROCESS_ARGUMENT => requeue == Some(0),
        served_by::RETURN_ADDRESS => returns_to_serving(ctx, &state.settings),
        _ => state.serving != 0,
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
    let slot = RedisProcState::btype_slot(blocked.btype);
    if (result as usize) < OUTCOMES {
        state.durations[slot][result as usize].record(now.saturating_sub(blocked.start_ns));
    }
    // Marked ended, not deleted: the client's next block rewrites it (`record_block`).
    entry.ended_ns = now;
    if result == outcome::SERVED && state.settings.reprocessing_mask != 0 {
        state.woken = WokenClient {
            client,
            woken_ns: now,
            blocked,
        };
    }
    start_phase(state, phase::UNREGISTER, now, blocked.numkeys);
    0
}

#[uretprobe]
pub fn redis_unblock_client_ret(_ctx: RetProbeContext) -> u32 {
    if let Some((_, state)) = current() {
        end_phase(state, phase::UNREGISTER);
    }
    0
}

/// 7.2+ wakes every client blocked on a key that became ready and re-runs its command; one
/// that finds nothing (another client took the element, a stream entry below its ID) blocks
/// again, with `CLIENT_REPROCESSING_COMMAND` set and its first deadline kept. That is the same
/// call: its provisional `served` is taken back and its entry is to be restored, and the
/// fan-out is not counted twice. Returns the call as it was if this block is such a re-block.
#[inline(always)]
fn reblocked(state: &mut RedisProcState, key: &BlockedKey, now: u64) -> Option<BlockedClient> {
    let woken = &mut state.woken;
    if woken.client != key.client || now.saturating_sub(woken.woken_ns) > REBLOCK_WINDOW_NS {
        return None;
    }
    let at = key.client + state.settings.reprocessing_offset as u64;
    let flag_byte: u8 = unsafe { bpf_probe_read_user(at as *const u8) }.ok()?;
    if flag_byte as u32 & state.settings.reprocessing_mask == 0 {
        return None;
    }
    let blocked = woken.blocked;
    // Used up: a later block of this client is a new call.
    woken.client = 0;
    let served_ns = woken.woken_ns.saturating_sub(blocked.start_ns);
    state.durations[RedisProcState::btype_slot(blocked.btype)][outcome::SERVED as usize]
        .unrecord(served_ns);
    hit(state, point::REBLOCKED);
    Some(blocked)
}

/// Whether `unblockClient` was called by a serve function: its return address, on top of the
/// stack at the probe (the probe sits on the function's first instruction), is one of theirs.
#[inline(always)]
fn returns_to_serving(ctx: &ProbeContext, settings: &RedisProcess) -> bool {
    let rsp = unsafe { (*ctx.regs).rsp };
    let Ok(ret) = (unsafe { bpf_probe_read_user(rsp as *const u64) }) else {
        return false;
    };
    let mut i = 0;
    while i < MAX_SERVING_RETURNS {
        if settings.serving_returns[i] == ret && ret != 0 {
            return true;
        }
        i += 1;
    }
    false
}

/// Starts the clock of a bookkeeping phase of a call on `keys` keys.
#[inline(always)]
fn start_phase(state: &mut RedisProcState, which: u32, now: u64, keys: u32) {
    let w = which as usize & 1;
    state.phase_start[w] = now;
    state.phase_keys[w] = keys;
    state.phase_arrivals[w] = current_arrivals();
}

/// Adds the time since the phase's entry probe to its totals, unless the thread was switched
/// out in between: then that time is mostly another task's, and the phase adds the mean of
/// the phases before it with as many keys, or nothing when none was timed yet (`phase_cost`).
#[inline(always)]
fn end_phase(state: &mut RedisProcState, which: u32) {
    let w = which as usize & 1;
    let start = core::mem::replace(&mut state.phase_start[w], 0);
    if start == 0 {
        return;
    }
    let elapsed = unsafe { bpf_ktime_get_ns() }.saturating_sub(start);
    let switched_out = current_arrivals() != state.phase_arrivals[w];
    // The same time by fan-out, for the cost per key (`fanout advise`): a call counts once,
    // at its registration; its unregistration adds time only.
    let keys = state.phase_keys[w];
    let bucket = KeyHistogram::bucket_index(keys);
    // Never taken (`bucket_index` is below KEY_BUCKETS): the bound the verifier needs.
    if bucket >= KEY_BUCKETS {
        return;
    }
    let cost = &mut state.bookkeeping_by_keys[bucket];
    let phase_time = &mut state.bookkeeping[w];
    let spent = phase_cost(
        elapsed,
        switched_out,
        (cost.total_ns, cost.phases),
        phase_time.timed(),
    );
    phase_time.calls += 1;
    phase_time.switched_out += switched_out as u64;
    // An untimed phase stays out of the fit's bucket altogether: a registration in it
    // without its time would pull the bucket's cost per call down.
    let Some(spent) = spent else {
        phase_time.untimed += 1;
        return;
    };
    phase_time.total_ns += spent;
    cost.total_ns += spent;
    cost.phases += 1;
    if w == phase::REGISTER as usize {
        cost.calls += 1;
        cost.keys += keys as u64;
    }
}
