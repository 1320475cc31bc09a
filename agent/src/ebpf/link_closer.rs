//! Closing probe links off the agent's loop, and keeping count of what waits to be closed.
//!
//! Closing a uprobe-multi link waits for one synchronisation of the kernel's uprobe
//! machinery (about 50 ms here), a perf-event uprobe (kernels before 6.6) for one of its own:
//! a loop that dropped a worker's links would stall. One background thread takes every batch
//! handed to it ([`detach_in_background`]), holds back while a worker's probes are being made
//! ([`AttachTicket`]: making a uprobe waits for the closes the kernel is in the middle of),
//! and closes the links, overlapping the waits of uprobe-multi links across threads. The
//! kernel releases perf-event uprobes one after the other, about 10 a second, so where they
//! are used the fds waiting are counted ([`closes_pending`], `fanout.probes.closing`) and
//! bounded ([`closes_backlogged`]): past the bound, new workers wait.

use std::os::fd::OwnedFd;
use std::sync::OnceLock;

use super::uprobe_link::UprobeMultiLink;

/// Probe fds handed to the closing thread and not closed yet: links of uprobe-multi, and
/// perf-event uprobes (kernels before 6.6), which the kernel releases one after the other.
static CLOSES_PENDING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many probe fds handed to the closing thread (gone workers' and gone Redis servers')
/// wait for the kernel to release them (`fanout.probes.closing`).
pub fn closes_pending() -> usize {
    CLOSES_PENDING.load(std::sync::atomic::Ordering::Relaxed)
}

/// Most perf-event uprobes waiting to be closed before new workers get none
/// ([`closes_backlogged`]): about 120 gone workers' worth, which the kernel releases in about
/// three and a half minutes at the 10 a second measured here.
pub const MAX_CLOSES_PENDING: usize = 2048;

/// Overrides [`MAX_CLOSES_PENDING`] (the tests use a small one).
pub const MAX_CLOSES_PENDING_ENV: &str = "FANOUT_MAX_CLOSES_PENDING";

/// [`MAX_CLOSES_PENDING`], or its override from the environment.
pub fn max_closes_pending() -> usize {
    static LIMIT: OnceLock<usize> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var(MAX_CLOSES_PENDING_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(MAX_CLOSES_PENDING)
    })
}

/// Whether the closes waiting are past [`max_closes_pending`]. Where uprobe-multi links are
/// refused, each worker's probes are 17 perf events, and the kernel releases about 10 a
/// second whatever the threads: workers forked per job (Resque, RQ) that come faster than
/// that would grow the agent's fds and the kernel's memory without end. Past the bound, new
/// workers are not probed (counted as `fanout.workers.unfollowed{reason="probe_backlog"}`)
/// and are probed once the closes fall under half of it.
pub fn closes_backlogged() -> bool {
    closes_pending() > max_closes_pending()
}

/// Whether the closes have fallen far enough under the bound for the workers held back by it
/// to be probed (half of it: a backlog hovering at the bound would otherwise let one worker
/// in per close).
pub fn closes_drained() -> bool {
    closes_pending() <= max_closes_pending() / 2
}

