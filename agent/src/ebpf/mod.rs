//! Loading the embedded eBPF object and talking to its maps.

pub mod blocked_clients;
pub mod bpf_sys;
pub mod link_closer;
pub mod map_usage;
pub mod perf_uprobe;
pub mod redis;
pub mod redis_attach;
pub mod sched;
pub mod slots;
pub mod stack_depth;
pub mod uprobe_link;
pub mod uprobe_multi;
pub mod worker;

use aya::{programs::TracePoint, Ebpf, EbpfLoader};

/// The eBPF object built by build.rs, or `None` when built with `AYA_BUILD_SKIP=1`.
#[cfg(not(fanout_no_ebpf))]
pub static EBPF_OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(concat!(
    env!("OUT_DIR"),
    "/fanout-ebpf"
)));
#[cfg(fanout_no_ebpf)]
pub static EBPF_OBJECT: Option<&[u8]> = None;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("this fanout binary was built without eBPF programs (AYA_BUILD_SKIP=1)")]
    NotBuilt,
    #[error("{0}")]
    Disabled(&'static str),
    #[error("loading the eBPF object failed: {0} (needs CAP_BPF and CAP_PERFMON, or root)")]
    Load(String),
    #[error("eBPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF map {name}: {message}")]
    Map { name: &'static str, message: String },
    #[error("{pending} probes of gone workers wait for the kernel to release them (about 10 a second where uprobe-multi links are refused), more than {limit}: new workers are probed once fewer than half of that remain")]
    ClosesBacklogged { pending: usize, limit: usize },
    #[error("loading or attaching {program} to tracepoint {category}:{name} failed: {message}")]
    Attach {
        program: &'static str,
        category: &'static str,
        name: &'static str,
        message: String,
    },
}

/// A tracepoint program and where it attaches.
pub struct TracepointSpec {
    pub program: &'static str,
    pub category: &'static str,
    pub name: &'static str,
}

/// Whether one program is attached, for start-up output and the `fanout.probes.attached` gauge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeStatus {
    pub program: &'static str,
    pub attached: bool,
    pub error: Option<String>,
}

/// Makes sure tracefs is mounted: tracepoint ids are read from it. A DaemonSet or minimal VM
/// may not have it mounted.
pub fn ensure_tracefs() -> Result<(), String> {
    let events = std::path::Path::new("/sys/kernel/tracing/events");
    if events.exists() || std::path::Path::new("/sys/kernel/debug/tracing/events").exists() {
        return Ok(());
    }
    let target = c"/sys/kernel/tracing";
    let fstype = c"tracefs";
    // SAFETY: valid NUL-terminated strings, no data argument.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "tracefs is not mounted at /sys/kernel/tracing and mounting it failed: {}",
            std::io::Error::last_os_error()
        ))
    }
}

/// Raises RLIMIT_MEMLOCK for kernels that still charge BPF maps against it (before 5.11).
fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Raises the open-file limit to its hard limit: every uprobe link is an fd, and a node with
/// hundreds of followed workers holds thousands of them (the default soft limit is 1024).
fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with valid pointers.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Loads the embedded object (programs are loaded into the kernel as they are attached), with
/// the offsets of the kernel's per-task counters as its load-time constants where they are
/// known (`sched::counter_offsets`).
pub fn load_object(
    counters: Option<crate::kernel_btf::TaskCounterOffsets>,
) -> Result<Ebpf, ProbeError> {
    let object = EBPF_OBJECT.ok_or(ProbeError::NotBuilt)?;
    raise_memlock();
    raise_nofile();
    let (cpu_ns, arrivals) = counters.map_or((0u64, 0u64), |c| {
        (c.cpu_ns as u64, c.arrivals_then_run_delay as u64)
    });
    EbpfLoader::new()
        .override_global(sched::CPU_NS_OFFSET_GLOBAL, &cpu_ns, true)
        .override_global(sched::ARRIVALS_OFFSET_GLOBAL, &arrivals, true)
        .load(object)
        .map_err(|e| ProbeError::Load(e.to_string()))
}

/// Takes a map out of the loaded object, typed.
pub fn take_map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, ProbeError> {
    let map = ebpf.take_map(name).ok_or(ProbeError::MissingMap(name))?;
    T::try_from(map).map_err(|e| ProbeError::Map {
        name,
        message: e.to_string(),
    })
}

