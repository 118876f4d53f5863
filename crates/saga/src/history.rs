//! The events of one saga instance and the state they fold into. The stream layout is in
//! `docs/sagas.md`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use skald_core::{RecordedEvent, Timestamp};

/// Whether a step event is about its action or its compensation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// The step's action.
    Action,
    /// The step's compensation.
    Compensation,
}

impl Phase {
    /// `action` or `compensation`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Action => "action",
            Self::Compensation => "compensation",
        }
    }
}

/// Where an instance is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SagaState {
    /// Running its steps.
    Running,
    /// Undoing its completed steps.
    Compensating,
    /// Every step succeeded.
    Completed,
    /// A step failed and every completed step was undone.
    Compensated,
    /// Needs a person: `retry` resumes it.
    Stuck,
    /// Cancelled and compensated.
    Cancelled,
}

impl SagaState {
    /// Every state, for metrics.
    pub const ALL: [SagaState; 6] = [
        Self::Running,
        Self::Compensating,
        Self::Completed,
        Self::Compensated,
        Self::Stuck,
        Self::Cancelled,
    ];

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Compensating => "compensating",
            Self::Completed => "completed",
            Self::Compensated => "compensated",
            Self::Stuck => "stuck",
            Self::Cancelled => "cancelled",
        }
    }

    /// Parses the lowercase name.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Whether nothing more will happen (stuck is not final: it can be retried).
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Compensated | Self::Cancelled)
    }
}

/// Whether an answer refuses a step's idempotency key, so that the target did not act on it,
/// earlier attempts included (it would have answered their result again): a 4xx, except those
/// that say nothing of the key's outcome (authentication, a timeout, a request with the key
/// still in progress, a lock, too early, too many requests).
pub fn refuses_key(status: u16) -> bool {
    (400..500).contains(&status) && !matches!(status, 401 | 403 | 407 | 408 | 409 | 423 | 425 | 429)
}

/// One event of an instance's stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
#[allow(missing_docs)]
pub enum SagaEvent {
    #[serde(rename_all = "camelCase")]
    SagaStarted {
        saga_id: String,
        definition: String,
        version: u32,
        correlation_key: String,
        trigger: Value,
    },
    #[serde(rename_all = "camelCase")]
    StepStarted {
        step: String,
        phase: Phase,
        deadline: Timestamp,
    },
    #[serde(rename_all = "camelCase")]
    StepSucceeded {
        step: String,
        phase: Phase,
        attempt: u32,
        output: Value,
        duration_ms: u64,
    },
    #[serde(rename_all = "camelCase")]
    StepFailed {
        step: String,
        phase: Phase,
        attempt: u32,
        error: String,
        retryable: bool,
        #[serde(rename = "final")]
        is_final: bool,
        duration_ms: u64,
        /// The attempt may have acted although it failed (it timed out, its connection broke
        /// after the request was sent, or the target's success answer could not be kept).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        outcome_unknown: bool,
        /// The HTTP status the target answered, if it answered.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        status: Option<u16>,
    },
    #[serde(rename_all = "camelCase")]
    SagaCompensating {
        reason: String,
        step: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    SagaCancelRequested {
        reason: String,
    },
    #[serde(rename_all = "camelCase")]
    SagaStuck {
        step: String,
        phase: Phase,
        error: String,
    },
    SagaRetryRequested {},
    SagaCompleted {},
    SagaCompensated {},
    SagaCancelled {},
}

impl SagaEvent {
    /// The event type and the JSON data it is stored as.
    pub fn to_parts(&self) -> (String, String) {
        let value = serde_json::to_value(self).expect("saga events serialize");
        let kind = value["type"].as_str().expect("tagged").to_owned();
        (kind, value["data"].to_string())
    }

