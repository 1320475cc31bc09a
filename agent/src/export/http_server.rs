//! The Prometheus endpoint (`/metrics`) and health endpoints for Kubernetes probes.

use std::{net::SocketAddr, sync::Arc};

use axum::{extract::State, http::header, response::IntoResponse, routing::get, Router};

use super::web_config::{BasicAuth, WebConfig};

/// What the server needs from the agent.
pub trait MetricsSource: Send + Sync + 'static {
    /// The Prometheus text of a fresh snapshot.
    fn render_prometheus(&self) -> String;
    /// The same snapshot as versioned JSON (`metrics::json`), for `fanout top`.
    fn render_json(&self) -> String;
    /// What the agent saw over the last `window` (None: since it started), as
    /// `advise::observation` JSON, for `fanout advise`. Key names are real only when
    /// `names_real` (a loopback client), else folded.
    fn render_advise(&self, window: Option<std::time::Duration>, names_real: bool) -> String;
    /// Whether the agent finished its start-up (first scan done, probes attached or given up).
    fn is_ready(&self) -> bool;
    /// Counts a scrape that failed to render (a self-metric).
    fn count_render_failure(&self);
}

/// What a panic carried, when it was a message.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

/// Renders on the blocking pool (rendering reads /proc) and answers 200 with `content_type`,
/// or, when the render panicked, a 500 with the reason, counted as a render failure: a
/// failed scrape, not an empty one (an empty 200 would read as "every series gone").
async fn render_off_the_runtime<S: MetricsSource>(
    source: Arc<S>,
    render: impl FnOnce(&S) -> String + Send + 'static,
    content_type: &'static str,
    what: &'static str,
) -> axum::response::Response {
    let rendering = source.clone();
    match tokio::task::spawn_blocking(move || render(&rendering)).await {
        Ok(body) => ([(header::CONTENT_TYPE, content_type)], body).into_response(),
        Err(e) => {
            source.count_render_failure();
            let reason = if e.is_panic() {
                panic_message(e.into_panic().as_ref()).to_string()
            } else {
                e.to_string()
            };
            tracing::error!(%reason, "rendering {what} failed");
            (
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                format!("rendering the {what} failed: {reason}\n"),
            )
                .into_response()
        }
    }
}

async fn metrics<S: MetricsSource>(State(source): State<Arc<S>>) -> axum::response::Response {
    render_off_the_runtime(
        source,
        S::render_prometheus,
        "text/plain; version=0.0.4; charset=utf-8",
        "metrics",
    )
    .await
}

/// `/api/v1/snapshot`: the snapshot as JSON (see `metrics::json`).
async fn snapshot_json<S: MetricsSource>(State(source): State<Arc<S>>) -> axum::response::Response {
    render_off_the_runtime(source, S::render_json, "application/json", "snapshot").await
}

/// Longest window `/api/v1/advise` takes (longer ones reach back to the agent's start).
const MAX_ADVISE_WINDOW_S: f64 = 366.0 * 86_400.0;

/// The `window=SECONDS` of an advise query (none: since the start).
fn advise_window(query: Option<&str>) -> Result<Option<std::time::Duration>, String> {
    let Some(value) = query
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("window="))
    else {
        return Ok(None);
    };
    match value.parse::<f64>() {
        Ok(w) if w.is_finite() && (1.0..=MAX_ADVISE_WINDOW_S).contains(&w) => {
            Ok(Some(std::time::Duration::from_secs_f64(w)))
        }
        _ => Err(format!(
            "window must be a number of seconds between 1 and {MAX_ADVISE_WINDOW_S}, got {value:?}"
        )),
    }
}

/// `/api/v1/advise[?window=SECONDS]`: what the agent saw over a window, for `fanout advise`.
/// Queue names go only to a client on loopback (the operator on this host); a client from
/// elsewhere gets them folded, as the exporters fold them.
async fn advise_json<S: MetricsSource>(
    State(source): State<Arc<S>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>,
    uri: axum::http::Uri,
) -> axum::response::Response {
    let window = match advise_window(uri.query()) {
        Ok(window) => window,
        Err(message) => {
            return (axum::http::StatusCode::BAD_REQUEST, format!("{message}\n")).into_response()
        }
    };
    let names_real = peer.ip().is_loopback();
    render_off_the_runtime(
        source,
        move |s: &S| s.render_advise(window, names_real),
        "application/json",
        "advice observation",
    )
    .await
}

