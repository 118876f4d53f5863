//! The saga engine against the real store and real HTTP targets on loopback: the happy path,
//! a failure at each step, retries, timeouts, the circuit breaker, awaits, duplicate triggers,
//! cancel, stuck and retry, and a restart in the middle.

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use skald_core::{Error, EventStore};
use skald_saga::{BreakerSettings, InstanceFilter, SagaOptions, SagaState};
use support::{Engine, Reply, Target, story};

/// A three-step order saga calling `target`: reserve, charge, ship (each compensable).
fn order_saga(target: &Target, extra: &str) -> String {
    format!(
        r#"
name: order
version: 1
trigger: {{category: order, types: [OrderPlaced]}}
correlationKey: /data/orderId
defaults:
  timeout: 2s
  retry: {{maxAttempts: 3, initialBackoff: 20ms, maxBackoff: 100ms, jitter: 0}}
steps:
  - name: reserve
    action: {{http: {{method: POST, url: "{base}/reserve", body: {{order: "{{{{trigger.data.orderId}}}}"}}}}}}
    compensation: {{http: {{method: POST, url: "{base}/unreserve"}}}}
  - name: charge
    action: {{http: {{method: POST, url: "{base}/charge", body: {{amount: "{{{{trigger.data.amount}}}}"}}}}}}
    compensation: {{http: {{method: POST, url: "{base}/refund"}}}}
  - name: ship
    action: {{http: {{method: POST, url: "{base}/ship"}}}}
    compensation: {{http: {{method: POST, url: "{base}/unship"}}}}
{extra}"#,
        base = target.url("")
    )
}

async fn place_order(engine: &Engine, order: &str) {
    engine
        .append(
            &format!("order-{order}"),
            "OrderPlaced",
            json!({"orderId": order, "amount": 42}),
        )
        .await;
}

#[tokio::test]
async fn the_happy_path_runs_every_step_once_with_stable_idempotency_keys() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    let registered = engine
        .sagas
        .register(&order_saga(&target, ""))
        .await
        .unwrap();
    assert!(!registered.replayed);
    // Registering the same text again writes nothing.
    assert!(
        engine
            .sagas
            .register(&order_saga(&target, ""))
            .await
            .unwrap()
            .replayed
    );
    place_order(&engine, "o-1").await;
    let h = engine.wait_for("order", "o-1", "completed").await;
    assert_eq!(
        story(&h),
        [
            "SagaStarted",
            "StepSucceeded:reserve:action",
            "StepSucceeded:charge:action",
            "StepSucceeded:ship:action",
            "SagaCompleted"
        ]
    );
    assert_eq!(
        target.routes(),
        ["POST /reserve", "POST /charge", "POST /ship"]
    );
    let calls = target.calls();
    let id = h.summary.saga_id.clone();
    assert_eq!(
        calls[0].idempotency_key.as_deref(),
        Some(format!("{id}:reserve:action").as_str())
    );
    // Templates render with their JSON types.
    assert_eq!(calls[0].body, json!({"order": "o-1"}));
    assert_eq!(calls[1].body, json!({"amount": 42}));
    // The output of a step is the target's answer.
    assert_eq!(h.history[1].data["output"], json!({"id": "POST /reserve"}));
    let listed = engine.sagas.instances(&InstanceFilter {
        state: Some(SagaState::Completed),
        ..Default::default()
    });
    assert_eq!(listed.len(), 1);
    engine.stop().await;
}

#[tokio::test]
async fn steps_call_https_targets_trusted_by_the_configured_ca_and_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    skald_security::tls::write_dev_certificates(&certs).unwrap();
    let target = Target::start_tls(&certs).await;
    assert!(target.url("").starts_with("https://127.0.0.1:"));
    let options = SagaOptions {
        ca_file: Some(certs.join("ca.pem")),
        ..SagaOptions::default()
    };
    let engine = Engine::open(&dir.path().join("trusting"), options).await;
    engine
        .sagas
        .register(&order_saga(&target, ""))
        .await
        .unwrap();
    place_order(&engine, "o-1").await;
    let h = engine.wait_for("order", "o-1", "completed").await;
    assert_eq!(
        target.routes(),
        ["POST /reserve", "POST /charge", "POST /ship"]
    );
    let id = h.summary.saga_id.clone();
    assert_eq!(
        target.calls()[0].idempotency_key.as_deref(),
        Some(format!("{id}:reserve:action").as_str())
    );
    engine.stop().await;

    // With the system's roots, which do not hold the private CA, no request reaches the
    // target: the step fails as a connection failure, and the saga is compensated.
    let engine = Engine::open(&dir.path().join("distrusting"), SagaOptions::default()).await;
    engine
        .sagas
        .register(&order_saga(&target, ""))
        .await
        .unwrap();
    place_order(&engine, "o-2").await;
    let h = engine.wait_for("order", "o-2", "compensated").await;
    assert_eq!(target.routes().len(), 3, "{:?}", target.routes());
    let error = h.summary.last_error.clone().unwrap_or_default();
    assert!(error.contains("certificate"), "{error}");
    engine.stop().await;

    // A CA file that cannot be read stops the engine from starting, and says which.
    let store = skald_storage::Store::open(skald_storage::Options {
        data_dir: dir.path().join("unstarted"),
        ..skald_storage::Options::default()
    })
    .unwrap()
    .0;
    let hub = skald_hub::Hub::start(Arc::new(store), skald_hub::HubOptions::default());
    let options = SagaOptions {
        ca_file: Some(dir.path().join("no-such-ca.pem")),
        ..SagaOptions::default()
    };
    let Err(e) =
        skald_saga::Sagas::start(hub.clone(), options, Arc::new(skald_saga::WallClock)).await
    else {
        panic!("started with a CA file that does not exist");
    };
    assert!(e.to_string().contains("[sagas] ca_file"), "{e}");
    assert!(e.to_string().contains("no-such-ca.pem"), "{e}");
    hub.shutdown();
    hub.stopped().await;
}

#[tokio::test]
async fn a_failure_at_each_step_compensates_the_completed_steps_in_reverse() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    engine
        .sagas
        .register(&order_saga(&target, ""))
        .await
        .unwrap();
    let steps = ["reserve", "charge", "ship"];
    let undo = ["unreserve", "refund", "unship"];
    for (failing, step) in steps.iter().enumerate() {
        let route = format!("POST /{step}");
        // 400 is not retryable: the step fails for good at once.
        target.fix(&route, Reply::status(400));
        let before = target.routes().len();
        let order = format!("f-{failing}");
        place_order(&engine, &order).await;
        let h = engine.wait_for("order", &order, "compensated").await;
        target.unfix(&route);
        let mut expected: Vec<String> = steps[..=failing]
            .iter()
            .map(|s| format!("POST /{s}"))
            .collect();
        expected.extend(undo[..failing].iter().rev().map(|s| format!("POST /{s}")));
        assert_eq!(target.routes()[before..], expected[..], "failing at {step}");
        assert_eq!(h.summary.completed_steps, steps[..failing].to_vec());
        assert!(
            h.summary
                .last_error
                .as_deref()
                .unwrap()
                .contains("answered 400")
        );
        assert!(
            story(&h)
                .iter()
                .any(|s| s == &format!("SagaCompensating:{step}:")),
            "{:?}",
            story(&h)
        );
    }
    engine.stop().await;
}

