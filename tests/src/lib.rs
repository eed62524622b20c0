//! Test support for fanout's integration tests, one module per kit: mock
//! upstreams on port 0 that record what they saw ([`mock_upstream`]), one
//! that breaks HTTP one fault at a time ([`faulty_upstream`]), the
//! fanout host started in-process on port 0 ([`test_host`]), log capture
//! ([`logs`]), an OTLP collector ([`otlp`]) and a watchdog for tests
//! that could otherwise hang ([`watchdog`]).

pub mod faulty_upstream;
pub mod logs;
pub mod mock_upstream;
pub mod otlp;
pub mod test_host;
pub mod tls_upstream;
pub mod watchdog;

pub use faulty_upstream::{Fault, FaultyUpstream};
pub use logs::{Logs, capture_logs};
pub use mock_upstream::{Behaviour, Call, MockUpstream, ProductUpstreams};
pub use otlp::{OtlpReceiver, ReceivedSpan};
pub use test_host::{Answer, TestHost, cache_dir, get_json, sample};
pub use tls_upstream::{Pki, TlsUpstream};
pub use watchdog::{Watchdog, watchdog};

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

/// The environment variable that picks the build of the built-in guest the
/// tests' hosts serve: unset or `0.2`, the `wasi:http@0.2` one (the
/// default); `0.3`, the `wasi:http@0.3` one. CI runs the suite in each.
/// Tests of another component (the hostile guests) are the same in both.
pub const WASI_HTTP_ENV: &str = "FANOUT_TEST_WASI_HTTP";

/// The build of the built-in guest the tests run (see [`WASI_HTTP_ENV`]).
pub fn wasi_http() -> fanout_host::WasiHttpVersion {
    match std::env::var(WASI_HTTP_ENV).as_deref() {
        Err(_) | Ok("0.2") => fanout_host::WasiHttpVersion::P2,
        Ok("0.3") => fanout_host::WasiHttpVersion::P3,
        Ok(other) => panic!("{WASI_HTTP_ENV}={other} is not a wasi:http version: 0.2 or 0.3"),
    }
}

/// The built-in guest's component file for [`wasi_http`].
pub fn guest_component_path() -> &'static str {
    match wasi_http() {
        fanout_host::WasiHttpVersion::P2 => fanout_host::GUEST_COMPONENT_PATH,
        fanout_host::WasiHttpVersion::P3 => fanout_host::GUEST_P3_COMPONENT_PATH,
    }
}

/// The default limits, with the tests' instance reuse.
pub fn limits() -> fanout_host::Limits {
    fanout_host::Limits {
        instance_reuse: instance_reuse(),
        ..fanout_host::Limits::default()
    }
}

/// A host builder with the tests' limits ([`limits`]) and build of the
/// built-in guest ([`wasi_http`]).
pub fn builder() -> fanout_host::FanoutBuilder {
    fanout_host::Fanout::builder()
        .limits(limits())
        .builtin_guest(wasi_http())
}

/// Milliseconds, for brevity in tests: `MS(50)`.
pub const MS: fn(u64) -> std::time::Duration = std::time::Duration::from_millis;

include!(concat!(env!("OUT_DIR"), "/components.rs"));
