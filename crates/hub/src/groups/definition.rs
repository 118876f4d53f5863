//! What a group is: its name, source, start and settings, as clients send them and as
//! `$groups` stores them.

use serde::{Deserialize, Serialize};
use skald_core::{Error, ReadSource, Result, StreamName};

use crate::{SourceSpec, Start};

/// Longest group name, in characters.
pub const MAX_GROUP_NAME: usize = 100;
/// Largest `bufferSize`.
pub const MAX_BUFFER_SIZE: usize = 100_000;
/// Largest `bufferBytes`: 1 GiB.
pub const MAX_BUFFER_BYTES: usize = 1024 * 1024 * 1024;

/// How a group shares its messages among its consumers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// The oldest available message goes to the next consumer in turn that has room.
    #[default]
    RoundRobin,
    /// Each stream goes to one consumer, in order.
    Pinned,
}

/// Where a group starts, once resolved at creation (`now` becomes a position).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum GroupStart {
    /// The first matching event at or after this global position.
    Position(u64),
    /// A stream group's event at this revision and what follows.
    Revision(u64),
}

/// The settings that can change while a group runs. Every field has a default.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct GroupSettings {
    /// Round-robin or pinned by stream.
    pub strategy: Strategy,
    /// A message not acknowledged this long after delivery is delivered again.
    pub message_timeout_ms: u64,
    /// A message delivered this many times without an ack is parked.
    pub max_deliveries: u32,
    /// The wait before the first redelivery; doubled for each further delivery.
    pub retry_delay_ms: u64,
    /// The longest wait before a redelivery.
    pub max_retry_delay_ms: u64,
    /// About the most messages held between the checkpoint and the reader.
    pub buffer_size: usize,
    /// About the most bytes of events held between the checkpoint and the reader (it may be
    /// passed by one store page). It also bounds what one batch or poll answer holds.
    pub buffer_bytes: usize,
    /// How often a checkpoint that moved is written.
    pub checkpoint_after_ms: u64,
}

impl Default for GroupSettings {
    fn default() -> Self {
        Self {
            strategy: Strategy::RoundRobin,
            message_timeout_ms: 30_000,
            max_deliveries: 10,
            retry_delay_ms: 500,
            max_retry_delay_ms: 30_000,
            buffer_size: 1000,
            buffer_bytes: 1024 * 1024,
            checkpoint_after_ms: 1000,
        }
    }
}

impl GroupSettings {
    /// Checks every setting; errors name the field.
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("messageTimeoutMs", self.message_timeout_ms),
            ("maxDeliveries", u64::from(self.max_deliveries)),
            ("bufferSize", self.buffer_size as u64),
            ("bufferBytes", self.buffer_bytes as u64),
            ("checkpointAfterMs", self.checkpoint_after_ms),
        ] {
            if value == 0 {
                return Err(Error::invalid(format!("{field} must be at least 1")));
            }
        }
        if self.buffer_size > MAX_BUFFER_SIZE {
            return Err(Error::invalid(format!(
                "bufferSize {} is over the most allowed, {MAX_BUFFER_SIZE}",
                self.buffer_size
            )));
        }
        if self.buffer_bytes > MAX_BUFFER_BYTES {
            return Err(Error::invalid(format!(
                "bufferBytes {} is over the most allowed, {MAX_BUFFER_BYTES} (1 GiB)",
                self.buffer_bytes
            )));
        }
        if self.retry_delay_ms > self.max_retry_delay_ms {
            return Err(Error::invalid(format!(
                "retryDelayMs ({}) must not be over maxRetryDelayMs ({})",
                self.retry_delay_ms, self.max_retry_delay_ms
            )));
        }
        Ok(())
    }

    /// The wait before delivering a message again that has been delivered `deliveries` times.
    pub fn retry_delay(&self, deliveries: u32) -> std::time::Duration {
        let doublings = deliveries.saturating_sub(1).min(32);
        let ms = self
            .retry_delay_ms
            .saturating_mul(1u64 << doublings)
            .min(self.max_retry_delay_ms);
        std::time::Duration::from_millis(ms)
    }
}

/// A group as `$groups` stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GroupDefinition {
    /// The group's name.
    pub name: String,
    /// What the group reads.
    pub source: SourceSpec,
    /// Where it started.
    pub start: GroupStart,
    /// The revision of the event in `$groups` that created it: checkpoints and parked
    /// messages of an older group of the same name carry another generation.
    pub generation: u64,
    /// Settings.
    pub settings: GroupSettings,
}

