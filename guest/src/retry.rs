//! Retries: which failures are worth another attempt, and how long to wait
//! before it (exponential backoff with full jitter).

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How one upstream is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1: never retry).
    pub max_attempts: u32,
    /// Backoff ceiling before the second attempt; it doubles per attempt.
    pub initial_backoff_ms: u64,
    /// The doubling stops here.
    pub max_backoff_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            initial_backoff_ms: 10,
            max_backoff_ms: 50,
        }
    }
}

impl RetryPolicy {
    /// Checks the policy's bounds, saying what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=10).contains(&self.max_attempts) {
            return Err(format!(
                "max_attempts {} is outside 1..=10",
                self.max_attempts
            ));
        }
        if self.initial_backoff_ms > self.max_backoff_ms || self.max_backoff_ms > 10_000 {
            return Err(format!(
                "backoff must satisfy initial_backoff_ms ({}) <= max_backoff_ms ({}) <= 10000",
                self.initial_backoff_ms, self.max_backoff_ms
            ));
        }
        Ok(())
    }

    /// The backoff ceiling after `attempt` (1-based) failed:
    /// `min(max, initial * 2^(attempt - 1))`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let doubled = self
            .initial_backoff_ms
            .saturating_mul(1u64 << (attempt.saturating_sub(1)).min(20));
        Duration::from_millis(doubled.min(self.max_backoff_ms))
    }

    /// Full jitter: a uniformly random wait in `[0, ceiling(attempt)]`, from
    /// the 64 random bits in `random`. Spreading retries over the whole
    /// interval is what keeps many clients from retrying in lockstep.
    pub fn backoff(&self, attempt: u32, random: u64) -> Duration {
        let ceiling = self.ceiling(attempt).as_micros() as u64;
        Duration::from_micros(random % (ceiling + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64: a seeded, deterministic source of test randomness.
    fn splitmix(seed: u64) -> impl FnMut() -> u64 {
        let mut state = seed;
        move || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    #[test]
    fn ceiling_doubles_up_to_the_maximum() {
        let policy = RetryPolicy {
            max_attempts: 6,
            initial_backoff_ms: 10,
            max_backoff_ms: 50,
        };
        let ceilings: Vec<u64> = (1..=5)
            .map(|a| policy.ceiling(a).as_millis() as u64)
            .collect();
        assert_eq!(ceilings, [10, 20, 40, 50, 50]);
        // No overflow for absurd attempt numbers.
        assert_eq!(policy.ceiling(u32::MAX).as_millis(), 50);
    }

    #[test]
    fn backoff_is_full_jitter() {
        let policy = RetryPolicy {
            max_attempts: 3,
            initial_backoff_ms: 10,
            max_backoff_ms: 100,
        };
        let mut random = splitmix(42);
        const N: usize = 20_000;
        // After the 3rd attempt the ceiling is 40 ms.
        let ceiling = policy.ceiling(3).as_secs_f64();
        let samples: Vec<f64> = (0..N)
            .map(|_| policy.backoff(3, random()).as_secs_f64() / ceiling)
            .collect();
        assert!(samples.iter().all(|s| (0.0..=1.0).contains(s)));
        let mean = samples.iter().sum::<f64>() / N as f64;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
        // Uniform over [0, ceiling]: every tenth of it gets ~10% of the waits.
        let mut deciles = [0usize; 10];
        for s in &samples {
            deciles[((s * 10.0) as usize).min(9)] += 1;
        }
        for (i, count) in deciles.iter().enumerate() {
            let share = *count as f64 / N as f64;
            assert!((share - 0.1).abs() < 0.015, "decile {i}: {share}");
        }
        // Waits close to zero happen: this is full jitter, not equal jitter.
        assert!(samples.iter().any(|s| *s < 0.01));
    }

    #[test]
    fn same_seed_same_waits_other_seed_other_waits() {
        let policy = RetryPolicy::default();
        let run = |seed| {
            let mut random = splitmix(seed);
            (1..=3)
                .map(|a| policy.backoff(a, random()))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn policy_is_validated() {
        assert!(RetryPolicy::default().validate().is_ok());
        let bad = [
            RetryPolicy {
                max_attempts: 0,
                ..Default::default()
            },
            RetryPolicy {
                max_attempts: 11,
                ..Default::default()
            },
            RetryPolicy {
                initial_backoff_ms: 100,
                max_backoff_ms: 10,
                ..Default::default()
            },
        ];
        for policy in bad {
            assert!(policy.validate().is_err(), "{policy:?}");
        }
    }
}
