//! OTLP metrics push. A snapshot is turned into an `ExportMetricsServiceRequest` and sent over
//! gRPC (tonic) or HTTP/protobuf. One request is in flight at a time and none is queued: with
//! cumulative temporality a failed push loses nothing that the next one does not carry, so a
//! collector that is down or slow costs neither collection time nor memory. Failures are
//! counted, logged once per outage, and retried at the next interval.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use opentelemetry_proto::tonic::{
    collector::metrics::v1::{
        metrics_service_client::MetricsServiceClient, ExportMetricsServiceRequest,
    },
    common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue},
    metrics::v1::{
        metric, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint,
        Metric as ProtoMetric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    },
    resource::v1::Resource,
};
use prost::Message as _;

use crate::{
    export::{
        otlp_config::{OtlpCompression, OtlpConfig, OtlpProtocol},
        otlp_tls::TlsFiles,
    },
    metrics::{AttrValue, Attributes, PointValue, Snapshot},
};

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn key_values(attributes: &Attributes) -> Vec<KeyValue> {
    attributes
        .iter()
        .map(|(k, v)| KeyValue {
            key: (*k).to_string(),
            value: Some(AnyValue {
                value: Some(match v {
                    AttrValue::Str(s) => any_value::Value::StringValue(s.clone()),
                    AttrValue::Int(i) => any_value::Value::IntValue(*i),
                }),
            }),
            ..Default::default()
        })
        .collect()
}

/// Builds the OTLP request for one snapshot taken at `now`.
pub fn build_request(
    snapshot: &Snapshot,
    resource: &Attributes,
    now: SystemTime,
) -> ExportMetricsServiceRequest {
    let time_unix_nano = nanos(now);
    let metrics = snapshot
        .metrics
        .iter()
        .map(|m| {
            let number_point = |p: &crate::metrics::Point, v: f64| NumberDataPoint {
                attributes: key_values(&p.attributes),
                start_time_unix_nano: nanos(p.start_time),
                time_unix_nano,
                value: Some(number_data_point::Value::AsDouble(v)),
                ..Default::default()
            };
            let data = match m.descriptor.kind {
                crate::metrics::Kind::Counter => metric::Data::Sum(Sum {
                    data_points: m
                        .points
                        .iter()
                        .filter_map(|p| match p.value {
                            PointValue::Counter(v) => Some(number_point(p, v)),
                            _ => None,
                        })
                        .collect(),
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    is_monotonic: true,
                }),
                crate::metrics::Kind::Gauge => metric::Data::Gauge(Gauge {
                    data_points: m
                        .points
                        .iter()
                        .filter_map(|p| match p.value {
                            PointValue::Gauge(v) => Some(NumberDataPoint {
                                start_time_unix_nano: 0,
                                ..number_point(p, v)
                            }),
                            _ => None,
                        })
                        .collect(),
                }),
                crate::metrics::Kind::Histogram => metric::Data::Histogram(Histogram {
                    data_points: m
                        .points
                        .iter()
                        .filter_map(|p| match &p.value {
                            PointValue::Histogram(h) => Some(HistogramDataPoint {
                                attributes: key_values(&p.attributes),
                                start_time_unix_nano: nanos(p.start_time),
                                time_unix_nano,
                                count: h.count,
                                sum: Some(h.sum),
                                bucket_counts: h.counts.clone(),
                                explicit_bounds: h.bounds.clone(),
                                ..Default::default()
                            }),
                            _ => None,
                        })
                        .collect(),
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                }),
            };
            ProtoMetric {
                name: m.descriptor.name.to_string(),
                description: m.descriptor.description.to_string(),
                unit: m.descriptor.unit.to_string(),
                data: Some(data),
                ..Default::default()
            }
        })
        .collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: key_values(resource),
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "fanout".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                metrics,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("invalid OTLP endpoint {endpoint}: {message}")]
    Endpoint { endpoint: String, message: String },
    #[error("OTLP TLS: {0}")]
    Tls(#[from] super::otlp_tls::TlsError),
    #[error("OTLP push timed out after {0:?}")]
    Timeout(Duration),
    #[error("OTLP gRPC push failed: {0}")]
    Grpc(String),
    #[error("OTLP HTTP push failed: {0}")]
    Http(String),
}

