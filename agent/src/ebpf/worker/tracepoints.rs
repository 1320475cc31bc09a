//! The syscall tracepoints that follow workers on nodes where their own code is not probed:
//! which tracepoint runs which program, how `read()` and `recvfrom()` are followed, and the
//! groups that are taken out together while no worker needs them (see [`super::narrowing`]),
//! attached and narrowed by `SyscallProbes`.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use aya::{
    programs::{trace_point::TracePointLinkId, TracePoint},
    Ebpf,
};

use super::conn_maps::ConnMaps;
use super::narrowing::{self, remember_servers, Direction, Verdict};
use crate::ebpf::{attach_tracepoint, link_closer, load_program, ProbeError, TracepointSpec};

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

/// When each of the [`ReadFollowing::groups`] is looked at next.
#[derive(Debug)]
struct SyscallNarrowing {
    schedules: [narrowing::Schedule; 2],
    /// When each was last attached again after being detached.
    widened_at: [Option<Instant>; 2],
    /// The thread detaching each, after it was taken out.
    closing: [Option<std::thread::JoinHandle<()>>; 2],
    /// connect() counts of the workers followed through the tracepoints, as last seen.
    connects_seen: HashMap<u32, Option<u64>>,
    /// The servers each of them has talked to.
    known: HashMap<u32, BTreeSet<narrowing::Server>>,
}

impl Default for SyscallNarrowing {
    fn default() -> Self {
        Self {
            schedules: [narrowing::Schedule::now(), narrowing::Schedule::now()],
            widened_at: [None; 2],
            closing: [None, None],
            connects_seen: Default::default(),
            known: Default::default(),
        }
    }
}

/// The syscall tracepoints that follow workers, while attached, and the narrowing of their
/// groups: one set for every worker followed this way, and for every process on the node.
#[derive(Default)]
pub(super) struct SyscallProbes {
    links: Vec<(&'static TracepointSpec, TracePointLinkId)>,
    /// How `read()` and `recvfrom()` are followed: [`READS_AT_EXIT`], or
    /// [`READS_AT_BOTH_ENDS`] where its program does not load; chosen at the first attach.
    read_following: Option<&'static ReadFollowing>,
    /// When the groups are looked at next (see [`Self::adjust`]).
    narrowing: SyscallNarrowing,
}

impl SyscallProbes {
    pub(super) fn attached(&self) -> bool {
        !self.links.is_empty()
    }

    /// Attaches the tracepoints. When they are attached already, a worker starts being
    /// followed: its first commands may go through `write()` and `read()`, so the groups
    /// taken out go back in (a failure there is logged, and the group is looked at again).
    /// When the first attach fails, nothing stays attached.
    pub(super) fn attach(&mut self, ebpf: &mut Ebpf) -> Result<(), ProbeError> {
        if self.attached() {
            for (index, group) in self.groups().iter().enumerate() {
                if let Err(e) = self.attach_group(ebpf, index) {
                    self.narrowing.schedules[index].reset(Instant::now());
                    tracing::warn!(error = %e, "cannot attach {} again for a new worker: what it sends or reads through it is not seen until it is", group.name);
                }
            }
            return Ok(());
        }
        let reads = match self.read_following {
            Some(reads) => reads,
            None => {
                let reads: &'static ReadFollowing = match load_program(
                    ebpf,
                    READS_AT_EXIT.tracepoints[0].program,
                ) {
                    Ok(()) => &READS_AT_EXIT,
                    Err(e) => {
                        tracing::info!(error = %e, "read() and recvfrom() are followed at their entry and exit (the program that follows them at their exit alone did not load)");
                        &READS_AT_BOTH_ENDS
                    }
                };
                self.read_following = Some(reads);
                reads
            }
        };
        for spec in WORKER_TRACEPOINTS.iter().chain(reads.tracepoints) {
            match attach_tracepoint(ebpf, spec) {
                Ok(link) => self.links.push((spec, link)),
                Err(e) => {
                    self.detach(ebpf);
                    return Err(e);
                }
            }
        }
        tracing::info!(
            syscalls = WORKER_TRACEPOINTS.len() + reads.tracepoints.len(),
            "worker syscall probes attached"
        );
        Ok(())
    }

    /// Detaches every tracepoint, on a thread of its own.
    pub(super) fn detach(&mut self, ebpf: &mut Ebpf) {
        if self.links.is_empty() {
            return;
        }
        let links: Vec<_> = self.links.drain(..).collect();
        let _ = drop_tracepoint_links(ebpf, links, "the syscall tracepoints");
        self.narrowing = SyscallNarrowing::default();
        tracing::info!("no worker is followed through the syscall tracepoints any more: detached");
    }

