//! JSON answers from files or memory, keyed by request path.

use super::{json_response, read_body};
use crate::response::full_body;
use crate::upstream::{Upstream, UpstreamBody, UpstreamFuture};
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use wasmtime_wasi_http::RequestOptions;

/// JSON answers keyed by request path: `GET /inventory/42` answers the file
/// `inventory/42.json` under the fixture directory, or 404.
pub struct FixtureUpstream {
    answers: HashMap<String, Bytes>,
}

impl FixtureUpstream {
    /// Loads every `*.json` file under `dir`. Each must be valid JSON: a
    /// broken fixture is a start-up error, not a failing request.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<FixtureUpstream, crate::error::Error> {
        let dir = dir.as_ref();
        let mut answers = HashMap::new();
        let mut pending: Vec<PathBuf> = vec![dir.to_path_buf()];
        let io = |path: &Path, e: std::io::Error| crate::error::Error::Fixture {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        while let Some(current) = pending.pop() {
            for entry in std::fs::read_dir(&current).map_err(|e| io(&current, e))? {
                let path = entry.map_err(|e| io(&current, e))?.path();
                if path.is_dir() {
                    pending.push(path);
                    continue;
                }
                if path.extension().and_then(|e| e.to_str()) != Some("json") {
                    continue;
                }
                let bytes = std::fs::read(&path).map_err(|e| io(&path, e))?;
                serde_json::from_slice::<serde_json::Value>(&bytes).map_err(|e| {
                    crate::error::Error::Fixture {
                        path: path.clone(),
                        reason: format!("invalid JSON: {e}"),
                    }
                })?;
                let key = path
                    .strip_prefix(dir)
                    .unwrap_or(&path)
                    .with_extension("")
                    .to_string_lossy()
                    .replace('\\', "/");
                answers.insert(format!("/{key}"), Bytes::from(bytes));
            }
        }
        if answers.is_empty() {
            return Err(crate::error::Error::Fixture {
                path: dir.to_path_buf(),
                reason: "no *.json files".into(),
            });
        }
        Ok(FixtureUpstream { answers })
    }

    /// Fixtures from memory: path (`/inventory/42`) to answer.
    pub fn from_map(
        answers: impl IntoIterator<Item = (String, serde_json::Value)>,
    ) -> FixtureUpstream {
        FixtureUpstream {
            answers: answers
                .into_iter()
                .map(|(path, value)| (path, Bytes::from(value.to_string())))
                .collect(),
        }
    }
}

impl Upstream for FixtureUpstream {
    fn call(&self, request: Request<UpstreamBody>, _options: RequestOptions) -> UpstreamFuture {
        let answer = self.answers.get(request.uri().path()).cloned();
        let path = request.uri().path().to_string();
        Box::pin(async move {
            read_body(request).await?;
            Ok(match answer {
                Some(bytes) => {
                    let mut response = Response::new(full_body(bytes));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("application/json"),
                    );
                    response
                }
                None => json_response(
                    StatusCode::NOT_FOUND,
                    &json!({ "error": { "code": "no_fixture", "message": format!("no fixture for {path}") } }),
                ),
            })
        })
    }
}
