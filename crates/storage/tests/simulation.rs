//! The seeded simulation, in the spirit of TigerBeetle's VOPR and FoundationDB's simulation:
//! random appends (every kind of expected revision, DCB conditions, idempotent retries, reused
//! ids), reads, clean reopens, crashes at injected points followed by a restart that is a
//! `kill -9` or a power loss, failed fdatasyncs, full disks and short reads, all on the
//! simulated file system, checked against the in-memory model after every step.
//!
//! After a crash every acknowledged event must be there, unchanged, at its position; the one
//! append in flight at the crash may be there whole or not at all; nothing else may appear.
//!
//! `SKALD_SIM_SEEDS` (default 24) seeds of `SKALD_SIM_STEPS` (default 160) steps run; a failing
//! seed is printed and `SKALD_SIM_SEED=N` runs it alone. A longer run:
//! `SKALD_SIM_SEEDS=2000 cargo test --release -p skald-storage --test simulation`.
//! The flusher runs on its own thread, so when an index flush lands varies between runs; what
//! the store answers and holds does not, so a seed replays the same operations and faults.

use std::path::PathBuf;
use std::sync::Arc;

use skald_core::*;
use skald_storage::io::Fs;
use skald_storage::sim::{Action, Fault, Op, PowerLoss, Restart, SimFs};
use skald_storage::{Options, Store};

mod support;
use support::{FixedClock, ItemSpec, Model, STREAMS, TAGS, TYPES, query, same_error};

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn seeded_simulation() {
    let steps = env_u64("SKALD_SIM_STEPS", 160);
    let seeds: Vec<u64> = match std::env::var("SKALD_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("SKALD_SIM_SEED is a number")],
        Err(_) => (0..env_u64("SKALD_SIM_SEEDS", 24)).collect(),
    };
    for seed in seeds {
        let outcome = std::panic::catch_unwind(|| Simulation::new(seed).run(steps));
        if let Err(panic) = outcome {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            panic!(
                "seed {seed} failed: {message}\nreplay it with SKALD_SIM_SEED={seed} cargo test \
                 -p skald-storage --test simulation"
            );
        }
    }
}

struct Simulation {
    rng: Rng,
    runtime: tokio::runtime::Runtime,
    fs: SimFs,
    store: Option<Store>,
    model: Model,
    /// Acknowledged appends, for idempotent retries.
    sent: Vec<AppendRequest>,
    /// What happened so far, printed when a check fails.
    trace: Vec<String>,
    /// Every fourth seed runs with durability `none`, every third without the index check at
    /// open.
    options: Options,
    /// Whether an `fdatasync` was failed since the last restart: with durability `none` the
    /// kernel may then have dropped acknowledged events, whatever ends the process.
    sync_failed: bool,
}

fn options_for(seed: u64) -> Options {
    Options {
        data_dir: PathBuf::from("/data"),
        // Small segments and memtables, so that runs cross segment rolls and index flushes.
        segment_bytes: 4096,
        memtable_events: 4,
        durability: if seed % 4 == 3 {
            Durability::None
        } else {
            Durability::Fsync
        },
        verify_index_on_open: seed % 3 != 2,
        ..Options::default()
    }
}

/// An append in a line: stream, expectation, condition, events (type and id).
fn describe(r: &AppendRequest) -> String {
    let events: Vec<String> = r
        .events
        .iter()
        .map(|e| format!("{}#{}", e.event_type, &e.id.to_string()[24..]))
        .collect();
    format!(
        "{} expecting {:?}{} [{}]",
        r.stream,
        r.expected,
        if r.condition.is_some() {
            " with a condition"
        } else {
            ""
        },
        events.join(", ")
    )
}

/// The one append whose outcome is unknown (it was in flight when the process died, or its
/// fdatasync failed), with what it was answered.
type InFlight = Option<(AppendRequest, Error)>;

impl Simulation {
    fn new(seed: u64) -> Self {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let mut sim = Self {
            rng: Rng(seed),
            runtime,
            fs: SimFs::new(),
            store: None,
            model: Model::default(),
            sent: Vec::new(),
            trace: Vec::new(),
            options: options_for(seed),
            sync_failed: false,
        };
        sim.trace.push(format!(
            "durability {:?}, index check at open {}",
            sim.options.durability, sim.options.verify_index_on_open
        ));
        sim.open();
        sim
    }