async fn ready<S: MetricsSource>(State(source): State<Arc<S>>) -> impl IntoResponse {
    if source.is_ready() {
        (axum::http::StatusCode::OK, "ready\n")
    } else {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

/// Binds first (so that a taken port is reported at start), then serves in the background,
/// over plain HTTP without authentication.
pub async fn serve<S: MetricsSource>(
    addr: SocketAddr,
    source: Arc<S>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    serve_with(addr, source, None).await
}

/// Answers 401 unless the request carries the credentials of a configured user.
async fn require_auth(
    State(auth): State<Arc<BasicAuth>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // bcrypt takes tens of ms by design: off the runtime's threads.
    let checking = auth.clone();
    let allowed = tokio::task::spawn_blocking(move || checking.allows(header.as_deref()))
        .await
        .unwrap_or(false);
    if allowed {
        next.run(request).await
    } else {
        (
            axum::http::StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"fanout\"")],
            "Unauthorized\n",
        )
            .into_response()
    }
}

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// [`serve`] with the web configuration (`--web.config.file`): TLS, and basic authentication
/// of every path but `/healthz` and `/readyz` (which say nothing but "up", and which the
/// kubelet's probes and load balancers call without credentials).
pub async fn serve_with<S: MetricsSource>(
    addr: SocketAddr,
    source: Arc<S>,
    web: Option<WebConfig>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let mut protected = Router::new()
        .route("/metrics", get(metrics::<S>))
        .route("/api/v1/snapshot", get(snapshot_json::<S>))
        .route("/api/v1/advise", get(advise_json::<S>))
        .with_state(source.clone());
    let (tls, users) = match web {
        Some(web) => (web.tls, web.users),
        None => (None, Default::default()),
    };
    let auth = Arc::new(BasicAuth::new(users));
    if auth.enabled() {
        protected = protected.layer(axum::middleware::from_fn_with_state(auth, require_auth));
    }
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready::<S>))
        .with_state(source)
        .merge(protected);
    let handle = match tls {
        None => tokio::spawn(async move {
            let app = app.into_make_service_with_connect_info::<SocketAddr>();
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "Prometheus endpoint stopped");
            }
        }),
        Some(tls) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            tokio::spawn(async move {
                loop {
                    let (stream, peer) = match listener.accept().await {
                        Ok(accepted) => accepted,
                        Err(e) => {
                            // Out of descriptors, say: wait a little rather than spin.
                            tracing::warn!(error = %e, "accepting a connection failed");
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let (acceptor, app) = (acceptor.clone(), app.clone());
                    tokio::spawn(async move {
                        let stream =
                            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                                .await
                            {
                                Ok(Ok(stream)) => stream,
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                    return;
                                }
                                Err(_) => return,
                            };
                        let app = app.layer(axum::Extension(axum::extract::ConnectInfo(peer)));
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
    };
    Ok((local, handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Panics {
        failures: std::sync::atomic::AtomicU64,
    }

    impl MetricsSource for Panics {
        fn render_prometheus(&self) -> String {
            panic!("a bug while rendering");
        }
        fn render_json(&self) -> String {
            panic!("a bug while rendering");
        }
        fn render_advise(&self, _: Option<std::time::Duration>, _: bool) -> String {
            panic!("a bug while rendering");
        }
        fn is_ready(&self) -> bool {
            true
        }
        fn count_render_failure(&self) {
            self.failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[test]
    fn advise_windows_are_seconds_within_bounds() {
        assert_eq!(advise_window(None), Ok(None));
        assert_eq!(advise_window(Some("x=1")), Ok(None));
        assert_eq!(
            advise_window(Some("x=1&window=300")),
            Ok(Some(std::time::Duration::from_secs(300)))
        );
        for bad in [
            "window=0",
            "window=-5",
            "window=nan",
            "window=inf",
            "window=1e12",
            "window=",
        ] {
            assert!(advise_window(Some(bad)).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_panic_while_rendering_is_a_failed_scrape() {
        let source = Arc::new(Panics::default());
        let (addr, server) = serve("127.0.0.1:0".parse().unwrap(), source.clone())
            .await
            .unwrap();
        let response = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut text = String::new();
            stream.read_to_string(&mut text).unwrap();
            text
        })
        .await
        .unwrap();
        assert!(response.starts_with("HTTP/1.1 500"), "{response}");
        assert!(
            response.ends_with("rendering the metrics failed: a bug while rendering\n"),
            "{response}"
        );
        assert_eq!(
            source.failures.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        server.abort();
    }
}
