//! Test support for fanout's integration tests, one module per kit: mock
//! upstreams on port 0 that record what they saw ([`mock_upstream`]), one
//! that breaks HTTP one fault at a time ([`faulty_upstream`]), the
//! fanout host started in-process on port 0 ([`test_host`]), log capture
//! ([`logs`]) and an OTLP collector ([`otlp`]).

pub mod faulty_upstream;
pub mod logs;
pub mod mock_upstream;
pub mod otlp;
pub mod test_host;
pub mod tls_upstream;

pub use faulty_upstream::{Fault, FaultyUpstream};
pub use logs::{Logs, capture_logs};
pub use mock_upstream::{Behaviour, Call, MockUpstream, ProductUpstreams};
pub use otlp::{OtlpReceiver, ReceivedSpan};
pub use test_host::{Answer, TestHost, cache_dir, get_json};
pub use tls_upstream::{Pki, TlsUpstream};

/// Milliseconds, for brevity in tests: `MS(50)`.
pub const MS: fn(u64) -> std::time::Duration = std::time::Duration::from_millis;

include!(concat!(env!("OUT_DIR"), "/components.rs"));