#[tokio::test]
async fn retries_back_off_and_keep_the_idempotency_key() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    engine
        .sagas
        .register(&order_saga(&target, ""))
        .await
        .unwrap();
    target.queue("POST /charge", vec![Reply::status(503), Reply::status(503)]);
    place_order(&engine, "r-1").await;
    let h = engine.wait_for("order", "r-1", "completed").await;
    let charges: Vec<_> = target
        .calls()
        .into_iter()
        .filter(|c| c.route == "POST /charge")
        .collect();
    assert_eq!(charges.len(), 3);
    assert!(
        charges
            .iter()
            .all(|c| c.idempotency_key == charges[0].idempotency_key)
    );
    // Back-off 20 ms then 40 ms (no jitter): each gap is at least that long.
    assert!(charges[1].at - charges[0].at >= Duration::from_millis(20));
    assert!(charges[2].at - charges[1].at >= Duration::from_millis(40));
    let failed: Vec<_> = h
        .history
        .iter()
        .filter(|e| e.event_type == "StepFailed")
        .collect();
    assert_eq!(failed.len(), 2);
    assert_eq!(failed[1].data["attempt"], 2);
    assert_eq!(failed[1].data["retryable"], true);
    assert_eq!(
        h.history
            .iter()
            .find(|e| e.event_type == "StepSucceeded" && e.data["step"] == "charge")
            .unwrap()
            .data["attempt"],
        3
    );
    engine.stop().await;
}

#[tokio::test]
async fn an_answer_too_large_to_keep_fails_the_step_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    engine
        .sagas
        .register(&order_saga(&target, ""))
        .await
        .unwrap();
    let huge = format!("{{\"pad\":\"{}\"}}", "x".repeat(300 * 1024));
    target.fix(
        "POST /charge",
        Reply {
            status: 200,
            delay: Duration::ZERO,
            body: huge,
        },
    );
    place_order(&engine, "big-1").await;
    let h = engine.wait_for("order", "big-1", "compensated").await;
    let error = h.summary.last_error.unwrap();
    assert!(error.contains("over the 256 KiB"), "{error}");
    assert_eq!(
        target
            .routes()
            .iter()
            .filter(|r| *r == "POST /charge")
            .count(),
        1
    );
    engine.stop().await;
}

#[tokio::test]
async fn an_answer_that_grows_over_the_cap_once_escaped_fails_the_step_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    engine
        .sagas
        .register(&order_saga(&target, ""))
        .await
        .unwrap();
    // 200 KiB of control bytes: under the cap as received, six times that as JSON. The step
    // fails for good; the target answered success, so it acted: it is compensated with the
    // earlier steps.
    target.fix(
        "POST /charge",
        Reply {
            status: 200,
            delay: Duration::ZERO,
            body: "\u{1}".repeat(200 * 1024),
        },
    );
    place_order(&engine, "escaped-1").await;
    let h = engine.wait_for("order", "escaped-1", "compensated").await;
    let error = h.summary.last_error.unwrap();
    assert!(error.contains("once stored as JSON"), "{error}");
    assert_eq!(h.summary.compensated_steps, ["charge", "reserve"]);
    // JSON nested 100 deep parses, but not once inside the step's event (128 at most).
    target.fix(
        "POST /charge",
        Reply {
            status: 200,
            delay: Duration::ZERO,
            body: format!("{}{}", "[".repeat(100), "]".repeat(100)),
        },
    );
    place_order(&engine, "deep-1").await;
    let h = engine.wait_for("order", "deep-1", "compensated").await;
    let error = h.summary.last_error.unwrap();
    assert!(error.contains("nests deeper than 64"), "{error}");
    engine.stop().await;
}

#[tokio::test]
async fn a_step_that_times_out_on_every_attempt_is_compensated() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    let def = order_saga(&target, "").replace("timeout: 2s", "timeout: 150ms");
    engine.sagas.register(&def).await.unwrap();
    target.fix("POST /ship", Reply::slow(Duration::from_secs(3)));
    place_order(&engine, "t-1").await;
    let h = engine.wait_for("order", "t-1", "compensated").await;
    let ships = target
        .routes()
        .iter()
        .filter(|r| *r == "POST /ship")
        .count();
    assert_eq!(
        ships, 3,
        "every attempt timed out and was retried up to maxAttempts"
    );
    assert!(
        h.summary
            .last_error
            .unwrap()
            .contains("timed out after 150ms")
    );
    // Each attempt reached the target, so ship may have acted: it is compensated too.
    assert_eq!(h.summary.compensated_steps, ["charge", "reserve", "ship"]);
    engine.stop().await;
}

#[tokio::test]
async fn the_breaker_opens_fails_fast_half_opens_and_closes() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    let options = SagaOptions {
        breaker: BreakerSettings {
            failure_threshold: 2,
            open_for: Duration::from_millis(400),
        },
        ..SagaOptions::default()
    };
    let engine = Engine::open(dir.path(), options).await;
    let def = order_saga(&target, "")
        .replace("maxAttempts: 3", "maxAttempts: 30")
        .replace(
            "initialBackoff: 20ms, maxBackoff: 100ms",
            "initialBackoff: 50ms, maxBackoff: 50ms",
        );
    engine.sagas.register(&def).await.unwrap();
    target.fix("POST /reserve", Reply::status(503));
    place_order(&engine, "b-1").await;
    // Two failures open the breaker; attempts then fail fast without reaching the target.
    let id = skald_saga::saga_id("order", "b-1").to_string();
    engine
        .wait_until(&id, |h| {
            let fast = h.history.iter().filter(|e| {
                e.data["error"]
                    .as_str()
                    .is_some_and(|s| s.contains("circuit breaker"))
            });
            fast.count() >= 2
        })
        .await;
    let mut metrics = skald_core::metrics::Exposition::new();
    engine.sagas.write_metrics(&mut metrics);
    let text = metrics.finish();
    assert!(
        text.contains(&format!(
            "skald_saga_breaker_state{{host=\"{}\"}} 2",
            target.addr
        )),
        "{text}"
    );
    assert!(text.contains("outcome=\"breaker_open\""), "{text}");
    // While open, the target saw only the calls that tripped it and the half-open trials.
    let reached = target.routes().len();
    assert!(
        reached < 6,
        "{reached} calls reached the target while the breaker was open"
    );
    // The target recovers: the next half-open trial succeeds and the breaker closes.
    target.unfix("POST /reserve");
    engine.wait_for("order", "b-1", "completed").await;
    let mut metrics = skald_core::metrics::Exposition::new();
    engine.sagas.write_metrics(&mut metrics);
    assert!(metrics.finish().contains(&format!(
        "skald_saga_breaker_state{{host=\"{}\"}} 0",
        target.addr
    )));
    engine.stop().await;
}

fn await_saga(target: &Target, timeout: &str) -> String {
    format!(
        r#"
name: payment
version: 1
trigger: {{category: order, types: [OrderPlaced]}}
correlationKey: /data/orderId
steps:
  - name: request
    action: {{append: {{stream: "payment-{{{{saga.correlationKey}}}}", type: PaymentRequested, data: {{order: "{{{{trigger.data.orderId}}}}"}}}}}}
    compensation: {{http: {{method: POST, url: "http://{addr}/cancel-payment"}}}}
  - name: wait
    action: {{await: {{category: payment, types: [PaymentAuthorized], correlation: /data/order, timeout: {timeout}}}}}
  - name: done
    action: {{http: {{method: POST, url: "http://{addr}/done", body: {{auth: "{{{{steps.wait.output.data.auth}}}}"}}}}}}
    compensation: {{http: {{method: POST, url: "http://{addr}/undone"}}}}
"#,
        addr = target.addr
    )
}

#[tokio::test]
async fn an_await_is_answered_by_a_matching_event_or_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    engine
        .sagas
        .register(&await_saga(&target, "400ms"))
        .await
        .unwrap();
    // A reply for another order must not answer this one.
    place_order(&engine, "a-1").await;
    place_order(&engine, "a-2").await;
    engine
        .append(
            "payment-x",
            "PaymentAuthorized",
            json!({"order": "a-other", "auth": "no"}),
        )
        .await;
    engine
        .append(
            "payment-a-1",
            "PaymentAuthorized",
            json!({"order": "a-1", "auth": "ok-1"}),
        )
        .await;
    let h = engine.wait_for("payment", "a-1", "completed").await;
    let done = target
        .calls()
        .into_iter()
        .find(|c| c.route == "POST /done")
        .unwrap();
    assert_eq!(done.body, json!({"auth": "ok-1"}));
    // The append step wrote its command once, with the saga's ids in its metadata.
    let request = &h.history[1].data["output"];
    assert_eq!(request["stream"], "payment-a-1");
    // a-2 gets no answer: the await times out and the request is compensated.
    let h = engine.wait_for("payment", "a-2", "compensated").await;
    assert!(h.summary.last_error.unwrap().contains("no matching event"));
    assert!(target.routes().contains(&"POST /cancel-payment".to_owned()));
    engine.stop().await;
}

