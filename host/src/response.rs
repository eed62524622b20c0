//! Answers the host writes itself: the body type every answer has, and the
//! one JSON error shape.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};

/// Body of the answers `Fanout::handle` returns
/// (and of what upstreams answer: the same `wasi:http` body type).
pub type ResponseBody =
    http_body_util::combinators::UnsyncBoxBody<Bytes, wasmtime_wasi_http::Error>;

/// A whole body from bytes already in hand.
pub fn full_body(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A `status` answer with `body` of `content_type`.
pub(crate) fn with_body(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<ResponseBody> {
    let mut response = Response::new(full_body(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The one error shape: `{"error": {"code", "message"}}` with `status`.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response<ResponseBody> {
    with_body(status, "application/json", error_json(code, message))
}

/// The one error shape's body: `{"error": {"code", "message"}}`.
pub(crate) fn error_json(code: &str, message: &str) -> String {
    // Written straight from borrowed fields rather than through a
    // `serde_json::Value`: every shed is one of these, by the thousand a
    // second under overload.
    #[derive(serde::Serialize)]
    struct Shape<'a> {
        error: Detail<'a>,
    }
    #[derive(serde::Serialize)]
    struct Detail<'a> {
        code: &'a str,
        message: &'a str,
    }
    serde_json::to_string(&Shape {
        error: Detail { code, message },
    })
    .expect("two strings always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_error_answer_is_the_one_json_shape_with_its_text_escaped() {
        let message = "a \"quoted\" path\\ and a\nnewline";
        let response = error_response(StatusCode::SERVICE_UNAVAILABLE, "queue_full", message);
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({ "error": { "code": "queue_full", "message": message } })
        );
    }
}
