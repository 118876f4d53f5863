//! The writer: one task per node that takes the appends waiting at the moment into one call
//! of `skald.append` (docs/postgres.md, "The append function"), answers each, and decides
//! retries from the stored events after the commit, as the embedded engine decides them.

use std::collections::HashMap;
use std::sync::Arc;

use skald_core::{
    AppendRequest, AppendResult, Durability, Error, EventId, ExpectedRevision, Position,
    RecordedEvent, Revision, StreamName,
};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::types::ToSql;

use crate::conn::{CHANNEL, COLUMNS, Conn, PgOptions, db_error, db_u64, event_of, within};
use crate::shared::Shared;

/// Most appends one call of `skald.append` takes.
const MAX_BATCH_APPENDS: usize = 256;
/// About the most event bytes one call takes (a batch always takes its first append).
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// About the most events one call takes: one call holds the append lock of every node.
const MAX_BATCH_EVENTS: usize = 4096;
pub(crate) enum Command {
    Append {
        request: AppendRequest,
        reply: oneshot::Sender<Result<AppendResult, Error>>,
    },
    Close,
}

/// One append waiting for its batch.
struct Pending {
    request: AppendRequest,
    reply: oneshot::Sender<Result<AppendResult, Error>>,
}

pub(crate) async fn run_writer(shared: Arc<Shared>, mut commands: mpsc::Receiver<Command>) {
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
        shared.metrics.store.batch_events.observe(written as f64);
        shared.metrics.store.events_written.add(written as u64);
        for outcome in &outcomes {
            shared.metrics.store.outcomes.count(outcome);
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
