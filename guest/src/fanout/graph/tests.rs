//! The aggregation model on the virtual clock: dependent calls, lists,
//! batches, shaping and de-duplication.

use super::super::fake::{FakeEnv, MS, run_on};
use super::super::{Budget, Gathered, fan_out};
use crate::config::{Config, MAX_CALLS};
use crate::errors::UpstreamFailure;
use crate::merge::Answer;
use crate::template::Params;
use crate::trace::TraceContext;
use serde_json::{Value, json};
use std::time::Duration;

const TRACE: TraceContext = TraceContext {
    trace_id: [7; 16],
    parent_id: [1; 8],
    flags: 1,
};

fn config(routes: Value) -> Config {
    let json = json!({"deadline_ms": 1000, "max_in_flight": 64, "routes": routes}).to_string();
    Config::from_lookup(|key| (key == "FANOUT_CONFIG").then(|| json.clone())).unwrap()
}

fn config_error(routes: Value) -> String {
    let json = json!({"routes": routes}).to_string();
    let err = Config::from_lookup(|key| (key == "FANOUT_CONFIG").then(|| json.clone()));
    err.unwrap_err().to_string()
}

fn ids(ids: &[&str]) -> Vec<Params> {
    ids.iter()
        .map(|id| Params {
            path: vec![("id".into(), id.to_string())],
            query: Vec::new(),
        })
        .collect()
}

fn gather(env: &FakeEnv, config: &Config, items: &[Params]) -> Gathered {
    let budget = Budget::starting_at(Duration::ZERO, config.deadline);
    run_on(
        env,
        fan_out(env, config, &config.routes[0], items, budget, &TRACE),
    )
}

fn ask(env: &FakeEnv, config: &Config, id: &str) -> Answer {
    let mut gathered = gather(env, config, &ids(&[id]));
    Answer::item(gathered.items.remove(0))
}

/// When each URL was called, in ms from the start.
fn started(env: &FakeEnv, url: &str) -> Vec<u128> {
    env.calls
        .borrow()
        .iter()
        .filter(|(u, _, _)| u == url)
        .map(|(_, at, _)| at.as_millis())
        .collect()
}

#[test]
fn a_call_starts_when_its_inputs_are_in_not_stage_by_stage() {
    // A (50 ms) -> C (50 ms), and B (80 ms) alongside: C starts at 50,
    // when A ends, not at 80 when B ends; the item takes 100 ms, not 130
    // (stages) or 150 (one after another).
    let config = config(json!([{"path": "/p/{id}", "upstreams": [
        {"name": "a", "url": "http://a/{id}"},
        {"name": "b", "url": "http://b/{id}"},
        {"name": "c", "url": "http://c/{a.next}"}
    ]}]));
    let env = FakeEnv::new(vec![]);
    env.serve("http://a/1", 50, Ok(json!({"next": "x"})));
    env.serve("http://b/1", 80, Ok(json!({"b": 1})));
    env.serve("http://c/x", 50, Ok(json!({"c": 1})));
    let answer = ask(&env, &config, "1");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(started(&env, "http://a/1"), [0]);
    assert_eq!(started(&env, "http://b/1"), [0]);
    assert_eq!(started(&env, "http://c/x"), [50]);
    assert_eq!(env.now.get(), MS(100));
    assert_eq!(answer.body["c"], json!({"c": 1}));
}

