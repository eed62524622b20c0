//! Templates: a route's path (`/users/{user}/orders/{order}`) and its
//! upstreams' URLs (`{base}/users/{user}/orders/{order}?currency={query.currency:EUR}`),
//! and the request's values that fill them ([`Params`]).
//!
//! Every value is checked before any upstream is called, and the host part
//! of a URL is fixed by the configuration: no client value can choose where
//! a call goes, only what it asks for there.

use crate::shape::JsonPath;
use serde_json::Value;
use std::fmt::Write;

/// Longest path variable accepted.
pub const MAX_VAR_LEN: usize = 64;
/// Longest query value accepted, in bytes once decoded.
pub const MAX_QUERY_VALUE_LEN: usize = 256;
/// Most variables one path may have.
pub const MAX_VARS: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Var(String),
}

/// A route's path: literal segments and `{name}` variables, each a whole
/// segment. A path ending in a variable also has a batch form without it
/// (`/users/{user}/orders?ids=a,b` for `/users/{user}/orders/{order}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTemplate {
    raw: String,
    segments: Vec<Segment>,
}

/// How a request path matched a [`PathTemplate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathMatch<'p> {
    /// The values of the variables, in the template's order, unchecked; in
    /// the batch form, the last one is missing.
    pub values: Vec<&'p str>,
    /// Whether the path is the batch form.
    pub batch: bool,
    /// Better matches compare greater: exact before a last variable that
    /// swallowed a `/`, then literal segments before variables, leftmost
    /// first.
    rank: (bool, Vec<bool>),
}

impl PathTemplate {
    /// Parses `/users/{user}/orders/{order}`.
    pub fn parse(raw: &str) -> Result<PathTemplate, String> {
        let rest = raw
            .strip_prefix('/')
            .ok_or_else(|| format!("`{raw}` must start with /"))?;
        let mut segments = Vec::new();
        for segment in rest.split('/') {
            if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                var_name(name).map_err(|why| format!("`{raw}`: {why}"))?;
                if segments.contains(&Segment::Var(name.to_string())) {
                    return Err(format!("`{raw}`: `{{{name}}}` appears twice"));
                }
                segments.push(Segment::Var(name.to_string()));
            } else if !segment.is_empty()
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
            {
                segments.push(Segment::Literal(segment.to_string()));
            } else {
                return Err(format!(
                    "`{raw}`: each segment is a literal of A-Z, a-z, 0-9, '-', '_', '.', '~' \
                     or a whole {{variable}}; `{segment}` is neither"
                ));
            }
        }
        let vars = segments
            .iter()
            .filter(|s| matches!(s, Segment::Var(_)))
            .count();
        if vars > MAX_VARS {
            return Err(format!("`{raw}`: at most {MAX_VARS} variables"));
        }
        Ok(PathTemplate {
            raw: raw.to_string(),
            segments,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The variables' names, in order.
    pub fn vars(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Var(name) => Some(name.as_str()),
            Segment::Literal(_) => None,
        })
    }

    /// The batch form's path (the template without its last variable), if
    /// the template ends in one.
    pub fn batch_path(&self) -> Option<String> {
        // `/{id}` has none: its batch form would be `/` itself.
        match self.segments.last() {
            Some(Segment::Var(_)) if self.segments.len() > 1 => {
                let cut = self.raw.rfind('/').unwrap_or(0);
                Some(self.raw[..cut].to_string())
            }
            _ => None,
        }
    }

    /// The shapes of the paths this template answers (literals kept,
    /// variables blank): two routes that share one would compete for the
    /// same requests.
    pub fn shapes(&self) -> Vec<Vec<Option<&str>>> {
        fn shape(segments: &[Segment]) -> Vec<Option<&str>> {
            segments
                .iter()
                .map(|s| match s {
                    Segment::Literal(l) => Some(l.as_str()),
                    Segment::Var(_) => None,
                })
                .collect()
        }
        let mut shapes = vec![shape(&self.segments)];
        if self.batch_path().is_some() {
            shapes.push(shape(&self.segments[..self.segments.len() - 1]));
        }
        shapes
    }

