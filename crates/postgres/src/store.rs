//! The `EventStore` over PostgreSQL (docs/postgres.md): one writer task per node batches the
//! appends waiting at the moment into one call of `skald.append`, reads are index scans on a
//! small pool of connections, and a tailer follows the head row (woken by `LISTEN`, polled as
//! the guarantee) so that `wait_for_append` sees appends made on any node.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use skald_core::metrics::{DURATION_BOUNDS, Exposition, Histogram, Kind, StoreCounters};
use skald_core::{
    AppendRequest, AppendResult, Clock, Direction, Error, EventStore, EventType, Limits,
    MAX_READ_PAGE, MAX_READ_PAGE_BYTES, Position, Query, QueryItem, ReadPage, ReadRequest,
    ReadSource, RecordedEvent, Revision, StoreInfo, StreamHead, StreamName, SystemClock, Tag,
    merge_query_items, truncate_to_budget,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::{Row, types::ToSql};

use crate::conn::{
    COLUMNS, Conn, PgOptions, corrupt, db_error, db_u64, event_of, read_head, within,
};
use crate::migrate;
use crate::shared::{PgMetrics, Shared};
use crate::tailer::run_tailer;
use crate::writer::{Command, run_writer};

/// Where [`PgStore::explain`] collects plans; `None` runs the statements.
type Plans<'a> = Option<&'a Mutex<Vec<String>>>;

/// An [`EventStore`] on PostgreSQL. Any number of nodes may open the same database.
pub struct PgStore {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
    writer: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    tailer: tokio::task::JoinHandle<()>,
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
                store: StoreCounters::new(),
                call_seconds: Histogram::new(DURATION_BOUNDS),
                storage_bytes: std::sync::atomic::AtomicU64::new(u64::MAX),
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
        self.shared.metrics.store.page_read(page.events.len());
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
        let rows = self.rows(crate::shared::SIZE_QUERY, &[]).await?;
        let bytes: i64 = rows.first().map_or(0, |r| r.get(0));
        self.shared
            .metrics
            .storage_bytes
            .store(bytes.max(0) as u64, std::sync::atomic::Ordering::Relaxed);
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
        // The head as this node last saw it.
        m.store.write(out, *self.shared.head.borrow());
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
        let bytes = m.storage_bytes.load(std::sync::atomic::Ordering::Relaxed);
        if bytes != u64::MAX {
            out.single(
                "skald_storage_bytes",
                Kind::Gauge,
                "Bytes the store occupies: its PostgreSQL tables with their indexes, measured \
                 every 15 s.",
                bytes as f64,
            );
        }
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