#[test]
fn a_missing_or_unusable_input_fails_the_call_like_an_upstream_error() {
    let routes = |required: bool| {
        json!([{"path": "/p/{id}", "upstreams": [
            {"name": "a", "url": "http://a/{id}"},
            {"name": "c", "url": "http://c/{a.next}", "required": required}
        ]}])
    };
    for (a_answer, why) in [
        (json!({}), "a.next is missing"),
        (
            json!({"next": {"x": 1}}),
            "a.next is not a string or a number",
        ),
        (
            json!({"next": "../admin"}),
            "a.next is unusable: it contains '/'",
        ),
    ] {
        // Required: the item fails, naming the upstream not called.
        let env = FakeEnv::new(vec![]);
        env.serve("http://a/1", 1, Ok(a_answer.clone()));
        let answer = ask(&env, &config(routes(true)), "1");
        assert_eq!(answer.status, 502, "{}", answer.body);
        assert_eq!(answer.body["error"]["code"], "upstream_not_called");
        assert_eq!(answer.body["error"]["upstream"], "c");
        let message = answer.body["error"]["message"].as_str().unwrap();
        assert!(message.contains(why), "{message}");
        assert_eq!(env.calls.borrow().len(), 1, "c is never called");
        // Optional: degraded.
        let env = FakeEnv::new(vec![]);
        env.serve("http://a/1", 1, Ok(a_answer));
        let answer = ask(&env, &config(routes(false)), "1");
        assert_eq!(
            (answer.status, answer.degraded.clone()),
            (200, vec!["c".to_string()])
        );
    }
    // The input's upstream failed: its own error is the one reported.
    let env = FakeEnv::new(vec![]);
    env.serve("http://a/1", 1, Err(UpstreamFailure::Status(404)));
    let answer = ask(&env, &config(routes(true)), "1");
    assert_eq!(answer.body["error"]["code"], "item_not_found");
    assert_eq!(answer.body["error"]["upstream"], "a");
}

#[test]
fn cycles_and_unknown_references_are_configuration_errors() {
    let err = config_error(json!([{"path": "/p/{id}", "upstreams": [
        {"name": "a", "url": "http://a/{c.x}"},
        {"name": "b", "url": "http://b/{id}"},
        {"name": "c", "url": "http://c/{a.y}"}
    ]}]));
    assert!(
        err.contains("routes[0].upstreams[0].url") && err.contains("a -> c -> a"),
        "{err}"
    );
    let err = config_error(json!([{"path": "/p/{id}", "upstreams": [
        {"name": "a", "url": "http://a/{a.self}"}]}]));
    assert!(err.contains("a -> a"), "{err}");
    let err = config_error(json!([{"path": "/p/{id}", "upstreams": [
        {"name": "a", "url": "http://a/{nope.x}"}]}]));
    assert!(
        err.contains("routes[0].upstreams[0].url") && err.contains("`nope`"),
        "{err}"
    );
    for (upstream, key, why) in [
        (
            json!({"name": "b", "url": "http://b/{each}", "each": "nope.lines[]"}),
            "each",
            "`nope`",
        ),
        (
            json!({"name": "b", "url": "http://b/{each}", "each": "a.lines"}),
            "each",
            "no list",
        ),
        (
            json!({"name": "b", "url": "http://b/{each}", "each": "a"}),
            "each",
            "then a list",
        ),
        (
            json!({"name": "b", "url": "http://b/x", "each": "a.lines[]"}),
            "url",
            "the same call",
        ),
        (
            json!({"name": "b", "url": "http://b/{each}"}),
            "url",
            "no `each`",
        ),
        (
            json!({"name": "b", "url": "http://b/{id}", "batch": {"param": "ids"}}),
            "batch",
            "needs `each`",
        ),
        (
            json!({"name": "b", "url": "http://b/{each}", "each": "a.l[]", "batch": {"param": "ids"}}),
            "url",
            "?param=",
        ),
        (
            json!({"name": "b", "url": "http://b/", "each": "a.l[]", "batch": {"param": "ids", "max": 101}}),
            "batch.max",
            "1..=100",
        ),
        (
            json!({"name": "b", "url": "http://b/{each}", "each": "a.l[]", "max_items": 0}),
            "max_items",
            "1..=1000",
        ),
        (
            json!({"name": "b", "url": "http://b/{each}", "each": "a.l[]", "max_items": 1000}),
            "",
            "1001 calls",
        ),
        (
            json!({"name": "b", "url": "http://b/{each}", "each": "a.l[]", "field": "."}),
            "field",
            "a list cannot",
        ),
        (
            json!({"name": "b", "url": "http://b/{id}", "select": ["a[].b[]"]}),
            "select",
            "at most 1 []",
        ),
        (
            json!({"name": "b", "url": "http://b/{id}", "rename": {"a[]": "b"}}),
            "rename",
            "not allowed",
        ),
        (
            json!({"name": "each", "url": "http://b/{id}"}),
            "name",
            "reserved",
        ),
    ] {
        let err = config_error(json!([{"path": "/p/{id}", "upstreams": [
            {"name": "a", "url": "http://a/{id}"}, upstream]}]));
        let at = match key {
            "" => "routes[0].upstreams:".to_string(),
            key => format!("routes[0].upstreams[1].{key}"),
        };
        assert!(err.contains(&at) && err.contains(why), "{err}");
    }
    let err = config_error(json!([{"path": "/p/{id}", "max_body_kib": 0, "upstreams": [
        {"name": "a", "url": "http://a/{id}"}]}]));
    assert!(err.contains("routes[0].max_body_kib"), "{err}");
}