/// The ring buffers the kernel sends events through.
pub struct Rings {
    /// Exec and exit of processes.
    pub lifecycle: aya::maps::RingBuf<aya::maps::MapData>,
    /// Key lists of worker connections, when they change.
    pub keysets: aya::maps::RingBuf<aya::maps::MapData>,
    /// Redis processes whose probes the attaching thread prepared, to install.
    pub redis_attached: tokio::sync::mpsc::UnboundedReceiver<redis_attach::Attached>,
    /// Workers whose probes the attaching thread made, to install.
    pub worker_attached: tokio::sync::mpsc::UnboundedReceiver<worker::attach::Answer>,
}

/// Everything loaded into the kernel. Dropping it detaches every program.
pub struct Probes {
    pub ebpf: Ebpf,
    /// Duplicates of every map's fd, taken before any map is taken out of `ebpf`: what
    /// [`uprobe_multi::MultiPrograms::load`] relocates its copy of the programs against.
    pub map_fds: std::sync::Arc<uprobe_multi::MapFds>,
    pub sched: sched::SchedMaps,
    pub redis: redis::RedisMaps,
    /// Inspects Redis binaries and attaches their probes off the state lock.
    pub redis_attacher: redis_attach::RedisAttacher,
    pub worker: worker::WorkerMaps,
    /// The tracepoints' state, for the log and `fanout.probes.attached`.
    pub status: Vec<ProbeStatus>,
}

impl Probes {
    /// Loads the object, attaches the tracepoints and loads (not yet attaches) the uprobes.
    /// Returns the ring buffers separately: each is read by its own task.
    pub fn start() -> Result<(Self, Rings), ProbeError> {
        let counters = sched::counter_offsets();
        let sees_switches = counters.is_ok();
        let mut ebpf = load_object(counters.as_ref().ok().copied())?;
        let map_fds = std::sync::Arc::new(uprobe_multi::MapFds::collect(&ebpf));
        let status = sched::attach_tracepoints(&mut ebpf, counters);
        link_closer::start_detacher();
        let (redis_attacher, redis_attached) = redis_attach::RedisAttacher::start(map_fds.clone())
            .map_err(|e| {
                ProbeError::Load(format!("cannot start the Redis attaching thread: {e}"))
            })?;
        let (worker_attacher, worker_attached) =
            worker::attach::WorkerAttacher::start(map_fds.clone()).map_err(|e| {
                ProbeError::Load(format!("cannot start the worker attaching thread: {e}"))
            })?;
        let ring = Rings {
            lifecycle: take_map(&mut ebpf, agent_common::maps::LIFECYCLE_EVENTS)?,
            keysets: take_map(&mut ebpf, agent_common::maps::KEYSET_EVENTS)?,
            redis_attached,
            worker_attached,
        };
        let sched = sched::SchedMaps::new(&mut ebpf)?;
        let mut redis = redis::RedisMaps::new(&mut ebpf)?;
        redis.sees_switches = sees_switches;
        let worker = worker::WorkerMaps::new(&mut ebpf, worker_attacher)?;
        Ok((
            Self {
                ebpf,
                map_fds,
                sched,
                redis,
                redis_attacher,
                worker,
                status,
            },
            ring,
        ))
    }

    pub fn any_attached(&self) -> bool {
        self.status.iter().any(|s| s.attached)
    }
}

/// Removes the entries of a kernel hash map whose key `matches` (a process's, when it is
/// no longer tracked). The keys are gathered first: removing while walking would skip some.
pub fn remove_keys_where<K: aya::Pod, V: aya::Pod>(
    map: &mut aya::maps::HashMap<aya::maps::MapData, K, V>,
    matches: impl Fn(&K) -> bool,
) {
    let keys: Vec<K> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| matches(k))
        .collect();
    for k in keys {
        let _ = map.remove(&k);
    }
}

/// Programs named in `FANOUT_REFUSE_PROGRAMS` (comma-separated) fail to load as if the
/// kernel had refused them: how the tests reach the fallbacks of kernels that would (no BTF,
/// an older verifier) on a kernel that does not.
pub fn refused_for_tests(name: &str) -> bool {
    std::env::var("FANOUT_REFUSE_PROGRAMS")
        .is_ok_and(|list| list.split(',').any(|refused| refused.trim() == name))
}

