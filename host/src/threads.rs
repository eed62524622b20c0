//! How the `fanout` binary lays out its threads: a few that accept
//! connections and answer sheds, and the guests on threads of their own
//! ([`FanoutBuilder::guest_threads`](crate::FanoutBuilder::guest_threads)).
//!
//! Under overload the CPUs are full of guest work. On one runtime a new
//! request waits in the run queue behind the guests' tasks before the host
//! can decide to shed it: at c=500, 50 ms upstreams, clients honouring
//! `Retry-After`, the 503s took 20–30 ms (p99) although the host decided
//! each in under 0.5 ms. With the connections on a thread of their own, the
//! kernel's scheduler runs it when a request arrives (it sleeps most of the
//! time, so it is owed CPU), and those 503s took 5–10 ms.
//!
//! One connection thread for every four cores, and at least one: two of
//! them beside two guest threads on two cores served 6.5 % fewer requests
//! at saturation than one runtime (six alternating rounds), one of them
//! served as many (+2 %). The guest threads are one per core.
//!
//! The guest threads can also run below the connections' priority
//! (`--guest-nice N`, [`FanoutBuilder::guest_nice`](crate::FanoutBuilder::guest_nice)),
//! off by default: measured both ways, it helped or hurt with how much
//! else wanted the CPU. An open loop at twice capacity (6,200 requests a
//! second on the 2-core AMD box, 50 ms upstreams):
//!
//! - The host in a scheduling group of its own, the load generator and
//!   the upstreams together in another (five alternating windows each):
//!   with the guests 10 below, the 503s took 2.3-16.8 ms (p99) against
//!   11.7-70.8 ms, for as many 2xx (1,923-2,708 a second against
//!   1,925-2,658). 5 below did nothing for the 503s; 19 below cost 2xx.
//! - The host, the load generator and the upstreams each in a group of
//!   their own (`fanout-bench open-loop` with each server started in a
//!   session of its own, a harness change tried and reverted; three
//!   windows each): 10 below
//!   answered fewer 2xx (1,723-2,468 against 2,191-2,780), with 157 and
//!   394 504s in two of the windows (at most 25 at one priority), and the
//!   503s were not faster (5.7-222 ms against 15-24 ms), on as much CPU
//!   (1.24-1.31 cores either way). Why, these windows do not tell.
//! - In one group with the load generator, the guests yield to it too:
//!   13 % fewer 2xx (two windows each).

use std::num::NonZeroUsize;

/// The threads of the connections' runtime and of the guests'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadLayout {
    /// Worker threads of the runtime that accepts connections, reads
    /// requests, sheds and writes answers.
    pub connection_threads: usize,
    /// Worker threads of the guests' own runtime; `None`: the guests run on
    /// the connections' runtime.
    pub guest_threads: Option<usize>,
    /// Steps of nice the guest threads run below the connections' (see
    /// `FanoutBuilder::guest_nice`); 0: one priority.
    pub guest_nice: u8,
}

impl ThreadLayout {
    /// The default on a machine with `cores` CPUs: one connection thread per
    /// four cores (at least one), and a guest thread per core, at their
    /// priority.
    pub fn split(cores: usize) -> ThreadLayout {
        let cores = cores.max(1);
        ThreadLayout {
            connection_threads: (cores / 4).max(1),
            guest_threads: Some(cores),
            guest_nice: 0,
        }
    }

    /// Everything on one runtime of a thread per core.
    pub fn shared(cores: usize) -> ThreadLayout {
        ThreadLayout {
            connection_threads: cores.max(1),
            guest_threads: None,
            guest_nice: 0,
        }
    }

    /// The layout from the flags: `guest_threads` 0 puts the guests on the
    /// connections' runtime; each count left out takes its default for
    /// this machine's CPUs (the cgroup's quota, if lower: see
    /// [`std::thread::available_parallelism`]), and `guest_nice` left out
    /// is 0.
    pub fn from_flags(
        connection_threads: Option<usize>,
        guest_threads: Option<usize>,
        guest_nice: Option<u8>,
    ) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        let default = match guest_threads {
            Some(0) => ThreadLayout::shared(cores),
            _ => ThreadLayout::split(cores),
        };
        ThreadLayout {
            connection_threads: connection_threads
                .filter(|n| *n > 0)
                .unwrap_or(default.connection_threads),
            guest_threads: guest_threads.map_or(default.guest_threads, |n| (n > 0).then_some(n)),
            guest_nice: guest_nice.unwrap_or(default.guest_nice),
        }
    }

    /// The connections' runtime (build the [`Fanout`](crate::Fanout) with
    /// [`guest_threads`](Self::guest_threads) for the guests' one).
    pub fn connection_runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.connection_threads.max(1))
            .enable_all()
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_thread_per_four_cores_and_a_guest_thread_per_core() {
        let layout = |cores| {
            let ThreadLayout {
                connection_threads,
                guest_threads,
                guest_nice,
            } = ThreadLayout::split(cores);
            assert_eq!(guest_nice, 0);
            (connection_threads, guest_threads)
        };
        assert_eq!(layout(0), (1, Some(1)));
        assert_eq!(layout(2), (1, Some(2)));
        assert_eq!(layout(8), (2, Some(8)));
        assert_eq!(layout(64), (16, Some(64)));
    }

    #[test]
    fn flags_override_the_defaults() {
        let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        assert_eq!(
            ThreadLayout::from_flags(None, None, None),
            ThreadLayout::split(cores)
        );
        assert_eq!(
            ThreadLayout::from_flags(None, Some(0), None),
            ThreadLayout::shared(cores),
            "0 guest threads: the old layout"
        );
        assert_eq!(
            ThreadLayout::from_flags(Some(3), Some(5), Some(10)),
            ThreadLayout {
                connection_threads: 3,
                guest_threads: Some(5),
                guest_nice: 10,
            }
        );
        assert_eq!(
            ThreadLayout::from_flags(Some(0), Some(0), None).connection_threads,
            cores,
            "0 connection threads: the default"
        );
    }
}
