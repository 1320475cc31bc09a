//! The Prometheus endpoint (`/metrics`) and health endpoints for Kubernetes probes.

use std::{net::SocketAddr, sync::Arc};

use axum::{extract::State, http::header, response::IntoResponse, routing::get, Router};

/// What the server needs from the agent.
pub trait MetricsSource: Send + Sync + 'static {
    /// The Prometheus text of a fresh snapshot.
    fn render_prometheus(&self) -> String;
    /// Whether the agent finished its start-up (first scan done, probes attached or given up).
    fn is_ready(&self) -> bool;
}

async fn metrics<S: MetricsSource>(State(source): State<Arc<S>>) -> impl IntoResponse {
    // Rendering reads /proc: keep it off the async workers.
    let body = tokio::task::spawn_blocking(move || source.render_prometheus())
        .await
        .unwrap_or_default();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

async fn ready<S: MetricsSource>(State(source): State<Arc<S>>) -> impl IntoResponse {
    if source.is_ready() {
        (axum::http::StatusCode::OK, "ready\n")
    } else {
        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

/// Binds first (so that a taken port is reported at start), then serves in the background.
pub async fn serve<S: MetricsSource>(
    addr: SocketAddr,
    source: Arc<S>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics::<S>))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready::<S>))
        .with_state(source);
    let handle = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "Prometheus endpoint stopped");
        }
    });
    Ok((local, handle))
}
