//! The routing table: which registered upstream an outgoing request goes
//! to. By the upstream name the guest hints, checked against the request's
//! authority; without a hint, by authority alone. An authority nobody
//! registered is refused.

use crate::guard::{GuardedService, Guardrails};
use crate::metrics::Metrics;
use crate::response_cache::{ResponseCacheConfig, ResponseCacheLayer};
use crate::upstream::Upstream;
use std::collections::HashMap;
use std::sync::Arc;
use tower::Layer;

/// A registered upstream: its logical name, the base URL the guest is told,
/// and the guarded service that reaches it.
#[derive(Clone)]
pub struct UpstreamHandle {
    name: String,
    base_url: String,
    authority: String,
    pub(crate) service: GuardedService,
    /// Served by a shared HTTP client: several such upstreams may share an
    /// authority (one gateway in front of several services).
    is_http: bool,
}

impl UpstreamHandle {
    /// Upstream `name` at `base_url`, reached through `upstream` behind
    /// `guardrails`. `is_http` marks an upstream served by a shared HTTP
    /// client, which may share its authority with others of its kind.
    pub fn new(
        name: String,
        base_url: String,
        upstream: Arc<dyn Upstream>,
        guardrails: &Guardrails,
        is_http: bool,
    ) -> Result<UpstreamHandle, crate::error::Error> {
        let invalid = |reason: String| crate::error::Error::InvalidUpstream {
            name: name.clone(),
            reason,
        };
        let uri: http::Uri = base_url
            .parse()
            .map_err(|e| invalid(format!("base URL `{base_url}`: {e}")))?;
        // Credentials in a URL end up in logs, spans and the guest's
        // environment; the URL is not repeated here for the same reason.
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(invalid(
                "the base URL carries credentials (user:password@); \
                 give the upstream's credentials another way"
                    .into(),
            ));
        }
        match uri.scheme_str() {
            Some("http") => {}
            // Only a client that speaks TLS: in-process upstreams are
            // reached by authority, and their base URLs are http://.
            Some("https") if is_http => {}
            Some("https") => {
                return Err(invalid(format!(
                    "base URL `{base_url}`: an in-process upstream's URL is http://"
                )));
            }
            _ => {
                return Err(invalid(format!(
                    "base URL `{base_url}` must be http:// or https://"
                )));
            }
        }
        let authority = uri
            .authority()
            .ok_or_else(|| invalid(format!("base URL `{base_url}` has no host")))?
            .as_str()
            .to_ascii_lowercase();
        Ok(UpstreamHandle {
            service: guardrails.wrap(upstream),
            name,
            base_url,
            authority,
            is_http,
        })
    }

    /// Puts request coalescing, and a cache when `config` is set, in front
    /// of the guardrails (see [`response_cache`](crate::response_cache)).
    pub(crate) fn with_response_cache(
        mut self,
        config: Option<ResponseCacheConfig>,
        metrics: Arc<Metrics>,
    ) -> UpstreamHandle {
        let layer = ResponseCacheLayer::new(&self.name, config, metrics);
        self.service = GuardedService::new(layer.layer(self.service));
        self
    }

    /// The upstream's logical name (`inventory`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Served by a shared HTTP client (which speaks TLS), rather than
    /// in-process.
    pub(crate) fn is_http(&self) -> bool {
        self.is_http
    }

    /// The base URL the guest was given for it.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }
}

/// The routing table from authority (and hinted name) to upstream.
#[derive(Clone, Default)]
pub(crate) struct Upstreams {
    by_authority: HashMap<String, UpstreamHandle>,
    by_name: HashMap<String, UpstreamHandle>,
}

