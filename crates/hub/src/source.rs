//! What a subscription or a group selects, as clients write it: the JSON shape shared by the
//! WebSocket protocol and persistent subscription definitions.

use serde::{Deserialize, Serialize};
use skald_core::{Category, EventType, Query, QueryItem, ReadSource, Result, StreamName, Tag};

/// `{"all": {"types": [..], "tags": [..]}}`, `{"stream": "s"}`, `{"category": "c"}` or
/// `{"query": {"items": [..]}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum SourceSpec {
    /// The global log, optionally filtered.
    All(AllSpec),
    /// One stream.
    Stream(String),
    /// Every stream of a category.
    Category(String),
    /// Events matching a DCB query.
    Query(Query),
}

/// The filter of a global-log source: events of any of `types` (or any type when empty) that
/// carry all of `tags`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AllSpec {
    /// Event types, any of which matches.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<EventType>,
    /// Tags, all of which an event must carry.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<Tag>,
}

/// The query for a global log filtered by `types` and `tags`, or `None` when both are empty.
pub fn filter_of(types: Vec<EventType>, tags: Vec<Tag>) -> Option<Query> {
    (!types.is_empty() || !tags.is_empty()).then(|| Query {
        items: vec![QueryItem { types, tags }],
    })
}

impl SourceSpec {
    /// Checks names and queries and builds the read source.
    pub fn to_read_source(&self) -> Result<ReadSource> {
        Ok(match self {
            Self::All(all) => ReadSource::All(filter_of(all.types.clone(), all.tags.clone())),
            Self::Stream(name) => ReadSource::Stream(StreamName::new(name.as_str())?),
            Self::Category(name) => ReadSource::Category(Category::new(name.as_str())?),
            Self::Query(query) => {
                query.validate()?;
                ReadSource::Query(query.clone())
            }
        })
    }
}