    /// Matches a request path. A last variable also takes a path longer
    /// than the template (`/products/a/b`), so that the value is refused
    /// with a 400 naming it rather than a 404.
    pub fn matches<'p>(&self, path: &'p str) -> Option<PathMatch<'p>> {
        let rest = path.strip_prefix('/')?;
        let parts: Vec<(usize, &str)> = rest
            .split('/')
            .scan(1, |at, part| {
                let start = *at;
                *at += part.len() + 1;
                Some((start, part))
            })
            .collect();
        let n = self.segments.len();
        let ends_in_var = matches!(self.segments.last(), Some(Segment::Var(_)));
        // (batch form, exact: no value swallows a `/`)
        let (batch, exact) = match parts.len() {
            len if len == n => (false, true),
            len if len + 1 == n && self.batch_path().is_some() => (true, true),
            len if len > n && ends_in_var => (false, false),
            _ => return None,
        };
        let mut values = Vec::with_capacity(n);
        let mut pattern = Vec::with_capacity(n);
        for (i, segment) in self.segments.iter().enumerate().take(parts.len()) {
            let (start, part) = parts[i];
            match segment {
                Segment::Literal(literal) if literal == part => pattern.push(true),
                Segment::Literal(_) => return None,
                // The last variable of a longer path takes the rest.
                Segment::Var(_) if i + 1 == n && !exact => {
                    values.push(&path[start..]);
                    pattern.push(false);
                }
                Segment::Var(_) => {
                    values.push(part);
                    pattern.push(false);
                }
            }
        }
        Some(PathMatch {
            values,
            batch,
            rank: (exact, pattern),
        })
    }
}

impl PathMatch<'_> {
    /// Whether this match is a better one than `other`.
    pub fn beats(&self, other: &PathMatch<'_>) -> bool {
        self.rank > other.rank
    }
}

/// A variable's name: `[a-z][a-z0-9_]*`, not a name templates use
/// themselves.
fn var_name(name: &str) -> Result<(), String> {
    let valid = name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !valid {
        return Err(format!(
            "`{{{name}}}`: a variable's name is a-z, then a-z, 0-9 and '_' (at most 32)"
        ));
    }
    if ["base", "query"].contains(&name) {
        return Err(format!("`{{{name}}}` is reserved"));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    /// The route's path variable of this index.
    Var(usize),
    /// A query parameter of the client's request, or its default.
    Query {
        name: String,
        default: Option<String>,
    },
    /// A value in the answer of the route's upstream of this index
    /// (`shown` as written, for errors).
    Ref {
        upstream: usize,
        path: JsonPath,
        shown: String,
    },
    /// A value in the list element this call is made for (`each`).
    Each(JsonPath),
}

/// What a template's references read: other upstreams' answers, and the
/// list element a call is for.
pub struct Answers<'a> {
    /// The answer of each upstream of the route, by index, once it is in.
    pub upstream: &'a dyn Fn(usize) -> Option<&'a Value>,
    /// The element, for an upstream called once per element of a list.
    pub element: Option<&'a Value>,
}

/// An upstream's URL: literal text, the route's `{variables}`,
/// `{query.name}` or `{query.name:default}` parameters, values of other
/// upstreams' answers (`{inventory.warehouse_id}`) and, for an upstream
/// called once per element of a list, `{each}` or `{each.sku}`. `{base}`,
/// the upstream's base URL, is filled in when the configuration is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlTemplate {
    parts: Vec<Part>,
    /// `scheme://authority`, all literal.
    origin: String,
}

