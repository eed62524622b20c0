//! HTTPS and HTTP/2 upstreams: a CA and certificates made in the test,
//! trusted by `ca_file` or not, a wrong name, mutual TLS, connections
//! shared by HTTP/2, and h2c.

use anyhow::Result;
use fanout_host::adapters::{Http2, HttpOptions, HttpUpstream, TlsOptions};
use fanout_tests::{MS, Pki, ProductUpstreams, TestHost, TlsUpstream};
use http::StatusCode;

/// A host with the standard inventory and reviews, and pricing at `url`
/// through a client with `options`.
async fn host_with_pricing(
    upstreams: &ProductUpstreams,
    url: &str,
    options: HttpOptions,
) -> Result<TestHost> {
    let client = HttpUpstream::with_tls(options)?;
    // Room to spare: fifty requests at once on a loaded machine must not
    // time out (the attempt timeouts are not what these tests are about).
    let upstream = |name: &str, field: &str| {
        serde_json::json!({"name": name, "url": format!("{{base}}/{name}/{{id}}"),
            "field": field, "timeout_ms": 1400})
    };
    let config = serde_json::json!({"deadline_ms": 1500, "max_deadline_ms": 1500,
        "routes": [{"path": "/products/{id}", "upstreams": [
            upstream("inventory", "inventory"), upstream("pricing", "price"),
            upstream("reviews", "reviews")]}]});
    let fanout = upstreams
        .builder()
        .http_upstream_with("pricing", url, client)
        .env("FANOUT_CONFIG", config.to_string())
        .admission(fanout_host::AdmissionMode::Fixed)
        .build()?;
    TestHost::start(fanout).await
}

fn trusting(pki: &Pki) -> HttpOptions {
    HttpOptions {
        tls: TlsOptions {
            ca_file: Some(pki.ca_file.clone()),
            ..TlsOptions::default()
        },
        ..HttpOptions::default()
    }
}

#[tokio::test]
async fn an_https_upstream_is_trusted_only_with_its_ca() -> Result<()> {
    let pki = Pki::new()?;
    let pricing = TlsUpstream::start(Some(pki.server(&["localhost"], false)?), MS(0)).await?;
    let upstreams = ProductUpstreams::start(MS(0)).await?;

    let host = host_with_pricing(&upstreams, &pricing.url("https"), trusting(&pki)).await?;
    let answer = host.get("/products/42").await?;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    assert_eq!(answer.json["price"]["amount"], 12.5);
    assert_eq!(pricing.handshakes_failed(), 0);

    // The built-in roots do not know this CA: a 502 that says TLS, after
    // one handshake only (a certificate error is not retried).
    let pricing = TlsUpstream::start(Some(pki.server(&["localhost"], false)?), MS(0)).await?;
    let host = host_with_pricing(&upstreams, &pricing.url("https"), HttpOptions::default()).await?;
    let answer = host.get("/products/42").await?;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.json);
    assert_eq!(answer.error_code(), "upstream_unavailable");
    let message = answer.json["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("TLS") && message.contains("certificate"),
        "{message}"
    );
    assert_eq!(pricing.connections(), 1, "not retried");
    assert!(pricing.versions().is_empty());
    Ok(())
}

#[tokio::test]
async fn the_certificate_must_name_the_server() -> Result<()> {
    let pki = Pki::new()?;
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    let pricing =
        TlsUpstream::start(Some(pki.server(&["pricing.internal"], false)?), MS(0)).await?;
    // Reached as localhost, the certificate names pricing.internal.
    let host = host_with_pricing(&upstreams, &pricing.url("https"), trusting(&pki)).await?;
    let answer = host.get("/products/42").await?;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.json);
    assert!(
        answer.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("TLS")
    );
    // Told which name to expect, it is trusted.
    let mut options = trusting(&pki);
    options.tls.server_name = Some("pricing.internal".into());
    let host = host_with_pricing(&upstreams, &pricing.url("https"), options).await?;
    let answer = host.get("/products/42").await?;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    Ok(())
}

