//! How many sheds go out at once to clients that came back too soon: a
//! token bucket filled by answers.
//!
//! A shed costs the host a request head to parse and a 503 to write. A
//! client that honours `Retry-After`, or an open-loop load (requests at a
//! fixed rate over pooled connections, which reuse the connection that
//! just got a 503 at once), should get its 503 in milliseconds; a client
//! that answers each 503 with a new request at once would, answered as
//! fast, turn every CPU into 503s. Each answer the host gives earns
//! [`FAST_SHEDS_PER_ANSWER`] sheds at once; beyond them, a connection that
//! came back sooner than `Retry-After` asked waits for its 503 (see
//! `Connection::pace_shed`). None are spent once the pacing probe has seen
//! the load re-send at once: until the probe's first verdict, the bucket is
//! what keeps an open loop's 503s fast, but a re-sender answered on a token
//! is only back at once for the next shed.
//!
//! Tied to answers, not to a rate: the CPU share sheds may take is then
//! their cost against an answer's (two of 35 µs against ~1 ms on the
//! release build: about 7 %), whatever the machine or the build, and it falls when
//! answers do. A fixed 2,000 a second starved a debug build's answers.
//!
//! Hand-written: governor and tower's `RateLimit` refill by time and
//! delay or refuse the caller; here answers refill it, and the caller only
//! asks whether a token is left.

use std::sync::Mutex;

/// Sheds answered at once per answer given: an open-loop load at up to
/// three times what the host answers gets all its 503s at once.
pub const FAST_SHEDS_PER_ANSWER: f64 = 2.0;

/// Tokens the bucket holds at most: a burst of sheds after a quiet spell
/// goes out at once, a standing flood does not.
///
/// A larger bucket trades one load for the other. The `fanout` binary
/// (defaults: one URL asked, so calls coalesced) with 50 ms upstreams,
/// side by side with a build holding 400: an open loop at twice the
/// closed-loop capacity got no held sheds at all with 400 (4 windows; 450
/// to 1,500 held in each with 100, enough for a 503 p99 of 1.0 s, against
/// 66-235 ms), at the same goodput. But against 5,000 clients that re-send
/// at once, the tokens stored while they were held went out as fast 503s
/// when they came back, each sent again at once: about 6 % fewer answers
/// (6 windows, median 1,714 against 1,828 2xx/s) and more 504s. With
/// 4,000, a quarter fewer.
const BURST: f64 = 100.0;

/// A bucket of sheds that may go out at once.
#[derive(Debug)]
pub struct FastSheds {
    per_answer: f64,
    tokens: Mutex<f64>,
}

impl FastSheds {
    /// `per_answer` sheds at once for each answer (0: none), starting
    /// with a full bucket.
    pub fn new(per_answer: f64) -> FastSheds {
        let per_answer = per_answer.max(0.0);
        FastSheds {
            per_answer,
            tokens: Mutex::new(if per_answer > 0.0 { BURST } else { 0.0 }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, f64> {
        self.tokens.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An answer was given: it earns its sheds.
    pub fn earn(&self) {
        let mut tokens = self.lock();
        *tokens = (*tokens + self.per_answer).min(BURST);
    }

    /// Takes a token if one is left.
    pub fn try_take(&self) -> bool {
        let mut tokens = self.lock();
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Default for FastSheds {
    fn default() -> FastSheds {
        FastSheds::new(FAST_SHEDS_PER_ANSWER)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_earn_sheds_up_to_the_burst() {
        let sheds = FastSheds::new(2.0);
        let taken = (0..500).filter(|_| sheds.try_take()).count();
        assert_eq!(taken, 100, "a full bucket at start");
        assert!(!sheds.try_take(), "no answers, no more");
        for _ in 0..10 {
            sheds.earn();
        }
        let taken = (0..500).filter(|_| sheds.try_take()).count();
        assert_eq!(taken, 20, "two per answer");
        for _ in 0..1000 {
            sheds.earn();
        }
        let taken = (0..500).filter(|_| sheds.try_take()).count();
        assert_eq!(taken, 100, "many answers still give one burst");
        assert!(!FastSheds::new(0.0).try_take());
    }
}
