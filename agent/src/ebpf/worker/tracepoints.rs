//! The syscall tracepoints that follow workers on nodes where their own code is not probed:
//! which tracepoint runs which program, how `read()` and `recvfrom()` are followed, and the
//! groups that are taken out together while no worker needs them (see [`super::narrowing`]).

use aya::{
    programs::{trace_point::TracePointLinkId, TracePoint},
    Ebpf,
};

use super::narrowing::Direction;
use crate::ebpf::{link_closer, TracepointSpec};

const fn syscall(program: &'static str, name: &'static str) -> TracepointSpec {
    TracepointSpec {
        program,
        category: "syscalls",
        name,
    }
}

/// The tracepoints that see every `write()` and `read()` on the node: detached while every
/// worker followed through the tracepoints uses `sendto` and `recvfrom` (see [`super::narrowing`]).
pub(super) const SYS_ENTER_WRITE: TracepointSpec = syscall("worker_enter_write", "sys_enter_write");
const SYS_ENTER_READ: TracepointSpec = syscall("worker_enter_read", "sys_enter_read");
const SYS_EXIT_READ: TracepointSpec = syscall("worker_exit_read", "sys_exit_read");
const SYS_EXIT_READ_ALONE: TracepointSpec = syscall("worker_exit_read_regs", "sys_exit_read");

/// How `read()` and `recvfrom()` are followed: their tracepoints, and the narrowing groups
/// that go with them (the write group, then the read group).
pub(super) struct ReadFollowing {
    pub(super) tracepoints: &'static [TracepointSpec],
    pub(super) groups: [SyscallGroup; 2],
}

/// At their exit only: the program reads the fd and the buffer from the registers the task
/// saved at the entry (`worker_exit_read_regs`, which needs the kernel's BTF for
/// `bpf_get_current_task_btf`).
pub(super) const READS_AT_EXIT: ReadFollowing = ReadFollowing {
    tracepoints: &[
        SYS_EXIT_READ_ALONE,
        syscall("worker_exit_read_regs", "sys_exit_recvfrom"),
    ],
    groups: [
        WRITE_GROUP,
        SyscallGroup {
            direction: Direction::Read,
            specs: &[SYS_EXIT_READ_ALONE],
            name: "sys_exit_read",
        },
    ],
};

/// The fallback where that program does not load: the entry saves the buffer for the exit.
pub(super) const READS_AT_BOTH_ENDS: ReadFollowing = ReadFollowing {
    tracepoints: &[
        SYS_ENTER_READ,
        syscall("worker_enter_read", "sys_enter_recvfrom"),
        SYS_EXIT_READ,
        syscall("worker_exit_read", "sys_exit_recvfrom"),
    ],
    groups: [
        WRITE_GROUP,
        SyscallGroup {
            direction: Direction::Read,
            specs: &[SYS_ENTER_READ, SYS_EXIT_READ],
            name: "sys_enter_read and sys_exit_read",
        },
    ],
};

/// The syscalls followed besides `read()` and `recvfrom()` (one of the two sets above), and
/// the program each runs.
pub(super) const WORKER_TRACEPOINTS: [TracepointSpec; 10] = [
    SYS_ENTER_WRITE,
    syscall("worker_enter_write", "sys_enter_sendto"),
    syscall("worker_enter_writev", "sys_enter_writev"),
    syscall("worker_enter_sendmsg", "sys_enter_sendmsg"),
    syscall("worker_enter_readv", "sys_enter_readv"),
    syscall("worker_enter_recvmsg", "sys_enter_recvmsg"),
    syscall("worker_exit_read", "sys_exit_readv"),
    syscall("worker_exit_read", "sys_exit_recvmsg"),
    syscall("worker_enter_close", "sys_enter_close"),
    syscall("worker_enter_connect", "sys_enter_connect"),
];

/// Syscall tracepoints taken out together while no worker followed through the tracepoints
/// needs them (see [`super::narrowing`]).
pub(super) struct SyscallGroup {
    pub(super) direction: Direction,
    pub(super) specs: &'static [TracepointSpec],
    pub(super) name: &'static str,
}

const WRITE_GROUP: SyscallGroup = SyscallGroup {
    direction: Direction::Write,
    specs: &[SYS_ENTER_WRITE],
    name: "sys_enter_write",
};

/// Detaches tracepoint links. Detaching waits for RCU grace periods (about 1 s for all 14
/// here): the links are taken out and dropped on a thread of their own, off the agent's loop,
/// whose handle is returned.
pub(super) fn drop_tracepoint_links(
    ebpf: &mut Ebpf,
    links: Vec<(&'static TracepointSpec, TracePointLinkId)>,
    what: &'static str,
) -> Option<std::thread::JoinHandle<()>> {
    let owned: Vec<_> = links
        .into_iter()
        .filter_map(|(spec, link)| {
            let p = ebpf.program_mut(spec.program)?;
            <&mut TracePoint>::try_from(p).ok()?.take_link(link).ok()
        })
        .collect();
    tracing::debug!(what, "detaching tracepoints");
    link_closer::close_on_own_thread("tracepoint-detach", move || drop(owned))
}
