//! Real HTTP to upstreams on a pooled, keep-alive client: HTTP/1.1 or
//! HTTP/2, plain or over TLS (rustls).
//!
//! TLS verifies the server against Mozilla's roots (webpki-roots: built in,
//! so a `FROM scratch` image needs no CA bundle) plus a `ca_file` of your
//! own, with SNI from the URL's host unless `tls_server_name` says
//! otherwise, and presents a client certificate when one is given (mutual
//! TLS). HTTP/2 is negotiated by ALPN over TLS (`auto`), or spoken with
//! prior knowledge (`always`, h2c on `http://`); its connections carry many
//! calls at once, so concurrent calls to one upstream share one.

use crate::error::{DnsFailure, client_error_code};
use crate::upstream::{TransportError, Upstream, UpstreamBody, UpstreamFuture};
use http::Request;
use http_body_util::BodyExt;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::{GaiAddrs, GaiResolver, Name};
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use wasmtime_wasi_http::RequestOptions;

/// How long a new TCP connection to an upstream may take, by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an idle pooled connection is kept for reuse, by default.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per upstream authority.
pub const POOL_MAX_IDLE_PER_HOST: usize = 512;

/// Settings of an [`HttpUpstream`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpOptions {
    /// Longest time to open a TCP connection.
    pub connect_timeout: Duration,
    /// Longest wait for the response head; `None`: only the guest's own
    /// first-byte timeout applies.
    pub response_timeout: Option<Duration>,
    /// How long an idle pooled connection is kept.
    pub idle_timeout: Duration,
    /// Which HTTP version to speak.
    pub http2: Http2,
    /// What `https://` trusts and presents.
    pub tls: TlsOptions,
}

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            response_timeout: None,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            http2: Http2::Auto,
            tls: TlsOptions::default(),
        }
    }
}

/// Which HTTP version an upstream is spoken to in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Http2 {
    /// HTTP/2 when the server offers it by ALPN over TLS; HTTP/1.1 on
    /// `http://` and otherwise.
    #[default]
    Auto,
    /// HTTP/2 only: over TLS, and with prior knowledge (h2c) on `http://`.
    Always,
    /// HTTP/1.1 only.
    Never,
}

/// What an upstream's TLS trusts and presents, beyond the built-in roots.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsOptions {
    /// PEM certificates of CAs to trust as well (internal services).
    pub ca_file: Option<PathBuf>,
    /// A PEM certificate chain to present (mutual TLS), with its key.
    pub client_cert: Option<PathBuf>,
    /// The PEM private key of `client_cert`.
    pub client_key: Option<PathBuf>,
    /// The name to expect in the server's certificate (and to send as SNI)
    /// instead of the URL's host.
    pub server_name: Option<String>,
}

/// A TLS setting that cannot be used: the key and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct TlsSettingError {
    /// `ca_file`, `client_cert`, `client_key` or `tls_server_name`.
    pub key: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

fn tls_config(tls: &TlsOptions) -> Result<rustls::ClientConfig, TlsSettingError> {
    let error = |key: &'static str| move |reason: String| TlsSettingError { key, reason };
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &tls.ca_file {
        let certs = read_certs(path).map_err(error("ca_file"))?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| error("ca_file")(format!("{}: {e}", path.display())))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| error("tls")(e.to_string()))?
        .with_root_certificates(roots);
    match (&tls.client_cert, &tls.client_key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let chain = read_certs(cert).map_err(error("client_cert"))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| error("client_key")(format!("{}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| error("client_key")(e.to_string()))
        }
        (Some(_), None) => Err(error("client_key")("client_cert needs it".into())),
        (None, Some(_)) => Err(error("client_cert")("client_key needs it".into())),
    }
}

/// Every certificate in a PEM file; none is an error.
fn read_certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

type Connector = HttpsConnector<HttpConnector<Resolver>>;

/// Real HTTP on a pooled, keep-alive client (hyper-util's, TLS by rustls).
///
/// Cloning is cheap and clones share the connection pool, which is keyed by
/// scheme and authority: one client can serve every upstream with the same
/// TLS settings.
#[derive(Clone)]
pub struct HttpUpstream {
    client: Client<Connector, UpstreamBody>,
    response_timeout: Option<Duration>,
}

impl Default for HttpUpstream {
    fn default() -> Self {
        HttpUpstream::new(HttpOptions::default())
    }
}

