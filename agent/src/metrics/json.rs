//! The snapshot as JSON, served at `/api/v1/snapshot` for `fanout top` and scripts.
//!
//! Versioned: `"version": 1` is this layout; a reader refuses another major version rather
//! than misread it. Names are the OpenTelemetry ones (`process.thread.cpu.time`), attributes
//! a flat object, histograms with explicit `bounds` and per-bucket (not cumulative) `counts`,
//! one more count than bounds (the last is above the last bound). Counters and histograms are
//! cumulative since `start_time_unix_ms`.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::{AttrValue, Attributes, Kind, PointValue, Snapshot};

/// The layout version this agent writes.
pub const VERSION: u64 = 1;

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn attributes(attrs: &Attributes) -> Value {
    let mut map = Map::new();
    for (key, value) in attrs {
        let v = match value {
            AttrValue::Str(s) => Value::from(s.as_str()),
            AttrValue::Int(i) => Value::from(*i),
        };
        map.insert((*key).to_string(), v);
    }
    Value::Object(map)
}

/// JSON numbers cannot be NaN or infinite: those become null.
fn number(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

pub fn render(snapshot: &Snapshot, resource: &Attributes, now: SystemTime) -> String {
    let metrics: Vec<Value> = snapshot
        .metrics
        .iter()
        .map(|m| {
            let points: Vec<Value> = m
                .points
                .iter()
                .map(|p| {
                    let mut point = json!({
                        "attributes": attributes(&p.attributes),
                        "start_time_unix_ms": unix_ms(p.start_time),
                    });
                    match &p.value {
                        PointValue::Counter(v) | PointValue::Gauge(v) => {
                            point["value"] = number(*v);
                        }
                        PointValue::Histogram(h) => {
                            point["bounds"] = h.bounds.iter().copied().map(number).collect();
                            point["counts"] = h.counts.clone().into();
                            point["sum"] = number(h.sum);
                            point["count"] = h.count.into();
                        }
                    }
                    point
                })
                .collect();
            json!({
                "name": m.descriptor.name,
                "unit": m.descriptor.unit,
                "kind": match m.descriptor.kind {
                    Kind::Counter => "counter",
                    Kind::Gauge => "gauge",
                    Kind::Histogram => "histogram",
                },
                "points": points,
            })
        })
        .collect();
    json!({
        "version": VERSION,
        "agent_version": env!("CARGO_PKG_VERSION"),
        "time_unix_ms": unix_ms(now),
        "resource": attributes(resource),
        "metrics": metrics,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{catalog, HistogramValue, Point};

    #[test]
    fn counters_gauges_and_histograms_keep_their_values() {
        let mut s = Snapshot::default();
        s.push(
            catalog::REDIS_CLIENTS_BLOCKED,
            Point {
                attributes: vec![
                    ("process.pid", 7u32.into()),
                    ("server.port", AttrValue::Int(6379)),
                ],
                start_time: UNIX_EPOCH,
                value: PointValue::Gauge(3.0),
            },
        );
        s.push(
            catalog::REDIS_BLOCKING_KEYS,
            Point {
                attributes: vec![],
                start_time: UNIX_EPOCH + std::time::Duration::from_secs(5),
                value: PointValue::Histogram(HistogramValue {
                    bounds: vec![1.0, 2.0],
                    counts: vec![1, 0, 4],
                    sum: 41.0,
                    count: 5,
                }),
            },
        );
        let text = render(&s, &vec![("host.name", "n1".into())], UNIX_EPOCH);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["version"], 1);
        assert_eq!(v["resource"]["host.name"], "n1");
        let gauge = &v["metrics"][0];
        assert_eq!(gauge["name"], "redis.clients.blocked");
        assert_eq!(gauge["kind"], "gauge");
        assert_eq!(gauge["points"][0]["value"], 3.0);
        assert_eq!(gauge["points"][0]["attributes"]["server.port"], 6379);
        let h = &v["metrics"][1]["points"][0];
        assert_eq!(h["counts"], json!([1, 0, 4]));
        assert_eq!(h["bounds"], json!([1.0, 2.0]));
        assert_eq!(h["count"], 5);
        assert_eq!(h["start_time_unix_ms"], 5000);
    }
}
