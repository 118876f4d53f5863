//! The projection runner over the embedded store and through the client: a read model that
//! fails mid-way keeps only whole batches and resumes after its checkpoint without applying an
//! event twice; live events arrive after catch-up; a rebuild starts from nothing.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use skald_client::aggregate::{Envelope, Event};
use skald_client::lease::{Lease, LeaseError};
use skald_client::projection::{Projection, ProjectionError, Projector};
use skald_client::{Client, ClientOptions, RetryPolicy};
use skald_core::{
    AppendRequest, Category, EventData, EventStore, EventType, ExpectedRevision, Position,
    ProposedEvent, ReadSource, StreamName,
};
use support::{Faulty, OnAppend, serve, store};

/// What a transaction of the in-memory read model commits: totals, the events applied, and
/// the checkpoint, all at once.
#[derive(Clone, Debug, Default, PartialEq)]
struct Committed {
    totals: BTreeMap<String, u64>,
    applied: u64,
    checkpoint: Option<Position>,
}

/// Totals per account, kept in `db`; `fail_on` makes that call of `apply` fail after working
/// on a copy, as a transaction that is rolled back (or a process killed before its commit).
struct Totals {
    db: Arc<Mutex<Committed>>,
    calls: usize,
    fail_on: Option<usize>,
    source: ReadSource,
    /// Whether its transactions compare-and-set the checkpoint.
    cas: bool,
}

fn totals(db: &Arc<Mutex<Committed>>, fail_on: Option<usize>) -> Totals {
    Totals {
        db: db.clone(),
        calls: 0,
        fail_on,
        source: ReadSource::Category(Category::new("account").unwrap()),
        cas: true,
    }
}

#[derive(Debug, PartialEq, thiserror::Error)]
enum Failed {
    #[error("the read model failed on purpose")]
    OnPurpose,
    #[error("another runner moved the checkpoint")]
    Superseded,
}

/// The event the projection takes in; `Noted` events of other categories are not among them.
#[derive(Debug, Serialize, Deserialize, Event)]
#[serde(tag = "type", content = "data")]
enum Moved {
    Deposited { amount: u64 },
}

impl Projection for Totals {
    type Event = Moved;
    type Error = Failed;

    fn source(&self) -> ReadSource {
        self.source.clone()
    }

    async fn checkpoint(&mut self) -> Result<Option<Position>, Failed> {
        Ok(self.db.lock().unwrap().checkpoint)
    }

    async fn apply(
        &mut self,
        events: &[Envelope<Moved>],
        previous: Option<Position>,
        checkpoint: Position,
    ) -> Result<(), Failed> {
        self.calls += 1;
        let mut draft = self.db.lock().unwrap().clone();
        // The transaction's compare-and-set: it reads the checkpoint it commits over.
        if self.cas && draft.checkpoint != previous {
            return Err(Failed::Superseded);
        }
        for event in events {
            let recorded = &event.recorded;
            assert!(
                !self.cas || draft.checkpoint.is_none_or(|c| recorded.position > c),
                "event {} handed over again",
                recorded.position.0
            );
            let Moved::Deposited { amount } = event.event;
            *draft
                .totals
                .entry(recorded.stream.as_str().to_owned())
                .or_default() += amount;
            draft.applied += 1;
        }
        assert!(events.iter().all(|e| e.recorded.position <= checkpoint));
        draft.checkpoint = Some(checkpoint);
        if self.fail_on == Some(self.calls) {
            return Err(Failed::OnPurpose);
        }
        // Commit, if nobody committed meanwhile (two runners of a test interleave here only
        // at an await, and there is none between the read above and this write).
        let mut db = self.db.lock().unwrap();
        if self.cas && db.checkpoint != previous {
            return Err(Failed::Superseded);
        }
        *db = draft;
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), Failed> {
        *self.db.lock().unwrap() = Committed::default();
        Ok(())
    }
}

