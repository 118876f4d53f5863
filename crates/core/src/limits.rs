//! Request limits, each with a default, enforced by every store.

use serde::{Deserialize, Serialize};

use crate::{AppendRequest, Error, Result, ids::MAX_NAME_BYTES};

/// Limits on what one append may contain. Every field has a default and can be configured.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest event: data, metadata, type, tags and source together, in bytes.
    pub max_event_bytes: usize,
    /// Most events in one append.
    pub max_events_per_append: usize,
    /// Longest stream name, in bytes.
    pub max_stream_name_bytes: usize,
    /// Most tags on one event.
    pub max_tags_per_event: usize,
    /// Longest tag or event type, in bytes.
    pub max_name_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_event_bytes: 1024 * 1024,
            max_events_per_append: 1000,
            max_stream_name_bytes: 256,
            max_tags_per_event: 32,
            max_name_bytes: 256,
        }
    }
}

impl Limits {
    /// Checks the configured limits against the hard ceilings of the record format.
    pub fn validate(&self) -> Result<()> {
        for (name, value) in [
            ("max_stream_name_bytes", self.max_stream_name_bytes),
            ("max_name_bytes", self.max_name_bytes),
        ] {
            if value == 0 || value > MAX_NAME_BYTES {
                return Err(Error::invalid(format!(
                    "limit {name} = {value} must be between 1 and {MAX_NAME_BYTES}"
                )));
            }
        }
        if self.max_event_bytes == 0 || self.max_event_bytes > 16 * 1024 * 1024 {
            return Err(Error::invalid(format!(
                "limit max_event_bytes = {} must be between 1 and 16777216",
                self.max_event_bytes
            )));
        }
        if self.max_events_per_append == 0 || self.max_tags_per_event > u16::MAX as usize {
            return Err(Error::invalid(
                "limits max_events_per_append must be at least 1 and max_tags_per_event at most 65535",
            ));
        }
        Ok(())
    }

    /// Checks an append against these limits. Errors name the event by index and the field.
    pub fn check_append(&self, request: &AppendRequest) -> Result<()> {
        let stream = request.stream.as_str();
        if stream.len() > self.max_stream_name_bytes {
            return Err(Error::invalid(format!(
                "stream name is {} bytes long; the limit is {}",
                stream.len(),
                self.max_stream_name_bytes
            )));
        }
        if request.events.is_empty() {
            return Err(Error::invalid("an append needs at least one event"));
        }
        if request.events.len() > self.max_events_per_append {
            return Err(Error::invalid(format!(
                "the append has {} events; the limit is {} per append",
                request.events.len(),
                self.max_events_per_append
            )));
        }
        for (i, event) in request.events.iter().enumerate() {
            let size = event.size_bytes();
            if size > self.max_event_bytes {
                return Err(Error::invalid(format!(
                    "events[{i}] is {size} bytes; the limit is {} bytes per event",
                    self.max_event_bytes
                )));
            }
            if event.tags.len() > self.max_tags_per_event {
                return Err(Error::invalid(format!(
                    "events[{i}] has {} tags; the limit is {}",
                    event.tags.len(),
                    self.max_tags_per_event
                )));
            }
            let long_name = std::iter::once(event.event_type.as_str())
                .chain(event.tags.iter().map(|t| t.as_str()))
                .find(|n| n.len() > self.max_name_bytes);
            if let Some(name) = long_name {
                return Err(Error::invalid(format!(
                    "events[{i}]: {name:?} is {} bytes long; types and tags are limited to {} bytes",
                    name.len(),
                    self.max_name_bytes
                )));
            }
            if let Some(source) = &event.source
                && (source.len() > self.max_name_bytes || source.chars().any(char::is_control))
            {
                return Err(Error::invalid(format!(
                    "events[{i}].source must be at most {} bytes without control characters",
                    self.max_name_bytes
                )));
            }
            if let Some(j) = request.events[..i].iter().position(|e| e.id == event.id) {
                return Err(Error::invalid(format!(
                    "events[{i}] repeats the id {} of events[{j}]",
                    event.id
                )));
            }
        }
        if let Some(c) = &request.condition {
            c.query.validate()?;
        }
        Ok(())
    }
}
