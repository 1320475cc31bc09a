//! The tokenizer loop over one buffer (`agent_common::resp` under `bpf_loop`), in per-CPU
//! scratch: the carry of a token cut by a buffer's end, iovec arrays, and the key lists sent
//! to user space.

use super::{pops::reply_began, pops::start_pop, IoVec, MapOpaque, KIND_DESYNCED};
use crate::counters::bump;
use agent_common::fastpath;
use agent_common::resp::{shifted_window, BlockingCall, Carry, Step, AHEAD, WINDOW};
use agent_common::sched::ProbeCounter;
use agent_common::worker::{ConnState, KeysetHeader, KEYSET_MAX_BYTES, KEYSET_RING_BYTES};
use aya_ebpf::helpers::bpf_probe_read_user;
use aya_ebpf::helpers::generated::bpf_loop;
use aya_ebpf::macros::map;
use aya_ebpf::maps::{PerCpuArray, RingBuf};
use core::ffi::c_void;

#[map]
pub(super) static KEYSET_EVENTS: RingBuf = RingBuf::with_byte_size(KEYSET_RING_BYTES, 0);

/// Two windows of scratch: the carried bytes and up to a window of new bytes, or, without a
/// carry, up to two windows of new bytes (a request step's look past its window). Word-aligned,
/// so that a carry's tail is shifted out of it as words.
#[repr(C, align(8))]
pub(super) struct Scratch {
    bytes: [u8; 2 * WINDOW],
}

#[map]
pub(super) static LOOP_STATE: PerCpuArray<LoopCtx> = PerCpuArray::with_max_entries(1, 0);

#[map]
pub(super) static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
pub(super) struct KeysetEvent {
    header: KeysetHeader,
    bytes: [u8; KEYSET_MAX_BYTES],
}

/// Most tokenizer steps per buffer: a BRPOP takes one per key that ends within two windows of
/// its header (up to 57 bytes with a 2-digit length, when no carry comes first and the buffer
/// holds those bytes), two per longer one (its header, then its body jumped to its end and the
/// end read), three for the array's header, the command and the timeout, and one that ends the
/// loop: 444 for 440 keys of 30 bytes, 884 for 440 of 60.
pub(super) const MAX_STEPS: u32 = 4096;

/// Most iovecs followed per writev/readv/sendmsg/recvmsg.
pub(super) const MAX_IOVECS: u32 = 8;

pub(super) const DIR_REQUEST: u32 = 0;
pub(super) const DIR_REPLY: u32 = 1;

/// The state of one tokenizer loop. It lives in a per-CPU map rather than on the stack: the
/// verifier tracks stack values exactly and would re-verify the loop body for every position,
/// while map contents are opaque to it, so the body is verified once.
#[repr(C)]
pub(super) struct LoopCtx {
    /// The buffer being parsed: the whole buffer, or the current iovec.
    buf: u64,
    len: u64,
    pos: u64,
    /// For writev/readv/sendmsg/recvmsg: the iovec array, its length, the current index, and
    /// the bytes left to parse after the current iovec (reads end at the returned count).
    iov: u64,
    iov_count: u64,
    iov_index: u64,
    left_after: u64,
    now: u64,
    tgid: u32,
    fd: u32,
    dir: u32,
    failed: u32,
    /// The blocking call that filled the whole (plain) buffer, if one did: the connection's
    /// next repeat template. `template_call.command == 0` when none.
    template_call: BlockingCall,
}

/// Sends the request bytes `[start, end)` of the current buffer to user space.
#[inline(always)]
pub(super) fn send_keyset(ctx: &LoopCtx, signature: u64, keys: u32, start: u64, end: u64) -> bool {
    let Some(mut entry) = KEYSET_EVENTS.reserve::<KeysetEvent>(0) else {
        bump(ProbeCounter::KeysetLost);
        return false;
    };
    let event = entry.as_mut_ptr();
    let mut len = end.saturating_sub(start);
    if len > KEYSET_MAX_BYTES as u64 {
        len = KEYSET_MAX_BYTES as u64;
    }
    let len = (len as usize) & (KEYSET_MAX_BYTES - 1 + KEYSET_MAX_BYTES);
    let len = if len > KEYSET_MAX_BYTES {
        KEYSET_MAX_BYTES
    } else {
        len
    };
    unsafe {
        (*event).header = KeysetHeader {
            tgid: ctx.tgid,
            fd: ctx.fd,
            signature,
            len: len as u32,
            keys,
        };
        let dst = (*event).bytes.as_mut_ptr();
        let ok = aya_ebpf::helpers::generated::bpf_probe_read_user(
            dst.cast(),
            len as u32,
            (ctx.buf + start) as *const c_void,
        ) == 0;
        if !ok {
            entry.discard(crate::maps::BPF_RB_NO_WAKEUP);
            return false;
        }
    }
    entry.submit(crate::maps::BPF_RB_NO_WAKEUP);
    true
}

