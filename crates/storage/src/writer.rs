//! The single writer: every append goes through it. It takes whatever requests are queued,
//! checks each against the state left by the ones before it, writes the accepted ones with one
//! `fdatasync` (group commit), commits the index, publishes the new head, and answers.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redb::ReadableTable;
use skald_core::{
    AppendRequest, AppendResult, Clock, Durability, Error, Position, Revision, Timestamp,
};
use tokio::sync::{mpsc, oneshot};

use crate::codec::{self, RecordToWrite, SEGMENT_HEADER_LEN};
use crate::index::{IndexEntry, Tables};
use crate::read;
use crate::recovery::create_segment;
use crate::segments::{Address, RecordReader, Segment};
use crate::{Shared, redb_error};

/// A request to the writer.
pub enum Command {
    /// Append, answering on `reply`.
    Append {
        request: AppendRequest,
        reply: oneshot::Sender<Result<AppendResult, Error>>,
    },
    /// Finish what is queued before this, checkpoint the index durably, and stop.
    Shutdown { done: oneshot::Sender<()> },
}

/// What the writer needs besides the shared state.
pub struct WriterConfig {
    pub durability: Durability,
    pub segment_bytes: u64,
    pub max_batch_events: usize,
    pub checkpoint_interval: Duration,
    pub clock: Arc<dyn Clock>,
}

pub struct Writer {
    shared: Arc<Shared>,
    config: WriterConfig,
    active: Arc<Segment>,
    active_len: u64,
    next_position: u64,
    last_time: i64,
    last_checkpoint: Instant,
    uncheckpointed: bool,
    /// Set when the writer can no longer trust the state of the files (a failed fdatasync or
    /// index commit): appends are refused until a restart, reads go on.
    poisoned: Option<String>,
    buf: Vec<u8>,
}

/// A per-request answer, or the failure of the whole batch.
type Outcome = Result<AppendResult, Error>;

impl Writer {
    pub fn new(shared: Arc<Shared>, config: WriterConfig, next_position: u64) -> Self {
        let active = shared.segments.last();
        let active_len = active.committed_len.load(Ordering::Acquire);
        Self {
            shared,
            config,
            active,
            active_len,
            next_position,
            last_time: i64::MIN,
            last_checkpoint: Instant::now(),
            uncheckpointed: false,
            poisoned: None,
            buf: Vec::with_capacity(1 << 20),
        }
    }

    /// The writer's loop; runs on its own thread until shutdown or until every sender is gone.
    pub fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime can always be built");
        let mut done_on_exit = None;
        loop {
            let first = runtime.block_on(async {
                tokio::time::timeout(self.config.checkpoint_interval, commands.recv()).await
            });
            let first = match first {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(_idle) => {
                    self.checkpoint_if_due(true);
                    continue;
                }
            };
            let mut batch = Vec::new();
            let mut events = 0;
            let mut next = Some(first);
            while let Some(command) = next.take() {
                match command {
                    Command::Append { request, reply } => {
                        events += request.events.len();
                        batch.push((request, reply));
                    }
                    Command::Shutdown { done } => {
                        done_on_exit = Some(done);
                        break;
                    }
                }
                if events < self.config.max_batch_events {
                    next = commands.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                self.write_batch(batch);
            }
            if done_on_exit.is_some() {
                break;
            }
            self.checkpoint_if_due(false);
        }
        // Refuse what is still queued; then make the index durable so the next open is fast.
        commands.close();
        while let Ok(Command::Append { reply, .. }) = commands.try_recv() {
            let _ = reply.send(Err(Error::Unavailable("the store is shutting down".into())));
        }
        if self.uncheckpointed && self.poisoned.is_none() {
            let _ = self.commit_checkpoint();
        }
        if let Some(done) = done_on_exit {
            let _ = done.send(());
        }
    }

    fn checkpoint_if_due(&mut self, idle: bool) {
        let due = self.last_checkpoint.elapsed() >= self.config.checkpoint_interval;
        if self.uncheckpointed
            && self.poisoned.is_none()
            && (idle || due)
            && let Err(e) = self.commit_checkpoint()
        {
            self.poisoned = Some(format!("index checkpoint failed: {e}"));
        }
    }

    /// A durable, empty index commit: everything committed before it becomes durable too.
    fn commit_checkpoint(&mut self) -> Result<(), Error> {
        let mut txn = self.shared.db.begin_write().map_err(redb_error)?;
        txn.set_quick_repair(true);
        txn.commit().map_err(redb_error)?;
        self.last_checkpoint = Instant::now();
        self.uncheckpointed = false;
        Ok(())
    }