/// Counts down [`CLOSES_PENDING`] as an fd the closing thread took is closed (the fd is
/// only held, to be closed when this drops).
struct CountedFd(#[allow(dead_code)] OwnedFd);

impl Drop for CountedFd {
    fn drop(&mut self) {
        // The fd closes when the field drops, right after this.
        CLOSES_PENDING.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Attach requests queued or in progress (see [`AttachTicket`]).
static ATTACHES_WAITING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Longest a batch of links waits to be closed while attaches are waiting.
pub const DETACH_DEFER: std::time::Duration = std::time::Duration::from_secs(2);

/// Held by an attach request from when it is queued until it is done: while any is held, the
/// closing thread holds back. Making a uprobe waits for the closes of others the kernel is in
/// the middle of (they serialise on its uprobe and trace-event locks): closing the probes of
/// workers that exit while others start, one perf-event uprobe per site (kernels without
/// uprobe-multi) took 1.5-7 s for a starting worker's 17, and 87 of 100 workers living under
/// a second were gone before theirs were in. Probes of an exited process cost nothing but memory
/// while they wait; a starting worker's first commands are missed while its probes do.
#[derive(Debug)]
pub struct AttachTicket(());

impl AttachTicket {
    pub fn new() -> Self {
        ATTACHES_WAITING.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(())
    }
}

impl Default for AttachTicket {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for AttachTicket {
    fn drop(&mut self) {
        ATTACHES_WAITING.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Waits while attaches are waiting, up to `longest`.
fn wait_for_attaches(longest: std::time::Duration) {
    let deadline = std::time::Instant::now() + longest;
    while ATTACHES_WAITING.load(std::sync::atomic::Ordering::Relaxed) > 0
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The closing thread's queue, the thread started on first use (or `None` if it could not be
/// started).
fn detacher() -> &'static Option<std::sync::Mutex<std::sync::mpsc::Sender<Vec<UprobeMultiLink>>>> {
    use std::sync::{mpsc, Mutex};
    static CLOSER: OnceLock<Option<Mutex<mpsc::Sender<Vec<UprobeMultiLink>>>>> = OnceLock::new();
    CLOSER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Vec<UprobeMultiLink>>();
        let spawned = std::thread::Builder::new()
            .name("uprobe-multi-detach".into())
            .spawn(move || {
                while let Ok(mut batch) = rx.recv() {
                    wait_for_attaches(DETACH_DEFER);
                    while let Ok(more) = rx.try_recv() {
                        batch.extend(more);
                    }
                    close_counted(batch);
                }
            });
        match spawned {
            Ok(_) => Some(Mutex::new(tx)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a thread to detach uprobe-multi links; they are detached on the caller's thread");
                None
            }
        }
    })
}

/// Starts the closing thread now, so that the agent's thread count is the same from start
/// to end (an idle thread costs nothing; a thread appearing mid-run looks like a leak).
pub fn start_detacher() {
    let _ = detacher();
}

/// Closes links off the caller's thread and returns at once. Each close waits for the kernel
/// to synchronise (about 50 ms here), so a loop that dropped many links would stall. One
/// background thread (started on first use) takes every batch handed to it, waits while
/// attaches are waiting (an [`AttachTicket`] is held; at most [`DETACH_DEFER`]), gathers what
/// arrived meanwhile, and closes it with [`close_links`], whose waits overlap. If that thread
/// cannot be started, the links are closed here.
pub fn detach_in_background(links: Vec<UprobeMultiLink>) {
    if links.is_empty() {
        return;
    }
    let closer = detacher();
    let fds: usize = links.iter().map(|link| link.fd_count()).sum();
    // Counted before the thread can take them: it counts each down as it closes it.
    CLOSES_PENDING.fetch_add(fds, std::sync::atomic::Ordering::Relaxed);
    let links = match closer {
        Some(tx) => {
            let tx = tx.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            match tx.send(links) {
                Ok(()) => return,
                // The thread is gone (it never panics, but if it did): close them here.
                Err(std::sync::mpsc::SendError(links)) => links,
            }
        }
        None => links,
    };
    close_counted(links);
}

/// Closes the links now. Uprobe-multi links are closed on up to [`CLOSERS`] threads (one
/// per link at most), so that the kernel's synchronisations overlap: 900 links (100
/// processes) take about 45 s closed one after the other, 7 s on 8 threads, 1 s on 64
/// (measured; see the module docs). Perf-event uprobes are closed one at a time, each once no
/// attach is waiting (at most [`DETACH_DEFER`] later): the kernel destroys them one after the
/// other whatever the threads (about 10 per second here, on one thread as on 64), and a
/// worker's perf-event uprobes wait for every close queued before them (12 exited workers'
/// probes, closed on 64 threads, held a starting worker's for 7 s).
pub fn close_links(links: Vec<UprobeMultiLink>) {
    close_links_with(links, |fd| fd)
}

/// [`close_links`] for links [`detach_in_background`] counted in [`CLOSES_PENDING`].
fn close_counted(links: Vec<UprobeMultiLink>) {
    close_links_with(links, CountedFd)
}

/// Closes the links' fds, each wrapped by `wrap` (whose drop closes it).
fn close_links_with<T: Send>(links: Vec<UprobeMultiLink>, wrap: impl Fn(OwnedFd) -> T) {
    let (per_uprobe, links): (Vec<_>, Vec<_>) =
        links.into_iter().partition(UprobeMultiLink::per_uprobe);
    close_fds_on(
        links
            .into_iter()
            .flat_map(UprobeMultiLink::into_fds)
            .map(&wrap)
            .collect(),
        CLOSERS,
    );
    for fd in per_uprobe.into_iter().flat_map(UprobeMultiLink::into_fds) {
        wait_for_attaches(DETACH_DEFER);
        drop(wrap(fd));
    }
}

/// Closes `fds` (or what holds them) on up to `threads` threads.
fn close_fds_on<T: Send>(fds: Vec<T>, threads: usize) {
    let threads = threads.clamp(1, fds.len().max(1));
    let mut chunks: Vec<Vec<T>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, fd) in fds.into_iter().enumerate() {
        chunks[i % threads].push(fd);
    }
    std::thread::scope(|scope| {
        for chunk in chunks {
            // A thread that cannot be started closes nothing: its links are dropped here, in
            // this thread.
            if let Err(e) = std::thread::Builder::new()
                .name("uprobe-multi-close".into())
                .spawn_scoped(scope, move || drop(chunk))
            {
                tracing::debug!(error = %e, "closing uprobe-multi links on fewer threads");
            }
        }
    });
}

/// Threads [`close_links`] uses at most.
pub const CLOSERS: usize = 64;

/// Runs `close` on a thread of its own, whose handle is returned (closing a link or a
/// tracepoint waits for RCU grace periods; the caller may have to wait for it before putting
/// the same probe back); if no thread can be started, what it holds is closed here, as it is
/// dropped.
pub(crate) fn close_on_own_thread(
    name: &str,
    close: impl FnOnce() + Send + 'static,
) -> Option<std::thread::JoinHandle<()>> {
    match std::thread::Builder::new().name(name.into()).spawn(close) {
        Ok(handle) => Some(handle),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start a thread to detach probes; detached on the agent's loop");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ebpf::uprobe_link::MultiKind;

    #[test]
    fn closes_handed_to_the_closing_thread_are_counted_until_done() {
        // Pipes stand in for the probes' fds (closing a pipe's write end is what the thread
        // does to a probe's fd; the read end then sees the end of the stream).
        let mut readers = Vec::new();
        let mut link = |kind: MultiKind, count: usize| {
            let fds = (0..count)
                .map(|_| {
                    let (reader, writer) = std::io::pipe().unwrap();
                    readers.push(reader);
                    OwnedFd::from(writer)
                })
                .collect();
            UprobeMultiLink::of_fds(fds, kind)
        };
        let links = vec![
            link(MultiKind::PerUprobe, 4),
            link(MultiKind::Multi, 1),
            link(MultiKind::Multi, 1),
        ];
        // Held while handing them over: the thread holds back while an attach waits.
        let ticket = AttachTicket::new();
        detach_in_background(links);
        assert!(closes_pending() >= 6, "{} counted", closes_pending());
        drop(ticket);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while closes_pending() != 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(closes_pending(), 0, "every close counted down");
        for mut reader in readers {
            let mut rest = Vec::new();
            std::io::Read::read_to_end(&mut reader, &mut rest).unwrap();
        }
    }
}
