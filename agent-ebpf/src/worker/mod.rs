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
//!
//! The parts, in the order a write meets them: [`programs`] (the attachments) hand plain
//! arguments to [`io`], which finds the connection ([`conn`]), counts a repeat of its last
//! blocking call by hash ([`request_hash`]) or a single plain command or reply from its first
//! bytes ([`quick`]), and otherwise runs the tokenizer over the buffer ([`tokenizer`]); a
//! blocking call's clock and histograms are in [`pops`]. Connections over TLS are read in
//! plain text at the worker's TLS library ([`tls`]) and go the same way.

mod conn;
mod io;
mod pops;
mod programs;
mod quick;
mod request_hash;
mod tls;
mod tls_objects;
mod tokenizer;

use agent_common::pidset;
use agent_common::resp::Opaque;
use agent_common::worker::{
    via, ConnKey, ConnState, Peer, PendingRead, MAX_CONNECTIONS, MAX_WORKER_PROCESSES,
};
use aya_ebpf::helpers::bpf_get_current_pid_tgid;
use aya_ebpf::macros::map;
use aya_ebpf::maps::{Array, LruHashMap, PerCpuArray};

/// Drops the per-thread slots of an exiting thread of a tracked process (`id` = its
/// pid_tgid): its read in progress and its SSL call in progress.
#[inline(always)]
pub(crate) fn forget_thread(id: u64) {
    io::forget_thread(id);
    tls_objects::forget_thread(id);
}

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

/// `ConnState::kind` of a connection whose bytes stopped parsing: ignored until a write that
/// starts a command (`*`) resets it.
const KIND_DESYNCED: u32 = 3;

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

#[repr(C)]
#[derive(Clone, Copy)]
struct IoVec {
    base: u64,
    len: u64,
}
