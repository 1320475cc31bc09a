//! Connections a worker reaches its Redis through over TLS (`rediss://`, a managed Redis with
//! in-transit encryption): their bytes are encrypted where `write()` and `read()` see them, so
//! they are read where the worker hands them to its TLS library instead, with uprobes on
//! OpenSSL's `SSL_write`/`SSL_write_ex` and `SSL_read`/`SSL_read_ex` (entry and return), and
//! followed by the same code as plain connections under the key (tgid, fd | `TLS_FD`).
//!
//! Which descriptor an SSL object talks through is learnt at `SSL_set_fd` for connections
//! made while the probes are in, and otherwise from the socket write of TLS records made from
//! inside an SSL call (the `NOT_RESP` slot of a TLS socket says so, see `conn_for_write`): the
//! thread's call in progress names the object. A call on an object whose descriptor is not
//! known yet is not followed; the object's first write after the probes went in tells it
//! ([`super::tls_objects`] keeps both).

use super::{io::complete_read, io::on_write, io::resp_conn_read_via, tls_objects::returned};
use agent_common::worker::PendingRead;

/// `SSL_write` or `SSL_write_ex` returned `ret`: what it wrote, as a write on the connection.
#[inline(always)]
pub(super) fn write_returned(ret: i32) {
    if let Some((tgid, call, moved, fd)) = returned(ret) {
        on_write(tgid, fd, call.buf, moved, 0, 0, moved, 0);
    }
}

/// `SSL_read` or `SSL_read_ex` returned `ret`: what it read, as a read on the connection.
#[inline(always)]
pub(super) fn read_returned(ret: i32) {
    let Some((tgid, call, moved, fd)) = returned(ret) else {
        return;
    };
    let Some(conn) = resp_conn_read_via(tgid, fd as u64, 0) else {
        return;
    };
    let pending = PendingRead {
        buf: call.buf,
        fd,
        iovcnt: 0,
    };
    complete_read(conn, tgid, pending, moved);
}