#[tokio::test]
async fn duplicate_triggers_make_one_instance() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    engine
        .sagas
        .register(&order_saga(&target, ""))
        .await
        .unwrap();
    for _ in 0..3 {
        place_order(&engine, "d-1").await;
    }
    engine.wait_for("order", "d-1", "completed").await;
    // Give any wrongly started second instance time to call the target.
    place_order(&engine, "d-2").await;
    engine.wait_for("order", "d-2", "completed").await;
    let reserves = target
        .routes()
        .iter()
        .filter(|r| *r == "POST /reserve")
        .count();
    assert_eq!(reserves, 2, "one instance per key: {:?}", target.routes());
    assert_eq!(engine.sagas.instances(&InstanceFilter::default()).len(), 2);
    engine.stop().await;
}

#[tokio::test]
async fn definitions_are_validated_versioned_and_never_silently_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    let bad = order_saga(&target, "").replace(
        "    compensation: {http: {method: POST, url: \"http://ADDR/refund\"}}\n"
            .replace("ADDR", &target.addr.to_string())
            .as_str(),
        "",
    );
    let err = engine.sagas.register(&bad).await.unwrap_err();
    let Error::InvalidSaga(message) = err else {
        panic!("{err:?}")
    };
    assert!(message.contains("line 13, column 5"), "{message}");
    assert!(
        message.contains("\"charge\" has no compensation"),
        "{message}"
    );
    engine
        .sagas
        .register(&order_saga(&target, ""))
        .await
        .unwrap();
    let changed = order_saga(&target, "").replace("/ship\"", "/ship2\"");
    let err = engine.sagas.register(&changed).await.unwrap_err();
    assert!(
        matches!(err, Error::SagaConflict(ref m) if m.contains("version 2")),
        "{err:?}"
    );
    // Version 2 applies to new instances only.
    engine
        .sagas
        .register(&changed.replace("version: 1", "version: 2"))
        .await
        .unwrap();
    place_order(&engine, "v-2").await;
    let h = engine.wait_for("order", "v-2", "completed").await;
    assert_eq!(h.summary.version, 2);
    assert!(target.routes().contains(&"POST /ship2".to_owned()));
    // An older version may be registered again as it was (a replay), but a gap below the
    // newest cannot be filled later.
    assert!(
        engine
            .sagas
            .register(&order_saga(&target, ""))
            .await
            .unwrap()
            .replayed
    );
    let v4 = changed
        .replace("version: 1", "version: 4")
        .replace("/ship2\"", "/ship4\"");
    engine.sagas.register(&v4).await.unwrap();
    let v3 = changed.replace("version: 1", "version: 3");
    let err = engine.sagas.register(&v3).await.unwrap_err();
    assert!(
        matches!(err, Error::SagaConflict(ref m) if m.contains("at version 4")),
        "{err:?}"
    );
    assert_eq!(engine.sagas.definitions()[0].versions, [1, 2, 4]);
    engine.stop().await;
}

#[tokio::test]
async fn a_failing_compensation_leaves_the_saga_stuck_until_retried() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    engine
        .sagas
        .register(&order_saga(&target, ""))
        .await
        .unwrap();
    target.fix("POST /ship", Reply::status(400));
    target.fix("POST /refund", Reply::status(500));
    place_order(&engine, "s-1").await;
    let h = engine.wait_for("order", "s-1", "stuck").await;
    let error = h.summary.last_error.clone().unwrap();
    assert!(
        error.contains("charge (compensation): answered 500"),
        "{error}"
    );
    assert_eq!(story(&h).last().unwrap(), "SagaStuck:charge:compensation");
    let refunds = target
        .routes()
        .iter()
        .filter(|r| *r == "POST /refund")
        .count();
    assert_eq!(refunds, 3);
    // Not stuck sagas cannot be retried; stuck ones resume at the same compensation.
    target.unfix("POST /refund");
    let id = h.summary.saga_id.clone();
    engine.sagas.retry(&id).await.unwrap();
    let h = engine.wait_for("order", "s-1", "compensated").await;
    assert_eq!(h.summary.compensated_steps, ["charge", "reserve"]);
    assert!(matches!(
        engine.sagas.retry(&id).await.unwrap_err(),
        Error::SagaConflict(_)
    ));
    engine.stop().await;
}

#[tokio::test]
async fn cancel_compensates_a_running_saga() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    engine
        .sagas
        .register(&await_saga(&target, "1h"))
        .await
        .unwrap();
    place_order(&engine, "c-1").await;
    let id = skald_saga::saga_id("payment", "c-1").to_string();
    // Wait until the saga waits for the payment.
    engine
        .wait_until(&id, |h| {
            story(h).iter().any(|s| s.starts_with("StepStarted:wait"))
        })
        .await;
    // The await takes the whole hour unless the cancel ends it; the request is then undone.
    engine
        .sagas
        .cancel(&id, "customer changed their mind")
        .await
        .unwrap();
    let h = engine.wait_for("payment", "c-1", "cancelled").await;
    assert_eq!(h.summary.compensated_steps, ["request"]);
    assert!(matches!(
        engine.sagas.cancel(&id, "again").await.unwrap_err(),
        Error::SagaConflict(_)
    ));
    assert!(matches!(
        engine.sagas.cancel("nope", "x").await.unwrap_err(),
        Error::SagaNotFound(_)
    ));
    engine.stop().await;
}

#[tokio::test]
async fn a_restart_resumes_unfinished_sagas_and_keeps_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    engine
        .sagas
        .register(&order_saga(&target, ""))
        .await
        .unwrap();
    // charge hangs long enough for the engine to stop in the middle of it.
    target.fix("POST /charge", Reply::slow(Duration::from_secs(1)));
    place_order(&engine, "z-1").await;
    let deadline = std::time::Instant::now() + support::WAIT;
    while !target.routes().contains(&"POST /charge".to_owned()) {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    engine.hub.shutdown();
    engine.sagas.stopped(Duration::from_millis(1)).await;
    engine.hub.stopped().await;
    engine.store.shutdown().await;
    drop(engine);
    target.unfix("POST /charge");
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    let h = engine.wait_for("order", "z-1", "completed").await;
    let charges: Vec<_> = target
        .calls()
        .into_iter()
        .filter(|c| c.route == "POST /charge")
        .collect();
    assert!(charges.len() >= 2, "the interrupted step runs again");
    assert!(
        charges
            .iter()
            .all(|c| c.idempotency_key == charges[0].idempotency_key)
    );
    assert_eq!(
        target
            .routes()
            .iter()
            .filter(|r| *r == "POST /reserve")
            .count(),
        1
    );
    assert_eq!(h.summary.completed_steps, ["reserve", "charge", "ship"]);
    engine.stop().await;
}

#[tokio::test]
async fn a_stop_while_triggers_wait_for_room_loses_none_and_one_event_can_start_two_sagas() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    // One saga at a time, each held up by a slow first step: the other triggers wait.
    let options = SagaOptions {
        max_running: 1,
        ..SagaOptions::default()
    };
    let engine = Engine::open(dir.path(), options).await;
    engine
        .sagas
        .register(&order_saga(&target, ""))
        .await
        .unwrap();
    let second = order_saga(&target, "").replace("name: order", "name: audit");
    engine.sagas.register(&second).await.unwrap();
    target.fix("POST /reserve", Reply::slow(Duration::from_millis(300)));
    for order in ["w-1", "w-2", "w-3"] {
        place_order(&engine, order).await;
    }
    let deadline = std::time::Instant::now() + support::WAIT;
    while target.routes().is_empty() {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    engine.hub.shutdown();
    engine.sagas.stopped(Duration::from_secs(5)).await;
    engine.hub.stopped().await;
    engine.store.shutdown().await;
    drop(engine);
    target.unfix("POST /reserve");
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    for definition in ["order", "audit"] {
        for order in ["w-1", "w-2", "w-3"] {
            engine.wait_for(definition, order, "completed").await;
        }
    }
    engine.stop().await;
}