/// Loads (verifies) one program, once: a program that serves several attach points (write
/// and sendto, read and recv) is loaded the first time and found loaded after.
pub fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), ProbeError> {
    if refused_for_tests(name) {
        return Err(ProbeError::Load(format!(
            "{name}: refused (FANOUT_REFUSE_PROGRAMS)"
        )));
    }
    let result = match ebpf
        .program_mut(name)
        .ok_or(ProbeError::MissingProgram(name))?
    {
        aya::programs::Program::TracePoint(p) => p.load(),
        aya::programs::Program::UProbe(p) => p.load(),
        _ => {
            return Err(ProbeError::Load(format!(
                "{name}: neither a tracepoint nor a uprobe"
            )))
        }
    };
    match result {
        Ok(()) | Err(aya::programs::ProgramError::AlreadyLoaded) => Ok(()),
        Err(e) => Err(ProbeError::Load(format!("{name}: {e}"))),
    }
}

/// Loads every named program; returns the first failure, if any (the others are still loaded).
pub fn load_programs(
    ebpf: &mut Ebpf,
    names: impl IntoIterator<Item = &'static str>,
) -> Option<String> {
    let mut first_error = None;
    for name in names {
        if let Err(e) = load_program(ebpf, name) {
            first_error.get_or_insert(e.to_string());
        }
    }
    first_error
}

/// Detaches one uprobe link (a link of a program that is gone is ignored).
pub fn detach_uprobe(
    ebpf: &mut Ebpf,
    program: &'static str,
    link: aya::programs::uprobe::UProbeLinkId,
) {
    if let Some(Ok(p)) = ebpf
        .program_mut(program)
        .map(<&mut aya::programs::UProbe>::try_from)
    {
        let _ = p.detach(link);
    }
}

/// Attaches one (already loaded) uprobe program at `location` in the file `target`.
pub fn attach_uprobe(
    ebpf: &mut Ebpf,
    program: &'static str,
    location: aya::programs::uprobe::UProbeAttachLocation<'_>,
    target: &std::path::Path,
    scope: aya::programs::uprobe::UProbeScope,
) -> Result<aya::programs::uprobe::UProbeLinkId, String> {
    ebpf.program_mut(program)
        .ok_or_else(|| format!("program {program} missing"))
        .and_then(|p| <&mut aya::programs::UProbe>::try_from(p).map_err(|e| e.to_string()))
        .and_then(|p| p.attach(location, target, scope).map_err(|e| e.to_string()))
}

/// Detaches uprobes off the agent's own loop. Each uprobe the kernel unregisters waits for an
/// RCU grace period: about 0.1 s here, so the 17 libc probes of one worker take about 2 s.
/// Taking the links out of their programs and dropping them on a short-lived thread keeps
/// collection, scrapes and attaching going meanwhile.
pub fn detach_uprobes_in_background(
    ebpf: &mut Ebpf,
    links: Vec<(&'static str, aya::programs::uprobe::UProbeLinkId)>,
) {
    let owned: Vec<aya::programs::uprobe::UProbeLink> = links
        .into_iter()
        .filter_map(|(program, link)| {
            let p = ebpf.program_mut(program)?;
            <&mut aya::programs::UProbe>::try_from(p)
                .ok()?
                .take_link(link)
                .ok()
        })
        .collect();
    if owned.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("uprobe-detach".into())
        .spawn(move || drop(owned));
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start a thread to detach uprobes; they stay until the agent exits");
    }
}

/// Loads (once) and attaches one tracepoint program.
pub fn attach_tracepoint(
    ebpf: &mut Ebpf,
    spec: &TracepointSpec,
) -> Result<aya::programs::trace_point::TracePointLinkId, ProbeError> {
    let attach_err = |message: String| ProbeError::Attach {
        program: spec.program,
        category: spec.category,
        name: spec.name,
        message,
    };
    load_program(ebpf, spec.program).map_err(|e| attach_err(e.to_string()))?;
    let program: &mut TracePoint = ebpf
        .program_mut(spec.program)
        .ok_or(ProbeError::MissingProgram(spec.program))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| attach_err(e.to_string()))?;
    program
        .attach(spec.category, spec.name)
        .map_err(|e| attach_err(e.to_string()))
}

