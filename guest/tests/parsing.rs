//! Property tests of everything the guest parses from a client or an
//! operator: whatever comes in, no panic, and every rejection of a client's
//! input is a 4xx in the one error shape.

use fanout_guest::api::{self, Target};
use fanout_guest::config::{Config, MAX_BATCH_IDS};
use fanout_guest::errors::{ApiError, parse_retry_after};
use fanout_guest::trace::{TraceContext, bounded_tracestate};
use proptest::prelude::*;

/// The default routes, with the upstreams' base URLs the host would give.
fn config() -> Config {
    Config::from_lookup(|key| {
        key.starts_with("FANOUT_UPSTREAM_")
            .then(|| "http://upstream.test".to_string())
    })
    .expect("the default configuration is valid")
}

/// A route of two path variables and two query parameters.
fn orders() -> Config {
    Config::from_lookup(|key| {
        match key {
        "FANOUT_CONFIG" => Some(
            r#"{"routes": [{"path": "/users/{user}/orders/{order}", "upstreams": [{"name": "orders",
               "url": "{base}/u/{user}/o/{order}?cur={query.currency:EUR}&lang={query.lang}"}]}]}"#
                .into(),
        ),
        "FANOUT_UPSTREAM_ORDERS" => Some("http://orders.local".to_string()),
        _ => None,
    }
    })
    .expect("a valid configuration")
}

/// A client's error: 4xx, a snake_case code, a message, rendered as the
/// JSON error shape.
fn assert_client_error(error: &ApiError) {
    assert!((400..500).contains(&error.status), "{error:?}");
    assert!(
        !error.code.is_empty()
            && error
                .code
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_'),
        "{error:?}"
    );
    assert!(!error.message.is_empty());
    let body = error.to_json();
    assert_eq!(body["error"]["code"], error.code);
    assert!(body["error"]["message"].is_string());
}

/// Paths and queries that look like the API, and some that do not.
fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        "/products/[a-zA-Z0-9_.~%-]{0,80}",
        "/products/.{0,80}",
        "/[a-z]{0,10}(/.{0,20}){0,3}",
        ".{0,100}",
    ]
}

fn query() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        "ids=[a-z0-9,]{0,300}".prop_map(Some),
        "ids=(.{0,10},){0,120}".prop_map(Some),
        ".{0,200}".prop_map(Some),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn routing_never_panics_and_refuses_with_a_4xx(
        method in prop_oneof![Just("GET".to_string()), "[A-Z]{1,8}"],
        path in path(),
        query in query(),
    ) {
        let config = config();
        match api::route(&config, &method, &path, query.as_deref()) {
            Ok(Target::Item { params, .. }) => {
                for (_, id) in &params.path {
                    prop_assert!(api::validate_id(id).is_ok());
                }
            }
            Ok(Target::Batch { items, .. }) => {
                prop_assert!((1..=MAX_BATCH_IDS).contains(&items.len()));
                for (_, id) in items.iter().flat_map(|p| &p.path) {
                    prop_assert!(api::validate_id(id).is_ok());
                }
            }
            Err(error) => assert_client_error(&error),
        }
    }

    #[test]
    fn batch_ids_are_all_valid_or_refused(query in query()) {
        match api::parse_ids(query.as_deref()) {
            Ok(ids) => {
                prop_assert!((1..=MAX_BATCH_IDS).contains(&ids.len()));
                prop_assert!(ids.iter().all(|id| api::validate_id(id).is_ok()));
            }
            Err(error) => assert_client_error(&error),
        }
    }

    #[test]
    fn no_client_value_changes_where_a_call_goes_or_how_it_parses(
        user in prop_oneof!["[a-z0-9]{1,8}", ".{0,20}"],
        order in prop_oneof!["[a-z0-9]{1,8}", ".{0,20}", "[a-z0-9%/]{0,20}"],
        query in prop_oneof![
            Just(None),
            "lang=.{0,40}".prop_map(Some),
            "lang=[a-zA-Z0-9%+&=/#?]{0,40}(&ids=[a-z0-9,]{0,20})?".prop_map(Some),
            ".{0,80}".prop_map(Some),
        ],
    ) {
        let config = orders();
        let path = format!("/users/{user}/orders/{order}");
        let items = match api::route(&config, "GET", &path, query.as_deref()) {
            Ok(Target::Item { route, params }) => vec![(route, params)],
            Ok(Target::Batch { route, items }) => items.into_iter().map(|p| (route, p)).collect(),
            Err(error) => {
                assert_client_error(&error);
                return Ok(());
            }
        };
        for (route, params) in items {
            let url = route.upstreams[0].url(&params);
            let rest = url.strip_prefix("http://orders.local/u/").expect("the fixed host");
            // Two path segments, one query of two parameters, nothing else.
            let (path, query) = rest.split_once('?').expect("one query");
            prop_assert_eq!(path.split('/').count(), 3, "{}", url);
            prop_assert_eq!(query.split('&').count(), 2, "{}", url);
            prop_assert!(
                url.bytes().all(|b| b.is_ascii_graphic() && b != b'#' && b != b'\\'),
                "{}", url
            );
        }
    }

    #[test]
    fn the_budget_header_is_within_bounds_or_refused(header in prop_oneof![
        Just(None),
        "[0-9]{1,25}".prop_map(Some),
        ".{0,30}".prop_map(Some),
    ]) {
        let config = config();
        match api::budget(&config, header.as_deref()) {
            Ok(budget) => prop_assert!(budget > std::time::Duration::ZERO && budget <= config.max_deadline),
            Err(error) => assert_client_error(&error),
        }
    }

    #[test]
    fn trace_headers_never_panic(traceparent in ".{0,80}", tracestate in ".{0,700}") {
        let _ = TraceContext::parse(&traceparent);
        if let Some(kept) = bounded_tracestate(tracestate) {
            prop_assert!(kept.len() <= 512);
        }
        let _ = parse_retry_after(&traceparent);
    }

    #[test]
    fn any_configuration_is_loaded_or_refused_by_key(json in prop_oneof![
        ".{0,200}",
        // Structurally close to the real thing, with hostile values.
        (0u64..100_000, 0u64..100_000, 0usize..1000, "[a-z{}/]{0,20}", "[a-z{}:/.]{0,30}")
            .prop_map(|(deadline, max, in_flight, path, url)| format!(
                r#"{{"deadline_ms": {deadline}, "max_deadline_ms": {max}, "max_in_flight": {in_flight},
                    "routes": [{{"path": "{path}", "upstreams": [{{"name": "u", "url": "{url}"}}]}}]}}"#
            )),
    ]) {
        let loaded = Config::from_lookup(|key| match key {
            "FANOUT_CONFIG" => Some(json.clone()),
            _ => Some("http://upstream.test".to_string()),
        });
        if let Err(error) = loaded {
            prop_assert!(!error.to_string().is_empty());
        }
    }
}