    fn fail(&self, what: String) -> ! {
        let keep = std::env::var("SKALD_SIM_TRACE").map_or(12, |v| v.parse().unwrap_or(12));
        let tail: Vec<&String> = self.trace.iter().rev().take(keep).collect();
        let dir = self.options.data_dir.join("segments");
        let files: Vec<String> = self
            .fs
            .list_dir(&dir)
            .unwrap_or_default()
            .into_iter()
            .map(|name| {
                let len = self.fs.contents(&dir.join(&name)).map_or(0, |c| c.len());
                format!("{name}: {len} bytes")
            })
            .collect();
        panic!("{what}\nsegments: {files:?}\nlast steps, newest first: {tail:#?}");
    }

    fn open(&mut self) {
        let opened = Store::open_with(
            self.options.clone(),
            Arc::new(FixedClock),
            Arc::new(self.fs.clone()),
        );
        match opened {
            Ok((store, report)) => {
                if !report.notes.is_empty() {
                    self.trace.push(format!("opened: {:?}", report.notes));
                }
                self.store = Some(store);
            }
            Err(e) => self.fail(format!("the store does not open: {e}")),
        }
    }

    fn store(&self) -> &Store {
        self.store.as_ref().expect("the store is open")
    }

    fn run(mut self, steps: u64) {
        for step in 0..steps {
            match self.rng.below(100) {
                0..55 => self.append_step(),
                55..68 => self.read_step(),
                68..72 => self.reopen(),
                72..82 => self.crash_step(),
                82..88 => self.failed_fsync_step(),
                88..91 => self.index_fault_step(),
                91..96 => self.full_disk_step(),
                _ => self.short_reads_step(),
            }
            self.check(step);
        }
        if let Some(store) = self.store.take() {
            self.runtime.block_on(store.shutdown());
        }
    }

    fn random_append(&mut self) -> AppendRequest {
        if self.rng.chance(15) && !self.sent.is_empty() {
            let i = self.rng.index(self.sent.len());
            return self.sent[i].clone();
        }
        let stream = StreamName::new(STREAMS[self.rng.index(STREAMS.len())]).unwrap();
        let current = self.model.last_revision(&stream);
        let expected = match self.rng.below(7) {
            0 => ExpectedRevision::Any,
            1 => ExpectedRevision::NoStream,
            2 => ExpectedRevision::StreamExists,
            3 => ExpectedRevision::Exact(Revision(self.rng.below(6))),
            _ => current.map_or(ExpectedRevision::NoStream, ExpectedRevision::Exact),
        };
        let count = 1 + self.rng.index(3);
        let pad = [0, 40, 400, 1500][self.rng.index(4)];
        let mut events: Vec<ProposedEvent> = (0..count)
            .map(|i| {
                let mut e = ProposedEvent::new(
                    EventType::new(TYPES[self.rng.index(TYPES.len())]).unwrap(),
                    EventData::json(format!(
                        "{{\"n\":{i},\"at\":{},\"pad\":\"{}\"}}",
                        self.model.log.len(),
                        "x".repeat(pad)
                    ))
                    .unwrap(),
                );
                let mut tags: Vec<Tag> = (0..self.rng.index(3))
                    .map(|_| Tag::new(TAGS[self.rng.index(TAGS.len())]).unwrap())
                    .collect();
                tags.sort_by(|a, b| a.as_str().cmp(b.as_str()));
                tags.dedup();
                e.tags = tags;
                e
            })
            .collect();
        if self.rng.chance(8) && !self.model.log.is_empty() {
            events[0].id = self.model.log[self.rng.index(self.model.log.len())].id;
        }
        let condition = self.rng.chance(25).then(|| {
            let items: Vec<ItemSpec> = (0..1 + self.rng.index(2))
                .map(|_| ItemSpec {
                    types: (0..self.rng.index(3))
                        .map(|_| self.rng.index(TYPES.len()))
                        .collect(),
                    tags: (0..self.rng.index(3))
                        .map(|_| self.rng.index(TAGS.len()))
                        .collect(),
                })
                .collect();
            let after = self
                .rng
                .chance(50)
                .then(|| Position(self.rng.below(self.model.log.len() as u64 + 2)));
            AppendCondition {
                query: query(&items),
                after,
            }
        });
        AppendRequest {
            stream,
            expected,
            condition,
            events,
        }
    }

