//! Header fields the host adds to every call of one upstream: credentials
//! (`authorization = "Bearer ${env:PRICING_TOKEN}"`) that the guest never
//! sees, cannot read, and cannot override.
//!
//! The values are resolved once, at start ([`resolve`]): `${env:NAME}` from
//! the host's environment, `${file:PATH}` from a file (one trailing newline
//! dropped, as secret mounts end with one). They are marked sensitive, so
//! that HTTP/2 never indexes them and `Debug` prints no value.

use crate::upstream::{Upstream, UpstreamBody, UpstreamFuture};
use http::{HeaderMap, HeaderName, HeaderValue, Request, header};
use std::sync::Arc;
use wasmtime_wasi_http::RequestOptions;

/// Fields a configuration may not set: they describe the connection or the
/// message, which the client sets itself, or carry the trace context.
const RESERVED: [HeaderName; 8] = [
    header::HOST,
    header::CONNECTION,
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::TE,
    header::UPGRADE,
    header::TRAILER,
    HeaderName::from_static("traceparent"),
];

/// An upstream with `headers` set on every call, over the guest's own.
pub struct WithHeaders {
    inner: Arc<dyn Upstream>,
    headers: HeaderMap,
}

impl WithHeaders {
    pub(crate) fn new(inner: Arc<dyn Upstream>, headers: HeaderMap) -> WithHeaders {
        WithHeaders { inner, headers }
    }
}

impl Upstream for WithHeaders {
    fn call(&self, mut request: Request<UpstreamBody>, options: RequestOptions) -> UpstreamFuture {
        for name in self.headers.keys() {
            // Whatever the guest set under this name goes: one value, ours.
            request.headers_mut().remove(name);
        }
        for (name, value) in &self.headers {
            request.headers_mut().append(name, value.clone());
        }
        self.inner.call(request, options)
    }
}

/// The field `name` with its value resolved from `template`. The error
/// names what is missing, never a value.
pub fn resolve(name: &str, template: &str) -> Result<(HeaderName, HeaderValue), String> {
    let name = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("`{name}` is not a header field name"))?;
    if RESERVED.contains(&name) || name.as_str().starts_with("x-fanout-") {
        return Err(format!("`{name}` is set by the host itself"));
    }
    let mut value = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        value.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| format!("`{name}`: an unclosed ${{"))?;
        let reference = &rest[start + 2..start + end];
        value.push_str(&lookup(reference).map_err(|e| format!("`{name}`: {e}"))?);
        rest = &rest[start + end + 1..];
    }
    value.push_str(rest);
    let mut value = HeaderValue::from_str(&value)
        .map_err(|_| format!("`{name}`: the value has bytes a header field cannot hold"))?;
    value.set_sensitive(true);
    Ok((name, value))
}

fn lookup(reference: &str) -> Result<String, String> {
    match reference.split_once(':') {
        Some(("env", var)) => std::env::var(var)
            .map_err(|_| format!("environment variable `{var}` is not set (or not UTF-8)")),
        Some(("file", path)) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("cannot read `{path}`: {e}"))?;
            let text = text.strip_suffix('\n').unwrap_or(&text);
            Ok(text.strip_suffix('\r').unwrap_or(text).to_string())
        }
        _ => Err(format!(
            "`${{{reference}}}` is neither ${{env:NAME}} nor ${{file:PATH}}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_resolve_and_errors_name_no_value() {
        // SAFETY: set before any thread of this test reads the environment,
        // under a name no other test uses.
        unsafe { std::env::set_var("FANOUT_TEST_WITH_HEADERS_TOKEN", "t0k3n") };
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), "k3y\n").unwrap();
        let (name, value) = resolve(
            "Authorization",
            "Bearer ${env:FANOUT_TEST_WITH_HEADERS_TOKEN}",
        )
        .unwrap();
        assert_eq!(name, header::AUTHORIZATION);
        assert_eq!(value, "Bearer t0k3n");
        assert!(value.is_sensitive());
        assert!(!format!("{value:?}").contains("t0k3n"));
        let template = format!("${{file:{}}}", file.path().display());
        assert_eq!(resolve("x-api-key", &template).unwrap().1, "k3y");

        for (name, template, says) in [
            (
                "authorization",
                "${env:FANOUT_TEST_NOT_SET_ANYWHERE}",
                "FANOUT_TEST_NOT_SET_ANYWHERE",
            ),
            ("x-api-key", "${file:/nonexistent/key}", "/nonexistent/key"),
            ("x-api-key", "${vault:x}", "neither"),
            ("x-api-key", "${env:X", "unclosed"),
            ("host", "evil", "set by the host"),
            ("x-fanout-upstream", "a", "set by the host"),
            ("bad name", "a", "not a header field name"),
            ("x-a", "line\nbreak", "cannot hold"),
        ] {
            let err = resolve(name, template).unwrap_err();
            assert!(err.contains(says), "{name} = {template}: {err}");
        }
    }
}
