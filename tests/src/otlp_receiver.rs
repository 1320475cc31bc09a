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
    /// Requests that came gzip-compressed (`grpc-encoding` / `content-encoding: gzip`).
    pub gzipped: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    requests: mpsc::Receiver<ExportMetricsServiceRequest>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Receiver {
    /// A request already received, if any.
    pub fn try_next(&self) -> Option<ExportMetricsServiceRequest> {
        self.requests.try_recv().ok()
    }

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

struct GrpcService(mpsc::SyncSender<ExportMetricsServiceRequest>, Gzipped);

type Gzipped = std::sync::Arc<std::sync::atomic::AtomicUsize>;

#[tonic::async_trait]
impl MetricsService for GrpcService {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        if request
            .metadata()
            .get("grpc-encoding")
            .is_some_and(|v| v.as_bytes() == b"gzip")
        {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
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
            Gzipped,
        ) -> Fut
        + Send
        + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (tx, rx) = mpsc::sync_channel(64);
    let (addr_tx, addr_rx) = mpsc::channel();
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel();
    let gzipped = Gzipped::default();
    let counter = gzipped.clone();
    let thread = thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            serve(listener, tx, shutdown_rx, counter).await;
        });
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("receiver bound");
    Receiver {
        addr,
        gzipped,
        requests: rx,
        shutdown: Some(shutdown_tx),
        thread: Some(thread),
    }
}

/// An OTLP/gRPC receiver on a loopback port.
pub fn grpc() -> Receiver {
    grpc_with(None)
}

/// An OTLP/gRPC receiver over TLS (and mTLS when `tls` names a client CA); it accepts gzip.
pub fn grpc_tls(tls: ServerTls) -> Receiver {
    grpc_with(Some(tls))
}

fn grpc_with(tls: Option<ServerTls>) -> Receiver {
    spawn_server(|listener, tx, shutdown, gzipped| async move {
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            let mut config = tonic::transport::ServerTlsConfig::new().identity(
                tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem),
            );
            if let Some(ca) = &tls.client_ca_pem {
                config = config.client_ca_root(tonic::transport::Certificate::from_pem(ca));
            }
            builder = builder.tls_config(config).unwrap();
        }
        builder
            .add_service(
                MetricsServiceServer::new(GrpcService(tx, gzipped))
                    .accept_compressed(tonic::codec::CompressionEncoding::Gzip),
            )
            .serve_with_incoming_shutdown(incoming, async {
                let _ = shutdown.await;
            })
            .await
            .unwrap();
    })
}

/// The `/v1/metrics` route: protobuf bodies, gzip-compressed or not.
fn http_app(tx: mpsc::SyncSender<ExportMetricsServiceRequest>, gzipped: Gzipped) -> axum::Router {
    axum::Router::new().route(
        "/v1/metrics",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let (tx, gzipped) = (tx.clone(), gzipped.clone());
                async move {
                    if headers.get("content-type").and_then(|v| v.to_str().ok())
                        != Some("application/x-protobuf")
                    {
                        return (axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE, Vec::new());
                    }
                    let body = if headers
                        .get("content-encoding")
                        .is_some_and(|v| v.as_bytes() == b"gzip")
                    {
                        use std::io::Read as _;
                        let mut out = Vec::new();
                        if flate2::read::GzDecoder::new(body.as_ref())
                            .read_to_end(&mut out)
                            .is_err()
                        {
                            return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
                        }
                        gzipped.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        out
                    } else {
                        body.to_vec()
                    };
                    match ExportMetricsServiceRequest::decode(body.as_slice()) {
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
    )
}

/// An OTLP/HTTP (protobuf) receiver over TLS (mTLS when `tls` names a client CA), at
/// /v1/metrics: rustls in front of the same route, one connection task each.
pub fn http_tls(tls: ServerTls) -> Receiver {
    spawn_server(|listener, tx, mut shutdown, gzipped| async move {
        let app = http_app(tx, gzipped);
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls.rustls_config()));
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(_) => continue,
                },
                _ = &mut shutdown => return,
            };
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                // A client that fails the handshake (wrong CA, no client certificate) is
                // dropped here; the agent counts the failed push.
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    })
}

/// An OTLP/HTTP (protobuf) receiver on a loopback port, at /v1/metrics.
pub fn http() -> Receiver {
    spawn_server(|listener, tx, shutdown, gzipped| async move {
        let app = http_app(tx, gzipped);
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = shutdown.await;
            })
            .await
            .unwrap();
    })
}

/// A server's TLS material: its certificate and key (PEM), and the CA its clients' certificates
/// must chain to for mTLS.
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
    pub client_ca_pem: Option<String>,
}

impl ServerTls {
    fn rustls_config(&self) -> rustls::ServerConfig {
        use rustls::pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer};
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match &self.client_ca_pem {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                    roots.add(cert.unwrap()).unwrap();
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    std::sync::Arc::new(roots),
                    provider,
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        builder.with_single_cert(chain, key).unwrap()
    }
}

/// A certificate authority made for one test, and certificates it signs.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

/// A certificate and its key, PEM.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Self { cert, key }
    }

    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate for `names` (DNS names or IP addresses), signed by this CA.
    pub fn issue(&self, names: &[&str]) -> Issued {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}
