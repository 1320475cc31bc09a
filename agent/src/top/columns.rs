//! The columns of `fanout top`'s two tables, shared by the terminal view and the text form:
//! header, width, how a value is shown, how rows sort, and which go first when the terminal
//! is narrow.

use super::model::{RedisRow, WorkerRow};

pub struct Column<R> {
    pub header: &'static str,
    pub width: u16,
    /// Lower shows first when the terminal is narrow; 0 is always shown.
    pub priority: u8,
    pub show: fn(&R) -> String,
    /// The sort key (missing values sort last).
    pub key: fn(&R) -> Option<f64>,
}

pub fn dash() -> String {
    "-".to_string()
}

pub fn cores(v: Option<f64>) -> String {
    v.map_or_else(dash, |v| format!("{v:.2}"))
}

pub fn percent(v: Option<f64>) -> String {
    v.map_or_else(dash, |v| format!("{:.0}%", v * 100.0))
}

pub fn per_second(v: Option<f64>) -> String {
    v.map_or_else(dash, |v| {
        if v >= 10_000.0 {
            format!("{:.0}k", v / 1000.0)
        } else if v >= 100.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.1}")
        }
    })
}

pub fn count(v: Option<f64>) -> String {
    v.map_or_else(dash, |v| format!("{v:.0}"))
}

pub fn mean(v: Option<f64>) -> String {
    v.map_or_else(dash, |v| {
        if v >= 100.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.1}")
        }
    })
}

pub fn seconds(v: Option<f64>) -> String {
    v.map_or_else(dash, |s| {
        if s >= 1.0 {
            format!("{s:.2}s")
        } else if s >= 1e-3 {
            format!("{:.1}ms", s * 1e3)
        } else {
            format!("{:.0}us", s * 1e6)
        }
    })
}

/// Redis columns. `MAIN` is drawn with a bar in the terminal view.
pub fn redis() -> Vec<Column<RedisRow>> {
    vec![
        Column {
            header: "PID",
            width: 7,
            priority: 0,
            show: |r| r.pid.to_string(),
            key: |r| Some(r.pid as f64),
        },
        Column {
            header: "PORT",
            width: 6,
            priority: 0,
            show: |r| r.port.map_or_else(dash, |p| p.to_string()),
            key: |r| r.port.map(f64::from),
        },
        Column {
            header: "MAIN",
            width: 5,
            priority: 0,
            show: |r| cores(r.main_cpu),
            key: |r| r.main_cpu,
        },
        Column {
            header: "USR",
            width: 5,
            priority: 4,
            show: |r| cores(r.main_user),
            key: |r| r.main_user,
        },
        Column {
            header: "SYS",
            width: 5,
            priority: 4,
            show: |r| cores(r.main_system),
            key: |r| r.main_system,
        },
        Column {
            header: "RQ99",
            width: 7,
            priority: 1,
            show: |r| seconds(r.runqueue_p99_s),
            key: |r| r.runqueue_p99_s,
        },
        Column {
            header: "IO",
            width: 5,
            priority: 5,
            show: |r| cores(r.io_threads_cpu),
            key: |r| r.io_threads_cpu,
        },
        Column {
            header: "BIO",
            width: 5,
            priority: 5,
            show: |r| cores(r.bio_threads_cpu),
            key: |r| r.bio_threads_cpu,
        },
        Column {
            header: "BLKD",
            width: 6,
            priority: 1,
            show: |r| count(r.clients_blocked),
            key: |r| r.clients_blocked,
        },
        Column {
            header: "REGS",
            width: 7,
            priority: 1,
            show: |r| count(r.registrations),
            key: |r| r.registrations,
        },
        Column {
            header: "POPS/s",
            width: 7,
            priority: 0,
            show: |r| per_second(r.pops_per_s),
            key: |r| r.pops_per_s,
        },
        Column {
            header: "KEYS",
            width: 6,
            priority: 0,
            show: |r| mean(r.keys_mean),
            key: |r| r.keys_mean,
        },
        Column {
            header: "KMAX",
            width: 6,
            priority: 3,
            show: |r| r.keys_max.map_or_else(dash, |m| format!("<={m:.0}")),
            key: |r| r.keys_max,
        },
        Column {
            header: "SRV",
            width: 5,
            priority: 2,
            show: |r| percent(r.served),
            key: |r| r.served,
        },
        Column {
            header: "TMO",
            width: 5,
            priority: 2,
            show: |r| percent(r.timeout),
            key: |r| r.timeout,
        },
        Column {
            header: "OTH",
            width: 5,
            priority: 3,
            show: |r| percent(r.other),
            key: |r| r.other,
        },
        Column {
            header: "BOOK",
            width: 5,
            priority: 0,
            show: |r| percent(r.bookkeeping),
            key: |r| r.bookkeeping,
        },
    ]
}

