//! A blocking call's clock and its histograms: a pop starts when its command is written and
//! ends with its reply; durations, fan-out and the key that served it are recorded through
//! the slots each connection remembers.

use super::CONN_PEERS;
use crate::counters::bump;
use crate::maps::cached_slot;
use agent_common::redis::KeyHistogram;
use agent_common::resp::{reply_kind, BlockingCall};
use agent_common::sched::{Log2Histogram, ProbeCounter};
use agent_common::worker::{
    outcome, ConnKey, ConnState, HistogramSlots, Peer, ServedKey, WorkerHistKey, WorkerKeysKey,
    MAX_SERVED_KEYS, MAX_WORKER_HISTOGRAMS,
};
use aya_ebpf::macros::map;
use aya_ebpf::maps::{HashMap, PerCpuArray, PerCpuHashMap, Queue};

/// Duration and fan-out histograms in per-CPU array slots, found through their keys' slot
/// maps and taken from queues of free slots (see `agent_common::sched::SchedHistograms`);

/// each connection remembers its slots, so a pop costs array indexes, not hashes.
#[map]
pub(super) static WORKER_DUR_HISTS: PerCpuArray<Log2Histogram> =
    PerCpuArray::with_max_entries(MAX_WORKER_HISTOGRAMS, 0);

#[map]
pub(super) static WK_DUR_SLOTS: HashMap<WorkerHistKey, u32> =
    HashMap::with_max_entries(MAX_WORKER_HISTOGRAMS, 0);

#[map]
pub(super) static WK_DUR_FREE: Queue<u32> = Queue::with_max_entries(MAX_WORKER_HISTOGRAMS, 0);

#[map]
pub(super) static WORKER_KEYS_HISTS: PerCpuArray<KeyHistogram> =
    PerCpuArray::with_max_entries(MAX_WORKER_HISTOGRAMS, 0);

#[map]
pub(super) static WK_KEY_SLOTS: HashMap<WorkerKeysKey, u32> =
    HashMap::with_max_entries(MAX_WORKER_HISTOGRAMS, 0);

#[map]
pub(super) static WK_KEY_FREE: Queue<u32> = Queue::with_max_entries(MAX_WORKER_HISTOGRAMS, 0);

/// Served pops by (process, peer, key that served them), for `fanout advise`.
#[map]
pub(super) static SERVED_KEYS: PerCpuHashMap<ServedKey, u64> =
    PerCpuHashMap::with_max_entries(MAX_SERVED_KEYS, 0);

/// Forgets the connection's histogram slots when what they were found for changes: the
/// command it blocks with, or its peer.
#[inline(always)]
pub(super) fn slots_for(conn: &mut ConnState, command: u32) {
    if conn.slots.command != command {
        conn.slots = HistogramSlots {
            command,
            ..HistogramSlots::default()
        };
    }
}

/// Records how long a pop waited, through the connection's cached slot for its outcome.
#[inline(always)]
pub(super) fn record_duration(conn: &mut ConnState, tgid: u32, result: u32, ns: u64) {
    let command = conn.pop.command;
    slots_for(conn, command);
    let index = (result as usize) & 3;
    if index >= 3 {
        return;
    }
    let peer = conn.peer;
    let Some(slot) = cached_slot(
        &mut conn.slots.durations[index],
        &WK_DUR_SLOTS,
        &WK_DUR_FREE,
        || WorkerHistKey {
            tgid,
            command,
            outcome: result,
            _pad: 0,
            peer,
        },
    ) else {
        return;
    };
    if let Some(h) = WORKER_DUR_HISTS.get_ptr_mut(slot) {
        unsafe { (*h).record(ns) };
    }
}

/// Records the keys a blocking call listed, through the connection's cached slot.
#[inline(always)]
pub(super) fn record_keys(conn: &mut ConnState, tgid: u32, command: u32, keys: u32) {
    slots_for(conn, command);
    let Some(slot) = cached_slot(&mut conn.slots.keys, &WK_KEY_SLOTS, &WK_KEY_FREE, || {
        WorkerKeysKey { tgid, command }
    }) else {
        return;
    };
    if let Some(h) = WORKER_KEYS_HISTS.get_ptr_mut(slot) {
        unsafe { (*h).record(keys) };
    }
}

/// Counts a served pop under the key that served it (one hash update per served pop; the
/// key's name stays in user space, which hashes the names it knows the same way).
#[inline(always)]
pub(super) fn count_served_key(tgid: u32, peer: Peer, key_hash: u64) {
    let key = ServedKey {
        tgid,
        peer,
        key_hash,
    };
    // Per CPU: two threads of one process serving the same key on two CPUs must not lose a
    // count, and this target has no atomic add in `core`.
    if let Some(count) = SERVED_KEYS.get_ptr_mut(&key) {
        unsafe { *count += 1 };
    } else if SERVED_KEYS.insert(&key, &1, 0).is_err() {
        bump(ProbeCounter::ServedKeysFull);
    }
}

/// Ends the waiting pop of `conn` with `result`; `served_key` names the key that served it
/// (`fastpath::served_key_hash`, or a reserved value) and only counts for a served pop.
#[inline(always)]
pub(super) fn finish_pop(
    conn: &mut ConnState,
    tgid: u32,
    fd: u32,
    result: u32,
    served_key: u64,
    now: u64,
) {
    if conn.pop.active == 0 {
        return;
    }
    conn.pop.active = 0;
    if conn.peer.family == 0 {
        // Connected before the process was followed: the agent finds the peer in /proc.
        let socket = ConnKey {
            tgid,
            fd: agent_common::worker::socket_fd(fd),
        };
        if let Some(peer) = unsafe { CONN_PEERS.get(&socket) } {
            conn.peer = *peer;
            // The duration histograms are per peer.
            conn.slots.durations = [0; 3];
        }
    }
    record_duration(conn, tgid, result, now.saturating_sub(conn.pop.sent_ns));
    if result == outcome::SERVED {
        count_served_key(tgid, conn.peer, served_key);
    }
}

/// A top-level reply began (number `index` on its connection, of `reply_kind` `kind`): if it
/// is the reply of the waiting pop, the pop ends, served (under `served_key`), timed out or
/// failed.
#[inline(always)]
pub(super) fn reply_began(
    conn: &mut ConnState,
    tgid: u32,
    fd: u32,
    index: u64,
    kind: u32,
    served_key: u64,
    now: u64,
) {
    if conn.pop.active == 0 {
        return;
    }
    if index == conn.pop.reply_index {
        let result = match kind {
            reply_kind::DATA => outcome::SERVED,
            reply_kind::NIL => outcome::TIMEOUT,
            _ => outcome::ERROR,
        };
        finish_pop(conn, tgid, fd, result, served_key, now);
    } else if index > conn.pop.reply_index {
        // Its reply went by unseen (the connection was re-synchronised).
        conn.pop.active = 0;
        bump(ProbeCounter::RespDesync);
    }
}

/// A blocking call was fully written: start its clock and count its keys.
#[inline(always)]
pub(super) fn start_pop(conn: &mut ConnState, tgid: u32, now: u64, call: &BlockingCall) {
    record_keys(conn, tgid, call.command, call.keys);
    if conn.pop.active != 0 {
        bump(ProbeCounter::OverlappingPop);
    } else {
        conn.pop.active = 1;
        conn.pop.sent_ns = now;
        conn.pop.reply_index = call.index;
        conn.pop.signature = call.signature;
        conn.pop.command = call.command;
        conn.pop.keys = call.keys;
    }
}
