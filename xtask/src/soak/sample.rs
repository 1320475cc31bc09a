//! What the soak records every 10 s: the agent's resources from /proc, its eBPF maps'
//! occupancy, series and probes from its /metrics, and, system-wide, the eBPF programs and
//! links loaded and the probe events registered in tracefs (so that anything left behind
//! shows).

use std::{collections::BTreeMap, time::Duration};

use integration_tests::{http_get, prom::Scrape};

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Sample {
    /// Seconds since the soak started.
    pub t: f64,
    pub phase: String,
    pub agent_pid: u32,
    pub rss_kib: u64,
    pub fds: u64,
    pub threads: u64,
    /// The agent's threads by name (what a changed thread count is made of).
    pub thread_names: BTreeMap<String, u64>,
    /// Per eBPF hash map: entries and capacity.
    pub map_entries: BTreeMap<String, u64>,
    pub map_capacity: BTreeMap<String, u64>,
    /// Sample lines in one /metrics response.
    pub series: u64,
    /// Distinct (process, thread name) pairs the agent reports CPU for: the bound of the
    /// per-thread-group kernel state (SCHED_SLOTS).
    pub thread_groups: u64,
    /// `fanout_probes_attached` == 1.
    pub programs_attached: u64,
    /// Redis probe points by state (summed over processes).
    pub probe_points: BTreeMap<String, u64>,
    pub scrape_ms: f64,
    /// System-wide: eBPF programs and links loaded, and uprobe/kprobe events in tracefs.
    pub bpf_programs: u64,
    pub bpf_links: u64,
    pub tracefs_probe_events: u64,
}

/// `BPF_PROG_GET_NEXT_ID` / `BPF_LINK_GET_NEXT_ID`: how many ids the kernel has.
fn count_bpf_ids(cmd: u32) -> u64 {
    #[repr(C)]
    struct GetNextId {
        start_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut count = 0;
    let mut attr = GetNextId {
        start_id: 0,
        next_id: 0,
        open_flags: 0,
    };
    loop {
        // SAFETY: a valid bpf_attr prefix for the command, of the size passed.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd as libc::c_long,
                &mut attr as *mut GetNextId,
                std::mem::size_of::<GetNextId>() as libc::c_long,
            )
        };
        if ret != 0 {
            return count;
        }
        count += 1;
        attr.start_id = attr.next_id;
    }
}

pub fn bpf_programs() -> u64 {
    count_bpf_ids(11)
}

pub fn bpf_links() -> u64 {
    count_bpf_ids(31)
}

/// Lines in tracefs's `uprobe_events` and `kprobe_events` (probes registered by name).
pub fn tracefs_probe_events() -> u64 {
    ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .iter()
        .find(|root| std::path::Path::new(&format!("{root}/uprobe_events")).exists())
        .map(|root| {
            ["uprobe_events", "kprobe_events"]
                .iter()
                .filter_map(|f| std::fs::read_to_string(format!("{root}/{f}")).ok())
                .map(|text| text.lines().filter(|l| !l.trim().is_empty()).count() as u64)
                .sum()
        })
        .unwrap_or(0)
}

fn status_field(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(field)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

fn thread_names(pid: u32) -> BTreeMap<String, u64> {
    let mut names = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(comm) = std::fs::read_to_string(task.path().join("comm")) {
            *names.entry(comm.trim().to_string()).or_default() += 1;
        }
    }
    names
}

/// Reads everything about the agent `pid` serving /metrics on `port`.
pub fn take(t: Duration, phase: &str, pid: u32, port: u16) -> Sample {
    let mut sample = Sample {
        t: t.as_secs_f64(),
        phase: phase.to_string(),
        agent_pid: pid,
        rss_kib: status_field(pid, "VmRSS:"),
        threads: status_field(pid, "Threads:"),
        fds: std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count() as u64)
            .unwrap_or(0),
        thread_names: thread_names(pid),
        bpf_programs: bpf_programs(),
        bpf_links: bpf_links(),
        tracefs_probe_events: tracefs_probe_events(),
        ..Default::default()
    };
    let started = std::time::Instant::now();
    if let Ok((200, body)) = http_get(port, "/metrics") {
        sample.scrape_ms = started.elapsed().as_secs_f64() * 1000.0;
        sample.series = body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .count() as u64;
        let scrape = Scrape::parse(&body);
        for (name, into) in [
            ("fanout_ebpf_map_entries", &mut sample.map_entries),
            ("fanout_ebpf_map_capacity", &mut sample.map_capacity),
        ] {
            for s in scrape.find(name, &[]) {
                into.insert(s.labels["map"].clone(), s.value as u64);
            }
        }
        sample.programs_attached = scrape.sum("fanout_probes_attached", &[]) as u64;
        sample.thread_groups = scrape
            .find("process_thread_cpu_time_seconds_total", &[])
            .filter_map(|s| {
                Some((
                    s.labels.get("process_pid")?.clone(),
                    s.labels.get("thread_name")?.clone(),
                ))
            })
            .collect::<std::collections::BTreeSet<_>>()
            .len() as u64;
        for s in scrape.find("fanout_probe_points", &[]) {
            *sample
                .probe_points
                .entry(s.labels["state"].clone())
                .or_default() += s.value as u64;
        }
    }
    sample
}