/// Fills the scratch with the carried bytes and the next new bytes, up to `LIMIT` bytes in all
/// (`WINDOW`, or `AHEAD` for a request step's look past its window); returns the scratch, the
/// carry length, how many new bytes the window took and how many were read, or `None` on a
/// failed read.
#[inline(always)]
pub(super) fn fill_window<const LIMIT: usize>(
    ctx: &mut LoopCtx,
    carry: &Carry,
) -> Option<(*mut Scratch, usize, usize, usize)> {
    let scratch = SCRATCH.get_ptr_mut(0)?;
    let bytes = unsafe { &mut (*scratch).bytes };
    let c = (carry.len as usize) & (WINDOW - 1);
    // Copy the whole carry buffer, when there is one (rarely: a token cut by the end of a
    // buffer): bytes past its length are overwritten or never looked at.
    if c > 0 {
        let mut i = 0;
        while i < WINDOW {
            bytes[i] = carry.bytes[i];
            i += 1;
        }
    }
    let remaining = ctx.len.saturating_sub(ctx.pos);
    // The look past the window only without a carry (a carry is rare: a token cut by the end
    // of a buffer): the verifier bounds the read by its largest offset plus its largest size.
    let (at, room) = if c == 0 { (0, LIMIT) } else { (c, WINDOW - c) };
    let mut read = room as u64;
    if remaining < read {
        read = remaining;
    }
    let read = (read as usize) & (4 * WINDOW - 1);
    let fits = if at == 0 {
        read <= 2 * WINDOW
    } else {
        read <= WINDOW
    };
    if !fits {
        // Cannot happen (`read <= room`): said for the verifier.
        ctx.failed = 1;
        return None;
    }
    if read > 0 {
        let rc = unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_user(
                bytes.as_mut_ptr().add(at & (WINDOW - 1)).cast(),
                read as u32,
                (ctx.buf + ctx.pos) as *const c_void,
            )
        };
        if rc != 0 {
            ctx.failed = 1;
            return None;
        }
    }
    let take = if read < WINDOW - c { read } else { WINDOW - c };
    // The tokenizer's contract: the byte after the data is not a digit (when the data ends
    // inside the scratch).
    if c + read < 2 * WINDOW {
        bytes[(c + read) & (2 * WINDOW - 1)] = 0;
    }
    Some((scratch, c, take, read))
}

/// Applies a step's result to the carry and the position; returns 1 to stop the loop.
#[inline(always)]
pub(super) fn advance(
    ctx: &mut LoopCtx,
    carry: &mut Carry,
    scratch: *mut Scratch,
    step: Step,
    c: usize,
    take: usize,
) -> i64 {
    let bytes = unsafe { &(*scratch).bytes };
    match step {
        Step::Consumed(n) => {
            // Up to the whole scratch: a request step may consume a key past its window.
            let n = n & (4 * WINDOW - 1);
            let n = if n > 2 * WINDOW { 2 * WINDOW } else { n };
            if n >= c {
                ctx.pos += (n - c) as u64;
                carry.len = 0;
            } else {
                // Keep the unconsumed part of the carry (rare: a skip inside carried bytes),
                // shifted as words (`resp::shifted_window`): as a loop of byte copies, unrolled,
                // the compiler computed the 32 shifted addresses ahead and spilled them, a stack
                // frame that (with its callers') passed the 512 bytes a call chain may use where
                // uprobe programs get no private stack. `n < c < WINDOW`: the tail lies in the
                // scratch.
                let words =
                    unsafe { &*(bytes as *const [u8; 2 * WINDOW] as *const [u64; 2 * WINDOW / 8]) };
                let tail = shifted_window(words, n);
                let mut k = 0;
                while k < WINDOW / 8 {
                    // The carry is 4-aligned inside the connection's state.
                    unsafe {
                        core::ptr::write_unaligned(
                            carry.bytes.as_mut_ptr().add(8 * k) as *mut u64,
                            tail[k],
                        )
                    };
                    k += 1;
                }
                carry.len = (c - n) as u32;
            }
            0
        }
        Step::NeedMore => {
            let avail = c + take;
            if avail >= WINDOW {
                ctx.failed = 1;
                return 1;
            }
            let mut j = 0;
            while j < WINDOW {
                carry.bytes[j] = bytes[j];
                j += 1;
            }
            carry.len = avail as u32;
            ctx.pos += take as u64;
            // A token cut by the end of an iovec goes on in the next one, carried, as it does
            // across two writes: a header, or the last bytes of a key whose hash reads them.
            if ctx.iov != 0 && ctx.iov_index + 1 < ctx.iov_count && ctx.left_after > 0 {
                0
            } else {
                1
            }
        }
        Step::Invalid => {
            ctx.failed = 1;
            1
        }
    }
}

