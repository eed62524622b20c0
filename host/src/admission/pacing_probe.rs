//! Whether holding sheds slows the load at all, found by trying without.
//!
//! Holding a shed ([`HeldSheds`](super::HeldSheds)) slows a client that
//! waits for each answer before it sends again: wrk, hey, k6's virtual
//! users, a retry loop. It does not slow an open-loop load (requests at a
//! rate of their own, as users arrive, over a pool of connections): the
//! pool sends the next request on another connection, opens new ones while
//! the held ones wait, and the held 503s only come late. `fanout-bench load
//! --rate 6200` (twice this 2-core box's capacity, 50 ms upstreams,
//! `serve-fanout`), two windows each: with holds, 2,022 and 2,134 2xx/s,
//! non-2xx p99 1,003 ms, 1,206 and 1,484 connections; with none, 2,440 and
//! 2,254 2xx/s, non-2xx p99 10 and 16 ms, 624 and 740 connections. With
//! this probe (each vote then measured a round with holds of its own),
//! holds went off 3.6 s into that load (in six windows of six),
//! and from then the non-2xx p99 was 10-103 ms (against 1,001-1,004 ms
//! without the probe, alternating); against 5,000 and 500 clients that
//! re-send at once, and 32 at four places in a debug build for 20 s, holds
//! stayed on throughout, and goodput was as without the probe.
//!
//! One connection cannot tell the two loads apart (a pool reuses the
//! connection just answered, at once, as a re-sender does), but the whole
//! can: a closed loop's arrival rate follows how fast it is answered, an
//! open loop's does not. So while the host sheds, now and then it measures
//! the arrival rate (over the second half of the time since the last
//! probe, and with holds over [`HELD_ROUND`] at least), then does the
//! other thing for a while ([`PROBE`]) and measures again. A trial of
//! sheds at once ends early once the load has shown it re-sends (see
//! `resent`): each of its arrivals is a shed the host pays for.
//! - Holding, holds go off after [`OFF_VOTES`] probes in a row in which
//!   requests came less than [`OPEN_RATIO`] times as fast with sheds at
//!   once; the sheds held then go out at once. One probe is not enough: a
//!   closed loop's arrivals come in waves (held clients come back
//!   together), and one short trial in the trough of a wave looks like an
//!   open loop. After a vote the next probe measures with holds for only
//!   [`VOTE_HELD`], topped up to a [`HELD_ROUND`] by the last (`topped_up`):
//!   the three trials come 300 ms apart, and an open loop's sheds are held
//!   for 1.9 s from its first shed, not 3.6 s as when each vote measured a
//!   round of its own. A trial after a vote in which requests came at
//!   least [`OPEN_RATIO`] but less than [`RESET_RATIO`] times as fast keeps
//!   the votes, once. At twice the 2-core Intel box's saturation rate
//!   (`fanout-bench load --rate 11500`, 50 ms upstreams, a 2 s warm-up,
//!   three pairs of windows against the code before): non-2xx p99 147-223
//!   ms against 1,001-2,230 ms, at as many 2xx a second (3,181-3,281
//!   against 3,163-3,221). What is left of that p99 is 504s (0-406 a
//!   window): admitted requests whose upstreams answered late while the
//!   two cores were full. Against 5,000 and 500 clients that re-send at
//!   once (two pairs each) holds stayed on, as before. That open loop's
//!   trials are not always clean: at 12,500 a second (eight pairs of
//!   windows against the same code without [`RESET_RATIO`]), a trial
//!   came out 1.3-1.9 times as fast often enough that holds stayed on past
//!   the warm-up in 4 windows of 8 without it (non-2xx p99 1.5-5.0 s) and
//!   in 2 of 8 with it (1.6 and 3.1 s); the other windows' p99 was
//!   177-292 ms either way, 2xx a second medians 2,682 against 2,637.
//!   What is left is the load itself: holding slows this client (its
//!   connections are all held, and new ones take time to open) by as much
//!   as a trial can tell, so it looks half like a closed loop.
//! - Not holding, holds come back on after one probe in which requests came
//!   at least [`RESEND_RATIO`] times as fast without holds as with them.
//!
//! - Holding, a probe in which requests came at least [`RESEND_RATIO`]
//!   times as fast with sheds at once says more: this load's clients
//!   re-send at once, and a shed answered at once on an earned token
//!   ([`FastSheds`](super::FastSheds)) only brings the next request, and
//!   the next shed, at once. Until a later probe or a calm says otherwise,
//!   a client back too soon is held whatever tokens are left
//!   ([`Pacing::Hold`]'s `fast_sheds`). Against 5,000 and 500 clients that
//!   re-send at once (`serve-fanout`, 50 ms upstreams, 2-core AMD box, 7
//!   pairs of windows against the code spending tokens on them), that
//!   halved the sheds or better (18,520-22,774 against 40,069-49,119 503s
//!   in 8 s at c=5000; 3,513-3,545 against 9,526-10,829 at c=500), all but
//!   ended the 504s (5 against 89), and brought the 2xx p99 down in every
//!   pair (176-194 against 196-241 ms at c=5000, 157 against 168-177 at
//!   c=500); the 2xx a second were within the noise (medians 2,251
//!   against 2,232 at c=5000).
//!
//! A verdict that stands doubles the time to the next probe, up to
//! [`MAX_PERIOD`]; a change brings it back to [`MIN_PERIOD`], a vote for
//! one to [`VOTE_PERIOD`]. Holding is where it starts, and where it goes
//! back to after [`CALM`] without a paced shed: of the two mistakes,
//! re-senders answered at once cost the host's CPU, an open loop's held
//! 503s only come late.
//!
//! Hand-written: this is a policy of the host's own, small and tested with
//! explicit times.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The shortest and the longest each of a probe's two measurements lasts.
/// A trial of sheds at once is the shortest: a closed loop's clients that
/// are not held come back at once, and within milliseconds. A trial of
/// holds lasts as long as the connections open take to send a request each
/// at the arrival rate measured before it, within these bounds: a closed
/// loop's re-sender is held only when it comes back, so a shorter trial
/// would see few of them held, and an open loop's sheds are held for as
/// long as it lasts.
pub const PROBE: (Duration, Duration) = (Duration::from_millis(50), Duration::from_millis(250));