async fn deposit<S: EventStore>(store: &S, account: u32, amount: u64) {
    store
        .append(AppendRequest {
            stream: StreamName::new(format!("account-{account}")).unwrap(),
            expected: ExpectedRevision::Any,
            condition: None,
            events: vec![ProposedEvent::new(
                EventType::new("Deposited").unwrap(),
                EventData::json(format!(r#"{{"amount":{amount}}}"#)).unwrap(),
            )],
        })
        .await
        .unwrap();
}

/// Events of another category between the accounts', which the projection must skip.
async fn noise<S: EventStore>(store: &S) {
    store
        .append(AppendRequest {
            stream: StreamName::new("audit-1").unwrap(),
            expected: ExpectedRevision::Any,
            condition: None,
            events: vec![ProposedEvent::new(
                EventType::new("Noted").unwrap(),
                EventData::json(r#"{"amount":1000000}"#).unwrap(),
            )],
        })
        .await
        .unwrap();
}

fn expected_totals(deposits: &[(u32, u64)]) -> BTreeMap<String, u64> {
    let mut totals = BTreeMap::new();
    for (account, amount) in deposits {
        *totals.entry(format!("account-{account}")).or_default() += amount;
    }
    totals
}

async fn projection_story<S: EventStore + Clone>(store: &S) {
    let mut deposits = Vec::new();
    for i in 0..600u32 {
        let (account, amount) = (i % 7, u64::from(i % 13 + 1));
        deposit(store, account, amount).await;
        deposits.push((account, amount));
        if i % 5 == 0 {
            noise(store).await;
        }
    }
    let db = Arc::new(Mutex::new(Committed::default()));

    // The fifth transaction fails: the four before it stay, and nothing of the fifth.
    let mut failing = Projector::new(store.clone(), totals(&db, Some(5))).batch(50);
    match failing.catch_up().await {
        Err(ProjectionError::Projection(Failed::OnPurpose)) => {}
        other => panic!("expected the read model's failure, got {other:?}"),
    }
    assert_eq!(db.lock().unwrap().applied, 4 * 50);

    // A new runner resumes after the checkpoint: every deposit counted exactly once.
    let mut projector = Projector::new(store.clone(), totals(&db, None)).batch(50);
    let checkpoint = projector.catch_up().await.unwrap();
    {
        let committed = db.lock().unwrap();
        assert_eq!(committed.applied, 600);
        assert_eq!(committed.totals, expected_totals(&deposits));
        assert_eq!(checkpoint, committed.checkpoint);
    }
    // Caught up: nothing more to apply.
    let calls = projector.projection().calls;
    assert_eq!(projector.catch_up().await.unwrap(), checkpoint);
    assert_eq!(projector.projection().calls, calls);

    // Live: catch-up, then each deposit as it is appended, until stopped.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let live = async {
        projector
            .run(async {
                let _ = stopped.await;
            })
            .await
    };
    let feed = async {
        for i in 0..20u32 {
            deposit(store, 100 + i % 2, 5).await;
            deposits.push((100 + i % 2, 5));
            noise(store).await;
        }
        let waited = tokio::time::timeout(Duration::from_secs(30), async {
            while db.lock().unwrap().applied < 620 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        let _ = stop.send(());
        waited
    };
    let (ran, waited) = tokio::join!(live, feed);
    waited.expect("the live deposits were applied");
    let checkpoint = ran.unwrap();
    {
        let committed = db.lock().unwrap();
        assert_eq!(committed.applied, 620);
        assert_eq!(committed.totals, expected_totals(&deposits));
        assert_eq!(checkpoint, committed.checkpoint);
    }

    // A rebuild empties the model, damaged here, and applies everything again.
    db.lock().unwrap().totals.insert("account-0".into(), 0);
    assert_eq!(projector.rebuild().await.unwrap(), checkpoint);
    let committed = db.lock().unwrap();
    assert_eq!(committed.applied, 620);
    assert_eq!(committed.totals, expected_totals(&deposits));
}

#[tokio::test]
async fn projections_over_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    projection_story(&store).await;
    store.shutdown().await;
}

#[tokio::test]
async fn projections_through_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = serve(dir.path(), listener).await;
    let client = Client::connect(&url).await.unwrap();
    projection_story(&client).await;
    server.stop().await;
}

/// A projection of one stream: it is read by revision, so the runner must turn its
/// checkpoint (a position) into the stream's next revision, never use it as one.
async fn stream_projection_story<S: EventStore + Clone>(store: &S) {
    // acct-1 holds every fourth of 100 deposits; the rest go to other accounts.
    let mut mine = Vec::new();
    for i in 0..100u32 {
        let account = if i % 4 == 0 { 1 } else { 2 + i % 3 };
        deposit(store, account, u64::from(i + 1)).await;
        if account == 1 {
            mine.push((1, u64::from(i + 1)));
        }
    }
    let db = Arc::new(Mutex::new(Committed::default()));
    let one = ReadSource::Stream(StreamName::new("account-1").unwrap());
    let mut projector = Projector::new(
        store.clone(),
        Totals {
            source: one.clone(),
            ..totals(&db, None)
        },
    )
    .batch(5);
    projector.catch_up().await.unwrap();
    assert_eq!(
        db.lock().unwrap().applied,
        25,
        "every event of the stream, once"
    );
    assert_eq!(db.lock().unwrap().totals, expected_totals(&mine));
    // A new runner resumes from the stored checkpoint; only later events are applied.
    for i in 100..110u32 {
        deposit(store, 1 + i % 2, 1000).await;
        if i % 2 == 0 {
            mine.push((1, 1000));
        }
    }
    let mut again = Projector::new(
        store.clone(),
        Totals {
            source: one,
            ..totals(&db, None)
        },
    )
    .batch(3);
    again.catch_up().await.unwrap();
    assert_eq!(db.lock().unwrap().applied, 30);
    assert_eq!(db.lock().unwrap().totals, expected_totals(&mine));
}

#[tokio::test]
async fn a_projection_of_one_stream_skips_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    stream_projection_story(&store).await;
    store.shutdown().await;
}

#[tokio::test]
async fn a_projection_of_one_stream_skips_nothing_through_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = serve(dir.path(), listener).await;
    let client = Client::connect(&url).await.unwrap();
    stream_projection_story(&client).await;
    server.stop().await;
}