pub fn workers() -> Vec<Column<WorkerRow>> {
    vec![
        Column {
            header: "GROUP",
            width: 14,
            priority: 0,
            show: |w| w.group.clone(),
            key: |_| None,
        },
        Column {
            header: "PROCS",
            width: 6,
            priority: 0,
            show: |w| count(w.processes),
            key: |w| w.processes,
        },
        Column {
            header: "POPS/s",
            width: 7,
            priority: 0,
            show: |w| per_second(w.pops_per_s),
            key: |w| w.pops_per_s,
        },
        Column {
            header: "KEYS",
            width: 6,
            priority: 0,
            show: |w| mean(w.keys_mean),
            key: |w| w.keys_mean,
        },
        Column {
            header: "SRV50",
            width: 8,
            priority: 1,
            show: |w| seconds(w.served_p50_s),
            key: |w| w.served_p50_s,
        },
        Column {
            header: "SRV99",
            width: 8,
            priority: 0,
            show: |w| seconds(w.served_p99_s),
            key: |w| w.served_p99_s,
        },
        Column {
            header: "TMO99",
            width: 8,
            priority: 2,
            show: |w| seconds(w.timeout_p99_s),
            key: |w| w.timeout_p99_s,
        },
        Column {
            header: "ERR",
            width: 5,
            priority: 0,
            show: |w| count(w.errors),
            key: |w| w.errors,
        },
        Column {
            header: "QUEUES",
            width: 7,
            priority: 0,
            show: |w| count(w.queues),
            key: |w| w.queues,
        },
        Column {
            header: "SHARED",
            width: 7,
            priority: 1,
            show: |w| count(w.shared),
            key: |w| w.shared,
        },
    ]
}

/// The columns that fit in `width` (one space between columns), by priority, in their
/// original order.
pub fn fitting<R>(columns: Vec<Column<R>>, width: u16) -> Vec<Column<R>> {
    let mut priorities: Vec<u8> = columns.iter().map(|c| c.priority).collect();
    priorities.sort_unstable();
    priorities.dedup();
    let mut allowed = 0;
    for p in priorities {
        let used: u16 = columns
            .iter()
            .filter(|c| c.priority <= p)
            .map(|c| c.width + 1)
            .sum();
        if used <= width {
            allowed = p;
        } else {
            break;
        }
    }
    columns
        .into_iter()
        .filter(|c| c.priority <= allowed)
        .collect()
}

/// Sorts rows by `column`'s key, descending unless `ascending` (missing values last; ties
/// keep the order they came in).
pub fn sort<R>(rows: &mut [R], key: fn(&R) -> Option<f64>, ascending: bool) {
    rows.sort_by(|a, b| match (key(a), key(b)) {
        (Some(x), Some(y)) => {
            let o = x.partial_cmp(&y).unwrap_or(std::cmp::Ordering::Equal);
            if ascending {
                o
            } else {
                o.reverse()
            }
        }
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    });
}
