//! The single writer: every append goes through it. It takes whatever requests are queued,
//! checks each against the state left by the ones before it, writes the accepted ones with one
//! `fdatasync` (group commit), publishes the new head, and answers. Index entries go to the
//! active memtable; the flusher thread writes frozen memtables to redb.

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use skald_core::{
    AppendRequest, AppendResult, Clock, Durability, Error, Position, Revision, Timestamp,
};
use tokio::sync::{mpsc, oneshot};

use crate::codec::{self, BatchEnd, RecordToWrite, SEGMENT_HEADER_LEN};
use crate::index::IndexEntry;
use crate::io;
use crate::memtable::{MAX_FROZEN, Memtable};
use crate::recovery::create_segment;
use crate::segments::{Address, RecordReader, Segment};
use crate::view::View;
use crate::{Shared, io_error, read, spoiled_index};

/// The write buffer is written out once it holds this much, so a batch of large events does
/// not hold them all in memory.
const WRITE_BUFFER_BYTES: usize = 4 << 20;
/// Streams whose end the writer remembers as known to match the log (`Writer::verified`); the
/// memory is cleared when it holds this many.
const VERIFIED_STREAMS: usize = 65_536;

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
    pub memtable_events: u64,
    pub clock: Arc<dyn Clock>,
}

pub struct Writer {
    shared: Arc<Shared>,
    config: WriterConfig,
    segment: Arc<Segment>,
    /// The active segment's length including the batch's encoded records not yet written.
    segment_len: u64,
    /// Bytes of the active segment actually written to the file; `buf` holds the rest.
    written_len: u64,
    /// Where the batch being written starts in the active segment: every record of it says so
    /// (docs/storage.md, "Group commits are framed").
    batch_start: u64,
    /// Whether a write to the file was attempted in this batch (so a failure must cut it back).
    wrote_in_batch: bool,
    /// Stream ends (revision, position) known to match the log: written by this writer, or
    /// given by redb and confirmed by the log. The log never changes, so when redb gives the
    /// same end it needs no check; a different one (a damaged page read again) is checked.
    verified: std::collections::HashMap<Box<str>, (u64, u64)>,
    next_position: u64,
    last_time: i64,
    /// The memtable the writer adds to; replaced when it is frozen.
    active: Arc<RwLock<Memtable>>,
    active_since: Instant,
    buf: Vec<u8>,
    /// Joined at shutdown, after the last memtable was handed over.
    flusher: Option<std::thread::JoinHandle<()>>,
}

/// A per-request answer, or the failure of the whole batch.
type Outcome = Result<AppendResult, Error>;

impl Writer {
    pub fn new(
        shared: Arc<Shared>,
        config: WriterConfig,
        next_position: u64,
        flusher: std::thread::JoinHandle<()>,
    ) -> Self {
        let segment = shared.segments.last();
        let segment_len = segment.committed_len.load(Ordering::Acquire);
        let active = Arc::clone(&shared.mem.state.lock().expect("memtable lock").active);
        Self {
            shared,
            config,
            segment,
            segment_len,
            written_len: segment_len,
            batch_start: segment_len,
            wrote_in_batch: false,
            verified: std::collections::HashMap::new(),
            next_position,
            last_time: i64::MIN,
            active,
            active_since: Instant::now(),
            buf: Vec::with_capacity(1 << 20),
            flusher: Some(flusher),
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
                    self.freeze_if_due(true);
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
            self.freeze_if_due(false);
        }
        // Refuse what is still queued; then make the index durable so the next open is fast.
        commands.close();
        while let Ok(Command::Append { reply, .. }) = commands.try_recv() {
            let _ = reply.send(Err(Error::Unavailable("the store is shutting down".into())));
        }
        // Hand everything to the flusher and wait until it is in redb, so the next open
        // has nothing to replay.
        self.freeze();
        self.shared.mem.state.lock().expect("memtable lock").closing = true;
        self.shared.mem.changed.notify_all();
        if let Some(flusher) = self.flusher.take() {
            let _ = flusher.join();
        }
        if let Some(done) = done_on_exit {
            let _ = done.send(());
        }
    }

