//! `fanout top --once`: the view as plain lines of `key=value` pairs, no escape codes, for
//! scripts, logs and `watch`.

use std::fmt::Write as _;

use super::{columns, model::View};

fn pairs<R>(out: &mut String, kind: &str, row: &R, columns: &[columns::Column<R>]) {
    out.push_str(kind);
    for c in columns {
        let value = (c.show)(row);
        let _ = write!(
            out,
            " {}={}",
            c.header.to_lowercase(),
            value.replace(' ', "_")
        );
    }
}

pub fn render(view: &View, address: &str) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "fanout top: agent {} at {address}",
        if view.agent_version.is_empty() {
            "?"
        } else {
            &view.agent_version
        }
    );
    match view.interval_s {
        Some(dt) => {
            let _ = writeln!(out, ", rates over {dt:.1} s");
        }
        None => {
            let _ = writeln!(out, ", one reading only: rates and percentiles need two");
        }
    }
    if !view.missing.is_empty() {
        let _ = writeln!(
            out,
            "note: the agent sent no {}; those columns stay empty (an agent of another release, or no eBPF)",
            view.missing.join(", ")
        );
    }
    let redis_columns = columns::redis();
    if view.redis.is_empty() {
        out.push_str("redis none tracked on this host\n");
    }
    for r in &view.redis {
        pairs(&mut out, "redis", r, &redis_columns);
        let points = if r.points_not_live.is_empty() {
            "live".to_string()
        } else {
            r.points_not_live.join(",")
        };
        let _ = writeln!(out, " probes={points}");
    }
    let worker_columns = columns::workers();
    if view.workers.is_empty() {
        out.push_str("worker none tracked on this host\n");
    }
    for w in &view.workers {
        pairs(&mut out, "worker", w, &worker_columns);
        out.push('\n');
    }
    let h = &view.health;
    let _ = writeln!(
        out,
        "health probe_points_not_live={} programs_not_attached={} events_lost={:.0}{} export_failures={:.0}",
        h.points_not_live,
        h.programs_not_attached,
        h.events_lost,
        h.events_lost_in_interval
            .map_or(String::new(), |d| format!(" events_lost_in_interval={d:.0}")),
        h.export_failures
    );
    out
}