    /// One append, compared with the model.
    fn append_step(&mut self) {
        let request = self.random_append();
        let expected = self.model.append(&request);
        let actual = self.runtime.block_on(self.store().append(request.clone()));
        self.trace.push(format!(
            "append {}: {:?}",
            describe(&request),
            actual.as_ref().map(|r| r.first_position)
        ));
        match (&expected, &actual) {
            (Ok(a), Ok(b)) if a == b => {}
            (Err(a), Err(b)) if same_error(a, b) => {}
            _ => self.fail(format!(
                "append {}: model {expected:?}, store {actual:?}",
                describe(&request)
            )),
        }
        if expected.is_ok() {
            self.sent.push(request);
        }
    }

    fn read_step(&mut self) {
        let limit = [1, 3, 100, MAX_READ_PAGE][self.rng.index(4)];
        let from = self.rng.chance(50).then(|| self.rng.below(40));
        let source = match self.rng.below(4) {
            0 => ReadSource::Stream(StreamName::new(STREAMS[self.rng.index(4)]).unwrap()),
            1 => ReadSource::All(None),
            2 => ReadSource::Category(
                Category::new(["order", "user", "audit"][self.rng.index(3)]).unwrap(),
            ),
            _ => ReadSource::Query(query(&[ItemSpec {
                types: vec![self.rng.index(TYPES.len())],
                tags: vec![self.rng.index(TAGS.len())],
            }])),
        };
        let backward = matches!(source, ReadSource::Stream(_)) && self.rng.chance(40);
        let request = ReadRequest {
            source,
            from,
            direction: if backward {
                Direction::Backward
            } else {
                Direction::Forward
            },
            limit,
        };
        self.compare_read(request);
    }

    fn compare_read(&self, request: ReadRequest) {
        let expected = self.model.read(&request);
        match self.runtime.block_on(self.store().read(request.clone())) {
            Ok(actual) if actual == expected => {}
            other => self.fail(format!(
                "read {request:?}: model {expected:?}, store {other:?}"
            )),
        }
    }

    fn reopen(&mut self) {
        self.trace.push("clean reopen".to_owned());
        let store = self.store.take().expect("open");
        self.runtime.block_on(store.shutdown());
        drop(store);
        self.open();
    }

    /// A crash at an injected point while appends run, then a restart that is a kill -9 or a
    /// power loss.
    fn crash_step(&mut self) {
        let fault = match self.rng.below(6) {
            0 => Fault::once(Op::Sync, ".seg", self.rng.below(2), Action::Crash),
            1 => Fault::once(
                Op::Write,
                ".seg",
                self.rng.below(2),
                Action::TearAndCrash(self.rng.index(3000)),
            ),
            2 => Fault::once(Op::SyncDir, "", self.rng.below(2), Action::Crash),
            3 => Fault::once(Op::Write, "index.redb", self.rng.below(4), Action::Crash),
            4 => Fault::once(Op::SetLen, "", 0, Action::Crash),
            _ => Fault::once(Op::Namespace, "", 0, Action::Crash),
        };
        self.trace.push(format!("crash at {fault:?}"));
        self.fs.inject(fault);
        let count = 1 + self.rng.index(3);
        let in_flight = self.appends_until_the_crash(count);
        self.restart(in_flight);
    }

    /// Appends until one fails; returns the failed one, whose outcome is unknown. Appends the
    /// model rejects are not in flight: they write nothing whatever happens.
    fn appends_until_the_crash(&mut self, count: usize) -> InFlight {
        for _ in 0..count {
            let request = self.random_append();
            let mut model = self.model.clone();
            let expected = model.append(&request);
            let actual = self.runtime.block_on(self.store().append(request.clone()));
            self.trace.push(format!(
                "append {} under a fault: {:?}",
                describe(&request),
                actual.as_ref().map(|r| r.first_position)
            ));
            match (&expected, &actual) {
                (Ok(a), Ok(b)) if a == b => {
                    self.model = model;
                    self.sent.push(request);
                }
                (Err(a), Err(b)) if same_error(a, b) => {}
                (Ok(_), Err(e)) => return Some((request, e.clone())),
                (Err(_), Err(_)) => return None,
                _ => self.fail(format!(
                    "append {} under a fault: model {expected:?}, store {actual:?}",
                    describe(&request)
                )),
            }
        }
        None
    }