    /// Freezes the active memtable when it is full, or when the checkpoint interval passed
    /// (`idle`: no append is waiting), so that the flusher makes the index durable.
    fn freeze_if_due(&mut self, idle: bool) {
        let len = self.active.read().expect("memtable lock").len();
        let aged = self.active_since.elapsed() >= self.config.checkpoint_interval;
        if len >= self.config.memtable_events || (len > 0 && (aged || idle)) {
            self.freeze();
        }
    }

    /// Moves the active memtable to the flusher's queue and starts a new one, waiting while
    /// the queue is full (back-pressure that bounds memory).
    fn freeze(&mut self) {
        if self.active.read().expect("memtable lock").len() == 0 {
            return;
        }
        let mem = &self.shared.mem;
        let mut state = mem.state.lock().expect("memtable lock");
        while state.frozen.len() >= MAX_FROZEN {
            if state.failed.is_some() {
                // The flusher is failing: keep indexing into the active memtable; appends are
                // refused once it is full too (see `apply_batch`).
                return;
            }
            state = mem.changed.wait(state).expect("memtable lock");
        }
        let fresh = Arc::new(RwLock::new(Memtable::new(self.next_position)));
        let full = std::mem::replace(&mut state.active, Arc::clone(&fresh));
        state.frozen.push_back(full);
        self.active = fresh;
        self.active_since = Instant::now();
        mem.changed.notify_all();
    }

    fn write_batch(&mut self, batch: Vec<(AppendRequest, oneshot::Sender<Outcome>)>) {
        let poisoned = self.shared.poisoned.lock().expect("poison lock").clone();
        let outcomes = match &poisoned {
            Some(reason) => Err(Error::Unavailable(format!(
                "appends are refused until a restart: {reason}; reads still work"
            ))),
            None => {
                let mut decided = self.apply_batch(batch.iter().map(|(r, _)| r));
                // A failed index flush spoiled the handle while the batch was being decided:
                // nothing of it is published and the file was cut back, so decide it again on
                // a fresh handle.
                for _ in 0..SPOILED_RETRIES {
                    match &decided {
                        Err(e) if spoiled_index(e) => {
                            decided = self.apply_batch(batch.iter().map(|(r, _)| r));
                        }
                        _ => break,
                    }
                }
                decided
            }
        };
        if let Err(e @ Error::Corruption { reason, .. }) = &outcomes
            && read::is_index_damage(e)
        {
            // Whatever found it, the index may have decided other appends wrongly: none until
            // a restart rebuilds it.
            self.poison(reason.clone());
            self.shared.index_is_damaged(reason);
        }
        match outcomes {
            Ok(outcomes) => {
                for ((_, reply), outcome) in batch.into_iter().zip(outcomes) {
                    self.shared.metrics.count_outcome(&outcome);
                    let _ = reply.send(outcome);
                }
            }
            Err(e) => {
                for (_, reply) in batch {
                    let outcome = Err(e.clone());
                    self.shared.metrics.count_outcome(&outcome);
                    let _ = reply.send(outcome);
                }
            }
        }
    }

