use super::fake::{FakeEnv, MS, run_on};
use super::*;

fn upstream(timeout_ms: u64, max_attempts: u32) -> RouteUpstream {
    let config = crate::config::Config::from_lookup(|k| match k {
        "FANOUT_CONFIG" => Some(format!(
            r#"{{"routes": [{{"path": "/p/{{id}}", "upstreams": [{{"name": "u", "url": "http://u/{{id}}",
               "timeout_ms": {timeout_ms}, "retry": {{"max_attempts": {max_attempts},
               "initial_backoff_ms": 10, "max_backoff_ms": 40}}}}]}}]}}"#
        )),
        _ => None,
    })
    .unwrap();
    config.routes[0].upstreams[0].clone()
}

/// One call for id "1" with a fresh 200 ms budget.
fn call_200ms(env: &FakeEnv, upstream: &RouteUpstream) -> Result<Value, UpstreamFailure> {
    run_on(
        env,
        call(
            env,
            upstream,
            "http://u/1".into(),
            Budget::starting_at(MS(0), MS(200)),
            &TRACE,
            None,
            env.now(),
        ),
    )
}

const TRACE: TraceContext = TraceContext {
    trace_id: [7; 16],
    parent_id: [1; 8],
    flags: 1,
};

#[test]
fn budget_arithmetic() {
    let budget = Budget::starting_at(MS(100), MS(200));
    assert_eq!(budget.remaining(MS(100)), MS(200));
    assert_eq!(budget.remaining(MS(250)), MS(50));
    assert_eq!(budget.remaining(MS(400)), Duration::ZERO);
    assert_eq!(budget.attempt_timeout(MS(100), MS(150)), MS(150));
    assert_eq!(budget.attempt_timeout(MS(250), MS(150)), MS(50));
    assert_eq!(budget.attempt_timeout(MS(300), MS(150)), Duration::ZERO);
}

#[test]
fn every_attempt_carries_the_trace_with_its_own_span() {
    let env = FakeEnv::new(vec![
        (80, Err(UpstreamFailure::Status(503))),
        (1, Ok(Value::Null)),
    ]);
    let traced = std::cell::RefCell::new(Vec::new());
    let budgets = std::cell::RefCell::new(Vec::new());
    let recording = Recording {
        env: &env,
        traced: &traced,
        budgets: &budgets,
    };
    let _ = run_on(
        &env,
        call(
            &recording,
            &upstream(150, 3),
            "http://u/1".into(),
            Budget::starting_at(MS(0), MS(200)),
            &TRACE,
            Some("x-request-timeout-ms"),
            env.now(),
        ),
    );
    let traced = traced.borrow();
    assert_eq!(traced.len(), 2);
    let budgets = budgets.borrow();
    // Each attempt tells its own budget: the first its timeout (150 ms),
    // the retry what the request has left after 80 ms and a backoff.
    assert_eq!(budgets[0], (Some("x-request-timeout-ms".into()), MS(150)));
    assert!(
        budgets[1].1 <= MS(120) && budgets[1].1 > MS(0),
        "{budgets:?}"
    );
    for header in traced.iter() {
        let ctx = TraceContext::parse(header).expect("valid traceparent");
        assert_eq!(ctx.trace_id, TRACE.trace_id);
    }
    assert_ne!(traced[0], traced[1], "each attempt is its own span");
}

/// Wraps the fake env to record each attempt's traceparent.
struct Recording<'a> {
    env: &'a FakeEnv,
    traced: &'a std::cell::RefCell<Vec<String>>,
    /// Each attempt's budget header and the budget it would say.
    budgets: &'a std::cell::RefCell<Vec<(Option<String>, Duration)>>,
}

impl Env for Recording<'_> {
    fn now(&self) -> Duration {
        self.env.now()
    }
    fn sleep(&self, d: Duration) -> impl Future<Output = ()> {
        self.env.sleep(d)
    }
    fn random(&self) -> u64 {
        self.env.random()
    }
    fn attempt(&self, a: Attempt<'_>) -> impl Future<Output = Result<Value, UpstreamFailure>> {
        self.traced.borrow_mut().push(a.traceparent.clone());
        self.budgets
            .borrow_mut()
            .push((a.budget_header.map(str::to_string), a.timeout));
        self.env.attempt(a)
    }
}

#[test]
fn server_timing_lists_upstreams_then_total() {
    let header = server_timing(
        &[
            ("inventory".into(), MS(23)),
            ("pricing".into(), Duration::from_micros(41_250)),
        ],
        MS(42),
    );
    assert_eq!(
        header,
        "inventory;dur=23.0, pricing;dur=41.3, total;dur=42.0"
    );
}

#[test]
fn flaky_upstream_succeeds_on_the_third_attempt() {
    let env = FakeEnv::new(vec![
        (5, Err(UpstreamFailure::Status(503))),
        (
            5,
            Err(UpstreamFailure::Transport(
                "ErrorCode::ConnectionRefused".into(),
            )),
        ),
        (5, Ok(serde_json::json!({"ok": true}))),
    ]);
    let result = call_200ms(&env, &upstream(100, 3));
    assert_eq!(result, Ok(serde_json::json!({"ok": true})));
    let attempts = env.attempts.borrow();
    assert_eq!(attempts.iter().map(|a| a.0).collect::<Vec<_>>(), [1, 2, 3]);
    // Backoffs stay under their ceilings (10 ms, then 20 ms).
    let sleeps = env.sleeps.borrow();
    assert!(sleeps[0] <= MS(10) && sleeps[1] <= MS(20), "{sleeps:?}");
}