/// The least time arrivals with holds are measured over: a held client
/// comes back once in it (holds last `Retry-After` or longer), so it is
/// not measured on the crest or in the trough of the waves in which held
/// clients come back. Over 50-100 ms, the overload tests' re-senders (32
/// and 300 clients, debug build) measured from 150 to 6,500 arrivals a
/// second with holds.
pub const HELD_ROUND: Duration = super::RETRY_AFTER;

/// The least time arrivals with holds are measured over for a probe after a
/// vote for holds off: the rate with holds is then that of the last
/// [`HELD_ROUND`], this measurement's and the last probe's before it (see
/// `topped_up`). Three full rounds put 3.6 s between an open loop's first
/// shed and its last vote, its sheds held all the while; this puts 1.9 s.
/// The trials are still three, each in its own stretch of time: 300 ms
/// apart, they fall at different points of a closed loop's waves (a second
/// apart, as its held clients come back), where 1.15 s apart they fell at
/// nearly the same point of each.
pub const VOTE_HELD: Duration = Duration::from_millis(150);

/// Time to the first probe, and to the next after the mode changed.
pub const MIN_PERIOD: Duration = Duration::from_millis(500);

/// Time to the next probe after a vote for holds off: an open loop's
/// sheds are held until the last vote.
pub const VOTE_PERIOD: Duration = Duration::from_millis(200);

/// The longest time between probes, once a verdict has stood many times.
pub const MAX_PERIOD: Duration = Duration::from_secs(32);

/// Requests come at least this many times as fast with holds off as with
/// them on: the load re-sends, and holds come back on.
pub const RESEND_RATIO: f64 = 1.5;

/// Requests come less than this many times as fast with holds off as with
/// them on: a vote for holds off.
pub const OPEN_RATIO: f64 = 1.25;

/// Votes in a row that turn holds off.
pub const OFF_VOTES: u32 = 3;

/// After a vote for holds off, a trial in which requests came at least
/// [`OPEN_RATIO`] but less than this many times as fast with sheds at once
/// says nothing: the votes stand, and the next probe comes as after a vote.
/// A second such trial in a row ends them. An open loop's arrivals come in
/// bursts too (its client, short of CPU or of connections, falls behind
/// and catches up): at 12,500 a second on the 2-core Intel box, the third
/// of an open loop's trials once saw 1.52 times the rate with holds, which
/// began the votes again, and its sheds were held 3 s longer. The closed
/// loops measured beside it (c=500, 1,000 and 5,000 re-sending at once)
/// came 2.4-9.7 times as fast in 11 trials of 12, and 1.62 times in one.
pub const RESET_RATIO: f64 = 2.0;

/// Without a paced shed for this long, the next one starts afresh.
pub const CALM: Duration = Duration::from_secs(5);

/// Fewer arrivals than this in either measurement say nothing.
const MIN_ARRIVALS: u64 = 10;

