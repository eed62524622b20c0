use super::*;

const MS: fn(u64) -> Duration = Duration::from_millis;

/// A load: arrivals per millisecond while sheds are held, and while not.
#[derive(Clone, Copy)]
struct Load {
    holding: u64,
    at_once: u64,
    /// Connections open: with the arrival rate, how long a trial of holds
    /// lasts (none: the shortest).
    connections: usize,
}

/// Wrk-like clients: answered at once, they come back four times as fast.
const RE_SENDERS: Load = Load {
    holding: 5,
    at_once: 20,
    connections: 0,
};

/// Requests at a rate of their own, whatever is done with them.
const OPEN_LOOP: Load = Load {
    holding: 6,
    at_once: 6,
    connections: 0,
};

/// Drives `probe` one shed a millisecond from `from` for `length` under
/// `load`; returns, per millisecond, whether the shed was held.
fn drive(probe: &PacingProbe, from: Instant, length: Duration, load: Load) -> Vec<bool> {
    paced(probe, from, length, load)
        .iter()
        .map(|pacing| matches!(pacing, Pacing::Hold { .. }))
        .collect()
}

/// As [`drive`], returning what each shed was told.
fn paced(probe: &PacingProbe, from: Instant, length: Duration, load: Load) -> Vec<Pacing> {
    let mut paced = Vec::new();
    let mut at = Duration::ZERO;
    while at < length {
        let pacing = probe.shed(from + at, load.connections);
        let arrivals = match pacing {
            Pacing::Hold { .. } => load.holding,
            Pacing::AtOnce => load.at_once,
        };
        for _ in 0..arrivals {
            probe.arrived();
        }
        paced.push(pacing);
        at += MS(1);
    }
    paced
}

/// Held, and answered at once on an earned token if one is left.
fn token_spent(pacing: &Pacing) -> bool {
    matches!(
        pacing,
        Pacing::Hold {
            fast_sheds: true,
            ..
        }
    )
}

/// Held whatever tokens are left.
fn tokens_kept(pacing: &Pacing) -> bool {
    matches!(
        pacing,
        Pacing::Hold {
            fast_sheds: false,
            ..
        }
    )
}

/// Whether `future` is ready at once.
fn ready(future: impl std::future::Future<Output = ()>) -> bool {
    let mut future = std::pin::pin!(future);
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    future.as_mut().poll(&mut context).is_ready()
}

/// The milliseconds at which a run of sheds at once began.
fn trials(held: &[bool]) -> Vec<usize> {
    (0..held.len())
        .filter(|&i| !held[i] && (i == 0 || held[i - 1]))
        .collect()
}

#[test]
fn re_senders_stay_held_and_are_probed_ever_more_rarely() {
    let probe = PacingProbe::default();
    let t0 = Instant::now();
    let Pacing::Hold { release, .. } = probe.shed(t0, 0) else {
        panic!("holding at first")
    };
    let held = drive(&probe, t0 + MS(1), Duration::from_secs(20), RE_SENDERS);
    assert!(probe.holding());
    assert!(!ready(probe.released(release)), "holds never went off");
    // The first probe measures from a quarter of a second in, for a second
    // (HELD_ROUND), then tries sheds at once (the drive began at 1 ms).
    // Each trial ends as soon as the arrivals outnumber what its whole
    // 50 ms would have brought at 1.5 times the rate with holds (375, at
    // five a millisecond): at twenty a millisecond, after 18 or 19 ms
    // (where a millisecond's twenty fall). The period to the next doubles,
    // 1 s (half a second settling, a second measuring), 2 s, 4 s, 8 s.
    let starts = trials(&held);
    assert_eq!(starts[0], 1_249, "{starts:?}");
    let lengths: Vec<usize> = starts
        .iter()
        .map(|&start| held[start..].iter().take_while(|h| !**h).count())
        .collect();
    assert!(
        lengths.iter().all(|ms| (18..=19).contains(ms)),
        "{lengths:?}"
    );
    // The verdict falls at the first shed after the trial.
    let periods: Vec<usize> = starts
        .windows(2)
        .zip(&lengths)
        .map(|(w, ms)| w[1] - w[0] - ms)
        .collect();
    assert_eq!(&periods[..4], &[1_500, 2_000, 4_000, 8_000], "{starts:?}");
    let at_once = held.iter().filter(|h| !**h).count();
    assert_eq!(at_once, lengths.iter().sum::<usize>(), "only the trials");
}

