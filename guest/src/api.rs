//! The HTTP contract of the guest: routes, input validation, the merged
//! answer and the one error shape.

use serde_json::{Map, Value, json};

use crate::config::{Config, MAX_BATCH_IDS, Route};
use std::time::Duration;

/// Longest item id accepted.
pub const MAX_ID_LEN: usize = 64;

/// Header with which a client lowers the request's budget, in milliseconds.
pub const TIMEOUT_HEADER: &str = "x-request-timeout-ms";
/// Header on an answer that lacks an optional upstream's part, naming the
/// upstreams that failed (comma-separated).
pub const DEGRADED_HEADER: &str = "x-fanout-degraded";

/// Prefix of the headers in which the guest leaves hints for the host on
/// its outgoing requests. The fanout host reads and strips them; any other
/// host just forwards them.
pub const HINT_PREFIX: &str = "x-fanout-hint-";
/// The upstream's logical name.
pub const HINT_UPSTREAM: &str = "x-fanout-hint-upstream";
/// The attempt's number: 1, then 2 and up for retries.
pub const HINT_ATTEMPT: &str = "x-fanout-hint-attempt";

/// What an incoming request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target<'a> {
    /// `GET <collection>/{id}`.
    Item { route: &'a Route, id: String },
    /// `GET <collection>?ids=a,b,c`.
    Batch { route: &'a Route, ids: Vec<String> },
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

/// Why one upstream call produced no usable answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// The request's budget ran out before the upstream answered.
    Timeout,
    /// The upstream answered with a non-2xx status.
    Status(u16),
    /// The call failed below HTTP (refused, reset, unreachable...).
    Transport(String),
    /// The host refused the request: the upstream is not configured
    /// (`HttpRequestDenied`).
    Denied,
    /// The host shed the request without sending it: the upstream's
    /// concurrency limit or retry budget is used up, or its circuit is open
    /// (`ConnectionLimitReached`, `DestinationUnavailable`).
    Shed(String),
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
                "item_not_found",
                format!("{upstream} does not know this id"),
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
            UpstreamFailure::Denied => ApiError::new(
                502,
                "upstream_denied",
                format!("the host does not allow calls to {upstream}'s address"),
            ),
            UpstreamFailure::Shed(why) => ApiError::new(
                503,
                "upstream_shed",
                format!("the host shed the call to {upstream}: {why}"),
            ),
        };
        error.for_upstream(upstream)
    }
}

/// Parses an upstream's 2xx body: it must be a JSON object.
/// The largest upstream answer the guest reads. An upstream's answer is one
/// JSON object merged into one field; a bigger one is refused as invalid (that
/// upstream fails, and the answer degrades if it is optional) rather than left
/// to exhaust the instance's fuel (the whole request fails). Reading, parsing
/// and writing an answer back out costs about 27 fuel a byte: the host's
/// default 10M fuel holds one answer this size with room to spare, and a
/// request whose answers add up to much more needs more fuel.
pub const MAX_UPSTREAM_BODY: usize = 256 << 10;

pub fn parse_upstream_body(body: &[u8]) -> Result<Value, UpstreamFailure> {
    match serde_json::from_slice::<Value>(body) {
        Ok(value @ Value::Object(_)) => Ok(value),
        Ok(_) => Err(UpstreamFailure::InvalidBody("not a JSON object".into())),
        Err(e) => Err(UpstreamFailure::InvalidBody(format!("invalid JSON: {e}"))),
    }
}

/// One upstream's result, labelled with what the merge needs to know.
pub struct Outcome<'a> {
    pub upstream: &'a str,
    pub field: &'a str,
    pub required: bool,
    pub result: Result<Value, UpstreamFailure>,
}

/// One merged item: `{"id", <field>: <upstream JSON or null>..., "degraded"}`,
/// or the error that failed it.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub id: String,
    pub result: Result<Value, ApiError>,
    /// Optional upstreams that failed, in configuration order.
    pub degraded: Vec<String>,
}

/// Ranks failures so that the most telling one is reported: a 404 first (the
/// item does not exist, whatever else went wrong), then a timeout (the
/// client's budget is what ran out), then the rest in upstream order.
fn rank(f: &UpstreamFailure) -> u8 {
    match f {
        UpstreamFailure::Status(404) => 0,
        UpstreamFailure::Timeout => 1,
        _ => 2,
    }
}

