//! Which descriptors are followed connections: a connection is followed from its first write
//! that starts a command; other descriptors are remembered as such to cost one load.

use super::{CONNS, CONN_PEERS, KIND_DESYNCED};
use crate::counters::bump;
use agent_common::sched::ProbeCounter;
use agent_common::worker::{
    conn_kind, not_resp_slot, socket_fd, tls_record_start, ConnKey, ConnState, MAX_TLS_CONNECTIONS,
    NOT_RESP_SLOTS, NOT_RESP_TLS,
};
use aya_ebpf::helpers::bpf_probe_read_user;
use aya_ebpf::macros::map;
use aya_ebpf::maps::{Array, LruHashMap, PerCpuArray};

/// All-zero templates for entries larger than the stack allows.
#[map]
pub(super) static ZERO_CONN: PerCpuArray<ConnState> = PerCpuArray::with_max_entries(1, 0);

/// (tgid, fd) of descriptors a worker writes to that are not connections (pipes, eventfds,
/// files), by a hash of the pair (`agent_common::worker::not_resp_slot`): a write to one of
/// them costs one inlined array load, without reading the worker's buffer (a Ruby worker
/// writes two log lines and a warning per job; reading a byte of each cost more than the rest
/// of the probe). Only descriptors without a peer enter it, and sockets that talk TLS (see
/// `TLS_CONNS`): sockets connected while the worker is followed get a peer at connect(), and
/// those it had before are seeded with their peers from /proc, their slots cleared, when it
/// starts being followed.
/// Closing a descriptor, or connecting it, clears its slot. What it cannot see: a socket
/// moved onto a cached descriptor number with dup2() and no close() (no Redis client does
/// that); the slot of a pair overwritten by another pair only costs a lookup.
#[map]
pub(super) static NOT_RESP: Array<u64> = Array::with_max_entries(NOT_RESP_SLOTS, 0);

/// Sockets of followed workers seen writing TLS records: Redis over TLS, whose commands are
/// encrypted here. Written once per such socket (then its `NOT_RESP` slot holds it), read by
/// the agent, which says which workers it cannot follow this way.
#[map]
pub(super) static TLS_CONNS: LruHashMap<ConnKey, u32> =
    LruHashMap::with_max_entries(MAX_TLS_CONNECTIONS, 0);

/// Forgets that (tgid, fd) is not a connection (it is one now, or it was closed).
#[inline(always)]
pub(super) fn clear_not_resp(key: &ConnKey) {
    let (slot, tag) = not_resp_slot(key);
    if let Some(cached) = NOT_RESP.get_ptr_mut(slot) {
        unsafe {
            if *cached & !NOT_RESP_TLS == tag {
                *cached = 0;
            }
        }
    }
}

/// The connection state for a write of `len` bytes at `buf`, created (and classified) on the
/// first one. `fd` may be the plain text side of a TLS connection (`TLS_FD`), whose peer is
/// its socket's.
#[inline(always)]
pub(super) fn conn_for_write(tgid: u32, fd: u32, buf: u64, len: u64) -> Option<*mut ConnState> {
    let key = ConnKey { tgid, fd };
    let socket = ConnKey {
        tgid,
        fd: socket_fd(fd),
    };
    let (slot, tag) = not_resp_slot(&key);
    if let Some(cached) = NOT_RESP.get(slot) {
        if *cached == tag {
            return None;
        }
        if *cached == tag | NOT_RESP_TLS {
            // A TLS socket: its records are written from inside an SSL call, which tells
            // which SSL object this descriptor belongs to.
            super::tls_objects::bind_current_call(tgid, fd);
            return None;
        }
    }
    // The first byte of the buffer, read only when it decides something (a followed
    // connection's writes are its commands). A buffer the worker has not touched may not be
    // paged in: then the byte cannot be read here, and the write is left alone rather than
    // taken for a non-connection.
    let first = || unsafe { bpf_probe_read_user(buf as *const u8) }.ok();
    if let Some(conn) = CONNS.get_ptr_mut(&key) {
        let state = unsafe { &mut *conn };
        if state.kind == KIND_DESYNCED {
            if first()? != b'*' {
                return None;
            }
            // Re-synchronise: a write that starts a command starts a fresh stream. What it
            // went through so far stays (the agent's narrowing must not forget a `write`).
            let (peer, write_sites, read_sites) = (state.peer, state.write_sites, state.read_sites);
            let zero = ZERO_CONN.get(0)?;
            *state = *zero;
            state.peer = peer;
            state.write_sites = write_sites;
            state.read_sites = read_sites;
            state.kind = conn_kind::RESP;
        }
        return if state.kind == conn_kind::RESP {
            Some(conn)
        } else {
            None
        };
    }
    let first = first()?;
    // Only a write that starts a command starts following a connection: a process seen
    // mid-command (it was tracked while writing) is picked up at its next command, and
    // files and pipes (logs) cost one byte read per write.
    if first != b'*' {
        // A socket may be a connection met mid-command: it is picked up at its next command.
        // One that writes a TLS record talks TLS for good (Redis over TLS: its commands are
        // encrypted here): it is reported, and costs one load from then on. Only a first byte
        // that is a record's content type costs the read of the next two.
        let is_socket = unsafe { CONN_PEERS.get(&socket) }.is_some();
        let tls = is_socket
            && key.fd == socket.fd
            && (20..=23).contains(&first)
            && len >= 3
            && unsafe { bpf_probe_read_user(buf as *const [u8; 3]) }.is_ok_and(tls_record_start);
        if tls {
            let _ = TLS_CONNS.insert(&key, &1, 0);
            super::tls_objects::bind_current_call(tgid, fd);
        }
        if !is_socket || tls {
            if let Some(cached) = NOT_RESP.get_ptr_mut(slot) {
                unsafe { *cached = if tls { tag | NOT_RESP_TLS } else { tag } };
            }
        }
        return None;
    }
    clear_not_resp(&key);
    let zero = ZERO_CONN.get(0)?;
    if CONNS.insert(&key, zero, 0).is_err() {
        bump(ProbeCounter::ConnInsertFailed);
        return None;
    }
    let conn = CONNS.get_ptr_mut(&key)?;
    let state = unsafe { &mut *conn };
    state.kind = conn_kind::RESP;
    if let Some(peer) = unsafe { CONN_PEERS.get(&socket) } {
        state.peer = *peer;
    }
    Some(conn)
}
