//! Uprobe-multi links (`BPF_TRACE_UPROBE_MULTI`, Linux 6.6+) for uprobe programs of the
//! embedded object, with a per-uprobe fallback.
//!
//! # Why
//! aya 0.14 attaches a uprobe as one perf event per probe site (`perf_event_open` of the
//! `uprobe` PMU, then `PERF_EVENT_IOC_SET_BPF`). Following a worker "through its libc" takes 17
//! of them, and closing each one waits for its own RCU grace period. A uprobe-multi link is one
//! `BPF_LINK_CREATE` for any number of offsets of one file, filtered to one process (only that
//! process's mm gets breakpoints), and closing its fd unregisters every offset with a single
//! synchronisation.
//!
//! # How programs are loaded
//! The kernel accepts a program in a uprobe-multi link only if it was *loaded* with
//! `expected_attach_type = BPF_TRACE_UPROBE_MULTI`, which aya 0.14 cannot set. So
//! [`MultiPrograms::load`] loads a second copy of the named programs from
//! [`super::EBPF_OBJECT`] itself, the way aya's `EbpfLoader::load` does, through `aya-obj`:
//! parse, load the object's BTF (`BPF_BTF_LOAD`, after aya's fix-ups), relocate the map
//! references against the maps aya already created ([`MapFds`], duplicated in
//! [`super::Probes::start`] before any map is taken out), link the calls, and
//! `BPF_PROG_LOAD` as `BPF_PROG_TYPE_KPROBE` with that expected attach type. Both copies
//! read and write the same maps, so nothing else in the agent changes. aya-ebpf's
//! `#[uprobe]`/`#[uretprobe]` programs only read `pt_regs`, which a multi link passes as
//! well, so the same bytecode runs under both kinds of attachment.
//!
//! BTF is required, not optional: the worker programs pass callbacks to `bpf_loop`, and the
//! verifier rejects a `BPF_PSEUDO_FUNC` reference without BTF `func_info` ("missing btf
//! func_info"). Checked here: `worker_libc_write` loaded without BTF fails with exactly that,
//! with BTF it verifies. func_info and line_info are passed as aya passes them. On failure
//! the verifier log (its tail) is in the error.
//!
//! # Choosing
//! [`supported`] is the one place that decides whether this kernel takes uprobe-multi links
//! (probed once, the way libbpf probes it, including the fix of the pid filter that went into
//! 6.9); `FANOUT_UPROBE_MULTI=0` in the environment forces the fallback. Callers that get
//! `false` either load the same programs as [`MultiKind::PerUprobe`]
//! ([`LazyPrograms::get_or_per_uprobe`]: the worker attaching thread, which holds no aya
//! object), whose [`MultiPrograms::attach`] makes one perf-event uprobe per offset
//! ([`super::perf_uprobe`]) behind the same link type, or use [`attach_per_uprobe`], which
//! does the same with aya's per-uprobe attach of the programs aya loaded, by absolute file
//! offset (no ELF re-read per symbol), and detach with [`super::detach_uprobes_in_background`].
//!
//! # Use
//! ```ignore
//! // Once (Probes::start collected probes.map_fds right after loading the object):
//! let multi = uprobe_multi::supported()
//!     .then(|| MultiPrograms::load(&probes.map_fds, &["worker_libc_write", /* ... */]))
//!     .transpose()?;
//! // Per worker process (cache the offsets per libc (dev, inode)):
//! let sites = uprobe_multi::resolve_probe_sites(&libc, &["write", "read", /* ... */])?;
//! let link = multi.attach("worker_libc_read", &libc, &[sites.entries["read"], sites.entries["recv"]],
//!     Some(pid), /* retprobe */ false)?;            // one link per program
//! // When the process goes: returns at once, closes on a background thread.
//! link_closer::detach_in_background(links);
//! ```
//!
//! # Offsets
//! Offsets are file offsets of the probe sites, what a uprobe is attached at:
//! [`symbol_file_offsets`] / [`resolve_file_offsets`] turn symbol names into them (a
//! symbol's virtual address, translated through its section, as aya does), reading the file
//! once for all names; [`probe_sites`] / [`resolve_probe_sites`] add the in-prologue site of
//! [`crate::probe_site`], where the agent puts its probes, and the sites where a function's
//! system calls have returned.
//!
//! # Behaviour worth knowing
//! - The pid filter is per process: the kernel puts breakpoints only into that process's
//!   memory and runs the program only in its threads (checked by a test reading the process's
//!   memory). Programs may rely on it instead of a map lookup.
//! - A child the process forks inherits the breakpoints with its memory. The program does not
//!   run there, but unlike aya's perf-event uprobes (whose filter takes the breakpoint out of
//!   the child at its first hit), the kernel leaves a multi link's breakpoints in the child:
//!   it pays a trap per probed call (and return probes hijack its returns) until it execs or
//!   exits. Checked by a test; matters for workers that fork per job (Resque).
//! - Each link costs one fd, and closing it one synchronisation (about 50 ms here) whatever
//!   its number of offsets: fewer programs means fewer links. The 17 libc sites use 9
//!   programs, hence 9 links per process; one entry program that tells the functions apart
//!   by `bpf_get_attach_cookie` (see [`MultiPrograms::attach_with_cookies`]) and one return
//!   program would make it 2.
//!
//! # Measured
//! Linux 6.18, 2-core Firecracker VM, debug build, other builds and tests running beside,
//! with a harness used while this module was written (`cargo xtask bench` measures the
//! effect that matters, pick-up and scrape latency while 100 workers churn). The 17 libc
//! probe points of `LIBC_UPROBES` per `sleep`
//! process: 9 multi links (8 entry programs, 1 return program) against 17 aya uprobes. Median
//! (range) of 7 rounds for 1 process, 2-5 rounds for 100:
//!
//! | | 9 multi links | 17 aya uprobes by file offset | 17 aya uprobes by symbol (today) |
//! |---|---|---|---|
//! | attach, 1 process | 12.6 ms (8-21) | 25 ms (8-108) | 8.8 ms, 35 ms for the first |
//! | attach, 100 processes | 56 ms (39-81) | 171, 292, 5045 ms | - |
//! | detach, 1 process | 56 ms (48-88) on 64 threads, 376 ms (352-448) on one | 2.7 s (1.6-4.8) | (same) |
//! | detach, 100 processes | 1.0 s (0.99-1.09) on 64 threads, 44 s (40-47) on one | 218, 218, 319 s | (same) |
//!
//! Attaching is cheap either way once aya no longer re-reads the ELF; the first attach after
//! a quiet spell waits for an RCU grace period in the kernel (the 1-process numbers). Detaching
//! is where links win: one synchronisation per link (about 50 ms) instead of one per uprobe
//! (130-160 ms), and those of links closed from several threads overlap: 900 links take
//! 45 s on one thread, 7.3 s on 8, 2.0 s on 32, 1.0 s on 64, 0.6 s on 128, 0.4 s on 900.
//! Loading the 9 programs a second time costs about 190 ms, once.
//!
//! # Sessions (`BPF_TRACE_UPROBE_SESSION`, [`MultiKind::Session`])
//! Checked with a hand-assembled program while this module was written: a session program loads and attaches here, runs at entry and at return, and an
//! entry that returns non-zero skips the return. Without kfuncs a program tells entry from
//! return by comparing `bpf_get_func_ip(ctx)` (the probed address; helper 173, which
//! aya-ebpf 0.2.1 has) with `pt_regs->ip`: the kernel sets ip back to the breakpoint for
//! entry handlers, a return handler sees the return address. It agreed with the
//! `bpf_session_is_return` kfunc on 40,000 runs. The kfunc itself works from a hand-assembled
//! call, but aya-obj 0.3 does not relocate kfunc calls, so aya-ebpf programs cannot use it.
//! Per `read()` of a python loop (250 ns bare): entry probe +0.8 us, entry and return (two
//! multi links, or a session) +1.2 us, session whose entry returns 1 +0.8 us: a read entry
//! that sees an fd it does not follow could skip the return probe's 0.4 us.

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use super::bpf_sys::{
    sys_bpf, sys_bpf_fd, with_verifier_log, BtfLoadAttr, LinkCreateUprobeMultiAttr, MapElemAttr,
    ProgLoadAttr, BPF_BTF_LOAD, BPF_F_UPROBE_MULTI_RETURN, BPF_LINK_CREATE, BPF_MAP_UPDATE_ELEM,
    BPF_PROG_LOAD, BPF_PROG_TYPE_KPROBE, ENOTSUPP,
};
pub use super::bpf_sys::{BPF_TRACE_UPROBE_MULTI, BPF_TRACE_UPROBE_SESSION};
pub use super::uprobe_link::{MultiKind, UprobeMultiLink};

