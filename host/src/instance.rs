//! One request's life in an instance, in order:
//!
//! 1. [`Runner::admit`]: a place under the admission limit (perhaps after a
//!    wait in line, taken out of the request's budget) and an instance slot;
//! 2. [`Runner::worker`]: an idle [`Worker`] (a store and its instance,
//!    kept from an earlier request) or a fresh store, readied with the
//!    request's limits (fuel, epoch deadline) and outgoing hooks;
//! 3. [`run_guest`]: instantiate if need be and call the guest's
//!    handler (in either `wasi:http` world: [`guest_world`](crate::guest_world)),
//!    under the wall-clock deadline, in a task of its
//!    own (it may go on streaming the body after the head is out); then
//!    keep the worker for the next request, or retire it;
//! 4. [`await_head`]: wait for the guest's response head, and teach the
//!    admission limit from how long it took;
//! 5. [`classify`]: name the cause when the guest failed.
//!
//! With `FanoutBuilder::guest_threads`,
//! steps 3 and 4 run on the guests' own runtime ([`on_guest_runtime`]).

use crate::admission::{Admission, Refusal, Ticket};
use crate::body::{self, GuestCut, GuestTask};
use crate::builtin_guest::{self, BuiltinGuest};
use crate::error::Failure;
use crate::guest_output::GuestOutput;
use crate::guest_runtime::GuestRuntime;
use crate::guest_world::{GuestCall, GuestPre, HeadReceiver};
use crate::limits::{GUEST_OUTPUT_CAPACITY, HANDOFF_BUFFER, Limits, MAX_GUEST_RESOURCES};
use crate::metrics::Metrics;
use crate::outbound::{AttemptLog, OutboundHooks, RequestHooks, Upstreams};
use crate::response::ResponseBody;
use crate::runtime::{self, EpochTicker};
use crate::stats::Stats;
use crate::store::{MemoryLimiter, RequestState};
use crate::worker::{IdleWorkers, Worker};
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Body;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, oneshot};
use wasmtime::component::{ResourceTable, ResourceTableError};
use wasmtime::{Store, StoreLimitsBuilder, Trap};
use wasmtime_wasi::WasiCtx;
use wasmtime_wasi_http::WasiHttpCtx;

/// Everything a request needs to get and run an instance, shared by all
/// requests of one `Fanout`.
pub(crate) struct Runner {
    /// The component, linked, in whichever `wasi:http` world it exports.
    pub(crate) pre: GuestPre,
    pub(crate) limits: Limits,
    pub(crate) upstreams: Arc<Upstreams>,
    pub(crate) hooks: Arc<dyn OutboundHooks>,
    pub(crate) env: Vec<(String, String)>,
    /// The instance pool's slots: one per instance the pooling allocator
    /// may hold at once, running or idle.
    pub(crate) instances: Arc<Semaphore>,
    /// Workers between two requests (with `Limits::instance_reuse` > 1).
    pub(crate) idle: IdleWorkers,
    pub(crate) stats: Stats,
    pub(crate) metrics: Arc<Metrics>,
    /// The built-in guest's configuration; `None` for another component.
    pub(crate) builtin: Option<BuiltinGuest>,
    /// The admission limit and its line; a fixed one for
    /// `AdmissionMode::Fixed`.
    pub(crate) admission: Admission,
    pub(crate) adaptive: bool,
    /// Where the guests run, when apart from the connections.
    pub(crate) guests: Option<GuestRuntime>,
    /// Advances the epoch while a guest runs; dropped last among the
    /// fields that matter, it stops and joins its thread.
    pub(crate) ticker: EpochTicker,
}

/// A request's admission: its place under the limit. Dropping it gives
/// the place back and takes it off the in-use gauge, whichever way the
/// request ends.
struct Place {
    ticket: Ticket,
    metrics: Arc<Metrics>,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.metrics.instances_in_use.dec();
    }
}