    /// Reads a stored instance event.
    pub fn from_recorded(event: &RecordedEvent) -> Option<Self> {
        let data: Value = serde_json::from_slice(event.data.bytes()).ok()?;
        serde_json::from_value(serde_json::json!({"type": event.event_type.as_str(), "data": data}))
            .ok()
    }
}

/// An instance's state: the fold of its events.
#[derive(Clone, Debug, PartialEq)]
pub struct Instance {
    /// The saga id.
    pub saga_id: String,
    /// The definition's name.
    pub definition: String,
    /// The version it runs on.
    pub version: u32,
    /// The correlation key.
    pub correlation_key: String,
    /// The trigger event, as JSON.
    pub trigger: Value,
    /// The trigger's stream (kept when the instance is compacted): who may read it may see the
    /// trigger's data and the steps' outputs.
    pub trigger_stream: String,
    /// Where it is.
    pub state: SagaState,
    /// The state to return to when a stuck instance is retried.
    resume: SagaState,
    /// Outputs of steps whose action succeeded.
    pub outputs: BTreeMap<String, Value>,
    /// Steps whose compensation succeeded.
    pub compensated: BTreeSet<String>,
    /// Steps with an action attempt whose outcome is unknown: they may have acted, so they are
    /// compensated like steps that succeeded.
    pub possibly_done: BTreeSet<String>,
    /// Attempts made per step and phase since the last retry request.
    pub attempts: BTreeMap<(String, Phase), u32>,
    /// Attempts made in all, per step and phase (for attempt numbers).
    pub attempt_numbers: BTreeMap<(String, Phase), u32>,
    /// Stored deadlines of await steps.
    pub deadlines: BTreeMap<String, Timestamp>,
    /// Whether a cancel was asked for.
    pub cancel_requested: bool,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// When it started.
    pub started_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// The revision of its last event.
    pub revision: u64,
}

impl Instance {
    /// The state after the first event, which must be `SagaStarted`.
    pub fn start(event: &SagaEvent, at: Timestamp) -> Option<Self> {
        let SagaEvent::SagaStarted {
            saga_id,
            definition,
            version,
            correlation_key,
            trigger,
        } = event
        else {
            return None;
        };
        Some(Self {
            saga_id: saga_id.clone(),
            definition: definition.clone(),
            version: *version,
            correlation_key: correlation_key.clone(),
            trigger: trigger.clone(),
            trigger_stream: trigger["stream"].as_str().unwrap_or_default().to_owned(),
            state: SagaState::Running,
            resume: SagaState::Running,
            outputs: BTreeMap::new(),
            compensated: BTreeSet::new(),
            possibly_done: BTreeSet::new(),
            attempts: BTreeMap::new(),
            attempt_numbers: BTreeMap::new(),
            deadlines: BTreeMap::new(),
            cancel_requested: false,
            last_error: None,
            started_at: at,
            updated_at: at,
            revision: 0,
        })
    }

    /// Folds one more event in.
    pub fn apply(&mut self, event: &SagaEvent, at: Timestamp, revision: u64) {
        self.updated_at = at;
        self.revision = revision;
        match event {
            SagaEvent::SagaStarted { .. } => {}
            SagaEvent::StepStarted { step, deadline, .. } => {
                self.deadlines.insert(step.clone(), *deadline);
            }
            SagaEvent::StepSucceeded {
                step,
                phase,
                attempt,
                output,
                ..
            } => {
                self.attempt_numbers
                    .insert((step.clone(), *phase), *attempt);
                match phase {
                    Phase::Action => {
                        self.outputs.insert(step.clone(), output.clone());
                    }
                    Phase::Compensation => {
                        self.compensated.insert(step.clone());
                    }
                }
            }
            SagaEvent::StepFailed {
                step,
                phase,
                attempt,
                error,
                outcome_unknown,
                status,
                ..
            } => {
                if *phase == Phase::Action {
                    if *outcome_unknown {
                        self.possibly_done.insert(step.clone());
                    }
                    // A refusal (4xx) for the step's idempotency key says the target did not
                    // act on it, earlier attempts included; a 5xx says nothing of them.
                    if status.is_some_and(refuses_key) {
                        self.possibly_done.remove(step);
                    }
                }
                *self.attempts.entry((step.clone(), *phase)).or_default() += 1;
                self.attempt_numbers
                    .insert((step.clone(), *phase), *attempt);
                self.last_error = Some(format!("{step} ({}): {error}", phase.as_str()));
            }
            SagaEvent::SagaCompensating { .. } => {
                self.state = SagaState::Compensating;
                // An action sent again while compensating (to learn the output of a step whose
                // outcome is unknown) gets a fresh budget of attempts.
                self.attempts
                    .retain(|(_, phase), _| *phase != Phase::Action);
            }
            SagaEvent::SagaCancelRequested { .. } => self.cancel_requested = true,
            SagaEvent::SagaStuck { step, phase, error } => {
                // Stuck in an action (the engine could not record its outcome, say): it may
                // have acted.
                if *phase == Phase::Action && !step.is_empty() {
                    self.possibly_done.insert(step.clone());
                }
                self.resume = self.state;
                self.state = SagaState::Stuck;
                self.attempts.remove(&(step.clone(), *phase));
                self.last_error = Some(if step.is_empty() {
                    error.clone()
                } else {
                    format!("{step} ({}): {error}", phase.as_str())
                });
            }
            SagaEvent::SagaRetryRequested {} => {
                if self.state == SagaState::Stuck {
                    self.state = self.resume;
                }
            }
            SagaEvent::SagaCompleted {} => self.state = SagaState::Completed,
            SagaEvent::SagaCompensated {} => self.state = SagaState::Compensated,
            SagaEvent::SagaCancelled {} => self.state = SagaState::Cancelled,
        }
    }

