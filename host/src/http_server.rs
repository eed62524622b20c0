//! The HTTP/1.1 accept loop, shared by the aggregator, the admin endpoints
//! and the demo upstreams' server, and what it remembers per connection.

mod refused_heads;

use crate::admission::{Admission, Pacing, RETRY_AFTER};
use crate::limits::ConnectionLimits;
use crate::metrics::CauseLabel;
use crate::response::ResponseBody;
use http::{Request, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use refused_heads::{Answered, JsonRefusals, Turn};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
// tokio's clock, which the tests can pause, for the pacing below.
use tokio::time::Instant;

/// What the server remembers about one client connection.
#[derive(Default)]
pub(crate) struct Connection {
    /// When the last shed answer on this connection went out.
    last_shed: Mutex<Option<Instant>>,
}

impl Connection {
    /// Holds a shed answer on this connection when the client came back
    /// sooner than the previous shed's `Retry-After` ([`RETRY_AFTER`])
    /// asked and holding slows the load at all ([`PacingProbe`], told the
    /// `connections` open), unless a token of `admission`'s [`FastSheds`]
    /// is left and the probe has not seen the load re-send; returns
    /// whether it held it. The hold, counted from the
    /// previous shed, is `Retry-After`, longer when many are held (see
    /// [`HeldSheds`]), and ends when `released` turns true (the server is
    /// stopping) or holds go off.
    ///
    /// Most load generators and retry loops answer a 503 with a new request
    /// at once. Shedding them all fast only turns the host's CPU into 503s
    /// (65k a second at c=500, leaving ~1% for real answers): once the
    /// sheds the host's answers earned are spent, such a client gets its
    /// next 503 when it should have asked, or later, while a client that
    /// honours `Retry-After`, or a new one, is answered at once. So is an
    /// open-loop load's pooled connection, while earned sheds last, and
    /// always once the probe has seen that holds do not slow it. Once the
    /// probe has seen the load re-send, earned sheds are not spent on it:
    /// each would only bring the next request at once.
    ///
    /// [`FastSheds`]: crate::admission::FastSheds
    /// [`HeldSheds`]: crate::admission::HeldSheds
    /// [`PacingProbe`]: crate::admission::PacingProbe
    pub(crate) async fn pace_shed(
        &self,
        admission: &Admission,
        connections: i64,
        released: &tokio::sync::watch::Receiver<bool>,
    ) -> bool {
        let now = Instant::now();
        let connections = usize::try_from(connections).unwrap_or(0);
        let pacing = admission.pacing().shed(now.into_std(), connections);
        let hold = {
            let mut last = self.last_shed.lock().unwrap_or_else(|e| e.into_inner());
            let hold = match pacing {
                Pacing::Hold {
                    release,
                    fast_sheds,
                } => last
                    .filter(|shed| {
                        *shed + RETRY_AFTER > now
                            && !(fast_sheds && admission.fast_sheds().try_take())
                    })
                    .map(|shed| {
                        let rate = admission.answers_per_second();
                        (shed + admission.held_sheds().next_hold(rate), release)
                    }),
                Pacing::AtOnce => None,
            };
            *last = Some(hold.map_or(now, |(until, _)| until));
            hold
        };
        let Some((until, release)) = hold else {
            return false;
        };
        let _holding = admission.held_sheds().hold();
        let mut released = released.clone();
        tokio::select! {
            () = tokio::time::sleep_until(until) => {}
            _ = released.wait_for(|released| *released) => {}
            () = admission.pacing().released(release) => {}
        }
        true
    }
}

/// What a server loop counts of its connections.
#[derive(Clone, Default)]
pub(crate) struct ConnectionMetrics {
    /// Connections open now.
    pub(crate) open: Gauge,
    /// Request heads refused before any handler ran, by [`refused_head`].
    pub(crate) refused_heads: Family<CauseLabel, Counter>,
}

/// Why a request head was refused, if that is how `error` ended its
/// connection: not finished within the header timeout (`turn` tells a
/// slow head from a keep-alive connection idle after its answers, which
/// is not counted), or answered by hyper itself (400, 414, 431, with
/// [`refused_heads`]'s JSON body, or the GOAWAY an HTTP/2 client gets).
/// No handler, and so no access log line or request metric, sees them.
fn refused_head(error: &hyper::Error, turn: &Turn) -> Option<&'static str> {
    if error.is_timeout() {
        turn.head_unfinished().then_some("head_timeout")
    } else if error.is_parse_version_h2() {
        Some("http2_preface")
    } else if error.is_parse_too_large() {
        Some("head_too_large")
    } else if error.is_parse() {
        Some("malformed")
    } else {
        None
    }
}