/// The kernel's limit on offsets per link (`MAX_UPROBE_MULTI_CNT`).
pub const MAX_OFFSETS: usize = 1 << 20;
/// Environment variable that, set to `0`, makes [`supported`] say no.
pub const DISABLE_ENV: &str = "FANOUT_UPROBE_MULTI";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("this fanout binary was built without eBPF programs (AYA_BUILD_SKIP=1)")]
    NotBuilt,
    #[error("uprobe-multi links are not usable here: {0}")]
    Unsupported(String),
    #[error("preparing the eBPF object for uprobe-multi programs failed: {0}")]
    Object(String),
    #[error("eBPF map {0} has no duplicated fd (MapFds must be collected right after the object is loaded, before maps are taken out)")]
    MissingMap(String),
    #[error("eBPF program {0} is not in the object")]
    MissingProgram(String),
    #[error("eBPF program {program} is not a uprobe or uretprobe program")]
    NotUprobe { program: String },
    #[error("eBPF program {program} was not loaded as a uprobe-multi program (MultiPrograms::load names the programs)")]
    NotLoaded { program: String },
    #[error("eBPF program {program} is a {actual}, attached as a {requested}")]
    WrongKind {
        program: String,
        actual: &'static str,
        requested: &'static str,
    },
    #[error(
        "loading {program} as a uprobe-multi program failed: {error}{}",
        log_tail(verifier_log)
    )]
    Load {
        program: String,
        #[source]
        error: io::Error,
        /// The verifier's log of the failed load (the end of it, if it was long).
        verifier_log: String,
    },
    #[error("attaching {program} at {count} offset(s) of {}{} failed: {reason}", path.display(), pid.map(|p| format!(" for pid {p}")).unwrap_or_default())]
    Attach {
        program: String,
        path: PathBuf,
        pid: Option<u32>,
        count: usize,
        reason: String,
        #[source]
        error: Option<io::Error>,
    },
    #[error("reading the symbols of {}: {message}", path.display())]
    Symbols { path: PathBuf, message: String },
}

/// The last lines of a verifier log, for an error message.
fn log_tail(log: &str) -> String {
    const LINES: usize = 30;
    let log = log.trim_end();
    if log.is_empty() {
        return String::new();
    }
    let lines: Vec<&str> = log.lines().collect();
    let start = lines.len().saturating_sub(LINES);
    let skipped = if start > 0 {
        format!("[{start} lines before]\n")
    } else {
        String::new()
    };
    format!("\nverifier log:\n{skipped}{}", lines[start..].join("\n"))
}