    /// Checks and writes a batch; `Err` fails every request of it.
    fn apply_batch<'r>(
        &mut self,
        requests: impl Iterator<Item = &'r AppendRequest>,
    ) -> Result<Vec<Outcome>, Error> {
        {
            let state = self.shared.mem.state.lock().expect("memtable lock");
            let active_len = self.active.read().expect("memtable lock").len();
            if let Some(error) = &state.failed
                && state.frozen.len() >= MAX_FROZEN
                && active_len >= self.config.memtable_events
            {
                // Memory for index entries is used up until the flusher succeeds again.
                return Err(match error {
                    Error::StorageFull(m) => {
                        Error::StorageFull(format!("the index cannot be written: {m}"))
                    }
                    other => Error::Unavailable(format!("the index cannot be written: {other}")),
                });
            }
        }
        if self.segment_len >= self.config.segment_bytes {
            self.roll_segment()?;
        }
        let base_len = self.segment_len;
        let base_position = self.next_position;
        debug_assert_eq!(
            self.written_len, self.segment_len,
            "the buffer is empty between batches"
        );
        debug_assert_eq!(self.shared.head.load(Ordering::Acquire), base_position);
        self.batch_start = base_len;
        self.wrote_in_batch = false;
        let mut view = View::open(
            &self.shared.index,
            self.shared.mem.snapshot(),
            base_position,
        )?;
        let mut reader = RecordReader::new(self.shared.segments.snapshot());
        let mut outcomes = Vec::new();
        for request in requests {
            // The writer sees everything it wrote, including this batch's earlier appends.
            view.end = self.next_position;
            match self.apply_one(&view, &mut reader, request) {
                Ok(outcome) => outcomes.push(outcome),
                Err(e) => return Err(self.undo(base_len, base_position, e)),
            }
        }
        if self.next_position == base_position {
            return Ok(outcomes);
        }
        self.end_batch(base_position);
        if let Err(e) = self.write_pending() {
            return Err(self.undo(base_len, base_position, e));
        }
        if self.config.durability == Durability::Fsync {
            let started = Instant::now();
            let synced = self.segment.sync();
            self.shared
                .metrics
                .fsync_seconds
                .observe_duration(started.elapsed());
            if let Err(e) = synced {
                let reason = format!("fdatasync of {} failed: {e}", self.segment.path.display());
                self.poison(reason.clone());
                let unknown = Error::Unavailable(format!(
                    "{reason}; the events of this request may or may not be stored: after a \
                     restart, retry with the same event ids to find out"
                ));
                return Err(self.undo(base_len, base_position, unknown));
            }
        }
        self.publish(base_len, base_position);
        Ok(outcomes)
    }

    /// Closes the batch with its batch end, in the buffer.
    fn end_batch(&mut self, base_position: u64) {
        let before = self.buf.len();
        codec::encode_batch_end(
            &mut self.buf,
            &BatchEnd {
                unsynced: self.config.durability == Durability::None,
                batch_start: self.batch_start,
                first_position: base_position,
                end_position: self.next_position,
            },
        );
        self.segment_len += (self.buf.len() - before) as u64;
    }

    /// Makes a durable batch visible: the segment's readable length, then the head.
    fn publish(&mut self, base_len: u64, base_position: u64) {
        assert_eq!(
            self.written_len, self.segment_len,
            "a batch is published only once all of it is written"
        );
        let written = self.next_position - base_position;
        assert_eq!(
            self.active.read().expect("memtable lock").end,
            self.next_position,
            "the memtable covers every event written"
        );
        let metrics = &self.shared.metrics;
        metrics.store.batch_events.observe(written as f64);
        metrics.store.events_written.add(written);
        metrics.bytes_written.add(self.segment_len - base_len);
        self.segment
            .committed_len
            .store(self.segment_len, Ordering::Release);
        let previous = self.shared.head.swap(self.next_position, Ordering::AcqRel);
        assert_eq!(
            previous, base_position,
            "the head moves only by whole batches"
        );
        self.shared.head_watch.send_replace(self.next_position);
    }

    /// Refuses appends until a restart, and says why to readiness checks.
    fn poison(&mut self, reason: String) {
        self.shared.poison(reason);
    }

    /// Cuts the segment back to before the failed batch, syncs the cut (so that a crash cannot
    /// bring back what was answered as not stored), and turns the error into what the client
    /// sees.
    fn undo(&mut self, base_len: u64, base_position: u64, error: Error) -> Error {
        if self.next_position > base_position {
            // Ends of events that are no longer written: forget them all (a rare path).
            self.verified.clear();
        }
        self.next_position = base_position;
        self.active
            .write()
            .expect("memtable lock")
            .rollback(base_position);
        let written = self.wrote_in_batch;
        self.segment_len = base_len;
        self.written_len = base_len;
        self.buf.clear();
        if !written {
            return error;
        }
        let segment = &self.segment;
        match segment.file.set_len(base_len).and_then(|()| segment.sync()) {
            Ok(()) => error,
            Err(e) => {
                let reason = format!(
                    "could not cut {} back after a failed write: {e}",
                    self.segment.path.display()
                );
                self.poison(reason.clone());
                Error::Unavailable(format!(
                    "{error}; then {reason}: the events of this request may or may not be \
                     stored; after a restart, retry with the same event ids to find out"
                ))
            }
        }
    }

    fn roll_segment(&mut self) -> Result<(), Error> {
        if self.config.durability == Durability::None {
            // Recovery trusts a segment that a later one follows to be whole: make it so, even
            // when appends do not wait for the disk.
            if let Err(e) = self.segment.sync() {
                let reason = format!("fdatasync of {} failed: {e}", self.segment.path.display());
                self.poison(reason.clone());
                return Err(Error::Unavailable(reason));
            }
        }
        let seg_dir = self.shared.dir.join("segments");
        let segment = create_segment(
            self.shared.fs.as_ref(),
            &seg_dir,
            self.segment.ordinal + 1,
            self.next_position,
        )?;
        let segment = Arc::new(segment);
        self.shared.segments.push(Arc::clone(&segment));
        self.segment = segment;
        self.segment_len = SEGMENT_HEADER_LEN;
        self.written_len = SEGMENT_HEADER_LEN;
        Ok(())
    }

    /// Writes the batch's encoded records that are still only in the buffer.
    fn write_pending(&mut self) -> Result<(), Error> {
        if self.buf.is_empty() {
            return Ok(());
        }
        self.wrote_in_batch = true;
        if let Err(e) = io::write_all_at(self.segment.file.as_ref(), &self.buf, self.written_len) {
            // Whatever part was written is cut back by `undo`.
            return Err(io_error(&self.segment.path, e));
        }
        self.written_len += self.buf.len() as u64;
        debug_assert_eq!(self.written_len, self.segment_len);
        self.buf.clear();
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
        view: &View,
        reader: &mut RecordReader,
        request: &AppendRequest,
    ) -> Result<Outcome, Error> {
        if let Some(outcome) = check_idempotency(view, reader, request, || self.write_pending())? {
            return Ok(outcome);
        }
        let end = view.stream_end(request.stream.as_str())?;
        match end {
            Some((revision, position, true)) => {
                self.check_index_against_log(view, reader, request, revision, position)?;
            }
            None => self.check_stream_is_new(view, request)?,
            Some(_) => {}
        }
        let current = end.map(|(revision, _, _)| Revision(revision));
        if !request.expected.is_satisfied_by(current) {
            return Ok(Err(Error::WrongExpectedRevision {
                stream: request.stream.clone(),
                expected: request.expected,
                actual: current,
            }));
        }
        if let Some(condition) = &request.condition {
            // The check may read this batch's earlier records back from the file.
            self.write_pending()?;
            let from = condition.after.map_or(0, |p| p.0 + 1);
            match read::first_match(view, reader, &condition.query, from)? {
                Ok(Some(position)) => {
                    return Ok(Err(Error::ConditionFailed {
                        position: Position(position),
                    }));
                }
                Ok(None) => {}
                Err(refused) => return Ok(Err(refused)),
            }
        }
        self.write_events(request, current).map(Ok)
    }

    /// Checks what the index (redb) says of a stream's end against the log: the record it
    /// points at must be that stream's event at that revision and position, and the index must
    /// hold nothing after it. A disagreement means a damaged index: appends are refused until a
    /// restart, which rebuilds it (docs/storage.md, "Index damage").
    fn check_index_against_log(
        &mut self,
        view: &View,
        reader: &mut RecordReader,
        request: &AppendRequest,
        revision: u64,
        position: u64,
    ) -> Result<(), Error> {
        let stream = request.stream.as_str();
        if self.verified.get(stream) == Some(&(revision, position)) {
            return Ok(());
        }
        let disagreement = match view.indexed_address(stream, revision)? {
            None => Some(format!("it has no address for revision {revision}")),
            Some(address) => match read::decode_at(reader, address) {
                Err(e) => Some(format!("the record it points at cannot be read: {e}")),
                Ok(e)
                    if e.stream.as_str() != stream
                        || e.revision.0 != revision
                        || e.position.0 != position =>
                {
                    Some(format!(
                        "the record it points at is stream {} revision {} at position {}",
                        e.stream, e.revision, e.position
                    ))
                }
                Ok(_) => view
                    .indexed_address(stream, revision + 1)?
                    .map(|_| format!("it also holds revision {}", revision + 1)),
            },
        };
        let Some(disagreement) = disagreement else {
            self.remember_end(stream, revision, position);
            return Ok(());
        };
        let reason = format!(
            "the index says stream {stream} ends at revision {revision} (position {position}), \
             but {disagreement}; appends are refused until a restart, which rebuilds the index"
        );
        self.poison(reason.clone());
        self.shared.index_is_damaged(&reason);
        Err(Error::Corruption {
            file: self
                .shared
                .dir
                .join(crate::index::INDEX_FILE)
                .display()
                .to_string(),
            offset: 0,
            reason,
        })
    }

    /// redb says the stream has no events: check that the writer wrote none since open and
    /// that the index has no first revision either (a damaged `streams` table would otherwise
    /// let revision 0 be written twice).
    fn check_stream_is_new(&mut self, view: &View, request: &AppendRequest) -> Result<(), Error> {
        let stream = request.stream.as_str();
        let disagreement = if let Some((revision, _)) = self.verified.get(stream) {
            Some(format!("this process wrote its revision {revision}"))
        } else {
            view.indexed_address(stream, 0)?
                .map(|_| "the index holds its revision 0".to_owned())
        };
        let Some(disagreement) = disagreement else {
            return Ok(());
        };
        let reason = format!(
            "the index says stream {stream} has no events, but {disagreement}; appends are \
             refused until a restart, which rebuilds the index"
        );
        self.poison(reason.clone());
        self.shared.index_is_damaged(&reason);
        Err(Error::Corruption {
            file: self
                .shared
                .dir
                .join(crate::index::INDEX_FILE)
                .display()
                .to_string(),
            offset: 0,
            reason,
        })
    }

    /// Remembers a stream end known to match the log.
    fn remember_end(&mut self, stream: &str, revision: u64, position: u64) {
        if let Some(end) = self.verified.get_mut(stream) {
            *end = (revision, position);
            return;
        }
        if self.verified.len() >= VERIFIED_STREAMS {
            self.verified.clear();
        }
        self.verified.insert(stream.into(), (revision, position));
    }

    fn write_events(
        &mut self,
        request: &AppendRequest,
        current: Option<Revision>,
    ) -> Result<AppendResult, Error> {
        let first_revision = current.map_or(0, |r| r.0 + 1);
        let first_position = self.next_position;
        let recorded_at = self.now();
        let category = request.stream.category();
        if self.buf.len() >= WRITE_BUFFER_BYTES {
            self.write_pending()?;
        }
        let start = self.buf.len();
        let mut offsets = Vec::with_capacity(request.events.len());
        let count = request.events.len();
        for (i, event) in request.events.iter().enumerate() {
            offsets.push(self.segment_len + (self.buf.len() - start) as u64);
            codec::encode_record(
                &mut self.buf,
                &RecordToWrite {
                    position: first_position + i as u64,
                    revision: first_revision + i as u64,
                    recorded_at,
                    commit: i + 1 == count,
                    unsynced: self.config.durability == Durability::None,
                    batch_start: self.batch_start,
                    stream: &request.stream,
                    event,
                },
            );
        }
        self.segment_len += (self.buf.len() - start) as u64;
        let mut memtable = self.active.write().expect("memtable lock");
        for (i, event) in request.events.iter().enumerate() {
            let position = first_position + i as u64;
            memtable.insert(&IndexEntry {
                stream: request.stream.as_str(),
                category: category.as_str(),
                event_type: event.event_type.as_str(),
                tags: &event.tags,
                id: event.id.0.as_bytes(),
                revision: first_revision + i as u64,
                position,
                address: Address::new(self.segment.ordinal, offsets[i]),
                first_in_segment: position == self.segment.first_position,
            });
        }
        drop(memtable);
        self.next_position += count as u64;
        let last = count as u64 - 1;
        self.remember_end(
            request.stream.as_str(),
            first_revision + last,
            first_position + last,
        );
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
    view: &View,
    reader: &mut RecordReader,
    request: &AppendRequest,
    write_pending: impl FnOnce() -> Result<(), Error>,
) -> Result<Option<Outcome>, Error> {
    let mut stored = Vec::new();
    for event in &request.events {
        if let Some((position, address)) = view.id(event.id.0.as_bytes())? {
            stored.push((event, position, address));
        }
    }
    let Some(&(first_event, first_position, _)) = stored.first() else {
        return Ok(None);
    };
    let reused = |id, position, reason: String, stream: &skald_core::StreamName| {
        Ok(Some(Err(Error::IdReused {
            id,
            position: Position(position),
            reason,
            stream: Some(stream.clone()),
        })))
    };
    // The stored events may be this batch's, still in the write buffer.
    write_pending()?;
    let mut revisions = (0, 0);
    for (i, &(event, position, address)) in stored.iter().enumerate() {
        let key = format!("event {}", event.id);
        let recorded = read::decode_index_target(reader, address, &key)?;
        if recorded.id != event.id || recorded.position.0 != position {
            return Err(read::index_disagrees(
                address,
                format!(
                    "event {} at position {position}, but the record there is event {} at \
                     position {}",
                    event.id, recorded.id, recorded.position
                ),
            ));
        }
        if stored.len() < request.events.len() {
            return reused(
                first_event.id,
                first_position,
                "the append mixes stored and new event ids; resend the original append \
                 unchanged, or use new ids"
                    .to_owned(),
                &recorded.stream,
            );
        }
        if recorded.stream != request.stream {
            return reused(
                event.id,
                position,
                format!("it belongs to stream {}", recorded.stream),
                &recorded.stream,
            );
        }
        if position != first_position + i as u64 {
            return reused(
                event.id,
                position,
                "the ids were stored in a different order or in different appends".to_owned(),
                &recorded.stream,
            );
        }
        if let Some(difference) = event.differs_from(&recorded) {
            return reused(event.id, position, difference.to_owned(), &recorded.stream);
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

/// How often the flusher looks whether a failed flush may be retried.
const FLUSH_RETRY: Duration = Duration::from_millis(500);
/// How long a flush that met a full disk waits before it is retried, when free space cannot be
/// known.
const FLUSH_RETRY_MAX: Duration = Duration::from_secs(10);
/// How many times a batch is decided on a fresh index handle after a failed flush spoiled the
/// one it used.
const SPOILED_RETRIES: usize = 3;

/// The flusher: writes each frozen memtable into redb as one sorted, durable transaction, then
/// drops it. A flush that meets a full disk is retried once there is room; one whose handle
/// another thread's read error spoiled is retried at once on a fresh handle; anything else (a
/// failed `fdatasync` of the index, damage, a panic in redb) condemns the index until a restart
/// rebuilds it, because opening it again could read pages the disk never got. It stops when
/// the store closes and nothing is left to flush (or a flush fails during shutdown).
pub fn run_flusher(shared: Arc<Shared>) {
    let mem = &shared.mem;
    loop {
        let next = {
            let mut state = mem.state.lock().expect("memtable lock");
            loop {
                if let Some(front) = state.frozen.front() {
                    break Arc::clone(front);
                }
                if state.closing {
                    return;
                }
                state = mem.changed.wait(state).expect("memtable lock");
            }
        };
        let outcome = flush_one(&shared, &next.read().expect("memtable lock"));
        let mut state = mem.state.lock().expect("memtable lock");
        match outcome {
            Ok(()) => {
                state.frozen.pop_front();
                state.failed = None;
            }
            Err(failure) => {
                state.failed = Some(failure.error().clone());
                mem.changed.notify_all();
                // At shutdown, give up; the next open replays these events from the segments.
                if state.closing {
                    return;
                }
                state = match failure {
                    FlushFailure::NeedsRoom(_) => wait_for_room(&shared, state),
                    FlushFailure::Spoiled(_) => {
                        mem.changed
                            .wait_timeout(state, FLUSH_RETRY)
                            .expect("memtable lock")
                            .0
                    }
                    FlushFailure::Condemned(_) => {
                        while !state.closing {
                            state = mem.changed.wait(state).expect("memtable lock");
                        }
                        state
                    }
                };
                if state.closing {
                    return;
                }
            }
        }
        drop(state);
        mem.changed.notify_all();
    }
}

/// Why a flush failed, and so what comes next.
enum FlushFailure {
    /// The disk is full: retried once it has more room.
    NeedsRoom(Error),
    /// The handle was spoiled by someone else's I/O error: retried on a fresh one.
    Spoiled(Error),
    /// The index cannot be trusted until a restart rebuilds it.
    Condemned(Error),
}

impl FlushFailure {
    fn error(&self) -> &Error {
        match self {
            Self::NeedsRoom(e) | Self::Spoiled(e) | Self::Condemned(e) => e,
        }
    }
}

/// Writes one memtable into redb, durably. With durability `none` the segments its events are
/// in are synced first: the index covers only synced events, whatever the durability.
fn flush_one(shared: &Shared, memtable: &Memtable) -> Result<(), FlushFailure> {
    if shared.durability == Durability::None
        && let Some((first, last)) = memtable.ordinals()
    {
        let segments = shared.segments.snapshot();
        for segment in &segments[first as usize..=(last as usize).min(segments.len() - 1)] {
            if let Err(e) = segment.sync() {
                // As after a failed fdatasync in the writer: Linux may have marked the pages
                // clean without writing them, and the writer's next fdatasync of this file
                // would succeed. Nothing more may be appended behind them.
                let reason = format!("fdatasync of {} failed: {e}", segment.path.display());
                shared.poison(reason.clone());
                return Err(condemn(shared, &reason));
            }
        }
    }
    if let Some(disk) = shared.fs.disk_space(&shared.dir)
        && crate::metrics::disk_low(&disk)
    {
        // A commit that meets a full disk spoils the handle every reader shares: do not try
        // one until there is room.
        return Err(FlushFailure::NeedsRoom(Error::StorageFull(format!(
            "only {} KiB free on the disk of {}",
            disk.free >> 10,
            shared.dir.display()
        ))));
    }
    let db = shared.index.get();
    let committed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        memtable.commit_raw(&db, true)
    }));
    let error = match committed {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(e)) => e,
        Err(_panic) => return Err(condemn(shared, "redb panicked while writing the index")),
    };
    let full = matches!(&error, redb::Error::Io(e) if e.raw_os_error() == Some(libc::ENOSPC));
    if shared.index.sync_failed() || !(full || matches!(error, redb::Error::PreviousIo)) {
        return Err(condemn(shared, &format!("index: {error}")));
    }
    // redb refuses every later call on a handle that met an I/O error: open it again, at its
    // last durable commit, for the retry and for readers.
    let _ = shared.index.replace(&db);
    let error = crate::redb_error(error);
    Err(if full {
        FlushFailure::NeedsRoom(error)
    } else {
        FlushFailure::Spoiled(error)
    })
}

