//! OTLP exporter settings from the standard OpenTelemetry environment variables
//! (https://opentelemetry.io/docs/specs/otel/protocol/exporter/), overridden by flags and file.
//!
//! Push is enabled when an endpoint is configured anywhere, or when `OTEL_METRICS_EXPORTER`
//! says `otlp` (then the spec's default endpoint is used). `OTEL_SDK_DISABLED=true` and
//! `OTEL_METRICS_EXPORTER=none` turn it off.

use std::time::Duration;

/// How metrics are pushed: OTLP over gRPC, or protobuf over HTTP (the `--otlp-protocol` flag,
/// `otlp.protocol` in the config file, `OTEL_EXPORTER_OTLP_[METRICS_]PROTOCOL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
pub enum OtlpProtocol {
    #[value(name = "grpc")]
    #[serde(rename = "grpc")]
    Grpc,
    #[value(name = "http/protobuf")]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OtlpEnvError {
    #[error("{var}: unsupported OTLP protocol {value:?} (use grpc or http/protobuf)")]
    Protocol { var: &'static str, value: String },
    #[error("{var}: expected milliseconds as an integer from 1 to 1000000000000, got {value:?}")]
    Millis { var: &'static str, value: String },
    #[error("{var}: malformed header list {value:?} (expected key=value,key2=value2)")]
    Headers { var: &'static str, value: String },
    #[error("OTLP endpoint {0:?} must start with http:// or https:// (gRPC may also give host:port, secure unless OTEL_EXPORTER_OTLP_INSECURE=true)")]
    Endpoint(String),
    #[error("{var}: expected true or false, got {value:?}")]
    Bool { var: &'static str, value: String },
    #[error("{var}: unsupported compression {value:?} (use gzip or none)")]
    Compression { var: &'static str, value: String },
    #[error("OTLP client certificate and key must be given together (got only the {0})")]
    ClientIdentity(&'static str),
    #[error("OTEL_METRICS_EXPORTER={0:?} is not supported (use otlp or none; Prometheus is served by --prometheus-listen)")]
    Exporter(String),
}

/// TLS settings of the OTLP client (files as the OpenTelemetry variables name them; read and
/// checked when the exporter is built).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OtlpTls {
    /// PEM file of the CA(s) to trust instead of the system's roots.
    pub certificate: Option<std::path::PathBuf>,
    /// PEM files of the client's certificate (chain) and private key, for mTLS.
    pub client_certificate: Option<std::path::PathBuf>,
    pub client_key: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OtlpCompression {
    #[default]
    None,
    Gzip,
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
    /// Used when the endpoint is https://.
    pub tls: OtlpTls,
    pub compression: OtlpCompression,
}

impl OtlpConfig {
    pub fn is_tls(&self) -> bool {
        self.endpoint.starts_with("https://")
    }
}

/// Values from flags or the config file, which win over the environment.
#[derive(Debug, Default)]
pub struct OtlpOverrides {
    pub endpoint: Option<String>,
    pub protocol: Option<OtlpProtocol>,
    pub interval: Option<Duration>,
    pub timeout: Option<Duration>,
    pub headers: Vec<(String, String)>,
    pub certificate: Option<std::path::PathBuf>,
    pub client_certificate: Option<std::path::PathBuf>,
    pub client_key: Option<std::path::PathBuf>,
    pub insecure: Option<bool>,
    pub compression: Option<OtlpCompression>,
}

/// The signal-specific variable (`OTEL_EXPORTER_OTLP_METRICS_<name>`) if set, else the
/// generic one (`OTEL_EXPORTER_OTLP_<name>`), with which of them it was.
fn signal_or_generic(
    env: &dyn Fn(&str) -> Option<String>,
    specific: &'static str,
    generic: &'static str,
) -> Option<(&'static str, String)> {
    env(specific)
        .map(|v| (specific, v))
        .or_else(|| env(generic).map(|v| (generic, v)))
}

fn boolean(var: &'static str, value: &str) -> Result<bool, OtlpEnvError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" | "" => Ok(false),
        _ => Err(OtlpEnvError::Bool {
            var,
            value: value.to_string(),
        }),
    }
}

pub fn parse_compression(var: &'static str, value: &str) -> Result<OtlpCompression, OtlpEnvError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "gzip" => Ok(OtlpCompression::Gzip),
        "none" | "" => Ok(OtlpCompression::None),
        _ => Err(OtlpEnvError::Compression {
            var,
            value: value.to_string(),
        }),
    }
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
        let insecure = match overrides.insecure {
            Some(i) => i,
            None => match signal_or_generic(
                env,
                "OTEL_EXPORTER_OTLP_METRICS_INSECURE",
                "OTEL_EXPORTER_OTLP_INSECURE",
            ) {
                Some((var, value)) => boolean(var, &value)?,
                None => false,
            },
        };
        // The specification: for gRPC, an endpoint without a scheme is secure unless
        // INSECURE says otherwise; http:// and https:// say it themselves.
        let endpoint = if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
            endpoint
        } else if protocol == OtlpProtocol::Grpc
            && !endpoint.contains("://")
            && !endpoint.is_empty()
        {
            format!("{}://{endpoint}", if insecure { "http" } else { "https" })
        } else {
            return Err(OtlpEnvError::Endpoint(endpoint));
        };
        let path = |over: Option<std::path::PathBuf>, specific, generic| {
            over.or_else(|| {
                signal_or_generic(env, specific, generic)
                    .map(|(_, v)| v.trim().to_string())
                    .filter(|v| !v.is_empty())
                    .map(std::path::PathBuf::from)
            })
        };
        let tls = OtlpTls {
            certificate: path(
                overrides.certificate,
                "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE",
                "OTEL_EXPORTER_OTLP_CERTIFICATE",
            ),
            client_certificate: path(
                overrides.client_certificate,
                "OTEL_EXPORTER_OTLP_METRICS_CLIENT_CERTIFICATE",
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            ),
            client_key: path(
                overrides.client_key,
                "OTEL_EXPORTER_OTLP_METRICS_CLIENT_KEY",
                "OTEL_EXPORTER_OTLP_CLIENT_KEY",
            ),
        };
        match (&tls.client_certificate, &tls.client_key) {
            (Some(_), None) => return Err(OtlpEnvError::ClientIdentity("certificate")),
            (None, Some(_)) => return Err(OtlpEnvError::ClientIdentity("key")),
            _ => {}
        }
        let compression = match overrides.compression {
            Some(c) => c,
            None => match signal_or_generic(
                env,
                "OTEL_EXPORTER_OTLP_METRICS_COMPRESSION",
                "OTEL_EXPORTER_OTLP_COMPRESSION",
            ) {
                Some((var, value)) => parse_compression(var, &value)?,
                None => OtlpCompression::None,
            },
        };

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
            tls,
            compression,
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
        for (var, value) in [
            ("OTEL_EXPORTER_OTLP_INSECURE", "yes"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd"),
        ] {
            assert!(resolve(&[endpoint, (var, value)]).is_err(), "{var}={value}");
        }
        assert!(matches!(
            resolve(&[endpoint, ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/k.pem")]),
            Err(OtlpEnvError::ClientIdentity("key"))
        ));
    }

    #[test]
    fn tls_and_compression_settings_follow_the_specification() {
        // https:// and the files; the signal-specific variables win.
        let c = resolve(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4318"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/generic-ca.pem"),
            ("OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE", "/ca.pem"),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/client.pem"),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/client.key"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ])
        .unwrap()
        .unwrap();
        assert!(c.is_tls());
        assert_eq!(
            c.tls.certificate.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );
        assert_eq!(
            c.tls.client_certificate.as_deref(),
            Some(std::path::Path::new("/client.pem"))
        );
        assert_eq!(c.compression, OtlpCompression::Gzip);
        // gRPC without a scheme: secure unless INSECURE=true.
        let grpc = |insecure: Option<&str>| {
            let mut env = vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ];
            if let Some(v) = insecure {
                env.push(("OTEL_EXPORTER_OTLP_METRICS_INSECURE", v));
            }
            resolve(&env).unwrap().unwrap().endpoint
        };
        assert_eq!(grpc(None), "https://collector:4317");
        assert_eq!(grpc(Some("false")), "https://collector:4317");
        assert_eq!(grpc(Some("TRUE")), "http://collector:4317");
        // A scheme says it itself.
        let c = resolve(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ])
        .unwrap()
        .unwrap();
        assert!(!c.is_tls());
        assert_eq!(c.compression, OtlpCompression::None);
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
