//! The plumbing every part of a node shares: its settings, one connection with its prepared
//! statements and session settings, rows read as events, and database errors and deadlines as
//! the store's errors.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use skald_core::{
    Durability, Error, EventData, EventId, EventType, Limits, Metadata, Position, RecordedEvent,
    Revision, StreamName, Tag, Timestamp,
};
use tokio_postgres::{Client, Row, Statement, types::ToSql};

use crate::{PgUrl, describe};

/// How a node uses its PostgreSQL.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// Where the database is.
    pub url: PgUrl,
    /// `Fsync` commits with `synchronous_commit = on` (durable when answered); `None` with
    /// `off` (for tests and benchmarks).
    pub durability: Durability,
    /// The limits appends are checked against, as on the embedded engine.
    pub limits: Limits,
    /// The deadline of every database call, connecting included. A call that runs out is
    /// answered [`Error::Unavailable`].
    pub timeout: Duration,
    /// Connections for reads (appends have one of their own, the tailer another).
    pub readers: usize,
    /// How often the tailer reads the head when no notification wakes it.
    pub poll: Duration,
    /// Open even while `skald migrate` is importing into the store (for `skald migrate`
    /// itself); every other node refuses to start then.
    #[doc(hidden)]
    pub importing: bool,
}

impl PgOptions {
    /// The defaults for `url`: durable, default limits, 5 s deadlines, 4 readers, 250 ms polls.
    pub fn new(url: PgUrl) -> Self {
        Self {
            url,
            durability: Durability::Fsync,
            limits: Limits::default(),
            timeout: Duration::from_secs(5),
            readers: 4,
            poll: Duration::from_millis(250),
            importing: false,
        }
    }
}

/// The notification channel appends are announced on, after their commit.
pub(crate) const CHANNEL: &str = "skald_appended";

/// The columns of an event, in the order [`event_of`] reads them.
pub(crate) const COLUMNS: &str =
    "position, stream, revision, id, type, content_type, data, metadata, tags, source, recorded_at";

/// One connection with the statements it has prepared.
pub(crate) struct Conn {
    pub(crate) client: Client,
    prepared: Mutex<HashMap<String, Statement>>,
}

impl Conn {
    /// Connects and sets the session up: READ COMMITTED whatever the role's default (the
    /// append function's argument needs a fresh snapshot per statement), and the node's
    /// deadline as the statement and lock timeouts, so that a call the node gave up on does
    /// not go on working, or waiting for the append lock, on the server.
    pub(crate) async fn open(options: &PgOptions) -> Result<Self, Error> {
        within(options.timeout, "connecting", async {
            let client = crate::connect(&options.url).await?;
            let ms = options.timeout.as_millis().max(1);
            client
                .batch_execute(&format!(
                    "SET default_transaction_isolation = 'read committed'; \
                     SET statement_timeout = {ms}; SET lock_timeout = {ms}"
                ))
                .await
                .map_err(db_error)?;
            Ok(Self {
                client,
                prepared: Mutex::new(HashMap::new()),
            })
        })
        .await
    }

    async fn statement(&self, sql: &str) -> Result<Statement, Error> {
        if let Some(statement) = self.prepared.lock().expect("prepared lock").get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql).await.map_err(db_error)?;
        self.prepared
            .lock()
            .expect("prepared lock")
            .insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    pub(crate) async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, Error> {
        let statement = self.statement(sql).await?;
        self.client
            .query(&statement, params)
            .await
            .map_err(db_error)
    }
}

/// A row of [`COLUMNS`] as an event.
pub(crate) fn event_of(row: &Row) -> Result<RecordedEvent, Error> {
    let get_u64 = |i: usize| -> Result<u64, Error> {
        let value: i64 = row.try_get(i).map_err(db_error)?;
        u64::try_from(value).map_err(|_| corrupt(format!("column {i} holds {value}")))
    };
    let text = |i: usize| -> Result<String, Error> { row.try_get(i).map_err(db_error) };
    let tags: Vec<String> = row.try_get(8).map_err(db_error)?;
    let id: uuid::Uuid = row.try_get(3).map_err(db_error)?;
    Ok(RecordedEvent {
        position: Position(get_u64(0)?),
        stream: StreamName::from_stored(text(1)?),
        revision: Revision(get_u64(2)?),
        id: EventId(id),
        event_type: EventType::from_stored(text(4)?),
        data: EventData::from_stored(text(5)?, row.try_get(6).map_err(db_error)?),
        metadata: Metadata::from_stored(text(7)?),
        tags: tags.into_iter().map(Tag::from_stored).collect(),
        source: row.try_get(9).map_err(db_error)?,
        recorded_at: Timestamp(row.try_get(10).map_err(db_error)?),
    })
}

pub(crate) fn corrupt(reason: String) -> Error {
    Error::Corruption {
        file: "skald.events".to_owned(),
        offset: 0,
        reason,
    }
}

/// A position or revision as PostgreSQL's `bigint` (which holds every one a store can reach).
pub(crate) fn db_u64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(crate) async fn read_head(client: &Client) -> Result<u64, Error> {
    let row = client
        .query_one("SELECT next_position FROM skald.head WHERE id = 1", &[])
        .await
        .map_err(db_error)?;
    let next: i64 = row.get(0);
    u64::try_from(next).map_err(|_| corrupt(format!("the head row holds {next}")))
}

/// A database error as the store's error: a lost connection, a shutdown or a timeout is
/// `Unavailable` (retry), a full disk `StorageFull`, anything else `Io`.
pub(crate) fn db_error(e: tokio_postgres::Error) -> Error {
    let text = format!("PostgreSQL: {}", describe(&e));
    match e.code().map(|c| c.code()) {
        Some("53100") => Error::StorageFull(text),
        // A lost connection, a shutdown, a cancelled statement, too many connections, a
        // standby that cannot write (after a failover), a serialization failure, a deadlock, a
        // lock not available: all pass, so the caller may try again.
        Some(code)
            if code.starts_with("08")
                || code.starts_with("57")
                || matches!(code, "53300" | "25006" | "40001" | "40P01" | "55P03") =>
        {
            Error::Unavailable(text)
        }
        Some(_) => Error::Io(text),
        None if e.is_closed() || e.as_db_error().is_none() => Error::Unavailable(text),
        None => Error::Io(text),
    }
}

/// `work` within `deadline`, or `Unavailable` naming what ran out of time.
pub(crate) async fn within<T>(
    deadline: Duration,
    what: &str,
    work: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(deadline, work).await {
        Ok(result) => result,
        Err(_) => Err(Error::Unavailable(format!(
            "PostgreSQL did not answer within {} ms while {what}",
            deadline.as_millis()
        ))),
    }
}
