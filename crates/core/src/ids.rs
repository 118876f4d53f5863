//! Newtypes for every identifier and number that could be confused with another.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The hard ceiling on any name stored in a record (its length is a `u16` on disk).
/// The configurable [`crate::Limits`] are always at or below it.
pub const MAX_NAME_BYTES: usize = 4096;

/// A global position: the gapless, increasing index of an event across the whole store,
/// starting at 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Position(pub u64);

/// An event's revision within its stream, starting at 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Revision(pub u64);

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An event's unique id, given by the client or generated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(pub uuid::Uuid);

impl EventId {
    /// A fresh id: a UUIDv7, time-ordered with random low bits, so that ids the store
    /// generates reach the id index in nearly ascending order (random keys cost a B-tree page
    /// copy each). Its time bits are only for that locality; no logic reads them.
    pub fn generate() -> Self {
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Self(uuid::Builder::from_unix_timestamp_millis(millis, &random_bytes()).into_uuid())
    }
}

/// Random bytes from the operating system, drawn 4 KiB at a time per thread: one `getrandom`
/// call per 409 generated ids instead of one per id (a system call on every append of an event
/// without an id). Skald never forks, so no two processes share a thread's pool.
fn random_bytes() -> [u8; 10] {
    struct Pool {
        bytes: [u8; 4096],
        used: usize,
    }
    thread_local! {
        static POOL: std::cell::RefCell<Pool> =
            const { std::cell::RefCell::new(Pool { bytes: [0; 4096], used: 4096 }) };
    }
    POOL.with_borrow_mut(|pool| {
        if pool.used + 10 > pool.bytes.len() {
            getrandom::fill(&mut pool.bytes)
                .expect("the operating system's random source must work to make ids");
            pool.used = 0;
        }
        let mut out = [0; 10];
        out.copy_from_slice(&pool.bytes[pool.used..pool.used + 10]);
        pool.used += 10;
        out
    })
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Checks the rules shared by every stored name: not empty, not over the hard ceiling, and no
/// control characters (they break logs, terminals and the line-oriented NDJSON output).
fn check_name(what: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(format!("{what} must not be empty")));
    }
    if value.len() > MAX_NAME_BYTES {
        return Err(Error::invalid(format!(
            "{what} is {} bytes long; the maximum is {MAX_NAME_BYTES}",
            value.len()
        )));
    }
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(Error::invalid(format!(
            "{what} {value:?} contains the control character {c:?}"
        )));
    }
    Ok(())
}

/// A stream name, validated once at construction.
///
/// Rules: not empty, no whitespace or control characters, no `/` (it would make stream URLs
/// ambiguous), and not starting with `$`, which is reserved for Skald's own system streams.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct StreamName(String);

impl StreamName {
    /// Validates `name` as a user stream name.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        check_name("stream name", &name)?;
        if let Some(c) = name.chars().find(|c| c.is_whitespace() || *c == '/') {
            return Err(Error::invalid(format!(
                "stream name {name:?} contains {c:?}; whitespace and '/' are not allowed"
            )));
        }
        if name.starts_with('$') {
            return Err(Error::invalid(format!(
                "stream name {name:?} starts with '$', which is reserved for system streams"
            )));
        }
        Ok(Self(name))
    }

    /// Rebuilds a name read back from storage, where it was validated before it was written.
    pub fn from_stored(name: String) -> Self {
        Self(name)
    }

    /// Validates `name` as the name of one of Skald's own streams: it must start with `$` and
    /// otherwise follow the rules of user stream names. Only Skald's components write these;
    /// the APIs accept one from a client only to read it (where the access rules keep system
    /// streams to admins), never to append.
    pub fn system(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        let Some(rest) = name.strip_prefix('$') else {
            return Err(Error::invalid(format!(
                "system stream name {name:?} must start with '$'"
            )));
        };
        Self::new(rest)?;
        Ok(Self(name))
    }

    /// Whether this is one of Skald's own streams (its name starts with `$`).
    pub fn is_system(&self) -> bool {
        self.0.starts_with('$')
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The stream's category: the part of the name before the first `-`, or the whole name
    /// when it has no `-` (or starts with one, which would leave an empty category).
    pub fn category(&self) -> Category {
        Category(self.category_str().to_owned())
    }

    /// Whether the stream belongs to `category`, without allocating.
    pub fn in_category(&self, category: &Category) -> bool {
        self.category_str() == category.as_str()
    }

    /// The category's name, without allocating (see [`StreamName::category`]).
    pub fn category_str(&self) -> &str {
        let end = match self.0.find('-') {
            Some(i) if i > 0 => i,
            _ => self.0.len(),
        };
        &self.0[..end]
    }
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for StreamName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}

