//! The HTTP contract of the guest: routes, input validation and the
//! request's budget. Errors are [`ApiError`]s, answers are built in
//! [`merge`](crate::merge).

use crate::config::{Config, MAX_BATCH_IDS, Route};
use crate::errors::ApiError;
use crate::protocol::TIMEOUT_HEADER;
use crate::template::{self, MAX_VAR_LEN, Params, PathMatch};
use std::time::Duration;

/// Longest item id accepted (any path variable).
pub const MAX_ID_LEN: usize = MAX_VAR_LEN;

/// What an incoming request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target<'a> {
    /// `GET /products/{id}`: one item.
    Item {
        /// The route it matched.
        route: &'a Route,
        /// Its path variables and query parameters, checked.
        params: Params,
    },
    /// `GET /products?ids=a,b,c`: one item per id, the id filling the
    /// path's last variable.
    Batch {
        /// The route it matched.
        route: &'a Route,
        /// Each item's parameters, in the order of the ids.
        items: Vec<Params>,
    },
}

/// The route a path is for, and how it matched; `None` if none.
pub fn matching<'c, 'p>(config: &'c Config, path: &'p str) -> Option<(&'c Route, PathMatch<'p>)> {
    let mut best: Option<(&Route, PathMatch<'_>)> = None;
    for route in &config.routes {
        if let Some(found) = route.path.matches(path)
            && best.as_ref().is_none_or(|(_, b)| found.beats(b))
        {
            best = Some((route, found));
        }
    }
    best
}

/// Maps method, path and query to a configured route, or to the error a
/// client should see. Every value an upstream URL uses is checked here,
/// before any call.
pub fn route<'a>(
    config: &'a Config,
    method: &str,
    path: &str,
    query: Option<&str>,
) -> Result<Target<'a>, ApiError> {
    let Some((route, found)) = matching(config, path) else {
        let routes: Vec<String> = config
            .routes
            .iter()
            .map(|r| match r.path.batch_path() {
                Some(batch) => format!("GET {}, GET {batch}?ids=a,b", r.path.as_str()),
                None => format!("GET {}", r.path.as_str()),
            })
            .collect();
        return Err(ApiError::new(
            404,
            "not_found",
            format!("no route for {path}; try {}", routes.join(", ")),
        ));
    };
    if method != "GET" {
        return Err(ApiError::new(
            405,
            "method_not_allowed",
            format!("{method} is not allowed on {path}; use GET"),
        ));
    }
    let mut params = Params::default();
    for (name, value) in route.path.vars().zip(&found.values) {
        validate_var(name, value)?;
        params.path.push((name.to_string(), value.to_string()));
    }
    params.query = query_params(route, query)?;
    if !found.batch {
        return Ok(Target::Item { route, params });
    }
    let last = route.path.vars().last().unwrap_or("id").to_string();
    let items = parse_ids(query)?
        .into_iter()
        .map(|id| {
            let mut item = params.clone();
            item.path.push((last.clone(), id));
            item
        })
        .collect();
    Ok(Target::Batch { route, items })
}

/// An id is 1 to 64 characters of `[A-Za-z0-9_-]`. Anything else is refused
/// before an upstream is called, so ids are safe to put in URLs.
pub fn validate_id(id: &str) -> Result<(), ApiError> {
    validate_var("id", id)
}

/// A path variable, like an id, is 1 to 64 characters of `[A-Za-z0-9_-]`:
/// no `/`, `%`, `.` or anything else that could change what an upstream
/// URL means.
pub fn validate_var(name: &str, value: &str) -> Result<(), ApiError> {
    let invalid = |why: String| ApiError::new(400, "invalid_id", why);
    if value.is_empty() {
        return Err(invalid(format!("the {name} is empty")));
    }
    if value.len() > MAX_VAR_LEN {
        return Err(invalid(format!(
            "the {name} is {} characters long; at most {MAX_VAR_LEN} are allowed",
            value.len()
        )));
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(invalid(format!(
            "the {name} contains {c:?}; only A-Z, a-z, 0-9, '-' and '_' are allowed"
        )));
    }
    Ok(())
}

/// The query parameters `route`'s upstreams use, decoded and checked; a
/// missing one without a default is a 400 naming it. An empty value counts
/// as missing. The first of a repeated parameter counts.
pub fn query_params(route: &Route, query: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    let invalid = |why: String| ApiError::new(400, "invalid_query", why);
    let mut values = Vec::with_capacity(route.query.len());
    for (name, required) in &route.query {
        let raw = query.unwrap_or_default().split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (template::decode(key).as_deref() == Some(name.as_str())).then_some(value)
        });
        let value = match raw.map(|raw| (raw, template::decode(raw))) {
            Some((raw, None)) => {
                return Err(invalid(format!(
                    "query parameter `{name}`: `{raw}` is not valid percent-encoded UTF-8"
                )));
            }
            Some((_, Some(value))) if !value.is_empty() => value,
            _ if *required => {
                return Err(invalid(format!(
                    "the query needs {name}=<value> (this route's upstreams use it)"
                )));
            }
            _ => continue,
        };
        template::query_value(&value)
            .map_err(|why| invalid(format!("query parameter `{name}` {why}")))?;
        values.push((name.clone(), value));
    }
    Ok(values)
}