fn worst<'a, 'b>(outcomes: impl Iterator<Item = &'b Outcome<'a>>) -> Option<ApiError>
where
    'a: 'b,
{
    outcomes
        .filter_map(|o| o.result.as_ref().err().map(|f| (o.upstream, f)))
        .min_by_key(|(_, f)| rank(f))
        .map(|(upstream, failure)| failure.to_api_error(upstream))
}

/// Merges one item's upstream answers.
///
/// A failed required upstream fails the item. A failed optional upstream
/// leaves its field `null` and is named in `degraded`. If every upstream
/// failed, the item fails even when all were optional: an answer with no
/// data is never a success.
pub fn merge(id: &str, outcomes: Vec<Outcome<'_>>) -> Item {
    let failed = |result: Result<Value, ApiError>| Item {
        id: id.to_string(),
        result,
        degraded: Vec::new(),
    };
    if let Some(error) = worst(outcomes.iter().filter(|o| o.required)) {
        return failed(Err(error));
    }
    if outcomes.iter().all(|o| o.result.is_err())
        && let Some(error) = worst(outcomes.iter())
    {
        return failed(Err(error));
    }
    let mut answer = Map::new();
    answer.insert("id".into(), json!(id));
    let mut degraded = Vec::new();
    for outcome in outcomes {
        let value = match outcome.result {
            Ok(value) => value,
            Err(_) => {
                degraded.push(outcome.upstream.to_string());
                Value::Null
            }
        };
        answer.insert(outcome.field.to_string(), value);
    }
    answer.insert("degraded".into(), json!(degraded));
    Item {
        id: id.to_string(),
        result: Ok(Value::Object(answer)),
        degraded,
    }
}

/// An answer ready to send: status, JSON body, degraded upstreams.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub degraded: Vec<String>,
}

impl Answer {
    pub fn error(error: &ApiError) -> Answer {
        Answer {
            status: error.status,
            body: error.to_json(),
            degraded: Vec::new(),
        }
    }

    /// The answer to `GET <collection>/{id}`.
    pub fn item(item: Item) -> Answer {
        match item.result {
            Ok(body) => Answer {
                status: 200,
                body,
                degraded: item.degraded,
            },
            Err(error) => Answer::error(&error),
        }
    }

    /// The answer to a batch: `{"items": [...]}` in the order of the ids,
    /// each item its merged object or `{"id", "error"}`. It is a 200 if any
    /// item succeeded; otherwise the most telling item error, with the items.
    pub fn batch(items: Vec<Item>) -> Answer {
        let mut degraded: Vec<String> = Vec::new();
        let mut first_error: Option<ApiError> = None;
        let mut any_ok = false;
        let values: Vec<Value> = items
            .into_iter()
            .map(|item| match item.result {
                Ok(value) => {
                    any_ok = true;
                    for name in item.degraded {
                        if !degraded.contains(&name) {
                            degraded.push(name);
                        }
                    }
                    value
                }
                Err(error) => {
                    let body = json!({ "id": item.id, "error": error.to_json()["error"] });
                    let better = match &first_error {
                        None => true,
                        Some(e) => error_rank(&error) < error_rank(e),
                    };
                    if better {
                        first_error = Some(error);
                    }
                    body
                }
            })
            .collect();
        match (any_ok, first_error) {
            (false, Some(error)) => {
                let mut body = error.to_json();
                body["items"] = Value::Array(values);
                Answer {
                    status: error.status,
                    body,
                    degraded,
                }
            }
            _ => Answer {
                status: 200,
                body: json!({ "items": values }),
                degraded,
            },
        }
    }
}

