//! One route of the configuration, validated: its path, each upstream's
//! URL, list, batch and shape, and the graph of their dependencies.

use super::*;

pub(super) fn validate_route(
    index: usize,
    raw: RawRoute,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<Route, ConfigError> {
    let route_key = || format!("{ENV_CONFIG}.routes[{index}]");
    let path = PathTemplate::parse(&raw.path)
        .map_err(|why| error(format!("{}.path", route_key()), why))?;
    let vars: Vec<&str> = path.vars().collect();
    if raw.upstreams.is_empty() {
        return Err(error(
            format!("{}.upstreams", route_key()),
            "a route needs at least one upstream",
        ));
    }
    let names: Vec<String> = raw.upstreams.iter().map(|u| u.name.clone()).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut upstreams: Vec<RouteUpstream> = Vec::new();
    for (i, u) in raw.upstreams.into_iter().enumerate() {
        let key = || format!("{}.upstreams[{i}]", route_key());
        if u.name.is_empty()
            || !u
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(error(
                format!("{}.name", key()),
                format!("`{}`: names are made of A-Z, a-z, 0-9 and '_'", u.name),
            ));
        }
        if ["each", "query", "base"].contains(&u.name.as_str()) {
            return Err(error(
                format!("{}.name", key()),
                format!("`{}` is reserved in URL templates", u.name),
            ));
        }
        let field = u.field.unwrap_or_else(|| u.name.clone());
        if ["degraded", "error"].contains(&field.as_str()) || vars.contains(&field.as_str()) {
            return Err(error(
                format!("{}.field", key()),
                format!("`{field}` is reserved (degraded, error and the path's variables)"),
            ));
        }
        if field != "." && upstreams.iter().any(|other| other.field == field) {
            return Err(error(
                format!("{}.field", key()),
                format!("`{field}` is filled twice"),
            ));
        }
        let env = format!("{ENV_UPSTREAM_PREFIX}{}", u.name.to_ascii_uppercase());
        let base = match lookup(&env) {
            Some(raw) => Some(parse_base_url(&raw).map_err(|reason| error(&env, reason))?),
            None if u.url.contains("{base}") => {
                return Err(error(
                    &env,
                    format!("not set: the base URL of upstream `{}`", u.name),
                ));
            }
            None => None,
        };
        let url = UrlTemplate::parse(&u.url, base.as_deref(), &vars, &names)
            .map_err(|why| error(format!("{}.url", key()), why))?;
        let timeout = duration(
            u.timeout_ms,
            DEFAULT_ATTEMPT_TIMEOUT,
            || format!("{}.timeout_ms", key()),
            MAX_DEADLINE,
        )?;
        let retry = u.retry.unwrap_or_default();
        retry
            .validate()
            .map_err(|reason| error(format!("{}.retry", key()), reason))?;
        let forward_headers = u.forward_headers.unwrap_or_default();
        if forward_headers.len() > MAX_FORWARDED {
            return Err(error(
                format!("{}.forward_headers", key()),
                format!("at most {MAX_FORWARDED} names"),
            ));
        }
        for (j, name) in forward_headers.iter().enumerate() {
            forwardable(name)
                .map_err(|reason| error(format!("{}.forward_headers[{j}]", key()), reason))?;
        }
        let each = match &u.each {
            None => None,
            Some(raw) => {
                let each_key = || format!("{}.each", key());
                let path = JsonPath::parse(raw, 1).map_err(|why| error(each_key(), why))?;
                let (name, rest) = path
                    .split_first()
                    .filter(|(_, rest)| !rest.steps().is_empty())
                    .ok_or_else(|| {
                        error(
                            each_key(),
                            format!("`{raw}` must name an upstream, then a list: `order.lines[]`"),
                        )
                    })?;
                let source = names.iter().position(|n| *n == name).ok_or_else(|| {
                    error(
                        each_key(),
                        format!(
                            "`{name}` is not an upstream of the route ({})",
                            names.join(", ")
                        ),
                    )
                })?;
                if !rest.has_list() {
                    return Err(error(
                        each_key(),
                        format!("`{raw}` has no list: mark it with [] (`order.lines[].sku`)"),
                    ));
                }
                Some((source, rest))
            }
        };
        let max_items = u.max_items.unwrap_or(DEFAULT_MAX_ITEMS);
        if !(1..=MAX_ITEMS).contains(&max_items) {
            return Err(error(
                format!("{}.max_items", key()),
                format!("{max_items} is outside 1..={MAX_ITEMS}"),
            ));
        }
        let batch = match u.batch {
            None => None,
            Some(raw) => {
                let batch_key = |k: &str| format!("{}.batch.{k}", key());
                let param_ok = !raw.param.is_empty()
                    && raw.param.len() <= 64
                    && raw
                        .param
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
                if !param_ok {
                    return Err(error(
                        batch_key("param"),
                        format!("`{}` is not a query parameter's name", raw.param),
                    ));
                }
                let max = raw.max.unwrap_or(DEFAULT_BATCH_MAX);
                if !(1..=MAX_BATCH_IDS).contains(&max) {
                    return Err(error(
                        batch_key("max"),
                        format!("{max} is outside 1..={MAX_BATCH_IDS}"),
                    ));
                }
                let key_path = JsonPath::parse(raw.key.as_deref().unwrap_or("id"), 0)
                    .map_err(|why| error(batch_key("key"), why))?;
                Some(Batch {
                    param: raw.param,
                    max,
                    key: key_path,
                })
            }
        };
        match (&each, &batch, url.uses_each()) {
            (None, Some(_), _) => {
                return Err(error(
                    format!("{}.batch", key()),
                    "a batch needs `each`: the list whose values it sends",
                ));
            }
            (None, None, true) => {
                return Err(error(
                    format!("{}.url", key()),
                    format!("`{}` uses {{each}}, but the upstream has no `each`", u.url),
                ));
            }
            (Some(_), None, false) => {
                return Err(error(
                    format!("{}.url", key()),
                    format!(
                        "`{}` has no {{each}}: every element would make the same call",
                        u.url
                    ),
                ));
            }
            (Some(_), Some(_), true) => {
                return Err(error(
                    format!("{}.url", key()),
                    format!(
                        "`{}` uses {{each}}, but a batch sends the values in `?param=`",
                        u.url
                    ),
                ));
            }
            _ => {}
        }
        if field == "." && each.is_some() {
            return Err(error(
                format!("{}.field", key()),
                "a list cannot be merged into the item: give it a field",
            ));
        }
        let mut depends_on = url.depends_on();
        if let Some((source, _)) = &each
            && !depends_on.contains(source)
        {
            depends_on.push(*source);
        }
        let path_list = |k: &str, raw: &str, lists: usize| {
            JsonPath::parse(raw, lists).map_err(|why| error(format!("{}.{k}", key()), why))
        };
        let select = u
            .select
            .unwrap_or_default()
            .iter()
            .map(|p| path_list("select", p, 1))
            .collect::<Result<Vec<_>, _>>()?;
        let rename = u
            .rename
            .unwrap_or_default()
            .iter()
            .map(|(from, to)| Ok((path_list("rename", from, 0)?, path_list("rename", to, 0)?)))
            .collect::<Result<Vec<_>, ConfigError>>()?;
        upstreams.push(RouteUpstream {
            name: u.name,
            field,
            required: u.required.unwrap_or(true),
            timeout,
            retry,
            forward_headers,
            url,
            depends_on,
            each,
            max_items,
            batch,
            shape: Shape { select, rename },
        });
    }
    // The most calls one item can make: a request fails a call past
    // MAX_CALLS anyway, but a route that would always reach it is a
    // mistake to name at start.
    let most: usize = upstreams
        .iter()
        .map(|u| match (&u.each, &u.batch) {
            (None, _) => 1,
            (Some(_), None) => u.max_items,
            (Some(_), Some(batch)) => u.max_items.div_ceil(batch.max),
        })
        .sum();
    if most > MAX_CALLS {
        return Err(error(
            format!("{}.upstreams", route_key()),
            format!(
                "an item may make {most} calls (one per upstream, max_items per list, \
                 one per batch of a list); at most {MAX_CALLS} are allowed"
            ),
        ));
    }
    if let Some(cycle) = find_cycle(&upstreams) {
        let names: Vec<&str> = cycle.iter().map(|&i| upstreams[i].name.as_str()).collect();
        return Err(error(
            format!("{}.upstreams[{}].url", route_key(), cycle[0]),
            format!("the upstreams depend on each other: {}", names.join(" -> ")),
        ));
    }
    let mut query: Vec<(String, bool)> = Vec::new();
    for (name, default) in upstreams.iter().flat_map(|u| u.url.query_params()) {
        match query.iter_mut().find(|(n, _)| n == name) {
            Some((_, required)) => *required |= default.is_none(),
            None => query.push((name.to_string(), default.is_none())),
        }
    }
    let max_body = match raw.max_body_kib {
        None => DEFAULT_MAX_BODY,
        Some(kib @ 1..=65536) => (kib as usize) << 10,
        Some(kib) => {
            return Err(error(
                format!("{}.max_body_kib", route_key()),
                format!("{kib} is outside 1..=65536"),
            ));
        }
    };
    Ok(Route {
        path,
        upstreams,
        query,
        max_body,
    })
}

