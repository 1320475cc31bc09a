//! The dashboard and the alert rules only query metrics the agent exports (or recording rules
//! the rules file defines), so a renamed metric cannot silently blank a panel or an alert.

use std::collections::BTreeSet;

use fanout::metrics::{catalog, prometheus::prometheus_name, Kind};

/// Prometheus names the agent exports, with the histogram series suffixes.
fn exported() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for d in catalog::ALL {
        let name = prometheus_name(d.name, d.unit, d.kind);
        if d.kind == Kind::Histogram {
            for suffix in ["_bucket", "_sum", "_count"] {
                names.insert(format!("{name}{suffix}"));
            }
        } else {
            names.insert(name);
        }
    }
    names.insert("target_info".into());
    names
}

/// Label names the agent's series carry (attribute keys translated), and Prometheus's own.
const LABELS: &[&str] = &[
    "process_group",
    "process_executable_name",
    "process_pid",
    "thread_name",
    "cpu_mode",
    "redis_block_type",
    "outcome",
    "server_port",
    "server_address",
    "redis_blocking_phase",
    "probe",
    "state",
    "reason",
    "kind",
    "listener",
    "redis_key",
    "redis_command",
    "peer_group",
    "instance",
    "job",
    "le",
];

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/../{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn recording_rules(rules: &str) -> BTreeSet<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- record: "))
        .map(|s| s.trim().to_string())
        .collect()
}

/// Identifiers in a PromQL expression that name metrics of this project (prefix `process_`,
/// `redis_`, `worker_`, `fanout_`, or a `fanout:` recording rule), excluding label names.
fn metric_references(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut in_string = false;
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c == '"' {
            in_string = !in_string;
            current.clear();
            continue;
        }
        if in_string {
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            current.push(c);
        } else {
            let word = std::mem::take(&mut current);
            let ours = ["process_", "redis_", "worker_", "fanout_", "fanout:"]
                .iter()
                .any(|p| word.starts_with(p));
            if ours && !LABELS.contains(&word.as_str()) {
                out.push(word);
            }
        }
    }
    out
}

fn check(source: &str, exprs: Vec<String>, known: &BTreeSet<String>) {
    assert!(!exprs.is_empty(), "{source}: no expressions found");
    for expr in exprs {
        let refs = metric_references(&expr);
        assert!(
            !refs.is_empty(),
            "{source}: `{expr}` queries none of the agent's metrics"
        );
        for r in refs {
            assert!(
                known.contains(&r),
                "{source}: `{r}` in `{expr}` is neither exported by the agent nor a recording rule"
            );
        }
    }
}

#[test]
fn the_reference_extractor_tells_metrics_from_labels() {
    let refs = metric_references(
        r#"sum by (process_pid) (rate(redis_blocking_keys_sum{process_group="redis_x"}[5m])) / fanout:a:b"#,
    );
    assert_eq!(
        refs,
        vec![
            "redis_blocking_keys_sum".to_string(),
            "fanout:a:b".to_string()
        ]
    );
}

#[test]
fn dashboard_queries_only_exported_metrics_and_recording_rules() {
    let mut known = exported();
    known.extend(recording_rules(&read("deploy/alerts/fanout.rules.yml")));
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/fanout.json")).unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["expr"].as_str().unwrap().to_string())
        })
        .collect();
    check("deploy/grafana/fanout.json", exprs, &known);
}

#[test]
fn alert_rules_query_only_exported_metrics_and_recording_rules() {
    let rules = read("deploy/alerts/fanout.rules.yml");
    let mut known = exported();
    known.extend(recording_rules(&rules));
    // Expressions are the `expr: >` blocks: the indented lines after each `expr:`.
    let mut exprs = Vec::new();
    let mut lines = rules.lines().peekable();
    while let Some(line) = lines.next() {
        if let Some(rest) = line.trim().strip_prefix("expr:") {
            let indent = line.len() - line.trim_start().len();
            let mut expr = rest.trim().trim_start_matches('>').to_string();
            while let Some(next) = lines.peek() {
                if next.trim().is_empty() || next.len() - next.trim_start().len() <= indent {
                    break;
                }
                expr.push(' ');
                expr.push_str(next.trim());
                lines.next();
            }
            exprs.push(expr);
        }
    }
    check("deploy/alerts/fanout.rules.yml", exprs, &known);
}