impl HttpUpstream {
    /// A client with its own connection pool.
    ///
    /// # Panics
    ///
    /// If `options.tls` names files that cannot be used; [`with_tls`]
    /// returns that as an error instead. With the default `tls` (the
    /// built-in roots only) it cannot fail.
    ///
    /// [`with_tls`]: HttpUpstream::with_tls
    pub fn new(options: HttpOptions) -> HttpUpstream {
        HttpUpstream::with_tls(options)
            .unwrap_or_else(|e| panic!("HttpUpstream::new: {e} (use with_tls to handle it)"))
    }

    /// A client with its own connection pool and `options.tls`: an error
    /// names the TLS setting that cannot be used (an unreadable file, no
    /// certificate in it, a key that does not match).
    pub fn with_tls(options: HttpOptions) -> Result<HttpUpstream, TlsSettingError> {
        let mut http = HttpConnector::new_with_resolver(Resolver(GaiResolver::new()));
        http.set_connect_timeout(Some(options.connect_timeout));
        // Small JSON requests and answers: Nagle's delay would dominate.
        http.set_nodelay(true);
        // The TLS connector below takes https:// too.
        http.enforce_http(false);
        let builder = HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(&options.tls)?)
            .https_or_http();
        let builder = match &options.tls.server_name {
            Some(name) => {
                let name = ServerName::try_from(name.clone()).map_err(|e| TlsSettingError {
                    key: "tls_server_name",
                    reason: format!("`{name}`: {e}"),
                })?;
                builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
            }
            None => builder,
        };
        let connector = match options.http2 {
            Http2::Never => builder.enable_http1().wrap_connector(http),
            Http2::Auto => builder.enable_all_versions().wrap_connector(http),
            Http2::Always => builder.enable_http2().wrap_connector(http),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(options.idle_timeout)
            .pool_max_idle_per_host(POOL_MAX_IDLE_PER_HOST)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .http2_only(options.http2 == Http2::Always)
            .build(connector);
        Ok(HttpUpstream {
            client,
            response_timeout: options.response_timeout,
        })
    }
}

impl Upstream for HttpUpstream {
    fn call(&self, request: Request<UpstreamBody>, options: RequestOptions) -> UpstreamFuture {
        let request_is_tls = request.uri().scheme_str() == Some("https");
        let response = self.client.request(request);
        // The pooled client has one connect timeout for all requests; the
        // response head waits for the tightest of the guest's options and
        // this upstream's own response timeout.
        let guest = match (options.connect_timeout, options.first_byte_timeout) {
            (Some(c), Some(f)) => Some(c + f),
            (c, f) => c.or(f),
        };
        let head_timeout = match (guest, self.response_timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let tls = request_is_tls;
        Box::pin(async move {
            let response = match head_timeout {
                Some(limit) => tokio::time::timeout(limit, response)
                    .await
                    .map_err(|_| TransportError::HttpResponseTimeout)?,
                None => response.await,
            };
            let response = response.map_err(|e| match client_error_code(&e) {
                // HTTP/2 keeps only the kind of an I/O error, and on a TLS
                // stream InvalidData is how tokio-rustls reports a TLS
                // failure (a TLS 1.3 server refusing the client's
                // certificate after the handshake, say).
                TransportError::InternalError(_) | TransportError::ConnectionTerminated
                    if tls
                        && crate::error::find::<std::io::Error>(&e).map(std::io::Error::kind)
                            == Some(std::io::ErrorKind::InvalidData) =>
                {
                    TransportError::TlsProtocolError
                }
                code => code,
            })?;
            Ok(response.map(|body| body.map_err(TransportError::from).boxed_unsync()))
        })
    }
}

/// The system resolver, its errors marked as [`DnsFailure`]s so that a
/// failed lookup maps to `DnsError` by type.
#[derive(Clone)]
struct Resolver(GaiResolver);

impl tower::Service<Name> for Resolver {
    type Response = GaiAddrs;
    type Error = DnsFailure;
    type Future = Pin<Box<dyn Future<Output = Result<GaiAddrs, DnsFailure>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), DnsFailure>> {
        self.0.poll_ready(cx).map_err(DnsFailure)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let lookup = self.0.call(name);
        Box::pin(async move { lookup.await.map_err(DnsFailure) })
    }
}
