//! One reading of the agent: its JSON snapshot (`/api/v1/snapshot`), fetched over HTTP/1.0
//! (TLS and a user where the endpoint asks for them) on loopback or the address given, and
//! kept as series by metric name.

use std::{collections::BTreeMap, time::Duration};

use crate::agent_http::Endpoint;

/// What a reading could not be.
#[derive(Debug, thiserror::Error)]
pub enum ReadingError {
    #[error(transparent)]
    Request(#[from] crate::agent_http::RequestError),
    #[error("the agent at {address} answered HTTP {status} for /api/v1/snapshot{hint}")]
    Http {
        address: String,
        status: u16,
        hint: String,
    },
    #[error("the agent at {address} sent a snapshot this fanout cannot read: {reason}")]
    Malformed { address: String, reason: String },
    #[error("the agent at {address} writes snapshot version {found}; this fanout reads version {expected}: use a fanout of the same release as the agent")]
    Version {
        address: String,
        found: u64,
        expected: u64,
    },
}

/// A histogram point: explicit bounds, per-bucket counts (one more than bounds).
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    pub bounds: Vec<f64>,
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Number(f64),
    Histogram(Histogram),
}

/// One series: its attributes (as strings) and value.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub attributes: BTreeMap<String, String>,
    pub value: Value,
}

impl Series {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
    pub fn number(&self) -> Option<f64> {
        match self.value {
            Value::Number(v) => Some(v),
            Value::Histogram(_) => None,
        }
    }
    pub fn histogram(&self) -> Option<&Histogram> {
        match &self.value {
            Value::Histogram(h) => Some(h),
            Value::Number(_) => None,
        }
    }
}

/// Everything one snapshot held.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reading {
    /// The agent's clock when it took the snapshot, in ms since the epoch.
    pub time_ms: u64,
    pub agent_version: String,
    pub metrics: BTreeMap<String, Vec<Series>>,
}

impl Reading {
    /// The series of `name` (empty when the agent does not export it: older agents, or
    /// nothing to report).
    pub fn series(&self, name: &str) -> &[Series] {
        self.metrics.get(name).map_or(&[], Vec::as_slice)
    }

    /// Parses the JSON snapshot (`metrics::json`).
    pub fn parse(text: &str, address: &str) -> Result<Self, ReadingError> {
        let malformed = |reason: String| ReadingError::Malformed {
            address: address.to_string(),
            reason,
        };
        let expected = crate::metrics::json::VERSION;
        let v = crate::agent_http::versioned_json(text, expected).map_err(|e| match e {
            crate::agent_http::VersionedJsonError::Malformed(reason) => malformed(reason),
            crate::agent_http::VersionedJsonError::Version(found) => ReadingError::Version {
                address: address.to_string(),
                found,
                expected,
            },
        })?;
        let mut reading = Reading {
            time_ms: v["time_unix_ms"].as_u64().unwrap_or(0),
            agent_version: v["agent_version"].as_str().unwrap_or("").to_string(),
            metrics: BTreeMap::new(),
        };
        for metric in v["metrics"].as_array().into_iter().flatten() {
            let Some(name) = metric["name"].as_str() else {
                continue;
            };
            let mut all = Vec::new();
            for point in metric["points"].as_array().into_iter().flatten() {
                let attributes = point["attributes"]
                    .as_object()
                    .map(|o| {
                        o.iter()
                            .map(|(k, v)| {
                                let s = v.as_str().map_or_else(|| v.to_string(), str::to_string);
                                (k.clone(), s)
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let value = if let Some(counts) = point["counts"].as_array() {
                    Value::Histogram(Histogram {
                        bounds: point["bounds"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|b| b.as_f64().unwrap_or(f64::INFINITY))
                            .collect(),
                        counts: counts.iter().map(|c| c.as_u64().unwrap_or(0)).collect(),
                        sum: point["sum"].as_f64().unwrap_or(0.0),
                        count: point["count"].as_u64().unwrap_or(0),
                    })
                } else {
                    Value::Number(point["value"].as_f64().unwrap_or(f64::NAN))
                };
                all.push(Series { attributes, value });
            }
            reading.metrics.insert(name.to_string(), all);
        }
        Ok(reading)
    }

    /// Fetches a reading from the agent at `endpoint`.
    pub fn fetch(endpoint: &Endpoint, timeout: Duration) -> Result<Self, ReadingError> {
        let (status, body) = crate::agent_http::get(endpoint, "/api/v1/snapshot", timeout)?;
        let address = endpoint.name();
        if status != 200 {
            let hint = match status {
                404 => " (an agent older than this fanout: it has no snapshot endpoint)".into(),
                401 => format!(" ({})", endpoint.unauthorized_reason()),
                _ => String::new(),
            };
            return Err(ReadingError::Http {
                address,
                status,
                hint,
            });
        }
        Self::parse(&body, &address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_is_read_back_and_other_versions_are_refused() {
        let text = r#"{"version":1,"agent_version":"0.1.0","time_unix_ms":42,"resource":{},
            "metrics":[{"name":"redis.clients.blocked","kind":"gauge","unit":"{client}",
              "points":[{"attributes":{"process.pid":7,"server.port":6379},"value":3.0}]},
              {"name":"redis.blocking.keys","kind":"histogram","unit":"{key}",
              "points":[{"attributes":{},"bounds":[1.0,2.0],"counts":[1,0,4],"sum":41.0,"count":5}]}]}"#;
        let r = Reading::parse(text, "a:1").unwrap();
        assert_eq!(r.time_ms, 42);
        let g = &r.series("redis.clients.blocked")[0];
        assert_eq!(g.attr("server.port"), Some("6379"));
        assert_eq!(g.number(), Some(3.0));
        let h = r.series("redis.blocking.keys")[0].histogram().unwrap();
        assert_eq!(h.counts, vec![1, 0, 4]);
        assert!(r.series("no.such.metric").is_empty());
        let err = Reading::parse(&text.replace("\"version\":1", "\"version\":2"), "a:1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("snapshot version 2"), "{err}");
        assert!(Reading::parse("not json", "a:1").is_err());
    }

    #[test]
    fn nothing_listening_is_a_no_agent_error_that_says_how_to_start_one() {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = free.local_addr().unwrap().to_string();
        drop(free);
        let err = Reading::fetch(&Endpoint::plain(&address), Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!("no Fanout agent answers at {address}")),
            "{err}"
        );
        assert!(err.contains("fanout run"), "{err}");
    }
}
