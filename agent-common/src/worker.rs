//! Worker-side probes: the RESP a worker writes and reads, followed per connection in the
//! kernel (syscall tracepoints, filtered to tracked worker processes).

use crate::{
    fastpath::RepeatTemplate,
    resp::{Carry, ReplyState, RequestState},
};

/// Most connections followed at once (an LRU map).
pub const MAX_CONNECTIONS: u32 = 65536;
/// Most worker processes followed.
pub const MAX_WORKER_PROCESSES: u32 = 4096;
/// Most (process, command, outcome, peer) histogram keys.
pub const MAX_WORKER_HISTOGRAMS: u32 = 16384;
/// Most (process, peer, served key) counters of served pops. Kept in a plain hash map (not
/// an LRU): a count is never silently evicted; when the map is full, a pop on a new key is
/// counted as a probe error instead, and the agent drops the entries of exited processes.
pub const MAX_SERVED_KEYS: u32 = 32768;
/// Largest request sent to user space when a connection's key list changes: a BRPOP of 440
/// Sidekiq queues is about 10 KiB.
pub const KEYSET_MAX_BYTES: usize = 32 * 1024;
pub const KEYSET_RING_BYTES: u32 = 1024 * 1024;

/// How a worker is followed: the value of its `WORKER_PROCS` entry.
pub mod via {
    /// Syscall tracepoints (any worker, whatever its language; every process on the host pays
    /// the tgid filter while one such worker is tracked).
    pub const SYSCALLS: u32 = 1;
    /// Uprobes on the worker's own libc (only that worker pays).
    pub const LIBC: u32 = 2;
}

/// Outcomes of a blocking pop as the worker sees it.
pub mod outcome {
    pub const SERVED: u32 = 0;
    pub const TIMEOUT: u32 = 1;
    /// An error reply, or the connection closed or reached EOF while the pop waited.
    pub const ERROR: u32 = 2;
}

/// Which kind of function a connection's bytes went through: `write()`/`read()`, which files,
/// pipes and terminals share with sockets, or the socket-only `send`/`sendto` and
/// `recv`/`recvfrom`. ORed into `ConnState::write_sites` and `read_sites` from the attach cookie
/// of a uprobe-multi link (`write` has a link of its own) or from a syscall tracepoint's
/// syscall number. A worker whose connections go through the socket functions only (Ruby's
/// and Python's sockets) never needs `write` (its log lines and pipes hit it on every job) or
/// `read` probed: the agent takes those probes out (its `ebpf::write_probe`). 0: not told
/// (the vectored calls, per-uprobe links).
pub mod io_site {
    /// `write()` or `read()`.
    pub const GENERIC: u32 = 1;
    /// `send()`/`sendto()` or `recv()`/`recvfrom()`: sockets only.
    pub const SOCKET: u32 = 2;
}

/// Connection kinds.
pub mod conn_kind {
    /// Not known yet.
    pub const UNKNOWN: u32 = 0;
    /// The first write was RESP: followed.
    pub const RESP: u32 = 1;
    /// The first write was not RESP (a log file, a pipe, HTTP): ignored.
    pub const OTHER: u32 = 2;
}

/// The peer of a connection, as given to connect() or found in /proc by the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Peer {
    /// AF_INET (2), AF_INET6 (10), AF_UNIX (1); 0 when unknown.
    pub family: u16,
    /// Host byte order.
    pub port: u16,
    /// IPv4 in the first 4 bytes, or IPv6.
    pub addr: [u8; 16],
}

/// Slots of the `NOT_RESP` cache.
pub const NOT_RESP_SLOTS: u32 = 4096;

/// Entries of `TLS_CONNS`: sockets seen writing TLS records (an LRU: the agent reports which
/// workers hold any, and a worker holds a few).
pub const MAX_TLS_CONNECTIONS: u32 = 1024;

/// Whether a write that begins with `head` begins a TLS record: a content type
/// (change_cipher_spec 20, alert 21, handshake 22, application_data 23) and a record version
/// 3.0 to 3.4 (SSL 3.0 to TLS 1.3; a ClientHello says 3.1). No RESP command, nor any text
/// protocol, starts with these bytes.
#[inline(always)]
pub fn tls_record_start(head: [u8; 3]) -> bool {
    (20..=23).contains(&head[0]) && head[1] == 3 && head[2] <= 4
}

/// Marks a descriptor number as the plain text side of a TLS connection: its commands and
/// replies as the worker hands them to its TLS library (`SSL_write`, `SSL_read`), followed
/// under (tgid, fd | TLS_FD) beside the socket's own (tgid, fd), whose bytes are encrypted.
/// Descriptor numbers stay far below (a process's limit is at most 2^30).
pub const TLS_FD: u32 = 1 << 31;

/// The socket a connection's bytes travel on: the descriptor without [`TLS_FD`].
#[inline(always)]
pub fn socket_fd(fd: u32) -> u32 {
    fd & !TLS_FD
}

/// A `NOT_RESP` tag with this bit marks a socket that talks TLS rather than a descriptor that
/// is no connection: its writes still tell which SSL object writes to it (see
/// `TlsCall`). Tags never have it ((tgid << 32 | fd) + 1, tgid below 2^22).
pub const NOT_RESP_TLS: u64 = 1 << 63;

/// An SSL object of a followed worker (`SSL *`), the key of the descriptor it reads and
/// writes through.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SslKey {
    pub tgid: u32,
    pub _pad: u32,
    pub ssl: u64,
}

