//! In-process upstreams from async closures.

use super::read_body;
use crate::upstream::{Upstream, UpstreamBody, UpstreamFuture, UpstreamResult};
use http::Request;
use std::future::Future;
use std::sync::Arc;
use wasmtime_wasi_http::RequestOptions;

struct FnUpstream<F>(Arc<F>);

impl<F, Fut> Upstream for FnUpstream<F>
where
    F: Fn(Request<UpstreamBody>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = UpstreamResult> + Send + 'static,
{
    fn call(&self, request: Request<UpstreamBody>, _options: RequestOptions) -> UpstreamFuture {
        let f = self.0.clone();
        Box::pin(async move {
            let request = read_body(request).await?;
            f(request).await
        })
    }
}

/// An in-process upstream from an async closure: no socket, no serialisation
/// beyond the body bytes.
pub fn from_fn<F, Fut>(f: F) -> Arc<dyn Upstream>
where
    F: Fn(Request<UpstreamBody>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = UpstreamResult> + Send + 'static,
{
    Arc::new(FnUpstream(Arc::new(f)))
}
