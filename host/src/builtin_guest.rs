//! What the host knows about its own guest (`guest/`), and uses only when
//! it runs that guest: its configuration, checked at start; its routes, for
//! the metrics' `route` label; and its budget header, through which the
//! time a request waited in line is taken out of its budget. Another
//! component gets none of this and works all the same.

use crate::error::{Error, Failure};
use crate::limits::Limits;
use crate::outbound::Upstreams;
use fanout_guest::config::Config;
use fanout_guest::protocol::TIMEOUT_HEADER;
use http::Request;
use std::time::Duration;

// GUEST_COMPONENT_PATH, GUEST_COMPONENT and their `wasi:http@0.3` twins,
// written by build.rs.
include!(concat!(env!("OUT_DIR"), "/components.rs"));

/// A wait shorter than this is not taken out of the guest's budget: it is
/// within the budget's own rounding (milliseconds).
const WAIT_WORTH_CHARGING: Duration = Duration::from_millis(1);

/// The built-in guest, as configured for this host.
#[derive(Debug, Clone)]
pub(crate) struct BuiltinGuest {
    /// Its configuration, as it reads it.
    config: Config,
}

impl BuiltinGuest {
    /// Reads the guest's configuration from the environment it will get,
    /// exactly as the guest will, so that a mistake is a start-up error
    /// naming the key rather than a 500 on every request.
    pub(crate) fn configure(
        env: &[(String, String)],
        limits: &Limits,
        upstreams: &Upstreams,
    ) -> Result<BuiltinGuest, Error> {
        let lookup = |key: &str| {
            env.iter()
                .rev()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        };
        let config = Config::from_lookup(lookup).map_err(|e| Error::GuestConfig {
            key: e.key,
            reason: e.reason,
        })?;
        check_against_limits(&config, limits)?;
        check_against_upstreams(&config, upstreams)?;
        Ok(BuiltinGuest { config })
    }

    /// The metrics label for `path`: the template of the route the guest
    /// will answer it with (`/products/{id}`, or `/products` for the batch
    /// form), or `other` (bounded cardinality).
    pub(crate) fn route_label(&self, path: &str) -> String {
        match fanout_guest::api::matching(&self.config, path) {
            Some((route, found)) if found.batch => route.path.batch_path().unwrap_or_default(),
            Some((route, _)) => route.path.as_str().to_string(),
            None => "other".into(),
        }
    }

    /// The guest's default budget.
    pub(crate) fn budget(&self) -> Duration {
        self.config.deadline
    }
}