impl Runner {
    /// Runs `request` in an instance and returns the guest's answer
    /// (its body still streaming), or why there is none.
    pub(crate) async fn run<B>(
        self: &Arc<Self>,
        request: Request<B>,
        trace_id: &str,
        attempts: AttemptLog,
        span: tracing::Span,
    ) -> Result<Response<ResponseBody>, Failure>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<tower::BoxError>,
    {
        let mut request = for_the_guest(request)?;
        let default_budget = self.builtin.as_ref().map(BuiltinGuest::budget);
        let place = self
            .admit(builtin_guest::budget_of(&request, default_budget))
            .await?;
        builtin_guest::charge_wait(&mut request, place.ticket.waited(), default_budget)?;
        self.stats.requests.fetch_add(1, Ordering::Relaxed);

        let mut worker = self.worker(attempts.clone(), span)?;
        let (call, receiver) = GuestCall::new(self.pre.version(), &mut worker.store, request)
            .map_err(|e| Failure::Internal(format!("{e:#}")))?;

        // How the guest failed, if it did: set before the store (and with it
        // the body's sender) is dropped, so that a body it leaves unfinished
        // ends in an error, not in what looks like a complete answer.
        let cut = GuestCut {
            failure: Arc::new(OnceLock::new()),
            metrics: self.metrics.clone(),
            trace_id: trace_id.to_string(),
        };
        let admitted_at = place.ticket.admitted();
        let guest = run_guest(self.clone(), worker, call, place, cut.clone());
        let runner = self.clone();
        match &self.guests {
            // In a task of its own, which outlives the answer's head.
            // Should this future be dropped (the client went away), the
            // guard stops the guest; once the head is out, the body holds it.
            None => {
                crate::lag::ensure_probe();
                let task = tokio::spawn(guest);
                let stop = GuestTask::new(task.abort_handle());
                let ended = async move { task.await.map_err(|join| join.to_string()) };
                let response = await_head(&runner, receiver, ended, &attempts, admitted_at).await?;
                Ok(stop.until_end_of(response.map(|body| cut.guard(body))))
            }
            Some(guests) => {
                let exchange =
                    on_guest_runtime(runner, guest, receiver, attempts, admitted_at, cut);
                let task = guests.handle().spawn(exchange);
                let _stop = GuestTask::new(task.abort_handle());
                task.await.unwrap_or_else(|join| {
                    Err(Failure::Internal(format!("guest task failed: {join}")))
                })
            }
        }
    }

    /// Admission happens at the door, before an instance is spent: the
    /// limit (learnt, or the pool's size) and its line, where a request
    /// waits no longer than its `budget` leaves it time to run. A place is
    /// held as long as the request's worker, so the pool always has an
    /// instance for it (see [`Runner::worker`]).
    async fn admit(&self, budget: Option<Duration>) -> Result<Place, Failure> {
        let limits = &self.limits;
        let admitted = self.admission.admit(limits.queue_wait, budget).await;
        let waited = match &admitted {
            Ok(ticket) => ticket.waited(),
            Err(Refusal::WaitedTooLong { waited }) => *waited,
            Err(_) => Duration::ZERO,
        };
        if !waited.is_zero() {
            self.metrics.queue_wait.observe(waited.as_secs_f64());
        }
        let ticket = admitted.map_err(|refusal| match refusal {
            Refusal::AtLimit { limit } if self.adaptive => Failure::Overloaded { limit },
            Refusal::AtLimit { .. } => Failure::PoolFull {
                max_instances: limits.max_instances,
            },
            Refusal::LineTooLong { expected } => Failure::QueueFull {
                expected_wait: expected,
                max_wait: limits.queue_wait,
            },
            Refusal::WaitedTooLong { waited } => Failure::QueueTimeout { waited },
        })?;
        self.metrics.instances_in_use.inc();
        Ok(Place {
            ticket,
            metrics: self.metrics.clone(),
        })
    }