fn error_rank(e: &ApiError) -> u8 {
    match e.status {
        404 => 0,
        504 => 1,
        _ => 2,
    }
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

    fn ok(upstream: &'static str, required: bool, v: Value) -> Outcome<'static> {
        Outcome {
            upstream,
            field: upstream,
            required,
            result: Ok(v),
        }
    }

    fn failed(upstream: &'static str, required: bool, f: UpstreamFailure) -> Outcome<'static> {
        Outcome {
            upstream,
            field: upstream,
            required,
            result: Err(f),
        }
    }

    #[test]
    fn complete_answer_has_every_field_and_no_degraded() {
        let item = merge(
            "42",
            vec![
                ok("inventory", true, json!({"in_stock": true})),
                ok("reviews", false, json!({"rating": 4.5})),
            ],
        );
        let answer = Answer::item(item);
        assert_eq!(answer.status, 200);
        assert!(answer.degraded.is_empty());
        assert_eq!(
            answer.body,
            json!({"id": "42", "inventory": {"in_stock": true},
                   "reviews": {"rating": 4.5}, "degraded": []})
        );
    }

    #[test]
    fn failed_optional_upstream_degrades() {
        let item = merge(
            "42",
            vec![
                ok("inventory", true, json!({"in_stock": true})),
                failed("reviews", false, UpstreamFailure::Timeout),
            ],
        );
        let answer = Answer::item(item);
        assert_eq!(answer.status, 200);
        assert_eq!(answer.degraded, ["reviews"]);
        assert_eq!(answer.body["reviews"], Value::Null);
        assert_eq!(answer.body["degraded"], json!(["reviews"]));
    }

    #[test]
    fn failed_required_upstream_fails_with_the_most_telling_error() {
        let answer = Answer::item(merge(
            "42",
            vec![
                failed("inventory", true, UpstreamFailure::Status(500)),
                failed("pricing", true, UpstreamFailure::Timeout),
                ok("reviews", false, json!({})),
            ],
        ));
        assert_eq!(
            (answer.status, &answer.body["error"]["upstream"]),
            (504, &json!("pricing"))
        );

        let answer = Answer::item(merge(
            "42",
            vec![
                failed("inventory", true, UpstreamFailure::Timeout),
                failed("pricing", true, UpstreamFailure::Status(404)),
            ],
        ));
        assert_eq!(
            (answer.status, &answer.body["error"]["code"]),
            (404, &json!("item_not_found"))
        );

        // An optional upstream's failure does not decide the error.
        let answer = Answer::item(merge(
            "42",
            vec![
                failed(
                    "inventory",
                    true,
                    UpstreamFailure::Transport("refused".into()),
                ),
                failed("reviews", false, UpstreamFailure::Status(404)),
            ],
        ));
        assert_eq!(
            (
                answer.status,
                answer.body["error"]["code"].as_str(),
                answer.body["error"]["upstream"].as_str()
            ),
            (502, Some("upstream_unavailable"), Some("inventory"))
        );
    }

    #[test]
    fn all_upstreams_failing_is_never_a_200() {
        let answer = Answer::item(merge(
            "42",
            vec![
                failed("a", false, UpstreamFailure::Status(503)),
                failed("b", false, UpstreamFailure::Timeout),
            ],
        ));
        assert_eq!(answer.status, 504);
        assert_eq!(answer.body["error"]["upstream"], "b");
    }

    #[test]
    fn batches_keep_order_and_per_item_state() {
        let items = vec![
            merge(
                "a",
                vec![
                    ok("inventory", true, json!({})),
                    failed("reviews", false, UpstreamFailure::Timeout),
                ],
            ),
            merge(
                "b",
                vec![
                    failed("inventory", true, UpstreamFailure::Status(404)),
                    ok("reviews", false, json!({})),
                ],
            ),
            merge(
                "c",
                vec![
                    ok("inventory", true, json!({})),
                    ok("reviews", false, json!({})),
                ],
            ),
        ];
        let answer = Answer::batch(items);
        assert_eq!(answer.status, 200);
        assert_eq!(answer.degraded, ["reviews"]);
        let items = answer.body["items"].as_array().unwrap();
        let ids: Vec<&str> = items.iter().map(|i| i["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(items[0]["degraded"], json!(["reviews"]));
        assert_eq!(items[1]["error"]["code"], "item_not_found");
        assert_eq!(items[2]["degraded"], json!([]));

        let all_failed = Answer::batch(vec![
            merge(
                "a",
                vec![failed("inventory", true, UpstreamFailure::Status(503))],
            ),
            merge(
                "b",
                vec![failed("inventory", true, UpstreamFailure::Timeout)],
            ),
        ]);
        assert_eq!(all_failed.status, 504);
        assert_eq!(all_failed.body["error"]["code"], "upstream_timeout");
        assert_eq!(all_failed.body["items"].as_array().unwrap().len(), 2);
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