/// Every upstream URL the routes call resolves to a registered upstream
/// that speaks its scheme: else each call would be refused at run time
/// (`502 upstream_denied`), so it is an error naming the key at start.
fn check_against_upstreams(config: &Config, upstreams: &Upstreams) -> Result<(), Error> {
    for route in &config.routes {
        for (j, upstream) in route.upstreams.iter().enumerate() {
            let url = upstream.url.origin();
            let refused = |reason: String| Error::GuestConfig {
                key: format!(
                    "{}.routes[{}].upstreams[{j}].url",
                    fanout_guest::protocol::ENV_CONFIG,
                    route.path.as_str()
                ),
                reason,
            };
            let uri: http::Uri = url
                .parse()
                .map_err(|e| refused(format!("`{url}` is not a URL: {e}")))?;
            let authority = uri.authority().map(|a| a.as_str()).unwrap_or_default();
            match upstreams.route(authority, Some(&upstream.name)) {
                None => {
                    return Err(refused(format!(
                        "`{url}` calls `{authority}`, where no upstream is registered"
                    )));
                }
                Some(handle) if uri.scheme_str() == Some("https") && !handle.is_http() => {
                    return Err(refused(format!(
                        "`{url}` is https, but upstream `{}` is served in-process over http",
                        handle.name()
                    )));
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// The budget `request` runs under: what its client asked for in
/// `x-request-timeout-ms`, else `default_budget`. `None` when neither is
/// known, or the header is malformed (the guest's to reject, with its own
/// error).
pub(crate) fn budget_of<B>(
    request: &Request<B>,
    default_budget: Option<Duration>,
) -> Option<Duration> {
    let Some(value) = request.headers().get(TIMEOUT_HEADER) else {
        return default_budget;
    };
    let ms = value.to_str().ok()?.trim().parse::<u64>().ok()?;
    Some(Duration::from_millis(ms))
}

/// Takes the time a request waited for an instance out of its budget, so
/// that the answer still comes within the budget its client counts from: a
/// smaller `x-request-timeout-ms` for the guest. Without the header,
/// `default_budget` is the base: the built-in guest's; another component's
/// is unknown to the host, and such a request is left alone.
pub(crate) fn charge_wait<B>(
    request: &mut Request<B>,
    waited: Duration,
    default_budget: Option<Duration>,
) -> Result<(), Failure> {
    if waited <= WAIT_WORTH_CHARGING {
        return Ok(());
    }
    let Some(budget) = budget_of(request, default_budget) else {
        return Ok(());
    };
    let left = budget.saturating_sub(waited).as_millis() as u64;
    if left == 0 {
        return Err(Failure::QueueTimeout { waited });
    }
    request
        .headers_mut()
        .insert(TIMEOUT_HEADER, http::HeaderValue::from(left));
    Ok(())
}

/// The guest's budgets against the host's limits: the host must not cut a
/// request the guest may still answer, and the line must leave time to run.
fn check_against_limits(config: &Config, limits: &Limits) -> Result<(), Error> {
    if config.max_deadline >= limits.deadline {
        return Err(Error::GuestConfig {
            key: "max_deadline_ms".into(),
            reason: format!(
                "the guest's largest budget ({} ms) must be below the host's deadline ({} ms), \
                 or the host cuts requests before the guest can answer them",
                config.max_deadline.as_millis(),
                limits.deadline.as_millis()
            ),
        });
    }
    // A request that waited in line as long as its budget has none left to
    // run. Clients may ask for up to the largest budget: a line that long
    // serves nobody; one as long as the default budget serves only those
    // who ask for more, which is worth a word at start-up.
    if limits.queue_wait >= config.max_deadline {
        return Err(Error::InvalidLimit {
            key: "queue_wait",
            reason: format!(
                "{} ms is as long as the guest's largest budget ({} ms): a request that \
                 waited that long would have no time left to run; keep it well below its \
                 default budget ({} ms)",
                limits.queue_wait.as_millis(),
                config.max_deadline.as_millis(),
                config.deadline.as_millis(),
            ),
        });
    }
    if limits.queue_wait >= config.deadline {
        tracing::warn!(
            queue_wait_ms = limits.queue_wait.as_millis() as u64,
            budget_ms = config.deadline.as_millis() as u64,
            "the line may be as long as the guest's default budget: a request that waits \
             that long is answered 503 queue_timeout instead of running"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest() -> BuiltinGuest {
        let config = Config::from_lookup(|key| match key {
            fanout_guest::protocol::ENV_CONFIG => Some(
                r#"{"routes": [
                    {"path": "/products/{id}", "upstreams": [{"name": "p", "url": "http://p/{id}"}]},
                    {"path": "/users/{user}/orders/{order}",
                     "upstreams": [{"name": "o", "url": "http://o/{user}/{order}"}]}]}"#
                    .into(),
            ),
            _ => None,
        })
        .unwrap();
        BuiltinGuest { config }
    }

    #[test]
    fn route_labels_are_templates_or_other() {
        let guest = guest();
        assert_eq!(guest.budget(), Duration::from_millis(200));
        for (path, label) in [
            ("/products/42", "/products/{id}"),
            ("/products/4/2", "/products/{id}"),
            ("/products", "/products"),
            ("/users/7/orders/42", "/users/{user}/orders/{order}"),
            ("/users/7/orders", "/users/{user}/orders"),
            ("/users/7", "other"),
            ("/productsX/1", "other"),
            ("/", "other"),
        ] {
            assert_eq!(guest.route_label(path), label, "{path}");
        }
    }

    fn budget_after(header: Option<&str>, waited_ms: u64) -> Result<Option<String>, Failure> {
        let mut request = Request::new(());
        if let Some(value) = header {
            request
                .headers_mut()
                .insert(TIMEOUT_HEADER, value.parse().unwrap());
        }
        let waited = Duration::from_millis(waited_ms);
        charge_wait(&mut request, waited, Some(guest().budget()))?;
        Ok(request
            .headers()
            .get(TIMEOUT_HEADER)
            .map(|v| v.to_str().unwrap().to_string()))
    }

    #[test]
    fn the_wait_comes_out_of_the_budget() {
        // The default budget, less the wait.
        assert_eq!(budget_after(None, 30).unwrap().as_deref(), Some("170"));
        // The client's budget, less the wait.
        assert_eq!(
            budget_after(Some("500"), 30).unwrap().as_deref(),
            Some("470")
        );
        // Too short a wait to charge: left alone.
        assert_eq!(budget_after(None, 1).unwrap(), None);
        // Malformed: left for the guest to refuse.
        assert_eq!(
            budget_after(Some("soon"), 30).unwrap().as_deref(),
            Some("soon")
        );
        // Another component, no header: its budget is unknown.
        let mut request = Request::new(());
        charge_wait(&mut request, Duration::from_millis(30), None).unwrap();
        assert!(request.headers().is_empty());
        // Nothing left: refused before it runs.
        assert_eq!(
            budget_after(Some("20"), 30).unwrap_err().code(),
            "queue_timeout"
        );
    }
}