    fn write_batch(&mut self, batch: Vec<(AppendRequest, oneshot::Sender<Outcome>)>) {
        let outcomes = match &self.poisoned {
            Some(reason) => Err(Error::Unavailable(format!(
                "appends are refused until a restart: {reason}; reads still work"
            ))),
            None => self.apply_batch(batch.iter().map(|(r, _)| r)),
        };
        match outcomes {
            Ok(outcomes) => {
                for ((_, reply), outcome) in batch.into_iter().zip(outcomes) {
                    let _ = reply.send(outcome);
                }
            }
            Err(e) => {
                for (_, reply) in batch {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Checks and writes a batch; `Err` fails every request of it.
    fn apply_batch<'r>(
        &mut self,
        requests: impl Iterator<Item = &'r AppendRequest>,
    ) -> Result<Vec<Outcome>, Error> {
        if self.active_len >= self.config.segment_bytes {
            self.roll_segment()?;
        }
        let base_len = self.active_len;
        let base_position = self.next_position;
        let mut txn = self.shared.db.begin_write().map_err(redb_error)?;
        txn.set_durability(redb::Durability::None)
            .map_err(redb_error)?;
        let outcomes = {
            let mut tables = Tables::open(&txn).map_err(redb_error)?;
            let mut reader = RecordReader::new(self.shared.segments.snapshot());
            let mut outcomes = Vec::new();
            for request in requests {
                match self.apply_one(&mut tables, &mut reader, request) {
                    Ok(outcome) => outcomes.push(outcome),
                    Err(e) => {
                        drop(tables);
                        txn.abort().map_err(redb_error)?;
                        return Err(self.undo(base_len, base_position, e));
                    }
                }
            }
            if self.next_position > base_position {
                tables
                    .set_indexed_through(self.next_position)
                    .map_err(redb_error)?;
            }
            outcomes
        };
        if self.next_position == base_position {
            txn.abort().map_err(redb_error)?;
            return Ok(outcomes);
        }
        if self.config.durability == Durability::Fsync
            && let Err(e) = self.active.file.sync_data()
        {
            let _ = txn.abort();
            self.poisoned = Some(format!(
                "fdatasync of {} failed: {e}",
                self.active.path.display()
            ));
            return Err(self.undo(base_len, base_position, Error::Io(e.to_string())));
        }
        if let Err(e) = txn.commit() {
            // The events are on disk but not indexed; the next open indexes them, and a retry
            // with the same ids is answered idempotently.
            self.poisoned = Some(format!("index commit failed: {e}"));
            return Err(Error::Unavailable(format!(
                "index commit failed after the events were written ({e}); they may be stored: \
                 retry with the same event ids after a restart"
            )));
        }
        self.uncheckpointed = true;
        self.active
            .committed_len
            .store(self.active_len, Ordering::Release);
        self.shared
            .head
            .store(self.next_position, Ordering::Release);
        Ok(outcomes)
    }

    /// Cuts the segment back to before the failed batch and turns the error into what the
    /// client sees.
    fn undo(&mut self, base_len: u64, base_position: u64, error: Error) -> Error {
        self.next_position = base_position;
        if let Err(e) = self.active.file.set_len(base_len) {
            self.poisoned = Some(format!(
                "could not cut {} back after a failed write: {e}",
                self.active.path.display()
            ));
        }
        self.active_len = base_len;
        error
    }

    fn roll_segment(&mut self) -> Result<(), Error> {
        let seg_dir = self.shared.dir.join("segments");
        let segment = create_segment(&seg_dir, self.active.ordinal + 1, self.next_position)?;
        let segment = Arc::new(segment);
        self.shared.segments.push(Arc::clone(&segment));
        self.active = segment;
        self.active_len = SEGMENT_HEADER_LEN;
        Ok(())
    }

    fn now(&mut self) -> Timestamp {
        // Recorded times never go backwards along the log, even if the clock does.
        self.last_time = self.last_time.max(self.config.clock.now().0);
        Timestamp(self.last_time)
    }

    /// Checks one request against the state so far and writes it. `Ok(Err(..))` rejects this
    /// request only; `Err(..)` is an I/O failure that fails the batch.
    fn apply_one(
        &mut self,
        tables: &mut Tables<'_>,
        reader: &mut RecordReader,
        request: &AppendRequest,
    ) -> Result<Outcome, Error> {
        if let Some(outcome) = check_idempotency(tables, reader, request)? {
            return Ok(outcome);
        }
        let current = tables
            .streams
            .get(request.stream.as_str())
            .map_err(redb_error)?
            .map(|v| Revision(v.value().0));
        if !request.expected.is_satisfied_by(current) {
            return Ok(Err(Error::WrongExpectedRevision {
                stream: request.stream.clone(),
                expected: request.expected,
                actual: current,
            }));
        }
        if let Some(condition) = &request.condition {
            let from = condition.after.map_or(0, |p| p.0 + 1);
            let indexes = read::Indexes {
                tags: &tables.tags,
                types: &tables.types,
                sparse: &tables.sparse,
            };
            let found =
                read::first_match(&indexes, reader, &condition.query, from, self.next_position)?;
            if let Some(position) = found {
                return Ok(Err(Error::ConditionFailed {
                    position: Position(position),
                }));
            }
        }
        self.write_events(tables, request, current).map(Ok)
    }

    fn write_events(
        &mut self,
        tables: &mut Tables<'_>,
        request: &AppendRequest,
        current: Option<Revision>,
    ) -> Result<AppendResult, Error> {
        let first_revision = current.map_or(0, |r| r.0 + 1);
        let first_position = self.next_position;
        let recorded_at = self.now();
        let category = request.stream.category();
        self.buf.clear();
        let mut offsets = Vec::with_capacity(request.events.len());
        let count = request.events.len();
        for (i, event) in request.events.iter().enumerate() {
            offsets.push(self.active_len + self.buf.len() as u64);
            codec::encode_record(
                &mut self.buf,
                &RecordToWrite {
                    position: first_position + i as u64,
                    revision: first_revision + i as u64,
                    recorded_at,
                    commit: i + 1 == count,
                    stream: &request.stream,
                    event,
                },
            );
        }
        if let Err(e) = self.active.file.write_all_at(&self.buf, self.active_len) {
            let message = format!("writing {}: {e}", self.active.path.display());
            return Err(if e.raw_os_error() == Some(libc::ENOSPC) {
                Error::StorageFull(message)
            } else {
                Error::Io(message)
            });
        }
        self.active_len += self.buf.len() as u64;
        for (i, event) in request.events.iter().enumerate() {
            let position = first_position + i as u64;
            tables
                .insert_event(&IndexEntry {
                    stream: request.stream.as_str(),
                    category: category.as_str(),
                    event_type: event.event_type.as_str(),
                    tags: &event.tags,
                    id: event.id.0.as_bytes(),
                    revision: first_revision + i as u64,
                    position,
                    address: Address::new(self.active.ordinal, offsets[i]),
                    first_in_segment: position == self.active.first_position,
                })
                .map_err(redb_error)?;
        }
        self.next_position += count as u64;
        Ok(AppendResult {
            first_position: Position(first_position),
            last_position: Position(first_position + count as u64 - 1),
            first_revision: Revision(first_revision),
            last_revision: Revision(first_revision + count as u64 - 1),
            replayed: false,
        })
    }
}

/// `Some` when the request's ids are already stored: the original result when it is a whole,
/// identical retry, an error when the ids are reused otherwise. `None` when no id is stored.
fn check_idempotency(
    tables: &Tables<'_>,
    reader: &mut RecordReader,
    request: &AppendRequest,
) -> Result<Option<Outcome>, Error> {
    let mut stored = Vec::new();
    for event in &request.events {
        if let Some(v) = tables.ids.get(event.id.0.as_bytes()).map_err(redb_error)? {
            let (position, address) = v.value();
            stored.push((event, position, Address(address)));
        }
    }
    let Some(&(first_event, first_position, _)) = stored.first() else {
        return Ok(None);
    };
    let reused = |id, position, reason: String| {
        Ok(Some(Err(Error::IdReused {
            id,
            position: Position(position),
            reason,
        })))
    };
    if stored.len() < request.events.len() {
        return reused(
            first_event.id,
            first_position,
            "the append mixes stored and new event ids; resend the original append unchanged, \
             or use new ids"
                .to_owned(),
        );
    }
    let mut revisions = (0, 0);
    for (i, &(event, position, address)) in stored.iter().enumerate() {
        let recorded = read::decode_at(reader, address)?;
        if recorded.stream != request.stream {
            return reused(
                event.id,
                position,
                format!("it belongs to stream {}", recorded.stream),
            );
        }
        if position != first_position + i as u64 {
            return reused(
                event.id,
                position,
                "the ids were stored in a different order or in different appends".to_owned(),
            );
        }
        if let Some(difference) = event.differs_from(&recorded) {
            return reused(event.id, position, difference.to_owned());
        }
        if i == 0 {
            revisions.0 = recorded.revision.0;
        }
        revisions.1 = recorded.revision.0;
    }
    let last_position = first_position + stored.len() as u64 - 1;
    Ok(Some(Ok(AppendResult {
        first_position: Position(first_position),
        last_position: Position(last_position),
        first_revision: Revision(revisions.0),
        last_revision: Revision(revisions.1),
        replayed: true,
    })))
}
