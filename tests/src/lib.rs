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

/// The environment variable that sets how many requests the tests' hosts
/// serve per instance (`Limits::instance_reuse`); unset, the default. CI
/// runs the suite once with the default and once with `1`, a fresh
/// instance per request: the two modes that ship.
pub const INSTANCE_REUSE_ENV: &str = "FANOUT_TEST_INSTANCE_REUSE";

/// The instance reuse the tests run with (see [`INSTANCE_REUSE_ENV`]).
pub fn instance_reuse() -> u32 {
    match std::env::var(INSTANCE_REUSE_ENV) {
        Ok(n) => n
            .parse()
            .unwrap_or_else(|_| panic!("{INSTANCE_REUSE_ENV}={n} is not a number")),
        Err(_) => fanout_host::limits::DEFAULT_INSTANCE_REUSE,
    }
}

/// The default limits, with the tests' instance reuse.
pub fn limits() -> fanout_host::Limits {
    fanout_host::Limits {
        instance_reuse: instance_reuse(),
        ..fanout_host::Limits::default()
    }
}

/// A host builder with the tests' limits ([`limits`]).
pub fn builder() -> fanout_host::FanoutBuilder {
    fanout_host::Fanout::builder().limits(limits())
}

/// Milliseconds, for brevity in tests: `MS(50)`.
pub const MS: fn(u64) -> std::time::Duration = std::time::Duration::from_millis;

include!(concat!(env!("OUT_DIR"), "/components.rs"));