/// The causes under an error (`: cause: its cause`), which say what went wrong under a
/// transport error ("invalid peer certificate: UnknownIssuer").
fn causes(e: &dyn std::error::Error) -> String {
    let mut out = String::new();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

fn gzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::Write as _;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes)?;
    encoder.finish()
}

/// Sends requests to one collector.
pub struct OtlpSender {
    config: OtlpConfig,
    transport: Transport,
}

enum Transport {
    Grpc(MetricsServiceClient<tonic::transport::Channel>),
    Http(reqwest::Client),
}

impl OtlpSender {
    /// Creates the client; nothing connects until the first push, so a collector that is down
    /// at start does not delay the agent.
    pub fn new(config: OtlpConfig) -> Result<Self, ExportError> {
        let bad = |message: String| ExportError::Endpoint {
            endpoint: config.endpoint.clone(),
            message,
        };
        // reqwest's client wants a process-wide rustls provider even for plain http:// (it
        // is built without one of its own): ring, the one every TLS path here uses. Installing
        // twice is harmless (the first stays).
        let _ = rustls::crypto::ring::default_provider().install_default();
        // Read and checked now: a bad file is an error at start.
        let tls = config
            .is_tls()
            .then(|| TlsFiles::read(&config.tls))
            .transpose()?;
        let transport = match config.protocol {
            OtlpProtocol::Grpc => {
                let mut endpoint = tonic::transport::Endpoint::from_shared(config.endpoint.clone())
                    .map_err(|e| bad(e.to_string()))?
                    .connect_timeout(config.timeout)
                    .timeout(config.timeout);
                if let Some(tls) = &tls {
                    endpoint = endpoint
                        .tls_config(tls.tonic_config())
                        .map_err(|e| bad(e.to_string()))?;
                }
                let mut client = MetricsServiceClient::new(endpoint.connect_lazy());
                if config.compression == OtlpCompression::Gzip {
                    client = client.send_compressed(tonic::codec::CompressionEncoding::Gzip);
                }
                Transport::Grpc(client)
            }
            OtlpProtocol::HttpProtobuf => {
                let mut builder = reqwest::Client::builder()
                    .timeout(config.timeout)
                    .connect_timeout(config.timeout);
                if let Some(tls) = &tls {
                    builder = builder.tls_backend_preconfigured(tls.client_config(&config.tls)?);
                }
                Transport::Http(builder.build().map_err(|e| bad(e.to_string()))?)
            }
        };
        Ok(Self { config, transport })
    }