    /// The index fails to be written (a failed fdatasync or write of `index.redb`) while appends
    /// run: appends go on until memory for index entries runs out, the index is rebuilt at the
    /// restart, and nothing acknowledged is lost.
    fn index_fault_step(&mut self) {
        let action = match self.rng.below(2) {
            0 => Fault::once(Op::Sync, "index.redb", 0, Action::Fail(libc::EIO)),
            _ => Fault::once(
                Op::Write,
                "index.redb",
                self.rng.below(3),
                Action::Fail(libc::EIO),
            ),
        };
        self.trace.push(format!("an index fault ({action:?})"));
        self.sync_failed = true;
        self.fs.inject(action);
        let count = 4 + self.rng.index(20);
        let in_flight = self.appends_until_the_crash(count);
        self.fs.clear_faults();
        self.restart(in_flight);
    }

    /// Ends the process (a kill -9 or a power loss), reopens, and checks what survived.
    fn restart(&mut self, in_flight: InFlight) {
        self.fs.crash();
        self.store = None;
        let how = match self.rng.below(3) {
            0 => Restart::ProcessCrash,
            1 => Restart::PowerLoss(PowerLoss::KeepNothing),
            _ => Restart::PowerLoss(PowerLoss::Random(self.rng.next())),
        };
        self.trace.push(format!(
            "restart ({})",
            match how {
                Restart::ProcessCrash => "kill -9".to_owned(),
                Restart::PowerLoss(PowerLoss::KeepNothing) => "power loss, nothing kept".to_owned(),
                Restart::PowerLoss(_) => "power loss, chosen by seed".to_owned(),
            }
        ));
        let power_loss = matches!(how, Restart::PowerLoss(_));
        self.fs = self.fs.restart(how);
        self.open();
        if (power_loss || std::mem::take(&mut self.sync_failed))
            && self.options.durability == Durability::None
        {
            self.forget_unsynced();
        }
        self.reconcile(in_flight);
    }

    /// With durability `none` a power loss, or a failed `fdatasync` (after which the kernel may
    /// drop the pages it could not write), may take the newest acknowledged appends: what is
    /// stored must be a prefix of the model's log (or all of it), and the model keeps that
    /// prefix.
    fn forget_unsynced(&mut self) {
        let stored = self.read_everything();
        let kept = stored.len().min(self.model.log.len());
        if stored[..kept] != self.model.log[..kept] {
            self.fail(format!(
                "after a power loss with durability none the log is not a prefix of what was \
                 acknowledged ({} stored, {} acknowledged)",
                stored.len(),
                self.model.log.len()
            ));
        }
        if kept < self.model.log.len() {
            self.trace.push(format!(
                "the power loss took {} acknowledged events (durability none)",
                self.model.log.len() - kept
            ));
            self.model.log.truncate(kept);
        }
    }

    /// Every acknowledged event is there; beyond them, only the in-flight append, whole.
    fn reconcile(&mut self, in_flight: InFlight) {
        let stored = self.read_everything();
        let known = self.model.log.len();
        if stored.len() < known || stored[..known] != self.model.log[..] {
            self.fail(format!(
                "acknowledged events were lost or changed: {} stored, {known} acknowledged",
                stored.len()
            ));
        }
        if stored.len() == known {
            return;
        }
        let Some((request, _)) = in_flight else {
            self.fail(format!(
                "{} events appeared that no append in flight sent",
                stored.len() - known
            ));
        };
        let mut candidate = self.model.clone();
        let written = candidate.append(&request);
        if !matches!(written, Ok(ref r) if !r.replayed) || candidate.log != stored {
            self.fail(format!(
                "the events beyond the acknowledged ones are not the append in flight, whole: {}",
                describe(&request)
            ));
        }
        self.trace
            .push("the append in flight survived the crash".to_owned());
        self.model = candidate;
        self.sent.push(request);
    }

    fn read_everything(&self) -> Vec<RecordedEvent> {
        let mut out = Vec::new();
        loop {
            let page = self.runtime.block_on(self.store().read(ReadRequest {
                source: ReadSource::All(None),
                from: Some(out.len() as u64),
                direction: Direction::Forward,
                limit: MAX_READ_PAGE,
            }));
            match page {
                Ok(page) => {
                    let full = page.next.is_some();
                    out.extend(page.events);
                    if !full {
                        return out;
                    }
                }
                Err(e) => self.fail(format!("reading the log: {e}")),
            }
        }
    }