impl UrlTemplate {
    /// Parses `raw` for a route whose path variables are `vars` and whose
    /// upstreams are named `upstreams`; `base` is what `{base}` stands for,
    /// if the upstream has one.
    pub fn parse(
        raw: &str,
        base: Option<&str>,
        vars: &[&str],
        upstreams: &[&str],
    ) -> Result<UrlTemplate, String> {
        let mut parts: Vec<Part> = Vec::new();
        let literal = |parts: &mut Vec<Part>, text: &str| match parts.last_mut() {
            _ if text.is_empty() => {}
            Some(Part::Literal(l)) => l.push_str(text),
            _ => parts.push(Part::Literal(text.to_string())),
        };
        let mut rest = raw;
        while let Some(open) = rest.find(['{', '}']) {
            literal(&mut parts, &rest[..open]);
            if rest[open..].starts_with('}') {
                return Err(format!("`{raw}`: a `}}` without its `{{`"));
            }
            let close = rest[open..]
                .find('}')
                .map(|c| open + c)
                .ok_or_else(|| format!("`{raw}`: a `{{` without its `}}`"))?;
            let inner = &rest[open + 1..close];
            if inner == "base" {
                let at_start = parts.is_empty();
                match base {
                    Some(base) if at_start => literal(&mut parts, base),
                    Some(_) => return Err(format!("`{raw}`: {{base}} may only start the URL")),
                    None => return Err(format!("`{raw}`: this upstream has no base URL")),
                }
            } else if let Some(query) = inner.strip_prefix("query.") {
                let (name, default) = match query.split_once(':') {
                    Some((name, default)) => (name, Some(default)),
                    None => (query, None),
                };
                query_name(name).map_err(|why| format!("`{raw}`: {why}"))?;
                if let Some(default) = default {
                    query_value(default)
                        .map_err(|why| format!("`{raw}`: the default of `{name}` {why}"))?;
                }
                parts.push(Part::Query {
                    name: name.to_string(),
                    default: default.map(str::to_string),
                });
            } else if let Some(index) = vars.iter().position(|v| *v == inner) {
                parts.push(Part::Var(index));
            } else if inner == "each" {
                parts.push(Part::Each(JsonPath::default()));
            } else if let Some(path) = inner.strip_prefix("each.") {
                let path = JsonPath::parse(path, 0).map_err(|why| format!("`{raw}`: {why}"))?;
                parts.push(Part::Each(path));
            } else if inner.contains('.') {
                let reference =
                    JsonPath::parse(inner, 0).map_err(|why| format!("`{raw}`: {why}"))?;
                let (name, path) = reference.split_first().expect("a path has a first key");
                let mut named = upstreams.iter().enumerate().filter(|(_, n)| **n == name);
                let upstream = match (named.next(), named.next()) {
                    (Some((index, _)), None) => index,
                    (Some(_), Some(_)) => {
                        return Err(format!(
                            "`{raw}`: `{{{inner}}}`: two upstreams of the route are named `{name}`"
                        ));
                    }
                    (None, _) => {
                        return Err(format!(
                            "`{raw}`: `{{{inner}}}` is neither a query parameter nor a value of                              an upstream of the route (`{name}` is none of: {})",
                            upstreams.join(", ")
                        ));
                    }
                };
                parts.push(Part::Ref {
                    upstream,
                    path,
                    shown: inner.to_string(),
                });
            } else {
                return Err(format!(
                    "`{raw}`: `{{{inner}}}` is not a variable of the route's path (it has: {})",
                    if vars.is_empty() {
                        "none".to_string()
                    } else {
                        vars.join(", ")
                    }
                ));
            }
            rest = &rest[close + 1..];
        }
        literal(&mut parts, rest);
        let prefix = match parts.first() {
            Some(Part::Literal(l)) => l.as_str(),
            _ => "",
        };
        let after_scheme = prefix
            .strip_prefix("http://")
            .or_else(|| prefix.strip_prefix("https://"))
            .ok_or_else(|| format!("`{raw}` must start with http://, https:// or {{base}}"))?;
        let authority_len = match after_scheme.find(['/', '?']) {
            Some(end) => end,
            None if parts.len() == 1 => after_scheme.len(),
            None => {
                return Err(format!(
                    "`{raw}`: the host is fixed by the configuration; a variable may not be part of it"
                ));
            }
        };
        if authority_len == 0 {
            return Err(format!("`{raw}` has no host"));
        }
        let origin = prefix[..prefix.len() - after_scheme.len() + authority_len].to_string();
        for part in &parts {
            if let Part::Literal(l) = part
                && let Some(c) = l
                    .chars()
                    .find(|c| c.is_whitespace() || c.is_control() || *c == '#')
            {
                return Err(format!("`{raw}` contains {c:?}"));
            }
        }
        Ok(UrlTemplate { parts, origin })
    }

    /// `scheme://authority`: where every call of this template goes.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The upstreams whose answers it uses, by index, each once.
    pub fn depends_on(&self) -> Vec<usize> {
        let mut on = Vec::new();
        for part in &self.parts {
            if let Part::Ref { upstream, .. } = part
                && !on.contains(upstream)
            {
                on.push(*upstream);
            }
        }
        on
    }

