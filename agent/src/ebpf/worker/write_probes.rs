//! Each uprobe-followed worker's probe on `write()`, in a link of its own: taken out while
//! the worker's Redis connections send through `send`/`sendto` only (its `write()` calls are
//! then its logs and pipes, which each cost a trap), put back when a new connection may write
//! through it. [`super::narrowing`] decides; this module acts.

use std::collections::{BTreeSet, HashMap};

use super::attach::WriteLink;
use super::conn_maps::ConnMaps;
use super::narrowing::{self, remember_servers, Direction, Verdict};
use super::plan::{attach_write_probe, fd_path};
use crate::ebpf::link_closer::close_on_own_thread;
use crate::ebpf::uprobe_multi::{MultiPrograms, UprobeMultiLink};

/// A worker's probe on `write()`.
struct WriteProbe {
    /// The file the probe is put in, held open from before its first attach: attaching and
    /// putting it back go through `/proc/self/fd/N` ([`fd_path`]), the same file whatever
    /// its path names later (a libc upgraded since).
    file: std::fs::File,
    offset: u64,
    /// `None` while it is out.
    link: Option<UprobeMultiLink>,
    /// The thread closing the link taken out: the probe is not put back before it is done,
    /// or `write()` would be followed twice for a moment.
    closing: Option<std::thread::JoinHandle<()>>,
    /// Times it was put back after being taken out.
    widenings: u32,
    /// The worker's `CONNECTS` count when it was last looked at.
    connects_seen: Option<u64>,
    schedule: narrowing::Schedule,
    /// The servers its followed connections have talked to (at most
    /// [`narrowing::MAX_KNOWN_SERVERS`]).
    known: BTreeSet<narrowing::Server>,
}

impl WriteProbe {
    /// A probe just attached, looked at from the next tick on.
    fn new(write: WriteLink) -> Self {
        Self {
            file: write.file,
            offset: write.offset,
            link: Some(write.link),
            closing: None,
            widenings: 0,
            connects_seen: None,
            schedule: narrowing::Schedule::now(),
            known: Default::default(),
        }
    }
}

/// The `write()` probes of the workers followed through uprobe-multi links, by pid.
#[derive(Default)]
pub(super) struct WriteProbes(HashMap<u32, WriteProbe>);

impl WriteProbes {
    /// `pid`'s probe, just attached.
    pub(super) fn insert(&mut self, pid: u32, write: WriteLink) {
        self.0.insert(pid, WriteProbe::new(write));
    }

    pub(super) fn contains(&self, pid: u32) -> bool {
        self.0.contains_key(&pid)
    }

    /// Forgets `pid`'s probe; its link, if it is in, is the caller's to close.
    pub(super) fn remove(&mut self, pid: u32) -> Option<UprobeMultiLink> {
        self.0.remove(&pid).and_then(|probe| probe.link)
    }

    /// How many are taken out.
    pub(super) fn out(&self) -> usize {
        self.0.values().filter(|p| p.link.is_none()).count()
    }

    /// Takes out or puts back each probe that is due (a connect() since it was last looked
    /// at, or a decision still pending: see [`narrowing::Schedule`]), from what the kernel's
    /// `conns` say of its connections; `programs` put a probe back.
    pub(super) fn adjust(&mut self, conns: &ConnMaps, programs: Option<&MultiPrograms>) {
        if self.0.is_empty() {
            return;
        }
        let now = std::time::Instant::now();
        let mut due = BTreeSet::new();
        for (pid, probe) in self.0.iter_mut() {
            if conns.connected(*pid, &mut probe.connects_seen) {
                probe.schedule.reset(now);
            }
            let settled = probe.link.is_some() && probe.widenings >= narrowing::MAX_WIDENINGS;
            if !settled && probe.schedule.due(now) {
                due.insert(*pid);
            }
        }
        if due.is_empty() {
            return;
        }
        let connections = conns.gather(&due, Direction::Write);
        for pid in due {
            let Some(probe) = self.0.get_mut(&pid) else {
                continue;
            };
            remember_servers(&mut probe.known, connections.servers(pid));
            match connections.verdict(pid, probe.link.is_none(), &probe.known) {
                Verdict::Keep => probe.schedule.later(now),
                Verdict::Settled => probe.schedule.park(),
                Verdict::Narrow => {
                    let Some(link) = probe.link.take() else {
                        continue;
                    };
                    probe.schedule.park();
                    probe.closing = close_on_own_thread("write-probe-detach", move || drop(link));
                    tracing::info!(pid, "worker write() probe taken out: its Redis connections send through send/sendto, write() carries only its logs and pipes");
                }
                Verdict::Widen => {
                    probe.schedule.reset(now);
                    // The link taken out must be gone first, or write() would be followed
                    // twice; until then, the next tick looks again.
                    if probe.closing.as_ref().is_some_and(|h| !h.is_finished()) {
                        continue;
                    }
                    if let Some(handle) = probe.closing.take() {
                        let _ = handle.join();
                    }
                    let Some(multi) = programs else {
                        continue;
                    };
                    match attach_write_probe(multi, &fd_path(&probe.file), probe.offset, pid) {
                        Ok(link) => {
                            probe.link = Some(link);
                            probe.widenings += 1;
                            tracing::info!(pid, widenings = probe.widenings, "worker write() probe put back: a new connection to its Redis may write through it");
                        }
                        Err(e) => {
                            tracing::warn!(pid, error = %e, "cannot put the worker's write() probe back: commands it writes through write() are not seen")
                        }
                    }
                }
            }
        }
    }
}
