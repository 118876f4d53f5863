//! DCB queries: which events a read selects or an append condition forbids.

use serde::{Deserialize, Serialize};

use crate::{Error, EventType, RecordedEvent, Result, Tag};

/// The most items a query may have; each item costs an index scan.
pub const MAX_QUERY_ITEMS: usize = 64;
/// The most types one item may list; each costs an index lookup (an append condition's are
/// made while the writer waits).
pub const MAX_ITEM_TYPES: usize = 64;
/// The most tags one item may list.
pub const MAX_ITEM_TAGS: usize = 16;

/// One alternative of a query. It matches an event whose type is one of `types` (or any type
/// when `types` is empty) and that carries every tag in `tags`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryItem {
    /// Accepted event types; empty accepts all.
    #[serde(default)]
    pub types: Vec<EventType>,
    /// Tags the event must all carry.
    #[serde(default)]
    pub tags: Vec<Tag>,
}

impl QueryItem {
    /// Whether this item selects `event`.
    pub fn matches(&self, event_type: &EventType, tags: &[Tag]) -> bool {
        (self.types.is_empty() || self.types.contains(event_type))
            && self.tags.iter().all(|t| tags.contains(t))
    }
}

/// A DCB query: a list of items; an event matches when any item matches it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Query {
    /// The alternatives; at least one.
    pub items: Vec<QueryItem>,
}

impl Query {
    /// A validated query: at least one item, at most [`MAX_QUERY_ITEMS`].
    pub fn new(items: Vec<QueryItem>) -> Result<Self> {
        let query = Self { items };
        query.validate()?;
        Ok(query)
    }

    /// A query matching every event.
    pub fn all() -> Self {
        Self {
            items: vec![QueryItem::default()],
        }
    }

    /// Checks the item count, and the types and tags per item (deserialization checks each
    /// type and tag).
    pub fn validate(&self) -> Result<()> {
        if self.items.is_empty() {
            return Err(Error::invalid(
                "query must have at least one item (an item with no types and no tags matches every event)",
            ));
        }
        if self.items.len() > MAX_QUERY_ITEMS {
            return Err(Error::invalid(format!(
                "query has {} items; the maximum is {MAX_QUERY_ITEMS}",
                self.items.len()
            )));
        }
        for (i, item) in self.items.iter().enumerate() {
            if item.types.len() > MAX_ITEM_TYPES {
                return Err(Error::invalid(format!(
                    "query item {i} lists {} types; the maximum is {MAX_ITEM_TYPES}",
                    item.types.len()
                )));
            }
            if item.tags.len() > MAX_ITEM_TAGS {
                return Err(Error::invalid(format!(
                    "query item {i} lists {} tags; the maximum is {MAX_ITEM_TAGS}",
                    item.tags.len()
                )));
            }
        }
        Ok(())
    }

    /// Whether any item selects the event with this type and these tags.
    pub fn matches(&self, event_type: &EventType, tags: &[Tag]) -> bool {
        self.items.iter().any(|i| i.matches(event_type, tags))
    }

    /// Whether any item selects `event`.
    pub fn matches_event(&self, event: &RecordedEvent) -> bool {
        self.matches(&event.event_type, &event.tags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Tag {
        Tag::new(s).unwrap()
    }
    fn ty(s: &str) -> EventType {
        EventType::new(s).unwrap()
    }

    #[test]
    fn an_item_needs_one_of_its_types_and_all_of_its_tags() {
        let item = QueryItem {
            types: vec![ty("A"), ty("B")],
            tags: vec![t("x"), t("y")],
        };
        assert!(item.matches(&ty("A"), &[t("x"), t("y"), t("z")]));
        assert!(!item.matches(&ty("C"), &[t("x"), t("y")]));
        assert!(!item.matches(&ty("B"), &[t("x")]));
        let any_type = QueryItem {
            types: vec![],
            tags: vec![t("x")],
        };
        assert!(any_type.matches(&ty("Z"), &[t("x")]));
        assert!(QueryItem::default().matches(&ty("Z"), &[]));
    }

    #[test]
    fn items_with_too_many_types_or_tags_are_refused() {
        let types = |n: usize| (0..n).map(|i| ty(&format!("T{i}"))).collect::<Vec<_>>();
        let tags = |n: usize| (0..n).map(|i| t(&format!("k:{i}"))).collect::<Vec<_>>();
        let item = |types, tags| Query::new(vec![QueryItem { types, tags }]);
        item(types(MAX_ITEM_TYPES), tags(MAX_ITEM_TAGS)).unwrap();
        let error = item(types(MAX_ITEM_TYPES + 1), vec![]).unwrap_err();
        assert!(error.to_string().contains("the maximum is 64"), "{error}");
        let error = item(vec![], tags(MAX_ITEM_TAGS + 1)).unwrap_err();
        assert!(error.to_string().contains("the maximum is 16"), "{error}");
    }

    #[test]
    fn a_query_matches_when_any_item_does() {
        let q = Query::new(vec![
            QueryItem {
                types: vec![ty("A")],
                tags: vec![],
            },
            QueryItem {
                types: vec![],
                tags: vec![t("x")],
            },
        ])
        .unwrap();
        assert!(q.matches(&ty("A"), &[]));
        assert!(q.matches(&ty("B"), &[t("x")]));
        assert!(!q.matches(&ty("B"), &[t("y")]));
        assert!(Query::new(vec![]).is_err());
    }

    #[test]
    fn unknown_query_fields_are_rejected() {
        let err = serde_json::from_str::<Query>(r#"{"items":[{"type":["A"]}]}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }
}