/// A call into the worker's TLS library in progress on a thread, from its entry to its
/// return: `SSL_write(ssl, buf, num)`, `SSL_read(ssl, buf, num)` or their `_ex` forms, which
/// return 1 and store the byte count at `count_at` (0 for the plain forms, which return it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsCall {
    pub ssl: u64,
    pub buf: u64,
    pub count_at: u64,
}

impl TlsCall {
    /// No call in progress (an SSL object is never at address 0).
    pub const NONE: Self = Self {
        ssl: 0,
        buf: 0,
        count_at: 0,
    };
}

/// Most SSL objects whose descriptor is known (`SSL_FDS`): a worker holds a few TLS
/// connections.
pub const MAX_TLS_OBJECTS: u32 = 4096;

/// The `NOT_RESP` slot of (tgid, fd), and the tag that marks it as holding that pair (never 0,
/// which marks an empty slot).
#[inline(always)]
pub fn not_resp_slot(key: &ConnKey) -> (u32, u64) {
    let mixed = key.tgid.wrapping_mul(2_654_435_761) ^ key.fd;
    (
        mixed & (NOT_RESP_SLOTS - 1),
        ((key.tgid as u64) << 32 | key.fd as u64) + 1,
    )
}

/// Key of `CONNS` and `CONN_PEERS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    pub tgid: u32,
    pub fd: u32,
}

/// A blocking pop waiting for its reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingPop {
    pub sent_ns: u64,
    /// Index of its reply on the connection.
    pub reply_index: u64,
    pub signature: u64,
    pub command: u32,
    pub keys: u32,
    /// 1 while waiting.
    pub active: u32,
    pub _pad: u32,
}

/// The histogram slots a connection found for its blocking command (each 1 + the slot; 0
/// when not found yet), so that recording a pop indexes arrays instead of hashing keys.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HistogramSlots {
    /// The command the slots are for (they are per command).
    pub command: u32,
    /// `WORKER_KEYS_HISTS` slot of (tgid, command).
    pub keys: u32,
    /// `WORKER_DUR_HISTS` slots of (tgid, command, outcome, peer), by outcome.
    pub durations: [u32; 3],
    pub _pad: u32,
}

/// Value of `CONNS`: both directions of one connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnState {
    pub request: RequestState,
    pub reply: ReplyState,
    pub request_carry: Carry,
    pub reply_carry: Carry,
    pub pop: PendingPop,
    pub peer: Peer,
    pub kind: u32,
    /// Signature of the key list last sent to user space.
    pub keyset_sent: u64,
    /// Position in the current buffer where the command being parsed started, or u64::MAX
    /// when it started in an earlier buffer.
    pub command_start: u64,
    /// The last blocking command sent alone in one buffer: its repeats skip the tokenizer.
    pub repeat: RepeatTemplate,
    pub slots: HistogramSlots,
    /// The kinds of function this connection's commands went through, as [`io_site`] bits.
    pub write_sites: u32,
    /// The kinds of function its replies were read through (syscall tracepoints only).
    pub read_sites: u32,
}

/// Key of the duration histograms.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerHistKey {
    pub tgid: u32,
    pub command: u32,
    pub outcome: u32,
    pub _pad: u32,
    pub peer: Peer,
}

/// Key of `SERVED_KEYS`: served pops of one process on one Redis, by the key that served
/// them (`agent_common::fastpath::served_key_hash`, or one of the reserved values).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServedKey {
    pub tgid: u32,
    pub peer: Peer,
    pub key_hash: u64,
}

/// Key of the fan-out histograms.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerKeysKey {
    pub tgid: u32,
    pub command: u32,
}

/// Header of a `KEYSET_EVENTS` record, followed by `len` bytes of the request.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeysetHeader {
    pub tgid: u32,
    pub fd: u32,
    pub signature: u64,
    pub len: u32,
    pub keys: u32,
}

/// Syscall arguments saved at a read's entry for its exit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PendingRead {
    pub buf: u64,
    pub fd: u32,
    /// Number of iovecs (0 for a plain buffer).
    pub iovcnt: u32,
}

impl PendingRead {
    /// No read in progress (a buffer is never at address 0).
    pub const NONE: Self = Self {
        buf: 0,
        fd: 0,
        iovcnt: 0,
    };
}

const _: () = assert!(core::mem::size_of::<Peer>() == 20);
const _: () = assert!(core::mem::size_of::<WorkerHistKey>() == 36);
const _: () = assert!(core::mem::size_of::<KeysetHeader>() == 24);
const _: () = assert!(core::mem::size_of::<ServedKey>() == 32);
// The entry of `CONNS`, one per followed connection: its size changes only on purpose.
const _: () = assert!(core::mem::size_of::<ConnState>() == 368);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for Peer {}
    unsafe impl aya::Pod for ConnKey {}
    unsafe impl aya::Pod for SslKey {}
    unsafe impl aya::Pod for ConnState {}
    unsafe impl aya::Pod for WorkerHistKey {}
    unsafe impl aya::Pod for WorkerKeysKey {}
    unsafe impl aya::Pod for PendingPop {}
    unsafe impl aya::Pod for ServedKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_records_are_told_from_resp_and_text() {
        // A ClientHello (record version 3.1), application data (3.3), an alert, a TLS 1.3
        // change_cipher_spec.
        for head in [[22, 3, 1], [23, 3, 3], [21, 3, 3], [20, 3, 3], [22, 3, 0]] {
            assert!(tls_record_start(head), "{head:?}");
        }
        // RESP, HTTP, and what only looks close.
        for head in [
            *b"*3\r",
            *b"$5\r",
            *b"GET",
            *b"POS",
            [22, 2, 0],
            [24, 3, 3],
            [23, 3, 5],
        ] {
            assert!(!tls_record_start(head), "{head:?}");
        }
    }
}