/// A change to a group's settings: the fields to change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SettingsUpdate {
    /// See [`GroupSettings`].
    pub strategy: Option<Strategy>,
    /// See [`GroupSettings`].
    pub message_timeout_ms: Option<u64>,
    /// See [`GroupSettings`].
    pub max_deliveries: Option<u32>,
    /// See [`GroupSettings`].
    pub retry_delay_ms: Option<u64>,
    /// See [`GroupSettings`].
    pub max_retry_delay_ms: Option<u64>,
    /// See [`GroupSettings`].
    pub buffer_size: Option<usize>,
    /// See [`GroupSettings`].
    pub buffer_bytes: Option<usize>,
    /// See [`GroupSettings`].
    pub checkpoint_after_ms: Option<u64>,
}

impl SettingsUpdate {
    /// `settings` with the given fields changed.
    pub fn apply(&self, settings: &GroupSettings) -> GroupSettings {
        let mut s = settings.clone();
        if let Some(v) = self.strategy {
            s.strategy = v;
        }
        if let Some(v) = self.message_timeout_ms {
            s.message_timeout_ms = v;
        }
        if let Some(v) = self.max_deliveries {
            s.max_deliveries = v;
        }
        if let Some(v) = self.retry_delay_ms {
            s.retry_delay_ms = v;
        }
        if let Some(v) = self.max_retry_delay_ms {
            s.max_retry_delay_ms = v;
        }
        if let Some(v) = self.buffer_size {
            s.buffer_size = v;
        }
        if let Some(v) = self.buffer_bytes {
            s.buffer_bytes = v;
        }
        if let Some(v) = self.checkpoint_after_ms {
            s.checkpoint_after_ms = v;
        }
        s
    }
}

/// Checks a group name: 1 to [`MAX_GROUP_NAME`] characters of `A-Z a-z 0-9 _ . -`, so that
/// it can name its system streams and appear in a URL path unescaped.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.chars().count() <= MAX_GROUP_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "group name {name:?} must be 1 to {MAX_GROUP_NAME} characters of A-Z, a-z, 0-9, \
             '_', '.' and '-'"
        )))
    }
}

/// Checks that a start fits the source, as [`Subscription`](crate::Subscription) would.
pub(crate) fn validate_start(source: &ReadSource, start: Start) -> Result<()> {
    if matches!(start, Start::Revision(_)) && !matches!(source, ReadSource::Stream(_)) {
        return Err(Error::invalid(
            "from: a revision can only start a group on a stream; give a position",
        ));
    }
    Ok(())
}

/// `$groups`: every change to any definition.
pub(crate) fn definitions_stream() -> StreamName {
    StreamName::system("$groups").expect("a valid system stream name")
}

/// `$group-NAME`: the group's checkpoints.
pub(crate) fn checkpoint_stream(name: &str) -> StreamName {
    StreamName::system(format!("$group-{name}")).expect("group names fit stream names")
}

/// `$parked-NAME`: the group's parked messages.
pub(crate) fn parked_stream(name: &str) -> StreamName {
    StreamName::system(format!("$parked-{name}")).expect("group names fit stream names")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["orders", "a", "billing.v2", "read_model-1"] {
            validate_name(good).unwrap();
        }
        let long = "x".repeat(MAX_GROUP_NAME + 1);
        for bad in ["", "a b", "a/b", "$x", "é", long.as_str()] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn retry_delay_doubles_up_to_the_maximum() {
        let s = GroupSettings {
            retry_delay_ms: 100,
            max_retry_delay_ms: 1000,
            ..GroupSettings::default()
        };
        let ms = |n| s.retry_delay(n).as_millis();
        assert_eq!(
            [ms(1), ms(2), ms(3), ms(4), ms(5), ms(99)],
            [100, 200, 400, 800, 1000, 1000]
        );
    }

    #[test]
    fn settings_are_validated() {
        GroupSettings::default().validate().unwrap();
        let zero = GroupSettings {
            max_deliveries: 0,
            ..GroupSettings::default()
        };
        assert!(
            zero.validate()
                .unwrap_err()
                .to_string()
                .contains("maxDeliveries")
        );
        let inverted = GroupSettings {
            retry_delay_ms: 10,
            max_retry_delay_ms: 5,
            ..GroupSettings::default()
        };
        assert!(inverted.validate().is_err());
    }
}