#[tokio::test]
async fn mutual_tls_needs_the_client_certificate() -> Result<()> {
    let pki = Pki::new()?;
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    let pricing = TlsUpstream::start(Some(pki.server(&["localhost"], true)?), MS(0)).await?;
    let host = host_with_pricing(&upstreams, &pricing.url("https"), trusting(&pki)).await?;
    let answer = host.get("/products/42").await?;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.json);
    let message = answer.json["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("TLS"), "{message}");

    let client = pki.leaf("client", &["fanout"])?;
    let mut options = trusting(&pki);
    options.tls.client_cert = Some(client.cert_file.clone());
    options.tls.client_key = Some(client.key_file.clone());
    let host = host_with_pricing(&upstreams, &pricing.url("https"), options).await?;
    let answer = host.get("/products/42").await?;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.json);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_carries_concurrent_calls_on_one_connection() -> Result<()> {
    let pki = Pki::new()?;
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    let pricing = TlsUpstream::start(Some(pki.server(&["localhost"], false)?), MS(20)).await?;
    let host = host_with_pricing(&upstreams, &pricing.url("https"), trusting(&pki)).await?;
    // A first call opens the connection; then fifty at once (distinct ids:
    // nothing coalesced) ride on it.
    assert_eq!(host.get("/products/0").await?.status, StatusCode::OK);
    let host = &host;
    let answers = futures_util::future::join_all(
        (1..=50).map(|id| async move { host.get(&format!("/products/{id}")).await }),
    )
    .await;
    let statuses: Vec<_> = answers.into_iter().map(|a| a.map(|a| a.status)).collect();
    eprintln!(
        "versions {:?}, connections {}, statuses {statuses:?}",
        pricing.versions(),
        pricing.connections()
    );
    assert!(statuses.iter().all(|s| matches!(s, Ok(StatusCode::OK))));
    assert_eq!(pricing.versions().len(), 51);
    assert!(
        pricing
            .versions()
            .iter()
            .all(|v| *v == http::Version::HTTP_2)
    );
    assert_eq!(pricing.connections(), 1);
    Ok(())
}

#[tokio::test]
async fn h2c_with_prior_knowledge_and_http1_only() -> Result<()> {
    let upstreams = ProductUpstreams::start(MS(0)).await?;
    let pricing = TlsUpstream::start(None, MS(0)).await?;
    for (http2, version) in [
        (Http2::Always, http::Version::HTTP_2),
        (Http2::Never, http::Version::HTTP_11),
        (Http2::Auto, http::Version::HTTP_11),
    ] {
        let options = HttpOptions {
            http2,
            ..HttpOptions::default()
        };
        let host = host_with_pricing(&upstreams, &pricing.url("http"), options).await?;
        let answer = host.get("/products/42").await?;
        assert_eq!(answer.status, StatusCode::OK, "{http2:?}: {}", answer.json);
        assert_eq!(pricing.versions().last(), Some(&version), "{http2:?}");
    }
    Ok(())
}

#[test]
fn unusable_tls_files_are_named() {
    let err = |tls: TlsOptions| {
        HttpUpstream::with_tls(HttpOptions {
            tls,
            ..HttpOptions::default()
        })
        .err()
        .expect("refused")
        .to_string()
    };
    let missing = err(TlsOptions {
        ca_file: Some("/nonexistent/ca.pem".into()),
        ..TlsOptions::default()
    });
    assert!(
        missing.starts_with("ca_file:") && missing.contains("/nonexistent/ca.pem"),
        "{missing}"
    );
    let empty = tempfile::NamedTempFile::new().unwrap();
    let none = err(TlsOptions {
        ca_file: Some(empty.path().into()),
        ..TlsOptions::default()
    });
    assert!(none.contains("no PEM certificate"), "{none}");
    let alone = err(TlsOptions {
        client_cert: Some(empty.path().into()),
        ..TlsOptions::default()
    });
    assert!(alone.starts_with("client_key:"), "{alone}");
}

/// The README's deployment example (HTTPS upstreams, a token, a CA, a
/// route of two variables and a query parameter) passes every start-up
/// check: its CA and secret files made here, its token variable one that
/// is always set.
#[tokio::test]
async fn the_readmes_deployment_example_starts() -> Result<()> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))?;
    let example = readme
        .split("A real deployment")
        .nth(1)
        .and_then(|rest| rest.split("```toml\n").nth(1))
        .and_then(|block| block.split("```").next())
        .expect("README has the deployment example");
    let pki = Pki::new()?;
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("pricing-key");
    std::fs::write(&key, "k\n")?;
    let toml = example
        .replace(
            "/etc/fanout/internal-ca.pem",
            &pki.ca_file.display().to_string(),
        )
        .replace("/run/secrets/pricing-key", &key.display().to_string())
        .replace("${env:ORDERS_TOKEN}", "${env:PATH}");
    let file = dir.path().join("fanout.toml");
    std::fs::write(&file, toml)?;
    let config = fanout_host::config::FileConfig::load(&file)?;
    let builder = fanout_tests::builder().cache_dir(fanout_tests::cache_dir());
    let (builder, _) = config.apply(builder)?;
    builder.build()?;
    Ok(())
}
