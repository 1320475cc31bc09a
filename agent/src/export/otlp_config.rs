//! OTLP exporter settings from the standard OpenTelemetry environment variables
//! (https://opentelemetry.io/docs/specs/otel/protocol/exporter/), overridden by flags and file.
//!
//! Push is enabled when an endpoint is configured anywhere, or when `OTEL_METRICS_EXPORTER`
//! says `otlp` (then the spec's default endpoint is used). `OTEL_SDK_DISABLED=true` and
//! `OTEL_METRICS_EXPORTER=none` turn it off.

use std::time::Duration;

use crate::cli::OtlpProtocol;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OtlpEnvError {
    #[error("{var}: unsupported OTLP protocol {value:?} (use grpc or http/protobuf)")]
    Protocol { var: &'static str, value: String },
    #[error("{var}: expected milliseconds as an integer from 1 to 1000000000000, got {value:?}")]
    Millis { var: &'static str, value: String },
    #[error("{var}: malformed header list {value:?} (expected key=value,key2=value2)")]
    Headers { var: &'static str, value: String },
    #[error("OTLP endpoint {0:?} must start with http://")]
    Endpoint(String),
    #[error("OTLP endpoint {0:?}: TLS (https://) is not built into this agent; send to a local or sidecar collector over http://")]
    Tls(String),
    #[error("OTEL_METRICS_EXPORTER={0:?} is not supported (use otlp or none; Prometheus is served by --prometheus-listen)")]
    Exporter(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct OtlpConfig {
    /// Full URL: for HTTP it includes `/v1/metrics`; for gRPC it is the server's base URL.
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    pub headers: Vec<(String, String)>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Time between pushes.
    pub interval: Duration,
}

/// Values from flags or the config file, which win over the environment.
#[derive(Debug, Default)]
pub struct OtlpOverrides {
    pub endpoint: Option<String>,
    pub protocol: Option<OtlpProtocol>,
    pub interval: Option<Duration>,
    pub timeout: Option<Duration>,
    pub headers: Vec<(String, String)>,
}

fn millis(
    env: &dyn Fn(&str) -> Option<String>,
    var: &'static str,
) -> Result<Option<Duration>, OtlpEnvError> {
    match env(var) {
        None => Ok(None),
        Some(value) => match value.trim().parse::<u64>() {
            // Up to about 31 years: a longer timer overflows.
            Ok(ms) if ms > 0 && ms <= 1_000_000_000_000 => Ok(Some(Duration::from_millis(ms))),
            _ => Err(OtlpEnvError::Millis { var, value }),
        },
    }
}

fn protocol(
    env: &dyn Fn(&str) -> Option<String>,
    var: &'static str,
) -> Result<Option<OtlpProtocol>, OtlpEnvError> {
    match env(var).as_deref().map(str::trim) {
        None => Ok(None),
        Some("grpc") => Ok(Some(OtlpProtocol::Grpc)),
        Some("http/protobuf") => Ok(Some(OtlpProtocol::HttpProtobuf)),
        Some(other) => Err(OtlpEnvError::Protocol {
            var,
            value: other.to_string(),
        }),
    }
}

/// Parses `key1=value1,key2=value2` with percent-encoded values (W3C baggage style).
fn headers(
    env: &dyn Fn(&str) -> Option<String>,
    var: &'static str,
) -> Result<Vec<(String, String)>, OtlpEnvError> {
    let Some(value) = env(var) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for pair in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or_else(|| OtlpEnvError::Headers {
            var,
            value: value.clone(),
        })?;
        let k = k.trim();
        if k.is_empty() {
            return Err(OtlpEnvError::Headers {
                var,
                value: value.clone(),
            });
        }
        out.push((
            k.to_ascii_lowercase(),
            percent_decode(v.trim()).ok_or_else(|| OtlpEnvError::Headers {
                var,
                value: value.clone(),
            })?,
        ));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl OtlpConfig {
    pub fn resolve(
        overrides: OtlpOverrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, OtlpEnvError> {
        if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let exporter = env("OTEL_METRICS_EXPORTER").map(|v| v.trim().to_ascii_lowercase());
        match exporter.as_deref() {
            Some("none") => return Ok(None),
            None | Some("otlp") | Some("") => {}
            Some(other) => return Err(OtlpEnvError::Exporter(other.to_string())),
        }

        let protocol = match overrides.protocol {
            Some(p) => p,
            None => protocol(env, "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")?
                .or(protocol(env, "OTEL_EXPORTER_OTLP_PROTOCOL")?)
                .unwrap_or(OtlpProtocol::HttpProtobuf),
        };
        let signal_path = |base: &str| match protocol {
            OtlpProtocol::HttpProtobuf if !base.trim_end_matches('/').ends_with("/v1/metrics") => {
                format!("{}/v1/metrics", base.trim_end_matches('/'))
            }
            _ => base.to_string(),
        };
        // The signal-specific variable is used as-is; the generic one gets the signal path.
        let endpoint = if let Some(e) = overrides.endpoint {
            Some(signal_path(&e))
        } else if let Some(e) = env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") {
            Some(e.trim().to_string())
        } else {
            env("OTEL_EXPORTER_OTLP_ENDPOINT").map(|e| signal_path(e.trim()))
        };
        let endpoint = match (endpoint, exporter.as_deref()) {
            (Some(e), _) => e,
            (None, Some("otlp")) => signal_path(match protocol {
                OtlpProtocol::Grpc => "http://localhost:4317",
                OtlpProtocol::HttpProtobuf => "http://localhost:4318",
            }),
            (None, _) => return Ok(None),
        };
        if endpoint.starts_with("https://") {
            return Err(OtlpEnvError::Tls(endpoint));
        }
        if !endpoint.starts_with("http://") {
            return Err(OtlpEnvError::Endpoint(endpoint));
        }

        let mut all_headers = headers(env, "OTEL_EXPORTER_OTLP_HEADERS")?;
        for (k, v) in headers(env, "OTEL_EXPORTER_OTLP_METRICS_HEADERS")?
            .into_iter()
            .chain(overrides.headers)
        {
            all_headers.retain(|(existing, _)| existing != &k);
            all_headers.push((k, v));
        }

        let timeout = match overrides.timeout {
            Some(t) => t,
            None => millis(env, "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT")?
                .or(millis(env, "OTEL_EXPORTER_OTLP_TIMEOUT")?)
                .or(millis(env, "OTEL_METRIC_EXPORT_TIMEOUT")?)
                .unwrap_or(Duration::from_secs(10)),
        };
        let interval = match overrides.interval {
            Some(i) => i,
            None => millis(env, "OTEL_METRIC_EXPORT_INTERVAL")?.unwrap_or(Duration::from_secs(60)),
        };
        Ok(Some(Self {
            endpoint,
            protocol,
            headers: all_headers,
            timeout,
            interval,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn resolve(pairs: &[(&str, &str)]) -> Result<Option<OtlpConfig>, OtlpEnvError> {
        OtlpConfig::resolve(OtlpOverrides::default(), &env_of(pairs))
    }

    #[test]
    fn off_without_an_endpoint() {
        assert_eq!(resolve(&[]).unwrap(), None);
    }

    #[test]
    fn generic_endpoint_gets_the_signal_path_for_http_only() {
        let c = resolve(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4318/")])
            .unwrap()
            .unwrap();
        assert_eq!(c.endpoint, "http://otel:4318/v1/metrics");
        assert_eq!(c.protocol, OtlpProtocol::HttpProtobuf);
        let c = resolve(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "http://otel:4317");
        assert_eq!(c.protocol, OtlpProtocol::Grpc);
    }

    #[test]
    fn signal_specific_variables_win_and_are_used_as_is() {
        let c = resolve(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4318"),
            (
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                "http://metrics:9999/custom",
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2000"),
            ("OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", "500"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "5000"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "http://metrics:9999/custom");
        assert_eq!(c.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(c.timeout, Duration::from_millis(500));
        assert_eq!(c.interval, Duration::from_secs(5));
    }

    #[test]
    fn headers_are_decoded_and_signal_headers_override() {
        let c = resolve(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "Authorization=Basic%20abc, x-tenant=a",
            ),
            ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "x-tenant=b"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            c.headers,
            vec![
                ("authorization".to_string(), "Basic abc".to_string()),
                ("x-tenant".to_string(), "b".to_string())
            ]
        );
    }

    #[test]
    fn exporter_selection_and_disabling() {
        let c = resolve(&[("OTEL_METRICS_EXPORTER", "otlp")])
            .unwrap()
            .unwrap();
        assert_eq!(c.endpoint, "http://localhost:4318/v1/metrics");
        assert_eq!(
            resolve(&[
                ("OTEL_METRICS_EXPORTER", "none"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x")
            ])
            .unwrap(),
            None
        );
        assert_eq!(
            resolve(&[
                ("OTEL_SDK_DISABLED", "true"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x")
            ])
            .unwrap(),
            None
        );
        assert!(matches!(
            resolve(&[("OTEL_METRICS_EXPORTER", "zipkin")]),
            Err(OtlpEnvError::Exporter(_))
        ));
    }

    #[test]
    fn malformed_values_are_errors() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x");
        assert!(matches!(
            resolve(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]),
            Err(OtlpEnvError::Protocol { .. })
        ));
        for bad in ["soon", "0", "-5", "18446744073709551615"] {
            assert!(
                matches!(
                    resolve(&[endpoint, ("OTEL_METRIC_EXPORT_INTERVAL", bad)]),
                    Err(OtlpEnvError::Millis { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            resolve(&[endpoint, ("OTEL_EXPORTER_OTLP_HEADERS", "novalue")]),
            Err(OtlpEnvError::Headers { .. })
        ));
        assert!(matches!(
            resolve(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317")]),
            Err(OtlpEnvError::Endpoint(_))
        ));
        // Said plainly at start rather than failing at every push.
        assert!(matches!(
            resolve(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4318")]),
            Err(OtlpEnvError::Tls(_))
        ));
    }

    #[test]
    fn overrides_beat_the_environment() {
        let overrides = OtlpOverrides {
            endpoint: Some("http://flag:4317".into()),
            protocol: Some(OtlpProtocol::Grpc),
            ..Default::default()
        };
        let c = OtlpConfig::resolve(
            overrides,
            &env_of(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.endpoint, "http://flag:4317");
        assert_eq!(c.protocol, OtlpProtocol::Grpc);
    }
}