/// Moves to the next iovec with bytes when the current one is parsed; false when there is
/// none. Empty iovecs are passed over (a step on one would stop the loop and leave the rest
/// of the buffer unread).
#[inline(always)]
pub(super) fn next_iovec(ctx: &mut LoopCtx) -> bool {
    let mut i = 0;
    while i < MAX_IOVECS {
        if ctx.pos < ctx.len {
            return true;
        }
        let next = ctx.iov_index + 1;
        if next >= ctx.iov_count || next >= MAX_IOVECS as u64 || ctx.left_after == 0 {
            return false;
        }
        let Ok(v) =
            (unsafe { bpf_probe_read_user((ctx.iov as *const IoVec).add((next & 15) as usize)) })
        else {
            return false;
        };
        ctx.iov_index = next;
        ctx.buf = v.base;
        ctx.len = if v.len < ctx.left_after {
            v.len
        } else {
            ctx.left_after
        };
        ctx.left_after -= ctx.len;
        ctx.pos = 0;
        i += 1;
    }
    ctx.pos < ctx.len
}

/// What a tokenizer step works on, handed to `bpf_loop`'s callback through its context
/// argument (a pointer to the caller's stack): the connection's map value, found once per
/// buffer rather than by a hash lookup in every step.
#[repr(C)]
pub(super) struct LoopArgs {
    conn: *mut ConnState,
}

/// The connection of a step.
#[inline(always)]
pub(super) fn loop_conn(args: *mut c_void) -> Option<&'static mut ConnState> {
    if args.is_null() {
        return None;
    }
    let conn = unsafe { (*(args as *const LoopArgs)).conn };
    if conn.is_null() {
        return None;
    }
    Some(unsafe { &mut *conn })
}

/// One request-side step; returns 1 to stop the loop.
pub(super) extern "C" fn step_request(_index: u32, args: *mut c_void) -> i64 {
    let Some(ctx) = LOOP_STATE.get_ptr_mut(0) else {
        return 1;
    };
    let ctx = unsafe { &mut *ctx };
    let Some(conn) = loop_conn(args) else {
        return 1;
    };
    if ctx.pos >= ctx.len {
        if !next_iovec(ctx) {
            return 1;
        }
        // A command that spans iovecs cannot be sent from one buffer.
        if !conn.request.at_command_boundary() || conn.request_carry.len != 0 {
            conn.command_start = u64::MAX;
        }
    }
    let remaining = ctx.len.saturating_sub(ctx.pos);
    // Bulk bodies are jumped over without being read.
    if conn.request_carry.len == 0 && conn.request.pending_skip() > 0 {
        if remaining == 0 {
            return 1;
        }
        let (n, call) = conn.request.skip_bytes(remaining);
        ctx.pos += n;
        if let Some(call) = call {
            on_call(ctx, conn, call);
        }
        // A long key's body was jumped up to its last bytes: read them in this step, not the
        // next, so that such a key costs two steps in all (its header's, then this one).
        if conn.request.tail_pending == 0 || ctx.pos >= ctx.len {
            return 0;
        }
    }
    let Some((scratch, c, take, read)) = fill_window::<AHEAD>(ctx, &conn.request_carry) else {
        return 1;
    };
    let avail = c + take;
    if avail == 0 {
        return 1;
    }
    if conn.request.at_command_boundary() {
        conn.command_start = if c == 0 { ctx.pos } else { u64::MAX };
    }
    let Some(opaque) = MapOpaque::get() else {
        return 1;
    };
    let (step, call) = conn
        .request
        .step_with(unsafe { &(*scratch).bytes }, c + read, &opaque);
    if let (Step::Consumed(n), Some(call)) = (step, call) {
        let saved = ctx.pos;
        ctx.pos += ((n & (4 * WINDOW - 1)) as u64).saturating_sub(c as u64);
        on_call(ctx, conn, call);
        ctx.pos = saved;
    }
    advance(ctx, &mut conn.request_carry, scratch, step, c, take)
}

