//! The `EventStore` over PostgreSQL (docs/postgres.md): one writer task per node batches the
//! appends waiting at the moment into one call of `skald.append`, reads are index scans on a
//! small pool of connections, and a tailer follows the head row (woken by `LISTEN`, polled as
//! the guarantee) so that `wait_for_append` sees appends made on any node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use skald_core::metrics::{
    AppendOutcomes, Counter, DURATION_BOUNDS, Exposition, Histogram, Kind, SIZE_BOUNDS,
};
use skald_core::{
    AppendRequest, AppendResult, Clock, Direction, Durability, Error, EventData, EventId,
    EventStore, EventType, ExpectedRevision, Limits, MAX_READ_PAGE, MAX_READ_PAGE_BYTES, Metadata,
    Position, Query, QueryItem, ReadPage, ReadRequest, ReadSource, RecordedEvent, Revision,
    StoreInfo, StreamHead, StreamName, SystemClock, Tag, Timestamp, merge_query_items,
    truncate_to_budget,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::{Client, Row, Statement, types::ToSql};

use crate::{PgUrl, describe, migrate};

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

/// Where [`PgStore::explain`] collects plans; `None` runs the statements.
type Plans<'a> = Option<&'a Mutex<Vec<String>>>;

/// Most appends one call of `skald.append` takes.
const MAX_BATCH_APPENDS: usize = 256;
/// About the most event bytes one call takes (a batch always takes its first append).
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// About the most events one call takes: one call holds the append lock of every node.
const MAX_BATCH_EVENTS: usize = 4096;
/// The notification channel appends are announced on, after their commit.
const CHANNEL: &str = "skald_appended";

/// The columns of an event, in the order [`event_of`] reads them.
const COLUMNS: &str =
    "position, stream, revision, id, type, content_type, data, metadata, tags, source, recorded_at";

/// An [`EventStore`] on PostgreSQL. Any number of nodes may open the same database.
pub struct PgStore {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    writer: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    tailer: tokio::task::JoinHandle<()>,
}

struct Shared {
    options: PgOptions,
    clock: Arc<dyn Clock>,
    /// The next position as this node knows it: every event before it is committed.
    head: watch::Sender<u64>,
    readers: Vec<tokio::sync::Mutex<Option<Arc<Conn>>>>,
    next_reader: AtomicUsize,
    /// Why the tailer, which reads the head every poll interval, cannot reach the database
    /// now: what `/health/ready` answers.
    trouble: Mutex<Option<String>>,
    /// Set for good when the log was found shorter than this node had seen it.
    alarm: Mutex<Option<String>>,
    metrics: PgMetrics,
}

/// What a node on PostgreSQL counts for `GET /metrics`: the names the embedded engine uses
/// where the meaning is the same, and the append call's time in place of fdatasync's.
struct PgMetrics {
    outcomes: AppendOutcomes,
    events_written: Counter,
    batch_events: Histogram,
    call_seconds: Histogram,
    reads: Counter,
    events_read: Counter,
}

enum Command {
    Append {
        request: AppendRequest,
        reply: oneshot::Sender<Result<AppendResult, Error>>,
    },
    Close,
}

/// One connection with the statements it has prepared.
struct Conn {
    client: Client,
    prepared: Mutex<HashMap<String, Statement>>,
}

impl Conn {
    /// Connects and sets the session up: READ COMMITTED whatever the role's default (the
    /// append function's argument needs a fresh snapshot per statement), and the node's
    /// deadline as the statement and lock timeouts, so that a call the node gave up on does
    /// not go on working, or waiting for the append lock, on the server.
    async fn open(options: &PgOptions) -> Result<Self, Error> {
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

    async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, Error> {
        let statement = self.statement(sql).await?;
        self.client
            .query(&statement, params)
            .await
            .map_err(db_error)
    }
}

impl PgStore {
    /// Connects, brings the schema up to date, and starts the writer and the tailer.
    pub async fn open(options: PgOptions) -> Result<Self, Error> {
        Self::open_with_clock(options, Arc::new(SystemClock)).await
    }

    /// [`PgStore::open`] with the clock appends are timed by.
    pub async fn open_with_clock(options: PgOptions, clock: Arc<dyn Clock>) -> Result<Self, Error> {
        options.limits.validate()?;
        if options.readers == 0 {
            return Err(Error::InvalidConfig(
                "the PostgreSQL store needs at least one reader connection".to_owned(),
            ));
        }
        let mut client =
            within(options.timeout, "connecting", crate::connect(&options.url)).await?;
        let encoding: String = within(options.timeout, "reading the encoding", async {
            client
                .query_one("SHOW server_encoding", &[])
                .await
                .map_err(db_error)
                .map(|row| row.get(0))
        })
        .await?;
        if encoding != "UTF8" {
            // Stream names, types and tags are any Unicode: another encoding would refuse
            // some, and fail every append batched with them.
            return Err(Error::InvalidConfig(format!(
                "the database at {} is encoded in {encoding}; Skald needs UTF8: create it with \
                 CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0",
                options.url
            )));
        }
        within(
            options.timeout,
            "migrating the schema",
            migrate(&mut client),
        )
        .await?;
        if !options.importing {
            let importing = within(options.timeout, "reading the store's state", async {
                client
                    .query_opt("SELECT value FROM skald.meta WHERE key = 'importing'", &[])
                    .await
                    .map_err(db_error)
            })
            .await?;
            if let Some(row) = importing {
                let from: String = row.get(0);
                return Err(Error::InvalidConfig(format!(
                    "a copy of the embedded store in {from} into PostgreSQL at {} has not \
                     finished: run skald migrate again to finish it (or, to give it up, DELETE \
                     FROM skald.meta WHERE key = 'importing')",
                    options.url
                )));
            }
        }
        let next = read_head(&client).await?;
        drop(client);
        let (head, _) = watch::channel(next);
        let readers = (0..options.readers)
            .map(|_| tokio::sync::Mutex::new(None))
            .collect();
        let shared = Arc::new(Shared {
            options,
            clock,
            head,
            readers,
            next_reader: AtomicUsize::new(0),
            trouble: Mutex::new(None),
            alarm: Mutex::new(None),
            metrics: PgMetrics {
                outcomes: AppendOutcomes::new(),
                events_written: Counter::new(),
                batch_events: Histogram::new(SIZE_BOUNDS),
                call_seconds: Histogram::new(DURATION_BOUNDS),
                reads: Counter::new(),
                events_read: Counter::new(),
            },
        });
        let (commands, receiver) = mpsc::channel(1024);
        let writer = tokio::spawn(run_writer(Arc::clone(&shared), receiver));
        let tailer = tokio::spawn(run_tailer(Arc::clone(&shared)));
        Ok(Self {
            shared,
            commands,
            writer: tokio::sync::Mutex::new(Some(writer)),
            tailer,
        })
    }

    /// Answers the appends already queued, then stops taking appends.
    pub async fn shutdown(&self) {
        let _ = self.commands.send(Command::Close).await;
        if let Some(writer) = self.writer.lock().await.take() {
            let _ = writer.await;
        }
        self.tailer.abort();
    }

    /// Where the store is, without the password.
    pub fn url(&self) -> &PgUrl {
        &self.shared.options.url
    }

    /// A reader connection and its slot, connecting when the slot is empty or closed.
    async fn reader(&self) -> Result<(usize, Arc<Conn>), Error> {
        let slots = &self.shared.readers;
        let index = self.shared.next_reader.fetch_add(1, Ordering::Relaxed) % slots.len();
        let mut slot = slots[index].lock().await;
        if let Some(conn) = slot.as_ref().filter(|c| !c.client.is_closed()) {
            return Ok((index, Arc::clone(conn)));
        }
        *slot = None;
        let conn = Arc::new(Conn::open(&self.shared.options).await?);
        *slot = Some(Arc::clone(&conn));
        Ok((index, conn))
    }

    /// Runs one read query on a reader connection, within the deadline. A connection whose
    /// call ran out of time or failed is dropped: the next read connects afresh instead of
    /// queueing behind a call that may never be answered (a network cut off silently).
    async fn rows(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, Error> {
        let (index, conn) = self.reader().await?;
        let result = within(
            self.shared.options.timeout,
            "reading",
            conn.query(sql, params),
        )
        .await;
        if let Err(Error::Unavailable(_)) = &result {
            let mut slot = self.shared.readers[index].lock().await;
            if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, &conn)) {
                *slot = None;
            }
        }
        result
    }

    /// The events `sql` selects; with `plans`, the query plan instead, added to it.
    async fn events(
        &self,
        plans: Plans<'_>,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<RecordedEvent>, Error> {
        if let Some(plans) = plans {
            let rows = self.rows(&format!("EXPLAIN {sql}"), params).await?;
            let plan: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            plans.lock().expect("plans lock").push(plan.join("\n"));
            return Ok(Vec::new());
        }
        self.rows(sql, params).await?.iter().map(event_of).collect()
    }

    /// The query plans PostgreSQL chooses for the statements `request` runs (each plan as
    /// text), instead of running them: for the test that checks reads use indexes.
    #[doc(hidden)]
    pub async fn explain(&self, request: ReadRequest) -> Result<Vec<String>, Error> {
        let plans = Mutex::new(Vec::new());
        self.read_page(Some(&plans), &request).await?;
        Ok(plans.into_inner().expect("plans lock"))
    }

    async fn read_page(&self, plans: Plans<'_>, request: &ReadRequest) -> Result<ReadPage, Error> {
        let limit = request.limit.min(MAX_READ_PAGE);
        if request.direction == Direction::Backward
            && !matches!(request.source, ReadSource::Stream(_))
        {
            return Err(Error::invalid("only stream reads can go backward"));
        }
        if limit == 0 {
            return Ok(ReadPage {
                events: Vec::new(),
                next: None,
            });
        }
        let from = db_u64(request.from.unwrap_or(0));
        let n = limit as i64;
        let events = match &request.source {
            ReadSource::Stream(stream) => {
                let (filter, order) = match request.direction {
                    Direction::Forward => ("stream = $1 AND revision >= $2", "revision"),
                    Direction::Backward => ("stream = $1 AND revision <= $2", "revision DESC"),
                };
                let from = match (request.direction, request.from) {
                    (Direction::Backward, None) => i64::MAX,
                    _ => from,
                };
                let mut events = self
                    .events(plans, &paged(filter, order), &[&stream.as_str(), &from, &n])
                    .await?;
                truncate_to_budget(&mut events);
                return Ok(ReadPage::of_stream(events, limit, request.direction));
            }
            ReadSource::All(None) => {
                self.events(plans, &paged("position >= $1", "position"), &[&from, &n])
                    .await?
            }
            ReadSource::Category(category) => {
                self.events(
                    plans,
                    &paged("category = $1 AND position >= $2", "position"),
                    &[&category.as_str(), &from, &n],
                )
                .await?
            }
            ReadSource::All(Some(query)) | ReadSource::Query(query) => {
                self.query_page(plans, query, from, n).await?
            }
        };
        let mut events = events;
        truncate_to_budget(&mut events);
        Ok(ReadPage::of_positions(events, limit))
    }

    /// A page of a DCB query: each item by its narrowest index, then merged.
    async fn query_page(
        &self,
        plans: Plans<'_>,
        query: &Query,
        from: i64,
        n: i64,
    ) -> Result<Vec<RecordedEvent>, Error> {
        query.validate()?;
        // Each item is a statement of its own, with a snapshot of its own: with several, all
        // are cut at one head read first, so that the merged page is one prefix of the log.
        // (Item A read at head 100 and item B at head 110 would otherwise give a page with
        // B's events up to 109 and none of A's between 100 and 109, which a reader following
        // the page would skip for good.)
        let end = match query.items.len() {
            1 => i64::MAX,
            _ => {
                let rows = self
                    .rows("SELECT next_position FROM skald.head WHERE id = 1", &[])
                    .await?;
                rows.first()
                    .map(|r| r.get::<_, i64>(0))
                    .ok_or_else(|| corrupt("the head row is missing".to_owned()))?
            }
        };
        let mut items = Vec::with_capacity(query.items.len());
        for item in &query.items {
            let mut found = self.item_page(plans, item, from, end, n).await?;
            truncate_to_budget(&mut found);
            items.push(found);
        }
        Ok(merge_query_items(items, n as usize))
    }

    async fn item_page(
        &self,
        plans: Plans<'_>,
        item: &QueryItem,
        from: i64,
        end: i64,
        n: i64,
    ) -> Result<Vec<RecordedEvent>, Error> {
        let types: Vec<&str> = item.types.iter().map(EventType::as_str).collect();
        let tags: Vec<&str> = item.tags.iter().map(Tag::as_str).collect();
        if let Some(first) = tags.first() {
            // The tag table narrows the candidates; the event's row decides the rest.
            let sql = paged_from(
                "SELECT e.* FROM skald.event_tags t JOIN skald.events e \
                 ON e.position = t.position WHERE t.tag = $1 AND t.position >= $2 \
                 AND t.position < $6 AND e.tags @> $3 \
                 AND (cardinality($4::text[]) = 0 OR e.type = ANY ($4)) \
                 ORDER BY t.position LIMIT $5",
                "position",
            );
            self.events(plans, &sql, &[first, &from, &tags, &types, &n, &end])
                .await
        } else if !types.is_empty() {
            self.events(
                plans,
                &paged(
                    "type = ANY ($1) AND position >= $2 AND position < $3",
                    "position",
                ),
                &[&types, &from, &end, &n],
            )
            .await
        } else {
            self.events(
                plans,
                &paged("position >= $1 AND position < $2", "position"),
                &[&from, &end, &n],
            )
            .await
        }
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.tailer.abort();
    }
}

impl Shared {
    fn failed(&self, e: &Error) {
        *self.trouble.lock().expect("trouble lock") = Some(e.to_string());
    }

    fn recovered(&self) {
        *self.trouble.lock().expect("trouble lock") = None;
    }

    /// Moves this node's head forward to `next` (never back).
    fn advance(&self, next: u64) {
        self.head.send_if_modified(|head| {
            let moved = next > *head;
            *head = (*head).max(next);
            moved
        });
    }
}

/// A read of `skald.events` rows matching `filter`, in `order`, at most `$last` of them (the
/// last parameter), cut where the page's bytes pass [`MAX_READ_PAGE_BYTES`].
fn paged(filter: &str, order: &str) -> String {
    let last = filter.matches('$').count() + 1;
    paged_from(
        &format!("SELECT * FROM skald.events WHERE {filter} ORDER BY {order} LIMIT ${last}"),
        order,
    )
}

/// `inner` (rows of `skald.events`, at most a page) without the rows that start after the
/// page's byte budget is spent. The running sum counts data and metadata only, less than
/// [`RecordedEvent::size`], so the rows kept are a superset of the page, which
/// [`truncate_to_budget`] then cuts exactly; lengths are read without fetching the values.
fn paged_from(inner: &str, order: &str) -> String {
    format!(
        "SELECT {COLUMNS} FROM (SELECT page.*, sum(octet_length(page.data) + \
         octet_length(page.metadata)) OVER (ORDER BY page.{order} ROWS UNBOUNDED PRECEDING) \
         - octet_length(page.data) - octet_length(page.metadata) AS before FROM ({inner}) page) \
         sized WHERE before < {MAX_READ_PAGE_BYTES} ORDER BY {order}"
    )
}

/// A row of [`COLUMNS`] as an event.
fn event_of(row: &Row) -> Result<RecordedEvent, Error> {
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

fn corrupt(reason: String) -> Error {
    Error::Corruption {
        file: "skald.events".to_owned(),
        offset: 0,
        reason,
    }
}

/// A position or revision as PostgreSQL's `bigint` (which holds every one a store can reach).
fn db_u64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

async fn read_head(client: &Client) -> Result<u64, Error> {
    let row = client
        .query_one("SELECT next_position FROM skald.head WHERE id = 1", &[])
        .await
        .map_err(db_error)?;
    let next: i64 = row.get(0);
    u64::try_from(next).map_err(|_| corrupt(format!("the head row holds {next}")))
}

/// A database error as the store's error: a lost connection, a shutdown or a timeout is
/// `Unavailable` (retry), a full disk `StorageFull`, anything else `Io`.
fn db_error(e: tokio_postgres::Error) -> Error {
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
async fn within<T>(
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

// ---------------------------------------------------------------------------------------------
// The writer

/// One append waiting for its batch.
struct Pending {
    request: AppendRequest,
    reply: oneshot::Sender<Result<AppendResult, Error>>,
}

async fn run_writer(shared: Arc<Shared>, mut commands: mpsc::Receiver<Command>) {
    let mut conn: Option<Conn> = None;
    let mut closing = false;
    // An append that would have put an id in a batch twice waits for the next batch: the
    // append function checks ids against what was stored before the batch only.
    let mut carried: Option<Pending> = None;
    while !closing || carried.is_some() {
        let mut batch = Vec::new();
        let mut ids = std::collections::HashSet::new();
        let (mut bytes, mut events) = (0, 0);
        let first = match carried.take() {
            Some(pending) => pending,
            None => match commands.recv().await {
                None | Some(Command::Close) => break,
                Some(Command::Append { request, reply }) => Pending { request, reply },
            },
        };
        bytes += request_bytes(&first.request);
        events += first.request.events.len();
        ids.extend(first.request.events.iter().map(|e| e.id));
        batch.push(first);
        while !closing
            && batch.len() < MAX_BATCH_APPENDS
            && bytes < MAX_BATCH_BYTES
            && events < MAX_BATCH_EVENTS
        {
            match commands.try_recv() {
                Ok(Command::Append { request, reply }) => {
                    if request.events.iter().any(|e| ids.contains(&e.id)) {
                        carried = Some(Pending { request, reply });
                        break;
                    }
                    bytes += request_bytes(&request);
                    events += request.events.len();
                    ids.extend(request.events.iter().map(|e| e.id));
                    batch.push(Pending { request, reply });
                }
                Ok(Command::Close) => {
                    closing = true;
                    break;
                }
                Err(_) => break,
            }
        }
        // A caller that gave up while its append waited (it was answered "unavailable") is
        // not sent: what it was told stays true, and a retry of it finds nothing.
        batch.retain(|pending| !pending.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        if conn.as_ref().is_none_or(|c| c.client.is_closed()) {
            conn = None;
            match writer_conn(&shared.options).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    for pending in batch {
                        let _ = pending.reply.send(Err(e.clone()));
                    }
                    continue;
                }
            }
        }
        let c = conn.as_ref().expect("connected above");
        let started = std::time::Instant::now();
        let (outcomes, healthy) = send(&shared, c, &batch).await;
        shared
            .metrics
            .call_seconds
            .observe_duration(started.elapsed());
        let written: usize = outcomes
            .iter()
            .filter_map(|o| o.as_ref().ok().filter(|r| !r.replayed))
            .map(|r| (r.last_position.0 - r.first_position.0 + 1) as usize)
            .sum();
        shared.metrics.batch_events.observe(written as f64);
        shared.metrics.events_written.add(written as u64);
        for outcome in &outcomes {
            shared.metrics.outcomes.count(outcome);
        }
        // Committed: every position below the batch's last one is visible too.
        let next = outcomes
            .iter()
            .filter_map(|o| o.as_ref().ok().filter(|r| !r.replayed))
            .map(|r| r.last_position.0 + 1)
            .max();
        if let Some(next) = next {
            shared.advance(next);
        }
        for (pending, outcome) in batch.into_iter().zip(outcomes) {
            let _ = pending.reply.send(outcome);
        }
        let mut healthy = healthy;
        if let (Some(next), true) = (next, healthy) {
            // Announced after the commit, in a statement of its own: a notification never
            // names an event that could still roll back. Lost ones are made up for by the
            // other nodes' polls.
            let payload = next.to_string();
            let params: [&(dyn ToSql + Sync); 2] = [&CHANNEL, &payload];
            let notified = within(
                shared.options.timeout,
                "notifying",
                c.query(NOTIFY, &params),
            )
            .await;
            healthy = !matches!(notified, Err(Error::Unavailable(_)));
        }
        if !healthy {
            // A connection that ran out of time may still be working, or be gone: the next
            // batch connects afresh.
            conn = None;
        }
    }
}

/// Sends `batch` and answers each append, with whether the connection is still fit for the
/// next batch. A call that fails for a reason that would fail it again (not a lost
/// connection) is tried again one append at a time, so that one bad append fails alone.
async fn send(
    shared: &Shared,
    conn: &Conn,
    batch: &[Pending],
) -> (Vec<Result<AppendResult, Error>>, bool) {
    let timeout = shared.options.timeout;
    let unknown = |reason: String| {
        // The call may have committed or not: the caller's retry with the same ids finds out.
        Error::Unavailable(format!(
            "{reason}; the events of this request may or may not be stored: retry with the \
             same event ids to find out"
        ))
    };
    match within(timeout, "appending", write_batch(shared, conn, batch)).await {
        Ok(answers) => (decide(shared, conn, batch, answers).await, true),
        Err(Error::Unavailable(reason)) => (vec![Err(unknown(reason)); batch.len()], false),
        Err(e) if batch.len() == 1 => (vec![Err(e)], true),
        Err(_) => {
            let mut outcomes = Vec::with_capacity(batch.len());
            for (i, pending) in batch.iter().enumerate() {
                let one = std::slice::from_ref(pending);
                match within(timeout, "appending", write_batch(shared, conn, one)).await {
                    Ok(answers) => outcomes.extend(decide(shared, conn, one, answers).await),
                    Err(Error::Unavailable(reason)) => {
                        let e = unknown(reason);
                        outcomes.extend((i..batch.len()).map(|_| Err(e.clone())));
                        return (outcomes, false);
                    }
                    Err(e) => outcomes.push(Err(e)),
                }
            }
            (outcomes, true)
        }
    }
}

/// The writer's connection, with the commit durability the options ask for.
async fn writer_conn(options: &PgOptions) -> Result<Conn, Error> {
    let conn = Conn::open(options).await?;
    let setting = match options.durability {
        Durability::Fsync => "on",
        Durability::None => "off",
    };
    within(options.timeout, "setting up the writer", async {
        conn.client
            .batch_execute(&format!(
                "SET synchronous_commit = {setting}; SET application_name = 'skald writer'"
            ))
            .await
            .map_err(db_error)
    })
    .await?;
    Ok(conn)
}

fn request_bytes(request: &AppendRequest) -> usize {
    request.events.iter().map(|e| e.size_bytes()).sum()
}

/// The batch as the arrays `skald.append` takes.
#[derive(Default)]
struct Arrays {
    stream: Vec<String>,
    category: Vec<String>,
    expected: Vec<i64>,
    count: Vec<i32>,
    condition: Vec<Option<String>>,
    id: Vec<uuid::Uuid>,
    event_type: Vec<String>,
    content_type: Vec<String>,
    data: Vec<Vec<u8>>,
    metadata: Vec<String>,
    source: Vec<Option<String>>,
    tag_count: Vec<i32>,
    tag: Vec<String>,
}

impl Arrays {
    fn push(&mut self, request: &AppendRequest) {
        self.stream.push(request.stream.as_str().to_owned());
        self.category.push(request.stream.category_str().to_owned());
        self.expected.push(match request.expected {
            ExpectedRevision::Any => -1,
            ExpectedRevision::NoStream => -2,
            ExpectedRevision::StreamExists => -3,
            ExpectedRevision::Exact(r) => db_u64(r.0),
        });
        self.count.push(request.events.len() as i32);
        self.condition.push(request.condition.as_ref().map(|c| {
            serde_json::json!({
                // A position past any stored one matches nothing, as a larger one would.
                "after": c.after.map(|p| p.0.min(i64::MAX as u64 - 1)),
                "items": c.query.items,
            })
            .to_string()
        }));
        for event in &request.events {
            self.id.push(event.id.0);
            self.event_type.push(event.event_type.as_str().to_owned());
            self.content_type.push(event.data.content_type().to_owned());
            self.data.push(event.data.bytes().to_vec());
            self.metadata.push(event.metadata.as_str().to_owned());
            self.source.push(event.source.clone());
            self.tag_count.push(event.tags.len() as i32);
            self.tag
                .extend(event.tags.iter().map(|t| t.as_str().to_owned()));
        }
    }
}

const NOTIFY: &str = "SELECT pg_notify($1, $2)";

const APPEND: &str = "SELECT kind, at, revision, stored FROM skald.append(\
    $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)";

/// Sends one batch and turns each append's answer into its outcome.
async fn write_batch(
    shared: &Shared,
    conn: &Conn,
    batch: &[Pending],
) -> Result<Vec<Answer>, Error> {
    let mut a = Arrays::default();
    for pending in batch {
        a.push(&pending.request);
    }
    let now = shared.clock.now().0;
    let rows = conn
        .query(
            APPEND,
            &[
                &now,
                &a.stream,
                &a.category,
                &a.expected,
                &a.count,
                &a.condition,
                &a.id,
                &a.event_type,
                &a.content_type,
                &a.data,
                &a.metadata,
                &a.source,
                &a.tag_count,
                &a.tag,
            ],
        )
        .await?;
    if rows.len() != batch.len() {
        return Err(Error::Io(format!(
            "skald.append answered {} rows for {} appends",
            rows.len(),
            batch.len()
        )));
    }
    let mut outcomes = Vec::with_capacity(batch.len());
    for (pending, row) in batch.iter().zip(&rows) {
        let request = &pending.request;
        let kind: &str = row.get(0);
        let at: Option<i64> = row.get(1);
        let revision: Option<i64> = row.get(2);
        let outcome = match kind {
            "ok" => {
                let (first, revision) = (at.unwrap_or(0) as u64, revision.unwrap_or(0) as u64);
                let last = request.events.len() as u64 - 1;
                Ok(AppendResult {
                    first_position: Position(first),
                    last_position: Position(first + last),
                    first_revision: Revision(revision),
                    last_revision: Revision(revision + last),
                    replayed: false,
                })
            }
            "wrong-revision" => Err(Error::WrongExpectedRevision {
                stream: request.stream.clone(),
                expected: request.expected,
                actual: revision.map(|r| Revision(r as u64)),
            }),
            "condition-failed" => Err(Error::ConditionFailed {
                position: Position(at.unwrap_or(0) as u64),
            }),
            "stored" => {
                outcomes.push(Answer::Stored(row.get(3)));
                continue;
            }
            other => {
                return Err(Error::Io(format!(
                    "skald.append answered {other:?}, which this Skald does not know"
                )));
            }
        };
        outcomes.push(Answer::Done(outcome));
    }
    Ok(outcomes)
}

/// What `skald.append` answered for one append.
enum Answer {
    /// Decided: written, or refused.
    Done(Result<AppendResult, Error>),
    /// Some of its ids are stored, at these positions: a retry, or a reuse.
    Stored(Vec<i64>),
}

/// The outcomes of a committed batch: the stored events of every retry read in one query
/// (within the deadline) and each retry decided from them. A failure of that read answers
/// the retries only; the appends the batch wrote are answered as written.
async fn decide(
    shared: &Shared,
    conn: &Conn,
    batch: &[Pending],
    answers: Vec<Answer>,
) -> Vec<Result<AppendResult, Error>> {
    let positions: Vec<i64> = answers
        .iter()
        .filter_map(|a| match a {
            Answer::Stored(p) => Some(p.iter().copied()),
            Answer::Done(_) => None,
        })
        .flatten()
        .collect();
    let stored = if positions.is_empty() {
        Ok(Vec::new())
    } else {
        let sql = format!("SELECT {COLUMNS} FROM skald.events WHERE position = ANY ($1)");
        within(
            shared.options.timeout,
            "reading the events of retries",
            async {
                conn.query(&sql, &[&positions])
                    .await?
                    .iter()
                    .map(event_of)
                    .collect::<Result<Vec<_>, _>>()
            },
        )
        .await
    };
    batch
        .iter()
        .zip(answers)
        .map(|(pending, answer)| match answer {
            Answer::Done(outcome) => outcome,
            Answer::Stored(positions) => match &stored {
                Ok(events) => {
                    let mine: Vec<RecordedEvent> = events
                        .iter()
                        .filter(|e| positions.contains(&db_u64(e.position.0)))
                        .cloned()
                        .collect();
                    replay(&pending.request, &mine)
                }
                Err(e) => Err(e.clone()),
            },
        })
        .collect()
}

/// The answer to an append some of whose ids are stored (`stored`, the events holding them):
/// the first result when it is a whole, identical retry, `IdReused` otherwise. The stored
/// events never change, so deciding this after the batch's commit decides it as at the time.
fn replay(request: &AppendRequest, stored: &[RecordedEvent]) -> Result<AppendResult, Error> {
    let by_id: HashMap<EventId, &RecordedEvent> = stored.iter().map(|e| (e.id, e)).collect();
    let found: Vec<_> = request
        .events
        .iter()
        .filter_map(|e| by_id.get(&e.id).map(|s| (e, *s)))
        .collect();
    let Some(&(first_event, first)) = found.first() else {
        return Err(Error::Io(
            "skald.append said ids were stored, but none was found".to_owned(),
        ));
    };
    let reused = |id, position, reason: String, stream: &StreamName| {
        Err(Error::IdReused {
            id,
            position,
            reason,
            stream: Some(stream.clone()),
        })
    };
    if found.len() < request.events.len() {
        return reused(
            first_event.id,
            first.position,
            "the append mixes stored and new event ids; resend the original append unchanged, \
             or use new ids"
                .to_owned(),
            &first.stream,
        );
    }
    for (i, &(event, recorded)) in found.iter().enumerate() {
        if recorded.stream != request.stream {
            return reused(
                event.id,
                recorded.position,
                format!("it belongs to stream {}", recorded.stream),
                &recorded.stream,
            );
        }
        if recorded.position.0 != first.position.0 + i as u64 {
            return reused(
                event.id,
                recorded.position,
                "the ids were stored in a different order or in different appends".to_owned(),
                &recorded.stream,
            );
        }
        if let Some(difference) = event.differs_from(recorded) {
            return reused(
                event.id,
                recorded.position,
                difference.to_owned(),
                &recorded.stream,
            );
        }
    }
    let last = found.last().expect("not empty").1;
    Ok(AppendResult {
        first_position: first.position,
        last_position: last.position,
        first_revision: first.revision,
        last_revision: last.revision,
        replayed: true,
    })
}

// ---------------------------------------------------------------------------------------------
// The tailer

/// Follows the head row: at every notification, every poll interval, and at once after a
/// reconnection, since notifications sent while it was away are lost.
async fn run_tailer(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let mut reached = false;
        let Err(e) = tail(&shared, &mut reached).await;
        shared.failed(&e);
        if reached {
            // It had reached the database: start the back-off afresh.
            backoff = Duration::from_millis(50);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn tail(shared: &Shared, reached: &mut bool) -> Result<std::convert::Infallible, Error> {
    let options = &shared.options;
    let (client, mut woken) = within(
        options.timeout,
        "connecting the tailer",
        crate::connect_listening(&options.url),
    )
    .await?;
    async {
        within(options.timeout, "listening", async {
            client
                .batch_execute(&format!(
                    "SET application_name = 'skald tailer'; LISTEN {CHANNEL}"
                ))
                .await
                .map_err(db_error)
        })
        .await?;
        let statement = within(options.timeout, "preparing the tailer", async {
            client
                .prepare("SELECT next_position, pg_is_in_recovery() FROM skald.head WHERE id = 1")
                .await
                .map_err(db_error)
        })
        .await?;
        loop {
            let (next, standby): (i64, bool) = within(options.timeout, "reading the head", async {
                client
                    .query_one(&statement, &[])
                    .await
                    .map_err(db_error)
                    .map(|row| (row.get(0), row.get(1)))
            })
            .await?;
            *reached = true;
            let next = next.max(0) as u64;
            let seen = *shared.head.borrow();
            if next < seen {
                // Events this node saw committed are gone: a failover to a standby that had
                // not received them (asynchronous replication). Positions after `next` will be
                // taken again by other events; say so loudly and stay not ready.
                let alarm = format!(
                    "the log ends at position {next}, but this node saw it reach {seen}: a \
                     failover lost committed events (use synchronous replication); restart the \
                     node after checking the store"
                );
                *shared.alarm.lock().expect("alarm lock") = Some(alarm);
            }
            if standby {
                shared.failed(&Error::Unavailable(
                    "it is a standby in recovery, which cannot take appends: point the node at \
                     the primary (target_session_attrs=read-write with every host in the URL)"
                        .to_owned(),
                ));
            } else {
                shared.recovered();
            }
            shared.advance(next);
            tokio::select! {
                _ = woken.recv() => {
                    // Many notifications may be waiting: one read covers them all.
                    while woken.try_recv().is_ok() {}
                }
                _ = tokio::time::sleep(options.poll) => {}
            }
            if client.is_closed() {
                return Err(Error::Unavailable(
                    "the tailer's connection to PostgreSQL closed".to_owned(),
                ));
            }
        }
    }
    .await
}

// ---------------------------------------------------------------------------------------------
// The contract

impl EventStore for PgStore {
    async fn append(&self, request: AppendRequest) -> Result<AppendResult, Error> {
        self.shared.options.limits.check_append(&request)?;
        if let Some(condition) = &request.condition {
            condition.query.validate()?;
        }
        let (reply, answer) = oneshot::channel();
        // The whole request, queue included, has a deadline: twice the one of a call, room
        // for the batch ahead of it and its own.
        let deadline = self.shared.options.timeout * 2;
        let answered = tokio::time::timeout(deadline, async {
            self.commands
                .send(Command::Append { request, reply })
                .await
                .map_err(|_| Error::Unavailable("the store is shut down".to_owned()))?;
            answer
                .await
                .map_err(|_| Error::Unavailable("the store stopped before answering".to_owned()))?
        })
        .await;
        answered.unwrap_or_else(|_| {
            Err(Error::Unavailable(format!(
                "PostgreSQL did not take the append within {} ms; it may or may not be stored: \
                 retry with the same event ids to find out",
                deadline.as_millis()
            )))
        })
    }

    async fn read(&self, request: ReadRequest) -> Result<ReadPage, Error> {
        // A read may connect, then run a statement per query item: one deadline for all.
        let page = within(
            self.shared.options.timeout * 2,
            "reading",
            self.read_page(None, &request),
        )
        .await?;
        self.shared.metrics.reads.inc();
        self.shared
            .metrics
            .events_read
            .add(page.events.len() as u64);
        Ok(page)
    }

    async fn stream_head(&self, stream: &StreamName) -> Result<Option<StreamHead>, Error> {
        let rows = self
            .rows(
                "SELECT last_revision, last_position FROM skald.streams WHERE stream = $1",
                &[&stream.as_str()],
            )
            .await?;
        Ok(rows.first().map(|row| StreamHead {
            revision: Revision(row.get::<_, i64>(0) as u64),
            position: Position(row.get::<_, i64>(1) as u64),
        }))
    }

    async fn info(&self) -> Result<StoreInfo, Error> {
        let next = self.next_position().await?;
        let rows = self
            .rows(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::bigint FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = 'skald' AND c.relkind = 'r'",
                &[],
            )
            .await?;
        let bytes: i64 = rows.first().map_or(0, |r| r.get(0));
        Ok(StoreInfo {
            head_position: next.checked_sub(1).map(Position),
            durability: self.shared.options.durability,
            storage_bytes: bytes.max(0) as u64,
        })
    }

    async fn next_position(&self) -> Result<u64, Error> {
        let rows = self
            .rows("SELECT next_position FROM skald.head WHERE id = 1", &[])
            .await?;
        let next: i64 = rows
            .first()
            .map(|r| r.get(0))
            .ok_or_else(|| corrupt("the head row is missing".to_owned()))?;
        let next = next.max(0) as u64;
        self.shared.advance(next);
        Ok(next)
    }

    async fn wait_for_append(&self, known: u64) -> Result<u64, Error> {
        let mut head = self.shared.head.subscribe();
        let next = head
            .wait_for(|next| *next > known)
            .await
            .map_err(|_| Error::Unavailable("the store is shut down".to_owned()))?;
        Ok(*next)
    }

    fn limits(&self) -> &Limits {
        &self.shared.options.limits
    }

    fn write_metrics(&self, out: &mut Exposition) {
        let m = &self.shared.metrics;
        m.outcomes.write(out);
        out.single(
            "skald_events_written_total",
            Kind::Counter,
            "Events written.",
            m.events_written.get() as f64,
        );
        out.family(
            "skald_append_batch_events",
            Kind::Histogram,
            "Events per group commit (on PostgreSQL: per call of skald.append).",
        );
        out.histogram("skald_append_batch_events", &[], &m.batch_events);
        out.family(
            "skald_postgres_append_call_duration_seconds",
            Kind::Histogram,
            "Time one batch took on PostgreSQL: the call of skald.append, its commit, and the \
             read of retries' events.",
        );
        out.histogram(
            "skald_postgres_append_call_duration_seconds",
            &[],
            &m.call_seconds,
        );
        out.single(
            "skald_reads_total",
            Kind::Counter,
            "Read pages served (stream, category, query and global-log reads, subscriptions' \
             catch-up included).",
            m.reads.get() as f64,
        );
        out.single(
            "skald_events_read_total",
            Kind::Counter,
            "Events returned by reads.",
            m.events_read.get() as f64,
        );
        out.single(
            "skald_events_stored",
            Kind::Gauge,
            "Events in the store; the next append's position (as this node last saw it).",
            *self.shared.head.borrow() as f64,
        );
    }

    fn readiness(&self) -> Result<(), String> {
        if let Some(alarm) = &*self.shared.alarm.lock().expect("alarm lock") {
            return Err(format!(
                "PostgreSQL at {}: {alarm}",
                self.shared.options.url
            ));
        }
        match &*self.shared.trouble.lock().expect("trouble lock") {
            None => Ok(()),
            Some(reason) => Err(format!(
                "PostgreSQL at {} cannot be reached: {reason}",
                self.shared.options.url
            )),
        }
    }
}