#[test]
fn hard_down_upstream_costs_at_most_max_attempts() {
    let env = FakeEnv::new(vec![(1, Err(UpstreamFailure::Status(503))); 10]);
    let result = call_200ms(&env, &upstream(100, 3));
    assert_eq!(result, Err(UpstreamFailure::Status(503)));
    assert_eq!(env.attempts.borrow().len(), 3);
    assert!(env.now() < MS(200));
}

#[test]
fn client_errors_are_not_retried() {
    for failure in [
        UpstreamFailure::Status(404),
        UpstreamFailure::Status(400),
        UpstreamFailure::Status(500),
        UpstreamFailure::Denied,
        UpstreamFailure::Shed("limit".into()),
    ] {
        let env = FakeEnv::new(vec![(1, Err(failure.clone())), (1, Ok(Value::Null))]);
        let result = call_200ms(&env, &upstream(100, 3));
        assert_eq!(result, Err(failure));
        assert_eq!(env.attempts.borrow().len(), 1);
    }
}

#[test]
fn attempt_timeouts_are_cut_to_the_budget_and_retried_while_it_lasts() {
    // Every attempt hangs. Timeout 150 ms in a 200 ms budget: the first
    // attempt gets 150 ms, the retry gets what is left, then no more.
    let env = FakeEnv::new(vec![(10_000, Ok(Value::Null)); 5]);
    let result = call_200ms(&env, &upstream(150, 5));
    assert_eq!(result, Err(UpstreamFailure::Timeout));
    let attempts = env.attempts.borrow();
    assert_eq!(attempts[0].2, MS(150));
    assert!(attempts.len() == 2, "{attempts:?}");
    // The retry's timeout ends exactly at the deadline.
    let (_, started, timeout) = attempts[1];
    assert_eq!(started + timeout, MS(200));
    assert_eq!(env.now(), MS(200));
}

#[test]
fn no_retry_starts_that_cannot_finish() {
    // 195 ms of a 200 ms budget are gone after the first failure: the
    // retry would have under MIN_RETRY_BUDGET, so it is not started.
    let env = FakeEnv::new(vec![
        (195, Err(UpstreamFailure::Status(503))),
        (1, Ok(Value::Null)),
    ]);
    let result = call_200ms(&env, &upstream(1000, 3));
    assert_eq!(result, Err(UpstreamFailure::Status(503)));
    assert_eq!(env.attempts.borrow().len(), 1);
}

#[test]
fn a_retry_the_host_sheds_reports_the_original_failure() {
    let env = FakeEnv::new(vec![
        (1, Err(UpstreamFailure::Status(503))),
        (0, Err(UpstreamFailure::Shed("retry budget".into()))),
    ]);
    let result = call_200ms(&env, &upstream(100, 3));
    assert_eq!(result, Err(UpstreamFailure::Status(503)));
    assert_eq!(env.attempts.borrow().len(), 2);
}

#[test]
fn an_exhausted_budget_calls_nothing() {
    let env = FakeEnv::new(vec![]);
    let budget = Budget::starting_at(MS(0), MS(200));
    env.advance(MS(200));
    assert_eq!(
        run_on(
            &env,
            call(
                &env,
                &upstream(100, 3),
                "http://u/1".into(),
                budget,
                &TRACE,
                None,
                env.now(),
            )
        ),
        Err(UpstreamFailure::Timeout)
    );
}

#[test]
fn fan_out_merges_in_id_order() {
    let env = FakeEnv::new(vec![
        (1, Ok(serde_json::json!({"n": 1}))),
        (1, Ok(serde_json::json!({"n": 2}))),
    ]);
    let config = crate::config::Config::from_lookup(|k| match k {
        "FANOUT_CONFIG" => Some(
            r#"{"routes": [{"path": "/p/{id}", "upstreams": [{"name": "u", "url": "http://u/{id}"}]}]}"#.into(),
        ),
        _ => None,
    })
    .unwrap();
    let items: Vec<Params> = ["a", "b"]
        .into_iter()
        .map(|id| Params {
            path: vec![("id".into(), id.into())],
            query: Vec::new(),
        })
        .collect();
    let items = run_on(
        &env,
        fan_out(
            &env,
            &config,
            &config.routes[0],
            &items,
            Budget::starting_at(MS(0), MS(200)),
            &TRACE,
        ),
    );
    let fan_out = items;
    // Both items' calls ran at once: 1 ms in all.
    assert_eq!(fan_out.timings, [("u".to_string(), MS(1))]);
    let summary: Vec<(String, Value)> = fan_out
        .items
        .into_iter()
        .map(|i| (i.key().to_string(), i.result.unwrap()["u"].clone()))
        .collect();
    assert_eq!(
        summary,
        [
            ("a".into(), serde_json::json!({"n": 1})),
            ("b".into(), serde_json::json!({"n": 2}))
        ]
    );
}

#[test]
fn a_retry_after_is_waited_for_or_not_retried_at_all() {
    let throttled = |ms| UpstreamFailure::Throttled {
        status: 429,
        retry_after: MS(ms),
    };
    // 50 ms asked, 200 ms budget: the retry waits the 50 ms, then succeeds.
    let env = FakeEnv::new(vec![
        (5, Err(throttled(50))),
        (5, Ok(serde_json::json!({}))),
    ]);
    assert!(call_200ms(&env, &upstream(150, 3)).is_ok());
    let sleeps = env.sleeps.borrow();
    assert_eq!(sleeps.len(), 1);
    assert!(sleeps[0] >= MS(50), "{sleeps:?}");

    // 1 s asked: it cannot fit, so no retry (the upstream asked for none
    // this soon), and the throttling is what is reported.
    let env = FakeEnv::new(vec![(5, Err(throttled(1000)))]);
    assert_eq!(call_200ms(&env, &upstream(150, 3)), Err(throttled(1000)));
    assert_eq!(env.attempts.borrow().len(), 1);
    assert!(env.sleeps.borrow().is_empty());
}