    /// A failed fdatasync: the append's outcome is unknown, the store refuses appends until a
    /// restart, and the restart finds the append whole or not at all.
    fn failed_fsync_step(&mut self) {
        self.trace.push("a failed fdatasync".to_owned());
        self.sync_failed = true;
        self.fs
            .inject(Fault::once(Op::Sync, ".seg", 0, Action::Fail(libc::EIO)));
        let in_flight = self.appends_until_the_crash(2);
        self.fs.clear_faults();
        // A failed fdatasync of a batch stops appends; one of a segment being created only
        // fails that append (nothing of it was written).
        let batch_sync_failed = in_flight
            .as_ref()
            .is_some_and(|(_, e)| e.to_string().contains("may or may not be stored"));
        if batch_sync_failed {
            let fresh = fresh_append();
            let refused = self.runtime.block_on(self.store().append(fresh));
            if !matches!(refused, Err(Error::Unavailable(_))) {
                self.fail(format!(
                    "after a failed fdatasync an append was not refused: {refused:?}"
                ));
            }
        }
        self.restart(in_flight);
    }
}

/// An append anyone may make, with a fresh id.
fn fresh_append() -> AppendRequest {
    AppendRequest {
        stream: StreamName::new("order-9").unwrap(),
        expected: ExpectedRevision::Any,
        condition: None,
        events: vec![ProposedEvent::new(
            EventType::new(TYPES[0]).unwrap(),
            EventData::json("{}").unwrap(),
        )],
    }
}

impl Simulation {
    /// The disk fills up in the middle of an append: it is refused with storage-full and
    /// nothing of it is kept; with room again, appends go on without a restart.
    fn full_disk_step(&mut self) {
        if self.rng.chance(50) {
            let bytes = self.rng.index(3000);
            self.trace
                .push(format!("the disk fills after {bytes} bytes of a write"));
            self.fs.inject(Fault::once(
                Op::Write,
                ".seg",
                0,
                Action::FailAfter(bytes, libc::ENOSPC),
            ));
        } else {
            self.trace.push("no free page left".to_owned());
            self.fs.set_capacity(Some(self.fs.used()));
        }
        let request = self.random_append();
        let mut model = self.model.clone();
        let expected = model.append(&request);
        let actual = self.runtime.block_on(self.store().append(request.clone()));
        self.fs.clear_faults();
        self.fs.set_capacity(None);
        match (&expected, &actual) {
            (Ok(a), Ok(b)) if a == b => {
                self.model = model;
                self.sent.push(request);
            }
            (Err(a), Err(b)) if same_error(a, b) => {}
            // Refused for want of room (a segment could not be started, say) before or
            // instead of any other answer: nothing stored either way.
            (_, Err(Error::StorageFull(_))) => {}
            _ => self.fail(format!(
                "append {} on a full disk: model {expected:?}, store {actual:?}",
                describe(&request)
            )),
        }
    }

    /// Reads that the file system answers a few bytes at a time.
    fn short_reads_step(&mut self) {
        let bytes = 1 + self.rng.index(100);
        self.trace.push(format!("short reads of {bytes} bytes"));
        self.fs
            .inject(Fault::always(Op::Read, ".seg", Action::Short(bytes)));
        self.read_step();
        self.fs.clear_faults();
    }

    /// After every step: the whole log and every stream's head are as the model has them.
    fn check(&mut self, step: u64) {
        let stored = self.read_everything();
        if stored != self.model.log {
            self.fail(format!(
                "after step {step} the log differs from the model: {} events stored, {} in \
                 the model",
                stored.len(),
                self.model.log.len()
            ));
        }
        for stream in STREAMS {
            let stream = StreamName::new(stream).unwrap();
            let head = self.runtime.block_on(self.store().stream_head(&stream));
            let head = head.unwrap_or_else(|e| self.fail(format!("head of {stream}: {e}")));
            if head.map(|h| h.revision) != self.model.last_revision(&stream) {
                self.fail(format!("after step {step} the head of {stream} differs"));
            }
        }
    }
}
