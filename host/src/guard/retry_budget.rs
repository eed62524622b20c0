//! The retry budget: a retry attempt (the guest marks it) is refused once
//! retries would exceed the configured fraction of the upstream's calls.
//! The accounting is tower's `TpsBudget`; this layer only tells first
//! attempts from retries, which tower's `Retry` middleware cannot (the
//! guest, not the host, retries).

use super::{Blocked, RetryBudgetConfig};
use crate::upstream::Call;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::retry::budget::{Budget, TpsBudget};
use tower::{BoxError, Layer, Service};

#[derive(Clone)]
pub(crate) struct RetryBudgetLayer {
    budget: Arc<TpsBudget>,
}

impl RetryBudgetLayer {
    pub(crate) fn new(config: RetryBudgetConfig) -> RetryBudgetLayer {
        RetryBudgetLayer {
            budget: Arc::new(TpsBudget::new(
                config.window,
                config.min_per_sec,
                config.ratio,
            )),
        }
    }
}

impl<S> Layer<S> for RetryBudgetLayer {
    type Service = RetryBudgetService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryBudgetService {
            inner,
            budget: self.budget.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct RetryBudgetService<S> {
    inner: S,
    budget: Arc<TpsBudget>,
}

impl<S> Service<Call> for RetryBudgetService<S>
where
    S: Service<Call, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future =
        futures_util::future::Either<std::future::Ready<Result<S::Response, BoxError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        // tower's TpsBudget: first attempts deposit, retries withdraw.
        if call.attempt <= 1 {
            self.budget.deposit();
        } else if !self.budget.withdraw() {
            return futures_util::future::Either::Left(std::future::ready(Err(
                Blocked::RetryBudget.into(),
            )));
        }
        futures_util::future::Either::Right(self.inner.call(call))
    }
}