fn c_path(path: &Path) -> Result<CString, String> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| "the path contains a NUL byte".into())
}

// --- the maps aya created --------------------------------------------------------------------

/// Duplicated fds of every map of the loaded object, by name. Collect them with
/// [`MapFds::collect`] right after `load_object()`, before maps are taken out of the `Ebpf`.
/// Holding them keeps the maps alive; they are not otherwise used.
#[derive(Debug, Default)]
pub struct MapFds {
    fds: BTreeMap<String, OwnedFd>,
}

fn map_data(map: &aya::maps::Map) -> &aya::maps::MapData {
    use aya::maps::Map;
    match map {
        Map::Array(m)
        | Map::ArrayOfMaps(m)
        | Map::BloomFilter(m)
        | Map::CgroupArray(m)
        | Map::CgroupStorage(m)
        | Map::CgrpStorage(m)
        | Map::CpuMap(m)
        | Map::DevMap(m)
        | Map::DevMapHash(m)
        | Map::HashMap(m)
        | Map::HashOfMaps(m)
        | Map::InodeStorage(m)
        | Map::LpmTrie(m)
        | Map::LruHashMap(m)
        | Map::PerCpuArray(m)
        | Map::PerCpuCgroupStorage(m)
        | Map::PerCpuHashMap(m)
        | Map::PerCpuLruHashMap(m)
        | Map::PerfEventArray(m)
        | Map::ProgramArray(m)
        | Map::Queue(m)
        | Map::ReusePortSockArray(m)
        | Map::RingBuf(m)
        | Map::SockHash(m)
        | Map::SockMap(m)
        | Map::SkStorage(m)
        | Map::Stack(m)
        | Map::StackTraceMap(m)
        | Map::Unsupported(m)
        | Map::XskMap(m) => m,
    }
}

impl MapFds {
    /// Duplicates the fd of every map still in `ebpf`. A map whose fd cannot be duplicated
    /// (out of fds) is left out and logged: loading a program that uses it then fails with
    /// [`Error::MissingMap`].
    pub fn collect(ebpf: &aya::Ebpf) -> Self {
        let mut fds = BTreeMap::new();
        for (name, map) in ebpf.maps() {
            match map_data(map).fd().as_fd().try_clone_to_owned() {
                Ok(fd) => {
                    fds.insert(name.to_string(), fd);
                }
                Err(error) => {
                    tracing::warn!(map = name, %error, "cannot duplicate a map fd; uprobe-multi programs that use it cannot be loaded")
                }
            }
        }
        Self { fds }
    }

    pub fn get(&self, name: &str) -> Option<BorrowedFd<'_>> {
        self.fds.get(name).map(|fd| fd.as_fd())
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.fds.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.fds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }

    /// Writes one element of a map (`BPF_MAP_UPDATE_ELEM`, flags `BPF_ANY`). For tests and
    /// tools that hold no typed aya map; `K` and `V` must be the map's exact key and value
    /// types (plain `#[repr(C)]` data).
    pub fn update<K: Copy, V: Copy>(&self, map: &str, key: &K, value: &V) -> io::Result<()> {
        let fd = self
            .get(map)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no map {map}")))?;
        let mut attr = MapElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            key: key as *const K as u64,
            value: value as *const V as u64,
            ..Default::default()
        };
        sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop)
    }
}

// --- feature detection -----------------------------------------------------------------------

/// `r0 = 0; exit`.
const RETURN_ZERO: [u64; 2] = [
    0x0000_0000_0000_00b7, // BPF_ALU64 | BPF_MOV | BPF_K, dst r0, imm 0
    0x0000_0000_0000_0095, // BPF_JMP | BPF_EXIT
];

fn load_raw(insns: &[u64], expected_attach_type: u32, name: &str) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_KPROBE,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        expected_attach_type,
        prog_name: prog_name(name),
        ..Default::default()
    };
    sys_bpf_fd(BPF_PROG_LOAD, &mut attr)
}

fn link_create_raw(
    prog: BorrowedFd<'_>,
    attach_type: u32,
    path: &CString,
    offsets: &[u64],
    cookies: Option<&[u64]>,
    flags: u32,
    pid: u32,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateUprobeMultiAttr {
        prog_fd: prog.as_raw_fd() as u32,
        attach_type,
        path: path.as_ptr() as u64,
        offsets: offsets.as_ptr() as u64,
        cookies: cookies.map_or(0, |c| c.as_ptr() as u64),
        cnt: offsets.len() as u32,
        uprobe_flags: flags,
        pid,
        ..Default::default()
    };
    sys_bpf_fd(BPF_LINK_CREATE, &mut attr)
}

/// Probes the kernel the way libbpf does (`probe_uprobe_multi_link`): a trivial program
/// loaded with the multi attach type, then a link on `/` (not a regular file), which a
/// kernel with uprobe-multi refuses with EBADF after checking everything else; then the same
/// with pid -1, which a kernel whose pid filter is per process (6.9+, the fix libbpf checks
/// for) refuses with EINVAL before looking at the path.
fn probe() -> Result<(), String> {
    if std::env::var(DISABLE_ENV).as_deref() == Ok("0") {
        return Err(format!("turned off by {DISABLE_ENV}=0"));
    }
    let prog = load_raw(&RETURN_ZERO, BPF_TRACE_UPROBE_MULTI, "fanout_probe").map_err(|e| {
        format!("loading a program with expected attach type BPF_TRACE_UPROBE_MULTI: {e}")
    })?;
    let root = CString::new("/").expect("no NUL");
    match link_create_raw(
        prog.as_fd(),
        BPF_TRACE_UPROBE_MULTI,
        &root,
        &[0],
        None,
        0,
        0,
    ) {
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => {}
        Err(e) => return Err(format!("the kernel does not take uprobe-multi links ({e})")),
        Ok(_) => return Err("the kernel accepted a uprobe-multi link on '/'".into()),
    }
    match link_create_raw(
        prog.as_fd(),
        BPF_TRACE_UPROBE_MULTI,
        &root,
        &[0],
        None,
        0,
        u32::MAX,
    ) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        Err(e) => Err(format!(
            "the kernel's uprobe-multi pid filter is per thread, not per process (before 6.9): {e}"
        )),
        Ok(_) => Err("the kernel accepted a uprobe-multi link for pid -1".into()),
    }
}