/// Two runners on one read model (two replicas, or a restart that overlaps the old process):
/// the compare-and-set of `apply` lets each batch commit once; the runner that finds the
/// checkpoint moved stops, and every event is applied exactly once.
#[tokio::test]
async fn two_projectors_on_one_read_model_apply_each_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    for i in 0..200u32 {
        deposit(&store, i % 5, 1).await;
    }
    let db = Arc::new(Mutex::new(Committed::default()));
    let mut first = Projector::new(store.clone(), totals(&db, None)).batch(7);
    let mut second = Projector::new(store.clone(), totals(&db, None)).batch(7);
    let (a, b) = tokio::join!(first.catch_up(), second.catch_up());
    let stopped = [&a, &b]
        .iter()
        .filter(|r| matches!(r, Err(ProjectionError::Projection(Failed::Superseded))))
        .count();
    assert!(a.is_ok() || b.is_ok(), "one runner finishes: {a:?} {b:?}");
    let committed = db.lock().unwrap().clone();
    // Whatever the interleaving, nothing was applied twice; a runner that lost a race
    // stopped, and the one left finished the rest.
    if stopped == 0 {
        assert_eq!(committed.applied, 200);
    }
    let mut last = Projector::new(store.clone(), totals(&db, None)).batch(7);
    last.catch_up().await.unwrap();
    let committed = db.lock().unwrap().clone();
    assert_eq!(committed.applied, 200, "each event applied once");
    assert_eq!(committed.totals.values().sum::<u64>(), 200);
    store.shutdown().await;
}

/// Waits until the read model has applied `count` events.
async fn applied(db: &Arc<Mutex<Committed>>, count: u64) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while db.lock().unwrap().applied < count {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{count} events applied"));
}