impl Upstreams {
    /// Registers `handle`, keyed by its name and by its authority. Only
    /// upstreams served over HTTP may share an authority.
    pub(crate) fn insert(&mut self, handle: UpstreamHandle) -> Result<(), crate::error::Error> {
        if let Some(other) = self.by_authority.get(&handle.authority)
            && !(other.is_http && handle.is_http)
        {
            return Err(crate::error::Error::InvalidUpstream {
                reason: format!(
                    "authority `{}` is already used by upstream `{}`; \
                     requests are routed by authority, so in-process upstreams need their own",
                    handle.authority, other.name
                ),
                name: handle.name,
            });
        }
        self.by_authority
            .entry(handle.authority.clone())
            .or_insert(handle.clone());
        self.by_name.insert(handle.name.clone(), handle);
        Ok(())
    }

    /// Every registered upstream.
    pub(crate) fn handles(&self) -> impl Iterator<Item = &UpstreamHandle> {
        self.by_name.values()
    }

    /// The upstream for a request to `authority`: the one the guest named
    /// in `hint` if that one lives at this authority, else the first
    /// registered at it. `None` for an authority nobody registered.
    pub(crate) fn route(&self, authority: &str, hint: Option<&str>) -> Option<&UpstreamHandle> {
        let authority = authority.to_ascii_lowercase();
        hint.and_then(|name| self.by_name.get(name))
            .filter(|handle| handle.authority == authority)
            .or_else(|| self.by_authority.get(&authority))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::HttpUpstream;

    fn table(entries: &[(&str, &str)]) -> Upstreams {
        let mut upstreams = Upstreams::default();
        for (name, base) in entries {
            let http: Arc<dyn Upstream> = Arc::new(HttpUpstream::default());
            let handle = UpstreamHandle::new(
                name.to_string(),
                base.to_string(),
                http,
                &Guardrails::default(),
                true,
            );
            upstreams.insert(handle.unwrap()).unwrap();
        }
        upstreams
    }

    #[tokio::test]
    async fn a_hint_picks_among_upstreams_that_share_an_authority() {
        let upstreams = table(&[
            ("inventory", "http://gateway:9000"),
            ("reviews", "http://GATEWAY:9000/reviews"),
            ("pricing", "http://pricing:80"),
        ]);
        let name = |authority: &str, hint: Option<&str>| {
            upstreams
                .route(authority, hint)
                .map(|h| h.name().to_string())
        };
        assert_eq!(
            name("gateway:9000", Some("reviews")).as_deref(),
            Some("reviews")
        );
        assert_eq!(
            name("gateway:9000", Some("inventory")).as_deref(),
            Some("inventory")
        );
        // No hint: the first registered at the authority.
        assert_eq!(name("gateway:9000", None).as_deref(), Some("inventory"));
        // A hint naming an upstream elsewhere does not move the request.
        assert_eq!(
            name("gateway:9000", Some("pricing")).as_deref(),
            Some("inventory")
        );
        assert_eq!(
            name("pricing:80", Some("nobody")).as_deref(),
            Some("pricing")
        );
        assert_eq!(name("elsewhere:1", Some("pricing")), None);
    }

    #[tokio::test]
    async fn credentials_in_a_base_url_are_refused_unrepeated() {
        let http: Arc<dyn Upstream> = Arc::new(HttpUpstream::default());
        let refused = UpstreamHandle::new(
            "pricing".into(),
            "http://user:s3cret@pricing:80".into(),
            http,
            &Guardrails::default(),
            true,
        );
        let message = refused.err().expect("refused").to_string();
        assert!(message.contains("credentials"), "{message}");
        assert!(!message.contains("s3cret"), "{message}");
    }

    #[tokio::test]
    async fn in_process_upstreams_need_their_own_authority() {
        let mut upstreams = table(&[("inventory", "http://gateway:9000")]);
        let inproc: Arc<dyn Upstream> = Arc::new(HttpUpstream::default());
        let handle = UpstreamHandle::new(
            "fixture".into(),
            "http://gateway:9000".into(),
            inproc,
            &Guardrails::default(),
            false,
        );
        let err = upstreams.insert(handle.unwrap()).unwrap_err();
        assert!(err.to_string().contains("already used"), "{err}");
    }
}
