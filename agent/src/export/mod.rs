//! Getting metrics out: OTLP push (gRPC or HTTP/protobuf) and the Prometheus endpoint.

pub mod http_server;
pub mod otlp;
pub mod otlp_config;
pub mod otlp_tls;
pub mod web_config;