/// A server restart of a few seconds does not end `Projector::run`, even over a client
/// that does not retry by itself: the runner tries again with back-off and goes on from the
/// read model's checkpoint.
#[tokio::test]
async fn a_projector_rides_out_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = serve(dir.path(), listener).await;
    let client = Client::connect_with(
        &format!("http://{addr}"),
        ClientOptions {
            retry: RetryPolicy {
                attempts: 1,
                ..RetryPolicy::default()
            },
            resubscribe: Some(RetryPolicy {
                attempts: 1,
                ..RetryPolicy::default()
            }),
            ..ClientOptions::default()
        },
    )
    .await
    .unwrap();
    let db = Arc::new(Mutex::new(Committed::default()));
    let mut projector = Projector::new(client.clone(), totals(&db, None)).batch(16);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // The runner owns what it needs: it runs as a task of its own.
    let run = tokio::spawn(async move {
        projector
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    let feed = async {
        for i in 0..50 {
            deposit(&client, i % 5, 1).await;
        }
        applied(&db, 50).await;
        server.stop().await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let server = serve(dir.path(), listener).await;
        for i in 0..50 {
            deposit(&client, i % 5, 2).await;
        }
        applied(&db, 100).await;
        let _ = stop.send(());
        server
    };
    let server = feed.await;
    let checkpoint = run.await.unwrap().expect("the runner outlived the restart");
    assert_eq!(checkpoint, Some(Position(99)));
    let committed = db.lock().unwrap().clone();
    assert_eq!(committed.applied, 100);
    assert_eq!(committed.totals.values().sum::<u64>(), 150);
    server.stop().await;
}

/// A read model that cannot compare-and-set its checkpoint, fed by two runners that each
/// hold a lease around the projector: only one runs at a time, the other takes over once
/// the first dies without releasing, and every event is applied exactly once.
#[tokio::test]
async fn a_lease_keeps_a_projection_without_compare_and_set_to_one_runner() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let db = Arc::new(Mutex::new(Committed::default()));
    let unguarded = || Totals {
        cas: false,
        ..totals(&db, None)
    };
    let ttl = Duration::from_millis(400);

    let mut first = Lease::acquire(&store, "totals", "runner-a", ttl)
        .await
        .unwrap();
    let (kill, killed) = tokio::sync::oneshot::channel::<()>();
    let runner_a = async {
        let mut projector = Projector::new(store.clone(), unguarded()).batch(7);
        tokio::select! {
            held = first.hold(projector.run(std::future::pending())) => panic!("{held:?}"),
            // kill -9: the lease is neither renewed nor released.
            _ = killed => {}
        }
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runner_b = async {
        let mut second = Lease::acquire(&store, "totals", "runner-b", ttl)
            .await
            .unwrap();
        let took_over = tokio::time::Instant::now();
        let mut projector = Projector::new(store.clone(), unguarded()).batch(7);
        second
            .hold(projector.run(async {
                let _ = stopped.await;
            }))
            .await
            .unwrap()
            .unwrap();
        second.release().await.unwrap();
        took_over
    };
    let feed = async {
        for i in 0..200u32 {
            deposit(&store, i % 5, 1).await;
            if i % 20 == 0 {
                // Longer than a ttl in all: the holder renews all along.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        applied(&db, 200).await;
        let killed_at = tokio::time::Instant::now();
        let _ = kill.send(());
        for i in 0..100u32 {
            deposit(&store, i % 5, 1).await;
        }
        applied(&db, 300).await;
        let _ = stop.send(());
        killed_at
    };
    let ((), took_over, killed_at) = tokio::join!(runner_a, runner_b, feed);
    assert!(
        took_over >= killed_at,
        "the second runner waited for the first to die"
    );
    let committed = db.lock().unwrap().clone();
    assert_eq!(committed.applied, 300, "each event applied once");

    // Released: taken at once.
    let quick = tokio::time::timeout(
        Duration::from_millis(300),
        Lease::acquire(&store, "totals", "runner-c", Duration::from_secs(60)),
    )
    .await
    .expect("a released lease is taken at once")
    .unwrap();
    // A holder whose lease was taken learns it at its next renewal, with the taker's name.
    let mut stale = Lease::acquire(&store, "other", "runner-d", ttl)
        .await
        .unwrap();
    tokio::time::sleep(ttl * 2).await;
    let _taker = Lease::acquire(&store, "other", "runner-e", ttl)
        .await
        .unwrap();
    match stale.renew().await {
        Err(LeaseError::Lost { holder, .. }) => assert_eq!(holder.as_deref(), Some("runner-e")),
        other => panic!("expected Lost, got {other:?}"),
    }
    drop(quick);
    store.shutdown().await;
}

/// Once armed, makes the next append to a `lease-` stream and then loses its answer.
struct LoseOnce {
    armed: std::sync::atomic::AtomicBool,
}

impl<S: EventStore> OnAppend<S> for LoseOnce {
    async fn append(
        &self,
        store: &S,
        request: AppendRequest,
    ) -> skald_core::Result<skald_core::AppendResult> {
        let lease = request.stream.as_str().starts_with("lease-");
        let result = store.append(request).await?;
        if lease && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return Err(skald_core::Error::Unavailable("the answer was lost".into()));
        }
        Ok(result)
    }
}

/// A renewal whose answer was lost is sent again as the same event and answered as a
/// replay, not as a lease taken by someone else; a taker waits for the holder's own ttl when
/// it is the longer.
#[tokio::test]
async fn a_lease_survives_a_lost_answer_and_honours_the_holders_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let store = Faulty {
        store: store(dir.path()),
        hook: LoseOnce {
            armed: std::sync::atomic::AtomicBool::new(false),
        },
    };
    let mut lease = Lease::acquire(&store, "lost", "runner-a", Duration::from_secs(5))
        .await
        .unwrap();
    store
        .hook
        .armed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(matches!(
        lease.renew().await,
        Err(LeaseError::Store(skald_core::Error::Unavailable(_)))
    ));
    lease.renew().await.expect("the lost renewal is a replay");
    lease.renew().await.unwrap();

    let slow = Lease::acquire(&store, "long", "runner-b", Duration::from_millis(1200))
        .await
        .unwrap();
    drop(slow);
    let started = tokio::time::Instant::now();
    let _taken = Lease::acquire(&store, "long", "runner-c", Duration::from_millis(100))
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(1200),
        "taken after {:?}, before the holder's ttl",
        started.elapsed()
    );
    drop(lease);
    store.store.shutdown().await;
}