    pub async fn send(&mut self, request: ExportMetricsServiceRequest) -> Result<(), ExportError> {
        let timeout = self.config.timeout;
        let fut = async {
            match &mut self.transport {
                Transport::Grpc(client) => {
                    let mut req = tonic::Request::new(request);
                    for (k, v) in &self.config.headers {
                        if let (Ok(key), Ok(value)) = (
                            k.parse::<tonic::metadata::MetadataKey<tonic::metadata::Ascii>>(),
                            v.parse(),
                        ) {
                            req.metadata_mut().insert(key, value);
                        }
                    }
                    client.export(req).await.map(|_| ()).map_err(|s| {
                        ExportError::Grpc(format!("{}: {}{}", s.code(), s.message(), causes(&s)))
                    })
                }
                Transport::Http(client) => {
                    let body = request.encode_to_vec();
                    let mut builder = client
                        .post(&self.config.endpoint)
                        .header("content-type", "application/x-protobuf");
                    builder = match self.config.compression {
                        OtlpCompression::Gzip => builder
                            .header("content-encoding", "gzip")
                            .body(gzip(&body).map_err(|e| ExportError::Http(e.to_string()))?),
                        OtlpCompression::None => builder.body(body),
                    };
                    for (k, v) in &self.config.headers {
                        builder = builder.header(k.as_str(), v.as_str());
                    }
                    let response = builder
                        .send()
                        .await
                        .map_err(|e| ExportError::Http(format!("{e}{}", causes(&e))))?;
                    if response.status().is_success() {
                        Ok(())
                    } else {
                        Err(ExportError::Http(format!("status {}", response.status())))
                    }
                }
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| ExportError::Timeout(timeout))?
    }
}

/// Pushes a fresh snapshot every interval until the process ends.
pub async fn run_exporter<F>(
    mut sender: OtlpSender,
    interval: Duration,
    failures: Arc<AtomicU64>,
    mut snapshot: F,
) where
    F: FnMut() -> (Arc<Snapshot>, Attributes) + Send,
{
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        ticker.tick().await;
        let (snap, resource) = snapshot();
        let request = build_request(&snap, &resource, SystemTime::now());
        match sender.send(request).await {
            Ok(()) => {
                if failing {
                    tracing::info!(endpoint = %sender.config.endpoint, "OTLP push recovered");
                }
                failing = false;
            }
            Err(e) => {
                failures.fetch_add(1, Ordering::Relaxed);
                if !failing {
                    tracing::warn!(endpoint = %sender.config.endpoint, error = %e, "OTLP push failed; retrying every {:?} (further failures are counted in fanout.export.failures)", interval);
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{catalog, HistogramValue, Point};

    #[test]
    fn request_carries_resource_temporality_and_buckets() {
        let mut snapshot = Snapshot::default();
        let start = UNIX_EPOCH + Duration::from_secs(100);
        snapshot.push(
            catalog::THREAD_CPU_TIME,
            Point {
                attributes: vec![("process.pid", AttrValue::Int(42))],
                start_time: start,
                value: PointValue::Counter(2.5),
            },
        );
        snapshot.push(
            catalog::THREAD_RUNQUEUE_DELAY,
            Point {
                attributes: vec![],
                start_time: start,
                value: PointValue::Histogram(HistogramValue {
                    bounds: vec![1.0],
                    counts: vec![3, 4],
                    sum: 9.0,
                    count: 7,
                }),
            },
        );
        snapshot.push(
            catalog::PROCESSES_TRACKED,
            Point {
                attributes: vec![],
                start_time: start,
                value: PointValue::Gauge(3.0),
            },
        );
        let now = UNIX_EPOCH + Duration::from_secs(200);
        let req = build_request(
            &snapshot,
            &vec![("service.name", AttrValue::from("fanout"))],
            now,
        );
        let rm = &req.resource_metrics[0];
        assert_eq!(
            rm.resource.as_ref().unwrap().attributes[0].key,
            "service.name"
        );
        let metrics = &rm.scope_metrics[0].metrics;
        assert_eq!(metrics.len(), 3);
        let Some(metric::Data::Sum(sum)) = &metrics[0].data else {
            panic!("counter must be a Sum")
        };
        assert!(sum.is_monotonic);
        assert_eq!(
            sum.aggregation_temporality,
            AggregationTemporality::Cumulative as i32
        );
        assert_eq!(sum.data_points[0].start_time_unix_nano, 100_000_000_000);
        assert_eq!(sum.data_points[0].time_unix_nano, 200_000_000_000);
        assert_eq!(
            sum.data_points[0].value,
            Some(number_data_point::Value::AsDouble(2.5))
        );
        let Some(metric::Data::Histogram(h)) = &metrics[1].data else {
            panic!("histogram")
        };
        assert_eq!(h.data_points[0].bucket_counts, vec![3, 4]);
        assert_eq!(h.data_points[0].explicit_bounds, vec![1.0]);
        assert_eq!(h.data_points[0].count, 7);
        assert!(matches!(&metrics[2].data, Some(metric::Data::Gauge(_))));
        // Round-trips through the protobuf wire format.
        let decoded = ExportMetricsServiceRequest::decode(req.encode_to_vec().as_slice()).unwrap();
        assert_eq!(decoded, req);
    }
}