#[test]
fn an_open_loop_is_answered_at_once_after_three_votes_and_its_held_sheds_go_out() {
    let probe = PacingProbe::default();
    let t0 = Instant::now();
    let Pacing::Hold { release, .. } = probe.shed(t0, 0) else {
        panic!("holding at first")
    };
    let waiting = probe.released(release);
    let held = drive(&probe, t0 + MS(1), Duration::from_secs(20), OPEN_LOOP);
    assert!(!probe.holding());
    // Three trials of sheds at once, each a vote for holds off: the first
    // after a second measured with holds (at 1,250 ms), the next two 300 ms
    // apart (100 ms settling, 150 measuring with holds, 50 trying); off
    // from the third on but in the later probes' trials of holds, ever
    // more rarely.
    assert_eq!(&trials(&held)[..3], &[1_249, 1_549, 1_849]);
    assert!(held[1_899..].iter().take(500).all(|h| !*h));
    let after = held[1_849..].iter().filter(|h| **h).count();
    assert!(after <= 50 * 5, "{after} ms of holds in the trials");
    assert!(ready(waiting), "the held sheds were not released");
}

#[test]
fn one_vote_is_not_enough() {
    let probe = PacingProbe::default();
    let t0 = Instant::now();
    // An open loop for the first probe, re-senders after it.
    drive(&probe, t0, MS(1_310), OPEN_LOOP);
    let held = drive(&probe, t0 + MS(1_310), MS(3_000), RE_SENDERS);
    assert!(probe.holding());
    assert!(held.iter().filter(|h| !**h).count() <= 3 * 50);
}

#[test]
fn a_trial_of_holds_that_fails_releases_what_it_held() {
    let probe = PacingProbe::default();
    let t0 = Instant::now();
    drive(&probe, t0, MS(2_000), OPEN_LOOP);
    assert!(!probe.holding());
    // The next probe, 500 ms after the verdict at 1,900 ms: measures sheds
    // at once, then holds for 50 ms.
    let mut release = None;
    for ms in 2_000..2_600 {
        if let Pacing::Hold { release: r, .. } = probe.shed(t0 + MS(ms), 0) {
            release.get_or_insert(r);
        }
        for _ in 0..OPEN_LOOP.holding {
            probe.arrived();
        }
    }
    let release = release.expect("the trial held");
    assert!(
        ready(probe.released(release)),
        "the trial's holds still waiting"
    );
    assert!(!probe.holding());
}

#[test]
fn a_load_that_turns_into_re_senders_is_held_again_at_the_next_probe() {
    let probe = PacingProbe::default();
    let t0 = Instant::now();
    drive(&probe, t0, Duration::from_secs(10), OPEN_LOOP);
    assert!(!probe.holding());
    let held = drive(
        &probe,
        t0 + Duration::from_secs(10),
        Duration::from_secs(20),
        RE_SENDERS,
    );
    assert!(probe.holding());
    // The probes' period had grown to 8 s: the change is seen within it.
    let settled = (0..held.len()).find(|&i| held[i..].iter().take(500).all(|h| *h));
    assert!(settled.unwrap() < 8_500, "{settled:?}");
}

#[test]
fn after_a_calm_it_starts_again_holding() {
    let probe = PacingProbe::default();
    let t0 = Instant::now();
    // Off at 1,900 ms, a trial of holds from 2,400 to 2,450 ms.
    drive(&probe, t0, MS(2_700), OPEN_LOOP);
    assert!(!probe.holding());
    // Quiet for less than CALM: still off.
    let later = t0 + MS(2_700) + CALM - MS(10);
    assert_eq!(probe.shed(later, 0), Pacing::AtOnce);
    // Quiet for CALM: holding again, the first probe as at the start.
    let much_later = later + CALM;
    assert!(matches!(probe.shed(much_later, 0), Pacing::Hold { .. }));
    assert!(probe.holding());
    let held = drive(&probe, much_later + MS(1), MS(1_400), RE_SENDERS);
    assert_eq!(trials(&held), vec![1_249]);
}

