//! What each call a worker makes does to its connections: writes (and the repeats of a blocking
//! call among them), reads, close and connect, with plain arguments, so that the syscall
//! tracepoints and the libc uprobes share them.

use super::{
    conn::clear_not_resp,
    conn::conn_for_write,
    conn::TLS_CONNS,
    pops::finish_pop,
    pops::start_pop,
    quick::quick_command,
    quick::quick_whole_reply,
    request_hash::{args_hash, request_hash},
    tokenizer::follow,
    tokenizer::DIR_REPLY,
    tokenizer::DIR_REQUEST,
    tokenizer::MAX_IOVECS,
    worker_tgid, IoVec, MapOpaque, CONNECTS, CONNS, CONN_PEERS, PENDING_READS,
};
use agent_common::args_hash::keys_then_timeout;
use agent_common::fastpath::RepeatTemplate;
use agent_common::resp::BlockingCall;
use agent_common::worker::{conn_kind, outcome, ConnKey, ConnState, Peer, PendingRead, TLS_FD};
use aya_ebpf::helpers::{bpf_ktime_get_ns, bpf_probe_read_user};

/// A write that repeats the connection's template byte for byte: the same blocking call
/// again, counted without the tokenizer. Returns false when the write is anything else; then
/// `hash` holds the buffer's hash if it was computed (0 if not).
#[inline(always)]
pub(super) fn repeat_call(
    conn: &mut ConnState,
    tgid: u32,
    buf: u64,
    len: u64,
    hash: &mut u64,
) -> bool {
    let template = conn.repeat;
    if template.len != len
        || template.signature != conn.keyset_sent
        || !conn.request.at_command_boundary()
        || conn.request_carry.len != 0
    {
        return false;
    }
    // The same bytes, or the same keys in another order (Sidekiq shuffles weighted queues
    // before every fetch). Once the order has varied, the bytes are not hashed first: they
    // would not match, and for 440 keys that hash is about a third of the check.
    let order_varies = template.order_varies != 0 && template.args != 0;
    let mut same_bytes = false;
    if !order_varies {
        *hash = request_hash(buf, len);
        same_bytes = *hash == template.hash;
    }
    if !same_bytes {
        if template.args == 0 || args_hash(buf, len) != template.args {
            return false;
        }
        conn.repeat.order_varies = 1;
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

/// A write of `total` bytes: a plain buffer (`iov == 0`) or an iovec array; `site` is the
/// `io_site` bit of the function it came through (0 when not told).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn on_write(
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
    let Some(conn) = conn_for_write(tgid, fd, buf, len) else {
        return;
    };
    let state = unsafe { &mut *conn };
    // Which function carries this connection's commands: the agent takes the probe off
    // `write` for a worker that never sends through it.
    state.write_sites |= site;
    let mut hash = 0;
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
    let hash = if hash != 0 {
        hash
    } else {
        request_hash(buf, len)
    };
    if hash != 0 {
        state.repeat = RepeatTemplate {
            len,
            hash,
            signature: call.signature,
            command: call.command,
            keys: call.keys,
            args: if keys_then_timeout(call.command) {
                args_hash(buf, len)
            } else {
                0
            },
            order_varies: 0,
            _pad: 0,
        };
    }
}

/// Total bytes of an iovec array (bounded by MAX_IOVECS elements).
#[inline(always)]
pub(super) fn iov_total(iov: u64, count: u64) -> u64 {
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
pub(super) fn handle_write(fd: u64, buf: u64, len: u64, via: u32, site: u32) {
    let Some((tgid, _)) = worker_tgid(via) else {
        return;
    };
    on_write(tgid, fd as u32, buf, len, 0, 0, len, site);
}

#[inline(always)]
pub(super) fn handle_writev(fd: u64, iov: u64, count: u64, via: u32) {
    let Some((tgid, _)) = worker_tgid(via) else {
        return;
    };
    let total = iov_total(iov, count);
    // The count's range was narrowed differently on each path of the summing loop.
    on_write(
        tgid,
        fd as u32,
        0,
        0,
        iov,
        MapOpaque::hide_once(count),
        total,
        0,
    );
}

/// `struct user_msghdr`: msg_iov at 16, msg_iovlen at 24.
#[inline(always)]
pub(super) fn msghdr_iov(msg: u64) -> Option<(u64, u64)> {
    let iov: u64 = unsafe { bpf_probe_read_user((msg + 16) as *const u64) }.ok()?;
    let count: u64 = unsafe { bpf_probe_read_user((msg + 24) as *const u64) }.ok()?;
    Some((iov, count))
}

#[inline(always)]
pub(super) fn handle_sendmsg(fd: u64, msg: u64, via: u32) {
    if let Some((iov, count)) = msghdr_iov(msg) {
        handle_writev(fd, iov, count, via);
    }
}

/// Saves a read's buffer for its exit, if the fd is a followed connection. `iov_kind`: 0 for
/// a buffer, 1 for readv (`arg2` is the count), 2 for recvmsg (`buf` is the msghdr); `site`
/// is the `io_site` bit of the function it came through (0 when not told).
#[inline(always)]
pub(super) fn handle_read_enter(fd: u64, buf: u64, arg2: u64, iov_kind: u32, via: u32, site: u32) {
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

/// Drops the read slot of an exiting thread (`id` = its pid_tgid): one entry per thread that
/// ever read, rewritten in place while it lives, so it must go when the thread does.
#[inline(always)]
pub(crate) fn forget_thread(id: u64) {
    let _ = PENDING_READS.remove(&id);
}

#[inline(always)]
pub(super) fn handle_read_exit(ret: i64, via: u32) {
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
pub(super) fn resp_conn_read_via(tgid: u32, fd: u64, site: u32) -> Option<*mut ConnState> {
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
pub(super) fn read_returned(tgid: u32, fd: u64, buf: u64, ret: u64, site: u32) {
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
pub(super) fn complete_read(conn: *mut ConnState, tgid: u32, pending: PendingRead, ret: u64) {
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

/// The connection followed on `key` is over (its descriptor closed): a pop it waited for
/// was given up.
#[inline(always)]
fn end_conn(key: &ConnKey) {
    if let Some(conn) = CONNS.get_ptr_mut(key) {
        finish_pop(
            unsafe { &mut *conn },
            key.tgid,
            key.fd,
            outcome::ERROR,
            0,
            unsafe { bpf_ktime_get_ns() },
        );
        let _ = CONNS.remove(key);
    }
}

#[inline(always)]
pub(super) fn handle_close(fd: u64, via: u32) {
    let Some((tgid, _)) = worker_tgid(via) else {
        return;
    };
    let key = ConnKey {
        tgid,
        fd: fd as u32,
    };
    end_conn(&key);
    // Its TLS side, if it carried TLS (see `tls`).
    if TLS_CONNS.get_ptr(&key).is_some() {
        end_conn(&ConnKey {
            tgid,
            fd: key.fd | TLS_FD,
        });
    }
    let _ = CONN_PEERS.remove(&key);
    let _ = TLS_CONNS.remove(&key);
    clear_not_resp(&key);
}

#[inline(always)]
pub(super) fn handle_connect(fd: u64, addr: u64, via: u32) {
    let Some((tgid, _)) = worker_tgid(via) else {
        return;
    };
    let key = ConnKey {
        tgid,
        fd: fd as u32,
    };
    // A new connection on this fd: whatever was followed on it before is over.
    let _ = CONNS.remove(&key);
    if TLS_CONNS.remove(&key).is_ok() {
        let _ = CONNS.remove(&ConnKey {
            tgid,
            fd: key.fd | TLS_FD,
        });
    }
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
