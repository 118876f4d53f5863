//! Saga counters for `GET /metrics`: instances by state, starts, step outcomes and durations,
//! circuit-breaker states.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use skald_core::EventStore;
use skald_core::metrics::{DURATION_BOUNDS, Exposition, Histogram, Kind};

use crate::actions::Failure;
use crate::breaker::BreakerState;
use crate::engine::{Inner, Sagas};
use crate::history::{Phase, SagaState};

/// Most distinct (definition, step) label pairs kept; beyond it, outcomes are not counted by
/// step, so that a runaway number of definitions cannot grow the exposition without bound.
const MAX_SERIES: usize = 4096;

/// Attempts by definition, step, phase and outcome.
type StepCounts = BTreeMap<(String, String, Phase, &'static str), u64>;

#[derive(Default)]
pub(crate) struct Metrics {
    started: Mutex<BTreeMap<String, u64>>,
    finished: Mutex<BTreeMap<(String, SagaState), u64>>,
    steps: Mutex<StepCounts>,
    durations: Mutex<BTreeMap<(String, Phase), Histogram>>,
    pub(crate) duplicates: AtomicU64,
    pub(crate) no_key: AtomicU64,
    pub(crate) refused_triggers: AtomicU64,
    pub(crate) start_waits: AtomicU64,
    pub(crate) trigger_read_failures: AtomicU64,
    pub(crate) start_failures: AtomicU64,
}

impl Metrics {
    pub(crate) fn started(&self, definition: &str) {
        *self
            .started
            .lock()
            .expect("metrics lock")
            .entry(definition.to_owned())
            .or_default() += 1;
    }

    pub(crate) fn transition(&self, definition: &str, to: SagaState) {
        if to.is_final() || to == SagaState::Stuck {
            *self
                .finished
                .lock()
                .expect("metrics lock")
                .entry((definition.to_owned(), to))
                .or_default() += 1;
        }
    }

    pub(crate) fn step(
        &self,
        definition: &str,
        step: &str,
        phase: Phase,
        outcome: &Result<serde_json::Value, Failure>,
        elapsed: Duration,
    ) {
        let outcome = match outcome {
            Ok(_) => "succeeded",
            Err(Failure::Timeout(_) | Failure::AwaitTimedOut) => "timeout",
            Err(Failure::BreakerOpen(..)) => "breaker_open",
            Err(_) => "failed",
        };
        {
            let mut steps = self.steps.lock().expect("metrics lock");
            let key = (definition.to_owned(), step.to_owned(), phase, outcome);
            if steps.len() < MAX_SERIES || steps.contains_key(&key) {
                *steps.entry(key).or_default() += 1;
            }
        }
        let mut durations = self.durations.lock().expect("metrics lock");
        if durations.len() < MAX_SERIES || durations.contains_key(&(definition.to_owned(), phase)) {
            durations
                .entry((definition.to_owned(), phase))
                .or_insert_with(|| Histogram::new(DURATION_BOUNDS))
                .observe_duration(elapsed);
        }
    }
}

pub(crate) fn write<S: EventStore>(sagas: &Sagas<S>, inner: &Inner<S>, out: &mut Exposition) {
    let m = &inner.metrics;
    out.family(
        "skald_sagas",
        Kind::Gauge,
        "Saga instances by definition and state.",
    );
    for ((definition, state), n) in sagas.state_counts() {
        out.sample(
            "skald_sagas",
            &[("definition", &definition), ("state", state.as_str())],
            n as f64,
        );
    }
    out.family(
        "skald_sagas_started_total",
        Kind::Counter,
        "Saga instances started since the server started.",
    );
    for (definition, n) in m.started.lock().expect("metrics lock").iter() {
        out.sample(
            "skald_sagas_started_total",
            &[("definition", definition)],
            *n as f64,
        );
    }
    out.family(
        "skald_sagas_finished_total",
        Kind::Counter,
        "Saga instances that reached completed, compensated, cancelled or stuck since the server started.",
    );
    for ((definition, state), n) in m.finished.lock().expect("metrics lock").iter() {
        out.sample(
            "skald_sagas_finished_total",
            &[("definition", definition), ("state", state.as_str())],
            *n as f64,
        );
    }
    out.single(
        "skald_saga_duplicate_triggers_total",
        Kind::Counter,
        "Trigger events for a correlation key that already had an instance.",
        m.duplicates.load(Ordering::Relaxed) as f64,
    );
    out.single(
        "skald_saga_triggers_without_key_total",
        Kind::Counter,
        "Trigger events with no value at the definition's correlation key pointer.",
        m.no_key.load(Ordering::Relaxed) as f64,
    );
    out.single(
        "skald_saga_triggers_refused_total",
        Kind::Counter,
        "Trigger events that started no saga because the definition's registrant may not read \
         their stream.",
        m.refused_triggers.load(Ordering::Relaxed) as f64,
    );
    out.single(
        "skald_saga_start_waits_total",
        Kind::Counter,
        "Times the trigger loop waited because a definition reached max_starts_per_second.",
        m.start_waits.load(Ordering::Relaxed) as f64,
    );
    out.single(
        "skald_saga_trigger_read_failures_total",
        Kind::Counter,
        "Reads of the log that failed in the trigger loop (it pauses and reads again).",
        m.trigger_read_failures.load(Ordering::Relaxed) as f64,
    );
    out.single(
        "skald_saga_start_failures_total",
        Kind::Counter,
        "Triggers whose start the store refused for good (SagaStarted too large, say): they \
         started nothing.",
        m.start_failures.load(Ordering::Relaxed) as f64,
    );
    out.family(
        "skald_saga_step_attempts_total",
        Kind::Counter,
        "Step attempts by definition, step, phase and outcome (succeeded, failed, timeout, breaker_open).",
    );
    for ((definition, step, phase, outcome), n) in m.steps.lock().expect("metrics lock").iter() {
        out.sample(
            "skald_saga_step_attempts_total",
            &[
                ("definition", definition),
                ("step", step),
                ("phase", phase.as_str()),
                ("outcome", outcome),
            ],
            *n as f64,
        );
    }
    out.family(
        "skald_saga_step_duration_seconds",
        Kind::Histogram,
        "Duration of step attempts by definition and phase.",
    );
    for ((definition, phase), h) in m.durations.lock().expect("metrics lock").iter() {
        out.histogram(
            "skald_saga_step_duration_seconds",
            &[("definition", definition), ("phase", phase.as_str())],
            h,
        );
    }
    out.family(
        "skald_saga_breaker_state",
        Kind::Gauge,
        "Circuit breaker per target host: 0 closed, 1 half-open, 2 open.",
    );
    for (host, state) in inner.breakers.states() {
        let value = match state {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        };
        out.sample("skald_saga_breaker_state", &[("host", &host)], value);
    }
}
