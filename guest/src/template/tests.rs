use super::*;

fn path(raw: &str) -> PathTemplate {
    PathTemplate::parse(raw).unwrap()
}

fn params(path: &[(&str, &str)], query: &[(&str, &str)]) -> Params {
    let own = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    Params {
        path: own(path),
        query: own(query),
    }
}

#[test]
fn paths_match_whole_segments() {
    let orders = path("/users/{user}/orders/{order}");
    assert_eq!(orders.vars().collect::<Vec<_>>(), ["user", "order"]);
    assert_eq!(orders.batch_path().as_deref(), Some("/users/{user}/orders"));
    let item = orders.matches("/users/7/orders/42").unwrap();
    assert_eq!(
        (item.values.as_slice(), item.batch),
        (&["7", "42"][..], false)
    );
    let batch = orders.matches("/users/7/orders").unwrap();
    assert_eq!((batch.values.as_slice(), batch.batch), (&["7"][..], true));
    for other in [
        "/users/7",
        "/users/7/items/42",
        "/orders/42",
        "users/7/orders/1",
        "",
    ] {
        assert!(orders.matches(other).is_none(), "{other}");
    }
    // A longer path gives the last variable the rest, to be refused by
    // its check with a 400 rather than a 404.
    let long = orders.matches("/users/7/orders/4/2").unwrap();
    assert_eq!(long.values, ["7", "4/2"]);
    // An empty value is a match too (and refused later).
    assert_eq!(
        orders.matches("/users//orders/1").unwrap().values,
        ["", "1"]
    );
}

#[test]
fn literal_segments_beat_variables_and_exact_beats_a_swallowed_slash() {
    let by_id = path("/products/{id}");
    let featured = path("/products/featured");
    let reviews = path("/products/{id}/reviews");
    let a = featured.matches("/products/featured").unwrap();
    let b = by_id.matches("/products/featured").unwrap();
    assert!(a.beats(&b) && !b.beats(&a));
    let a = reviews.matches("/products/1/reviews").unwrap();
    let b = by_id.matches("/products/1/reviews").unwrap();
    assert!(a.beats(&b) && !b.beats(&a));
}

#[test]
fn bad_path_templates_say_why() {
    for (raw, why) in [
        ("products/{id}", "must start with /"),
        ("/products/{id}/", "neither"),
        ("/products/v{id}", "neither"),
        ("/products/{Id}", "a variable's name"),
        ("/products/{base}", "reserved"),
        ("/a/{x}/b/{x}", "appears twice"),
        ("/", "neither"),
        ("/{a}/{b}/{c}/{d}/{e}/{f}/{g}/{h}/{i}", "at most 8"),
    ] {
        let err = PathTemplate::parse(raw).unwrap_err();
        assert!(err.contains(why), "{raw}: {err}");
    }
    // Only a path with something before its last variable has a batch form.
    assert_eq!(path("/{id}").batch_path(), None);
    assert_eq!(path("/status").batch_path(), None);
    assert_eq!(path("/status").shapes(), [vec![Some("status")]]);
}

#[test]
fn urls_fill_variables_and_query_parameters_encoded() {
    let vars = ["user", "order"];
    let url = UrlTemplate::parse(
        "{base}/u/{user}/o/{order}?currency={query.currency:EUR}&q={query.q}",
        Some("https://orders.internal:8443/v1"),
        &vars,
        &[],
    )
    .unwrap();
    assert_eq!(url.origin(), "https://orders.internal:8443");
    assert_eq!(
        url.query_params().collect::<Vec<_>>(),
        [("currency", Some("EUR")), ("q", None)]
    );
    let p = params(&[("user", "7"), ("order", "42")], &[("q", "a b&c=d%é")]);
    assert_eq!(
        url.render(&p),
        "https://orders.internal:8443/v1/u/7/o/42?currency=EUR&q=a%20b%26c%3Dd%25%C3%A9"
    );
    let p = params(
        &[("user", "7"), ("order", "42")],
        &[("currency", "USD"), ("q", "x")],
    );
    assert!(url.render(&p).ends_with("?currency=USD&q=x"));
}

