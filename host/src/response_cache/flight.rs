//! Single flight: while a call for a key is in flight, identical calls
//! wait for it rather than go out.
//!
//! The first caller of a key leads: it makes the call and [`Leader::finish`]es
//! with what the waiters may have. A leader dropped before that (its
//! request was cancelled, its call failed or timed out) tells the waiters
//! nothing: they each come back, and the first of them leads next. A
//! failure is never shared, so a waiter is never handed a timeout that was
//! the leader's own deadline.
//!
//! Written here rather than taken from quick_cache's placeholders, which
//! would do the same for stored answers only: a waiter must also learn
//! that an answer was not shareable (and go its own way at once), and
//! coalescing works with no cache at all.

use super::store::Stored;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// What the leader's call gave the waiters.
#[derive(Clone)]
pub(crate) enum Outcome {
    /// A reusable answer: theirs too, if their `Vary` fields match.
    Shared(Arc<Stored>),
    /// An answer they may not have: each makes its own call.
    NotShared,
}

type Slot = watch::Receiver<Option<Outcome>>;

/// The calls in flight of one upstream, by key.
#[derive(Default)]
pub(crate) struct Flights {
    in_flight: Mutex<HashMap<String, Slot>>,
}

/// A caller's part in a flight.
pub(crate) enum Role {
    /// Make the call, then [`Leader::finish`].
    Lead(Leader),
    /// Wait for the leader with [`Waiter::outcome`].
    Wait(Waiter),
}

impl Flights {
    /// Leads the flight for `key`, or joins the one in flight.
    pub(crate) fn join(self: &Arc<Self>, key: &str) -> Role {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = in_flight.get(key) {
            return Role::Wait(Waiter(slot.clone()));
        }
        let (sender, slot) = watch::channel(None);
        in_flight.insert(key.to_string(), slot);
        Role::Lead(Leader {
            flights: self.clone(),
            key: key.to_string(),
            sender,
        })
    }

    /// Leads the flight for `key` if none is in flight (a background
    /// refresh, which nobody needs to wait for).
    pub(crate) fn lead_if_idle(self: &Arc<Self>, key: &str) -> Option<Leader> {
        match self.join(key) {
            Role::Lead(leader) => Some(leader),
            Role::Wait(_) => None,
        }
    }

    /// Keys in flight now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.in_flight.lock().unwrap().len()
    }
}

/// The caller making the call for everyone waiting on its key.
pub(crate) struct Leader {
    flights: Arc<Flights>,
    key: String,
    sender: watch::Sender<Option<Outcome>>,
}

impl Leader {
    /// Hands `outcome` to the waiters and ends the flight.
    pub(crate) fn finish(self, outcome: Outcome) {
        self.sender.send_replace(Some(outcome));
        // Drop ends the flight.
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        // Callers from now on start a new flight. Those already waiting
        // see either the outcome or, if none was sent, the sender gone.
        let mut in_flight = self
            .flights
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if in_flight
            .get(&self.key)
            .is_some_and(|slot| slot.same_channel(&self.sender.subscribe()))
        {
            in_flight.remove(&self.key);
        }
    }
}

/// A caller waiting for a leader.
pub(crate) struct Waiter(Slot);

impl Waiter {
    /// The leader's outcome, or `None` when the leader went away without
    /// one (the caller should join again).
    pub(crate) async fn outcome(mut self) -> Option<Outcome> {
        match self.0.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone(),
            Err(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_get_the_leaders_outcome_and_the_flight_ends() {
        let flights = Arc::new(Flights::default());
        let Role::Lead(leader) = flights.join("k") else {
            panic!("the first caller leads")
        };
        let Role::Wait(waiter) = flights.join("k") else {
            panic!("the second waits")
        };
        assert!(matches!(flights.join("other"), Role::Lead(_)));
        leader.finish(Outcome::NotShared);
        assert!(matches!(waiter.outcome().await, Some(Outcome::NotShared)));
        assert_eq!(flights.len(), 0);
        assert!(matches!(flights.join("k"), Role::Lead(_)));
    }

    #[tokio::test]
    async fn a_leader_that_goes_away_hands_the_lead_on() {
        let flights = Arc::new(Flights::default());
        let Role::Lead(leader) = flights.join("k") else {
            panic!()
        };
        let Role::Wait(first) = flights.join("k") else {
            panic!()
        };
        let Role::Wait(second) = flights.join("k") else {
            panic!()
        };
        drop(leader);
        assert!(first.outcome().await.is_none());
        // The first to come back leads; the other waits for it.
        let Role::Lead(next) = flights.join("k") else {
            panic!("the next waiter leads")
        };
        assert!(second.outcome().await.is_none());
        assert!(matches!(flights.join("k"), Role::Wait(_)));
        drop(next);
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn a_refresh_leads_only_an_idle_key() {
        let flights = Arc::new(Flights::default());
        let refresh = flights.lead_if_idle("k").expect("idle");
        assert!(flights.lead_if_idle("k").is_none());
        drop(refresh);
        assert!(flights.lead_if_idle("k").is_some());
    }
}
