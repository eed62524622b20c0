//! What RFC 9111 lets a shared cache do with one answer: store it, for how
//! long, and whether waiting identical requests may be given it. Pure
//! functions of headers and the configuration, tested on their own.

use super::ResponseCacheConfig;
use http::{HeaderMap, HeaderName, StatusCode, header};
use std::time::Duration;

/// The `Cache-Control` directives that matter to a shared cache.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Directives {
    pub(crate) no_store: bool,
    pub(crate) no_cache: bool,
    pub(crate) private: bool,
    pub(crate) must_revalidate: bool,
    pub(crate) max_age: Option<Duration>,
    pub(crate) s_maxage: Option<Duration>,
    pub(crate) stale_while_revalidate: Option<Duration>,
}

impl Directives {
    /// Every `Cache-Control` field of `headers`, merged. Names are
    /// case-insensitive; a malformed argument makes its directive unknown,
    /// and unknown directives are ignored (RFC 9111 §5.2). A `no-cache` or
    /// `private` naming fields applies to the whole answer here: we would
    /// rather not store it than store it in part.
    pub(crate) fn parse(headers: &HeaderMap) -> Directives {
        let mut d = Directives::default();
        for value in headers.get_all(header::CACHE_CONTROL) {
            let Ok(value) = value.to_str() else {
                // Bytes we cannot read might say no-store: do not store.
                d.no_store = true;
                continue;
            };
            for directive in split_directives(value) {
                let (name, arg) = match directive.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (directive.trim(), None),
                };
                let seconds = || {
                    arg.and_then(|a| a.parse::<u64>().ok())
                        .map(Duration::from_secs)
                };
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => d.no_store = true,
                    "no-cache" => d.no_cache = true,
                    "private" => d.private = true,
                    "must-revalidate" | "proxy-revalidate" => d.must_revalidate = true,
                    // A duplicated or invalid max-age makes the answer stale
                    // (RFC 9111 §4.2.1): zero.
                    "max-age" => d.max_age = Some(seconds().unwrap_or_default()),
                    "s-maxage" => d.s_maxage = Some(seconds().unwrap_or_default()),
                    "stale-while-revalidate" => d.stale_while_revalidate = seconds(),
                    _ => {}
                }
            }
        }
        d
    }
}

/// Directives split on commas outside quoted strings.
fn split_directives(value: &str) -> impl Iterator<Item = &str> {
    let mut quoted = false;
    value
        .split(move |c| {
            if c == '"' {
                quoted = !quoted;
            }
            c == ',' && !quoted
        })
        .map(str::trim)
        .filter(|d| !d.is_empty())
}

/// Status codes a cache may reuse without explicit freshness (RFC 9110
/// §15.1, "heuristically cacheable"), less 206: we never store ranges.
fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// What may be done with one answer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Decision {
    /// Reusable: waiting identical requests may share it, and, when the
    /// cache is on and the lifetime is not zero, it is stored.
    Reuse {
        /// How long it is fresh, from when it was generated.
        fresh_for: Duration,
        /// How long past that it may still be served while one refresh
        /// runs (stale-while-revalidate).
        stale_for: Duration,
    },
    /// Not reusable this time (a 5xx, say): waiting requests make their
    /// own calls, and nothing is remembered.
    NotThisTime,
    /// Never reusable (`no-store`, `private`, `no-cache`, `Vary: *`,
    /// `Set-Cookie`): remembered for a while, so that identical requests
    /// stop waiting for one another.
    Never(&'static str),
}

