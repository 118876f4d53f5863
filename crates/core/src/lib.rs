//! The Skald event model and the backend-neutral store contract.
//!
//! This crate does no I/O. It defines what an event is, what an append and a read ask for,
//! the errors a store can answer with, and the [`EventStore`] trait that the embedded engine
//! (`skald-storage`) implements today and a PostgreSQL backend will implement later.

mod error;
mod event;
mod ids;
mod limits;
pub mod metrics;
mod query;
mod store;

pub use error::{Error, Result};
pub use event::{
    AppendCondition, AppendRequest, AppendResult, Clock, EventData, ExpectedRevision, Metadata,
    ProposedEvent, RecordedEvent, SystemClock, Timestamp, is_json_content_type,
};
pub use ids::{Category, EventId, EventType, Position, Revision, StreamName, Tag};
pub use limits::Limits;
pub use query::{Query, QueryItem};
pub use store::{
    Direction, Durability, EventStore, MAX_READ_PAGE, MAX_READ_PAGE_BYTES, ReadPage, ReadRequest,
    ReadSource, StoreInfo, StreamHead, first_revision_at, merge_query_items, page_bytes,
    page_is_cut, read_to_end, read_to_end_by, truncate_to_budget,
};
