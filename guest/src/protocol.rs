//! The names the guest shares with its hosts: request and answer headers,
//! hint headers for the fanout host, and the environment variables it reads.
//! The fanout host imports them from here, so both sides spell them alike.

/// Header with which a client lowers the request's budget, in milliseconds.
pub const TIMEOUT_HEADER: &str = "x-request-timeout-ms";
/// Header on an answer that lacks an optional upstream's part, naming the
/// upstreams that failed (comma-separated).
pub const DEGRADED_HEADER: &str = "x-fanout-degraded";

/// Prefix of the headers in which the guest leaves hints for the host on
/// its outgoing requests. The fanout host reads and strips them; any other
/// host just forwards them.
pub const HINT_PREFIX: &str = "x-fanout-hint-";
/// The upstream's logical name.
pub const HINT_UPSTREAM: &str = "x-fanout-hint-upstream";
/// The attempt's number: 1, then 2 and up for retries.
pub const HINT_ATTEMPT: &str = "x-fanout-hint-attempt";

/// Optional JSON configuration (see [`RawConfig`](crate::config::RawConfig)).
pub const ENV_CONFIG: &str = "FANOUT_CONFIG";
/// Optional: overrides the configuration's `deadline_ms`.
pub const ENV_DEADLINE_MS: &str = "FANOUT_DEADLINE_MS";
/// `FANOUT_UPSTREAM_<NAME>`: the base URL of upstream `<name>`, upper-cased.
pub const ENV_UPSTREAM_PREFIX: &str = "FANOUT_UPSTREAM_";
