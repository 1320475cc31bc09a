//! Worker-side probes: the RESP that tracked worker processes write and read, followed per
//! connection with the shared tokenizer (`agent_common::resp`) and its shortcuts
//! (`agent_common::fastpath`), on syscall tracepoints or on uprobes in the worker's libc.
//!
//! The tracepoint programs first check the caller's tgid against the `SYSCALL_WORKERS`
//! bitmap: other processes (redis-server included) pay one inlined load. The uprobe programs
//! run only in the worker they are attached to. The tokenizer reads bulk headers and a few
//! short arguments and skips bulk bodies (job payloads) by length; the shortcuts look at a
//! buffer's first 128 bytes. All of it stays in per-CPU scratch: only a connection's full
//! request leaves the kernel, and only when its key list changes.

use core::ffi::c_void;

use agent_common::{
    fastpath::{self, RepeatTemplate, HASH_CHUNK, HASH_WORDS, MAX_TEMPLATE_BYTES, QUICK_WINDOW},
    pidset,
    redis::KeyHistogram,
    resp::{reply_kind, BlockingCall, Carry, Opaque, Step, WINDOW},
    sched::{Log2Histogram, ProbeCounter},
    worker::{
        conn_kind, io_site, not_resp_slot, outcome, via, ConnKey, ConnState, HistogramSlots,
        KeysetHeader, Peer, PendingRead, ServedKey, WorkerHistKey, WorkerKeysKey, KEYSET_MAX_BYTES,
        KEYSET_RING_BYTES, MAX_CONNECTIONS, MAX_SERVED_KEYS, MAX_WORKER_HISTOGRAMS,
        MAX_WORKER_PROCESSES, NOT_RESP_SLOTS,
    },
};
use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
        generated::{bpf_get_attach_cookie, bpf_get_current_task_btf, bpf_loop, bpf_task_pt_regs},
    },
    macros::{map, tracepoint, uprobe, uretprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, Queue, RingBuf},
    programs::{ProbeContext, RetProbeContext, TracePointContext},
    EbpfContext,
};

use crate::{
    counters::bump,
    maps::{cached_slot, tp_field},
};

/// The workers followed through the syscall tracepoints, as a pid bitmap (written by the
/// agent only): the tracepoints run for every process on the host, and almost none is one.
#[map]
static SYSCALL_WORKERS: Array<u64> = Array::with_max_entries(pidset::WORDS, 0);
#[map]
static CONNS: LruHashMap<ConnKey, ConnState> = LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);
#[map]
static CONN_PEERS: LruHashMap<ConnKey, Peer> = LruHashMap::with_max_entries(MAX_CONNECTIONS, 0);
/// connect() calls per followed worker: the agent looks at a worker's new connections when
/// its count moves (an evicted entry reads as a move), instead of walking `CONN_PEERS` every
/// second.
#[map]
static CONNECTS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(MAX_WORKER_PROCESSES, 0);
/// pid_tgid -> arguments of a read in progress.
#[map]
static PENDING_READS: LruHashMap<u64, PendingRead> =
    LruHashMap::with_max_entries(MAX_WORKER_PROCESSES * 4, 0);
/// Duration and fan-out histograms in per-CPU array slots, found through their keys' slot
/// maps and taken from queues of free slots (see `agent_common::sched::SchedHistograms`);
/// each connection remembers its slots, so a pop costs array indexes, not hashes.
#[map]
static WORKER_DUR_HISTS: PerCpuArray<Log2Histogram> =
    PerCpuArray::with_max_entries(MAX_WORKER_HISTOGRAMS, 0);
#[map]
static WK_DUR_SLOTS: HashMap<WorkerHistKey, u32> =
    HashMap::with_max_entries(MAX_WORKER_HISTOGRAMS, 0);
#[map]
static WK_DUR_FREE: Queue<u32> = Queue::with_max_entries(MAX_WORKER_HISTOGRAMS, 0);
#[map]
static WORKER_KEYS_HISTS: PerCpuArray<KeyHistogram> =
    PerCpuArray::with_max_entries(MAX_WORKER_HISTOGRAMS, 0);
#[map]
static WK_KEY_SLOTS: HashMap<WorkerKeysKey, u32> =
    HashMap::with_max_entries(MAX_WORKER_HISTOGRAMS, 0);
#[map]
static WK_KEY_FREE: Queue<u32> = Queue::with_max_entries(MAX_WORKER_HISTOGRAMS, 0);
/// Served pops by (process, peer, key that served them), for `fanout advise`.
#[map]
static SERVED_KEYS: PerCpuHashMap<ServedKey, u64> =
    PerCpuHashMap::with_max_entries(MAX_SERVED_KEYS, 0);
#[map]
static KEYSET_EVENTS: RingBuf = RingBuf::with_byte_size(KEYSET_RING_BYTES, 0);