#[test]
fn bad_url_templates_say_why() {
    let vars = ["id"];
    for (raw, why) in [
        (
            "{base}/x/{user}",
            "not a variable of the route's path (it has: id)",
        ),
        (
            "{base}/x/{pricing.amount}",
            "`pricing` is none of: inventory, twin, twin",
        ),
        (
            "{base}/x/{twin.amount}",
            "two upstreams of the route are named `twin`",
        ),
        ("{base}/x/{inventory.lines[].sku}", "[] is not allowed here"),
        ("{base}/x/{each.a b}", "each step"),
        ("{base}/x/{id", "without its `}`"),
        ("{base}/x/id}", "without its `{`"),
        ("http://h/{base}/{id}", "may only start"),
        ("ftp://h/{id}", "must start with http://"),
        ("http://{id}.internal/x", "the host is fixed"),
        ("{base}{id}", "the host is fixed"),
        ("http:///x/{id}", "has no host"),
        ("{base}/x/{id}#frag", "contains '#'"),
        ("{base}/x y/{id}", "contains ' '"),
        (
            "{base}/x?c={query.c:a/b}",
            "the default of `c` contains '/'",
        ),
        ("{base}/x?c={query.}", "a query parameter's name"),
    ] {
        let err = UrlTemplate::parse(raw, Some("http://h"), &vars, &["inventory", "twin", "twin"])
            .unwrap_err();
        assert!(err.contains(why), "{raw}: {err}");
    }
    let err = UrlTemplate::parse("{base}/x", None, &vars, &[]).unwrap_err();
    assert!(err.contains("no base URL"), "{err}");
    // A template without variables is a fixed URL.
    let fixed = UrlTemplate::parse("http://h:1", None, &vars, &[]).unwrap();
    assert_eq!(
        (fixed.origin(), fixed.render(&Params::default()).as_str()),
        ("http://h:1", "http://h:1")
    );
}

#[test]
fn query_values_are_decoded_then_checked() {
    assert_eq!(decode("a+b%20c%C3%A9").as_deref(), Some("a b cé"));
    for malformed in ["%", "%2", "%zz", "%FF"] {
        assert_eq!(decode(malformed), None, "{malformed}");
    }
    for bad in [
        "a/b",
        "a?b",
        "a#b",
        "a\\b",
        "a\r\nb",
        "a\u{7f}",
        &"x".repeat(MAX_QUERY_VALUE_LEN + 1),
    ] {
        assert!(query_value(bad).is_err(), "{bad:?}");
    }
    assert!(query_value("EUR").is_ok());
    assert!(query_value("été 50%").is_ok());
    assert!(query_value(&"x".repeat(MAX_QUERY_VALUE_LEN)).is_ok());
}

#[test]
fn urls_read_other_answers_and_list_elements_checked() {
    let url = UrlTemplate::parse(
        "{base}/w/{inventory.warehouse.id}/p/{each.sku}?n={each.qty}",
        Some("http://h"),
        &["id"],
        &["inventory", "pricing"],
    )
    .unwrap();
    assert_eq!(url.depends_on(), [0]);
    assert!(url.uses_each());
    let inventory = serde_json::json!({"warehouse": {"id": "w 1"}});
    let read = |i: usize| (i == 0).then_some(&inventory);
    let element = serde_json::json!({"sku": "a/b", "qty": 2});
    let answers = Answers {
        upstream: &read,
        element: Some(&element),
    };
    // The element's sku has a '/': refused like a client's value.
    let err = url.render_with(&Params::default(), &answers).unwrap_err();
    assert_eq!(err, "the element's sku is unusable: it contains '/'");
    let element = serde_json::json!({"sku": "a-1", "qty": 2.5});
    let answers = Answers {
        upstream: &read,
        element: Some(&element),
    };
    assert_eq!(
        url.render_with(&Params::default(), &answers).unwrap(),
        "http://h/w/w%201/p/a-1?n=2.5"
    );
    for (inventory, why) in [
        (serde_json::json!({}), "inventory.warehouse.id is missing"),
        (
            serde_json::json!({"warehouse": {"id": true}}),
            "is not a string or a number",
        ),
        (serde_json::json!({"warehouse": {"id": ""}}), "is empty"),
        (
            serde_json::json!({"warehouse": {"id": [1]}}),
            "is not a string or a number",
        ),
    ] {
        let read = |i: usize| (i == 0).then_some(&inventory);
        let answers = Answers {
            upstream: &read,
            element: Some(&element),
        };
        let err = url.render_with(&Params::default(), &answers).unwrap_err();
        assert!(err.contains(why), "{err}");
    }
}