/// The decision for an answer with `status` and `headers`. `config` is the
/// cache's, or `None` when only coalescing is on (nothing is stored, but
/// a reusable answer is shared with the requests waiting for it).
pub(crate) fn decide(
    config: Option<&ResponseCacheConfig>,
    status: StatusCode,
    headers: &HeaderMap,
) -> Decision {
    let d = Directives::parse(headers);
    if d.no_store {
        return Decision::Never("no-store");
    }
    if d.private {
        return Decision::Never("private");
    }
    // We do not revalidate, so an answer that must be revalidated before
    // every reuse is never reused.
    if d.no_cache {
        return Decision::Never("no-cache");
    }
    if vary_names(headers).is_none() {
        return Decision::Never("vary *");
    }
    // One user's session cookie must not reach another.
    if headers.contains_key(header::SET_COOKIE) {
        return Decision::Never("set-cookie");
    }
    let explicit = d.s_maxage.or(d.max_age);
    if explicit.is_none() && !heuristically_cacheable(status) {
        return Decision::NotThisTime;
    }
    let Some(config) = config else {
        return Decision::Reuse {
            fresh_for: Duration::ZERO,
            stale_for: Duration::ZERO,
        };
    };
    // The upstream's own lifetime wins over the configured one, which
    // stands in for RFC 9111's heuristic freshness.
    let lifetime = explicit.unwrap_or(config.ttl);
    let fresh_for = lifetime.saturating_sub(age(headers));
    // s-maxage implies proxy-revalidate (RFC 9111 §5.2.2.10).
    let stale_for = if d.must_revalidate || d.s_maxage.is_some() {
        Duration::ZERO
    } else {
        d.stale_while_revalidate
            .unwrap_or(config.stale_while_revalidate)
    };
    Decision::Reuse {
        fresh_for,
        stale_for,
    }
}

