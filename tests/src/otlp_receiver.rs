//! OTLP metric receivers for the tests, built on `opentelemetry-proto`: a gRPC server
//! (tonic) and an HTTP/protobuf endpoint (axum). They stand in for an OpenTelemetry Collector,
//! which cannot be installed here; the wire format is the real one. Each received request is
//! forwarded on a channel.

use std::{net::SocketAddr, sync::mpsc, thread, time::Duration};

use opentelemetry_proto::tonic::collector::metrics::v1::{
    metrics_service_server::{MetricsService, MetricsServiceServer},
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use prost::Message as _;

pub struct Receiver {
    pub addr: SocketAddr,
    requests: mpsc::Receiver<ExportMetricsServiceRequest>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Receiver {
    /// Waits (bounded) for the next request.
    pub fn next(&self, limit: Duration) -> ExportMetricsServiceRequest {
        self.requests
            .recv_timeout(limit)
            .unwrap_or_else(|_| panic!("no OTLP request within {limit:?}"))
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct GrpcService(mpsc::SyncSender<ExportMetricsServiceRequest>);

#[tonic::async_trait]
impl MetricsService for GrpcService {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let _ = self.0.try_send(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse {
            partial_success: None,
        }))
    }
}

fn spawn_server<F, Fut>(serve: F) -> Receiver
where
    F: FnOnce(
            tokio::net::TcpListener,
            mpsc::SyncSender<ExportMetricsServiceRequest>,
            tokio::sync::oneshot::Receiver<()>,
        ) -> Fut
        + Send
        + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (tx, rx) = mpsc::sync_channel(64);
    let (addr_tx, addr_rx) = mpsc::channel();
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel();
    let thread = thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            serve(listener, tx, shutdown_rx).await;
        });
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("receiver bound");
    Receiver {
        addr,
        requests: rx,
        shutdown: Some(shutdown_tx),
        thread: Some(thread),
    }
}

/// An OTLP/gRPC receiver on a loopback port.
pub fn grpc() -> Receiver {
    spawn_server(|listener, tx, shutdown| async move {
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tonic::transport::Server::builder()
            .add_service(MetricsServiceServer::new(GrpcService(tx)))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = shutdown.await;
            })
            .await
            .unwrap();
    })
}

/// An OTLP/HTTP (protobuf) receiver on a loopback port, at /v1/metrics.
pub fn http() -> Receiver {
    spawn_server(|listener, tx, shutdown| async move {
        let app = axum::Router::new().route(
            "/v1/metrics",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let tx = tx.clone();
                    async move {
                        if headers.get("content-type").and_then(|v| v.to_str().ok())
                            != Some("application/x-protobuf")
                        {
                            return (axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE, Vec::new());
                        }
                        match ExportMetricsServiceRequest::decode(body.as_ref()) {
                            Ok(req) => {
                                let _ = tx.try_send(req);
                                (
                                    axum::http::StatusCode::OK,
                                    ExportMetricsServiceResponse {
                                        partial_success: None,
                                    }
                                    .encode_to_vec(),
                                )
                            }
                            Err(_) => (axum::http::StatusCode::BAD_REQUEST, Vec::new()),
                        }
                    }
                },
            ),
        );
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = shutdown.await;
            })
            .await
            .unwrap();
    })
}
