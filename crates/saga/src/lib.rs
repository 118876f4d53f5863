//! Sagas: declarative orchestration of distributed transactions, with compensation, retries,
//! timeouts, circuit breakers and idempotency keys. Every transition is an event in the store,
//! so an instance's history is its audit trail and the engine resumes from it after a crash.
//! The design is in `docs/sagas.md`.
//!
//! [`Sagas`] is the engine's handle: it registers definitions, follows trigger events, runs one
//! task per unfinished instance and answers the transports' questions. It knows nothing of the
//! HTTP server (only of the HTTP targets its steps call).

mod actions;
pub mod breaker;
pub mod definition;
pub mod egress;
mod engine;
pub mod history;
mod metrics;
pub mod template;
pub mod yaml;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use breaker::{BreakerSettings, BreakerState};
pub use definition::{SagaDefinition, parse};
pub use egress::EgressPolicy;
pub use engine::{
    DefinitionSummary, HistoryEntry, InstanceFilter, InstanceHistory, InstanceSummary, MAX_HISTORY,
    MAX_LISTED, Registration, Sagas, saga_id,
};
pub use history::{Phase, SagaState};

/// How the engine runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", default, deny_unknown_fields)]
pub struct SagaOptions {
    /// Most instances running at once; triggers wait when it is reached.
    pub max_running: usize,
    /// Most instance starts (appends of `SagaStarted`) in flight at once.
    pub max_starting: usize,
    /// Most instances one definition starts per second (with a burst of as many); beyond it
    /// the trigger loop waits, so a definition that fans out cannot flood the store.
    pub max_starts_per_second: u32,
    /// Circuit-breaker thresholds, shared by every target host.
    pub breaker: BreakerSettings,
    /// Where `http` steps may connect beyond the public internet.
    pub egress: EgressPolicy,
    /// PEM roots trusted for `https://` step targets, instead of the system's (for targets
    /// whose certificates a private CA signs).
    pub ca_file: Option<std::path::PathBuf>,
    /// Finished instances kept in memory for listings, newest first; older ones are read from
    /// their stream when asked for by id, and only counted. Memory then grows with the
    /// instances running, not with history.
    pub keep_finished: usize,
    /// How often the trigger loop records how far it has come.
    #[serde(skip)]
    pub checkpoint_every: Duration,
}

impl Default for SagaOptions {
    fn default() -> Self {
        Self {
            max_running: 10_000,
            max_starting: 256,
            max_starts_per_second: 1000,
            breaker: BreakerSettings::default(),
            egress: EgressPolicy::default(),
            ca_file: None,
            keep_finished: 10_000,
            checkpoint_every: Duration::from_secs(1),
        }
    }
}

/// What a trigger or a step asks of its definition's registrant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need<'a> {
    /// Reading this stream's events (a trigger, an awaited event, an `http` step that may send
    /// the trigger's data).
    Read(&'a str),
    /// Appending to this stream.
    Append(&'a str),
}

/// Whether a definition's registrant (as recorded at registration, an opaque JSON value the
/// server gives and reads back) may still do what a trigger or a step needs. The server
/// answers from its keys and rules; without authentication everything is allowed.
pub trait Authority: Send + Sync + 'static {
    /// `Err` says why not.
    fn check(&self, registrant: Option<&serde_json::Value>, need: Need<'_>) -> Result<(), String>;
}

/// Everything is allowed (authentication off, embedded use, tests).
#[derive(Clone, Copy, Debug, Default)]
pub struct Unrestricted;

impl Authority for Unrestricted {
    fn check(&self, _: Option<&serde_json::Value>, _: Need<'_>) -> Result<(), String> {
        Ok(())
    }
}

/// The wall clock, for servers; tests may inject their own [`skald_core::Clock`].
#[derive(Clone, Copy, Debug, Default)]
pub struct WallClock;

impl skald_core::Clock for WallClock {
    fn now(&self) -> skald_core::Timestamp {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        skald_core::Timestamp(i64::try_from(micros).unwrap_or(i64::MAX))
    }
}

/// The engine's own streams.
pub mod streams {
    use skald_core::StreamName;

    /// The category of instance streams (`$saga-{id}`).
    pub const INSTANCE_CATEGORY: &str = "$saga";

    /// The namespace of saga ids and of the event ids `append` steps write (UUID v5).
    pub const NAMESPACE: uuid::Uuid =
        uuid::Uuid::from_u128(0x5ca1_d000_5a6a_4c0d_9e1d_0000_0000_0001);

    /// `$sagas-definitions`: every registered definition.
    pub fn definitions() -> StreamName {
        StreamName::system("$sagas-definitions").expect("a valid system stream name")
    }

    /// `$sagas-triggers`: the trigger loop's checkpoints.
    pub fn triggers() -> StreamName {
        StreamName::system("$sagas-triggers").expect("a valid system stream name")
    }

    /// `$saga-{id}`: one instance's history.
    pub fn instance(saga_id: &str) -> StreamName {
        StreamName::system(format!("{INSTANCE_CATEGORY}-{saga_id}"))
            .expect("a saga id is a UUID, which makes a valid stream name")
    }
}
