//! The model-based test of sagas: random definitions (compensable steps, some of whose
//! compensations read their own step's output, a pivot, retriable steps) and random answers
//! from the target (200, 503, 400, or a success that arrives after the attempt timed out, per
//! attempt), run by the real engine against a real HTTP target, compared with a few lines of
//! obviously correct reference logic: which calls are made, in which order, and the final
//! state. A late success is an unknown outcome: the step may have acted. Half the cases
//! deliver the trigger twice: one instance runs, from the first.

mod support;

use proptest::prelude::*;
use skald_saga::SagaOptions;
use support::{Engine, Reply, Target};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Compensable,
    Pivot,
    Retriable,
}

#[derive(Clone, Debug)]
struct Case {
    kinds: Vec<Kind>,
    /// Whether each step's compensation reads the step's own output.
    reads_own: Vec<bool>,
    /// Whether the trigger comes twice (a producer's duplicate): one instance, from the first.
    duplicate: bool,
    /// Statuses the action of each step answers, attempt by attempt; 200 after them.
    actions: Vec<Vec<u16>>,
    /// The same for each step's compensation.
    compensations: Vec<Vec<u16>>,
}

const MAX_ATTEMPTS: usize = 2;
/// An answer that succeeds at the target after the attempt's timeout.
const LATE: u16 = 0;

fn case() -> impl Strategy<Value = Case> {
    (1usize..=4, any::<u8>(), any::<u8>())
        .prop_flat_map(|(n, pivot_choice, tail_choice)| {
            // A pivot at some step (or none), then only retriable steps; with no pivot, a
            // tail of retriable steps may still end the saga.
            let pivot = (pivot_choice as usize % (n + 1)).checked_sub(1);
            let kinds: Vec<Kind> = (0..n)
                .map(|i| match pivot {
                    Some(p) if i == p => Kind::Pivot,
                    Some(p) if i > p => Kind::Retriable,
                    Some(_) => Kind::Compensable,
                    None if i >= n - (tail_choice as usize % n).min(n - 1)
                        && tail_choice % 3 == 0 =>
                    {
                        Kind::Retriable
                    }
                    None => Kind::Compensable,
                })
                .collect();
            let answers = || {
                proptest::collection::vec(
                    proptest::collection::vec(
                        prop_oneof![Just(200u16), Just(503), Just(400), Just(LATE)],
                        0..3,
                    ),
                    n,
                )
            };
            (
                Just(kinds),
                proptest::collection::vec(any::<bool>(), n),
                answers(),
                answers(),
                any::<bool>(),
            )
        })
        .prop_map(
            |(kinds, reads_own, actions, compensations, duplicate)| Case {
                kinds,
                reads_own,
                duplicate,
                actions,
                compensations,
            },
        )
}

fn definition(case: &Case, target: &Target) -> String {
    let mut text = format!(
        "name: model\nversion: 1\ntrigger: {{category: order, types: [OrderPlaced]}}\n\
         correlationKey: /data/orderId\ndefaults:\n  timeout: 150ms\n  retry: {{maxAttempts: \
         {MAX_ATTEMPTS}, initialBackoff: 1ms, maxBackoff: 2ms, jitter: 0, retryOn: [5xx, \
         timeout]}}\nsteps:\n"
    );
    for (i, kind) in case.kinds.iter().enumerate() {
        text.push_str(&format!(
            "  - name: s{i}\n    action: {{http: {{method: POST, url: \"http://{}/a{i}\"}}}}\n",
            target.addr
        ));
        match kind {
            Kind::Compensable if case.reads_own[i] => text.push_str(&format!(
                "    compensation: {{http: {{method: POST, url: \"http://{}/c{i}\", body: \
                 {{id: \"{{{{steps.s{i}.output.id}}}}\"}}}}}}\n",
                target.addr
            )),
            Kind::Compensable => text.push_str(&format!(
                "    compensation: {{http: {{method: POST, url: \"http://{}/c{i}\"}}}}\n",
                target.addr
            )),
            Kind::Pivot => text.push_str("    pivot: true\n"),
            Kind::Retriable => text.push_str("    retriable: true\n"),
        }
    }
    text
}