/// An order whose lines are priced one call per line.
fn lines_route(pricing: Value) -> Config {
    let mut pricing = pricing;
    pricing["name"] = json!("pricing");
    pricing["each"] = json!("order.lines[].sku");
    config(json!([{"path": "/orders/{id}", "upstreams": [
        {"name": "order", "url": "http://o/{id}"}, pricing]}]))
}

#[test]
fn a_list_is_called_element_by_element_in_order_each_failing_alone() {
    let config = lines_route(json!({"url": "http://p/{each}", "required": false}));
    let env = FakeEnv::new(vec![]);
    env.serve(
        "http://o/7",
        10,
        Ok(json!({"lines": [{"sku": "a"}, {"sku": "b"}, {"sku": "c"}, {"qty": 1}]})),
    );
    // The first answers last: the list keeps the order of the lines.
    env.serve("http://p/a", 30, Ok(json!({"price": 1})));
    env.serve("http://p/b", 1, Err(UpstreamFailure::Status(500)));
    env.serve("http://p/c", 10, Ok(json!({"price": 3})));
    let answer = ask(&env, &config, "7");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.body["pricing"],
        json!([{"price": 1}, null, {"price": 3}, null])
    );
    assert_eq!(answer.degraded, ["pricing[1]", "pricing[3]"]);
    // All three started together, when the order came in.
    for sku in ["a", "b", "c"] {
        assert_eq!(started(&env, &format!("http://p/{sku}")), [10]);
    }

    // Required: one failed element fails the item, naming it.
    let config = lines_route(json!({"url": "http://p/{each}"}));
    let env = FakeEnv::new(vec![]);
    env.serve(
        "http://o/7",
        1,
        Ok(json!({"lines": [{"sku": "a"}, {"sku": "b"}]})),
    );
    env.serve("http://p/a", 1, Ok(json!({"price": 1})));
    env.serve("http://p/b", 1, Err(UpstreamFailure::Status(404)));
    let answer = ask(&env, &config, "7");
    assert_eq!(answer.status, 404, "{}", answer.body);
    assert_eq!(answer.body["error"]["upstream"], "pricing[1]");

    // An empty list calls nothing and is an empty list.
    let env = FakeEnv::new(vec![]);
    env.serve("http://o/7", 1, Ok(json!({"lines": []})));
    let answer = ask(&env, &config, "7");
    assert_eq!((answer.status, &answer.body["pricing"]), (200, &json!([])));
    assert_eq!(env.calls.borrow().len(), 1);
}

#[test]
fn a_list_longer_than_max_items_fails_that_upstream() {
    let config = lines_route(json!({"url": "http://p/{each}", "max_items": 2, "required": false}));
    let env = FakeEnv::new(vec![]);
    env.serve(
        "http://o/7",
        1,
        Ok(json!({"lines": [{"sku": "a"}, {"sku": "b"}, {"sku": "c"}]})),
    );
    let answer = ask(&env, &config, "7");
    assert_eq!(
        (answer.status, answer.degraded.clone()),
        (200, vec!["pricing".to_string()])
    );
    assert_eq!(env.calls.borrow().len(), 1, "no line is priced");
}