#[test]
fn too_few_arrivals_change_nothing() {
    let probe = PacingProbe::default();
    let t0 = Instant::now();
    // One arrival every 10 ms however sheds are answered: 5 in a 50 ms
    // trial, too few to judge by.
    let mut modes = Vec::new();
    for ms in (0..5_000).step_by(10) {
        probe.shed(t0 + MS(ms), 0);
        probe.arrived();
        modes.push(probe.holding());
    }
    assert!(modes.iter().all(|h| *h));
}

#[test]
fn a_trial_of_holds_lasts_as_long_as_the_connections_take_to_send_one_each() {
    let probe = PacingProbe::default();
    let t0 = Instant::now();
    // 1,200 connections open at 6 arrivals a millisecond (6,000 a
    // second): 200 ms.
    let load = Load {
        connections: 1_200,
        ..OPEN_LOOP
    };
    let held = drive(&probe, t0, Duration::from_secs(5), load);
    assert!(!probe.holding());
    // Off at 1,900 ms; the next probe measures from 2,150 to 2,400 ms,
    // then holds for 200 ms.
    assert!(held[1_900..2_400].iter().all(|h| !*h));
    assert!(held[2_400..2_600].iter().all(|h| *h));
    assert!(!held[2_600]);
    // At most PROBE's longest.
    let probe = PacingProbe::default();
    let load = Load {
        connections: 10_000_000,
        ..OPEN_LOOP
    };
    let held = drive(&probe, t0, Duration::from_secs(5), load);
    let trial = held[2_400..].iter().take_while(|h| **h).count();
    assert_eq!(MS(trial as u64), PROBE.1);
    // A trial of sheds at once is the shortest whatever is open (against
    // re-senders, shorter still: see above).
    let probe = PacingProbe::default();
    let load = Load {
        connections: 10_000_000,
        ..OPEN_LOOP
    };
    let held = drive(&probe, t0, Duration::from_secs(2), load);
    assert_eq!(trials(&held)[0], 1_250);
    assert_eq!(held[1_250..].iter().take_while(|h| !**h).count(), 50);
}

#[test]
fn re_senders_get_no_earned_sheds_from_the_first_verdict_until_a_calm() {
    let probe = PacingProbe::default();
    let t0 = Instant::now();
    let seen = paced(&probe, t0, Duration::from_secs(10), RE_SENDERS);
    // Tokens may be spent until the first probe's trial of sheds at once
    // (from 1,250 ms) ends, at the first shed after 18 or 19 ms...
    let verdict = seen.iter().position(tokens_kept).expect("a verdict");
    assert!((1_268..=1_270).contains(&verdict), "{verdict}");
    assert!(seen[..1_250].iter().all(token_spent));
    // ...and never after it: each later probe sees the same, and between
    // its trials of sheds at once every shed is held.
    assert!(!seen[verdict..].iter().any(token_spent));
    let held = seen[verdict..].iter().filter(|p| tokens_kept(p)).count();
    assert!(held >= 10_000 - verdict - 4 * 19, "{held}");
    // After a calm, the first probe starts afresh, and so do the tokens.
    let later = t0 + Duration::from_secs(10) + CALM;
    assert!(token_spent(&probe.shed(later, 0)));
}

#[test]
fn an_open_loop_is_never_refused_its_earned_sheds() {
    let probe = PacingProbe::default();
    let t0 = Instant::now();
    let seen = paced(&probe, t0, Duration::from_secs(10), OPEN_LOOP);
    assert!(!seen.iter().any(tokens_kept));
    assert!(seen[..1_250].iter().all(token_spent));
}

#[test]
fn re_senders_that_turn_into_an_open_loop_get_earned_sheds_at_the_next_probe() {
    let probe = PacingProbe::default();
    let t0 = Instant::now();
    // Re-senders for 3 s: the probes' trials at 1,250 and 2,769 ms saw
    // them.
    let seen = paced(&probe, t0, Duration::from_secs(3), RE_SENDERS);
    assert!(tokens_kept(seen.last().unwrap()));
    // Then an open loop: the next probe's trial (at 4,788 ms, 50 ms of
    // sheds at once) is a vote for holds off, and from its end the load
    // no longer counts as re-sending (the next trial would be at 5,088).
    let seen = paced(&probe, t0 + Duration::from_secs(3), MS(2_000), OPEN_LOOP);
    let trial = seen
        .iter()
        .position(|p| *p == Pacing::AtOnce)
        .expect("a trial");
    assert_eq!(trial, 1_788);
    assert!(seen[..trial].iter().all(tokens_kept));
    assert_eq!(seen[trial + 50..].iter().position(token_spent), Some(0));
    assert!(probe.holding(), "one vote is not enough");
}