/// Runs one action or compensation as the reference says, from answer `next` of its script:
/// 200 succeeds, 400 fails for good, 503 and a late success are retried while attempts remain
/// (always, for retriable steps). Records each call. Returns whether it succeeded, whether
/// an attempt may have acted unseen (a late success), and the last answer.
fn attempt(
    script: &[u16],
    next: &mut usize,
    route: String,
    limit: Option<usize>,
    calls: &mut Vec<String>,
) -> (bool, bool, u16) {
    let mut n = 0;
    let mut unseen = false;
    loop {
        let status = script.get(*next).copied().unwrap_or(200);
        calls.push(route.clone());
        *next += 1;
        n += 1;
        match status {
            200 => return (true, unseen, status),
            400 => return (false, unseen, status),
            LATE => unseen = true,
            _ => {}
        }
        if limit.is_some_and(|l| n >= l) {
            return (false, unseen, status);
        }
    }
}

/// The reference: the calls in order and the final state.
fn expected(case: &Case) -> (Vec<String>, &'static str) {
    let mut calls = Vec::new();
    let n = case.kinds.len();
    let (mut next_action, mut next_compensation) = (vec![0; n], vec![0; n]);
    for (i, kind) in case.kinds.iter().enumerate() {
        let limit = (*kind != Kind::Retriable).then_some(MAX_ATTEMPTS);
        let (done, unseen, last) = attempt(
            &case.actions[i],
            &mut next_action[i],
            format!("POST /a{i}"),
            limit,
            &mut calls,
        );
        if done {
            continue;
        }
        let past_pivot = case.kinds[..i].iter().any(|k| *k != Kind::Compensable);
        // A step an attempt of which went unanswered may have acted, unless the target then
        // refused its idempotency key (a 4xx; a 5xx tells nothing of earlier attempts). Such
        // a pivot stops the saga for a person; such a compensable step is compensated.
        let unseen = unseen && last != 400;
        if *kind == Kind::Retriable || past_pivot || (*kind == Kind::Pivot && unseen) {
            return (calls, "stuck");
        }
        // The failed step too, if it may have acted; newest first.
        for j in (0..=i).rev() {
            if case.kinds[j] != Kind::Compensable || (j == i && !unseen) {
                continue;
            }
            // A compensation that reads the output of a step that never answered sends the
            // action again (fresh attempts) to learn it.
            if j == i && case.reads_own[j] {
                let (learned, _, last) = attempt(
                    &case.actions[j],
                    &mut next_action[j],
                    format!("POST /a{j}"),
                    Some(MAX_ATTEMPTS),
                    &mut calls,
                );
                // Refused (a 400 for the key): it never acted, nothing to undo.
                if !learned && last == 400 {
                    continue;
                }
                if !learned {
                    return (calls, "stuck");
                }
            }
            let (undone, ..) = attempt(
                &case.compensations[j],
                &mut next_compensation[j],
                format!("POST /c{j}"),
                Some(MAX_ATTEMPTS),
                &mut calls,
            );
            if !undone {
                return (calls, "stuck");
            }
        }
        return (calls, "compensated");
    }
    (calls, "completed")
}

fn reply(status: u16) -> Reply {
    match status {
        LATE => Reply {
            status: 200,
            delay: std::time::Duration::from_millis(400),
            body: r#"{"id": "late"}"#.into(),
        },
        status => Reply {
            status,
            delay: std::time::Duration::ZERO,
            body: r#"{"id": "x"}"#.into(),
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_engine_calls_and_ends_as_the_reference_says(case in case()) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (calls, state) = runtime.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let target = Target::start().await;
            for (i, script) in case.actions.iter().enumerate() {
                target.queue(&format!("POST /a{i}"), script.iter().map(|s| reply(*s)).collect());
            }
            for (i, script) in case.compensations.iter().enumerate() {
                target.queue(&format!("POST /c{i}"), script.iter().map(|s| reply(*s)).collect());
            }
            let engine = Engine::open(dir.path(), SagaOptions::default()).await;
            engine.sagas.register(&definition(&case, &target)).await.unwrap();
            engine.append("order-1", "OrderPlaced", serde_json::json!({"orderId": "1", "n": 1})).await;
            if case.duplicate {
                engine.append("order-1", "OrderPlaced", serde_json::json!({"orderId": "1", "n": 2})).await;
            }
            let id = skald_saga::saga_id("model", "1").to_string();
            let h = engine
                .wait_until(&id, |h| h.summary.state.is_final() || h.summary.state.as_str() == "stuck")
                .await;
            let first = h.history[0].data["trigger"]["data"]["n"].clone();
            engine.stop().await;
            assert_eq!(first, serde_json::json!(1), "the instance starts from the first trigger");
            (target.routes(), h.summary.state.as_str())
        });
        let (want_calls, want_state) = expected(&case);
        prop_assert_eq!(state, want_state, "{:?}", case);
        prop_assert_eq!(calls, want_calls, "{:?}", case);
    }
}