    /// Whether it uses `{each}`.
    pub fn uses_each(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Each(_)))
    }

    /// The query parameters it uses, each with its default if it has one.
    pub fn query_params(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        self.parts.iter().filter_map(|p| match p {
            Part::Query { name, default } => Some((name.as_str(), default.as_deref())),
            _ => None,
        })
    }

    /// The URL for `params` when it uses no answer: see [`render_with`].
    ///
    /// [`render_with`]: UrlTemplate::render_with
    pub fn render(&self, params: &Params) -> String {
        let none = |_| None;
        let answers = Answers {
            upstream: &none,
            element: None,
        };
        self.render_with(params, &answers)
            .unwrap_or_else(|why| format!("{}/<{why}>", self.origin))
    }

    /// The URL for `params` and `answers`, each value percent-encoded. A
    /// query parameter neither given nor defaulted is left empty: [`Params`]
    /// are built so that this cannot happen (a 400 first). A value from an
    /// answer must be a string or a number that passes [`query_value`]: an
    /// upstream's data is no more trusted than a client's. `Err` says which
    /// is missing or unusable.
    pub fn render_with(&self, params: &Params, answers: &Answers<'_>) -> Result<String, String> {
        let mut url = String::with_capacity(64);
        for part in &self.parts {
            match part {
                Part::Literal(l) => url.push_str(l),
                Part::Var(i) => encode(&mut url, params.path.get(*i).map_or("", |(_, v)| v)),
                Part::Query { name, default } => {
                    let value = params.query(name).or(default.as_deref());
                    debug_assert!(value.is_some(), "query parameter {name} was not checked");
                    encode(&mut url, value.unwrap_or_default());
                }
                Part::Ref {
                    upstream,
                    path,
                    shown,
                } => {
                    let value = (answers.upstream)(*upstream).and_then(|answer| path.get(answer));
                    let text = scalar(value).map_err(|why| format!("{shown} {why}"))?;
                    encode(&mut url, &text);
                }
                Part::Each(path) => {
                    let value = answers.element.and_then(|element| path.get(element));
                    let text = scalar(value).map_err(|why| match path.steps().is_empty() {
                        true => format!("the element {why}"),
                        false => format!("the element's {} {why}", path.display()),
                    })?;
                    encode(&mut url, &text);
                }
            }
        }
        Ok(url)
    }
}

/// A value from an answer as URL text: a string or a number, checked like
/// a query value.
pub fn scalar(value: Option<&Value>) -> Result<String, String> {
    let text = match value {
        None => return Err("is missing".into()),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => return Err("is not a string or a number".into()),
    };
    if text.is_empty() {
        return Err("is empty".into());
    }
    query_value(&text).map_err(|why| format!("is unusable: it {why}"))?;
    Ok(text)
}

/// Percent-encodes everything but RFC 3986's unreserved characters, so a
/// value stays one path segment or one query value wherever it lands.
pub(crate) fn encode(out: &mut String, value: &str) {
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// A query parameter's name in a template: 1 to 64 of `[A-Za-z0-9_-.]`.
fn query_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    match valid {
        true => Ok(()),
        false => Err(format!(
            "`{name}`: a query parameter's name is 1 to 64 of A-Z, a-z, 0-9, '-', '_', '.'"
        )),
    }
}

/// A query value, decoded: at most [`MAX_QUERY_VALUE_LEN`] bytes, without
/// control characters or `/ ? # \`, which could change what a URL means
/// to a server that decodes too early.
pub fn query_value(value: &str) -> Result<(), String> {
    if value.len() > MAX_QUERY_VALUE_LEN {
        return Err(format!(
            "is {} bytes long; at most {MAX_QUERY_VALUE_LEN} are allowed",
            value.len()
        ));
    }
    match value
        .chars()
        .find(|c| c.is_control() || ['/', '?', '#', '\\'].contains(c))
    {
        Some(c) => Err(format!("contains {c:?}")),
        None => Ok(()),
    }
}

/// Decodes one `application/x-www-form-urlencoded` component: `%XX` and
/// `+` for a space; `None` if malformed or not UTF-8.
pub fn decode(raw: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(raw.len());
    let mut input = raw.bytes();
    while let Some(b) = input.next() {
        match b {
            b'%' => {
                let hex = [input.next()?, input.next()?];
                let hex = std::str::from_utf8(&hex).ok()?;
                bytes.push(u8::from_str_radix(hex, 16).ok()?);
            }
            b'+' => bytes.push(b' '),
            b => bytes.push(b),
        }
    }
    String::from_utf8(bytes).ok()
}

/// The values one item's calls are made with: its path variables and the
/// request's query parameters, all checked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Params {
    /// The path variables, name and value, in the template's order.
    pub path: Vec<(String, String)>,
    /// The query parameters the route's templates use and the client gave,
    /// decoded.
    pub query: Vec<(String, String)>,
}

impl Params {
    /// The value of query parameter `name`, if the client gave one.
    pub fn query(&self, name: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests;