    /// Each of the [`ReadFollowing::groups`] serves every worker followed through the
    /// tracepoints (`pids`): it goes only when all of them use the socket functions, and
    /// comes back when any of them connects to its Redis again (or when a worker starts being
    /// followed, in [`Self::attach`]). After it comes back it stays at least
    /// [`narrowing::SYSCALL_REST`].
    pub(super) fn adjust(&mut self, ebpf: &mut Ebpf, pids: &BTreeSet<u32>, conns: &ConnMaps) {
        if pids.is_empty() || self.links.is_empty() {
            self.narrowing.connects_seen.clear();
            self.narrowing.known.clear();
            return;
        }
        let now = Instant::now();
        let state = &mut self.narrowing;
        state.connects_seen.retain(|pid, _| pids.contains(pid));
        state.known.retain(|pid, _| pids.contains(pid));
        let mut connected = false;
        for pid in pids {
            let seen = state.connects_seen.entry(*pid).or_insert(None);
            connected |= conns.connected(*pid, seen);
        }
        let mut due = Vec::new();
        for index in 0..self.groups().len() {
            if connected {
                self.narrowing.schedules[index].reset(now);
            }
            let narrowed = !self.group_attached(index);
            let resting = self.narrowing.widened_at[index]
                .is_some_and(|at| now.duration_since(at) < narrowing::SYSCALL_REST);
            if self.narrowing.schedules[index].due(now) && (narrowed || !resting) {
                due.push(index);
            }
        }
        if due.is_empty() {
            return;
        }
        // One walk of the maps for both directions.
        let by_direction =
            [Direction::Write, Direction::Read].map(|direction| conns.gather(pids, direction));
        for pid in pids {
            let known = self.narrowing.known.entry(*pid).or_default();
            remember_servers(known, by_direction[0].servers(*pid));
        }
        for index in due {
            let group = &self.groups()[index];
            let connections = &by_direction[group.direction as usize];
            let narrowed = !self.group_attached(index);
            let verdict = connections.verdict_for_all(pids, narrowed, &self.narrowing.known);
            let schedule = &mut self.narrowing.schedules[index];
            match verdict {
                Verdict::Keep => schedule.later(now),
                Verdict::Settled => schedule.park(),
                Verdict::Narrow => {
                    schedule.park();
                    self.detach_group(ebpf, index);
                    tracing::info!(workers = pids.len(), "{} detached: every worker followed through the tracepoints uses the socket functions (sendto, recvfrom), so no process on the node pays it", group.name);
                }
                Verdict::Widen => {
                    schedule.reset(now);
                    match self.attach_group(ebpf, index) {
                        Ok(()) => tracing::info!("{} attached again: a worker's new connection to its Redis may go through it", group.name),
                        Err(e) => tracing::warn!(error = %e, "cannot attach {} again: what workers' connections send or read through it is not seen", group.name),
                    }
                }
            }
        }
    }

    /// Whether the group at `index` of [`ReadFollowing::groups`] (0: `write()`, 1: `read()`)
    /// is taken out while the tracepoints are attached.
    pub(super) fn group_out(&self, index: usize) -> bool {
        self.attached() && !self.group_attached(index)
    }

    /// The narrowing groups of the read tracepoints in use.
    fn groups(&self) -> &'static [SyscallGroup; 2] {
        &self.read_following.unwrap_or(&READS_AT_EXIT).groups
    }

    fn group_attached(&self, index: usize) -> bool {
        self.groups()[index]
            .specs
            .iter()
            .all(|want| self.links.iter().any(|(spec, _)| spec.name == want.name))
    }

    /// Attaches the group's tracepoints that are not attached, all or none. Waits for the
    /// group's last detach to finish first (rare: a worker that starts within a second of
    /// it), or a tracepoint would run twice for a moment.
    fn attach_group(&mut self, ebpf: &mut Ebpf, index: usize) -> Result<(), ProbeError> {
        if self.group_attached(index) {
            return Ok(());
        }
        if let Some(handle) = self.narrowing.closing[index].take() {
            let _ = handle.join();
        }
        let mut attached = Vec::new();
        for spec in self.groups()[index].specs {
            if self.links.iter().any(|(s, _)| s.name == spec.name) {
                continue;
            }
            match attach_tracepoint(ebpf, spec) {
                Ok(link) => attached.push((spec, link)),
                Err(e) => {
                    // All or none, as the group was detached.
                    let _ = drop_tracepoint_links(ebpf, attached, self.groups()[index].name);
                    return Err(e);
                }
            }
        }
        self.links.extend(attached);
        self.narrowing.widened_at[index] = Some(Instant::now());
        Ok(())
    }

    fn detach_group(&mut self, ebpf: &mut Ebpf, index: usize) {
        let group = &self.groups()[index];
        let (out, rest): (Vec<_>, Vec<_>) = self
            .links
            .drain(..)
            .partition(|(spec, _)| group.specs.iter().any(|g| g.name == spec.name));
        self.links = rest;
        self.narrowing.closing[index] = drop_tracepoint_links(ebpf, out, group.name);
    }
}