    /// A worker for one admitted request, readied with its hooks and
    /// limits: an idle one if there is one, else a fresh store in a free
    /// pool slot. Every worker holds a slot and every running one a place,
    /// and places are at most slots, so a slot is free or a worker idle;
    /// the second look covers one given back in between.
    fn worker(&self, attempts: AttemptLog, span: tracing::Span) -> Result<Worker, Failure> {
        let hooks = RequestHooks {
            upstreams: self.upstreams.clone(),
            outbound: self.hooks.clone(),
            metrics: self.metrics.clone(),
            attempts,
            span,
        };
        let mut worker = match self.idle.take() {
            Some(worker) => worker,
            None => match self.instances.clone().try_acquire_owned() {
                Ok(slot) => self.new_worker(slot, hooks.clone())?,
                Err(_) => self.idle.take().ok_or(Failure::PoolFull {
                    max_instances: self.limits.max_instances,
                })?,
            },
        };
        worker
            .begin(hooks, &self.limits)
            .map_err(|e| Failure::Internal(format!("{e:#}")))?;
        Ok(worker)
    }

    /// A fresh store in pool slot `slot`, not yet instantiated.
    fn new_worker(
        &self,
        slot: tokio::sync::OwnedSemaphorePermit,
        hooks: RequestHooks,
    ) -> Result<Worker, Failure> {
        let limits = &self.limits;
        let output = (
            GuestOutput::new(GUEST_OUTPUT_CAPACITY),
            GuestOutput::new(GUEST_OUTPUT_CAPACITY),
        );
        let mut store = Store::new(
            self.pre.engine(),
            RequestState {
                wasi: WasiCtx::builder()
                    .envs(&self.env)
                    .stdout(output.0.clone())
                    .stderr(output.1.clone())
                    .build(),
                http: WasiHttpCtx::new(),
                table: {
                    let mut table = ResourceTable::new();
                    table.set_max_capacity(MAX_GUEST_RESOURCES);
                    table
                },
                hooks,
                limiter: MemoryLimiter {
                    limits: StoreLimitsBuilder::new()
                        .memory_size(limits.memory_bytes)
                        .build(),
                    memory_denied: false,
                    memory_bytes: 0,
                    growths: 0,
                },
            },
        );
        store.limiter(|state| &mut state.limiter);
        let internal = |e: wasmtime::Error| Failure::Internal(format!("{e:#}"));
        if limits.fuel.is_some() {
            store
                .fuel_async_yield_interval(runtime::fuel_yield_interval())
                .map_err(internal)?;
        }
        store.epoch_deadline_trap();
        Ok(Worker::new(store, output, slot))
    }
}

/// The request as the guest gets it: its body's errors in `wasi:http`
/// terms, and an authority, which `wasi:http` requires. An HTTP/1.0 client
/// or an embedding app may send none: the guest gets `localhost`. A `Host`
/// that is not an authority (non-ASCII bytes, spaces) is the client's
/// error, refused before an instance is spent.
fn for_the_guest<B>(
    request: Request<B>,
) -> Result<
    Request<impl Body<Data = Bytes, Error = wasmtime_wasi_http::Error> + Send + 'static>,
    Failure,
>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tower::BoxError>,
{
    use http_body_util::BodyExt;
    let mut request = request.map(|body| body.map_err(body::incoming_body_error));
    if request.uri().authority().is_none() {
        match request.headers().get(http::header::HOST) {
            None => {
                request.headers_mut().insert(
                    http::header::HOST,
                    http::HeaderValue::from_static("localhost"),
                );
            }
            Some(host) => {
                let valid = host
                    .to_str()
                    .ok()
                    .and_then(|host| host.parse::<http::uri::Authority>().ok());
                if valid.is_none() {
                    return Err(Failure::BadRequest(
                        "the Host header is not a valid authority".into(),
                    ));
                }
            }
        }
    }
    Ok(request)
}

