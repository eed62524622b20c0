//! The admin endpoints, on a listener of their own: `/metrics`
//! (Prometheus text), `/healthz` (the process is up) and `/readyz` (the
//! server accepts requests: from when `Fanout::serve` listens until its
//! shutdown begins).

use crate::metrics::Metrics;
use crate::response::{ResponseBody, error_response, with_body};
use http::{Response, StatusCode};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;

/// What the admin endpoints read: the metrics and whether the server
/// accepts requests.
#[derive(Clone)]
pub(crate) struct AdminView {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) accepting: Arc<AtomicBool>,
}

/// Serves the admin endpoints on `listener` until `shutdown`.
pub(crate) async fn serve(
    view: AdminView,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    crate::http_server::serve_http(
        listener,
        shutdown,
        Duration::from_secs(1),
        crate::limits::ConnectionLimits::default(),
        Default::default(),
        move |request, _| {
            let answer = view.answer(request.uri().path());
            async move { answer }
        },
    )
    .await
}

impl AdminView {
    fn answer(&self, path: &str) -> Response<ResponseBody> {
        const JSON: &str = "application/json";
        match path {
            "/metrics" => with_body(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics.encode(),
            ),
            "/healthz" => with_body(StatusCode::OK, JSON, r#"{"status":"ok"}"#),
            // Not the pool's state: a busy pool queues or sheds by itself,
            // and a readiness that flaps with load takes replicas out of a
            // load balancer exactly when they are needed.
            "/readyz" => match self.accepting.load(Ordering::Relaxed) {
                true => with_body(StatusCode::OK, JSON, r#"{"status":"ready"}"#),
                false => with_body(
                    StatusCode::SERVICE_UNAVAILABLE,
                    JSON,
                    r#"{"status":"not_accepting"}"#,
                ),
            },
            _ => error_response(
                StatusCode::NOT_FOUND,
                "not_found",
                "admin endpoints: /metrics, /healthz, /readyz",
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_the_listener() {
        let view = AdminView {
            metrics: Arc::new(Metrics::default()),
            accepting: Arc::new(AtomicBool::new(true)),
        };
        assert_eq!(view.answer("/readyz").status(), StatusCode::OK);
        view.accepting.store(false, Ordering::Relaxed);
        assert_eq!(
            view.answer("/readyz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(view.answer("/healthz").status(), StatusCode::OK);
        assert_eq!(view.answer("/metrics").status(), StatusCode::OK);
        assert_eq!(view.answer("/nope").status(), StatusCode::NOT_FOUND);
    }
}