/// Whether uprobe-multi links can be used here, or why not. Probed once per process.
pub fn support() -> &'static Result<(), String> {
    static SUPPORT: OnceLock<Result<(), String>> = OnceLock::new();
    SUPPORT.get_or_init(|| {
        let support = probe();
        match &support {
            Ok(()) => tracing::debug!("uprobe-multi links are supported"),
            Err(reason) => {
                tracing::info!(%reason, "uprobe-multi links cannot be used; one uprobe per probe site instead")
            }
        }
        support
    })
}

/// Whether this kernel takes uprobe-multi links (see [`support`] for why not). Callers that
/// get `false` use [`attach_per_uprobe`].
pub fn supported() -> bool {
    support().is_ok()
}

// --- loading ---------------------------------------------------------------------------------

/// How [`MultiPrograms::load_with`] loads.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    pub kind: MultiKind,
    /// Load the object's BTF and pass func_info/line_info (as aya does). Programs that give
    /// `bpf_loop` a callback cannot be loaded without it; `false` is only for checking that.
    pub btf: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            kind: MultiKind::Multi,
            btf: true,
        }
    }
}

#[derive(Debug)]
struct MultiProgram {
    fd: OwnedFd,
    retprobe: bool,
}

/// A second copy of some uprobe programs of the object, loaded for uprobe-multi links and
/// sharing the maps of the first. Dropping it unloads them once no link uses them any more
/// (a link holds its program).
#[derive(Debug)]
pub struct MultiPrograms {
    programs: BTreeMap<String, MultiProgram>,
    kind: MultiKind,
    /// Why the object's BTF could not be loaded, if it could not (programs without callbacks
    /// still load without it).
    pub btf_error: Option<String>,
    _btf: Option<OwnedFd>,
}

/// Programs loaded for uprobe-multi links the first time a caller needs them, or why they
/// could not be (said once in the log, with what the caller does instead).
#[derive(Debug, Default)]
pub struct LazyPrograms(Option<Result<std::sync::Arc<MultiPrograms>, String>>);

impl LazyPrograms {
    /// The programs `names` (loaded on the first call), or `None` where this kernel has no
    /// uprobe-multi links or the load failed; `fallback` says what is done instead.
    pub fn get(&mut self, maps: &MapFds, names: &[&str], fallback: &str) -> Option<&MultiPrograms> {
        self.get_with(|| load_if_supported(maps, names), fallback)
    }

    /// [`get`](Self::get), but where this kernel has no uprobe-multi links the programs are
    /// loaded for one perf-event uprobe per offset ([`MultiKind::PerUprobe`]) instead, which
    /// `fallback` says; `None` only when they do not load at all (`failed` says what then).
    pub fn get_or_per_uprobe(
        &mut self,
        maps: &MapFds,
        names: &[&str],
        fallback: &str,
        failed: &str,
    ) -> Option<&MultiPrograms> {
        let load = || {
            load_if_supported(maps, names).or_else(|why| {
                tracing::info!(reason = %why, "{fallback}");
                let per_uprobe = LoadOptions {
                    kind: MultiKind::PerUprobe,
                    btf: true,
                };
                super::EBPF_OBJECT
                    .ok_or(Error::NotBuilt)
                    .and_then(|object| MultiPrograms::load_with(object, maps, names, per_uprobe))
                    .map_err(|e| e.to_string())
            })
        };
        self.get_with(load, failed)
    }

    /// The programs `load` gives, loaded on the first call; where it fails, `failed` is said
    /// once with why, and later calls give `None` without trying again.
    fn get_with(
        &mut self,
        load: impl FnOnce() -> Result<MultiPrograms, String>,
        failed: &str,
    ) -> Option<&MultiPrograms> {
        if self.0.is_none() {
            let loaded = load();
            if let Err(e) = &loaded {
                tracing::info!(reason = %e, "{failed}");
            }
            self.0 = Some(loaded.map(std::sync::Arc::new));
        }
        self.loaded_programs()
    }

    /// The programs if they were loaded (without trying).
    pub fn loaded_programs(&self) -> Option<&MultiPrograms> {
        self.0.as_ref()?.as_ref().ok().map(|programs| &**programs)
    }

    /// The programs if they were loaded, to hold beside the links made with them (to make
    /// more later, on another thread).
    pub fn shared(&self) -> Option<std::sync::Arc<MultiPrograms>> {
        self.0.as_ref()?.as_ref().ok().cloned()
    }

    /// Whether the programs were loaded (without trying).
    pub fn loaded(&self) -> bool {
        self.loaded_programs().is_some()
    }
}

/// Loads `names` for uprobe-multi links, or says why they cannot be.
fn load_if_supported(maps: &MapFds, names: &[&str]) -> Result<MultiPrograms, String> {
    if supported() {
        MultiPrograms::load(maps, names).map_err(|e| e.to_string())
    } else {
        Err("this kernel has no uprobe-multi links".to_string())
    }
}

