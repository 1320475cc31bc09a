//! The SSL objects of a followed worker's TLS connections: which descriptor each talks
//! through, and the SSL call each thread is in. The probes on OpenSSL record them here; a
//! call's return ([`super::tls`]) and a TLS socket's write (`conn_for_write`) read them.

use super::{worker_tgid, MapOpaque, CONNS};
use agent_common::worker::{
    via, ConnKey, SslKey, TlsCall, MAX_TLS_OBJECTS, MAX_WORKER_PROCESSES, TLS_FD,
};
use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user};
use aya_ebpf::macros::map;
use aya_ebpf::maps::LruHashMap;

/// pid_tgid -> the SSL call in progress on that thread (one per thread, rewritten in place).
#[map]
static TLS_CALLS: LruHashMap<u64, TlsCall> =
    LruHashMap::with_max_entries(MAX_WORKER_PROCESSES * 4, 0);

/// (tgid, SSL object) -> the descriptor it reads and writes through.
#[map]
static SSL_FDS: LruHashMap<SslKey, u32> = LruHashMap::with_max_entries(MAX_TLS_OBJECTS, 0);

/// An SSL call's entry: `ssl`, `buf` and, for the `_ex` forms, where it stores the count.
#[inline(always)]
pub(super) fn enter(ssl: u64, buf: u64, count_at: u64) {
    let Some((_, id)) = worker_tgid(via::LIBC) else {
        return;
    };
    let call = TlsCall { ssl, buf, count_at };
    match TLS_CALLS.get_ptr_mut(&id) {
        Some(slot) => unsafe { *slot = call },
        None => {
            let _ = TLS_CALLS.insert(&id, &call, 0);
        }
    }
}

/// The call of this thread that returned `ret`: the process, the call, the plain text bytes
/// it moved, and the descriptor of its SSL object (with `TLS_FD`); `None` when it moved none
/// (an error, or `SSL_ERROR_WANT_READ` on a non-blocking socket) or its descriptor is not
/// known.
#[inline(always)]
pub(super) fn returned(ret: i32) -> Option<(u32, TlsCall, u64, u32)> {
    let (tgid, id) = worker_tgid(via::LIBC)?;
    let slot = TLS_CALLS.get_ptr_mut(&id)?;
    let call = unsafe { core::mem::replace(&mut *slot, TlsCall::NONE) };
    if call.ssl == 0 || ret <= 0 {
        return None;
    }
    let moved = if call.count_at == 0 {
        ret as u64
    } else {
        // The `_ex` forms return 1 on success and store a size_t.
        unsafe { bpf_probe_read_user(call.count_at as *const u64) }.ok()?
    };
    if moved == 0 {
        return None;
    }
    // One range for the count whichever form returned it: the verifier would otherwise walk
    // the whole write path once per form (520k instructions instead of half).
    let moved = MapOpaque::hide_once(moved);
    let fd = unsafe {
        SSL_FDS.get(&SslKey {
            tgid,
            _pad: 0,
            ssl: call.ssl,
        })
    }?;
    Some((tgid, call, moved, *fd | TLS_FD))
}

/// `SSL_set_fd(ssl, fd)`: the object talks through `fd` from now on. A connection followed on
/// that descriptor before was another one.
#[inline(always)]
pub(super) fn set_fd(ssl: u64, fd: u64) {
    let Some((tgid, _)) = worker_tgid(via::LIBC) else {
        return;
    };
    let fd = fd as u32;
    let _ = SSL_FDS.insert(&SslKey { tgid, _pad: 0, ssl }, &fd, 0);
    let _ = CONNS.remove(&ConnKey {
        tgid,
        fd: fd | TLS_FD,
    });
}

/// A TLS socket `fd` of process `tgid` is written to by the current thread: if from inside an
/// SSL call, that call's object talks through it.
#[inline(always)]
pub(super) fn bind_current_call(tgid: u32, fd: u32) {
    let id = bpf_get_current_pid_tgid();
    let Some(call) = (unsafe { TLS_CALLS.get(&id) }) else {
        return;
    };
    if call.ssl == 0 {
        return;
    }
    let key = SslKey {
        tgid,
        _pad: 0,
        ssl: call.ssl,
    };
    if unsafe { SSL_FDS.get(&key) }.is_some_and(|bound| *bound == fd) {
        return;
    }
    let _ = SSL_FDS.insert(&key, &fd, 0);
}

/// Drops the SSL call slot of an exiting thread (`id` = its pid_tgid).
#[inline(always)]
pub(crate) fn forget_thread(id: u64) {
    let _ = TLS_CALLS.remove(&id);
}