/// Whether sheds are held now, and a probe's state.
#[derive(Debug)]
pub struct PacingProbe {
    arrivals: AtomicU64,
    state: Mutex<State>,
    /// Bumped when holds go off, to send the held sheds out.
    released: tokio::sync::watch::Sender<u64>,
}

#[derive(Debug)]
struct State {
    /// The mode in force between probes: holds on.
    holding: bool,
    phase: Phase,
    period: Duration,
    /// Probes in a row, while holding, that looked like an open loop.
    votes: u32,
    /// The last probe, after a vote, said nothing (see [`RESET_RATIO`]).
    undecided: bool,
    /// The last probe, holding, saw the load re-send (see the module's
    /// docs): no fast sheds to clients back too soon.
    resends: bool,
    /// Arrivals with holds, and over how long, that the last probe judged
    /// by, while votes for holds off stand: what the next probe's
    /// measurement tops up.
    held: Option<(u64, Duration)>,
    last_shed: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// In the mode, measuring nothing until `measure_at`: what follows a
    /// change is not what the mode does.
    Settled { until: Instant, measure_at: Instant },
    /// In the mode until `until`, counting arrivals from `start`.
    Measuring {
        until: Instant,
        start: Instant,
        arrivals: u64,
    },
    /// Counting arrivals in the other mode from `start`, for `span`;
    /// `measured` came in the mode, with how long that took.
    Trying {
        start: Instant,
        arrivals: u64,
        span: Duration,
        measured: (u64, Duration),
    },
}

impl State {
    /// Whether the next trial may say nothing ([`RESET_RATIO`]): after a
    /// vote, and not twice in a row.
    fn may_say_nothing(&self) -> bool {
        self.votes > 0 && !self.undecided
    }
}

impl Phase {
    /// In the mode for `period` from `now`, measured over its second half.
    fn settled(now: Instant, period: Duration) -> Phase {
        Phase::Settled {
            until: now + period,
            measure_at: now + period / 2,
        }
    }
}

/// What a shed should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pacing {
    /// Hold it if its client came back too soon.
    Hold {
        /// Which release a hold waits for (see [`PacingProbe::released`]).
        release: u64,
        /// Whether a shed the host's answers earned
        /// ([`FastSheds`](super::FastSheds)) may send it at once instead:
        /// not once a probe has seen the load re-send at once.
        fast_sheds: bool,
    },
    /// Send it at once.
    AtOnce,
}