/// Two windows of scratch: the carried bytes, then up to a window of new bytes.
#[repr(C)]
pub struct Scratch {
    bytes: [u8; 2 * WINDOW],
}
#[map]
static LOOP_STATE: PerCpuArray<LoopCtx> = PerCpuArray::with_max_entries(1, 0);
#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);
/// The chunk of a request being hashed (see `agent_common::fastpath`).
#[map]
static HASH_SCRATCH: PerCpuArray<[u64; HASH_WORDS]> = PerCpuArray::with_max_entries(1, 0);
/// The first bytes of a buffer, for `fastpath::quick_reply` and `fastpath::quick_request`.
#[map]
static QUICK_SCRATCH: PerCpuArray<[u64; QUICK_WINDOW / 8]> = PerCpuArray::with_max_entries(1, 0);
/// A zero the verifier cannot know: nothing ever writes this slot, and the verifier reads a
/// map value as an unknown number (see `resp::Opaque`).
#[map]
static OPAQUE: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `resp::Opaque` for the probes: a value plus the zero of `OPAQUE`, loaded once per parse.
/// The result is the value, and to the verifier an unknown number: adding an unknown loses
/// every bit and bound (an OR would keep the value's known bits, so paths that differ in them
/// would still not merge). One ALU instruction per value: passing each value through the
/// map's memory instead put a store and a dependent load (and, at first, a lookup) on the
/// parse's critical path, a dozen times per plain command.
#[derive(Clone, Copy)]
struct MapOpaque(u64);

impl MapOpaque {
    #[inline(always)]
    fn get() -> Option<Self> {
        OPAQUE
            .get_ptr(0)
            .map(|zero| Self(unsafe { core::ptr::read_volatile(zero) }))
    }

    /// Hides one value where no `MapOpaque` is at hand (0 if the lookup fails, which it
    /// cannot).
    #[inline(always)]
    fn hide_once(x: u64) -> u64 {
        Self::get().map_or(0, |o| o.hide(x))
    }
}

impl Opaque for MapOpaque {
    #[inline(always)]
    fn hide(&self, x: u64) -> u64 {
        x.wrapping_add(self.0)
    }
}

/// All-zero templates for entries larger than the stack allows.
#[map]
static ZERO_CONN: PerCpuArray<ConnState> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
pub struct KeysetEvent {
    header: KeysetHeader,
    bytes: [u8; KEYSET_MAX_BYTES],
}

/// Most tokenizer steps per buffer: a 440-key BRPOP takes about 445.
const MAX_STEPS: u32 = 4096;
/// Most iovecs followed per writev/readv/sendmsg/recvmsg.
const MAX_IOVECS: u32 = 8;

/// The `io_site` bits a cookie may carry.
const WRITE_SITE_BITS: u32 = io_site::GENERIC | io_site::SOCKET;

const DIR_REQUEST: u32 = 0;
const DIR_REPLY: u32 = 1;
/// `ConnState::kind` of a connection whose bytes stopped parsing: ignored until a write that
/// starts a command (`*`) resets it.
const KIND_DESYNCED: u32 = 3;

// Syscall tracepoint layout (/sys/kernel/tracing/events/syscalls/sys_enter_*/format):
// args at offsets 16, 24, 32 (8 bytes each); sys_exit_*: `long ret` at 16.
const ARG0: usize = 16;
const ARG1: usize = 24;
const ARG2: usize = 32;
const RET: usize = 16;
/// `int __syscall_nr` of a syscall tracepoint's record.
const SYSCALL_NR: usize = 8;
/// `__NR_write` and `__NR_read` on x86_64 (the agent's only target; `__NR_sendto` is 44,
/// `__NR_recvfrom` 45).
const NR_WRITE: i32 = 1;
const NR_READ: i32 = 0;
/// Offsets in x86-64's `struct pt_regs` (the layout ptrace exposes too): the user registers
/// saved at a syscall's entry, where its arguments still are at its exit.
const PT_REGS_RSI: u64 = 104;
const PT_REGS_RDI: u64 = 112;

#[inline(always)]
fn worker_tgid(via: u32) -> Option<(u32, u64)> {
    let id = bpf_get_current_pid_tgid();
    let tgid = (id >> 32) as u32;
    // The tracepoints run for every process on the host: they follow the workers in the
    // SYSCALL_WORKERS bitmap (one inlined load). The uprobes are attached to one worker
    // process each and run nowhere else, so they ask nothing. A worker is never in the bitmap
    // while its uprobes are attached (the agent clears the bit first), or it would be
    // followed twice.
    if via == via::SYSCALLS {
        let word = SYSCALL_WORKERS.get(pidset::word(tgid))?;
        if *word & pidset::bit(tgid) == 0 {
            return None;
        }
    }
    Some((tgid, id))
}