/// Instantiates the guest if the worker is fresh and runs its handler to
/// the end, under the wall-clock deadline; returns how it failed, if it
/// did. The failure is also set in `cut` before the store is dropped (see
/// [`GuestCut`]). A worker that may serve again goes back to the idle ones.
async fn run_guest(
    runner: Arc<Runner>,
    mut worker: Worker,
    call: GuestCall,
    place: Place,
    cut: GuestCut,
) -> Option<Failure> {
    let limits = runner.limits;
    // Epoch deadlines count only while the epoch advances: from here, where
    // the guest first runs (instantiation included), to its end.
    let ticking = runner.ticker.running();
    let ran = tokio::time::timeout(limits.deadline, async {
        let proxy = match worker.proxy.take() {
            Some(proxy) => proxy,
            None => {
                let t0 = Instant::now();
                let proxy = runner.pre.instantiate(&mut worker.store).await?;
                runner.stats.record_instantiation(t0.elapsed());
                proxy
            }
        };
        let called = call.run(&proxy, &mut worker.store).await;
        worker.proxy = Some(proxy);
        called
    })
    .await;
    let store = &mut worker.store;
    if let Some(fuel) = limits.fuel {
        let used = fuel.saturating_sub(store.get_fuel().unwrap_or(0));
        runner
            .stats
            .fuel_consumed
            .fetch_add(used, Ordering::Relaxed);
        runner.metrics.fuel.observe(used as f64);
    }
    drop(ticking);
    let growths = std::mem::take(&mut store.data_mut().limiter.growths);
    runner
        .stats
        .memory_growths
        .fetch_add(growths, Ordering::Relaxed);
    log_guest_output("stdout", &worker.stdout, &cut.trace_id);
    log_guest_output("stderr", &worker.stderr, &cut.trace_id);
    let failed = match ran {
        Err(_elapsed) => Some(Failure::Deadline {
            deadline: limits.deadline,
        }),
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(classify(&e, store.data().limiter.memory_denied, &limits)),
    };
    if let Some(failed) = &failed {
        let _ = cut.failure.set(failed.clone());
    }
    // The worker holds the instance's pool slot: give it back, or free the
    // slot, before the place, or a request admitted in between finds the
    // pool full ("maximum concurrent limit reached").
    if failed.is_none() && worker.reusable(&limits) {
        runner.idle.give_back(worker);
    } else {
        drop(worker);
    }
    drop(place);
    failed
}

/// Waits for the guest's response head and teaches the admission limit
/// from its timing; when the guest ended without one, `ended` says why.
async fn await_head(
    runner: &Runner,
    receiver: HeadReceiver,
    ended: impl Future<Output = Result<Option<Failure>, String>>,
    attempts: &AttemptLog,
    admitted_at: Instant,
) -> Result<Response<ResponseBody>, Failure> {
    let answered = receiver.recv().await;
    // The time to the response head, less the time spent waiting on
    // upstreams, is what the limiter learns from.
    let upstream_wait = attempts.upstream_wait(admitted_at, Instant::now());
    runner.admission.learn(admitted_at, upstream_wait);
    match answered {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(code)) => Err(Failure::NoResponse(format!(
            "the guest answered with error code {code}"
        ))),
        // The sender was dropped with the store: the task ended without
        // an answer, and its result says why.
        Err(_) => match ended.await {
            Ok(Some(failure)) => Err(failure),
            Ok(None) => Err(Failure::NoResponse(
                "the handler returned without setting a response".into(),
            )),
            Err(join) => Err(Failure::Internal(format!("guest task failed: {join}"))),
        },
    }
}

/// The whole exchange on the guests' runtime, body included: the
/// connection's runtime is woken once, for a finished answer, not for each
/// frame of a stream (see [`GuestRuntime`]).
async fn on_guest_runtime(
    runner: Arc<Runner>,
    guest: impl Future<Output = Option<Failure>> + Send + 'static,
    receiver: HeadReceiver,
    attempts: AttemptLog,
    admitted_at: Instant,
    cut: GuestCut,
) -> Result<Response<ResponseBody>, Failure> {
    crate::lag::ensure_probe();
    let (outcome_tx, outcome) = oneshot::channel();
    let guest = async move {
        let _ = outcome_tx.send(guest.await);
    };
    let answered = async move {
        let ended = async move { outcome.await.map_err(|e| e.to_string()) };
        let response = await_head(&runner, receiver, ended, &attempts, admitted_at).await?;
        body::buffer_body(response, HANDOFF_BUFFER, cut).await
    };
    // Both in this task; a guest still running once the answer is ready (a
    // body beyond the buffer, work after the answer) goes on in a task of
    // its own.
    let (mut guest, mut answered) = (Box::pin(guest), std::pin::pin!(answered));
    let mut guest_done = false;
    let answer = loop {
        tokio::select! {
            answer = &mut answered => break answer,
            () = &mut guest, if !guest_done => guest_done = true,
        }
    };
    if guest_done {
        return answer;
    }
    let stop = GuestTask::new(tokio::spawn(guest).abort_handle());
    answer.map(|response| stop.until_end_of(response))
}

