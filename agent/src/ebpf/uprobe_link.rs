//! The links that put the agent's uprobe programs into a process: one uprobe-multi link per
//! program (Linux 6.6+), or one perf-event uprobe per offset where those are refused, and
//! what the programs were loaded for ([`MultiKind`]). Made by [`super::uprobe_multi`], closed
//! off the agent's loop by [`super::link_closer`].

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use super::bpf_sys::{
    sys_bpf, InfoByFdAttr, LinkInfoHead, BPF_OBJ_GET_INFO_BY_FD, BPF_TRACE_UPROBE_MULTI,
    BPF_TRACE_UPROBE_SESSION,
};

/// What the programs are loaded for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MultiKind {
    /// `BPF_TRACE_UPROBE_MULTI`: entry or return probes (Linux 6.6).
    #[default]
    Multi,
    /// `BPF_TRACE_UPROBE_SESSION`: one program runs at entry and at return; an entry that
    /// returns non-zero skips the return (Linux 6.13). aya-ebpf 0.2.1 has no wrapper for the
    /// session kfuncs (`bpf_session_is_return`, `bpf_session_cookie`).
    Session,
    /// No expected attach type: one perf-event uprobe per offset ([`super::perf_uprobe`]),
    /// where uprobe-multi links are refused. Cookies need a kernel that links them to a perf
    /// event ([`super::perf_uprobe::cookies_supported`], 5.15).
    PerUprobe,
}

impl MultiKind {
    /// How the log and errors name the probes of this kind: `uprobe-multi` for a link (of
    /// either multi kind), `uprobe` for one perf event per site.
    pub fn probe_name(self) -> &'static str {
        match self {
            Self::Multi | Self::Session => "uprobe-multi",
            Self::PerUprobe => "uprobe",
        }
    }

    pub(crate) fn attach_type(self) -> u32 {
        match self {
            Self::Multi => BPF_TRACE_UPROBE_MULTI,
            Self::Session => BPF_TRACE_UPROBE_SESSION,
            Self::PerUprobe => 0,
        }
    }
}

/// One uprobe-multi link, or (programs loaded as [`MultiKind::PerUprobe`]) one perf-event
/// uprobe per offset. Dropping it detaches every offset (closing a link's fd blocks for one
/// synchronisation of the kernel's uprobe machinery, each perf event's for one of its own;
/// see [`super::link_closer::detach_in_background`]).
#[derive(Debug)]
pub struct UprobeMultiLink {
    /// The link's fd, or the perf events' (one per offset, each with its link's where a
    /// cookie was passed).
    fds: Vec<OwnedFd>,
    /// What the programs were loaded for: a link of either multi kind, or perf events.
    kind: MultiKind,
    program: String,
    path: PathBuf,
    pid: Option<u32>,
    count: usize,
}

impl UprobeMultiLink {
    /// A link of `kind` over `fds` (the link's, or one perf event's per offset) that puts
    /// `program` on `count` offsets of `path`.
    pub(crate) fn new(
        fds: Vec<OwnedFd>,
        kind: MultiKind,
        program: &str,
        path: &Path,
        pid: Option<u32>,
        count: usize,
    ) -> Self {
        Self {
            fds,
            kind,
            program: program.to_string(),
            path: path.to_path_buf(),
            pid,
            count,
        }
    }

    pub fn program(&self) -> &str {
        &self.program
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// How many offsets the link covers.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Whether this is one perf-event uprobe per offset rather than a uprobe-multi link.
    pub fn per_uprobe(&self) -> bool {
        self.kind == MultiKind::PerUprobe
    }

    /// What its programs were loaded for.
    pub fn kind(&self) -> MultiKind {
        self.kind
    }

    /// The link's fd (the first perf event's, for perf-event uprobes).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fds[0].as_fd()
    }

    /// The kernel's id of the link (what `bpftool link` lists); perf-event uprobes have none.
    pub fn id(&self) -> io::Result<u32> {
        if self.per_uprobe() {
            return Err(io::Error::other("perf-event uprobes are not a BPF link"));
        }
        let mut info = LinkInfoHead::default();
        let mut attr = InfoByFdAttr {
            bpf_fd: self.fd().as_raw_fd() as u32,
            info_len: std::mem::size_of::<LinkInfoHead>() as u32,
            info: &mut info as *mut LinkInfoHead as u64,
        };
        sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
        Ok(info.id)
    }

    /// Detaches now, blocking until the kernel has unregistered every offset.
    pub fn detach(self) {
        drop(self)
    }

    /// How many fds it holds (one per offset for perf-event uprobes).
    pub(super) fn fd_count(&self) -> usize {
        self.fds.len()
    }

    /// Its fds, for [`super::link_closer`] to close.
    pub(super) fn into_fds(self) -> Vec<OwnedFd> {
        self.fds
    }

    /// A link over `fds` that are not probes (pipes, in tests of the closing thread).
    #[cfg(test)]
    pub(super) fn of_fds(fds: Vec<OwnedFd>, kind: MultiKind) -> Self {
        let count = fds.len();
        Self {
            fds,
            kind,
            program: "test".into(),
            path: PathBuf::from("/nonexistent"),
            pid: None,
            count,
        }
    }
}