/// An authority that refuses what its list names (reads or appends of a stream).
struct Refusing(Vec<skald_saga::Need<'static>>);

impl skald_saga::Authority for Refusing {
    fn check(
        &self,
        _registrant: Option<&serde_json::Value>,
        need: skald_saga::Need<'_>,
    ) -> Result<(), String> {
        if self.0.contains(&need) {
            Err(format!("{need:?} is not allowed"))
        } else {
            Ok(())
        }
    }
}

#[tokio::test]
async fn a_step_to_an_address_the_egress_policy_refuses_fails_for_good_without_a_connection() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    // No entry for loopback: the default policy.
    let engine = Engine::open_with(
        dir.path(),
        SagaOptions::default(),
        std::sync::Arc::new(skald_saga::Unrestricted),
    )
    .await;
    engine
        .sagas
        .register(&order_saga(&target, ""))
        .await
        .unwrap();
    place_order(&engine, "o-1").await;
    let h = engine.wait_for("order", "o-1", "compensated").await;
    assert_eq!(
        story(&h),
        [
            "SagaStarted",
            "StepFailed:reserve:action",
            "SagaCompensating:reserve:",
            "SagaCompensated"
        ]
    );
    let error = h.history[1].data["error"].as_str().unwrap();
    assert!(error.contains("egress policy refuses"), "{error}");
    assert_eq!(h.history[1].data["retryable"], json!(false));
    assert!(target.calls().is_empty(), "nothing reached the target");
    engine.stop().await;
}

#[tokio::test]
async fn steps_run_with_their_registrants_rights_checked_when_they_run() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    let mut options = SagaOptions::default();
    options.egress.allow.push("127.0.0.1".to_owned());
    let authority = Refusing(vec![
        skald_saga::Need::Append("hr-salary-o-1"),
        skald_saga::Need::Read("order-secret"),
    ]);
    let engine = Engine::open_with(dir.path(), options, std::sync::Arc::new(authority)).await;
    let text = order_saga(
        &target,
        r#"  - name: pay
    action: {append: {stream: "hr-salary-{{saga.correlationKey}}", type: SalarySet}}
    compensation: {append: {stream: "hr-log", type: Undone}}"#,
    );
    engine.sagas.register(&text).await.unwrap();
    // A trigger its registrant may not read starts nothing; the next one does.
    place_order(&engine, "secret").await;
    place_order(&engine, "o-1").await;
    let h = engine.wait_for("order", "o-1", "compensated").await;
    let failed = h
        .history
        .iter()
        .find(|e| e.event_type == "StepFailed")
        .expect("the append step failed");
    assert_eq!(failed.data["step"], json!("pay"));
    let error = failed.data["error"].as_str().unwrap();
    assert!(error.contains("forbidden"), "{error}");
    let salary = engine
        .hub
        .store()
        .stream_head(&skald_core::StreamName::new("hr-salary-o-1").unwrap())
        .await
        .unwrap();
    assert!(salary.is_none(), "nothing was appended");
    let secret = engine.sagas.instances(&InstanceFilter::default());
    assert!(
        secret.iter().all(|i| i.correlation_key != "secret"),
        "no saga for a trigger its registrant may not read"
    );
    engine.stop().await;
}

#[tokio::test]
async fn a_definition_starts_at_most_its_rate_and_every_trigger_still_starts_one() {
    let dir = tempfile::tempdir().unwrap();
    let options = SagaOptions {
        max_starts_per_second: 2,
        ..SagaOptions::default()
    };
    let engine = Engine::open(dir.path(), options).await;
    let text = r#"
name: audit
version: 1
trigger: {category: order, types: [OrderPlaced]}
correlationKey: /data/orderId
steps:
  - name: note
    pivot: true
    action: {append: {stream: "audit-{{saga.correlationKey}}", type: Noted}}
"#;
    engine.sagas.register(text).await.unwrap();
    let orders: Vec<String> = (1..=6).map(|i| format!("r-{i}")).collect();
    for order in &orders {
        place_order(&engine, order).await;
    }
    for order in &orders {
        engine.wait_for("audit", order, "completed").await;
    }
    // A burst of two, then the loop waited for the other four.
    let mut out = skald_core::metrics::Exposition::new();
    engine.sagas.write_metrics(&mut out);
    let text = out.finish();
    let waits: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("skald_saga_start_waits_total "))
        .expect("the metric is exposed")
        .parse()
        .unwrap();
    assert!(waits >= 4.0, "{text}");
    engine.stop().await;
}

const AUDIT: &str = r#"
name: audit
version: 1
trigger: {category: order, types: [OrderPlaced]}
correlationKey: /data/orderId
steps:
  - name: note
    pivot: true
    action: {append: {stream: "audit-{{saga.correlationKey}}", type: Noted}}
"#;

/// A definition whose instances wait an hour for an event: they stay running.
const HELD: &str = r#"
name: held
version: 1
trigger: {category: order, types: [OrderPlaced]}
correlationKey: /data/orderId
steps:
  - name: wait
    action: {await: {category: payment, types: [Paid], timeout: 1h}}
"#;