    /// Drops what only a running instance needs (the trigger, step outputs, attempt counts),
    /// keeping what listings show. Final instances are kept in memory this small; their whole
    /// history stays in their stream.
    pub fn compact(&mut self) {
        debug_assert!(self.state.is_final());
        self.trigger = Value::Null;
        for output in self.outputs.values_mut() {
            *output = Value::Null;
        }
        self.attempts = BTreeMap::new();
        self.attempt_numbers = BTreeMap::new();
        self.deadlines = BTreeMap::new();
    }

    /// The next attempt number of a step and phase (from 1, across restarts and retries).
    pub fn next_attempt(&self, step: &str, phase: Phase) -> u32 {
        self.attempt_numbers
            .get(&(step.to_owned(), phase))
            .copied()
            .unwrap_or(0)
            + 1
    }

    /// Attempts that count against the step's budget (reset by a retry request).
    pub fn attempts_used(&self, step: &str, phase: Phase) -> u32 {
        self.attempts
            .get(&(step.to_owned(), phase))
            .copied()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn started() -> Instance {
        let e = SagaEvent::SagaStarted {
            saga_id: "s".into(),
            definition: "d".into(),
            version: 1,
            correlation_key: "k".into(),
            trigger: json!({}),
        };
        Instance::start(&e, Timestamp(0)).unwrap()
    }

    #[test]
    fn events_round_trip_through_their_stored_parts() {
        let e = SagaEvent::StepFailed {
            step: "a".into(),
            phase: Phase::Compensation,
            attempt: 2,
            error: "boom".into(),
            retryable: true,
            is_final: false,
            duration_ms: 3,
            outcome_unknown: true,
            status: None,
        };
        let (kind, data) = e.to_parts();
        assert_eq!(kind, "StepFailed");
        assert!(data.contains("\"final\":false"), "{data}");
        assert!(data.contains("\"outcomeUnknown\":true"), "{data}");
        let back: SagaEvent = serde_json::from_value(
            json!({"type": kind, "data": serde_json::from_str::<Value>(&data).unwrap()}),
        )
        .unwrap();
        assert_eq!(back, e);
        let (kind, data) = SagaEvent::SagaCompleted {}.to_parts();
        assert_eq!((kind.as_str(), data.as_str()), ("SagaCompleted", "{}"));
    }

    #[test]
    fn stuck_resumes_where_it_was_with_a_fresh_budget() {
        let mut s = started();
        s.apply(
            &SagaEvent::SagaCompensating {
                reason: "x".into(),
                step: None,
            },
            Timestamp(1),
            1,
        );
        let failed = SagaEvent::StepFailed {
            step: "a".into(),
            phase: Phase::Compensation,
            attempt: 1,
            error: "e".into(),
            retryable: true,
            is_final: true,
            duration_ms: 0,
            outcome_unknown: false,
            status: Some(503),
        };
        s.apply(&failed, Timestamp(2), 2);
        assert_eq!(s.attempts_used("a", Phase::Compensation), 1);
        s.apply(
            &SagaEvent::SagaStuck {
                step: "a".into(),
                phase: Phase::Compensation,
                error: "e".into(),
            },
            Timestamp(3),
            3,
        );
        assert_eq!(s.state, SagaState::Stuck);
        s.apply(&SagaEvent::SagaRetryRequested {}, Timestamp(4), 4);
        assert_eq!(s.state, SagaState::Compensating);
        assert_eq!(s.attempts_used("a", Phase::Compensation), 0);
        assert_eq!(s.next_attempt("a", Phase::Compensation), 2);
    }
}
