//! The HTTP contract of the guest: routes, input validation, the merged
//! answer and the one error shape.

use serde_json::{Map, Value, json};

/// Longest product id accepted.
pub const MAX_ID_LEN: usize = 64;

/// What an incoming request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /products/{id}` with a valid id.
    Product(String),
}

/// A JSON error answer: `{"error": {"code", "message", "upstream"?}}`.
///
/// Clients and tests rely on `code` (stable, snake_case); `message` is for
/// people and may change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub upstream: Option<String>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            upstream: None,
        }
    }

    pub fn for_upstream(mut self, upstream: &str) -> ApiError {
        self.upstream = Some(upstream.to_string());
        self
    }

    pub fn to_json(&self) -> Value {
        let mut error = Map::new();
        error.insert("code".into(), json!(self.code));
        error.insert("message".into(), json!(self.message));
        if let Some(upstream) = &self.upstream {
            error.insert("upstream".into(), json!(upstream));
        }
        json!({ "error": error })
    }
}

/// Maps method and path to a route, or to the error a client should see.
/// The query string, if any, must already be stripped from `path`.
pub fn route(method: &str, path: &str) -> Result<Route, ApiError> {
    let Some(id) = path.strip_prefix("/products/") else {
        return Err(ApiError::new(
            404,
            "not_found",
            format!("no route for {path}; try GET /products/{{id}}"),
        ));
    };
    if method != "GET" {
        return Err(ApiError::new(
            405,
            "method_not_allowed",
            format!("{method} is not allowed on /products/{{id}}; use GET"),
        ));
    }
    validate_id(id)?;
    Ok(Route::Product(id.to_string()))
}

/// A product id is 1 to 64 characters of `[A-Za-z0-9_-]`. Anything else is
/// refused before an upstream is called, so ids are safe to put in paths.
pub fn validate_id(id: &str) -> Result<(), ApiError> {
    let invalid = |why: String| ApiError::new(400, "invalid_id", why);
    if id.is_empty() {
        return Err(invalid("the product id is empty".into()));
    }
    if id.len() > MAX_ID_LEN {
        return Err(invalid(format!(
            "the product id is {} characters long; at most {MAX_ID_LEN} are allowed",
            id.len()
        )));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(invalid(format!(
            "the product id contains {c:?}; only A-Z, a-z, 0-9, '-' and '_' are allowed"
        )));
    }
    Ok(())
}

/// Why one upstream call produced no usable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// The request's budget ran out before the upstream answered.
    Timeout,
    /// The upstream answered with a non-2xx status.
    Status(u16),
    /// The call failed below HTTP (refused, denied by the host, reset...).
    Transport(String),
    /// The upstream answered 2xx with a body that is not a JSON object.
    InvalidBody(String),
}

impl UpstreamFailure {
    /// The answer a client sees when a required upstream fails this way.
    pub fn to_api_error(&self, upstream: &str) -> ApiError {
        let error = match self {
            UpstreamFailure::Timeout => ApiError::new(
                504,
                "upstream_timeout",
                format!("{upstream} did not answer within the request's deadline"),
            ),
            UpstreamFailure::Status(404) => ApiError::new(
                404,
                "product_not_found",
                format!("{upstream} does not know this product"),
            ),
            UpstreamFailure::Status(status) => ApiError::new(
                502,
                "upstream_error",
                format!("{upstream} answered HTTP {status}"),
            ),
            UpstreamFailure::Transport(why) => ApiError::new(
                502,
                "upstream_unavailable",
                format!("{upstream} could not be reached: {why}"),
            ),
            UpstreamFailure::InvalidBody(why) => ApiError::new(
                502,
                "upstream_invalid_response",
                format!("{upstream} answered with an unusable body: {why}"),
            ),
        };
        error.for_upstream(upstream)
    }
}

/// Parses an upstream's 2xx body: it must be a JSON object.
pub fn parse_upstream_body(body: &[u8]) -> Result<Value, UpstreamFailure> {
    match serde_json::from_slice::<Value>(body) {
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(_) => Err(UpstreamFailure::InvalidBody("not a JSON object".into())),
        Err(e) => Err(UpstreamFailure::InvalidBody(format!("invalid JSON: {e}"))),
    }
}

/// One upstream's result, labelled with the upstream's name and the field of
/// the answer it fills.
pub struct Outcome<'a> {
    pub upstream: &'a str,
    pub field: &'a str,
    pub result: Result<Value, UpstreamFailure>,
}

