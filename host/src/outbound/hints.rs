//! The hint headers in which the guest tells the host about an outgoing
//! request (its attempt number, its upstream's name). They are read and
//! stripped here, before anything leaves the machine.

pub use fanout_guest::protocol::HINT_PREFIX;
use fanout_guest::protocol::{HINT_ATTEMPT, HINT_UPSTREAM};

/// What the guest said about one outgoing request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hints {
    /// 1 for a first attempt, 2 and up for retries.
    pub(crate) attempt: u32,
    /// The upstream's logical name, when the guest gave one.
    pub(crate) upstream: Option<String>,
}

/// Removes every hint header from `headers` and returns what they said.
pub(crate) fn take_hints(headers: &mut http::HeaderMap) -> Hints {
    let names: Vec<http::HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with(HINT_PREFIX))
        .cloned()
        .collect();
    let mut hints = Hints {
        attempt: 1,
        upstream: None,
    };
    for name in names {
        let value = headers.remove(&name);
        let text = value.as_ref().and_then(|v| v.to_str().ok());
        match name.as_str() {
            HINT_ATTEMPT => {
                if let Some(n) = text.and_then(|t| t.parse().ok()) {
                    hints.attempt = n;
                }
            }
            HINT_UPSTREAM => hints.upstream = text.map(str::to_string),
            _ => {}
        }
    }
    hints
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_are_read_and_stripped() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-fanout-hint-attempt", "3".parse().unwrap());
        headers.insert("x-fanout-hint-upstream", "pricing".parse().unwrap());
        headers.insert("x-fanout-hint-future", "anything".parse().unwrap());
        headers.insert("accept", "application/json".parse().unwrap());
        assert_eq!(
            take_hints(&mut headers),
            Hints {
                attempt: 3,
                upstream: Some("pricing".into())
            }
        );
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("accept"));
        // No hints: a first attempt, as from any other guest.
        assert_eq!(
            take_hints(&mut headers),
            Hints {
                attempt: 1,
                upstream: None
            }
        );
    }
}
