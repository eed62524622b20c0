//! The admin endpoints, on a listener of their own: `/metrics`
//! (Prometheus text), `/healthz` (the process is up) and `/readyz` (the
//! component is compiled and the pool has a free instance).

use crate::metrics::Metrics;
use crate::response::{ResponseBody, error_response, with_body};
use http::{Response, StatusCode};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// What the admin endpoints read: the metrics and the instance pool.
#[derive(Clone)]
pub(crate) struct AdminView {
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) instances: Arc<Semaphore>,
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
            "/readyz" => {
                let free = self.instances.available_permits();
                let (status, state) = if free > 0 {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "busy")
                };
                with_body(
                    status,
                    JSON,
                    format!(r#"{{"status":"{state}","instances_free":{free}}}"#),
                )
            }
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
    fn readiness_follows_the_pool() {
        let view = AdminView {
            metrics: Arc::new(Metrics::default()),
            instances: Arc::new(Semaphore::new(1)),
        };
        assert_eq!(view.answer("/readyz").status(), StatusCode::OK);
        let _held = view.instances.try_acquire().unwrap();
        assert_eq!(
            view.answer("/readyz").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(view.answer("/healthz").status(), StatusCode::OK);
        assert_eq!(view.answer("/metrics").status(), StatusCode::OK);
        assert_eq!(view.answer("/nope").status(), StatusCode::NOT_FOUND);
    }
}
