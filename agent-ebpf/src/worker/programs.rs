//! The worker-side programs: syscall tracepoints (every process on the node passes their
//! filter) and uprobes on each followed worker's libc (only that worker pays).

use super::{
    io::handle_close, io::handle_connect, io::handle_read_enter, io::handle_read_exit,
    io::handle_sendmsg, io::handle_write, io::handle_writev, io::read_returned, tls, tls_objects,
    worker_tgid,
};
use crate::maps::tp_field;
use agent_common::worker::{io_site, via};
use aya_ebpf::helpers::generated::{
    bpf_get_attach_cookie, bpf_get_current_task_btf, bpf_task_pt_regs,
};
use aya_ebpf::macros::{tracepoint, uprobe, uretprobe};
use aya_ebpf::programs::{ProbeContext, RetProbeContext, TracePointContext};
use aya_ebpf::EbpfContext;

/// The `io_site` bits a cookie may carry.
pub(super) const WRITE_SITE_BITS: u32 = io_site::GENERIC | io_site::SOCKET;

// Syscall tracepoint layout (/sys/kernel/tracing/events/syscalls/sys_enter_*/format):
// args at offsets 16, 24, 32 (8 bytes each); sys_exit_*: `long ret` at 16.
pub(super) const ARG0: usize = 16;
pub(super) const ARG1: usize = 24;
pub(super) const ARG2: usize = 32;
pub(super) const RET: usize = 16;

/// `int __syscall_nr` of a syscall tracepoint's record.
pub(super) const SYSCALL_NR: usize = 8;

/// `__NR_write` and `__NR_read` on x86_64 (the agent's only target; `__NR_sendto` is 44,
/// `__NR_recvfrom` 45).
pub(super) const NR_WRITE: i32 = 1;
pub(super) const NR_READ: i32 = 0;

/// Offsets in x86-64's `struct pt_regs` (the layout ptrace exposes too): the user registers
/// saved at a syscall's entry, where its arguments still are at its exit.
pub(super) const PT_REGS_RSI: u64 = 104;
pub(super) const PT_REGS_RDI: u64 = 112;

/// Which kind of function a syscall tracepoint shared by `write()`/`sendto()` or
/// `read()`/`recvfrom()` came through (`io_site`), from the record's syscall number:
/// `generic_nr` (`NR_WRITE` or `NR_READ`) is the generic one.
#[inline(always)]
pub(super) fn syscall_site(ctx: &TracePointContext, generic_nr: i32) -> u32 {
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
pub(super) fn tp_args(ctx: &TracePointContext) -> (u64, u64, u64) {
    (
        tp_field(ctx, ARG0),
        tp_field(ctx, ARG1),
        tp_field(ctx, ARG2),
    )
}

/// Function arguments of a uprobe context.
#[inline(always)]
pub(super) fn up_args(ctx: &ProbeContext) -> (u64, u64, u64) {
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
    // A BTF pointer to `struct pt_regs`: the verifier checks each load against its fields (the
    // offsets are constants) and lets it through as a plain load, without a helper call each.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const u8;
    let saved = |offset: u64| unsafe { core::ptr::read(regs.add(offset as usize) as *const u64) };
    let (fd, buf) = (saved(PT_REGS_RDI), saved(PT_REGS_RSI));
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

// --- uprobes on the worker's TLS library (attached to workers seen talking TLS) ------------

/// `SSL_write(ssl, buf, num)` and `SSL_read(ssl, buf, num)`: the call's object and buffer,
/// for its return.
#[uprobe]
pub fn worker_ssl_enter(ctx: ProbeContext) -> u32 {
    let (ssl, buf, _) = up_args(&ctx);
    tls_objects::enter(ssl, buf, 0);
    0
}

/// `SSL_write_ex(ssl, buf, num, &written)` and `SSL_read_ex(ssl, buf, num, &readbytes)`.
#[uprobe]
pub fn worker_ssl_enter_ex(ctx: ProbeContext) -> u32 {
    let (ssl, buf, _) = up_args(&ctx);
    let count_at = ctx.arg::<u64>(3).unwrap_or(0);
    if count_at != 0 {
        tls_objects::enter(ssl, buf, count_at);
    }
    0
}

#[uretprobe]
pub fn worker_ssl_write_ret(ctx: RetProbeContext) -> u32 {
    // An int: the upper half of rax is not part of it.
    tls::write_returned(ctx.ret::<i32>());
    0
}

#[uretprobe]
pub fn worker_ssl_read_ret(ctx: RetProbeContext) -> u32 {
    tls::read_returned(ctx.ret::<i32>());
    0
}

/// `SSL_set_fd(ssl, fd)`: which descriptor a new connection's object talks through.
#[uprobe]
pub fn worker_ssl_set_fd(ctx: ProbeContext) -> u32 {
    let (ssl, fd, _) = up_args(&ctx);
    tls_objects::set_fd(ssl, fd);
    0
}