macro_rules! validated_name {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            #[doc = concat!("Validates a ", $what, ": not empty, no control characters.")]
            pub fn new(value: impl Into<String>) -> Result<Self> {
                let value = value.into();
                check_name($what, &value)?;
                Ok(Self(value))
            }

            /// Rebuilds a value read back from storage, where it was validated before it was
            /// written.
            pub fn from_stored(value: String) -> Self {
                Self(value)
            }

            /// The value as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

validated_name!(
    /// An event type such as `OrderPlaced`.
    EventType,
    "event type"
);
validated_name!(
    /// A tag such as `customer:42`, used by DCB queries.
    Tag,
    "tag"
);
validated_name!(
    /// A stream category: the stream-name prefix before the first `-`.
    Category,
    "category"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_are_version_7_unique_across_threads_and_pool_refills() {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        // 5,000 ids per thread is twelve refills of each thread's pool.
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| (0..5_000).map(|_| EventId::generate()).collect::<Vec<_>>())
            })
            .collect();
        let ids: Vec<EventId> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len(), "a generated id repeated");
        for id in &ids {
            assert_eq!(id.0.get_version(), Some(uuid::Version::SortRand));
            let (secs, nanos) = id.0.get_timestamp().unwrap().to_unix();
            let millis = secs * 1000 + u64::from(nanos) / 1_000_000;
            assert!(
                millis >= before && millis < before + 60_000,
                "{id}: {millis}"
            );
        }
    }

    #[test]
    fn stream_names_are_validated_at_construction() {
        assert!(StreamName::new("order-42").is_ok());
        assert!(StreamName::new("account:7").is_ok());
        for bad in ["", "a b", "a/b", "$system", "tab\there", "nl\n"] {
            let err = StreamName::new(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidEvent { .. }), "{bad:?}: {err}");
        }
        assert!(StreamName::new("x".repeat(MAX_NAME_BYTES + 1)).is_err());
    }

    #[test]
    fn system_stream_names_need_the_dollar_and_the_usual_rules() {
        let name = StreamName::system("$persistent-orders").unwrap();
        assert!(name.is_system());
        assert!(!StreamName::new("orders").unwrap().is_system());
        for bad in ["persistent", "$", "$$x", "$a b", "$a/b"] {
            assert!(StreamName::system(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn category_is_the_prefix_before_the_first_dash() {
        let c = |s: &str| StreamName::new(s).unwrap().category().as_str().to_owned();
        assert_eq!(c("order-42"), "order");
        assert_eq!(c("order-42-x"), "order");
        assert_eq!(c("orders"), "orders");
        assert_eq!(c("-x"), "-x");
        let order = StreamName::new("order-42").unwrap();
        assert!(order.in_category(&Category::new("order").unwrap()));
        assert!(!order.in_category(&Category::new("orde").unwrap()));
    }

    #[test]
    fn names_reject_empty_and_control_characters() {
        assert!(EventType::new("").is_err());
        assert!(Tag::new("a\u{0}").is_err());
        assert!(Tag::new("customer:42").is_ok());
    }
}
