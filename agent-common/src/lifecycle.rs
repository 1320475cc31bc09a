//! Process start and exit, sent to user space so that discovery reacts within milliseconds
//! rather than waiting for the next /proc rescan.

/// What happened to a process.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LifecycleKind {
    /// A task called execve(); `pid` is its tgid after the exec.
    Exec = 1,
    /// The last thread of a tracked process exited (`group_dead`).
    Exit = 2,
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
            _ => None,
        }
    }
}

/// Ring buffer size in bytes (a power of two, multiple of the page size). Exec events for the
/// whole host go through it: 256 KiB holds 16k events between two reads.
pub const LIFECYCLE_RING_BYTES: u32 = 256 * 1024;

const _: () = assert!(core::mem::size_of::<LifecycleEvent>() == 16);

#[cfg(feature = "user")]
unsafe impl aya::Pod for LifecycleEvent {}