impl Default for PacingProbe {
    fn default() -> PacingProbe {
        PacingProbe {
            arrivals: AtomicU64::new(0),
            state: Mutex::new(State {
                holding: true,
                // Replaced at the first shed.
                phase: Phase::settled(Instant::now(), MIN_PERIOD),
                period: MIN_PERIOD,
                votes: 0,
                undecided: false,
                resends: false,
                held: None,
                last_shed: None,
            }),
            released: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl PacingProbe {
    /// A request arrived (any request, shed or not).
    pub fn arrived(&self) {
        self.arrivals.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether sheds are held between probes (the mode, not a probe's
    /// trial of the other).
    pub fn holding(&self) -> bool {
        self.lock().holding
    }

    /// Returns when holds go off after `release` (what [`Pacing::Hold`]
    /// carried).
    pub async fn released(&self, release: u64) {
        let mut receiver = self.released.subscribe();
        // The sender lives as long as `self`, which the caller borrows.
        let _ = receiver.wait_for(|now| *now != release).await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What a shed paced at `now`, with `connections` open on the server,
    /// should do; moves the probe along.
    pub fn shed(&self, now: Instant, connections: usize) -> Pacing {
        let mut state = self.lock();
        // Read under the lock, so that each holder sees no fewer than the
        // last: the counts below subtract.
        let arrivals = self.arrivals.load(Ordering::Relaxed);
        if state
            .last_shed
            .is_none_or(|last| now.saturating_duration_since(last) >= CALM)
        {
            state.holding = true;
            state.period = MIN_PERIOD;
            state.votes = 0;
            state.undecided = false;
            state.resends = false;
            state.held = None;
            state.phase = Phase::settled(now, MIN_PERIOD);
        }
        state.last_shed = Some(now);
        let in_mode = match state.phase {
            Phase::Settled { until, measure_at } => {
                if now >= measure_at {
                    let least = match (state.holding, state.held) {
                        (true, Some(_)) => VOTE_HELD,
                        (true, None) => HELD_ROUND,
                        (false, _) => PROBE.0,
                    };
                    state.phase = Phase::Measuring {
                        until: until.max(now + least),
                        start: now,
                        arrivals,
                    };
                }
                true
            }
            Phase::Measuring {
                until,
                start,
                arrivals: from,
            } => {
                if now >= until {
                    let mut measured = (arrivals - from, now - start);
                    let span = if state.holding {
                        measured = topped_up(state.held, measured);
                        PROBE.0
                    } else {
                        Duration::from_secs_f64(connections as f64 / rate(measured).max(1.0))
                            .clamp(PROBE.0, PROBE.1)
                    };
                    state.phase = Phase::Trying {
                        start: now,
                        arrivals,
                        span,
                        measured,
                    };
                    false
                } else {
                    true
                }
            }
            Phase::Trying {
                start,
                arrivals: from,
                span,
                measured,
            } => {
                let tried = (arrivals - from, now - start);
                // A trial that may yet say nothing runs on.
                let ratio = if state.may_say_nothing() {
                    RESET_RATIO
                } else {
                    RESEND_RATIO
                };
                if now >= start + span
                    || (state.holding && tried.0 >= resent(measured, span, ratio))
                {
                    self.conclude(&mut state, now, measured, tried);
                    true
                } else {
                    false
                }
            }
        };
        if in_mode == state.holding {
            Pacing::Hold {
                release: *self.released.borrow(),
                fast_sheds: !state.resends,
            }
        } else {
            Pacing::AtOnce
        }
    }

    /// A probe's end: `measured` arrivals in the mode, `tried` in the
    /// other, each with how long it took.
    fn conclude(
        &self,
        state: &mut State,
        now: Instant,
        measured: (u64, Duration),
        tried: (u64, Duration),
    ) {
        let (with_holds, without) = if state.holding {
            (rate(measured), rate(tried))
        } else {
            (rate(tried), rate(measured))
        };
        let enough = measured.0.min(tried.0) >= MIN_ARRIVALS;
        let holding = if !enough {
            state.holding
        } else if state.holding {
            state.resends = without >= with_holds * RESEND_RATIO;
            let vote = without < with_holds * OPEN_RATIO;
            let undecided = !vote && state.may_say_nothing() && without < with_holds * RESET_RATIO;
            if vote || undecided {
                state.votes += u32::from(vote);
                state.held = Some(measured);
            } else {
                state.votes = 0;
                state.held = None;
            }
            state.undecided = undecided;
            state.votes < OFF_VOTES
        } else {
            without >= with_holds * RESEND_RATIO
        };
        if !holding {
            state.resends = false;
            state.undecided = false;
            state.held = None;
            // Held in the mode, or in a trial that did not convince.
            self.released.send_modify(|release| *release += 1);
            state.votes = 0;
        }
        state.period = if state.votes > 0 {
            VOTE_PERIOD
        } else if holding == state.holding {
            (state.period * 2).min(MAX_PERIOD)
        } else {
            MIN_PERIOD
        };
        tracing::debug!(
            holding,
            votes = state.votes,
            undecided = state.undecided,
            resends = state.resends,
            with_holds,
            without,
            span_ms = tried.1.as_millis() as u64,
            next_probe_ms = state.period.as_millis() as u64,
            "shed pacing probed"
        );
        state.holding = holding;
        state.phase = Phase::settled(now, state.period);
    }
}

/// Arrivals in a trial of sheds at once, lasting `span`, that already say
/// the load re-sends: `ratio` ([`RESEND_RATIO`], or after a vote
/// [`RESET_RATIO`]) times what the whole trial would bring at the rate
/// `measured` with holds. Counted as they come, a trial
/// ends there: a closed loop answered at once is back within a
/// millisecond, and each of its requests is a shed the host pays for (in
/// a debug build, 32 such clients brought 615 in one 50 ms trial, against
/// 222 answers in the whole 1.5 s).
fn resent(measured: (u64, Duration), span: Duration, ratio: f64) -> u64 {
    let whole = (rate(measured) * span.as_secs_f64() * ratio).ceil() as u64;
    whole.max(MIN_ARRIVALS)
}

/// Arrivals with holds over the last [`HELD_ROUND`]: `new`, and for the
/// part of the round it did not cover, the rate of `old`. Without `old`,
/// or once `new` covers the round, `new` alone.
fn topped_up(old: Option<(u64, Duration)>, new: (u64, Duration)) -> (u64, Duration) {
    match old {
        Some(old) if new.1 < HELD_ROUND => {
            let rest = (HELD_ROUND - new.1).as_secs_f64();
            (new.0 + (rate(old) * rest).round() as u64, HELD_ROUND)
        }
        _ => new,
    }
}

/// Arrivals a second.
fn rate((count, over): (u64, Duration)) -> f64 {
    count as f64 / over.as_secs_f64().max(1e-3)
}

#[cfg(test)]
mod tests;