#[test]
fn two_votes_are_not_enough_and_a_failed_vote_measures_a_full_round_again() {
    let probe = PacingProbe::default();
    let t0 = Instant::now();
    // An open loop for the first two probes (votes at 1,300 and 1,600 ms),
    // re-senders from then on.
    drive(&probe, t0, MS(1_610), OPEN_LOOP);
    assert!(probe.holding());
    let held = drive(&probe, t0 + MS(1_610), MS(3_000), RE_SENDERS);
    assert!(probe.holding());
    // The third trial (at 1,850 ms) saw them re-send; the probe after it
    // measures with holds for a whole HELD_ROUND again, from 100 ms after
    // that verdict (the period had doubled to 400 ms).
    let starts: Vec<usize> = trials(&held).iter().map(|i| i + 1_610).collect();
    assert_eq!(starts[0], 1_850, "{starts:?}");
    let verdict = starts[0]
        + held[starts[0] - 1_610..]
            .iter()
            .take_while(|h| !**h)
            .count();
    assert!(
        starts[1] >= verdict + 200 + 1_000,
        "{starts:?}, verdict at {verdict}"
    );
}

#[test]
fn a_measurement_after_a_vote_is_topped_up_to_a_round_by_the_last() {
    let new = (30, MS(150));
    assert_eq!(topped_up(None, new), new);
    // 1,000 a second over the 850 ms the new one did not cover.
    assert_eq!(
        topped_up(Some((1_000, MS(1_000))), new),
        (30 + 850, HELD_ROUND)
    );
    assert_eq!(
        topped_up(Some((2_400, MS(1_200))), new),
        (30 + 1_700, HELD_ROUND)
    );
    // A round or more of its own needs nothing of the last.
    let long = (1_300, MS(1_100));
    assert_eq!(topped_up(Some((1, MS(1_000))), long), long);
}

/// An open loop whose arrivals with sheds at once come in a burst: half
/// again as fast, as when its client falls behind and catches up.
const BURSTING: Load = Load {
    holding: 6,
    at_once: 9,
    connections: 0,
};

#[test]
fn after_a_vote_one_trial_a_little_fast_says_nothing() {
    let probe = PacingProbe::default();
    let t0 = Instant::now();
    // Votes at 1,300 ms; the second trial (1,550-1,600 ms) sees the burst,
    // runs its whole 50 ms (1.5 times is short of RESET_RATIO), and the
    // votes stand; the next two trials (1,850 and 2,150 ms) are votes.
    drive(&probe, t0, MS(1_500), OPEN_LOOP);
    let burst = drive(&probe, t0 + MS(1_500), MS(200), BURSTING);
    assert_eq!(burst.iter().filter(|h| !**h).count(), 50);
    let held = drive(&probe, t0 + MS(1_700), MS(1_000), OPEN_LOOP);
    assert_eq!(trials(&held)[..2], [150, 450]);
    assert!(held[499..].iter().all(|h| !*h), "holds off at 2,200 ms");
    assert!(!probe.holding());
}

#[test]
fn two_trials_a_little_fast_in_a_row_end_the_votes() {
    let probe = PacingProbe::default();
    let t0 = Instant::now();
    drive(&probe, t0, MS(1_500), OPEN_LOOP);
    // From the second trial on, every trial sees the burst: the second
    // says nothing, the third ends the votes, and from then on none is a
    // vote (1.5 times is more than OPEN_RATIO).
    let held = drive(&probe, t0 + MS(1_500), Duration::from_secs(10), BURSTING);
    assert!(probe.holding());
    let starts = trials(&held);
    assert_eq!(starts[..2], [50, 350], "{starts:?}");
    // After the third, a whole round measured with holds again (the
    // period had doubled to 400 ms: 200 settling, 1,000 measuring).
    assert_eq!(starts[2], 350 + 50 + 1_200, "{starts:?}");
}