#[test]
fn identical_calls_are_made_once_per_request() {
    // Two lines of the same sku: one call, the answer in both places.
    let config = lines_route(json!({"url": "http://p/{each}"}));
    let env = FakeEnv::new(vec![]);
    env.serve(
        "http://o/7",
        1,
        Ok(json!({"lines": [{"sku": "a"}, {"sku": "b"}, {"sku": "a"}]})),
    );
    env.serve("http://p/a", 5, Ok(json!({"price": 1})));
    env.serve("http://p/b", 5, Ok(json!({"price": 2})));
    let answer = ask(&env, &config, "7");
    assert_eq!(
        answer.body["pricing"],
        json!([{"price": 1}, {"price": 2}, {"price": 1}])
    );
    assert_eq!(started(&env, "http://p/a").len(), 1);

    // A batch of ids a,b,a: each upstream called once for a.
    let env = FakeEnv::new(vec![]);
    for id in ["a", "b"] {
        env.serve(&format!("http://o/{id}"), 1, Ok(json!({"lines": []})));
    }
    let gathered = gather(&env, &config, &ids(&["a", "b", "a"]));
    assert_eq!(gathered.calls, 2);
    assert_eq!(env.calls.borrow().len(), 2);
    let answer = Answer::batch(gathered.items);
    let items = answer.body["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[0], items[2]);
}

#[test]
fn a_batch_upstream_gets_one_call_per_chunk_and_its_answer_is_split() {
    let config = lines_route(json!({"url": "http://p/prices?currency=EUR",
        "batch": {"param": "skus", "max": 2, "key": "sku"}, "required": false}));
    let env = FakeEnv::new(vec![]);
    env.serve(
        "http://o/7",
        1,
        Ok(json!({"lines": [{"sku": "a"}, {"sku": "b"}, {"sku": "a"}, {"sku": "c 1"}, {"sku": 5}]})),
    );
    // A list keyed inside each object, in any order...
    env.serve(
        "http://p/prices?currency=EUR&skus=a,b",
        5,
        Ok(json!([{"sku": "b", "price": 2}, {"sku": "a", "price": 1}])),
    );
    // ...or an object keyed by id; one id left out is a 404 for its line.
    env.serve(
        "http://p/prices?currency=EUR&skus=c%201,5",
        5,
        Ok(json!({"c 1": {"sku": "c 1", "price": 3}})),
    );
    let answer = ask(&env, &config, "7");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.body["pricing"],
        json!([{"sku": "a", "price": 1}, {"sku": "b", "price": 2}, {"sku": "a", "price": 1},
               {"sku": "c 1", "price": 3}, null])
    );
    assert_eq!(answer.degraded, ["pricing[4]"]);
    assert_eq!(env.calls.borrow().len(), 3, "the order and two chunks");

    // 100 ids, 50 a call: two calls, made together.
    let config = lines_route(json!({"url": "http://p/prices",
        "batch": {"param": "skus", "max": 50}}));
    let env = FakeEnv::new(vec![]);
    let lines: Vec<Value> = (0..100).map(|i| json!({"sku": i})).collect();
    env.serve("http://o/7", 1, Ok(json!({ "lines": lines })));
    for chunk in [0..50, 50..100] {
        let skus: Vec<String> = chunk.clone().map(|i| i.to_string()).collect();
        let answers: Vec<Value> = chunk.map(|i| json!({"id": i, "price": i})).collect();
        env.serve(
            &format!("http://p/prices?skus={}", skus.join(",")),
            20,
            Ok(Value::Array(answers)),
        );
    }
    let answer = ask(&env, &config, "7");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.body["pricing"].as_array().unwrap().len(), 100);
    assert_eq!(answer.body["pricing"][99]["price"], 99);
    assert_eq!(env.calls.borrow().len(), 3);
    assert_eq!(env.now.get(), MS(21));
}

#[test]
fn answers_are_shaped_and_may_merge_into_the_item() {
    let config = config(json!([{"path": "/p/{id}", "upstreams": [
        {"name": "catalog", "url": "http://c/{id}", "field": ".",
         "select": ["name", "id", "degraded"]},
        {"name": "pricing", "url": "http://p/{id}", "field": "price",
         "select": ["price.amount", "price.currency", "lines[].sku"],
         "rename": {"price.amount": "amount", "price.currency": "currency"}}
    ]}]));
    let env = FakeEnv::new(vec![]);
    env.serve(
        "http://c/1",
        1,
        Ok(json!({"name": "Lamp", "id": "not-1", "degraded": "x", "secret": 1})),
    );
    env.serve(
        "http://p/1",
        1,
        Ok(
            json!({"price": {"amount": 12, "currency": "EUR", "cost": 7},
                  "lines": [{"sku": "a", "cost": 1}], "internal": true}),
        ),
    );
    let answer = ask(&env, &config, "1");
    assert_eq!(
        answer.body,
        json!({"id": "1", "name": "Lamp", "degraded": [],
               "price": {"amount": 12, "currency": "EUR", "price": {}, "lines": [{"sku": "a"}]}})
    );
}