/// `prog_name`: at most 15 bytes, of the characters the kernel takes.
fn prog_name(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (slot, b) in out
        .iter_mut()
        .zip(
            name.bytes()
                .filter(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'.'),
        )
        .take(15)
    {
        *slot = b;
    }
    out
}

fn load_btf(raw: &[u8]) -> Result<OwnedFd, String> {
    let (result, log) = with_verifier_log(|log| {
        let mut attr = BtfLoadAttr {
            btf: raw.as_ptr() as u64,
            btf_size: raw.len() as u32,
            ..Default::default()
        };
        if let Some(buf) = log {
            attr.btf_log_buf = buf.as_mut_ptr() as u64;
            attr.btf_log_size = buf.len() as u32;
            attr.btf_log_level = 1;
        }
        sys_bpf_fd(BPF_BTF_LOAD, &mut attr)
    });
    result.map_err(|e| format!("BPF_BTF_LOAD: {e}{}", log_tail(&log)))
}

impl MultiPrograms {
    /// Loads the named programs of the embedded object for uprobe-multi links. `names` may
    /// repeat a name; every one must be a `#[uprobe]` or `#[uretprobe]` program.
    pub fn load(maps: &MapFds, names: &[&str]) -> Result<Self, Error> {
        let object = super::EBPF_OBJECT.ok_or(Error::NotBuilt)?;
        Self::load_with(object, maps, names, LoadOptions::default())
    }

    /// [`load`](Self::load) from any object (4-byte aligned ELF bytes), with options.
    pub fn load_with(
        object: &[u8],
        maps: &MapFds,
        names: &[&str],
        options: LoadOptions,
    ) -> Result<Self, Error> {
        use aya_obj::ProgramSection;
        let wanted: BTreeSet<&str> = names.iter().copied().collect();
        let mut obj =
            aya_obj::Object::parse(object).map_err(|e| Error::Object(format!("parse: {e}")))?;
        let mut kinds = BTreeMap::new();
        for name in &wanted {
            if super::refused_for_tests(name) {
                return Err(Error::Object(format!(
                    "{name}: refused (FANOUT_REFUSE_PROGRAMS)"
                )));
            }
            let program = obj
                .programs
                .get(*name)
                .ok_or_else(|| Error::MissingProgram(name.to_string()))?;
            let retprobe = match program.section {
                ProgramSection::UProbe { .. } => false,
                ProgramSection::URetProbe { .. } => true,
                _ => {
                    return Err(Error::NotUprobe {
                        program: name.to_string(),
                    })
                }
            };
            kinds.insert(name.to_string(), retprobe);
        }
        obj.programs
            .retain(|name, _| wanted.contains(name.as_str()));

        // The object's BTF, fixed up for this kernel as aya does it.
        let features = aya::features();
        let mut btf_error = None;
        let btf_fd = match (options.btf, features.btf()) {
            (false, _) => None,
            (true, None) => {
                btf_error = Some("the kernel does not support BTF".to_string());
                None
            }
            (true, Some(btf_features)) => match obj.fixup_and_sanitize_btf(btf_features) {
                Ok(Some(btf)) => match load_btf(&btf.to_bytes()) {
                    Ok(fd) => Some(fd),
                    Err(e) => {
                        btf_error = Some(e);
                        None
                    }
                },
                Ok(None) => {
                    btf_error = Some("the object has no BTF".to_string());
                    None
                }
                Err(e) => {
                    btf_error = Some(format!("fixing up the object's BTF: {e}"));
                    None
                }
            },
        };
        if obj.has_btf_relocations() {
            let target = aya_obj::btf::Btf::from_sys_fs()
                .map_err(|e| Error::Object(format!("the kernel's BTF, for CO-RE: {e}")))?;
            obj.relocate_btf(&target)
                .map_err(|e| Error::Object(format!("CO-RE relocation: {e}")))?;
        }

        // The maps aya created, in place of the object's definitions.
        let defs = obj.maps.clone();
        let mut relocations = Vec::new();
        for (name, def) in &defs {
            let fd = maps
                .get(name)
                .ok_or_else(|| Error::MissingMap(name.clone()))?;
            relocations.push((name.as_str(), fd.as_raw_fd(), def));
        }
        let text_sections = obj.functions.keys().map(|(section, _)| *section).collect();
        obj.relocate_maps(relocations.into_iter(), &text_sections)
            .map_err(|e| Error::Object(format!("map relocation: {e}")))?;
        obj.relocate_calls(&text_sections)
            .map_err(|e| Error::Object(format!("call relocation: {e}")))?;
        obj.sanitize_functions(features);

        let attach_type = options.kind.attach_type();
        let mut programs = BTreeMap::new();
        for (name, program) in &obj.programs {
            let function = obj
                .functions
                .get(&program.function_key())
                .ok_or_else(|| Error::MissingProgram(name.clone()))?;
            let fd = load_function(
                name,
                program,
                function,
                btf_fd.as_ref().map(|fd| fd.as_fd()),
                attach_type,
            )
            .map_err(|e| match (e, &btf_error) {
                (
                    Error::Load {
                        program,
                        error,
                        verifier_log,
                    },
                    Some(btf),
                ) => Error::Load {
                    program,
                    error,
                    verifier_log: format!("{verifier_log}\n(loaded without BTF: {btf})"),
                },
                (e, _) => e,
            })?;
            programs.insert(
                name.clone(),
                MultiProgram {
                    fd,
                    retprobe: kinds[name],
                },
            );
        }
        Ok(Self {
            programs,
            kind: options.kind,
            btf_error,
            _btf: btf_fd,
        })
    }

    /// What the programs were loaded for.
    pub fn kind(&self) -> MultiKind {
        self.kind
    }