/// Names the cause of a failed guest run. The memory flag goes first: a
/// refused `memory.grow` surfaces as whatever the guest's allocator does next.
fn classify(e: &wasmtime::Error, memory_denied: bool, limits: &Limits) -> Failure {
    if memory_denied {
        return Failure::MemoryLimit {
            bytes: limits.memory_bytes,
        };
    }
    if let Some(ResourceTableError::Full) = e.downcast_ref::<ResourceTableError>() {
        return Failure::ResourceLimit {
            max: MAX_GUEST_RESOURCES,
        };
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => Failure::FuelExhausted {
            fuel: limits.fuel.unwrap_or(u64::MAX),
        },
        Some(Trap::Interrupt) => Failure::Deadline {
            deadline: limits.deadline,
        },
        Some(trap) => Failure::Trap(trap.to_string()),
        None => Failure::Trap(format!("{e:#}")),
    }
}

/// Guest output becomes log events, one per line, never raw bytes on the
/// host's own stdout.
fn log_guest_output(stream: &'static str, output: &GuestOutput, trace_id: &str) {
    let contents = output.take();
    if contents.is_empty() {
        return;
    }
    for line in String::from_utf8_lossy(&contents).lines() {
        tracing::info!(target: crate::telemetry::GUEST_OUTPUT_TARGET, stream, %trace_id, "{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    #[test]
    fn failures_are_named_by_their_trap() {
        let limits = limits();
        let fuel = wasmtime::Error::new(Trap::OutOfFuel);
        assert_eq!(
            classify(&fuel, false, &limits).code(),
            "guest_fuel_exhausted"
        );
        let interrupt = wasmtime::Error::new(Trap::Interrupt);
        assert_eq!(
            classify(&interrupt, false, &limits).code(),
            "deadline_exceeded"
        );
        let unreachable = wasmtime::Error::new(Trap::UnreachableCodeReached);
        assert_eq!(classify(&unreachable, false, &limits).code(), "guest_trap");
        // A refused memory.grow wins over whatever trap followed it.
        assert_eq!(
            classify(&unreachable, true, &limits).code(),
            "guest_memory_limit"
        );
        let other = wasmtime::Error::msg("no such export");
        assert_eq!(classify(&other, false, &limits).code(), "guest_trap");
    }

    proptest::proptest! {
        #[test]
        fn any_host_header_is_passed_on_or_refused_with_a_400(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)
        ) {
            let Ok(host) = http::HeaderValue::from_bytes(&bytes) else {
                return Ok(());
            };
            let request = Request::get("/products/1")
                .header("host", host)
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            match for_the_guest(request) {
                // What wasmtime-wasi-http will need of it.
                Ok(request) => proptest::prop_assert!(request.headers()["host"].to_str().is_ok()),
                Err(refused) => proptest::prop_assert_eq!(refused.status(), http::StatusCode::BAD_REQUEST),
            }
        }
    }

    #[test]
    fn the_guest_always_gets_an_authority() {
        let request = Request::get("/products/1")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let request = for_the_guest(request).unwrap();
        assert_eq!(request.headers()["host"], "localhost");
        let request = Request::get("/products/1")
            .header("host", "api.example")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        assert_eq!(
            for_the_guest(request).unwrap().headers()["host"],
            "api.example"
        );
        for host in [&b"caf\xc3\xa9.example"[..], b"a b", b"a/b"] {
            let request = Request::get("/products/1")
                .header("host", http::HeaderValue::from_bytes(host).unwrap())
                .body(http_body_util::Empty::<Bytes>::new())
                .unwrap();
            let refused = for_the_guest(request).err().expect("refused");
            assert_eq!(refused.status(), http::StatusCode::BAD_REQUEST);
        }
    }
}