/// The upstream's `Age`, zero when absent or malformed.
pub(crate) fn age(headers: &HeaderMap) -> Duration {
    headers
        .get(header::AGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or_default()
}

/// The names in the answer's `Vary` fields, lower-cased, sorted and
/// without duplicates; `None` for `Vary: *` (or bytes we cannot read),
/// which matches no other request.
pub(crate) fn vary_names(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for value in headers.get_all(header::VARY) {
        for name in value.to_str().ok()?.split(',').map(str::trim) {
            match name {
                "" => {}
                "*" => return None,
                name => names.push(HeaderName::from_bytes(name.as_bytes()).ok()?),
            }
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    Some(names)
}

/// What the request itself says: `no-store` or `no-cache` (or `Pragma:
/// no-cache`) send it upstream, past any stored answer.
pub(crate) fn request_bypasses(headers: &HeaderMap) -> bool {
    let d = Directives::parse(headers);
    d.no_store
        || d.no_cache
        || headers
            .get(header::PRAGMA)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"no-cache"))
}

/// Credentials the request carries (a forwarded `Authorization` or
/// cookie): an answer to it is that user's, not to be shared with another
/// request unless the configuration says `shared = true`.
pub(crate) fn carries_credentials(headers: &HeaderMap) -> bool {
    headers.contains_key(header::AUTHORIZATION)
        || headers.contains_key(header::COOKIE)
        || headers.contains_key(header::PROXY_AUTHORIZATION)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    fn config() -> ResponseCacheConfig {
        ResponseCacheConfig {
            ttl: Duration::from_secs(1),
            stale_while_revalidate: Duration::from_secs(5),
            ..ResponseCacheConfig::default()
        }
    }

    fn decide_for(status: u16, pairs: &[(&str, &str)]) -> Decision {
        decide(
            Some(&config()),
            StatusCode::from_u16(status).unwrap(),
            &headers(pairs),
        )
    }

    fn reuse(fresh: u64, stale: u64) -> Decision {
        Decision::Reuse {
            fresh_for: Duration::from_secs(fresh),
            stale_for: Duration::from_secs(stale),
        }
    }

    #[test]
    fn directives_are_case_insensitive_and_quoted_commas_stay_inside() {
        let d = Directives::parse(&headers(&[
            ("cache-control", "Max-Age=60, no-cache=\"set-cookie, x-a\""),
            ("cache-control", "S-MAXAGE=\"30\""),
        ]));
        assert_eq!(d.max_age, Some(Duration::from_secs(60)));
        assert_eq!(d.s_maxage, Some(Duration::from_secs(30)));
        assert!(d.no_cache);
        assert!(!d.no_store);
        // A malformed max-age is stale, not forever.
        let d = Directives::parse(&headers(&[("cache-control", "max-age=soon")]));
        assert_eq!(d.max_age, Some(Duration::ZERO));
    }

    #[test]
    fn what_must_never_be_shared_is_not() {
        for (field, value, why) in [
            ("cache-control", "no-store", "no-store"),
            ("cache-control", "private", "private"),
            ("cache-control", "private=\"x-user\", max-age=60", "private"),
            ("cache-control", "no-cache", "no-cache"),
            ("vary", "accept-language, *", "vary *"),
            ("set-cookie", "session=abc", "set-cookie"),
        ] {
            assert_eq!(
                decide_for(200, &[(field, value)]),
                Decision::Never(why),
                "{field}: {value}"
            );
        }
    }

    #[test]
    fn the_upstreams_lifetime_wins_and_age_counts() {
        // The configured ttl where the upstream says nothing.
        assert_eq!(decide_for(200, &[]), reuse(1, 5));
        assert_eq!(decide_for(404, &[]), reuse(1, 5));
        assert_eq!(
            decide_for(200, &[("cache-control", "max-age=60")]),
            reuse(60, 5)
        );
        // s-maxage is for shared caches and forbids serving stale.
        assert_eq!(
            decide_for(200, &[("cache-control", "max-age=60, s-maxage=10")]),
            reuse(10, 0)
        );
        assert_eq!(
            decide_for(200, &[("cache-control", "max-age=60"), ("age", "50")]),
            reuse(10, 5)
        );
        assert_eq!(
            decide_for(200, &[("cache-control", "max-age=60"), ("age", "90")]),
            reuse(0, 5)
        );
        assert_eq!(
            decide_for(
                200,
                &[("cache-control", "max-age=60, stale-while-revalidate=30")]
            ),
            reuse(60, 30)
        );
        assert_eq!(
            decide_for(200, &[("cache-control", "max-age=60, must-revalidate")]),
            reuse(60, 0)
        );
    }

    #[test]
    fn errors_are_not_reused_unless_the_upstream_says_so() {
        assert_eq!(decide_for(503, &[]), Decision::NotThisTime);
        assert_eq!(decide_for(500, &[]), Decision::NotThisTime);
        assert_eq!(
            decide_for(503, &[("cache-control", "max-age=2")]),
            reuse(2, 5)
        );
    }

    #[test]
    fn coalescing_alone_shares_but_stores_nothing() {
        assert_eq!(
            decide(
                None,
                StatusCode::OK,
                &headers(&[("cache-control", "max-age=60")])
            ),
            reuse(0, 0)
        );
        assert_eq!(
            decide(
                None,
                StatusCode::OK,
                &headers(&[("cache-control", "private")])
            ),
            Decision::Never("private")
        );
    }

    #[test]
    fn vary_names_are_normalised() {
        let names = vary_names(&headers(&[
            ("vary", "Accept-Language, accept-encoding"),
            ("vary", "accept-language"),
        ]))
        .unwrap();
        assert_eq!(names, ["accept-encoding", "accept-language"]);
        assert_eq!(vary_names(&headers(&[("vary", "*")])), None);
    }

    #[test]
    fn requests_can_ask_past_the_cache_and_carry_credentials() {
        assert!(request_bypasses(&headers(&[("cache-control", "no-cache")])));
        assert!(request_bypasses(&headers(&[("pragma", "no-cache")])));
        assert!(!request_bypasses(&headers(&[(
            "cache-control",
            "max-age=0"
        )])));
        assert!(carries_credentials(&headers(&[(
            "authorization",
            "Bearer x"
        )])));
        assert!(carries_credentials(&headers(&[("cookie", "a=b")])));
        assert!(!carries_credentials(&headers(&[("accept", "*/*")])));
    }
}