/// Merges the upstreams' answers into `{"id", <field>: <upstream JSON>...}`.
///
/// Every upstream is required: if any failed, the answer is that failure. A
/// 404 wins over the others (the product does not exist, whatever else went
/// wrong), then a timeout (the client's budget is what ran out), then the
/// first failure in upstream order.
pub fn merge(id: &str, outcomes: Vec<Outcome<'_>>) -> Result<Value, ApiError> {
    let rank = |f: &UpstreamFailure| match f {
        UpstreamFailure::Status(404) => 0,
        UpstreamFailure::Timeout => 1,
        _ => 2,
    };
    let worst = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().err().map(|f| (o.upstream, f)))
        .min_by_key(|(_, f)| rank(f));
    if let Some((upstream, failure)) = worst {
        return Err(failure.to_api_error(upstream));
    }
    let mut answer = Map::new();
    answer.insert("id".into(), json!(id));
    for outcome in outcomes {
        if let Ok(value) = outcome.result {
            answer.insert(outcome.field.to_string(), value);
        }
    }
    Ok(Value::Object(answer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_products() {
        assert_eq!(
            route("GET", "/products/42"),
            Ok(Route::Product("42".into()))
        );
        assert_eq!(
            route("GET", "/products/Ab_9-z"),
            Ok(Route::Product("Ab_9-z".into()))
        );
    }

    #[test]
    fn unknown_route_is_404_and_wrong_method_405() {
        assert_eq!(route("GET", "/").unwrap_err().status, 404);
        assert_eq!(route("GET", "/products").unwrap_err().status, 404);
        assert_eq!(route("GET", "/other/42").unwrap_err().code, "not_found");
        let err = route("POST", "/products/42").unwrap_err();
        assert_eq!((err.status, err.code), (405, "method_not_allowed"));
    }

    #[test]
    fn malformed_ids_are_400() {
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
            let err = route("GET", &format!("/products/{bad}")).unwrap_err();
            assert_eq!((err.status, err.code), (400, "invalid_id"), "{bad:?}");
        }
        assert!(validate_id(&"a".repeat(MAX_ID_LEN)).is_ok());
    }

    #[test]
    fn error_shape_is_stable() {
        let err = UpstreamFailure::Timeout.to_api_error("pricing");
        let body = err.to_json();
        assert_eq!(body["error"]["code"], "upstream_timeout");
        assert_eq!(body["error"]["upstream"], "pricing");
        assert!(body["error"]["message"].is_string());
        let plain = ApiError::new(404, "not_found", "x").to_json();
        assert!(plain["error"].get("upstream").is_none());
    }

    fn ok(upstream: &'static str, field: &'static str, v: Value) -> Outcome<'static> {
        Outcome {
            upstream,
            field,
            result: Ok(v),
        }
    }

    fn failed(upstream: &'static str, f: UpstreamFailure) -> Outcome<'static> {
        Outcome {
            upstream,
            field: upstream,
            result: Err(f),
        }
    }

    #[test]
    fn merge_fills_each_field() {
        let merged = merge(
            "42",
            vec![
                ok("inventory", "inventory", json!({"in_stock": true})),
                ok("pricing", "price", json!({"amount": 9.5})),
                ok("reviews", "reviews", json!({"rating": 4.5})),
            ],
        )
        .unwrap();
        assert_eq!(
            merged,
            json!({"id": "42", "inventory": {"in_stock": true},
                   "price": {"amount": 9.5}, "reviews": {"rating": 4.5}})
        );
    }

    #[test]
    fn merge_picks_the_most_telling_failure() {
        let err = merge(
            "42",
            vec![
                failed("inventory", UpstreamFailure::Status(500)),
                failed("pricing", UpstreamFailure::Timeout),
                ok("reviews", "reviews", json!({})),
            ],
        )
        .unwrap_err();
        assert_eq!(
            (err.status, err.upstream.as_deref()),
            (504, Some("pricing"))
        );

        let err = merge(
            "42",
            vec![
                failed("inventory", UpstreamFailure::Timeout),
                failed("pricing", UpstreamFailure::Status(404)),
            ],
        )
        .unwrap_err();
        assert_eq!((err.status, err.code), (404, "product_not_found"));

        let err = merge(
            "42",
            vec![
                failed("inventory", UpstreamFailure::Transport("refused".into())),
                failed("pricing", UpstreamFailure::Status(503)),
            ],
        )
        .unwrap_err();
        assert_eq!(
            (err.status, err.code, err.upstream.as_deref()),
            (502, "upstream_unavailable", Some("inventory"))
        );
    }

    #[test]
    fn upstream_bodies_must_be_objects() {
        assert!(parse_upstream_body(br#"{"a":1}"#).is_ok());
        for bad in [&b"[1]"[..], b"42", b"not json", b""] {
            assert!(matches!(
                parse_upstream_body(bad),
                Err(UpstreamFailure::InvalidBody(_))
            ));
        }
    }
}