#[test]
fn the_request_makes_at_most_max_calls_and_max_in_flight_at_once() {
    let config =
        lines_route(json!({"url": "http://p/{each}", "max_items": 999, "required": false}));
    let env = FakeEnv::new(vec![]);
    for (order, from) in [("a", 0), ("b", 1000)] {
        let lines: Vec<Value> = (from..from + 600).map(|i| json!({"sku": i})).collect();
        env.serve(
            &format!("http://o/{order}"),
            1,
            Ok(json!({ "lines": lines })),
        );
    }
    for sku in 0..1600 {
        env.serve(&format!("http://p/{sku}"), 1, Ok(json!({})));
    }
    let gathered = gather(&env, &config, &ids(&["a", "b"]));
    assert_eq!(gathered.calls, MAX_CALLS);
    assert_eq!(env.calls.borrow().len(), MAX_CALLS);
    assert_eq!(env.max_in_flight.get(), 64);
    let answer = Answer::batch(gathered.items);
    let failed = answer.degraded.len();
    // 1,202 calls wanted, 1,000 made (the two orders and 998 lines).
    assert_eq!(failed, 1202 - MAX_CALLS);
    let b = &answer.body["items"][1];
    let message = serde_json::to_string(b).unwrap();
    assert!(message.contains("null"), "{message}");
}

/// Any JSON an upstream answers, on a route with every feature: no
/// panic, and the answer is a 200 or one of the error answers.
mod hostile_answers {
    use super::*;
    use proptest::prelude::*;

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "[a-z0-9 /?#%.-]{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 40, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map("(lines|sku|id|next|[a-z]{1,3})", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn any_answers_make_a_well_formed_answer(
            order in json_value(),
            by_id in json_value(),
            each in json_value(),
            next in json_value(),
        ) {
            let config = config(json!([{"path": "/o/{id}", "upstreams": [
                {"name": "order", "url": "http://o/{id}", "field": ".", "select": ["lines[].sku", "x"]},
                {"name": "next", "url": "http://n/{order.next}", "required": false,
                 "rename": {"a": "b.c"}},
                {"name": "stock", "url": "http://e/{each}", "each": "order.lines[].sku",
                 "required": false, "max_items": 5},
                {"name": "batch", "url": "http://b/", "each": "order.lines[].sku",
                 "batch": {"param": "ids", "max": 2, "key": "id"}, "required": false}
            ]}]));
            let env = FakeEnv::new(vec![]);
            env.serve("http://o/1", 1, Ok(order.clone()));
            // Whatever else is asked for gets the same hostile answers.
            let skus: Vec<String> = match order.get("lines") {
                Some(Value::Array(lines)) => lines
                    .iter()
                    .filter_map(|l| crate::template::scalar(l.get("sku")).ok())
                    .collect(),
                _ => Vec::new(),
            };
            for sku in &skus {
                let mut url = String::from("http://e/");
                crate::template::encode(&mut url, sku);
                env.serve(&url, 1, Ok(each.clone()));
            }
            let mut distinct: Vec<&String> = Vec::new();
            for sku in &skus {
                if !distinct.contains(&sku) {
                    distinct.push(sku);
                }
            }
            for chunk in distinct.chunks(2) {
                let mut url = String::from("http://b/?ids=");
                for (i, sku) in chunk.iter().enumerate() {
                    if i > 0 {
                        url.push(',');
                    }
                    crate::template::encode(&mut url, sku);
                }
                env.serve(&url, 1, Ok(by_id.clone()));
            }
            if let Ok(next_id) = crate::template::scalar(order.get("next")) {
                let mut url = String::from("http://n/");
                crate::template::encode(&mut url, &next_id);
                env.serve(&url, 1, Ok(next.clone()));
            }
            let answer = ask(&env, &config, "1");
            prop_assert!([200, 404, 502, 503, 504].contains(&answer.status), "{}", answer.status);
            match answer.status {
                200 => prop_assert_eq!(&answer.body["id"], &json!("1")),
                _ => prop_assert!(answer.body["error"]["code"].is_string()),
            }
        }
    }
}