/// One reply-side step; returns 1 to stop the loop.
pub(super) extern "C" fn step_reply(_index: u32, args: *mut c_void) -> i64 {
    let Some(ctx) = LOOP_STATE.get_ptr_mut(0) else {
        return 1;
    };
    let ctx = unsafe { &mut *ctx };
    let Some(conn) = loop_conn(args) else {
        return 1;
    };
    if ctx.pos >= ctx.len && !next_iovec(ctx) {
        return 1;
    }
    let remaining = ctx.len.saturating_sub(ctx.pos);
    if conn.reply_carry.len == 0 && conn.reply.pending_skip() > 0 {
        if remaining == 0 {
            return 1;
        }
        ctx.pos += conn.reply.skip_bytes(remaining);
        return 0;
    }
    let Some((scratch, c, take, _)) = fill_window::<WINDOW>(ctx, &conn.reply_carry) else {
        return 1;
    };
    let avail = c + take;
    if avail == 0 {
        return 1;
    }
    let window: &[u8; WINDOW] = unsafe { &*((*scratch).bytes.as_ptr() as *const [u8; WINDOW]) };
    let Some(opaque) = MapOpaque::get() else {
        return 1;
    };
    let (step, start) = conn.reply.step_with(window, avail, &opaque);
    if let Some(start) = start {
        // The tokenizer does not keep the reply's bytes: its key is not told.
        reply_began(
            conn,
            ctx.tgid,
            ctx.fd,
            start.index,
            start.kind,
            fastpath::SERVED_KEY_UNKNOWN,
            ctx.now,
        );
    }
    advance(ctx, &mut conn.reply_carry, scratch, step, c, take)
}

/// A blocking call the tokenizer found: start its clock, count its keys, send its key list
/// if it changed, and note whether it filled its buffer alone (a template for its repeats).
#[inline(always)]
pub(super) fn on_call(ctx: &mut LoopCtx, conn: &mut ConnState, call: BlockingCall) {
    start_pop(conn, ctx.tgid, ctx.now, &call);
    if call.signature != conn.keyset_sent && conn.command_start != u64::MAX {
        if send_keyset(ctx, call.signature, call.keys, conn.command_start, ctx.pos) {
            conn.keyset_sent = call.signature;
        }
    }
    if conn.command_start == 0 && ctx.iov == 0 && ctx.pos == ctx.len && ctx.left_after == 0 {
        ctx.template_call = call;
    }
}

/// Runs the tokenizer over one buffer of one direction; returns the blocking call that filled
/// a plain buffer alone, if one did.
/// `iov`/`iov_count` describe an iovec array (then `buf`/`len` are its first element and
/// `total` bounds the bytes over all of them); 0 for a plain buffer.
#[inline(always)]
pub(super) fn follow(
    conn: *mut ConnState,
    tgid: u32,
    fd: u32,
    dir: u32,
    buf: u64,
    len: u64,
    iov: u64,
    iov_count: u64,
    total: u64,
    now: u64,
) -> Option<BlockingCall> {
    if total == 0 {
        return None;
    }
    let state = LOOP_STATE.get_ptr_mut(0)?;
    let first = if len < total { len } else { total };
    unsafe {
        *state = LoopCtx {
            buf,
            len: first,
            pos: 0,
            iov,
            iov_count,
            iov_index: 0,
            left_after: total - first,
            now,
            tgid,
            fd,
            dir,
            failed: 0,
            template_call: BlockingCall::default(),
        }
    };
    let callback = if dir == DIR_REQUEST {
        step_request as *mut c_void
    } else {
        step_reply as *mut c_void
    };
    let mut args = LoopArgs { conn };
    unsafe {
        bpf_loop(
            MAX_STEPS,
            callback,
            &mut args as *mut LoopArgs as *mut c_void,
            0,
        );
    }
    let (pos, len, failed, left) = unsafe {
        (
            (*state).pos,
            (*state).len,
            (*state).failed,
            (*state).left_after,
        )
    };
    let conn = unsafe { &mut *conn };
    if failed != 0
        || pos < len
        || (iov_count > 1
            && left > 0
            && unsafe { (*state).iov_index } + 1 < iov_count.min(MAX_IOVECS as u64))
    {
        // Not RESP any more, or too much to follow: stop until a write starts a command.
        conn.kind = KIND_DESYNCED;
        conn.pop.active = 0;
        bump(ProbeCounter::RespDesync);
        return None;
    }
    let template = unsafe { (*state).template_call };
    (template.command != 0).then_some(template)
}
