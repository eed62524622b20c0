//! Merging: each item's upstream answers into one document, and items into
//! the answer a client gets.

use crate::errors::{ApiError, UpstreamFailure};
use serde_json::{Map, Value, json};

/// One upstream's result, labelled with what the merge needs to know.
pub struct Outcome<'a> {
    /// The upstream's logical name.
    pub upstream: &'a str,
    /// The field it fills.
    pub field: &'a str,
    /// Whether its failure fails the item.
    pub required: bool,
    /// Its JSON answer (shaped), or why there is none. For an upstream
    /// called once per element of a list, the list of answers, `null`
    /// where one failed.
    pub result: Result<Value, UpstreamFailure>,
    /// The elements of its list that failed, and why.
    pub failed_elements: Vec<(usize, UpstreamFailure)>,
}

/// One merged item: `{"id", <field>: <upstream JSON or null>..., "degraded"}`
/// (each path variable first, by its name), or the error that failed it.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// The item's path variables, name and value (`[("id", "42")]`).
    pub path: Vec<(String, String)>,
    /// The merged object, or the error that failed the item.
    pub result: Result<Value, ApiError>,
    /// Optional upstreams that failed, in configuration order.
    pub degraded: Vec<String>,
}

/// Ranks failures so that the most telling one is reported: a 404 first (the
/// item does not exist, whatever else went wrong), then a timeout (the
/// client's budget is what ran out), then the rest in upstream order, and
/// last a call not made because another failed (that one says more).
fn rank(f: &UpstreamFailure) -> u8 {
    match f {
        UpstreamFailure::Status(404) => 0,
        UpstreamFailure::Timeout => 1,
        UpstreamFailure::NotCalled(_) => 3,
        _ => 2,
    }
}

/// The most telling failure of `outcomes`, as an error naming its upstream
/// (`pricing[3]` for an element of a list).
fn worst<'a, 'b>(outcomes: impl Iterator<Item = &'b Outcome<'a>>) -> Option<ApiError>
where
    'a: 'b,
{
    outcomes
        .flat_map(|o| {
            let whole = o.result.as_ref().err().map(|f| (o.upstream.to_string(), f));
            let elements = o
                .failed_elements
                .iter()
                .map(|(i, f)| (format!("{}[{i}]", o.upstream), f));
            whole.into_iter().chain(elements)
        })
        .min_by_key(|(_, f)| rank(f))
        .map(|(upstream, failure)| failure.to_api_error(&upstream))
}

/// Merges one item's upstream answers.
///
/// A failed required upstream fails the item. A failed optional upstream
/// leaves its field `null` and is named in `degraded`; a failed element of
/// an optional list is `null` in it and named with its index
/// (`pricing[3]`). If every upstream failed, the item fails even when all
/// were optional: an answer with no data is never a success. An upstream
/// whose field is `"."` has its answer's members merged into the item, in
/// route order, never over a path variable or `degraded`.
pub fn merge(path: &[(String, String)], outcomes: Vec<Outcome<'_>>) -> Item {
    let failed = |result: Result<Value, ApiError>| Item {
        path: path.to_vec(),
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
    let mut answer = identity(path);
    let mut degraded = Vec::new();
    for outcome in outcomes {
        for (i, _) in &outcome.failed_elements {
            degraded.push(format!("{}[{i}]", outcome.upstream));
        }
        let value = match outcome.result {
            Ok(value) => value,
            Err(_) => {
                degraded.push(outcome.upstream.to_string());
                Value::Null
            }
        };
        if outcome.field == "." {
            if let Value::Object(members) = value {
                for (name, value) in members {
                    if name != "degraded" && !path.iter().any(|(var, _)| *var == name) {
                        answer.insert(name, value);
                    }
                }
            }
            continue;
        }
        answer.insert(outcome.field.to_string(), value);
    }
    answer.insert("degraded".into(), json!(degraded));
    Item {
        path: path.to_vec(),
        result: Ok(Value::Object(answer)),
        degraded,
    }
}

/// The object that names an item: its path variables.
fn identity(path: &[(String, String)]) -> Map<String, Value> {
    path.iter()
        .map(|(name, value)| (name.clone(), Value::String(value.clone())))
        .collect()
}

impl Item {
    /// The value of its last path variable (the id of `/products/{id}`).
    pub fn key(&self) -> &str {
        self.path.last().map_or("", |(_, v)| v)
    }
}

/// An answer ready to send: status, JSON body, degraded upstreams.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The HTTP status.
    pub status: u16,
    /// The JSON body.
    pub body: Value,
    /// Optional upstreams that failed (the `x-fanout-degraded` header).
    pub degraded: Vec<String>,
}

