//! The soak's checks and its report: RELIABILITY.md, reliability.json and reliability.png.

use std::{fmt::Write as _, path::Path};

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::{sample::Sample, Check, Outcome, Plan};

pub const MARKDOWN: &str = "RELIABILITY.md";
pub const JSON: &str = "reliability.json";
pub const PNG: &str = "reliability.png";

/// Resident memory may grow this much over the baseline (allocator pages kept for reuse).
const RSS_SLACK_PERCENT: f64 = 10.0;
/// File descriptors that come and go with the load itself (the scrape connections, the OTLP
/// client's connection pool).
const FD_SLACK: u64 = 4;
/// How soon a restarted Redis must have its probes, and a new worker be tracked.
const REDIS_PROBED_MS: f64 = 500.0;
const WORKER_TRACKED_MS: f64 = 2000.0;
/// The agent names its async runtime's threads so.
const RUNTIME_THREAD: &str = "fanout-rt";

fn check(what: impl Into<String>, passed: bool, figure: impl Into<String>) -> Check {
    Check {
        what: what.into(),
        passed,
        figure: figure.into(),
    }
}

pub fn checks(o: &Outcome, baseline: &Sample, last: &Sample) -> Vec<Check> {
    let mut out = Vec::new();
    let rss_limit = baseline.rss_kib as f64 * (1.0 + RSS_SLACK_PERCENT / 100.0);
    out.push(check(
        "RSS back within 10% of its baseline when the churn stops",
        baseline.rss_kib > 0 && (last.rss_kib as f64) <= rss_limit,
        format!(
            "baseline {} KiB, final {} KiB",
            baseline.rss_kib, last.rss_kib
        ),
    ));
    // A leak grows with time: the churn's last third may not hold more than its first.
    let churn: Vec<&Sample> = o.samples.iter().filter(|s| s.phase == "churn").collect();
    let third = churn.len() / 3;
    if third > 0 {
        let peak = |part: &[&Sample]| part.iter().map(|s| s.rss_kib).max().unwrap_or(0);
        let (early, late) = (peak(&churn[..third]), peak(&churn[churn.len() - third..]));
        out.push(check(
            "RSS does not grow during the churn (peak of its last third within 5% of its first)",
            late as f64 <= early as f64 * 1.05,
            format!("first third {early} KiB, last third {late} KiB"),
        ));
    }
    out.push(check(
        "open file descriptors back to their baseline",
        last.fds <= baseline.fds + FD_SLACK,
        format!(
            "baseline {}, final {} (slack {FD_SLACK})",
            baseline.fds, last.fds
        ),
    ));
    // The async runtime's threads ("fanout-rt": 2 workers and at most 4 blocking threads,
    // which tokio keeps 10 s after use) come and go with scrapes; every other thread is the
    // agent's own and must be back exactly.
    let own = |s: &Sample| -> u64 {
        s.thread_names
            .iter()
            .filter(|(name, _)| name.as_str() != RUNTIME_THREAD)
            .map(|(_, n)| n)
            .sum()
    };
    let runtime = last.thread_names.get(RUNTIME_THREAD).copied().unwrap_or(0);
    out.push(check(
        "threads back to their baseline (the runtime's within its bound of 6)",
        own(last) <= own(baseline) && runtime <= 6,
        format!(
            "baseline {} {:?}, final {} {:?}",
            baseline.threads, baseline.thread_names, last.threads, last.thread_names
        ),
    ));
    // Per-thread-group state follows the live processes' thread names: an idle thread that
    // first runs during the churn (a Redis bio thread) gets its slot then. Its bound is the
    // thread groups alive at the end; every other map must be back at its baseline.
    let bound = |name: &str| {
        let at_baseline = baseline.map_entries.get(name).copied().unwrap_or(0);
        if name == "SCHED_SLOTS" {
            at_baseline.max(last.thread_groups)
        } else {
            at_baseline
        }
    };
    let grown: Vec<String> = last
        .map_entries
        .iter()
        .filter(|(name, n)| **n > bound(name))
        .map(|(name, n)| {
            format!(
                "{name} {} -> {n} (bound {})",
                baseline.map_entries.get(name).copied().unwrap_or(0),
                bound(name)
            )
        })
        .collect();
    let maps = if grown.is_empty() {
        format!(
            "{} maps, none above its baseline; SCHED_SLOTS {} -> {} with {} live thread groups",
            last.map_entries.len(),
            baseline
                .map_entries
                .get("SCHED_SLOTS")
                .copied()
                .unwrap_or(0),
            last.map_entries.get("SCHED_SLOTS").copied().unwrap_or(0),
            last.thread_groups
        )
    } else {
        // What the agent tracks then, to tell a process that outlived the churn from an
        // entry left for one that is gone.
        format!(
            "{}; tracked at the end per the agent's log: {}",
            grown.join(", "),
            o.tracked_at_end.join(", ")
        )
    };
    let mends = if o.tracking_mends.is_empty() {
        "none".to_string()
    } else {
        o.tracking_mends.join("; ")
    };
    out.push(check(
        "every eBPF map's entries back to their baseline (SCHED_SLOTS: within the live thread groups)",
        grown.is_empty() && !last.map_entries.is_empty(),
        format!("{maps}; tracking mended at rescans (agent's log): {mends}"),
    ));
    // A full BLOCKED_CLIENTS loses nothing: further clients go to BLOCKED_SPILL, whose
    // bound is the one that counts.
    let full: Vec<String> = o
        .samples
        .iter()
        .flat_map(|s| {
            s.map_entries.iter().filter_map(|(name, n)| {
                if name == "BLOCKED_CLIENTS" {
                    return None;
                }
                let cap = s.map_capacity.get(name).copied().unwrap_or(u64::MAX);
                (*n >= cap).then(|| format!("{name} at {} s", s.t as u64))
            })
        })
        .collect();
    out.push(check(
        "no eBPF map ever full",
        full.is_empty(),
        if full.is_empty() {
            "none".to_string()
        } else {
            full.join(", ")
        },
    ));
    for (when, kernel) in [
        ("after SIGKILL", o.kernel_after_sigkill),
        ("after the agent exits", o.kernel_after_exit),
    ] {
        out.push(check(
            format!("nothing left in the kernel {when}"),
            kernel == o.kernel_before,
            format!(
                "programs {} -> {}, links {} -> {}, tracefs probe events {} -> {}",
                o.kernel_before.0,
                kernel.0,
                o.kernel_before.1,
                kernel.1,
                o.kernel_before.2,
                kernel.2
            ),
        ));
    }
    let slowest = o
        .restarts
        .iter()
        .map(|r| r.probed_after_ms.unwrap_or(f64::INFINITY))
        .fold(0.0, f64::max);
    out.push(check(
        format!("every restarted Redis probed within {REDIS_PROBED_MS} ms"),
        !o.restarts.is_empty() && slowest <= REDIS_PROBED_MS,
        format!("{} restarts, slowest {slowest:.0} ms", o.restarts.len()),
    ));
    let slowest_worker = o
        .fleets
        .iter()
        .map(|f| f.tracked_after_ms.unwrap_or(f64::INFINITY))
        .fold(0.0, f64::max);
    out.push(check(
        format!("every Sidekiq fleet tracked within {WORKER_TRACKED_MS} ms"),
        !o.fleets.is_empty() && slowest_worker <= WORKER_TRACKED_MS,
        format!(
            "{} fleet starts, slowest {slowest_worker:.0} ms",
            o.fleets.len()
        ),
    ));
    let (served, timeout, closed, errors) = o.tally;
    let (c_served, c_timeout, c_other, c_calls) = o.counted;
    out.push(check(
        "the long-lived Redis's blocking counts equal its clients' tally",
        errors == 0
            && served + timeout + closed > 0
            && (served, timeout, closed) == (c_served, c_timeout, c_other)
            && c_calls == served + timeout + closed,
        format!(
            "client: {served} served, {timeout} timed out, {closed} closed mid-pop ({errors} errors); agent: {c_served} served, {c_timeout} timeout, {c_other} other, {c_calls} blocking calls"
        ),
    ));
    match &o.burst {
        Some(b) => out.push(check(
            format!("a burst of {} Redis servers probed and released, scrapes answered throughout", b.servers),
            b.all_probed_after_ms.is_some() && b.all_released_after_ms.is_some() && b.failed_scrapes == 0,
            format!(
                "all probed after {}, all released after {}; {} scrapes, slowest {:.0} ms (client side: includes the CPU the starting servers take), {} failed",
                b.all_probed_after_ms.map_or("never".into(), |ms| format!("{ms:.0} ms")),
                b.all_released_after_ms.map_or("never".into(), |ms| format!("{ms:.0} ms")),
                b.scrapes,
                b.slowest_scrape_ms,
                b.failed_scrapes
            ),
        )),
        None => out.push(check("a burst of Redis servers", false, "the churn ended before the burst")),
    }
    out.push(check(
        "no wait for the agent's state lock above 200 ms",
        o.lock_waits_over_200ms_by_site.is_empty(),
        if o.lock_waits_over_200ms_by_site.is_empty() {
            "0 waits above 200 ms".to_string()
        } else {
            let sites: Vec<String> = o
                .lock_waits_over_200ms_by_site
                .iter()
                .map(|(site, over)| format!("{site}: {over}"))
                .collect();
            let total: u64 = o.lock_waits_over_200ms_by_site.iter().map(|(_, n)| n).sum();
            format!("{total} waits above 200 ms ({})", sites.join(", "))
        },
    ));
    out.push(check(
        "OTLP pushes reached the collector while it was up",
        o.otlp_accepted > 0,
        format!(
            "{} accepted, {} connections black-holed, {} failed pushes counted by the agent",
            o.otlp_accepted, o.otlp_swallowed, o.otlp_failures
        ),
    ));
    out
}

