//! What the agent's text log says about a process, with the log's own timestamps (RFC 3339,
//! UTC): when it was tracked, how it is followed, when it was dropped.

use std::collections::BTreeMap;

/// Seconds since the Unix epoch of a timestamp such as `2026-11-29T21:03:57.581448Z`.
pub fn parse_utc(ts: &str) -> Option<f64> {
    let ts = ts.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let s: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some((days * 86400 + h * 3600 + min * 60) as f64 + s)
}

/// Seconds since the Unix epoch, now.
pub fn now_utc() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// What the log says about one pid (first occurrence of each).
#[derive(Clone, Debug, Default)]
pub struct PidEvents {
    pub tracked: Option<f64>,
    pub libc_probes: Option<f64>,
    pub not_followed: Option<f64>,
    pub gone: Option<f64>,
    /// When its `write()` uprobe was first taken out (its connections send through
    /// `send`/`sendto`).
    pub write_probe_out: Option<f64>,
}

/// Per pid, and when the worker syscall tracepoints were attached (first time).
#[derive(Clone, Debug, Default)]
pub struct LogEvents {
    pub pids: BTreeMap<u32, PidEvents>,
    pub syscalls_attached: Option<f64>,
    /// When `sys_enter_write` was first detached (every worker followed through the
    /// tracepoints sends through sendto).
    pub syscall_write_out: Option<f64>,
}

fn pid_field(line: &str) -> Option<u32> {
    let rest = &line[line.find(" pid=")? + 5..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

pub fn parse(log: &str) -> LogEvents {
    let mut events = LogEvents::default();
    for line in log.lines() {
        let Some(ts) = line.split_whitespace().next().and_then(parse_utc) else {
            continue;
        };
        if line.contains("worker syscall probes attached") {
            events.syscalls_attached.get_or_insert(ts);
            continue;
        }
        if line.contains(" sys_enter_write detached:") {
            events.syscall_write_out.get_or_insert(ts);
            continue;
        }
        let kind = if line.contains(" tracking process pid=") {
            0
        } else if line.contains(" worker libc probes attached pid=") {
            1
        } else if line.contains("this worker is not followed")
            || line.contains("is no longer followed")
        {
            2
        } else if line.contains(" process gone;") {
            3
        } else if line.contains(" worker write() probe taken out:") {
            4
        } else {
            continue;
        };
        let Some(pid) = pid_field(line) else {
            continue;
        };
        let e = events.pids.entry(pid).or_default();
        let field = match kind {
            0 => &mut e.tracked,
            1 => &mut e.libc_probes,
            2 => &mut e.not_followed,
            3 => &mut e.gone,
            _ => &mut e.write_probe_out,
        };
        field.get_or_insert(ts);
    }
    events
}

/// The processes the agent's log says it tracks at its end: each pid whose last "tracking
/// process" line has no "process gone" line after it, with that line's fields after the pid
/// (group, executable, comm).
pub fn tracked_at_end(log: &str) -> BTreeMap<u32, String> {
    let mut tracked = BTreeMap::new();
    for line in log.lines() {
        let Some(pid) = pid_field(line) else {
            continue;
        };
        if line.contains(" tracking process pid=") {
            let fields = line[line.find(" pid=").unwrap_or(0)..]
                .split_whitespace()
                .filter(|f| ["group=", "exe=", "comm="].iter().any(|k| f.starts_with(k)))
                .collect::<Vec<_>>()
                .join(" ");
            tracked.insert(pid, fields);
        } else if line.contains(" process gone;") {
            tracked.remove(&pid);
        }
    }
    tracked
}

/// The agent's warnings that a rescan found its tracking out of step and mended it (a change
/// gone astray between discovery and the set-up, or kernel filter entries of processes it does
/// not track), each without its timestamp and level. None is expected: each one is a race the
/// agent's change handling does not close by itself.
pub fn tracking_mends(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("its change had gone astray") || l.contains("freed at the rescan"))
        .map(|l| l.split_once(": ").map_or(l, |(_, rest)| rest).to_string())
        .collect()
}

/// How the agent follows worker `pid`, from its log: "uprobes", "tracepoints", "not followed"
/// or "unknown".
pub fn followed_via(log: &str, pid: u32) -> &'static str {
    let events = parse(log);
    match events.pids.get(&pid) {
        Some(e) if e.libc_probes.is_some() => "uprobes",
        Some(e) if e.not_followed.is_some() => "not followed",
        Some(e) if e.tracked.is_some() && events.syscalls_attached.is_some() => "tracepoints",
        _ => "unknown",
    }
}