/// An HTTP/1.1 server loop with graceful shutdown: `handler` answers every
/// request, with what is known of its connection; after `shutdown`,
/// connections get `grace` to finish. `metrics` counts the connections
/// open and the request heads refused.
///
/// Slow and idle clients are closed after the header timeout (hyper applies
/// it only with a timer), oversized heads get `431` and malformed ones
/// `400`, in the JSON error shape ([`refused_heads`]), and at most
/// `max_connections` are open at once: at the cap the loop waits for one to
/// close before it accepts again, rather than accepting and refusing (which
/// would spin on a client that reconnects at once).
pub(crate) async fn serve_http<H, F>(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
    limits: ConnectionLimits,
    metrics: ConnectionMetrics,
    handler: H,
) -> std::io::Result<()>
where
    H: Fn(Request<hyper::body::Incoming>, Arc<Connection>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let places = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_headers(limits.max_headers)
        .max_buf_size(limits.max_header_bytes);
    loop {
        let place = tokio::select! {
            place = places.clone().acquire_owned() => place.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // Out of file descriptors and the like: keep serving the
                // connections we have, retry shortly.
                Err(e) => {
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let state = Arc::new(Connection::default());
        let turn = Arc::new(Turn::default());
        let io = JsonRefusals::new(stream, turn.clone(), limits);
        let ended = turn.clone();
        let service = hyper::service::service_fn(move |request| {
            turn.answering();
            let answer = handler(request, state.clone());
            let turn = turn.clone();
            async move {
                let response = answer.await;
                Ok::<_, std::convert::Infallible>(response.map(|body| Answered::new(body, turn)))
            }
        });
        let connection = builder.serve_connection(TokioIo::new(io), service);
        let connection = graceful.watch(connection);
        metrics.open.inc();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                if let Some(cause) = refused_head(&e, &ended) {
                    metrics
                        .refused_heads
                        .get_or_create(&CauseLabel { cause })
                        .inc();
                }
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            metrics.open.dec();
            drop(place);
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {grace:?}; closing them");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::MAX_SHED_HOLD;

    /// An admission with no sheds left to answer at once, and a server
    /// that is not stopping (keep the sender).
    fn drained() -> (Admission, tokio::sync::watch::Sender<bool>) {
        let admission = Admission::fixed(4);
        while admission.fast_sheds().try_take() {}
        (admission, tokio::sync::watch::channel(false).0)
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_comes_back_too_soon_waits_for_its_shed() {
        let connection = Connection::default();
        let (admission, stopping) = drained();
        let released = stopping.subscribe();
        let t0 = tokio::time::Instant::now();
        assert!(
            !connection.pace_shed(&admission, 1, &released).await,
            "the first shed goes at once"
        );
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(
            connection.pace_shed(&admission, 1, &released).await,
            "back after 10 ms: held"
        );
        // Timers round up to the millisecond.
        let held = t0.elapsed();
        assert!(
            (RETRY_AFTER..RETRY_AFTER + Duration::from_millis(2)).contains(&held),
            "held {held:?}: until Retry-After after the first"
        );
        assert_eq!(admission.held_sheds().held(), 0, "no longer held");
        tokio::time::advance(RETRY_AFTER).await;
        assert!(
            !connection.pace_shed(&admission, 1, &released).await,
            "back after Retry-After: at once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_comes_back_too_soon_is_answered_at_once_while_the_bucket_lasts() {
        let connection = Connection::default();
        let (admission, stopping) = drained();
        let released = stopping.subscribe();
        assert!(
            !connection.pace_shed(&admission, 1, &released).await,
            "the first: at once"
        );
        // An answer given elsewhere earns its sheds at once; all but one
        // are spent.
        admission.fast_sheds().earn();
        for _ in 1..crate::admission::FAST_SHEDS_PER_ANSWER as usize {
            assert!(admission.fast_sheds().try_take());
        }
        assert!(
            !connection.pace_shed(&admission, 1, &released).await,
            "a token: at once"
        );
        assert!(
            connection.pace_shed(&admission, 1, &released).await,
            "no token left: held"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn once_the_load_re_sends_a_client_back_too_soon_is_held_whatever_tokens_are_left() {
        let connection = Connection::default();
        let admission = Admission::fixed(4);
        let stopping = tokio::sync::watch::channel(false).0;
        let released = stopping.subscribe();
        // Re-senders, as the probe sees them: five arrivals a millisecond
        // while sheds are held, twenty while answered at once, until its
        // first verdict (after 1.25 s).
        let start = Instant::now();
        let mut ms = 0;
        loop {
            let now = start.into_std() + Duration::from_millis(ms);
            let arrivals = match admission.pacing().shed(now, 1) {
                Pacing::Hold {
                    fast_sheds: false, ..
                } => break,
                Pacing::Hold { .. } => 5,
                Pacing::AtOnce => 20,
            };
            assert!(ms < 2_000, "no verdict after {ms} ms");
            for _ in 0..arrivals {
                admission.pacing().arrived();
            }
            ms += 1;
        }
        tokio::time::advance(Duration::from_millis(ms)).await;
        assert!(
            !connection.pace_shed(&admission, 1, &released).await,
            "the first shed goes at once"
        );
        tokio::time::advance(Duration::from_millis(10)).await;
        let t0 = tokio::time::Instant::now();
        assert!(
            connection.pace_shed(&admission, 1, &released).await,
            "back after 10 ms: held"
        );
        assert!(t0.elapsed() >= RETRY_AFTER - Duration::from_millis(10));
        assert!(
            admission.fast_sheds().try_take(),
            "held with the bucket still full"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_hold_grows_when_many_are_held_against_few_answers() {
        let connection = Connection::default();
        let (admission, stopping) = drained();
        let released = stopping.subscribe();
        // Three places in flight, each held 100 ms: the host answers 30
        // a second.
        let mut tickets = Vec::new();
        for _ in 0..3 {
            tickets.push(admission.admit(Duration::ZERO, None).await.unwrap());
        }
        assert_eq!(admission.answers_per_second(), None, "nothing measured");
        admission.assume_hold(Duration::from_millis(100));
        let rate = admission.answers_per_second().expect("a hold measured");
        assert!((29.0..=31.0).contains(&rate), "{rate}");
        // 59 held elsewhere, and this one: 60 beside 30 answers a second
        // are held two seconds each.
        let others: Vec<_> = (0..59).map(|_| admission.held_sheds().hold()).collect();
        let t0 = tokio::time::Instant::now();
        assert!(!connection.pace_shed(&admission, 1, &released).await);
        tokio::time::advance(Duration::from_millis(10)).await;
        assert!(connection.pace_shed(&admission, 1, &released).await, "held");
        let held = t0.elapsed();
        let two = Duration::from_secs(2);
        assert!(
            (two - Duration::from_millis(20)..two + Duration::from_millis(20)).contains(&held),
            "held {held:?}"
        );
        // Ten thousand held: the bound.
        let crowd: Vec<_> = (0..10_000).map(|_| admission.held_sheds().hold()).collect();
        let t0 = tokio::time::Instant::now();
        assert!(connection.pace_shed(&admission, 1, &released).await, "held");
        assert!(t0.elapsed() <= MAX_SHED_HOLD + Duration::from_millis(2));
        drop((others, crowd, tickets));
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_shed_goes_out_when_holds_go_off() {
        let connection = std::sync::Arc::new(Connection::default());
        let (admission, stopping) = drained();
        let released = stopping.subscribe();
        assert!(!connection.pace_shed(&admission, 1, &released).await);
        let held = tokio::spawn({
            let (connection, admission) = (connection.clone(), admission.clone());
            let released = released.clone();
            async move { connection.pace_shed(&admission, 1, &released).await }
        });
        while admission.held_sheds().held() == 0 {
            tokio::task::yield_now().await;
        }
        // An open loop, as the probe sees it: six arrivals a millisecond
        // whether sheds are held or not. The clock stands still, so only
        // holds going off can end the hold.
        let start = Instant::now();
        let t0 = start.into_std();
        let mut ms = 0;
        while admission.pacing().holding() {
            assert!(ms < 5_000, "holds still on after {ms} ms");
            admission.pacing().shed(t0 + Duration::from_millis(ms), 1);
            for _ in 0..6 {
                admission.pacing().arrived();
            }
            ms += 1;
        }
        assert!(held.await.unwrap(), "it was held");
        // A paused clock moves on by itself only when every task waits: had
        // the hold not been ended, it would have moved to the hold's end.
        assert!(
            start.elapsed() < Duration::from_millis(1),
            "held {:?}",
            start.elapsed()
        );
        assert_eq!(admission.held_sheds().held(), 0);
        // And the next shed back too soon goes out at once.
        assert!(!connection.pace_shed(&admission, 1, &released).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_held_shed_goes_out_when_the_server_stops() {
        let connection = std::sync::Arc::new(Connection::default());
        let (admission, stopping) = drained();
        let released = stopping.subscribe();
        assert!(!connection.pace_shed(&admission, 1, &released).await);
        let held = tokio::spawn({
            let (connection, admission) = (connection.clone(), admission.clone());
            async move {
                let t0 = tokio::time::Instant::now();
                assert!(connection.pace_shed(&admission, 1, &released).await);
                t0.elapsed()
            }
        });
        while admission.held_sheds().held() == 0 {
            tokio::task::yield_now().await;
        }
        stopping.send_replace(true);
        let waited = held.await.unwrap();
        assert!(waited < Duration::from_millis(1), "held {waited:?}");
        assert_eq!(admission.held_sheds().held(), 0);
    }
}
