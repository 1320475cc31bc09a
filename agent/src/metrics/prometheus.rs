//! Prometheus text exposition of a [`Snapshot`], with the OpenTelemetry-to-Prometheus name
//! translation (https://opentelemetry.io/docs/specs/otel/compatibility/prometheus_and_openmetrics/):
//! dots become underscores, the unit becomes a suffix (`s` -> `_seconds`, `{...}` is dropped),
//! counters end in `_total`, and resource attributes are exposed as `target_info`.

use std::fmt::Write as _;

use super::{Attributes, Kind, PointValue, Snapshot};

fn sanitize(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    while out.contains("__") {
        out = out.replace("__", "_");
    }
    if out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

fn unit_word(unit: &str) -> Option<String> {
    // Annotations in braces carry no unit: `{key}`, `{process}`.
    if unit.is_empty() || (unit.starts_with('{') && unit.ends_with('}')) {
        return None;
    }
    let word = |u: &str| -> String {
        match u {
            "s" => "seconds".into(),
            "ms" => "milliseconds".into(),
            "us" => "microseconds".into(),
            "ns" => "nanoseconds".into(),
            "By" => "bytes".into(),
            "KiBy" => "kibibytes".into(),
            "MiBy" => "mebibytes".into(),
            "%" => "percent".into(),
            "Hz" => "hertz".into(),
            "m" => "minutes".into(),
            "h" => "hours".into(),
            "d" => "days".into(),
            other => sanitize(other),
        }
    };
    match unit.split_once('/') {
        Some((a, b)) => Some(format!(
            "{}_per_{}",
            word(a),
            match b {
                "s" => "second".into(),
                "m" => "minute".into(),
                "h" => "hour".into(),
                other => word(other),
            }
        )),
        None => Some(word(unit)),
    }
}

/// The Prometheus metric name for an OpenTelemetry metric.
pub fn prometheus_name(otel_name: &str, unit: &str, kind: Kind) -> String {
    let mut name = sanitize(otel_name);
    if unit == "1" && kind == Kind::Gauge {
        name.push_str("_ratio");
    } else if let Some(word) = unit_word(unit) {
        if !name.ends_with(&format!("_{word}")) {
            name.push('_');
            name.push_str(&word);
        }
    }
    if kind == Kind::Counter && !name.ends_with("_total") {
        name.push_str("_total");
    }
    name
}

/// The Prometheus label name for an attribute key.
pub fn label_name(key: &str) -> String {
    sanitize(key)
}

fn escape_label_value(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn labels(attributes: &Attributes, extra: Option<(&str, &str)>) -> String {
    if attributes.is_empty() && extra.is_none() {
        return String::new();
    }
    let mut out = String::from("{");
    let mut first = true;
    let pairs = attributes
        .iter()
        .map(|(k, v)| (label_name(k), v.to_string()));
    for (k, v) in pairs.chain(extra.map(|(k, v)| (k.to_string(), v.to_string()))) {
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str(&k);
        out.push_str("=\"");
        escape_label_value(&v, &mut out);
        out.push('"');
    }
    out.push('}');
    out
}

fn number(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else if v.is_nan() {
        "NaN".into()
    } else {
        format!("{v}")
    }
}

fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Renders the snapshot in the Prometheus text format 0.0.4.
pub fn render(snapshot: &Snapshot, resource: &Attributes) -> String {
    let mut out = String::new();
    if !resource.is_empty() {
        out.push_str("# HELP target_info Target metadata\n# TYPE target_info gauge\n");
        let _ = writeln!(out, "target_info{} 1", labels(resource, None));
    }
    for metric in &snapshot.metrics {
        let d = metric.descriptor;
        let name = prometheus_name(d.name, d.unit, d.kind);
        let kind = match d.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let _ = writeln!(out, "# HELP {name} {}", escape_help(d.description));
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for point in &metric.points {
            match &point.value {
                PointValue::Counter(v) | PointValue::Gauge(v) => {
                    let _ = writeln!(
                        out,
                        "{name}{} {}",
                        labels(&point.attributes, None),
                        number(*v)
                    );
                }
                PointValue::Histogram(h) => {
                    let mut cumulative = 0u64;
                    for (i, count) in h.counts.iter().enumerate() {
                        cumulative += count;
                        let le = h
                            .bounds
                            .get(i)
                            .map(|b| number(*b))
                            .unwrap_or_else(|| "+Inf".into());
                        let _ = writeln!(
                            out,
                            "{name}_bucket{} {cumulative}",
                            labels(&point.attributes, Some(("le", &le)))
                        );
                    }
                    let _ = writeln!(
                        out,
                        "{name}_sum{} {}",
                        labels(&point.attributes, None),
                        number(h.sum)
                    );
                    let _ = writeln!(
                        out,
                        "{name}_count{} {}",
                        labels(&point.attributes, None),
                        h.count
                    );
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{catalog, AttrValue, HistogramValue, Point};
    use std::time::SystemTime;

    #[test]
    fn names_follow_the_otel_translation() {
        assert_eq!(
            prometheus_name("process.thread.cpu.time", "s", Kind::Counter),
            "process_thread_cpu_time_seconds_total"
        );
        assert_eq!(
            prometheus_name("process.thread.runqueue.delay", "s", Kind::Histogram),
            "process_thread_runqueue_delay_seconds"
        );
        assert_eq!(
            prometheus_name("redis.blocking.keys", "{key}", Kind::Histogram),
            "redis_blocking_keys"
        );
        assert_eq!(
            prometheus_name("redis.blocking.cpu.time", "s", Kind::Counter),
            "redis_blocking_cpu_time_seconds_total"
        );
        assert_eq!(
            prometheus_name("worker.blocking_pop.duration", "s", Kind::Histogram),
            "worker_blocking_pop_duration_seconds"
        );
        assert_eq!(
            prometheus_name("redis.clients.blocked", "{client}", Kind::Gauge),
            "redis_clients_blocked"
        );
        assert_eq!(
            prometheus_name("system.memory.usage", "By", Kind::Gauge),
            "system_memory_usage_bytes"
        );
        assert_eq!(
            prometheus_name("cpu.utilization", "1", Kind::Gauge),
            "cpu_utilization_ratio"
        );
        assert_eq!(
            prometheus_name("net.io", "By/s", Kind::Gauge),
            "net_io_bytes_per_second"
        );
        assert_eq!(
            prometheus_name("requests.total", "{request}", Kind::Counter),
            "requests_total"
        );
        assert_eq!(
            prometheus_name("latency_seconds", "s", Kind::Gauge),
            "latency_seconds"
        );
        assert_eq!(prometheus_name("9lives", "", Kind::Gauge), "_9lives");
        assert_eq!(label_name("process.pid"), "process_pid");
        assert_eq!(label_name("k8s.pod.name"), "k8s_pod_name");
    }

    #[test]
    fn renders_counters_and_cumulative_histogram_buckets() {
        let mut snapshot = Snapshot::default();
        let attrs = vec![
            ("process.group", AttrValue::from("redis")),
            ("thread.name", AttrValue::from("a\"b")),
        ];
        snapshot.push(
            catalog::THREAD_CPU_TIME,
            Point {
                attributes: attrs.clone(),
                start_time: SystemTime::UNIX_EPOCH,
                value: PointValue::Counter(1.5),
            },
        );
        snapshot.push(
            catalog::THREAD_RUNQUEUE_DELAY,
            Point {
                attributes: attrs,
                start_time: SystemTime::UNIX_EPOCH,
                value: PointValue::Histogram(HistogramValue {
                    bounds: vec![0.001, 0.01],
                    counts: vec![2, 3, 1],
                    sum: 0.05,
                    count: 6,
                }),
            },
        );
        let text = render(
            &snapshot,
            &vec![("service.name", AttrValue::from("fanout"))],
        );
        let expected = "\
# HELP target_info Target metadata
# TYPE target_info gauge
target_info{service_name=\"fanout\"} 1
# HELP process_thread_cpu_time_seconds_total CPU time used by the threads of a process that share a thread name, by CPU mode (from /proc)
# TYPE process_thread_cpu_time_seconds_total counter
process_thread_cpu_time_seconds_total{process_group=\"redis\",thread_name=\"a\\\"b\"} 1.5
# HELP process_thread_runqueue_delay_seconds Time threads spent runnable but waiting for a CPU, per wait (eBPF sched_switch: the kernel's run-delay counter)
# TYPE process_thread_runqueue_delay_seconds histogram
process_thread_runqueue_delay_seconds_bucket{process_group=\"redis\",thread_name=\"a\\\"b\",le=\"0.001\"} 2
process_thread_runqueue_delay_seconds_bucket{process_group=\"redis\",thread_name=\"a\\\"b\",le=\"0.01\"} 5
process_thread_runqueue_delay_seconds_bucket{process_group=\"redis\",thread_name=\"a\\\"b\",le=\"+Inf\"} 6
process_thread_runqueue_delay_seconds_sum{process_group=\"redis\",thread_name=\"a\\\"b\"} 0.05
process_thread_runqueue_delay_seconds_count{process_group=\"redis\",thread_name=\"a\\\"b\"} 6
";
        assert_eq!(text, expected);
    }
}