/// Marks the index unusable until a restart, which rebuilds it.
fn condemn(shared: &Shared, reason: &str) -> FlushFailure {
    shared.index.condemn(reason);
    shared.index_is_damaged(reason);
    FlushFailure::Condemned(Error::Unavailable(format!(
        "the index cannot be written ({reason}); restart to rebuild it"
    )))
}

/// After a flush that met a full disk: waits until the disk is no longer low (the threshold
/// readiness uses), or, when free space cannot be known, `FLUSH_RETRY_MAX`. Every failed commit
/// spoils the handle readers and the writer share, so a full disk is not retried at the first
/// page that frees up.
fn wait_for_room<'m>(
    shared: &Shared,
    mut state: std::sync::MutexGuard<'m, crate::memtable::MemState>,
) -> std::sync::MutexGuard<'m, crate::memtable::MemState> {
    let failed_at = Instant::now();
    loop {
        let (s, _) = shared
            .mem
            .changed
            .wait_timeout(state, FLUSH_RETRY)
            .expect("memtable lock");
        state = s;
        let room = match shared.fs.disk_space(&shared.dir) {
            Some(disk) => !crate::metrics::disk_low(&disk),
            None => failed_at.elapsed() >= FLUSH_RETRY_MAX,
        };
        if state.closing || room {
            return state;
        }
    }
}