    /// The names of the loaded programs.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.programs.keys().map(String::as_str)
    }

    pub fn contains(&self, program: &str) -> bool {
        self.programs.contains_key(program)
    }

    /// Whether the program is a `#[uretprobe]` (attach it with `retprobe: true`), if loaded.
    pub fn retprobe(&self, program: &str) -> Option<bool> {
        self.programs.get(program).map(|p| p.retprobe)
    }

    /// The program's fd (for `bpftool`, or tests).
    pub fn program_fd(&self, program: &str) -> Option<BorrowedFd<'_>> {
        self.programs.get(program).map(|p| p.fd.as_fd())
    }

    /// Attaches `program` at `offsets` (file offsets of the probe sites) of the file `path`,
    /// as entry probes, or return probes when `retprobe` (which must match how the program
    /// was declared: `#[uprobe]` or `#[uretprobe]`). With `pid`, only that process (all its
    /// threads) gets breakpoints and runs the program; without, every process mapping the
    /// file does. The offsets must be in the file and on instruction boundaries. The link
    /// lives as long as the returned value.
    pub fn attach(
        &self,
        program: &str,
        path: &Path,
        offsets: &[u64],
        pid: Option<u32>,
        retprobe: bool,
    ) -> Result<UprobeMultiLink, Error> {
        self.attach_with_cookies(program, path, offsets, None, pid, retprobe)
    }

    /// [`attach`](Self::attach) with one cookie per offset, which the program reads with
    /// `bpf_get_attach_cookie` (one program serving several functions can tell them apart).
    pub fn attach_with_cookies(
        &self,
        program: &str,
        path: &Path,
        offsets: &[u64],
        cookies: Option<&[u64]>,
        pid: Option<u32>,
        retprobe: bool,
    ) -> Result<UprobeMultiLink, Error> {
        let fail = |reason: String, error: Option<io::Error>| Error::Attach {
            program: program.to_string(),
            path: path.to_path_buf(),
            pid,
            count: offsets.len(),
            reason,
            error,
        };
        let loaded = self.programs.get(program).ok_or_else(|| Error::NotLoaded {
            program: program.to_string(),
        })?;
        let kind_name = |r: bool| if r { "uretprobe" } else { "uprobe" };
        if self.kind != MultiKind::Session && loaded.retprobe != retprobe {
            return Err(Error::WrongKind {
                program: program.to_string(),
                actual: kind_name(loaded.retprobe),
                requested: kind_name(retprobe),
            });
        }
        if self.kind == MultiKind::Session && retprobe {
            return Err(fail(
                "a session program runs at entry and return; attach it as an entry".into(),
                None,
            ));
        }
        if offsets.is_empty() {
            return Err(fail("no offsets".into(), None));
        }
        if offsets.len() > MAX_OFFSETS {
            return Err(fail(format!("more than {MAX_OFFSETS} offsets"), None));
        }
        if cookies.is_some_and(|c| c.len() != offsets.len()) {
            return Err(fail("not one cookie per offset".into(), None));
        }
        let pid_raw = match pid {
            None => 0,
            Some(0) => return Err(fail("pid 0".into(), None)),
            Some(p) if p > i32::MAX as u32 => return Err(fail("no such pid".into(), None)),
            Some(p) => p,
        };
        let c_path = c_path(path).map_err(|r| fail(r, None))?;
        let link = |fds, count| UprobeMultiLink::new(fds, self.kind, program, path, pid, count);
        if self.kind == MultiKind::PerUprobe {
            let mut fds = Vec::with_capacity(offsets.len());
            for (i, &offset) in offsets.iter().enumerate() {
                let cookie = cookies.map(|c| c[i]);
                match super::perf_uprobe::attach(
                    loaded.fd.as_fd(),
                    &c_path,
                    offset,
                    pid_raw,
                    retprobe,
                    cookie,
                ) {
                    Ok(more) => fds.extend(more),
                    Err(e) => {
                        // What went in goes in the background (a grace period per probe).
                        super::link_closer::detach_in_background(vec![link(fds, 0)]);
                        return Err(fail(
                            format!("perf-event uprobe at offset {offset:#x}"),
                            Some(e),
                        ));
                    }
                }
            }
            return Ok(link(fds, offsets.len()));
        }
        let flags = if retprobe {
            BPF_F_UPROBE_MULTI_RETURN
        } else {
            0
        };
        let fd = link_create_raw(
            loaded.fd.as_fd(),
            self.kind.attach_type(),
            &c_path,
            offsets,
            cookies,
            flags,
            pid_raw,
        )
        .map_err(|e| {
            let reason = match e.raw_os_error() {
                Some(libc::ENOENT) => "no such file".to_string(),
                Some(libc::EBADF) => "not a regular file".to_string(),
                Some(libc::ESRCH) => "no such process".to_string(),
                Some(libc::EACCES) | Some(libc::EPERM) => {
                    format!("not permitted ({e}; needs CAP_BPF and CAP_PERFMON, or root)")
                }
                Some(libc::EINVAL) => format!(
                    "the kernel refused it ({e}): an offset beyond the end of the file, or a kernel without uprobe-multi"
                ),
                Some(libc::EOPNOTSUPP) | Some(ENOTSUPP) => {
                    format!("not supported here ({e}), or an offset that is not on an instruction the kernel can probe")
                }
                _ => e.to_string(),
            };
            fail(reason, Some(e))
        })?;
        Ok(link(vec![fd], offsets.len()))
    }
}

