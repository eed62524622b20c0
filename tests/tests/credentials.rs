//! Credentials the host adds to an upstream's calls: they reach the
//! upstream, never the guest (nor its environment), never a log line, and a
//! guest that sets the same fields is overridden.

use anyhow::Result;
use fanout_tests::{Behaviour, MockUpstream, TestHost};
use http::StatusCode;

const TOKEN_VAR: &str = "FANOUT_TEST_CREDENTIALS_TOKEN";
const TOKEN: &str = "tok-8c1f2a9e";
const KEY: &str = "key-51d0b7c3";

#[tokio::test]
async fn host_credentials_reach_the_upstream_and_nothing_else() -> Result<()> {
    let logs = fanout_tests::capture_logs();
    // SAFETY: this binary's only test that touches the environment, before
    // the host (and its threads) read it.
    unsafe { std::env::set_var(TOKEN_VAR, TOKEN) };
    let key_file = tempfile::NamedTempFile::new()?;
    std::fs::write(key_file.path(), format!("{KEY}\n"))?;

    let upstream = MockUpstream::start(Behaviour::status(200)).await?;
    let fanout = fanout_tests::builder()
        .component_path(fanout_tests::HOSTILE_COMPONENT_PATH)
        .cache_dir(fanout_tests::cache_dir())
        .http_upstream("api", upstream.base_url())
        .upstream_header(
            "api",
            "authorization",
            &format!("Bearer ${{env:{TOKEN_VAR}}}"),
        )
        .upstream_header(
            "api",
            "x-api-key",
            &format!("${{file:{}}}", key_file.path().display()),
        )
        .build()?;
    let host = TestHost::start(fanout).await?;

    // The guest tries to set both fields itself.
    let answer = host
        .get_with(
            &format!("/call?{}/x", upstream.base_url()),
            &[("authorization", "Bearer guest"), ("x-api-key", "guest")],
        )
        .await?;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    assert_eq!(answer.json["status"], 200, "{}", answer.json);
    let seen = &upstream.calls()[0].headers;
    let values = |name: &str| -> Vec<_> { seen.get_all(name).iter().cloned().collect() };
    assert_eq!(values("authorization"), [format!("Bearer {TOKEN}")]);
    assert_eq!(values("x-api-key"), [KEY]);

    // Not in the guest's environment.
    let env = host.get("/env").await?;
    assert_eq!(env.status, StatusCode::OK);
    let env = env.json.to_string();
    assert!(!env.contains(TOKEN) && !env.contains(KEY), "{env}");
    assert!(env.contains("FANOUT_UPSTREAM_API"), "{env}");

    // Nor in any log line.
    let logged = serde_json::to_string(&logs.events())?;
    assert!(logged.contains("request"), "the log was captured");
    assert!(!logged.contains(TOKEN) && !logged.contains(KEY), "{logged}");
    Ok(())
}

#[test]
fn a_missing_credential_stops_the_start_and_names_it() {
    let err = fanout_tests::builder()
        .http_upstream("api", "http://127.0.0.1:9")
        .upstream_header(
            "api",
            "authorization",
            "Bearer ${env:FANOUT_TEST_NEVER_SET}",
        )
        .build()
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("api") && err.contains("FANOUT_TEST_NEVER_SET"),
        "{err}"
    );
}
