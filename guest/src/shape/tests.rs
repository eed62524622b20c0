use super::*;
use serde_json::json;

fn path(raw: &str) -> JsonPath {
    JsonPath::parse(raw, 1).unwrap()
}

fn shape(select: &[&str], rename: &[(&str, &str)]) -> Shape {
    Shape {
        select: select.iter().map(|p| path(p)).collect(),
        rename: rename.iter().map(|(a, b)| (path(a), path(b))).collect(),
    }
}

#[test]
fn paths_reach_members_numbered_elements_and_lists() {
    let order = json!({"id": "o1", "customer": {"id": 7},
        "lines": [{"sku": "a", "qty": 2}, {"sku": 42}, {"qty": 1}]});
    assert_eq!(path("customer.id").get(&order), Some(&json!(7)));
    assert_eq!(path("lines.1.sku").get(&order), Some(&json!(42)));
    assert_eq!(path("lines.9.sku").get(&order), None);
    assert_eq!(path("nope.id").get(&order), None);
    assert_eq!(
        path("lines[].sku").each(&order).unwrap(),
        [Some(&json!("a")), Some(&json!(42)), None]
    );
    assert_eq!(path("lines[]").each(&order).unwrap().len(), 3);
    assert_eq!(path("id[].x").each(&order).unwrap_err(), "is not a list");
    assert_eq!(path("gone[].x").each(&order).unwrap_err(), "is missing");
    let reference = path("inventory.warehouse.id");
    let (first, rest) = reference.split_first().unwrap();
    assert_eq!(
        (first, rest),
        ("inventory", JsonPath::parse("warehouse.id", 0).unwrap())
    );
}

#[test]
fn bad_paths_say_why() {
    for (raw, max_each, why) in [
        ("", 1, "each step"),
        ("a..b", 1, "each step"),
        ("a.b c", 1, "each step"),
        ("a[].b[]", 1, "at most 1 []"),
        ("a[]", 0, "[] is not allowed here"),
        ("a[0]", 1, "each step"),
    ] {
        let err = JsonPath::parse(raw, max_each).unwrap_err();
        assert!(err.contains(why), "{raw}: {err}");
    }
}

#[test]
fn select_keeps_only_its_paths_and_lists_in_order() {
    let price = json!({"price": {"amount": 12.5, "currency": "EUR", "tax": 2},
        "lines": [{"sku": "a", "cost": 1}, {"sku": "b", "cost": 2}], "noise": true});
    let shaped = shape(
        &["price.amount", "price.currency", "lines[].sku", "absent.x"],
        &[],
    )
    .apply(price.clone());
    assert_eq!(
        shaped,
        json!({"price": {"amount": 12.5, "currency": "EUR"},
               "lines": [{"sku": "a"}, {"sku": "b"}]})
    );
    // Two paths into one list fill the same elements.
    let shaped = shape(&["lines[].sku", "lines[].cost"], &[]).apply(price.clone());
    assert_eq!(shaped, json!({"lines": price["lines"].clone()}));
    assert_eq!(Shape::default().apply(price.clone()), price);
}

#[test]
fn rename_moves_values_after_select() {
    let answer = json!({"price": {"amount": 12.5, "currency": "EUR"}, "sku": "a"});
    let shaped = shape(
        &["price.amount", "sku"],
        &[
            ("price.amount", "amount"),
            ("sku", "product.sku"),
            ("missing", "x"),
        ],
    )
    .apply(answer);
    assert_eq!(
        shaped,
        json!({"price": {}, "amount": 12.5, "product": {"sku": "a"}})
    );
}