impl Answer {
    /// The answer for an error.
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
                    let mut body = identity(&item.path);
                    body.insert("error".into(), error.to_json()["error"].take());
                    let body = Value::Object(body);
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

impl Answer {
    /// The body as JSON bytes; over `max` bytes, the answer becomes a
    /// `502 answer_too_large` instead (a route's `max_body_kib`).
    pub fn into_bytes(self, max: usize) -> (Answer, Vec<u8>) {
        let body = serde_json::to_vec(&self.body).unwrap_or_default();
        if body.len() <= max {
            return (self, body);
        }
        let error = ApiError::new(
            502,
            "answer_too_large",
            format!(
                "the answer would be {} KiB; this route allows at most {} KiB (max_body_kib)",
                body.len().div_ceil(1024),
                max >> 10
            ),
        );
        let answer = Answer::error(&error);
        let body = serde_json::to_vec(&answer.body).unwrap_or_default();
        (answer, body)
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

    fn id(value: &str) -> Vec<(String, String)> {
        vec![("id".into(), value.into())]
    }

    fn ok(upstream: &'static str, required: bool, v: Value) -> Outcome<'static> {
        Outcome {
            upstream,
            field: upstream,
            required,
            result: Ok(v),
            failed_elements: Vec::new(),
        }
    }

    fn failed(upstream: &'static str, required: bool, f: UpstreamFailure) -> Outcome<'static> {
        Outcome {
            upstream,
            field: upstream,
            required,
            result: Err(f),
            failed_elements: Vec::new(),
        }
    }

    #[test]
    fn complete_answer_has_every_field_and_no_degraded() {
        let item = merge(
            &id("42"),
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
            &id("42"),
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
            &id("42"),
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
            &id("42"),
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
            &id("42"),
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
    fn an_answer_over_the_routes_cap_is_a_502() {
        let big = json!({"blob": "x".repeat(2000)});
        let answer = Answer::item(merge(&id("42"), vec![ok("a", true, big)]));
        let (kept, body) = answer.clone().into_bytes(4096);
        assert_eq!((kept.status, body.len() > 2000), (200, true));
        let (refused, body) = answer.into_bytes(1024);
        assert_eq!(refused.status, 502);
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "answer_too_large");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("at most 1 KiB"), "{message}");
    }

    #[test]
    fn failed_elements_of_a_list_degrade_or_fail_by_index() {
        let list = |required| Outcome {
            upstream: "pricing",
            field: "prices",
            required,
            result: Ok(json!([{"p": 1}, null])),
            failed_elements: vec![(1, UpstreamFailure::Status(503))],
        };
        let answer = Answer::item(merge(&id("7"), vec![list(false)]));
        assert_eq!(
            (answer.status, answer.degraded.clone()),
            (200, vec!["pricing[1]".to_string()])
        );
        assert_eq!(answer.body["prices"], json!([{"p": 1}, null]));
        let answer = Answer::item(merge(&id("7"), vec![list(true)]));
        assert_eq!(answer.status, 502);
        assert_eq!(answer.body["error"]["upstream"], "pricing[1]");
    }

    #[test]
    fn all_upstreams_failing_is_never_a_200() {
        let answer = Answer::item(merge(
            &id("42"),
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
                &id("a"),
                vec![
                    ok("inventory", true, json!({})),
                    failed("reviews", false, UpstreamFailure::Timeout),
                ],
            ),
            merge(
                &id("b"),
                vec![
                    failed("inventory", true, UpstreamFailure::Status(404)),
                    ok("reviews", false, json!({})),
                ],
            ),
            merge(
                &id("c"),
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
                &id("a"),
                vec![failed("inventory", true, UpstreamFailure::Status(503))],
            ),
            merge(
                &id("b"),
                vec![failed("inventory", true, UpstreamFailure::Timeout)],
            ),
        ]);
        assert_eq!(all_failed.status, 504);
        assert_eq!(all_failed.body["error"]["code"], "upstream_timeout");
        assert_eq!(all_failed.body["items"].as_array().unwrap().len(), 2);
    }
}