pub fn write(dir: &Path, plan: &Plan, o: &Outcome) -> Result<()> {
    std::fs::write(
        dir.join(JSON),
        serde_json::to_string_pretty(&serde_json::json!({ "plan": plan, "outcome": o }))?,
    )?;
    plot(&dir.join(PNG), &o.samples)?;
    std::fs::write(dir.join(MARKDOWN), markdown(plan, o))?;
    Ok(())
}

fn markdown(plan: &Plan, o: &Outcome) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# Reliability: what the agent survives, measured\n");
    let _ = writeln!(
        md,
        "Written by `cargo xtask soak{}` ({} minutes, {} mode) on this project's test machine \
         (2 vCPUs, Linux 6.18), with the agent's {} build. Every figure below comes from this \
         run; the data is in `{JSON}`, the chart in `{PNG}`.\n",
        if plan.quick { " --quick" } else { "" },
        plan.minutes,
        if plan.quick { "quick" } else { "full" },
        if plan.quick { "debug" } else { "release" }
    );
    let _ = writeln!(md, "## What was done to it\n");
    let _ = writeln!(
        md,
        "- Four Redis servers under plain load: one lived through the run with an exact blocking client (served, timed-out and closed-mid-pop calls, each certain to have blocked, tallied client-side); three were restarted in turn, each once every {:.0} s, under blocking and plain load: one in the foreground (Debian 7.0), one daemonized (7.4.1, LTO), one in its own mount and PID namespace (`unshare`, Debian 7.0). {} restarts.",
        plan.period_s,
        o.restarts.len()
    );
    let _ = writeln!(
        md,
        "- Worker churn: a Sidekiq fleet started and stopped {} times; a parent forking a child per job ({} jobs/s, each child one BRPOP then exit); a raw client that closed {} connections mid-pop.",
        o.fleets.len(),
        5,
        o.mid_pop_closes
    );
    let _ = writeln!(
        md,
        "- The OTLP collector (OTLP/HTTP every 2 s, 1 s timeout) cycled up, down and accepting-but-never-answering; Prometheus scraped the agent every second ({} scrapes, {} failed: the SIGKILL gap; slowest {:.0} ms).",
        o.prometheus_scrapes,
        o.prometheus_failed_scrapes,
        o.prometheus_slowest_scrape_s * 1000.0
    );
    let _ = writeln!(
        md,
        "- The agent was killed with SIGKILL once after the first warm-up and started again. Right after, 50 Redis servers were started at once, probed, and killed at once (the burst: the agent's peak), with /metrics scraped every 20 ms meanwhile. The baseline was taken after a second warm-up; the churn then ran for {:.0} s, followed by {:.0} s of quiet (load only).\n",
        plan.churn_s(),
        plan.quiet_s
    );
    let rss_at = |phase: &str| {
        o.samples
            .iter()
            .find(|s| s.phase == phase)
            .map_or(0, |s| s.rss_kib)
    };
    let _ = writeln!(
        md,
        "RSS just before the burst (5 s after the restart; start-up memory is returned at the first rescan, 10 s in): {} KiB; at the baseline, after the burst and a warm-up: {} KiB.\n",
        rss_at("pre-burst"),
        rss_at("baseline")
    );
    let _ = writeln!(md, "## Checks\n");
    let _ = writeln!(md, "| check | result | figure |\n|---|---|---|");
    for c in &o.checks {
        let _ = writeln!(
            md,
            "| {} | {} | {} |",
            c.what,
            if c.passed { "passed" } else { "**FAILED**" },
            c.figure
        );
    }
    let _ = writeln!(md, "\n## Restarts\n");
    let _ = writeln!(
        md,
        "| at (s) | server | new pid | probes in place after |\n|---|---|---|---|"
    );
    for r in &o.restarts {
        let _ = writeln!(
            md,
            "| {:.0} | {:?} | {} | {} |",
            r.at_s,
            r.style,
            r.pid,
            r.probed_after_ms
                .map_or("not within 5 s".to_string(), |ms| format!("{ms:.0} ms"))
        );
    }
    let _ = writeln!(md, "\n## Worker fleets\n");
    let _ = writeln!(
        md,
        "| at (s) | pid | tracked after | followed after |\n|---|---|---|---|"
    );
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |ms| format!("{ms:.0} ms"));
    for f in &o.fleets {
        let _ = writeln!(
            md,
            "| {:.0} | {} | {} | {} |",
            f.at_s,
            f.pid,
            ms(f.tracked_after_ms),
            ms(f.followed_after_ms)
        );
    }
    let _ = writeln!(md, "\n## Resources over time\n");
    let _ = writeln!(md, "![the agent's resources over time]({PNG})\n");
    let _ = writeln!(
        md,
        "| t (s) | phase | RSS (KiB) | fds | threads | series | map entries | programs attached | scrape (ms) |\n|---|---|---|---|---|---|---|---|---|"
    );
    for s in &o.samples {
        let _ = writeln!(
            md,
            "| {:.0} | {} | {} | {} | {} | {} | {} | {} | {:.0} |",
            s.t,
            s.phase,
            s.rss_kib,
            s.fds,
            s.threads,
            s.series,
            s.map_entries.values().sum::<u64>(),
            s.programs_attached,
            s.scrape_ms
        );
    }
    md
}

fn plot(path: &Path, samples: &[Sample]) -> Result<()> {
    crate::bench::plot::register_font()?;
    let root = BitMapBackend::new(path, (900, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let panels = root.split_evenly((3, 1));
    type Panel = (&'static str, fn(&Sample) -> f64);
    let series: [Panel; 3] = [
        ("agent RSS (MiB)", |s| s.rss_kib as f64 / 1024.0),
        ("agent open fds", |s| s.fds as f64),
        ("entries in the agent's eBPF hash maps", |s| {
            s.map_entries.values().sum::<u64>() as f64
        }),
    ];
    let t_max = samples.iter().map(|s| s.t).fold(1.0, f64::max);
    for (panel, (label, value)) in panels.iter().zip(series.iter()) {
        let points: Vec<(f64, f64)> = samples.iter().map(|s| (s.t, value(s))).collect();
        let y_max = points.iter().map(|p| p.1).fold(1.0, f64::max) * 1.2;
        let mut chart = ChartBuilder::on(panel)
            .caption(*label, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..t_max, 0f64..y_max)
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("seconds")
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                BLUE.stroke_width(2),
            ))
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .draw_series(points.iter().map(|p| Circle::new(*p, 3, BLUE.filled())))
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
