//! A fake upstream with a latency distribution and injected faults.

use super::{json_response, read_body};
use crate::upstream::{Upstream, UpstreamBody, UpstreamFuture};
use http::{Request, StatusCode};
use serde_json::json;
use std::time::Duration;
use wasmtime_wasi_http::RequestOptions;

/// A latency distribution for [`SimulatedUpstream`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Latency {
    /// Always the same.
    Fixed(Duration),
    /// Uniform in `[min, max]`.
    Uniform {
        /// The shortest.
        min: Duration,
        /// The longest.
        max: Duration,
    },
    /// Log-normal: the typical shape of service latency, with a long tail.
    /// `median` is its median, `sigma` the standard deviation of its log.
    LogNormal {
        /// The median latency.
        median: Duration,
        /// The standard deviation of the latency's log.
        sigma: f64,
    },
}

impl Latency {
    /// One latency drawn from the distribution.
    pub fn sample(&self) -> Duration {
        match *self {
            Latency::Fixed(d) => d,
            Latency::Uniform { min, max } => {
                let span = max.saturating_sub(min).as_micros() as u64;
                min + Duration::from_micros(fastrand::u64(0..=span))
            }
            Latency::LogNormal { median, sigma } => {
                // Box-Muller: one standard normal from two uniforms.
                let u1 = fastrand::f64().max(f64::MIN_POSITIVE);
                let u2 = fastrand::f64();
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                median.mul_f64((sigma * z).exp().min(1e4))
            }
        }
    }
}

/// A fake upstream: answers `body(path_and_query)` after a sampled latency, fails
/// with a 503 at `error_rate`, never answers at `hang_rate`.
pub struct SimulatedUpstream {
    /// How long an answer takes.
    pub latency: Latency,
    /// The share of calls answered 503.
    pub error_rate: f64,
    /// The share of calls never answered.
    pub hang_rate: f64,
    body: fn(&str) -> serde_json::Value,
}

impl SimulatedUpstream {
    /// Answers `body(path_and_query)` after `latency`, with no faults
    /// ([`demo::answer_for`](crate::demo::answer_for) gives plausible data).
    pub fn new(latency: Latency, body: fn(&str) -> serde_json::Value) -> SimulatedUpstream {
        SimulatedUpstream {
            latency,
            error_rate: 0.0,
            hang_rate: 0.0,
            body,
        }
    }

    /// Answers this share of calls with a 503.
    pub fn error_rate(mut self, rate: f64) -> Self {
        self.error_rate = rate;
        self
    }

    /// Never answers this share of calls.
    pub fn hang_rate(mut self, rate: f64) -> Self {
        self.hang_rate = rate;
        self
    }
}

impl Upstream for SimulatedUpstream {
    fn call(&self, request: Request<UpstreamBody>, _options: RequestOptions) -> UpstreamFuture {
        let latency = self.latency.sample();
        let roll = fastrand::f64();
        let hang = roll < self.hang_rate;
        let error = !hang && roll < self.hang_rate + self.error_rate;
        let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
        let body = (self.body)(path);
        Box::pin(async move {
            read_body(request).await?;
            if hang {
                // The caller's timeout or deadline ends this.
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(latency).await;
            Ok(if error {
                json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({ "error": { "code": "injected_fault", "message": "simulated failure" } }),
                )
            } else {
                json_response(StatusCode::OK, &body)
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_distributions_stay_in_shape() {
        let ms = Duration::from_millis;
        assert_eq!(Latency::Fixed(ms(7)).sample(), ms(7));
        for _ in 0..1000 {
            let d = Latency::Uniform {
                min: ms(20),
                max: ms(40),
            }
            .sample();
            assert!((ms(20)..=ms(40)).contains(&d), "{d:?}");
        }
        let mut samples: Vec<Duration> = (0..20_000)
            .map(|_| {
                Latency::LogNormal {
                    median: ms(40),
                    sigma: 0.5,
                }
                .sample()
            })
            .collect();
        samples.sort();
        let median = samples[samples.len() / 2];
        assert!((ms(37)..=ms(43)).contains(&median), "median {median:?}");
        // exp(0.5 * 2.326) ~ 3.2: the p99 sits about 3.2x the median.
        let p99 = samples[samples.len() * 99 / 100];
        assert!((ms(110)..=ms(150)).contains(&p99), "p99 {p99:?}");
    }
}
