//! The HTTP contract of the guest: routes, input validation and the
//! request's budget. Errors are [`ApiError`]s, answers are built in
//! [`merge`](crate::merge).

use crate::config::{Config, MAX_BATCH_IDS, Route};
use crate::errors::ApiError;
use crate::protocol::TIMEOUT_HEADER;
use std::time::Duration;

/// Longest item id accepted.
pub const MAX_ID_LEN: usize = 64;

/// What an incoming request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target<'a> {
    /// `GET <collection>/{id}`.
    Item {
        /// The route it matched.
        route: &'a Route,
        /// The item's id, validated.
        id: String,
    },
    /// `GET <collection>?ids=a,b,c`.
    Batch {
        /// The route it matched.
        route: &'a Route,
        /// The ids, validated, in the order asked for.
        ids: Vec<String>,
    },
}

/// Maps method, path and query to a configured route, or to the error a
/// client should see.
pub fn route<'a>(
    config: &'a Config,
    method: &str,
    path: &str,
    query: Option<&str>,
) -> Result<Target<'a>, ApiError> {
    let not_found = || {
        let routes: Vec<String> = config
            .routes
            .iter()
            .map(|r| format!("GET {0}/{{id}}, GET {0}?ids=a,b", r.collection))
            .collect();
        ApiError::new(
            404,
            "not_found",
            format!("no route for {path}; try {}", routes.join(", ")),
        )
    };
    // The longest collection that prefixes the path wins.
    let item = config
        .routes
        .iter()
        .filter_map(|r| {
            path.strip_prefix(r.collection.as_str())
                .and_then(|rest| rest.strip_prefix('/'))
                .map(|id| (r, id))
        })
        .max_by_key(|(r, _)| r.collection.len());
    let target = match item {
        Some((route, id)) => Ok((route, Some(id))),
        None => match config.route(path) {
            Some(route) => Ok((route, None)),
            None => Err(not_found()),
        },
    }?;
    if method != "GET" {
        return Err(ApiError::new(
            405,
            "method_not_allowed",
            format!("{method} is not allowed on {path}; use GET"),
        ));
    }
    match target {
        (route, Some(id)) => {
            validate_id(id)?;
            Ok(Target::Item {
                route,
                id: id.to_string(),
            })
        }
        (route, None) => Ok(Target::Batch {
            route,
            ids: parse_ids(query)?,
        }),
    }
}

/// An id is 1 to 64 characters of `[A-Za-z0-9_-]`. Anything else is refused
/// before an upstream is called, so ids are safe to put in URLs.
pub fn validate_id(id: &str) -> Result<(), ApiError> {
    let invalid = |why: String| ApiError::new(400, "invalid_id", why);
    if id.is_empty() {
        return Err(invalid("the id is empty".into()));
    }
    if id.len() > MAX_ID_LEN {
        return Err(invalid(format!(
            "the id is {} characters long; at most {MAX_ID_LEN} are allowed",
            id.len()
        )));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(invalid(format!(
            "the id contains {c:?}; only A-Z, a-z, 0-9, '-' and '_' are allowed"
        )));
    }
    Ok(())
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
            Target::Item { id, .. } => id,
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
            Target::Batch { route, ids } => {
                assert_eq!(route.collection, "/products");
                assert_eq!(ids, ["a", "b", "a"]);
            }
            other => panic!("{other:?}"),
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