fn load_function(
    name: &str,
    program: &aya_obj::Program,
    function: &aya_obj::Function,
    btf_fd: Option<BorrowedFd<'_>>,
    expected_attach_type: u32,
) -> Result<OwnedFd, Error> {
    let insns = &function.instructions;
    let func_info = function.func_info.func_info_bytes();
    let line_info = function.line_info.line_info_bytes();
    let (result, log) = with_verifier_log(|log| {
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_KPROBE,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: program.license.as_ptr() as u64,
            kern_version: program.kernel_version.unwrap_or(0),
            prog_name: prog_name(name),
            expected_attach_type,
            ..Default::default()
        };
        if let Some(btf) = btf_fd {
            attr.prog_btf_fd = btf.as_raw_fd() as u32;
            if function.func_info_rec_size > 0 && function.func_info.len() > 0 {
                attr.func_info = func_info.as_ptr() as u64;
                attr.func_info_cnt = function.func_info.len() as u32;
                attr.func_info_rec_size = function.func_info_rec_size as u32;
            }
            if function.line_info_rec_size > 0 && function.line_info.len() > 0 {
                attr.line_info = line_info.as_ptr() as u64;
                attr.line_info_cnt = function.line_info.len() as u32;
                attr.line_info_rec_size = function.line_info_rec_size as u32;
            }
        }
        if let Some(buf) = log {
            attr.log_buf = buf.as_mut_ptr() as u64;
            attr.log_size = buf.len() as u32;
            attr.log_level = 1;
        }
        sys_bpf_fd(BPF_PROG_LOAD, &mut attr)
    });
    result.map_err(|error| Error::Load {
        program: name.to_string(),
        error,
        verifier_log: log,
    })
}

// --- the fallback ----------------------------------------------------------------------------

/// The fallback for kernels without uprobe-multi links: what [`MultiPrograms::attach`] does,
/// with aya's per-uprobe attach (one perf event per offset) of the program aya loaded, by
/// absolute file offset (aya does not re-read the ELF). Loads the program first if needed.
/// On a failure the probes already attached are detached in the background. Detach the
/// result with [`super::detach_uprobes_in_background`].
pub fn attach_per_uprobe(
    ebpf: &mut aya::Ebpf,
    program: &'static str,
    path: &Path,
    offsets: &[u64],
    pid: Option<u32>,
) -> Result<Vec<(&'static str, aya::programs::uprobe::UProbeLinkId)>, Error> {
    use aya::programs::uprobe::{UProbeAttachLocation, UProbeScope};
    let fail = |reason: String| Error::Attach {
        program: program.to_string(),
        path: path.to_path_buf(),
        pid,
        count: offsets.len(),
        reason,
        error: None,
    };
    super::load_program(ebpf, program).map_err(|e| fail(e.to_string()))?;
    let scope = match pid {
        None => UProbeScope::AllProcesses,
        Some(p) => UProbeScope::OneProcess(
            std::num::NonZeroU32::new(p).ok_or_else(|| fail("pid 0".into()))?,
        ),
    };
    let mut links = Vec::with_capacity(offsets.len());
    for &offset in offsets {
        match super::attach_uprobe(
            ebpf,
            program,
            UProbeAttachLocation::AbsoluteOffset(offset),
            path,
            scope,
        ) {
            Ok(link) => links.push((program, link)),
            Err(e) => {
                super::detach_uprobes_in_background(ebpf, links);
                return Err(fail(format!("at offset {offset:#x}: {e}")));
            }
        }
    }
    Ok(links)
}

// --- symbols ---------------------------------------------------------------------------------

/// The file offsets of the named functions that `file` defines (dynamic symbols first, then
/// the symbol table), the way aya resolves a uprobe's symbol: the symbol's virtual address
/// translated through its section's file range for executables and shared objects. Names not
/// defined in the file are absent from the result.
pub fn symbol_file_offsets(file: &object::File<'_>, names: &[&str]) -> BTreeMap<String, u64> {
    use object::{Object, ObjectKind, ObjectSection, ObjectSymbol};
    let wanted: BTreeSet<&str> = names.iter().copied().collect();
    let translate = matches!(file.kind(), ObjectKind::Dynamic | ObjectKind::Executable);
    let mut out = BTreeMap::new();
    for symbol in file.dynamic_symbols().chain(file.symbols()) {
        let Ok(name) = symbol.name() else { continue };
        if !symbol.is_definition() || !wanted.contains(name) || out.contains_key(name) {
            continue;
        }
        let offset = if translate {
            symbol
                .section_index()
                .and_then(|index| file.section_by_index(index).ok())
                .and_then(|section| {
                    let (file_offset, _) = section.file_range()?;
                    Some(symbol.address().checked_sub(section.address())? + file_offset)
                })
        } else {
            Some(symbol.address())
        };
        if let Some(offset) = offset {
            out.insert(name.to_string(), offset);
        }
    }
    out
}

/// [`symbol_file_offsets`] of the file at `path`, read once.
pub fn resolve_file_offsets(path: &Path, names: &[&str]) -> Result<BTreeMap<String, u64>, Error> {
    let fail = |message: String| Error::Symbols {
        path: path.to_path_buf(),
        message,
    };
    let data = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let file = object::File::parse(&*data).map_err(|e| fail(e.to_string()))?;
    Ok(symbol_file_offsets(&file, names))
}

/// Where the agent probes each named function of `file`, as file offsets: the function's
/// file offset plus the in-prologue site [`crate::probe_site`] finds (a cheap, emulated
/// instruction; the entry when none is found). The offsets the worker's libc probes attach at.
pub fn probe_site_offsets(file: &object::File<'_>, names: &[&str]) -> BTreeMap<String, u64> {
    probe_sites(file, names).entries
}