/// Places an order and waits until the trigger loop has passed it.
async fn place_and_pass(engine: &Engine, order: &str) {
    let position = engine
        .append(
            &format!("order-{order}"),
            "OrderPlaced",
            json!({"orderId": order}),
        )
        .await
        .first_position
        .0;
    let deadline = std::time::Instant::now() + support::WAIT;
    while engine.sagas.trigger_position() <= position {
        assert!(
            std::time::Instant::now() < deadline,
            "the trigger loop stalls"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn has_instance(engine: &Engine, definition: &str, key: &str) -> bool {
    engine
        .sagas
        .instances(&InstanceFilter::default())
        .iter()
        .any(|i| i.definition == definition && i.correlation_key == key)
}

#[tokio::test]
async fn a_disabled_definition_starts_nothing_until_enabled_even_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    engine.sagas.register(AUDIT).await.unwrap();
    place_order(&engine, "a-1").await;
    engine.wait_for("audit", "a-1", "completed").await;
    assert!(engine.sagas.disable("audit", None).await.unwrap());
    assert!(!engine.sagas.disable("audit", None).await.unwrap(), "once");
    assert!(!engine.sagas.definitions()[0].enabled);
    place_and_pass(&engine, "a-2").await;
    assert!(!has_instance(&engine, "audit", "a-2"));
    engine.stop().await;

    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    assert!(!engine.sagas.definitions()[0].enabled, "it stays disabled");
    place_and_pass(&engine, "a-3").await;
    assert!(engine.sagas.enable("audit", None).await.unwrap());
    place_order(&engine, "a-4").await;
    engine.wait_for("audit", "a-4", "completed").await;
    for skipped in ["a-2", "a-3"] {
        assert!(!has_instance(&engine, "audit", skipped), "{skipped}");
    }
    let missing = engine.sagas.disable("nothing", None).await.unwrap_err();
    assert!(matches!(missing, Error::SagaNotFound(_)), "{missing}");
    engine.stop().await;

    // Skipped triggers stay skipped after a restart.
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    assert!(engine.sagas.definitions()[0].enabled);
    for skipped in ["a-2", "a-3"] {
        assert!(!has_instance(&engine, "audit", skipped), "{skipped}");
    }
    engine.stop().await;
}

#[tokio::test]
async fn a_definition_is_deleted_only_once_its_instances_have_ended() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    engine.sagas.register(HELD).await.unwrap();
    place_order(&engine, "h-1").await;
    let held = engine.wait_for("held", "h-1", "running").await;
    let refused = engine.sagas.delete("held", None).await.unwrap_err();
    assert!(matches!(refused, Error::SagaConflict(_)), "{refused}");
    assert!(refused.to_string().contains("1 running"), "{refused}");
    engine
        .sagas
        .cancel(&held.summary.saga_id, "test")
        .await
        .unwrap();
    engine.wait_for("held", "h-1", "cancelled").await;
    assert!(engine.sagas.delete("held", None).await.unwrap());
    assert!(!engine.sagas.delete("held", None).await.unwrap(), "once");
    assert!(engine.sagas.definitions().is_empty());
    let gone = engine.sagas.definition("held", None).unwrap_err();
    assert!(gone.to_string().contains("was deleted"), "{gone}");
    let enable = engine.sagas.enable("held", None).await.unwrap_err();
    assert!(matches!(enable, Error::SagaNotFound(_)), "{enable}");
    // Its history stays; its triggers start nothing.
    engine.sagas.history(&held.summary.saga_id).await.unwrap();
    place_and_pass(&engine, "h-2").await;
    assert!(!has_instance(&engine, "held", "h-2"));
    // The same version again is refused; the next one brings the name back, enabled.
    let again = engine.sagas.register(HELD).await.unwrap_err();
    assert!(again.to_string().contains("as version 2"), "{again}");
    engine.stop().await;

    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    assert!(engine.sagas.definitions().is_empty(), "it stays deleted");
    engine
        .sagas
        .register(&HELD.replace("version: 1", "version: 2"))
        .await
        .unwrap();
    let listed = engine.sagas.definitions();
    assert_eq!((listed[0].latest_version, listed[0].enabled), (2, true));
    place_order(&engine, "h-3").await;
    engine.wait_for("held", "h-3", "running").await;
    engine.stop().await;
}

/// Ready saga with one step that needs no target: the instance starts, which is what these
/// tests look for.
const WAITING_SAGA: &str = r#"
name: waiting
version: 1
trigger: {category: order, types: [OrderPlaced]}
correlationKey: /data/orderId
steps:
  - name: wait
    action: {await: {category: payment, types: [Paid], timeout: 1h}}
"#;

#[tokio::test]
async fn an_idle_trigger_loop_writes_no_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let options = SagaOptions {
        checkpoint_every: Duration::from_millis(20),
        ..SagaOptions::default()
    };
    let engine = Engine::open(dir.path(), options).await;
    engine.sagas.register(WAITING_SAGA).await.unwrap();
    place_and_pass(&engine, "idle-1").await;
    let checkpoints = |engine: &Engine| {
        let store = engine.store.clone();
        async move {
            store
                .stream_head(&skald_saga::streams::triggers())
                .await
                .unwrap()
                .map_or(0, |head| head.revision.0 + 1)
        }
    };
    // Let the loop checkpoint what it has seen, then leave it idle for fifty periods.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = checkpoints(&engine).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = checkpoints(&engine).await;
    assert_eq!(
        after,
        before,
        "an idle loop wrote {} checkpoints in a second",
        after - before
    );
    // Work moves it again.
    place_and_pass(&engine, "idle-2").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(checkpoints(&engine).await > after);
    engine.stop().await;
}

/// A store whose reads of the global log fail while `failing` is above zero, and whose
/// appends of a step's success fail (refused as invalid) while `refusing` is.
struct Flaky {
    store: skald_storage::Store,
    failing: std::sync::atomic::AtomicUsize,
    refusing: std::sync::atomic::AtomicUsize,
}

impl EventStore for Flaky {
    async fn append(
        &self,
        request: skald_core::AppendRequest,
    ) -> skald_core::Result<skald_core::AppendResult> {
        use std::sync::atomic::Ordering;
        if request
            .events
            .iter()
            .any(|e| e.event_type.as_str() == "StepSucceeded")
            && self
                .refusing
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(Error::InvalidEvent {
                reason: "injected: the event is too large".into(),
            });
        }
        self.store.append(request).await
    }

    async fn read(
        &self,
        request: skald_core::ReadRequest,
    ) -> skald_core::Result<skald_core::ReadPage> {
        use std::sync::atomic::Ordering;
        if matches!(request.source, skald_core::ReadSource::All(_))
            && self
                .failing
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            return Err(Error::Io("injected: the disk did not answer".into()));
        }
        self.store.read(request).await
    }

    async fn stream_head(
        &self,
        stream: &skald_core::StreamName,
    ) -> skald_core::Result<Option<skald_core::StreamHead>> {
        self.store.stream_head(stream).await
    }

    async fn info(&self) -> skald_core::Result<skald_core::StoreInfo> {
        self.store.info().await
    }

    async fn next_position(&self) -> skald_core::Result<u64> {
        self.store.next_position().await
    }

    async fn wait_for_append(&self, known: u64) -> skald_core::Result<u64> {
        self.store.wait_for_append(known).await
    }

    fn limits(&self) -> &skald_core::Limits {
        self.store.limits()
    }
}

