//! The shortcuts for a buffer that is exactly one plain command or one whole simple reply
//! (`agent_common::fastpath`), from its first bytes.

use super::{pops::reply_began, MapOpaque};
use agent_common::fastpath::{self, QUICK_WINDOW};
use agent_common::resp::{reply_kind, Opaque};
use agent_common::worker::ConnState;
use aya_ebpf::macros::map;
use aya_ebpf::maps::PerCpuArray;
use core::ffi::c_void;

/// The first bytes of a buffer, for `fastpath::quick_reply` and `fastpath::quick_request`.
#[map]
pub(super) static QUICK_SCRATCH: PerCpuArray<[u64; QUICK_WINDOW / 8]> =
    PerCpuArray::with_max_entries(1, 0);

/// Reads the first bytes of a buffer (up to `fastpath::QUICK_WINDOW`) into the per-CPU
/// scratch for the shortcuts; returns them and how many were read.
#[inline(always)]
pub(super) fn quick_window(
    buf: u64,
    total: u64,
    opaque: &MapOpaque,
) -> Option<(&'static [u8; QUICK_WINDOW], u64)> {
    let words = QUICK_SCRATCH.get_ptr_mut(0)?;
    let n = read_user_prefix::<QUICK_WINDOW>(words.cast(), buf, total, opaque)?;
    Some((unsafe { &*(words as *const [u8; QUICK_WINDOW]) }, n))
}

/// Copies the first `min(len, CAP)` bytes at the user address `src` into `dst`, a scratch of
/// `CAP` bytes (a power of two); returns how many, or `None` when there is nothing to read or
/// the read fails. The count is hidden from the verifier, then masked, so that it sees one
/// bounded size whatever path computed it.
#[inline(always)]
pub(super) fn read_user_prefix<const CAP: usize>(
    dst: *mut u8,
    src: u64,
    len: u64,
    opaque: &MapOpaque,
) -> Option<u64> {
    let n = if len < CAP as u64 { len } else { CAP as u64 };
    let n = opaque.hide(n) & (2 * CAP as u64 - 1);
    if n == 0 || n > CAP as u64 {
        return None;
    }
    let rc = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(
            dst.cast(),
            n as u32,
            src as *const c_void,
        )
    };
    (rc == 0).then_some(n)
}

/// A write at a command boundary that is exactly one plain command (`fastpath::quick_request`:
/// a GET, a SET, an INCR; never a blocking one): one more command on the connection, counted
/// without the tokenizer. Returns false when the write is anything else.
#[inline(always)]
pub(super) fn quick_command(conn: &mut ConnState, buf: u64, len: u64) -> bool {
    if !conn.request.at_command_boundary() || conn.request_carry.len != 0 {
        return false;
    }
    let Some(opaque) = MapOpaque::get() else {
        return false;
    };
    let Some((bytes, n)) = quick_window(buf, len, &opaque) else {
        return false;
    };
    if !fastpath::quick_request(bytes, n, len, &opaque) {
        return false;
    }
    conn.request.commands += 1;
    true
}

/// A read at a reply boundary that is exactly one whole reply of a simple shape
/// (`fastpath::quick_reply`): counted without the tokenizer and, if it is the waiting pop's,
/// the pop ends. Returns false when the read is anything else.
#[inline(always)]
pub(super) fn quick_whole_reply(
    conn: &mut ConnState,
    tgid: u32,
    fd: u32,
    buf: u64,
    total: u64,
    now: u64,
) -> bool {
    let reply = &conn.reply;
    if reply.depth != 0
        || reply.skip != 0
        || reply.in_line != 0
        || reply.out_of_band != 0
        || conn.reply_carry.len != 0
    {
        return false;
    }
    let Some(opaque) = MapOpaque::get() else {
        return false;
    };
    let Some((bytes, n)) = quick_window(buf, total, &opaque) else {
        return false;
    };
    let Some(reply) = fastpath::quick_reply(bytes, n, total, &opaque) else {
        return false;
    };
    let index = conn.reply.replies;
    conn.reply.replies += 1;
    // Hashing the served key is only worth it for the waiting pop's reply.
    let served_key = if conn.pop.active == 0 || index != conn.pop.reply_index {
        fastpath::SERVED_KEY_UNKNOWN
    } else if reply.kind != reply_kind::DATA {
        0
    } else if reply.array {
        fastpath::served_key_hash_in_window(bytes, reply.first_start, reply.first_len, n)
    } else {
        fastpath::SERVED_KEY_ONLY_SOURCE
    };
    reply_began(conn, tgid, fd, index, reply.kind, served_key, now);
    true
}