/// The state of one tokenizer loop. It lives in a per-CPU map rather than on the stack: the
/// verifier tracks stack values exactly and would re-verify the loop body for every position,
/// while map contents are opaque to it, so the body is verified once.
#[repr(C)]
pub struct LoopCtx {
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

/// Forgets the connection's histogram slots when what they were found for changes: the
/// command it blocks with, or its peer.
#[inline(always)]
fn slots_for(conn: &mut ConnState, command: u32) {
    if conn.slots.command != command {
        conn.slots = HistogramSlots {
            command,
            ..HistogramSlots::default()
        };
    }
}

/// Records how long a pop waited, through the connection's cached slot for its outcome.
#[inline(always)]
fn record_duration(conn: &mut ConnState, tgid: u32, result: u32, ns: u64) {
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
fn record_keys(conn: &mut ConnState, tgid: u32, command: u32, keys: u32) {
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
fn count_served_key(tgid: u32, peer: Peer, key_hash: u64) {
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
fn finish_pop(conn: &mut ConnState, tgid: u32, fd: u32, result: u32, served_key: u64, now: u64) {
    if conn.pop.active == 0 {
        return;
    }
    conn.pop.active = 0;
    if conn.peer.family == 0 {
        // Connected before the process was followed: the agent finds the peer in /proc.
        if let Some(peer) = unsafe { CONN_PEERS.get(&ConnKey { tgid, fd }) } {
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

/// Sends the request bytes `[start, end)` of the current buffer to user space.
#[inline(always)]
fn send_keyset(ctx: &LoopCtx, signature: u64, keys: u32, start: u64, end: u64) -> bool {
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

/// Fills the scratch window with the carried bytes and the next new bytes; returns the
/// scratch, the carry length and how many new bytes were taken, or `None` on a failed read.
#[inline(always)]
fn fill_window(ctx: &mut LoopCtx, carry: &Carry) -> Option<(*mut Scratch, usize, usize)> {
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
    let mut take = (WINDOW - c) as u64;
    if remaining < take {
        take = remaining;
    }
    let take = (take as usize) & (2 * WINDOW - 1);
    if take > 0 && take <= WINDOW {
        let rc = unsafe {
            aya_ebpf::helpers::generated::bpf_probe_read_user(
                bytes.as_mut_ptr().add(c).cast(),
                take as u32,
                (ctx.buf + ctx.pos) as *const c_void,
            )
        };
        if rc != 0 {
            ctx.failed = 1;
            return None;
        }
    }
    // The tokenizer's contract: the byte after the data is not a digit.
    bytes[(c + take) & (2 * WINDOW - 1)] = 0;
    Some((scratch, c, take))
}

/// Applies a step's result to the carry and the position; returns 1 to stop the loop.
#[inline(always)]
fn advance(
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
            let n = n & (2 * WINDOW - 1);
            if n >= c {
                ctx.pos += (n - c) as u64;
                carry.len = 0;
            } else {
                // Keep the unconsumed part of the carry (rare: a skip inside carried bytes).
                let mut j = 0;
                while j < WINDOW {
                    carry.bytes[j] = bytes[(j + n) & (2 * WINDOW - 1)];
                    j += 1;
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
            1
        }
        Step::Invalid => {
            ctx.failed = 1;
            1
        }
    }
}

/// Moves to the next iovec when the current one is parsed; false when there is none.
#[inline(always)]
fn next_iovec(ctx: &mut LoopCtx) -> bool {
    while ctx.pos >= ctx.len {
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
        return true;
    }
    true
}

/// What a tokenizer step works on, handed to `bpf_loop`'s callback through its context
/// argument (a pointer to the caller's stack): the connection's map value, found once per
/// buffer rather than by a hash lookup in every step.
#[repr(C)]
struct LoopArgs {
    conn: *mut ConnState,
}

/// The connection of a step.
#[inline(always)]
fn loop_conn(args: *mut c_void) -> Option<&'static mut ConnState> {
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
extern "C" fn step_request(_index: u32, args: *mut c_void) -> i64 {
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
        return 0;
    }
    let Some((scratch, c, take)) = fill_window(ctx, &conn.request_carry) else {
        return 1;
    };
    let avail = c + take;
    if avail == 0 {
        return 1;
    }
    if conn.request.at_command_boundary() {
        conn.command_start = if c == 0 { ctx.pos } else { u64::MAX };
    }
    let window: &[u8; WINDOW] = unsafe { &*((*scratch).bytes.as_ptr() as *const [u8; WINDOW]) };
    let Some(opaque) = MapOpaque::get() else {
        return 1;
    };
    let (step, call) = conn.request.step_with(window, avail, &opaque);
    if let (Step::Consumed(n), Some(call)) = (step, call) {
        let saved = ctx.pos;
        ctx.pos += ((n & (2 * WINDOW - 1)) as u64).saturating_sub(c as u64);
        on_call(ctx, conn, call);
        ctx.pos = saved;
    }
    advance(ctx, &mut conn.request_carry, scratch, step, c, take)
}

/// One reply-side step; returns 1 to stop the loop.
extern "C" fn step_reply(_index: u32, args: *mut c_void) -> i64 {
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
    let Some((scratch, c, take)) = fill_window(ctx, &conn.reply_carry) else {
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

/// A top-level reply began (number `index` on its connection, of `reply_kind` `kind`): if it
/// is the reply of the waiting pop, the pop ends, served (under `served_key`), timed out or
/// failed.
#[inline(always)]
fn reply_began(
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
fn start_pop(conn: &mut ConnState, tgid: u32, now: u64, call: &BlockingCall) {
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

/// A blocking call the tokenizer found: start its clock, count its keys, send its key list
/// if it changed, and note whether it filled its buffer alone (a template for its repeats).
#[inline(always)]
fn on_call(ctx: &mut LoopCtx, conn: &mut ConnState, call: BlockingCall) {
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

/// Hashing state of a request buffer. It lives in a per-CPU map, as the tokenizer's does,
/// so that the verifier checks the loop body once rather than once per position.
#[repr(C)]
pub struct HashState {
    buf: u64,
    len: u64,
    pos: u64,
    hash: u64,
    failed: u64,
}
#[map]
static HASH_STATE: PerCpuArray<HashState> = PerCpuArray::with_max_entries(1, 0);

/// Folds the next chunk of the buffer into the hash; returns 1 at the end (or on a failed
/// read).
#[inline(always)]
fn hash_next_chunk() -> i64 {
    let (Some(state), Some(words), Some(opaque)) = (
        HASH_STATE.get_ptr_mut(0),
        HASH_SCRATCH.get_ptr_mut(0),
        MapOpaque::get(),
    ) else {
        return 1;
    };
    let (state, words) = unsafe { (&mut *state, &mut *words) };
    let left = state.len.saturating_sub(state.pos);
    if left == 0 {
        return 1;
    }
    let Some(n) =
        read_user_prefix::<HASH_CHUNK>(
            words.as_mut_ptr().cast(),
            state.buf + state.pos,
            left,
            &opaque,
        )
    else {
        state.failed = 1;
        return 1;
    };
    state.hash = fastpath::hash_chunk(state.hash, words, n);
    state.pos += n;
    (state.pos >= state.len) as i64
}

extern "C" fn hash_step(_index: u32, _args: *mut c_void) -> i64 {
    hash_next_chunk()
}

/// `fastpath`'s hash of a request buffer of `len` bytes (at most `MAX_TEMPLATE_BYTES`).
#[inline(never)]
fn request_hash(buf: u64, len: u64) -> Option<u64> {
    if len == 0 || len > MAX_TEMPLATE_BYTES {
        return None;
    }
    let state = HASH_STATE.get_ptr_mut(0)?;
    unsafe {
        *state = HashState {
            buf,
            len,
            pos: 0,
            hash: fastpath::hash_start(len),
            failed: 0,
        }
    };
    // The common case (a short command) in one chunk, without a loop.
    if hash_next_chunk() == 0 {
        unsafe {
            bpf_loop(
                (MAX_TEMPLATE_BYTES / HASH_CHUNK as u64) as u32,
                hash_step as *mut c_void,
                core::ptr::null_mut(),
                0,
            );
        }
    }
    let state = unsafe { &*state };
    (state.failed == 0 && state.pos == len).then_some(state.hash)
}

/// A write that repeats the connection's template byte for byte: the same blocking call
/// again, counted without the tokenizer. Returns false when the write is anything else; then
/// `hash` holds the buffer's hash if it was computed.
#[inline(always)]
fn repeat_call(
    conn: &mut ConnState,
    tgid: u32,
    buf: u64,
    len: u64,
    hash: &mut Option<u64>,
) -> bool {
    let template = conn.repeat;
    if template.len != len
        || template.signature != conn.keyset_sent
        || !conn.request.at_command_boundary()
        || conn.request_carry.len != 0
    {
        return false;
    }
    *hash = request_hash(buf, len);
    if *hash != Some(template.hash) {
        return false;
    }
    let call = BlockingCall {
        command: template.command,
        keys: template.keys,
        signature: template.signature,
        index: conn.request.commands,
    };
    conn.request.commands += 1;
    start_pop(conn, tgid, unsafe { bpf_ktime_get_ns() }, &call);
    true
}

/// Runs the tokenizer over one buffer of one direction; returns the blocking call that filled
/// a plain buffer alone, if one did.
/// `iov`/`iov_count` describe an iovec array (then `buf`/`len` are its first element and
/// `total` bounds the bytes over all of them); 0 for a plain buffer.
#[inline(always)]
fn follow(
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

/// (tgid, fd) of descriptors a worker writes to that are not connections (pipes, eventfds,
/// files), by a hash of the pair (`agent_common::worker::not_resp_slot`): a write to one of
/// them costs one inlined array load, without reading the worker's buffer (a Ruby worker
/// writes two log lines and a warning per job; reading a byte of each cost more than the rest
/// of the probe). Only descriptors without a peer enter it, so no socket ever does: sockets
/// connected while the worker is followed get a peer at connect(), and those it had before are
/// seeded with their peers from /proc, their slots cleared, when it starts being followed.
/// Closing a descriptor, or connecting it, clears its slot. What it cannot see: a socket
/// moved onto a cached descriptor number with dup2() and no close() (no Redis client does
/// that); the slot of a pair overwritten by another pair only costs a lookup.
#[map]
static NOT_RESP: Array<u64> = Array::with_max_entries(NOT_RESP_SLOTS, 0);

/// Forgets that (tgid, fd) is not a connection (it is one now, or it was closed).
#[inline(always)]
fn clear_not_resp(key: &ConnKey) {
    let (slot, tag) = not_resp_slot(key);
    if let Some(cached) = NOT_RESP.get_ptr_mut(slot) {
        unsafe {
            if *cached == tag {
                *cached = 0;
            }
        }
    }
}

/// The connection state for a write, created (and classified) on the first one.
#[inline(always)]
fn conn_for_write(tgid: u32, fd: u32, buf: u64) -> Option<*mut ConnState> {
    let key = ConnKey { tgid, fd };
    let (slot, tag) = not_resp_slot(&key);
    if NOT_RESP.get(slot).is_some_and(|cached| *cached == tag) {
        return None;
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
        if unsafe { CONN_PEERS.get(&key) }.is_none() {
            if let Some(cached) = NOT_RESP.get_ptr_mut(slot) {
                unsafe { *cached = tag };
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
    if let Some(peer) = unsafe { CONN_PEERS.get(&key) } {
        state.peer = *peer;
    }
    Some(conn)
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IoVec {
    base: u64,
    len: u64,
}

/// A write of `total` bytes: a plain buffer (`iov == 0`) or an iovec array; `site` is the
/// `io_site` bit of the function it came through (0 when not told).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn on_write(
    tgid: u32,
    fd: u32,
    buf: u64,
    len: u64,
    iov: u64,
    iov_count: u64,
    total: u64,
    site: u32,
) {
    if total == 0 {
        return;
    }
    let (buf, len) = if iov != 0 {
        if iov_count == 0 {
            return;
        }
        match unsafe { bpf_probe_read_user(iov as *const IoVec) } {
            Ok(v) => (v.base, v.len),
            Err(_) => return,
        }
    } else {
        (buf, len)
    };
    if len == 0 && iov_count <= 1 {
        return;
    }
    let Some(conn) = conn_for_write(tgid, fd, buf) else {
        return;
    };
    let state = unsafe { &mut *conn };
    // Which function carries this connection's commands: the agent takes the probe off
    // `write` for a worker that never sends through it.
    state.write_sites |= site;
    let mut hash = None;
    if iov == 0 && repeat_call(state, tgid, buf, len, &mut hash) {
        return;
    }
    if iov == 0 && quick_command(state, buf, len) {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
    if !state.request.at_command_boundary() || state.request_carry.len != 0 {
        state.command_start = u64::MAX;
    }
    let Some(call) = follow(
        conn,
        tgid,
        fd,
        DIR_REQUEST,
        buf,
        len,
        iov,
        iov_count,
        total,
        now,
    ) else {
        return;
    };
    // The buffer held this one blocking call: remember it, so that its repeats skip the
    // tokenizer. Only once its key list reached user space, which a repeat never sends.
    let state = unsafe { &mut *conn };
    if call.signature != state.keyset_sent {
        return;
    }
    let hash = match hash {
        Some(h) => Some(h),
        None => request_hash(buf, len),
    };
    if let Some(hash) = hash {
        state.repeat = RepeatTemplate {
            len,
            hash,
            signature: call.signature,
            command: call.command,
            keys: call.keys,
        };
    }
}

/// Total bytes of an iovec array (bounded by MAX_IOVECS elements).
#[inline(always)]
fn iov_total(iov: u64, count: u64) -> u64 {
    let mut total = 0u64;
    let mut i = 0u64;
    while i < MAX_IOVECS as u64 {
        if i >= count {
            break;
        }
        match unsafe { bpf_probe_read_user((iov as *const IoVec).add(i as usize)) } {
            Ok(v) => total += v.len,
            Err(_) => break,
        }
        i += 1;
    }
    // Whatever the number of iovecs, one path from here on.
    MapOpaque::hide_once(total)
}

// The handlers below take plain arguments, so that the same logic serves two kinds of
// attachment: syscall tracepoints (every process pays the tgid filter) and uprobes on the libc
// functions of each worker process (only workers pay). Tracepoint programs read the arguments
// at the syscall-format offsets; uprobe programs read them from registers.

#[inline(always)]
fn handle_write(fd: u64, buf: u64, len: u64, via: u32, site: u32) {
    let Some((tgid, _)) = worker_tgid(via) else {
        return;
    };
    on_write(tgid, fd as u32, buf, len, 0, 0, len, site);
}

#[inline(always)]
fn handle_writev(fd: u64, iov: u64, count: u64, via: u32) {
    let Some((tgid, _)) = worker_tgid(via) else {
        return;
    };
    let total = iov_total(iov, count);
    // The count's range was narrowed differently on each path of the summing loop.
    on_write(tgid, fd as u32, 0, 0, iov, MapOpaque::hide_once(count), total, 0);
}

/// `struct user_msghdr`: msg_iov at 16, msg_iovlen at 24.
#[inline(always)]
fn msghdr_iov(msg: u64) -> Option<(u64, u64)> {
    let iov: u64 = unsafe { bpf_probe_read_user((msg + 16) as *const u64) }.ok()?;
    let count: u64 = unsafe { bpf_probe_read_user((msg + 24) as *const u64) }.ok()?;
    Some((iov, count))
}

#[inline(always)]
fn handle_sendmsg(fd: u64, msg: u64, via: u32) {
    if let Some((iov, count)) = msghdr_iov(msg) {
        handle_writev(fd, iov, count, via);
    }
}

/// Saves a read's buffer for its exit, if the fd is a followed connection. `iov_kind`: 0 for
/// a buffer, 1 for readv (`arg2` is the count), 2 for recvmsg (`buf` is the msghdr); `site`
/// is the `io_site` bit of the function it came through (0 when not told).
#[inline(always)]
fn handle_read_enter(fd: u64, buf: u64, arg2: u64, iov_kind: u32, via: u32, site: u32) {
    let Some((tgid, id)) = worker_tgid(via) else {
        return;
    };
    if resp_conn_read_via(tgid, fd, site).is_none() {
        return;
    }
    let (buf, iovcnt) = match iov_kind {
        1 => (buf, arg2 as u32),
        2 => match msghdr_iov(buf) {
            Some((iov, count)) => (iov, count as u32),
            None => return,
        },
        _ => (buf, 0),
    };
    let pending = PendingRead {
        buf,
        fd: fd as u32,
        iovcnt: if iov_kind == 0 { 0 } else { iovcnt.max(1) },
    };
    // One entry per thread, rewritten in place: an LRU insert and delete per read cost more
    // than the rest of the probe.
    match PENDING_READS.get_ptr_mut(&id) {
        Some(slot) => unsafe { *slot = pending },
        None => {
            let _ = PENDING_READS.insert(&id, &pending, 0);
        }
    }
}

/// Reads the first bytes of a buffer (up to `fastpath::QUICK_WINDOW`) into the per-CPU
/// scratch for the shortcuts; returns them and how many were read.
#[inline(always)]
fn quick_window(
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
fn read_user_prefix<const CAP: usize>(
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
fn quick_command(conn: &mut ConnState, buf: u64, len: u64) -> bool {
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
fn quick_whole_reply(
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

/// Drops the read slot of an exiting thread (`id` = its pid_tgid): one entry per thread that
/// ever read, rewritten in place while it lives, so it must go when the thread does.
#[inline(always)]
pub(crate) fn forget_thread(id: u64) {
    let _ = PENDING_READS.remove(&id);
}

#[inline(always)]
fn handle_read_exit(ret: i64, via: u32) {
    let Some((tgid, id)) = worker_tgid(via) else {
        return;
    };
    let Some(slot) = PENDING_READS.get_ptr_mut(&id) else {
        return;
    };
    // A buffer address of 0 marks the slot as used up.
    let pending = unsafe { core::mem::replace(&mut *slot, PendingRead::NONE) };
    if pending.buf == 0 {
        return;
    }
    if ret < 0 {
        // EAGAIN on a non-blocking socket, EINTR: nothing arrived.
        return;
    }
    let key = ConnKey {
        tgid,
        fd: pending.fd,
    };
    let Some(conn) = CONNS.get_ptr_mut(&key) else {
        return;
    };
    complete_read(conn, tgid, pending, ret as u64);
}

/// The followed RESP connection `fd` of `tgid`, with `site` (an `io_site` bit, 0 for none)
/// added to the functions its replies are read through: the agent detaches sys_exit_read
/// while every worker reads through recvfrom.
#[inline(always)]
fn resp_conn_read_via(tgid: u32, fd: u64, site: u32) -> Option<*mut ConnState> {
    let conn = CONNS.get_ptr_mut(&ConnKey {
        tgid,
        fd: fd as u32,
    })?;
    unsafe {
        if (*conn).kind != conn_kind::RESP {
            return None;
        }
        if (*conn).read_sites & site != site {
            (*conn).read_sites |= site;
        }
    }
    Some(conn)
}

/// A plain read of `buf` on `fd` returned `ret` bytes, seen where it returned (no entry
/// probe): the connection is looked up now.
#[inline(always)]
fn read_returned(tgid: u32, fd: u64, buf: u64, ret: u64, site: u32) {
    let Some(conn) = resp_conn_read_via(tgid, fd, site) else {
        return;
    };
    let pending = PendingRead {
        buf,
        fd: fd as u32,
        iovcnt: 0,
    };
    complete_read(conn, tgid, pending, ret);
}

/// A read of `pending.buf` on connection `conn` (`pending.fd`) returned `ret` bytes.
#[inline(always)]
fn complete_read(conn: *mut ConnState, tgid: u32, pending: PendingRead, ret: u64) {
    // The clock only ends a waiting pop: a read on a connection with none (a cache
    // connection, a reply to a GET) does not read it.
    let now = if unsafe { (*conn).pop.active } != 0 {
        unsafe { bpf_ktime_get_ns() }
    } else {
        0
    };
    if ret == 0 {
        // EOF: the server closed the connection.
        finish_pop(
            unsafe { &mut *conn },
            tgid,
            pending.fd,
            outcome::ERROR,
            0,
            now,
        );
        return;
    }
    let total = ret;
    if pending.iovcnt == 0 {
        if quick_whole_reply(
            unsafe { &mut *conn },
            tgid,
            pending.fd,
            pending.buf,
            total,
            now,
        ) {
            return;
        }
        follow(
            conn,
            tgid,
            pending.fd,
            DIR_REPLY,
            pending.buf,
            total,
            0,
            0,
            total,
            now,
        );
    } else if let Ok(v) = unsafe { bpf_probe_read_user(pending.buf as *const IoVec) } {
        follow(
            conn,
            tgid,
            pending.fd,
            DIR_REPLY,
            v.base,
            v.len,
            pending.buf,
            pending.iovcnt as u64,
            total,
            now,
        );
    }
}

#[inline(always)]
fn handle_close(fd: u64, via: u32) {
    let Some((tgid, _)) = worker_tgid(via) else {
        return;
    };
    let key = ConnKey {
        tgid,
        fd: fd as u32,
    };
    if let Some(conn) = CONNS.get_ptr_mut(&key) {
        // Closed while a pop waited: the worker gave up on it.
        finish_pop(
            unsafe { &mut *conn },
            tgid,
            fd as u32,
            outcome::ERROR,
            0,
            unsafe { bpf_ktime_get_ns() },
        );
        let _ = CONNS.remove(&key);
    }
    let _ = CONN_PEERS.remove(&key);
    clear_not_resp(&key);
}

#[inline(always)]
fn handle_connect(fd: u64, addr: u64, via: u32) {
    let Some((tgid, _)) = worker_tgid(via) else {
        return;
    };
    let key = ConnKey {
        tgid,
        fd: fd as u32,
    };
    // A new connection on this fd: whatever was followed on it before is over.
    let _ = CONNS.remove(&key);
    match CONNECTS.get_ptr_mut(&tgid) {
        Some(count) => unsafe { *count += 1 },
        None => {
            let _ = CONNECTS.insert(&tgid, &1, 0);
        }
    }
    clear_not_resp(&key);
    let Ok(family) = (unsafe { bpf_probe_read_user(addr as *const u16) }) else {
        return;
    };
    let mut peer = Peer {
        family,
        port: 0,
        addr: [0; 16],
    };
    match family {
        2 | 10 => {
            let port: u16 = unsafe { bpf_probe_read_user((addr + 2) as *const u16) }.unwrap_or(0);
            peer.port = u16::from_be(port);
            if family == 2 {
                if let Ok(v4) = unsafe { bpf_probe_read_user((addr + 4) as *const [u8; 4]) } {
                    peer.addr[0] = v4[0];
                    peer.addr[1] = v4[1];
                    peer.addr[2] = v4[2];
                    peer.addr[3] = v4[3];
                }
            } else if let Ok(v6) = unsafe { bpf_probe_read_user((addr + 8) as *const [u8; 16]) } {
                peer.addr = v6;
            }
        }
        1 => {}
        _ => return,
    }
    let _ = CONN_PEERS.insert(&key, &peer, 0);
}

/// Which kind of function a syscall tracepoint shared by `write()`/`sendto()` or
/// `read()`/`recvfrom()` came through (`io_site`), from the record's syscall number:
/// `generic_nr` (`NR_WRITE` or `NR_READ`) is the generic one.
#[inline(always)]
fn syscall_site(ctx: &TracePointContext, generic_nr: i32) -> u32 {
    if tp_field::<i32>(ctx, SYSCALL_NR) == generic_nr {
        io_site::GENERIC
    } else {
        io_site::SOCKET
    }
}

/// The syscall arguments of a tracepoint context (`sys_enter_*`: 8-byte args from offset 16),
/// loaded from the record: these programs run on every read and write of the node, before
/// their filter, and a helper call per argument cost more than the filter.
#[inline(always)]
fn tp_args(ctx: &TracePointContext) -> (u64, u64, u64) {
    (
        tp_field(ctx, ARG0),
        tp_field(ctx, ARG1),
        tp_field(ctx, ARG2),
    )
}

/// Function arguments of a uprobe context.
#[inline(always)]
fn up_args(ctx: &ProbeContext) -> (u64, u64, u64) {
    (
        ctx.arg::<u64>(0).unwrap_or(0),
        ctx.arg::<u64>(1).unwrap_or(0),
        ctx.arg::<u64>(2).unwrap_or(0),
    )
}

// --- syscall tracepoints -----------------------------------------------------------------

#[tracepoint]
pub fn worker_enter_write(ctx: TracePointContext) -> u32 {
    // write(fd, buf, count) and sendto(fd, buf, len, ...): same first three arguments. The
    // record's syscall number tells them apart (`io_site`): the agent detaches
    // sys_enter_write while every followed worker sends through sendto.
    let (fd, buf, len) = tp_args(&ctx);
    handle_write(fd, buf, len, via::SYSCALLS, syscall_site(&ctx, NR_WRITE));
    0
}

#[tracepoint]
pub fn worker_enter_writev(ctx: TracePointContext) -> u32 {
    let (fd, iov, count) = tp_args(&ctx);
    handle_writev(fd, iov, count, via::SYSCALLS);
    0
}

#[tracepoint]
pub fn worker_enter_sendmsg(ctx: TracePointContext) -> u32 {
    let (fd, msg, _) = tp_args(&ctx);
    handle_sendmsg(fd, msg, via::SYSCALLS);
    0
}

/// `sys_enter_read` and `sys_enter_recvfrom`, with `worker_exit_read` at their exits: the
/// fallback where `worker_exit_read_regs` does not load (a kernel without BTF).
#[tracepoint]
pub fn worker_enter_read(ctx: TracePointContext) -> u32 {
    let (fd, buf, arg2) = tp_args(&ctx);
    handle_read_enter(fd, buf, arg2, 0, via::SYSCALLS, syscall_site(&ctx, NR_READ));
    0
}

#[tracepoint]
pub fn worker_enter_readv(ctx: TracePointContext) -> u32 {
    let (fd, buf, arg2) = tp_args(&ctx);
    handle_read_enter(fd, buf, arg2, 1, via::SYSCALLS, 0);
    0
}

#[tracepoint]
pub fn worker_enter_recvmsg(ctx: TracePointContext) -> u32 {
    let (fd, buf, arg2) = tp_args(&ctx);
    handle_read_enter(fd, buf, arg2, 2, via::SYSCALLS, 0);
    0
}

#[tracepoint]
pub fn worker_exit_read(ctx: TracePointContext) -> u32 {
    handle_read_exit(tp_field(&ctx, RET), via::SYSCALLS);
    0
}

/// `sys_exit_read` and `sys_exit_recvfrom` on their own: the fd and the buffer are read from
/// the registers the task saved at the syscall's entry (`bpf_task_pt_regs`; the kernel keeps
/// `rdi` and `rsi` there for the return to user space). No program runs at the entry, so every
/// `read()` and `recvfrom()` on the node passes one tracepoint instead of two, and no
/// `PENDING_READS` entry is written and read back per read.
#[tracepoint]
pub fn worker_exit_read_regs(ctx: TracePointContext) -> u32 {
    let Some((tgid, _)) = worker_tgid(via::SYSCALLS) else {
        return 0;
    };
    let ret: i64 = tp_field(&ctx, RET);
    if ret < 0 {
        // EAGAIN on a non-blocking socket, EINTR: nothing arrived.
        return 0;
    }
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as u64;
    let saved = |offset: u64| unsafe { bpf_probe_read_kernel((regs + offset) as *const u64) };
    let (Ok(fd), Ok(buf)) = (saved(PT_REGS_RDI), saved(PT_REGS_RSI)) else {
        return 0;
    };
    read_returned(tgid, fd, buf, ret as u64, syscall_site(&ctx, NR_READ));
    0
}

#[tracepoint]
pub fn worker_enter_close(ctx: TracePointContext) -> u32 {
    handle_close(tp_args(&ctx).0, via::SYSCALLS);
    0
}

#[tracepoint]
pub fn worker_enter_connect(ctx: TracePointContext) -> u32 {
    let (fd, addr, _) = tp_args(&ctx);
    handle_connect(fd, addr, via::SYSCALLS);
    0
}

// --- uprobes on the worker's libc (attached per worker process) --------------------------

#[uprobe]
pub fn worker_libc_write(ctx: ProbeContext) -> u32 {
    // write(fd, buf, n), send(fd, buf, n, flags), sendto(fd, buf, n, ...). The attach
    // cookie tells them apart (`io_site`; 0 for a per-uprobe link, which has none).
    let (fd, buf, len) = up_args(&ctx);
    let site = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32 & WRITE_SITE_BITS;
    handle_write(fd, buf, len, via::LIBC, site);
    0
}

#[uprobe]
pub fn worker_libc_writev(ctx: ProbeContext) -> u32 {
    let (fd, iov, count) = up_args(&ctx);
    handle_writev(fd, iov, count, via::LIBC);
    0
}

#[uprobe]
pub fn worker_libc_sendmsg(ctx: ProbeContext) -> u32 {
    let (fd, msg, _) = up_args(&ctx);
    handle_sendmsg(fd, msg, via::LIBC);
    0
}

#[uprobe]
pub fn worker_libc_read(ctx: ProbeContext) -> u32 {
    // read(fd, buf, n), recv(fd, buf, n, flags), recvfrom(fd, buf, n, ...).
    let (fd, buf, arg2) = up_args(&ctx);
    handle_read_enter(fd, buf, arg2, 0, via::LIBC, 0);
    0
}

#[uprobe]
pub fn worker_libc_readv(ctx: ProbeContext) -> u32 {
    let (fd, buf, arg2) = up_args(&ctx);
    handle_read_enter(fd, buf, arg2, 1, via::LIBC, 0);
    0
}

#[uprobe]
pub fn worker_libc_recvmsg(ctx: ProbeContext) -> u32 {
    let (fd, buf, arg2) = up_args(&ctx);
    handle_read_enter(fd, buf, arg2, 2, via::LIBC, 0);
    0
}

/// Where `read`, `recv` or `recvfrom` has returned from its system call (the branch that
/// tests the result, found by the agent in the C library's code): `rax` is the result, and
/// the arguments are still in their registers. One probe per read in place of an entry
/// probe, a return probe and the `PENDING_READS` entry that carries the buffer between them.
#[uprobe]
pub fn worker_libc_read_done(ctx: ProbeContext) -> u32 {
    let regs = unsafe { &*ctx.regs };
    let (fd, buf, ret) = (regs.rdi, regs.rsi, regs.rax as i64);
    if ret < 0 {
        // EAGAIN on a non-blocking socket, EINTR: nothing arrived, and nothing to look up.
        return 0;
    }
    let Some((tgid, _)) = worker_tgid(via::LIBC) else {
        return 0;
    };
    // Uprobe workers keep their read probes: which function read is not needed.
    read_returned(tgid, fd, buf, ret as u64, 0);
    0
}

#[uretprobe]
pub fn worker_libc_read_ret(ctx: RetProbeContext) -> u32 {
    handle_read_exit(ctx.ret::<i64>(), via::LIBC);
    0
}

#[uprobe]
pub fn worker_libc_close(ctx: ProbeContext) -> u32 {
    handle_close(up_args(&ctx).0, via::LIBC);
    0
}

#[uprobe]
pub fn worker_libc_connect(ctx: ProbeContext) -> u32 {
    let (fd, addr, _) = up_args(&ctx);
    handle_connect(fd, addr, via::LIBC);
    0
}