#[tokio::test]
async fn a_failed_read_pauses_the_trigger_loop_and_it_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    engine.sagas.register(WAITING_SAGA).await.unwrap();
    place_and_pass(&engine, "before").await;
    engine.stop().await;

    // Triggers logged while the engine was down: its loop catches up by reading the store,
    // and the first reads of the log fail.
    let (store, _) = skald_storage::Store::open(skald_storage::Options {
        data_dir: dir.path().to_path_buf(),
        durability: skald_core::Durability::None,
        ..skald_storage::Options::default()
    })
    .unwrap();
    for order in ["after-1", "after-2"] {
        store
            .append(skald_core::AppendRequest {
                stream: skald_core::StreamName::new(format!("order-{order}")).unwrap(),
                expected: skald_core::ExpectedRevision::Any,
                condition: None,
                events: vec![skald_core::ProposedEvent::new(
                    skald_core::EventType::new("OrderPlaced").unwrap(),
                    skald_core::EventData::json(json!({"orderId": order}).to_string()).unwrap(),
                )],
            })
            .await
            .unwrap();
    }
    let flaky = std::sync::Arc::new(Flaky {
        store: store.clone(),
        failing: std::sync::atomic::AtomicUsize::new(3),
        refusing: std::sync::atomic::AtomicUsize::new(0),
    });
    let hub = skald_hub::Hub::start(
        std::sync::Arc::clone(&flaky),
        skald_hub::HubOptions::default(),
    );
    let mut options = SagaOptions::default();
    options.egress.allow.push("127.0.0.0/8".to_owned());
    let sagas = skald_saga::Sagas::start_with(
        hub.clone(),
        options,
        std::sync::Arc::new(skald_saga::WallClock),
        std::sync::Arc::new(skald_saga::Unrestricted),
    )
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + support::WAIT;
    loop {
        let keys: Vec<String> = sagas
            .instances(&InstanceFilter::default())
            .into_iter()
            .map(|i| i.correlation_key)
            .collect();
        if keys.contains(&"after-1".to_owned()) && keys.contains(&"after-2".to_owned()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the trigger loop did not go on after failed reads: {keys:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        flaky.failing.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the injected failures were not all met"
    );
    hub.shutdown();
    sagas.stopped(Duration::from_secs(5)).await;
    hub.stopped().await;
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_trigger_for_a_key_starts_its_saga() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    engine.sagas.register(WAITING_SAGA).await.unwrap();
    // Two triggers for each key in one append, read by the loop in one batch.
    let keys: Vec<String> = (0..100).map(|k| format!("dup-{k}")).collect();
    for key in &keys {
        let event = |marker: &str| {
            skald_core::ProposedEvent::new(
                skald_core::EventType::new("OrderPlaced").unwrap(),
                skald_core::EventData::json(json!({"orderId": key, "marker": marker}).to_string())
                    .unwrap(),
            )
        };
        engine
            .store
            .append(skald_core::AppendRequest {
                stream: skald_core::StreamName::new(format!("order-{key}")).unwrap(),
                expected: skald_core::ExpectedRevision::Any,
                condition: None,
                events: vec![event("first"), event("second")],
            })
            .await
            .unwrap();
    }
    let deadline = std::time::Instant::now() + support::WAIT;
    while engine.sagas.instances(&InstanceFilter::default()).len() < keys.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "not every saga started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut later = Vec::new();
    for key in &keys {
        let id = skald_saga::saga_id("waiting", key).to_string();
        let page = engine
            .store
            .read(skald_core::ReadRequest {
                source: skald_core::ReadSource::Stream(skald_saga::streams::instance(&id)),
                from: Some(0),
                direction: skald_core::Direction::Forward,
                limit: 1,
            })
            .await
            .unwrap();
        let started: serde_json::Value =
            serde_json::from_slice(page.events[0].data.bytes()).unwrap();
        if started["trigger"]["data"]["marker"] != "first" {
            later.push(key.clone());
        }
    }
    assert!(
        later.is_empty(),
        "{} of {} sagas started from their second trigger: {later:?}",
        later.len(),
        keys.len()
    );
    assert_eq!(
        engine.sagas.instances(&InstanceFilter::default()).len(),
        keys.len()
    );
    engine.stop().await;
}

#[tokio::test]
async fn a_runner_that_cannot_record_progress_leaves_the_saga_stuck_for_retry() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    let (store, _) = skald_storage::Store::open(skald_storage::Options {
        data_dir: dir.path().to_path_buf(),
        durability: skald_core::Durability::None,
        ..skald_storage::Options::default()
    })
    .unwrap();
    let flaky = Arc::new(Flaky {
        store: store.clone(),
        failing: AtomicUsize::new(0),
        refusing: AtomicUsize::new(0),
    });
    let hub = skald_hub::Hub::start(Arc::clone(&flaky), skald_hub::HubOptions::default());
    let mut options = SagaOptions::default();
    options.egress.allow.push("127.0.0.0/8".to_owned());
    let sagas = skald_saga::Sagas::start_with(
        hub.clone(),
        options,
        Arc::new(skald_saga::WallClock),
        Arc::new(skald_saga::Unrestricted),
    )
    .await
    .unwrap();
    sagas.register(&order_saga(&target, "")).await.unwrap();
    let state_of = |key: &str| {
        sagas
            .instances(&InstanceFilter::default())
            .into_iter()
            .find(|i| i.correlation_key == key)
    };
    let wait_state = |key: &'static str, want: SagaState| {
        let state_of = &state_of;
        async move {
            let deadline = std::time::Instant::now() + support::WAIT;
            loop {
                if let Some(i) = state_of(key).filter(|i| i.state == want) {
                    return i;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{key} is not {want:?}: {:?}",
                    state_of(key)
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let place = |key: &str| {
        let store = store.clone();
        let key = key.to_owned();
        async move {
            store
                .append(skald_core::AppendRequest {
                    stream: skald_core::StreamName::new(format!("order-{key}")).unwrap(),
                    expected: skald_core::ExpectedRevision::Any,
                    condition: None,
                    events: vec![skald_core::ProposedEvent::new(
                        skald_core::EventType::new("OrderPlaced").unwrap(),
                        skald_core::EventData::json(
                            json!({"orderId": key, "amount": 42}).to_string(),
                        )
                        .unwrap(),
                    )],
                })
                .await
                .unwrap();
        }
    };

    // The success of reserve cannot be recorded: the saga is stuck, and says why.
    flaky.refusing.store(1, Ordering::SeqCst);
    place("r-1").await;
    let stuck = wait_state("r-1", SagaState::Stuck).await;
    let error = stuck.last_error.unwrap_or_default();
    assert!(error.contains("could not record"), "{error}");
    // Retry runs it on, to the end.
    sagas.retry(&stuck.saga_id).await.unwrap();
    wait_state("r-1", SagaState::Completed).await;

    // The same again: a cancel is refused with the way out (the step may have acted, and
    // its compensation could not be told so), and a retry runs it on.
    flaky.refusing.store(1, Ordering::SeqCst);
    place("r-2").await;
    let stuck = wait_state("r-2", SagaState::Stuck).await;
    let refused = sagas.cancel(&stuck.saga_id, "given up").await.unwrap_err();
    assert!(
        refused.to_string().contains("retry a stuck one"),
        "{refused}"
    );
    sagas.retry(&stuck.saga_id).await.unwrap();
    wait_state("r-2", SagaState::Completed).await;
    hub.shutdown();
    sagas.stopped(Duration::from_secs(5)).await;
    hub.stopped().await;
    store.shutdown().await;
}

/// Reserve then charge; `charge` times out after 300 ms and is retried once on a timeout.
/// `{refund}` is charge's compensation (its URL path and method).
fn unknown_outcome_saga(target: &Target, refund: &str) -> String {
    format!(
        r#"
name: unknown
version: 1
trigger: {{category: order, types: [OrderPlaced]}}
correlationKey: /data/orderId
defaults:
  timeout: 2s
  retry: {{maxAttempts: 2, initialBackoff: 10ms, maxBackoff: 20ms, jitter: 0, retryOn: [timeout, connection, 5xx]}}
steps:
  - name: reserve
    action: {{http: {{method: POST, url: "{base}/reserve"}}}}
    compensation: {{http: {{method: POST, url: "{base}/unreserve"}}}}
  - name: charge
    timeout: 300ms
    action: {{http: {{method: POST, url: "{base}/charge"}}}}
    compensation: {{http: {refund}}}
"#,
        base = format!("http://{}", target.addr),
    )
}

#[tokio::test]
async fn a_step_that_timed_out_is_compensated_because_it_may_have_acted() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    // Both attempts reach the target and succeed there, after the engine gave up.
    target.fix("POST /charge", Reply::slow(Duration::from_millis(700)));
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    let refund = format!(
        "{{method: POST, url: \"http://{}/refund\", body: {{order: \"{{{{trigger.data.orderId}}}}\"}}}}",
        target.addr
    );
    engine
        .sagas
        .register(&unknown_outcome_saga(&target, &refund))
        .await
        .unwrap();
    place_order(&engine, "t-1").await;
    let h = engine.wait_for("unknown", "t-1", "compensated").await;
    assert_eq!(
        story(&h),
        [
            "SagaStarted",
            "StepSucceeded:reserve:action",
            "StepFailed:charge:action",
            "StepFailed:charge:action",
            "SagaCompensating:charge:",
            "StepSucceeded:charge:compensation",
            "StepSucceeded:reserve:compensation",
            "SagaCompensated"
        ]
    );
    assert_eq!(h.history[2].data["outcomeUnknown"], json!(true));
    assert_eq!(
        target.routes(),
        [
            "POST /reserve",
            "POST /charge",
            "POST /charge",
            "POST /refund",
            "POST /unreserve"
        ]
    );
    engine.stop().await;
}

#[tokio::test]
async fn a_compensation_that_reads_its_output_learns_it_by_sending_the_action_again() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    // Two attempts time out (the target acted both times: the same idempotency key); sent
    // again while compensating, the target answers at once with what it did.
    target.queue(
        "POST /charge",
        vec![
            Reply::slow(Duration::from_millis(700)),
            Reply::slow(Duration::from_millis(700)),
        ],
    );
    target.fix(
        "POST /charge",
        Reply {
            status: 201,
            delay: Duration::ZERO,
            body: r#"{"chargeId": "ch-7"}"#.into(),
        },
    );
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    let refund = format!(
        "{{method: DELETE, url: \"http://{}/charges/{{{{steps.charge.output.chargeId}}}}\"}}",
        target.addr
    );
    engine
        .sagas
        .register(&unknown_outcome_saga(&target, &refund))
        .await
        .unwrap();
    place_order(&engine, "t-2").await;
    let h = engine.wait_for("unknown", "t-2", "compensated").await;
    assert_eq!(
        target.routes(),
        [
            "POST /reserve",
            "POST /charge",
            "POST /charge",
            "POST /charge",
            "DELETE /charges/ch-7",
            "POST /unreserve"
        ]
    );
    let calls = target.calls();
    let keys: Vec<_> = calls[1..4]
        .iter()
        .map(|c| c.idempotency_key.clone().unwrap())
        .collect();
    assert!(
        keys.iter().all(|k| *k == keys[0]),
        "one idempotency key: {keys:?}"
    );
    assert!(
        story(&h).contains(&"StepSucceeded:charge:action".to_owned()),
        "{:?}",
        story(&h)
    );
    engine.stop().await;
}

#[tokio::test]
async fn when_the_output_cannot_be_learned_the_saga_is_stuck_and_retry_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    target.fix("POST /charge", Reply::slow(Duration::from_millis(700)));
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    let refund = format!(
        "{{method: DELETE, url: \"http://{}/charges/{{{{steps.charge.output.chargeId}}}}\"}}",
        target.addr
    );
    engine
        .sagas
        .register(&unknown_outcome_saga(&target, &refund))
        .await
        .unwrap();
    place_order(&engine, "t-3").await;
    let h = engine.wait_for("unknown", "t-3", "stuck").await;
    let reason = h.summary.last_error.clone().unwrap_or_default();
    assert!(
        reason.contains("may have acted") && reason.contains("reads its output"),
        "{reason}"
    );
    // Nothing was undone in the meantime: reserve is compensated only after charge.
    assert!(!target.routes().contains(&"POST /unreserve".to_owned()));
    target.fix(
        "POST /charge",
        Reply {
            status: 200,
            delay: Duration::ZERO,
            body: r#"{"chargeId": "ch-9"}"#.into(),
        },
    );
    engine.sagas.retry(&h.summary.saga_id).await.unwrap();
    engine.wait_for("unknown", "t-3", "compensated").await;
    let routes = target.routes();
    assert_eq!(
        routes[routes.len() - 3..],
        ["POST /charge", "DELETE /charges/ch-9", "POST /unreserve"]
    );
    engine.stop().await;
}

