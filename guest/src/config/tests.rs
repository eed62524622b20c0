use super::*;
use std::collections::HashMap;

fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    move |k| map.get(k).cloned()
}

fn id(value: &str) -> Params {
    Params {
        path: vec![("id".into(), value.into())],
        query: Vec::new(),
    }
}

const BASES: [(&str, &str); 3] = [
    ("FANOUT_UPSTREAM_INVENTORY", "http://inventory.local/"),
    ("FANOUT_UPSTREAM_PRICING", "http://127.0.0.1:9001/v1"),
    ("FANOUT_UPSTREAM_REVIEWS", "https://reviews.example"),
];

fn with(extra: &[(&'static str, &'static str)]) -> Result<Config, ConfigError> {
    let mut pairs = BASES.to_vec();
    pairs.extend_from_slice(extra);
    Config::from_lookup(lookup(&pairs))
}

#[test]
fn default_is_the_product_example() {
    let config = with(&[]).unwrap();
    assert_eq!(config.deadline, DEFAULT_DEADLINE);
    assert_eq!(config.max_deadline, DEFAULT_MAX_DEADLINE);
    assert_eq!(config.max_in_flight, DEFAULT_MAX_IN_FLIGHT);
    assert_eq!(config.mode, Mode::Concurrent);
    let route = config.route("/products/{id}").unwrap();
    let summary: Vec<(String, &str, bool)> = route
        .upstreams
        .iter()
        .map(|u| (u.url(&id("42")), u.field.as_str(), u.required))
        .collect();
    assert_eq!(
        summary,
        [
            (
                "http://inventory.local/inventory/42".to_string(),
                "inventory",
                true
            ),
            (
                "http://127.0.0.1:9001/v1/pricing/42".to_string(),
                "price",
                true
            ),
            (
                "https://reviews.example/reviews/42".to_string(),
                "reviews",
                false
            ),
        ]
    );
    assert_eq!(config.upstream_names(), ["inventory", "pricing", "reviews"]);
}

#[test]
fn json_config_describes_routes() {
    let config = with(&[(
        "FANOUT_CONFIG",
        r#"{"deadline_ms": 300, "max_deadline_ms": 2000, "max_in_flight": 4, "mode": "sequential",
            "routes": [{"path": "/users/{id}", "upstreams": [
                {"name": "pricing", "url": "{base}/u/{id}/price", "required": false,
                 "timeout_ms": 50, "retry": {"max_attempts": 1}}]}]}"#,
    )])
    .unwrap();
    assert_eq!(config.deadline, Duration::from_millis(300));
    assert_eq!(config.max_deadline, Duration::from_millis(2000));
    assert_eq!(config.max_in_flight, 4);
    assert_eq!(config.mode, Mode::Sequential);
    assert!(config.route("/products/{id}").is_none());
    let upstream = &config.route("/users/{id}").unwrap().upstreams[0];
    assert_eq!(upstream.url(&id("7")), "http://127.0.0.1:9001/v1/u/7/price");
    assert_eq!(upstream.field, "pricing");
    assert!(!upstream.required);
    assert_eq!(upstream.timeout, Duration::from_millis(50));
    assert_eq!(upstream.retry.max_attempts, 1);
}

#[test]
fn deadline_env_overrides_and_is_validated() {
    let config = with(&[(ENV_DEADLINE_MS, "150")]).unwrap();
    assert_eq!(config.deadline, Duration::from_millis(150));
    for bad in ["0", "-5", "abc", "60001", ""] {
        let err = with(&[(ENV_DEADLINE_MS, bad)]).unwrap_err();
        assert_eq!(err.key, ENV_DEADLINE_MS, "{bad}");
    }
}