/// Parses `ids=a,b,c` out of a query string: 1 to 100 valid ids.
pub fn parse_ids(query: Option<&str>) -> Result<Vec<String>, ApiError> {
    let invalid = |why: String| ApiError::new(400, "invalid_ids", why);
    let raw = query
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("ids="))
        .ok_or_else(|| invalid("the query needs ids=<id>,<id>,...".into()))?;
    if raw.is_empty() {
        return Err(invalid("ids= is empty".into()));
    }
    let ids: Vec<String> = raw.split(',').map(str::to_string).collect();
    if ids.len() > MAX_BATCH_IDS {
        return Err(invalid(format!(
            "{} ids asked for; at most {MAX_BATCH_IDS} are allowed",
            ids.len()
        )));
    }
    for (i, id) in ids.iter().enumerate() {
        validate_id(id).map_err(|e| invalid(format!("id #{}: {}", i + 1, e.message)))?;
    }
    Ok(ids)
}

/// The request's budget: the configured deadline, or what the client asks
/// for with `x-request-timeout-ms`, capped at the configured maximum.
pub fn budget(config: &Config, header: Option<&str>) -> Result<Duration, ApiError> {
    let Some(raw) = header else {
        return Ok(config.deadline);
    };
    let ms: u64 = raw
        .trim()
        .parse()
        .ok()
        .filter(|ms| *ms > 0)
        .ok_or_else(|| {
            ApiError::new(
                400,
                "invalid_timeout",
                format!("{TIMEOUT_HEADER}: `{raw}` is not a positive whole number of milliseconds"),
            )
        })?;
    Ok(Duration::from_millis(ms).min(config.max_deadline))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::from_lookup(|k| match k {
            "FANOUT_UPSTREAM_INVENTORY" | "FANOUT_UPSTREAM_PRICING" | "FANOUT_UPSTREAM_REVIEWS" => {
                Some("http://u.local".into())
            }
            _ => None,
        })
        .unwrap()
    }

    fn item_id(t: Result<Target<'_>, ApiError>) -> String {
        match t.unwrap() {
            Target::Item { params, .. } => params.path[0].1.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn routes_items_and_batches() {
        let config = config();
        assert_eq!(item_id(route(&config, "GET", "/products/42", None)), "42");
        assert_eq!(
            item_id(route(&config, "GET", "/products/Ab_9-z", Some("x=1"))),
            "Ab_9-z"
        );
        match route(&config, "GET", "/products", Some("ids=a,b,a&other=1")).unwrap() {
            Target::Batch { route, items } => {
                assert_eq!(route.path.as_str(), "/products/{id}");
                let ids: Vec<&str> = items.iter().map(|p| p.path[0].1.as_str()).collect();
                assert_eq!(ids, ["a", "b", "a"]);
            }
            other => panic!("{other:?}"),
        }
    }

    /// `/users/{user}/orders/{order}` with a query parameter that has a
    /// default and one that has not, beside `/users/{user}/orders/latest`.
    fn orders() -> Config {
        Config::from_lookup(|k| match k {
            "FANOUT_UPSTREAM_ORDERS" => Some("http://orders.local".into()),
            "FANOUT_CONFIG" => Some(
                r#"{"routes": [
                {"path": "/users/{user}/orders/{order}", "upstreams": [{"name": "orders",
                 "url": "{base}/{user}/{order}?cur={query.currency:EUR}&lang={query.lang}"}]},
                {"path": "/users/{user}/orders/latest", "upstreams": [{"name": "orders",
                 "url": "{base}/{user}/latest"}]}]}"#
                    .into(),
            ),
            _ => None,
        })
        .unwrap()
    }

    #[test]
    fn many_variables_and_query_parameters_fill_the_urls() {
        let config = orders();
        let Target::Item { route, params } = route(
            &config,
            "GET",
            "/users/u-7/orders/42",
            Some("lang=fr+CA&currency=&x=%zz"),
        )
        .unwrap() else {
            panic!("not an item");
        };
        // An empty value is no value: the default applies.
        assert_eq!(
            route.upstreams[0].url(&params),
            "http://orders.local/u-7/42?cur=EUR&lang=fr%20CA"
        );
        let Target::Item { route, .. } =
            route_of(&config, "/users/u-7/orders/latest", None).unwrap()
        else {
            panic!("not an item");
        };
        assert_eq!(route.path.as_str(), "/users/{user}/orders/latest");
        match route_of(&config, "/users/u-7/orders", Some("ids=1,2&lang=de")).unwrap() {
            Target::Batch { route, items } => {
                let urls: Vec<String> = items.iter().map(|p| route.upstreams[0].url(p)).collect();
                assert_eq!(
                    urls,
                    [
                        "http://orders.local/u-7/1?cur=EUR&lang=de",
                        "http://orders.local/u-7/2?cur=EUR&lang=de"
                    ]
                );
            }
            other => panic!("{other:?}"),
        }
    }

    fn route_of<'a>(
        config: &'a Config,
        path: &str,
        query: Option<&str>,
    ) -> Result<Target<'a>, ApiError> {
        route(config, "GET", path, query)
    }

    #[test]
    fn bad_values_are_400_naming_them() {
        let config = orders();
        let long = "a".repeat(MAX_ID_LEN + 1);
        let long_path = format!("/users/{long}/orders/1");
        for (path, mention) in [
            ("/users/a%2Fb/orders/1", "the user contains '%'"),
            ("/users/7/orders/1/2", "the order contains '/'"),
            ("/users/7/orders/1?", "the order contains '?'"),
            ("/users/7/orders/1#x", "the order contains '#'"),
            ("/users/7/orders/a\r\nb", "the order contains '\\r'"),
            ("/users/7/orders/a\nb", "the order contains '\\n'"),
            ("/users//orders/1", "the user is empty"),
            (long_path.as_str(), "the user is 65 characters long"),
        ] {
            let err = route_of(&config, path, Some("lang=fr")).unwrap_err();
            assert_eq!((err.status, err.code), (400, "invalid_id"), "{path:?}");
            assert!(err.message.contains(mention), "{path:?}: {}", err.message);
        }
        let too_long = format!(
            "lang={}",
            "x".repeat(crate::template::MAX_QUERY_VALUE_LEN + 1)
        );
        for (query, mention) in [
            (None, "the query needs lang=<value>"),
            (Some("lang="), "the query needs lang=<value>"),
            (Some("language=fr"), "the query needs lang=<value>"),
            (Some("lang=fr&currency=a%2Fb"), "`currency` contains '/'"),
            (Some("lang=a/b"), "`lang` contains '/'"),
            (Some("lang=a%3Fb"), "`lang` contains '?'"),
            (Some("lang=a%23b"), "`lang` contains '#'"),
            (Some("lang=a%0D%0Ab"), "`lang` contains '\\r'"),
            (Some("lang=%zz"), "not valid percent-encoded UTF-8"),
            (Some("lang=%C3"), "not valid percent-encoded UTF-8"),
            (Some(too_long.as_str()), "at most 256 are allowed"),
        ] {
            let err = route_of(&config, "/users/7/orders/1", query).unwrap_err();
            assert_eq!((err.status, err.code), (400, "invalid_query"), "{query:?}");
            assert!(err.message.contains(mention), "{query:?}: {}", err.message);
        }
    }

    #[test]
    fn unknown_route_is_404_and_wrong_method_405() {
        let config = config();
        for path in ["/", "/product/1", "/productsX/1", "/other/42"] {
            assert_eq!(
                route(&config, "GET", path, None).unwrap_err().code,
                "not_found",
                "{path}"
            );
        }
        for path in ["/products/42", "/products"] {
            let err = route(&config, "POST", path, None).unwrap_err();
            assert_eq!((err.status, err.code), (405, "method_not_allowed"));
        }
    }

    #[test]
    fn malformed_ids_are_400() {
        let config = config();
        let long = "a".repeat(MAX_ID_LEN + 1);
        for bad in [
            "",
            long.as_str(),
            "a b",
            "a/b",
            "%41",
            "é",
            "42;drop",
            "a.b",
        ] {
            let err = route(&config, "GET", &format!("/products/{bad}"), None).unwrap_err();
            assert_eq!((err.status, err.code), (400, "invalid_id"), "{bad:?}");
        }
        assert!(validate_id(&"a".repeat(MAX_ID_LEN)).is_ok());
    }

    #[test]
    fn malformed_batches_are_400() {
        let hundred_and_one = vec!["a"; MAX_BATCH_IDS + 1].join(",");
        let hundred = vec!["a"; MAX_BATCH_IDS].join(",");
        let cases = [
            None,
            Some(""),
            Some("ids="),
            Some("id=a"),
            Some("ids=a,,b"),
            Some("ids=a,b,"),
            Some("ids=a%2Cb"),
            Some("ids=a b"),
        ];
        for query in cases {
            let err = parse_ids(query).unwrap_err();
            assert_eq!((err.status, err.code), (400, "invalid_ids"), "{query:?}");
        }
        let query = format!("ids={hundred_and_one}");
        assert_eq!(parse_ids(Some(&query)).unwrap_err().code, "invalid_ids");
        let query = format!("ids={hundred}");
        assert_eq!(parse_ids(Some(&query)).unwrap().len(), MAX_BATCH_IDS);
    }

    #[test]
    fn budget_may_be_lowered_by_the_client_and_is_capped() {
        let config = config();
        assert_eq!(budget(&config, None).unwrap(), config.deadline);
        assert_eq!(
            budget(&config, Some("50")).unwrap(),
            Duration::from_millis(50)
        );
        // Raising past the configured maximum is capped, not refused.
        assert_eq!(
            budget(&config, Some("999999")).unwrap(),
            config.max_deadline
        );
        for bad in ["0", "-1", "soon", "", "1.5"] {
            let err = budget(&config, Some(bad)).unwrap_err();
            assert_eq!((err.status, err.code), (400, "invalid_timeout"), "{bad:?}");
        }
    }
}
