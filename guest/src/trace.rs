//! W3C trace context (`traceparent`), done by the guest itself so that
//! propagation works on any host, `wasmtime serve` included.
//!
//! The incoming request's `traceparent` names the trace; without a valid one
//! the guest starts a new trace. Every outgoing attempt carries the same
//! trace id with a span id of its own.

/// The trace a request belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace's id.
    pub trace_id: [u8; 16],
    /// The caller's span (all zeros when the guest started the trace).
    pub parent_id: [u8; 8],
    /// The trace flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceContext {
    /// Parses `00-<32 hex>-<16 hex>-<2 hex>`. Per the W3C spec, an all-zero
    /// trace or parent id, or version `ff`, makes the header invalid. A
    /// future version is read for its first four fields.
    pub fn parse(header: &str) -> Option<TraceContext> {
        let mut parts = header.trim().split('-');
        let version = parts.next()?;
        let (trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?);
        if version.len() != 2 || version == "ff" || !is_lower_hex(version) {
            return None;
        }
        if version == "00" && parts.next().is_some() {
            return None;
        }
        let trace_id: [u8; 16] = decode(trace)?;
        let parent_id: [u8; 8] = decode(parent)?;
        let [flags]: [u8; 1] = decode(flags)?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceContext {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// A new, sampled trace from 24 random bytes (trace id, then unused).
    pub fn new_root(random: impl FnMut() -> u64) -> TraceContext {
        let mut random = random;
        let mut trace_id = [0u8; 16];
        trace_id[..8].copy_from_slice(&random().to_le_bytes());
        trace_id[8..].copy_from_slice(&random().to_le_bytes());
        if trace_id == [0; 16] {
            trace_id[15] = 1;
        }
        TraceContext {
            trace_id,
            parent_id: [0; 8],
            flags: 0x01,
        }
    }

    /// The `traceparent` of a child span `span_id` of this trace.
    pub fn child_header(&self, span_id: u64) -> String {
        let span_id = if span_id == 0 { 1 } else { span_id };
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        push_hex(&mut out, &self.trace_id);
        out.push('-');
        push_hex(&mut out, &span_id.to_be_bytes());
        out.push('-');
        push_hex(&mut out, &[self.flags]);
        out
    }

    /// The trace id as 32 lower-case hex digits.
    pub fn trace_id_hex(&self) -> String {
        let mut out = String::with_capacity(32);
        push_hex(&mut out, &self.trace_id);
        out
    }
}

/// Lower-case hex, by table: one `core::fmt` call per byte, on every
/// attempt, stood out in the guest's profile.
fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn decode<const N: usize>(hex: &str) -> Option<[u8; N]> {
    if hex.len() != 2 * N || !is_lower_hex(hex) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Longest `tracestate` passed on, in bytes, and most list members: the
/// W3C limits (a vendor may drop a longer one). A client's value goes onto
/// every upstream call, 300 of them for a batch: an unbounded one would be
/// copied as often.
pub const MAX_TRACESTATE_LEN: usize = 512;
/// See [`MAX_TRACESTATE_LEN`].
pub const MAX_TRACESTATE_MEMBERS: usize = 32;

/// The client's `tracestate` if it is within the W3C limits, else `None`
/// (dropped whole: which members matter is the vendors' to say).
pub fn bounded_tracestate(value: String) -> Option<String> {
    let members = value.split(',').filter(|m| !m.trim().is_empty()).count();
    (value.len() <= MAX_TRACESTATE_LEN && members <= MAX_TRACESTATE_MEMBERS).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracestate_is_kept_within_the_w3c_limits() {
        let ok = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7".to_string();
        assert_eq!(bounded_tracestate(ok.clone()), Some(ok));
        assert_eq!(bounded_tracestate("a=b".repeat(200)), None, "too long");
        let many: Vec<String> = (0..33).map(|i| format!("v{i}=x")).collect();
        assert_eq!(bounded_tracestate(many.join(",")), None, "too many members");
        let max: Vec<String> = (0..32).map(|i| format!("v{i}=x")).collect();
        assert!(bounded_tracestate(max.join(",")).is_some());
    }

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_propagates_the_trace_id() {
        let ctx = TraceContext::parse(VALID).unwrap();
        assert_eq!(ctx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.flags, 1);
        let child = ctx.child_header(0xabcdef);
        assert_eq!(
            child,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000abcdef-01"
        );
        // The child is itself a valid traceparent with the same trace.
        assert_eq!(TraceContext::parse(&child).unwrap().trace_id, ctx.trace_id);
    }

    #[test]
    fn invalid_headers_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
        // A future version may carry more fields.
        assert!(TraceContext::parse(&format!("01{}-more", &VALID[2..])).is_some());
    }

    #[test]
    fn new_roots_are_sampled_and_random() {
        let mut n = 0u64;
        let a = TraceContext::new_root(|| {
            n += 1;
            n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        });
        let b = TraceContext::new_root(|| 7);
        assert_ne!(a.trace_id, b.trace_id);
        assert_eq!(a.flags, 1);
        assert_eq!(a.parent_id, [0; 8]);
        assert_eq!(
            TraceContext::parse(&a.child_header(5)).unwrap().trace_id,
            a.trace_id
        );
    }
}