#[test]
fn errors_name_the_key() {
    let cases: &[(&str, &str)] = &[
        ("not json", "FANOUT_CONFIG"),
        (r#"{"colour": 1}"#, "FANOUT_CONFIG"),
        (r#"{"deadline_ms": 0}"#, "FANOUT_CONFIG.deadline_ms"),
        (
            r#"{"deadline_ms": 500, "max_deadline_ms": 100}"#,
            "FANOUT_CONFIG.max_deadline_ms",
        ),
        (r#"{"max_in_flight": 0}"#, "FANOUT_CONFIG.max_in_flight"),
        (r#"{"routes": []}"#, "FANOUT_CONFIG.routes"),
        (
            r#"{"routes": [{"path": "p/{id}", "upstreams": [{"name": "a", "url": "http://a/{id}"}]}]}"#,
            "FANOUT_CONFIG.routes[0].path",
        ),
        (
            r#"{"routes": [{"path": "/p", "upstreams": [{"name": "a", "url": "http://a/{id}"}]}]}"#,
            "FANOUT_CONFIG.routes[0].upstreams[0].url",
        ),
        (
            r#"{"routes": [{"path": "/u/{user}/o/{order}", "upstreams": [{"name": "a", "url": "http://a/{order}", "field": "user"}]}]}"#,
            "FANOUT_CONFIG.routes[0].upstreams[0].field",
        ),
        (
            r#"{"routes": [{"path": "/p/{id}", "upstreams": [{"name": "a", "url": "http://a/{id}"}]}, {"path": "/p/{sku}", "upstreams": [{"name": "a", "url": "http://a/{sku}"}]}]}"#,
            "FANOUT_CONFIG.routes[1].path",
        ),
        (
            r#"{"routes": [{"path": "/p/{id}", "upstreams": [{"name": "a", "url": "http://a/{id}"}]}, {"path": "/p", "upstreams": [{"name": "a", "url": "http://a/all"}]}]}"#,
            "FANOUT_CONFIG.routes[1].path",
        ),
        (
            r#"{"routes": [{"path": "/p/{id}", "upstreams": []}]}"#,
            "FANOUT_CONFIG.routes[0].upstreams",
        ),
        (
            r#"{"routes": [{"path": "/p/{id}", "upstreams": [{"name": "a-b", "url": "http://a/{id}"}]}]}"#,
            "FANOUT_CONFIG.routes[0].upstreams[0].name",
        ),
        (
            r#"{"routes": [{"path": "/p/{id}", "upstreams": [{"name": "a", "url": "http://a/{nope}"}]}]}"#,
            "FANOUT_CONFIG.routes[0].upstreams[0].url",
        ),
        (
            r#"{"routes": [{"path": "/p/{id}", "upstreams": [{"name": "a", "url": "http://a/{id}", "field": "id"}]}]}"#,
            "FANOUT_CONFIG.routes[0].upstreams[0].field",
        ),
        (
            r#"{"routes": [{"path": "/p/{id}", "upstreams": [{"name": "a", "url": "http://a/{id}"}, {"name": "b", "url": "http://b/{id}", "field": "a"}]}]}"#,
            "FANOUT_CONFIG.routes[0].upstreams[1].field",
        ),
        (
            r#"{"routes": [{"path": "/p/{id}", "upstreams": [{"name": "a", "url": "http://a/{id}", "timeout_ms": 0}]}]}"#,
            "FANOUT_CONFIG.routes[0].upstreams[0].timeout_ms",
        ),
        (
            r#"{"routes": [{"path": "/p/{id}", "upstreams": [{"name": "a", "url": "http://a/{id}", "retry": {"max_attempts": 0}}]}]}"#,
            "FANOUT_CONFIG.routes[0].upstreams[0].retry",
        ),
        (
            r#"{"routes": [{"path": "/p/{id}", "upstreams": [{"name": "nobase", "url": "{base}/{id}"}]}]}"#,
            "FANOUT_UPSTREAM_NOBASE",
        ),
        (
            r#"{"routes": [{"path": "/p/{id}", "upstreams": [{"name": "a", "url": "http://a/{id}"}]}, {"path": "/p/{id}", "upstreams": [{"name": "a", "url": "http://a/{id}"}]}]}"#,
            "FANOUT_CONFIG.routes[1].path",
        ),
    ];
    for (json, key) in cases {
        let err = with(&[("FANOUT_CONFIG", json)]).unwrap_err();
        assert_eq!(err.key, *key, "{json}: {err}");
    }
}

#[test]
fn missing_or_malformed_base_names_the_variable() {
    let err = Config::from_lookup(lookup(&BASES[..2])).unwrap_err();
    assert_eq!(err.key, "FANOUT_UPSTREAM_REVIEWS");

    for bad in [
        "ftp://x",
        "http://",
        "http:///path",
        "http://a?b=c",
        "inventory",
    ] {
        let mut pairs = BASES.to_vec();
        pairs[0].1 = bad;
        let err = Config::from_lookup(lookup(&pairs)).unwrap_err();
        assert_eq!(err.key, "FANOUT_UPSTREAM_INVENTORY", "{bad}");
    }
}

#[test]
fn the_budget_header_is_fanouts_own_unless_renamed_or_off() {
    let header = |json: &'static str| with(&[("FANOUT_CONFIG", json)]).map(|c| c.budget_header);
    assert_eq!(
        header("{}").unwrap().as_deref(),
        Some("x-request-timeout-ms")
    );
    assert_eq!(header(r#"{"budget_header": ""}"#).unwrap(), None);
    assert_eq!(
        header(r#"{"budget_header": "x-deadline-ms"}"#)
            .unwrap()
            .as_deref(),
        Some("x-deadline-ms")
    );
    for bad in [
        r#"{"budget_header": "X-Upper"}"#,
        r#"{"budget_header": "two words"}"#,
        r#"{"budget_header": "traceparent"}"#,
        r#"{"budget_header": "x-fanout-hint-attempt"}"#,
    ] {
        let err = header(bad).unwrap_err();
        assert_eq!(err.key, "FANOUT_CONFIG.budget_header", "{bad}");
    }
}

#[test]
fn only_end_to_end_headers_may_be_forwarded() {
    let route = |forward: &str| {
        format!(
            r#"{{"routes": [{{"path": "/p/{{id}}", "upstreams": [
                {{"name": "pricing", "url": "{{base}}/{{id}}", "forward_headers": {forward}}}]}}]}}"#
        )
    };
    let config = Config::from_lookup(lookup(&[
        ("FANOUT_UPSTREAM_PRICING", "http://pricing.local"),
        (
            "FANOUT_CONFIG",
            &route(r#"["accept-language", "authorization"]"#),
        ),
    ]))
    .unwrap();
    assert_eq!(
        config.routes[0].upstreams[0].forward_headers,
        ["accept-language", "authorization"]
    );
    for bad in [
        r#"["connection"]"#,
        r#"["transfer-encoding"]"#,
        r#"["host"]"#,
        r#"["traceparent"]"#,
        r#"["x-request-timeout-ms"]"#,
        r#"["x-fanout-hint-upstream"]"#,
        r#"["Accept-Language"]"#,
        r#"["two words"]"#,
    ] {
        let err = Config::from_lookup(lookup(&[
            ("FANOUT_UPSTREAM_PRICING", "http://pricing.local"),
            ("FANOUT_CONFIG", &route(bad)),
        ]))
        .unwrap_err();
        assert_eq!(
            err.key, "FANOUT_CONFIG.routes[0].upstreams[0].forward_headers[0]",
            "{bad}: {err}"
        );
    }
}

#[test]
fn routes_may_have_many_variables_and_use_query_parameters() {
    let config = with(&[(
        "FANOUT_CONFIG",
        r#"{"routes": [
            {"path": "/users/{user}/orders/{order}", "upstreams": [
                {"name": "pricing", "url": "{base}/u/{user}/o/{order}?currency={query.currency:EUR}"},
                {"name": "reviews", "url": "{base}/r/{order}?lang={query.lang}&c={query.currency}",
                 "required": false}]},
            {"path": "/status", "upstreams": [{"name": "inventory", "url": "{base}/health"}]}]}"#,
    )])
    .unwrap();
    let route = config.route("/users/{user}/orders/{order}").unwrap();
    assert_eq!(route.path.vars().collect::<Vec<_>>(), ["user", "order"]);
    // `currency` has a default in one template but not the other: needed.
    assert_eq!(
        route.query,
        [("currency".to_string(), true), ("lang".to_string(), true)]
    );
    let params = Params {
        path: vec![("user".into(), "7".into()), ("order".into(), "a-1".into())],
        query: vec![("lang".into(), "fr".into())],
    };
    assert_eq!(
        route.upstreams[0].url(&params),
        "http://127.0.0.1:9001/v1/u/7/o/a-1?currency=EUR"
    );
    let status = config.route("/status").unwrap();
    assert!(status.query.is_empty());
    assert_eq!(
        status.upstreams[0].url(&Params::default()),
        "http://inventory.local/health"
    );
}