/// Loads and attaches each tracepoint; one failing does not stop the others.
pub fn attach_tracepoints(ebpf: &mut Ebpf, specs: &[TracepointSpec]) -> Vec<ProbeStatus> {
    specs
        .iter()
        .map(|spec| {
            let result = attach_tracepoint(ebpf, spec);
            ProbeStatus {
                program: spec.program,
                attached: result.is_ok(),
                error: result.err().map(|e| e.to_string()),
            }
        })
        .collect()
}

/// Loads (verifies) every program of the object without attaching it: (program, verified
/// instruction count or error).
pub fn check_all_programs() -> Result<Vec<(String, Result<u32, String>)>, ProbeError> {
    // With the running kernel's offsets, so that `sched_switch_counters` is verified as it
    // runs (without them its loads are dead code).
    let mut ebpf = load_object(sched::counter_offsets().ok())?;
    let names: Vec<String> = ebpf.programs().map(|(name, _)| name.to_string()).collect();
    let mut out = Vec::new();
    for name in names {
        let name: &'static str = Box::leak(name.into_boxed_str());
        let result = load_program(&mut ebpf, name).and_then(|()| {
            let info = match ebpf.program(name) {
                Some(aya::programs::Program::TracePoint(p)) => p.info(),
                Some(aya::programs::Program::UProbe(p)) => p.info(),
                _ => return Err(ProbeError::MissingProgram(name)),
            };
            info.map(|i| i.verified_instruction_count().unwrap_or(0))
                .map_err(|e| ProbeError::Load(e.to_string()))
        });
        out.push((name.to_string(), result.map_err(|e| e.to_string())));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Says where a probe went; a probe the kernel must single-step is worth knowing about,
/// since each of its hits costs a second trap (see `probe_site`).
pub(crate) fn log_probe_site(
    symbol: &str,
    site: crate::probe_site::ProbeSite,
    binary: &std::path::Path,
) {
    if site.emulated {
        tracing::debug!(symbol, offset = site.offset, binary = %binary.display(), "probe on an emulated instruction");
    } else {
        tracing::info!(symbol, binary = %binary.display(), "probe on an instruction the kernel single-steps: each hit costs a second trap");
    }
}

/// A [`agent_common::pidset`] in an eBPF array map. A set only the agent writes remembers
/// the words it wrote, so that changing one bit is one map update and no read; a set the
/// kernel writes too is read before each change.
pub struct PidSet {
    map: aya::maps::Array<aya::maps::MapData, u64>,
    /// The words as last written, for a set only the agent writes.
    words: Option<std::collections::HashMap<u32, u64>>,
}

impl PidSet {
    /// A set only the agent writes.
    pub fn new(ebpf: &mut Ebpf, name: &'static str) -> Result<Self, ProbeError> {
        Ok(Self {
            map: take_map(ebpf, name)?,
            words: Some(std::collections::HashMap::new()),
        })
    }

    /// A set the kernel writes as well.
    pub fn shared(ebpf: &mut Ebpf, name: &'static str) -> Result<Self, ProbeError> {
        Ok(Self {
            map: take_map(ebpf, name)?,
            words: None,
        })
    }

    /// Adds or removes `pid`; pids past the set's range are refused.
    pub fn set(&mut self, pid: u32, present: bool) -> Result<(), aya::maps::MapError> {
        use agent_common::pidset;
        let index = pidset::word(pid);
        if index >= pidset::WORDS {
            return Err(aya::maps::MapError::OutOfBounds {
                index,
                max_entries: pidset::WORDS,
            });
        }
        let old = match &self.words {
            Some(words) => words.get(&index).copied().unwrap_or(0),
            None => self.map.get(&index, 0)?,
        };
        let new = if present {
            old | pidset::bit(pid)
        } else {
            old & !pidset::bit(pid)
        };
        if new != old {
            self.map.set(index, new, 0)?;
        }
        if let Some(words) = &mut self.words {
            if new == 0 {
                words.remove(&index);
            } else {
                words.insert(index, new);
            }
        }
        Ok(())
    }
}