#[tokio::test]
async fn a_success_answer_too_large_to_keep_is_compensated() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    target.fix(
        "POST /charge",
        Reply {
            status: 200,
            delay: Duration::ZERO,
            body: format!("\"{}\"", "x".repeat(300 * 1024)),
        },
    );
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    let refund = format!("{{method: POST, url: \"http://{}/refund\"}}", target.addr);
    engine
        .sagas
        .register(&unknown_outcome_saga(&target, &refund))
        .await
        .unwrap();
    place_order(&engine, "t-4").await;
    engine.wait_for("unknown", "t-4", "compensated").await;
    assert_eq!(
        target.routes(),
        [
            "POST /reserve",
            "POST /charge",
            "POST /refund",
            "POST /unreserve"
        ]
    );
    engine.stop().await;
}

#[tokio::test]
async fn a_step_that_was_never_sent_is_not_compensated() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    // A port nothing listens on: the connection is refused, nothing is sent.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    let refund = format!("{{method: POST, url: \"http://{}/refund\"}}", target.addr);
    let text = unknown_outcome_saga(&target, &refund).replace(
        &format!("http://{}/charge", target.addr),
        &format!("http://{closed_addr}/charge"),
    );
    engine.sagas.register(&text).await.unwrap();
    place_order(&engine, "t-5").await;
    let h = engine.wait_for("unknown", "t-5", "compensated").await;
    assert_eq!(h.history[2].data.get("outcomeUnknown"), None);
    assert_eq!(target.routes(), ["POST /reserve", "POST /unreserve"]);
    engine.stop().await;
}

#[tokio::test]
async fn a_pivot_whose_outcome_is_unknown_stops_the_saga_for_a_person() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    target.fix("POST /charge", Reply::slow(Duration::from_millis(700)));
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    let text = unknown_outcome_saga(&target, "{method: POST, url: \"http://127.0.0.1:1/x\"}")
        .replace(
            "    compensation: {http: {method: POST, url: \"http://127.0.0.1:1/x\"}}\n",
            "    pivot: true\n",
        );
    assert!(text.contains("pivot: true"), "{text}");
    engine.sagas.register(&text).await.unwrap();
    place_order(&engine, "t-6").await;
    let h = engine.wait_for("unknown", "t-6", "stuck").await;
    assert!(
        h.summary
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("pivot step charge may have acted")),
        "{:?}",
        h.summary.last_error
    );
    // The step before the pivot is not undone while the pivot may stand.
    assert_eq!(
        target.routes(),
        ["POST /reserve", "POST /charge", "POST /charge"]
    );
    target.fix("POST /charge", Reply::status(200));
    engine.sagas.retry(&h.summary.saga_id).await.unwrap();
    engine.wait_for("unknown", "t-6", "completed").await;
    engine.stop().await;
}

#[tokio::test]
async fn a_pivot_that_may_have_acted_cannot_be_cancelled_and_a_definite_refusal_compensates() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    let text = unknown_outcome_saga(&target, "{method: POST, url: \"http://127.0.0.1:1/x\"}")
        .replace(
            "    compensation: {http: {method: POST, url: \"http://127.0.0.1:1/x\"}}\n",
            "    pivot: true\n",
        )
        .replace(
            "initialBackoff: 10ms, maxBackoff: 20ms",
            "initialBackoff: 1s, maxBackoff: 1s",
        );
    engine.sagas.register(&text).await.unwrap();
    // The pivot's first attempt times out; during the back-off a cancel is refused, since the
    // pivot may have acted.
    target.queue(
        "POST /charge",
        vec![Reply::slow(Duration::from_millis(700))],
    );
    target.fix(
        "POST /charge",
        Reply {
            status: 402,
            delay: Duration::ZERO,
            body: r#"{"error": "card declined"}"#.into(),
        },
    );
    place_order(&engine, "t-7").await;
    let id = skald_saga::saga_id("unknown", "t-7").to_string();
    engine
        .wait_until(&id, |h| {
            story(h).contains(&"StepFailed:charge:action".to_owned())
        })
        .await;
    let refused = engine
        .sagas
        .cancel(&id, "changed my mind")
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, Error::SagaConflict(m) if m.contains("may have")),
        "{refused}"
    );
    // The second attempt, with the same idempotency key, is answered 402: the target says it
    // did not charge, so the saga is compensated rather than stuck.
    let h = engine.wait_for("unknown", "t-7", "compensated").await;
    assert_eq!(h.summary.compensated_steps, ["reserve"]);
    engine.stop().await;
}

#[tokio::test]
async fn a_large_failure_answer_is_a_failure_not_an_unknown_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    target.fix(
        "POST /charge",
        Reply {
            status: 404,
            delay: Duration::ZERO,
            body: format!("<html>{}</html>", "x".repeat(300 * 1024)),
        },
    );
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    let refund = format!("{{method: POST, url: \"http://{}/refund\"}}", target.addr);
    engine
        .sagas
        .register(&unknown_outcome_saga(&target, &refund))
        .await
        .unwrap();
    place_order(&engine, "t-8").await;
    let h = engine.wait_for("unknown", "t-8", "compensated").await;
    let error = h.summary.last_error.clone().unwrap();
    assert!(error.contains("answered 404"), "{error}");
    assert_eq!(h.history[2].data.get("outcomeUnknown"), None);
    assert_eq!(
        target.routes(),
        ["POST /reserve", "POST /charge", "POST /unreserve"]
    );
    engine.stop().await;
}