/// Seconds from worker `pid`'s probes being attached to its `write()` probe being taken out
/// (its own uprobe, or `sys_enter_write` when it is followed through the tracepoints), if
/// both are in the log.
pub fn write_probe_out_after(log: &str, pid: u32) -> Option<f64> {
    let events = parse(log);
    let e = events.pids.get(&pid)?;
    match e.libc_probes {
        Some(attached) => Some(e.write_probe_out? - attached),
        None => Some(events.syscall_write_out? - events.syscalls_attached?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_and_lines() {
        assert_eq!(parse_utc("1970-01-02T00:00:01.5Z"), Some(86401.5));
        assert_eq!(parse_utc("2000-03-01T00:00:00Z"), Some(951868800.0));
        let log = "2026-11-29T21:03:57.581448Z  INFO fanout::agent: tracking process pid=2326 group=\"b\"\n\
                   2026-11-29T21:03:57.678217Z  INFO fanout::ebpf::worker: worker syscall probes attached syscalls=12\n\
                   2026-11-29T21:03:58.710047Z  INFO fanout::agent: process gone; its series are dropped pid=2326 group=\"b\"\n";
        let e = parse(log);
        let p = &e.pids[&2326];
        assert!(p.tracked.is_some() && p.gone.is_some() && p.libc_probes.is_none());
        assert_eq!(followed_via(log, 2326), "tracepoints");
        let log = "2026-11-29T21:03:57.500000Z  INFO fanout::ebpf::worker: worker libc probes attached pid=7 libc=/usr/lib/libc.so.6 links=10 kind=\"uprobe-multi\"\n\
                   2026-11-29T21:03:58.750000Z  INFO fanout::ebpf::worker: worker write() probe taken out: its Redis connections send through send/sendto, write() carries only its logs and pipes pid=7\n";
        assert_eq!(followed_via(log, 7), "uprobes");
        let after = write_probe_out_after(log, 7).unwrap();
        assert!((after - 1.25).abs() < 1e-6, "{after}");
        assert_eq!(write_probe_out_after(log, 8), None);
        let log = "2026-11-29T21:03:57.000000Z  INFO fanout::agent: tracking process pid=9 group=\"b\"\n\
                   2026-11-29T21:03:57.100000Z  INFO fanout::ebpf::worker: worker syscall probes attached syscalls=12\n\
                   2026-11-29T21:03:59.100000Z  INFO fanout::ebpf::worker: sys_enter_write detached: every worker followed through the tracepoints uses the socket functions (sendto, recvfrom), so no process on the node pays it workers=1\n";
        let after = write_probe_out_after(log, 9).unwrap();
        assert!((after - 2.0).abs() < 1e-6, "{after}");
    }

    #[test]
    fn processes_tracked_at_the_end_are_those_not_gone_since() {
        let log = "2026-11-29T21:03:57.0Z  INFO fanout::agent: tracking process pid=10 group=\"redis\" exe=\"redis-server\" comm=redis-server threads=5 probes=\"sched\"\n\
                   2026-11-29T21:03:57.1Z  INFO fanout::agent: tracking process pid=11 group=\"w\" exe=\"python3\" comm=python3 threads=1 probes=\"sched\"\n\
                   2026-11-29T21:03:57.2Z  INFO fanout::agent: process gone; its series are dropped pid=11 group=\"w\"\n\
                   2026-11-29T21:03:57.3Z  INFO fanout::agent: process gone; its series are dropped pid=10 group=\"redis\"\n\
                   2026-11-29T21:03:57.4Z  INFO fanout::agent: tracking process pid=10 group=\"redis\" exe=\"redis-server\" comm=redis-server threads=4 probes=\"sched\"\n";
        let at_end = tracked_at_end(log);
        assert_eq!(at_end.len(), 1, "{at_end:?}");
        assert!(tracking_mends(log).is_empty());
        assert_eq!(
            at_end[&10],
            "group=\"redis\" exe=\"redis-server\" comm=redis-server"
        );
    }

    #[test]
    fn tracking_mends_are_the_rescans_warnings_of_them() {
        let log = "2026-11-29T21:03:57.0Z  WARN fanout::agent: process torn down at the rescan: its change had gone astray pid=12 group=\"w\"\n\
                   2026-11-29T21:03:57.1Z  INFO fanout::agent: process gone; its series are dropped pid=12 group=\"w\"\n\
                   2026-11-29T21:03:57.2Z  WARN fanout::agent: kernel filter entries of processes not tracked, freed at the rescan processes=0 threads=2 slots=1\n";
        assert_eq!(
            tracking_mends(log),
            [
                "process torn down at the rescan: its change had gone astray pid=12 group=\"w\"",
                "kernel filter entries of processes not tracked, freed at the rescan processes=0 threads=2 slots=1"
            ]
        );
    }
}