/// Where the agent probes the named functions of a file, as file offsets.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProbeSites {
    /// Each function's in-prologue site ([`probe_site_offsets`]).
    pub entries: BTreeMap<String, u64>,
    /// For functions whose every system call returns through a branch that can be probed
    /// ([`crate::probe_site::syscall_exit_sites`]): those branches.
    pub syscall_exits: BTreeMap<String, Vec<u64>>,
}

/// The [`ProbeSites`] of the named functions of `file`.
pub fn probe_sites(file: &object::File<'_>, names: &[&str]) -> ProbeSites {
    let sites = crate::probe_site::sites_in(file, names);
    let mut out = ProbeSites::default();
    for (name, offset) in symbol_file_offsets(file, names) {
        let site = sites.get(&name);
        out.entries
            .insert(name.clone(), offset + site.map_or(0, |s| s.entry.offset));
        if let Some(exits) = site.and_then(|s| s.syscall_exits.as_ref()) {
            out.syscall_exits
                .insert(name, exits.iter().map(|e| offset + e).collect());
        }
    }
    out
}

/// [`probe_site_offsets`] of the file at `path`, read once.
pub fn resolve_probe_site_offsets(
    path: &Path,
    names: &[&str],
) -> Result<BTreeMap<String, u64>, Error> {
    resolve_probe_sites(path, names).map(|sites| sites.entries)
}

/// [`probe_sites`] of the file at `path`, read once.
pub fn resolve_probe_sites(path: &Path, names: &[&str]) -> Result<ProbeSites, Error> {
    let fail = |message: String| Error::Symbols {
        path: path.to_path_buf(),
        message,
    };
    let data = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let file = object::File::parse(&*data).map_err(|e| fail(e.to_string()))?;
    Ok(probe_sites(&file, names))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_names_are_cut_to_what_the_kernel_takes() {
        assert_eq!(&prog_name("worker_libc_read_ret")[..], b"worker_libc_rea\0");
        assert_eq!(&prog_name("a-b")[..3], b"ab\0");
    }

    #[test]
    fn verifier_log_tail_keeps_the_end() {
        let log: String = (0..100).map(|i| format!("line {i}\n")).collect();
        let tail = log_tail(&log);
        assert!(tail.contains("line 99"));
        assert!(tail.contains("[70 lines before]"));
        assert!(!tail.contains("line 69\n"));
        assert_eq!(log_tail("  \n"), "");
    }

    /// The bytes at a resolved file offset are the bytes at the symbol's address.
    fn check_offsets(path: &Path, names: &[&str]) -> BTreeMap<String, u64> {
        use object::{Object, ObjectSection, ObjectSymbol};
        let data = std::fs::read(path).unwrap();
        let file = object::File::parse(&*data).unwrap();
        let offsets = symbol_file_offsets(&file, names);
        for (name, offset) in &offsets {
            let symbol = file
                .dynamic_symbols()
                .chain(file.symbols())
                .find(|s| s.name() == Ok(name.as_str()) && s.is_definition())
                .unwrap();
            let section = file
                .section_by_index(symbol.section_index().unwrap())
                .unwrap();
            let at_address = section.data_range(symbol.address(), 16).unwrap().unwrap();
            let at = *offset as usize;
            assert_eq!(
                &data[at..at + 16],
                at_address,
                "{name} in {}",
                path.display()
            );
        }
        offsets
    }

    #[test]
    fn libc_symbols_resolve_to_file_offsets() {
        let libc = Path::new("/lib/x86_64-linux-gnu/libc.so.6");
        if !libc.exists() {
            eprintln!("no {}; skipped", libc.display());
            return;
        }
        let names = [
            "write",
            "read",
            "recvfrom",
            "connect",
            "close",
            "no_such_fn",
        ];
        let offsets = check_offsets(libc, &names);
        for name in &names[..5] {
            assert!(offsets.contains_key(*name), "{name} missing: {offsets:?}");
        }
        assert!(!offsets.contains_key("no_such_fn"));
        let from_path = resolve_file_offsets(libc, &names).unwrap();
        assert_eq!(from_path, offsets);
        // Probe sites are inside the function, a few bytes in at most.
        let sites = resolve_probe_sites(libc, &names).unwrap();
        assert_eq!(sites.entries.len(), offsets.len());
        for (name, site) in &sites.entries {
            let start = offsets[name];
            assert!(
                (start..start + 32).contains(site),
                "{name}: {site:#x} vs {start:#x}"
            );
        }
        // glibc's read wrappers: one exit site per path, inside the function.
        for name in ["read", "recvfrom"] {
            let Some(exits) = sites.syscall_exits.get(name) else {
                // Another C library (musl) is fine: its reads keep entry and return probes.
                continue;
            };
            let start = offsets[name];
            assert!(!exits.is_empty());
            for exit in exits {
                assert!((start + 8..start + 512).contains(exit), "{name}: {exit:#x}");
            }
        }
    }

    #[inline(never)]
    #[no_mangle]
    pub extern "C" fn fanout_uprobe_multi_test_symbol(x: u64) -> u64 {
        x.wrapping_mul(3).rotate_left(7)
    }

    #[test]
    fn own_symbols_resolve_to_file_offsets() {
        assert_ne!(fanout_uprobe_multi_test_symbol(1), 0);
        let exe = std::env::current_exe().unwrap();
        let offsets = check_offsets(&exe, &["fanout_uprobe_multi_test_symbol", "main"]);
        assert!(offsets.contains_key("fanout_uprobe_multi_test_symbol"));
    }

    #[test]
    fn resolving_a_missing_file_is_an_error() {
        let e = resolve_file_offsets(Path::new("/nonexistent/libc.so.6"), &["read"]).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/libc.so.6"), "{e}");
    }
}
