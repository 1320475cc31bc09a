//! Process start, fork and exit, sent to user space so that discovery reacts within
//! milliseconds rather than waiting for the next /proc rescan.

/// What happened to a process.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LifecycleKind {
    /// A task called execve(); `pid` is its tgid after the exec.
    Exec = 1,
    /// The last thread of a tracked process exited (`group_dead`).
    Exit = 2,
    /// A new process (not a thread) was forked by a tracked process, or by a Redis-looking
    /// process within [`RECENT_EXEC_WINDOW_NS`] of its exec; `pid` is the child's tgid.
    Fork = 3,
}

/// One entry of the `LIFECYCLE_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LifecycleEvent {
    /// A [`LifecycleKind`] as u32 (enums do not cross the boundary as-is).
    pub kind: u32,
    pub pid: u32,
    pub timestamp_ns: u64,
}

impl LifecycleEvent {
    pub fn kind(&self) -> Option<LifecycleKind> {
        match self.kind {
            1 => Some(LifecycleKind::Exec),
            2 => Some(LifecycleKind::Exit),
            3 => Some(LifecycleKind::Fork),
            _ => None,
        }
    }
}

/// Ring buffer size in bytes (a power of two, multiple of the page size). Exec events for the
/// whole host go through it: 256 KiB holds 16k events between two reads.
pub const LIFECYCLE_RING_BYTES: u32 = 256 * 1024;

/// How long after its exec a process's forks are reported although the agent does not track
/// it (yet): `redis-server --daemonize yes` forks the real server and exits within
/// milliseconds of its exec, often before the agent has read it. Only processes whose task
/// name contains "redis" or "valkey" (any case) are remembered at exec, so forks of the rest
/// of the node cost one or two hash lookups in the kernel and nothing in user space.
pub const RECENT_EXEC_WINDOW_NS: u64 = 2_000_000_000;

/// Entries of the recently-exec'd map (an LRU: the oldest go first, and entries older than
/// [`RECENT_EXEC_WINDOW_NS`] are ignored anyway).
pub const RECENT_EXECS_ENTRIES: u32 = 1024;

const _: () = assert!(core::mem::size_of::<LifecycleEvent>() == 16);

#[cfg(feature = "user")]
unsafe impl aya::Pod for LifecycleEvent {}