#[tokio::test]
async fn finished_instances_beyond_keep_finished_leave_memory_but_not_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    let options = SagaOptions {
        keep_finished: 3,
        ..SagaOptions::default()
    };
    let engine = Engine::open(dir.path(), options.clone()).await;
    engine
        .sagas
        .register(&order_saga(&target, ""))
        .await
        .unwrap();
    for n in 0..5 {
        place_order(&engine, &format!("k-{n}")).await;
        engine
            .wait_for("order", &format!("k-{n}"), "completed")
            .await;
    }
    let check = |engine: &Engine| {
        let listed = engine.sagas.instances(&InstanceFilter {
            state: Some(SagaState::Completed),
            ..Default::default()
        });
        assert_eq!(
            listed.len(),
            3,
            "only the newest finished are kept in memory"
        );
        let counts = engine.sagas.state_counts();
        assert_eq!(
            counts.get(&("order".to_owned(), SagaState::Completed)),
            Some(&5),
            "every finished instance is counted: {counts:?}"
        );
    };
    check(&engine);
    // The first one, let go, is still there by id: its summary, history, and a conflict for a
    // retry.
    let first = skald_saga::saga_id("order", "k-0").to_string();
    let summary = engine.sagas.summary(&first).await.unwrap();
    assert_eq!(summary.state, SagaState::Completed);
    assert_eq!(summary.completed_steps, ["reserve", "charge", "ship"]);
    let history = engine.sagas.history(&first).await.unwrap();
    assert_eq!(history.history.last().unwrap().event_type, "SagaCompleted");
    assert!(matches!(
        engine.sagas.retry(&first).await,
        Err(Error::SagaConflict(_))
    ));
    assert!(matches!(
        engine.sagas.summary("not-a-saga-id/..").await,
        Err(Error::SagaNotFound(_))
    ));
    // A duplicate trigger for it starts nothing.
    let calls = target.calls().len();
    place_order(&engine, "k-0").await;
    place_order(&engine, "k-5").await;
    engine.wait_for("order", "k-5", "completed").await;
    assert_eq!(target.calls().len(), calls + 3, "only k-5 ran");
    engine.stop().await;
    // After a restart, the same holds.
    let engine = Engine::open(dir.path(), options).await;
    let counts = engine.sagas.state_counts();
    assert_eq!(
        counts.get(&("order".to_owned(), SagaState::Completed)),
        Some(&6)
    );
    assert_eq!(engine.sagas.instances(&InstanceFilter::default()).len(), 3);
    assert_eq!(
        engine.sagas.summary(&first).await.unwrap().state,
        SagaState::Completed
    );
    engine.stop().await;
}

#[tokio::test]
async fn a_step_in_flight_when_the_engine_died_counts_as_possibly_done() {
    use skald_saga::history::SagaEvent;
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    // charge's target is gone after the restart: its connections are refused, so no attempt
    // after the restart tells whether the one in flight at the crash acted.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let refund = format!("{{method: POST, url: \"http://{}/refund\"}}", target.addr);
    let text = unknown_outcome_saga(&target, &refund).replace(
        &format!("http://{}/charge", target.addr),
        &format!("http://{closed_addr}/charge"),
    );
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    engine.sagas.register(&text).await.unwrap();
    // The history a kill -9 during charge's first attempt leaves: started, reserve done.
    let id = skald_saga::saga_id("unknown", "crash-1").to_string();
    let history = [
        SagaEvent::SagaStarted {
            saga_id: id.clone(),
            definition: "unknown".into(),
            version: 1,
            correlation_key: "crash-1".into(),
            trigger: json!({"stream": "order-crash-1", "type": "OrderPlaced",
                            "data": {"orderId": "crash-1"}}),
        },
        SagaEvent::StepSucceeded {
            step: "reserve".into(),
            phase: skald_saga::Phase::Action,
            attempt: 1,
            output: json!({"id": "r-1"}),
            duration_ms: 1,
        },
    ];
    support::append_history(&engine.store, &id, &history).await;
    engine.stop().await;

    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    let h = engine.wait_for("unknown", "crash-1", "compensated").await;
    assert_eq!(h.summary.compensated_steps, ["charge", "reserve"]);
    assert_eq!(target.routes(), ["POST /refund", "POST /unreserve"]);
    engine.stop().await;
}

#[tokio::test]
async fn only_a_refusal_of_the_key_says_a_timed_out_step_did_not_act() {
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    let engine = Engine::open(dir.path(), SagaOptions::default()).await;
    let refund = format!("{{method: POST, url: \"http://{}/refund\"}}", target.addr);
    engine
        .sagas
        .register(&unknown_outcome_saga(&target, &refund))
        .await
        .unwrap();
    // The first attempt times out; the second is answered 409 (a request with this key is
    // in progress), which says nothing of the first: charge is compensated.
    target.queue(
        "POST /charge",
        vec![Reply::slow(Duration::from_millis(700)), Reply::status(409)],
    );
    place_order(&engine, "r-1").await;
    let h = engine.wait_for("unknown", "r-1", "compensated").await;
    assert_eq!(h.summary.compensated_steps, ["charge", "reserve"]);
    // Answered 400 for the key instead: the target did not act, and charge is not undone.
    target.queue(
        "POST /charge",
        vec![Reply::slow(Duration::from_millis(700)), Reply::status(400)],
    );
    place_order(&engine, "r-2").await;
    let h = engine.wait_for("unknown", "r-2", "compensated").await;
    assert_eq!(h.summary.compensated_steps, ["reserve"]);
    let refunds = target
        .routes()
        .iter()
        .filter(|r| *r == "POST /refund")
        .count();
    assert_eq!(refunds, 1, "only r-1's charge was refunded");
    engine.stop().await;
}

/// Two runners of one instance, as when the node running the sagas lost its lease while a
/// step's call was in flight and another node took over: the old runner records the step's
/// answer when its call returns, after the new runner had loaded the instance. The new
/// runner's write then finds it; it folds it in and goes on, instead of leaving the saga
/// running with nothing running it.
#[tokio::test]
async fn a_late_write_of_another_runner_is_folded_in_and_the_saga_goes_on() {
    use skald_hub::{Hub, HubOptions};
    use skald_storage::{Options, Store};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let target = Target::start().await;
    // An engine on a scope of the hub, as a term of the sagas' lease on one node.
    let engine_on = |store: Store, scope: Hub<Store>| async move {
        let mut options = SagaOptions::default();
        options.egress.allow.push("127.0.0.0/8".to_owned());
        let clock = Arc::new(skald_saga::WallClock);
        let sagas = skald_saga::Sagas::start(scope.clone(), options, clock)
            .await
            .unwrap();
        Engine {
            store,
            hub: scope,
            sagas,
        }
    };
    let (store, _) = Store::open(Options {
        data_dir: dir.path().to_path_buf(),
        durability: skald_core::Durability::None,
        ..Options::default()
    })
    .unwrap();
    let hub = Hub::start(Arc::new(store.clone()), HubOptions::default());
    let old_scope = hub.scoped();
    let old = engine_on(store.clone(), old_scope.clone()).await;
    old.sagas.register(&order_saga(&target, "")).await.unwrap();
    target.fix("POST /charge", Reply::slow(Duration::from_millis(800)));
    place_order(&old, "late-1").await;
    let deadline = std::time::Instant::now() + support::WAIT;
    while !target.routes().contains(&"POST /charge".to_owned()) {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The old term ends with the charge in flight; the new one loads the instance and calls
    // charge again, with the same key, and its answer comes after the old one's.
    old_scope.shutdown();
    target.fix("POST /charge", Reply::slow(Duration::from_millis(1500)));
    let new_scope = hub.scoped();
    let new = engine_on(store.clone(), new_scope.clone()).await;
    let h = new.wait_for("order", "late-1", "completed").await;
    assert_eq!(
        story(&h),
        [
            "SagaStarted",
            "StepSucceeded:reserve:action",
            "StepSucceeded:charge:action",
            "StepSucceeded:ship:action",
            "SagaCompleted"
        ]
    );
    let charges: Vec<_> = target
        .calls()
        .into_iter()
        .filter(|c| c.route == "POST /charge")
        .collect();
    assert_eq!(charges.len(), 2, "each runner called charge once");
    assert_eq!(charges[0].idempotency_key, charges[1].idempotency_key);
    old.sagas.stopped(Duration::from_secs(5)).await;
    new_scope.shutdown();
    new.sagas.stopped(Duration::from_secs(5)).await;
    hub.shutdown();
    hub.stopped().await;
    store.shutdown().await;
}
