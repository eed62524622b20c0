//! A certificate authority made for one test (rcgen), and an upstream on
//! 127.0.0.1 port 0 that speaks HTTPS with its certificates (HTTP/1.1 or
//! HTTP/2 by ALPN), or plain HTTP/1.1 and h2c, and records each connection
//! and the HTTP version of each call.

use anyhow::Result;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A CA, with its certificate in a PEM file (for `ca_file`).
pub struct Pki {
    dir: tempfile::TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
    pub ca_file: PathBuf,
}

/// A certificate and its key, signed by a [`Pki`].
pub struct Leaf {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Pki {
    pub fn new() -> Result<Pki> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fanout test CA");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let dir = tempfile::tempdir()?;
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem())?;
        Ok(Pki { dir, ca, ca_file })
    }

    /// A certificate for `names`, written to `<file>.pem` and `<file>.key`.
    pub fn leaf(&self, file: &str, names: &[&str]) -> Result<Leaf> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let key = KeyPair::generate()?;
        let cert = CertificateParams::new(names)?.signed_by(&key, &self.ca)?;
        let cert_file = self.dir.path().join(format!("{file}.pem"));
        let key_file = self.dir.path().join(format!("{file}.key"));
        std::fs::write(&cert_file, cert.pem())?;
        std::fs::write(&key_file, key.serialize_pem())?;
        Ok(Leaf {
            chain: vec![cert.der().clone()],
            key: PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            cert_file,
            key_file,
        })
    }

    /// A server configuration presenting a certificate for `names`,
    /// offering h2 and http/1.1, and, with `require_client`, asking for a
    /// client certificate signed by this CA.
    pub fn server(&self, names: &[&str], require_client: bool) -> Result<rustls::ServerConfig> {
        let leaf = self.leaf("server", names)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let builder = if require_client {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.ca.der().clone())?;
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder.with_single_cert(leaf.chain, leaf.key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

#[derive(Default)]
struct State {
    connections: AtomicUsize,
    handshakes_failed: AtomicUsize,
    versions: Mutex<Vec<http::Version>>,
}

/// An upstream answering every path with a price, after `delay`.
pub struct TlsUpstream {
    pub addr: SocketAddr,
    state: Arc<State>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl TlsUpstream {
    /// HTTPS with `tls`, or, with `None`, plain HTTP/1.1 and h2c.
    pub async fn start(tls: Option<rustls::ServerConfig>, delay: Duration) -> Result<TlsUpstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::default());
        let acceptor = tls.map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)));
        let server = tokio::spawn({
            let state = state.clone();
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    state.connections.fetch_add(1, Ordering::SeqCst);
                    let (state, acceptor) = (state.clone(), acceptor.clone());
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn({
                            let state = state.clone();
                            move |request: hyper::Request<hyper::body::Incoming>| {
                                let state = state.clone();
                                async move {
                                    state.versions.lock().unwrap().push(request.version());
                                    tokio::time::sleep(delay).await;
                                    let body = r#"{"amount":12.5,"currency":"EUR"}"#;
                                    let mut response = hyper::Response::new(Full::new(
                                        Bytes::from_static(body.as_bytes()),
                                    ));
                                    response.headers_mut().insert(
                                        http::header::CONTENT_TYPE,
                                        http::HeaderValue::from_static("application/json"),
                                    );
                                    Ok::<_, std::convert::Infallible>(response)
                                }
                            }
                        });
                        let server =
                            hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                        match acceptor {
                            Some(acceptor) => match acceptor.accept(stream).await {
                                Ok(stream) => {
                                    let _ = server
                                        .serve_connection(TokioIo::new(stream), service)
                                        .await;
                                }
                                Err(_) => {
                                    state.handshakes_failed.fetch_add(1, Ordering::SeqCst);
                                }
                            },
                            None => {
                                let _ =
                                    server.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                    });
                }
            }
        });
        Ok(TlsUpstream {
            addr,
            state,
            server,
        })
    }

    /// `scheme://localhost:<port>`.
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://localhost:{}", self.addr.port())
    }

    /// Connections accepted, handshakes failed or not.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    pub fn handshakes_failed(&self) -> usize {
        self.state.handshakes_failed.load(Ordering::SeqCst)
    }

    /// The HTTP version of each call answered so far.
    pub fn versions(&self) -> Vec<http::Version> {
        self.state.versions.lock().unwrap().clone()
    }
}