/// A cycle among the upstreams' dependencies, as the indices along it
/// (first repeated at the end), if there is one.
fn find_cycle(upstreams: &[RouteUpstream]) -> Option<Vec<usize>> {
    // Depth-first, colouring: 0 unvisited, 1 on the current path, 2 done.
    fn visit(
        at: usize,
        upstreams: &[RouteUpstream],
        colour: &mut [u8],
        path: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        colour[at] = 1;
        path.push(at);
        for &next in &upstreams[at].depends_on {
            if colour[next] == 1 {
                let start = path.iter().position(|&i| i == next).unwrap_or(0);
                let mut cycle = path[start..].to_vec();
                cycle.push(next);
                return Some(cycle);
            }
            if colour[next] == 0
                && let Some(cycle) = visit(next, upstreams, colour, path)
            {
                return Some(cycle);
            }
        }
        path.pop();
        colour[at] = 2;
        None
    }
    let mut colour = vec![0u8; upstreams.len()];
    (0..upstreams.len()).find_map(|start| match colour[start] {
        0 => visit(start, upstreams, &mut colour, &mut Vec::new()),
        _ => None,
    })
}

/// Names an upstream may list in `forward_headers`, at most.
pub const MAX_FORWARDED: usize = 32;

/// Whether a client header may be forwarded: a lower-case name that is not
/// about the connection (hop-by-hop), not one the guest or the host sets
/// itself (trace context, the budget, the host's hints), and not the
/// message's framing.
fn forwardable(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        return Err(format!("`{name}` is not a lower-case header name"));
    }
    const NEVER: [&str; 14] = [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "traceparent",
        "tracestate",
        crate::protocol::TIMEOUT_HEADER,
    ];
    if NEVER.contains(&name) || name.starts_with(crate::protocol::HINT_PREFIX) {
        return Err(format!(
            "`{name}` is about the connection or set by fanout itself: it is never forwarded"
        ));
    }
    Ok(())
}

/// Accepts `http://authority[/prefix]` or `https://...`, no query or fragment.
fn parse_base_url(raw: &str) -> Result<String, String> {
    let raw = raw.trim();
    let rest = raw
        .strip_prefix("http://")
        .or_else(|| raw.strip_prefix("https://"))
        .ok_or_else(|| format!("`{raw}` must start with http:// or https://"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() {
        return Err(format!("`{raw}` has no host"));
    }
    if raw.contains(['?', '#', ' ', '{', '}']) {
        return Err(format!(
            "`{raw}` must not contain a query, a fragment, braces or spaces"
        ));
    }
    Ok(raw.trim_end_matches('/').to_string())
}
