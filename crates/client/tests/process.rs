//! Aggregate snapshots kept in Skald, keyed commands that are applied once however often they
//! are sent, and a process manager with its state in Skald that resumes after a failure
//! without crediting anyone twice; over the embedded store and through the client.

#[path = "support/account.rs"]
mod account;
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use account::{Account, AccountCommand};
use serde::{Deserialize, Serialize};
use skald_client::aggregate::{
    AnyEvent, CommandError, CommandKey, Envelope, Event, Repository, snapshot_stream,
};
use skald_client::process::{Dispatch, Failure, ProcessError, ProcessManager, ProcessRunner};
use skald_client::{Client, RetryPolicy};
use skald_core::{
    Category, Direction, EventStore, ReadRequest, ReadSource, RecordedEvent, StreamName,
};
use support::{Faulty, OnAppend, append_json, serve, store};

async fn read_stream<S: EventStore>(store: &S, stream: &str) -> Vec<RecordedEvent> {
    store
        .read(ReadRequest {
            source: ReadSource::Stream(StreamName::new(stream).unwrap()),
            from: None,
            direction: Direction::Forward,
            limit: 1000,
        })
        .await
        .unwrap()
        .events
}

fn open(owner: &str) -> AccountCommand {
    AccountCommand::Open {
        owner: owner.into(),
    }
}

async fn snapshots<S: EventStore>(store: &S) {
    let repo = Repository::<S, Account>::new(store).snapshot_every(10, 1);
    repo.execute("s1", &open("ada")).await.unwrap();
    for _ in 0..24 {
        repo.execute("s1", &AccountCommand::Deposit(1))
            .await
            .unwrap();
    }
    // One snapshot each time the stream went 10 events past the last: at revisions 9 and 19.
    let written = read_stream(store, &snapshot_stream("account-s1")).await;
    let at: Vec<(u64, u64)> = written
        .iter()
        .map(|e| {
            let data: serde_json::Value = serde_json::from_slice(e.data.bytes()).unwrap();
            (
                data["revision"].as_u64().unwrap(),
                data["state"]["balance"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(at, [(9, 9), (19, 19)]);
    let loaded = repo.load("s1").await.unwrap();
    assert_eq!(
        (loaded.state.balance, loaded.revision),
        (24, Some(skald_core::Revision(24)))
    );
    // The snapshot is what a load starts from: one that claims more is believed...
    append_json(
        store,
        &snapshot_stream("account-s1"),
        "Snapshot",
        r#"{"version":1,"revision":24,"state":{"open":true,"balance":1000}}"#,
    )
    .await;
    assert_eq!(repo.load("s1").await.unwrap().state.balance, 1000);
    // ...one of another version, or one that does not decode, is passed over: the stream is
    // replayed from the start.
    append_json(
        store,
        &snapshot_stream("account-s1"),
        "Snapshot",
        r#"{"version":2,"revision":24,"state":{"open":true,"balance":5}}"#,
    )
    .await;
    assert_eq!(repo.load("s1").await.unwrap().state.balance, 24);
    append_json(
        store,
        &snapshot_stream("account-s1"),
        "Snapshot",
        r#"{"version":1,"revision":24,"state":{"shape":"changed"}}"#,
    )
    .await;
    assert_eq!(repo.load("s1").await.unwrap().state.balance, 24);
    // Without snapshots nothing of them is read.
    let plain = Repository::<S, Account>::new(store);
    assert_eq!(plain.load("s1").await.unwrap().state.balance, 24);
}

async fn keyed_commands<S: EventStore>(store: &S) {
    let repo = Repository::<S, Account>::new(store);
    repo.execute("k1", &open("ada")).await.unwrap();
    let key = CommandKey::new("payroll/2026-11/ada");
    assert!(
        repo.execute_keyed("k1", &AccountCommand::Deposit(5), &key)
            .await
            .unwrap()
            .is_some()
    );
    // Sent again: found among the events loaded, not applied.
    assert!(
        repo.execute_keyed("k1", &AccountCommand::Deposit(5), &key)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(repo.load("k1").await.unwrap().state.balance, 5);
    // With a snapshot after it, the first send is out of sight of the load; the store's
    // idempotency check on the derived ids catches the repeat.
    let snapshotting = Repository::<S, Account>::new(store).snapshot_every(1, 1);
    let key = CommandKey::new("bonus/ada");
    snapshotting
        .execute_keyed("k1", &AccountCommand::Deposit(7), &key)
        .await
        .unwrap();
    match snapshotting
        .execute_keyed("k1", &AccountCommand::Deposit(7), &key)
        .await
    {
        Ok(None) => {}
        Ok(Some(result)) => assert!(result.replayed, "{result:?}"),
        Err(e) => panic!("{e}"),
    }
    assert_eq!(repo.load("k1").await.unwrap().state.balance, 12);
    assert_eq!(read_stream(store, "account-k1").await.len(), 3);
    // A key used again for another command is refused, never silently dropped: on another
    // account, or on the same one with another amount. Nothing is appended.
    repo.execute("k2", &open("bob")).await.unwrap();
    let payroll = CommandKey::new("payroll/2026-11");
    repo.execute_keyed("k1", &AccountCommand::Deposit(100), &payroll)
        .await
        .unwrap();
    for (account, amount) in [("k2", 100), ("k1", 200)] {
        match repo
            .execute_keyed(account, &AccountCommand::Deposit(amount), &payroll)
            .await
        {
            Err(CommandError::KeyReused { key, reason }) => {
                assert_eq!(key, "payroll/2026-11");
                assert!(!reason.is_empty());
            }
            other => panic!("{account} {amount}: expected KeyReused, got {other:?}"),
        }
    }
    assert_eq!(repo.load("k1").await.unwrap().state.balance, 112);
    assert_eq!(repo.load("k2").await.unwrap().state.balance, 0);
    // A snapshot after a keyed command does not hide it: sent again, the repeat is
    // recognised, not decided again and rejected.
    let key = CommandKey::new("open/k3");
    snapshotting
        .execute_keyed("k3", &open("cy"), &key)
        .await
        .unwrap();
    snapshotting
        .execute_keyed("k3", &AccountCommand::Deposit(1), &CommandKey::new("d/k3"))
        .await
        .unwrap();
    assert!(matches!(
        snapshotting.execute_keyed("k3", &open("cy"), &key).await,
        Ok(None)
    ));
    assert!(matches!(
        snapshotting.execute_keyed("k3", &open("dee"), &key).await,
        Err(CommandError::KeyReused { .. })
    ));
    // A key is not a licence to skip the decision: a fresh key on a closed account is
    // rejected.
    assert!(matches!(
        repo.execute_keyed("nobody", &AccountCommand::Deposit(1), &CommandKey::new("x"))
            .await,
        Err(CommandError::Rejected(_))
    ));
}

/// Credits 10 to every user who registers, once; its instances are users.
struct Welcome;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Welcomed {
    credited: bool,
    registrations: u32,
}

#[derive(Debug, Serialize)]
struct Credit {
    user: String,
}

/// What the welcome process takes in.
#[derive(Debug, Serialize, Deserialize, Event)]
#[serde(tag = "type", content = "data")]
enum UserEvent {
    Registered {},
}

impl ProcessManager for Welcome {
    type Event = UserEvent;
    type State = Welcomed;
    type Command = Credit;

    fn name(&self) -> &str {
        "welcome"
    }

    fn source(&self) -> ReadSource {
        ReadSource::Category(Category::new("user").unwrap())
    }

    fn instance(&self, event: &Envelope<UserEvent>) -> Option<String> {
        let UserEvent::Registered {} = event.event;
        Some(user_of(event))
    }

    fn react(&self, state: &mut Welcomed, event: &Envelope<UserEvent>) -> Vec<Credit> {
        state.registrations += 1;
        if state.credited {
            return Vec::new();
        }
        state.credited = true;
        vec![Credit {
            user: user_of(event),
        }]
    }
}

fn user_of(event: &Envelope<UserEvent>) -> String {
    let stream = event.recorded.stream.as_str();
    stream.trim_start_matches("user-").to_owned()
}

/// Sends credits as keyed deposits. `down_on` fails that send as a process that dies
/// (`Failure::Stop`); `flaky` fails the first that many sends as transient (`Failure::Retry`);
/// credits for `refused` users are rejected by the account (it is closed).
struct Bank<'a, S> {
    store: &'a S,
    sent: AtomicUsize,
    down_on: Option<usize>,
    flaky: usize,
}

#[derive(Debug, thiserror::Error)]
enum SendFailed {
    #[error("the bank is down")]
    Down,
    #[error("the bank is busy")]
    Busy,
    #[error("{0}")]
    Command(CommandError<account::AccountError>),
}

impl<S: EventStore> Dispatch<Credit> for Bank<'_, S> {
    type Error = SendFailed;

    async fn send(&self, command: &Credit, key: &CommandKey) -> Result<(), SendFailed> {
        let n = self.sent.fetch_add(1, Ordering::SeqCst) + 1;
        if self.down_on == Some(n) {
            return Err(SendFailed::Down);
        }
        if n <= self.flaky {
            return Err(SendFailed::Busy);
        }
        Repository::<S, Account>::new(self.store)
            .retry_on_conflict(3)
            .execute_keyed(&command.user, &AccountCommand::Deposit(10), key)
            .await
            .map(|_| ())
            .map_err(SendFailed::Command)
    }

    fn on_failure(&self, error: &SendFailed) -> Failure {
        match error {
            SendFailed::Down => Failure::Stop,
            SendFailed::Busy => Failure::Retry,
            SendFailed::Command(e) => Failure::of_command(e),
        }
    }
}

fn bank<S>(store: &S, down_on: Option<usize>) -> Bank<'_, S> {
    Bank {
        store,
        sent: AtomicUsize::new(0),
        down_on,
        flaky: 0,
    }
}

fn quick() -> RetryPolicy {
    RetryPolicy {
        attempts: 5,
        first_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(5),
    }
}

async fn register<S: EventStore>(store: &S, user: u32) {
    Repository::<S, Account>::new(store)
        .execute(&user.to_string(), &open("someone"))
        .await
        .unwrap();
    append_json(store, &format!("user-{user}"), "Registered", "{}").await;
}

async fn credited<S: EventStore>(store: &S, user: u32) -> u64 {
    Repository::<S, Account>::new(store)
        .load(&user.to_string())
        .await
        .unwrap()
        .state
        .balance
}

async fn process_manager<S: EventStore + Clone>(store: &S) {
    for user in 0..30 {
        register(store, user).await;
    }
    // Registered twice: credited once all the same.
    append_json(store, "user-3", "Registered", "{}").await;

    // The 13th credit fails and stops the runner: the first batch of 8 is saved, the second
    // is not.
    let mut failing = ProcessRunner::load(store.clone(), Welcome, bank(store, Some(13)))
        .await
        .unwrap()
        .batch(8);
    match failing.catch_up().await {
        Err(ProcessError::Dispatch(SendFailed::Down)) => {}
        other => panic!("expected the send to fail, got {other:?}"),
    }
    let first_batch = failing.checkpoint().unwrap();
    assert!(failing.state("7").await.unwrap().unwrap().credited);
    assert_eq!(failing.state("8").await.unwrap(), None);

    // A new runner picks up from the saved checkpoint and sends the second batch's credits
    // again, with the same keys: nobody is credited twice.
    let mut runner = ProcessRunner::load(store.clone(), Welcome, bank(store, None))
        .await
        .unwrap()
        .batch(8);
    assert_eq!(runner.checkpoint(), Some(first_batch));
    let checkpoint = runner.catch_up().await.unwrap();
    for user in 0..30 {
        assert_eq!(credited(store, user).await, 10, "user {user}");
        let state = runner.state(&user.to_string()).await.unwrap().unwrap();
        assert!(state.credited);
        assert_eq!(state.registrations, if user == 3 { 2 } else { 1 });
    }
    // Each instance's state is its own small event, saved once per batch that changed it;
    // positions.
    let own = read_stream(store, "process-welcome").await;
    assert!(
        own.iter()
            .all(|e| e.event_type.as_str() == "ProcessCheckpoint" && e.data.bytes().len() < 128)
    );
    assert_eq!(read_stream(store, "process-welcome:i:5").await.len(), 1);

    // Two runners: one that finds an instance saved past an event by the other passes it over
    // and writes nothing; one that saves after the other moved the checkpoint is superseded.
    // Nobody is credited twice either way.
    let mut rival = ProcessRunner::load(store.clone(), Welcome, bank(store, None))
        .await
        .unwrap();
    register(store, 30).await;
    assert!(rival.catch_up().await.unwrap() > checkpoint);
    let before = read_stream(store, "process-welcome").await.len();
    runner.catch_up().await.unwrap();
    assert_eq!(read_stream(store, "process-welcome").await.len(), before);
    append_json(store, "user-30", "Registered", "{}").await;
    match runner.catch_up().await {
        Err(ProcessError::Superseded(name)) => assert_eq!(name, "welcome"),
        other => panic!("expected the runner to be superseded, got {other:?}"),
    }
    assert_eq!(credited(store, 30).await, 10);
    let mut runner = ProcessRunner::load(store.clone(), Welcome, bank(store, None))
        .await
        .unwrap()
        .batch(8);
    runner.catch_up().await.unwrap();
    assert_eq!(
        runner.state("30").await.unwrap().unwrap().registrations,
        2,
        "the superseded runner's save of the instance holds, and is not taken in again"
    );

    // Live: a registration while it runs is credited; stopping returns the checkpoint.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let live = async {
        runner
            .run(async {
                let _ = stopped.await;
            })
            .await
    };
    let feed = async {
        register(store, 31).await;
        let waited = tokio::time::timeout(Duration::from_secs(30), async {
            while credited(store, 31).await < 10 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        let _ = stop.send(());
        waited
    };
    let (ran, waited) = tokio::join!(live, feed);
    waited.expect("the live registration was credited");
    ran.unwrap();
    // Its checkpoint, read back from Skald, is what it had.
    let reloaded = ProcessRunner::load(store.clone(), Welcome, bank(store, None))
        .await
        .unwrap();
    assert_eq!(reloaded.checkpoint(), runner.checkpoint());
}

/// A refused command is parked and the rest go on; a transient failure is retried with
/// back-off; a runner run again over a batch records its parked command once.
async fn failures<S: EventStore + Clone>(store: &S) {
    // User 101 has no account: its credit is rejected.
    for user in [100, 102] {
        register(store, user).await;
    }
    append_json(store, "user-101", "Registered", "{}").await;
    let mut flaky = bank(store, None);
    flaky.flaky = 3;
    let mut runner = ProcessRunner::load(store.clone(), Welcome, flaky)
        .await
        .unwrap()
        .retry(quick());
    runner.catch_up().await.unwrap();
    assert_eq!(credited(store, 100).await, 10);
    assert_eq!(credited(store, 102).await, 10);
    let parked = read_stream(store, "process-welcome:parked").await;
    let ours: Vec<_> = parked
        .iter()
        .map(|e| serde_json::from_slice::<serde_json::Value>(e.data.bytes()).unwrap())
        .filter(|d| d["instance"] == "101")
        .collect();
    assert_eq!(ours.len(), 1, "{parked:?}");
    assert_eq!(ours[0]["command"]["user"], "101");
    assert!(
        ours[0]["error"].as_str().unwrap().contains("rejected"),
        "{}",
        ours[0]
    );
    assert!(
        ours[0]["key"]
            .as_str()
            .unwrap()
            .starts_with("process-welcome/")
    );

    // A crash after the batch's instances were saved and before its checkpoint was: the
    // runner after it handles the batch again, the saved instances pass over what they took
    // in (user 104 counts two registrations, not four), and the parked command of user 106
    // is recorded once.
    register(store, 104).await;
    append_json(store, "user-104", "Registered", "{}").await;
    append_json(store, "user-106", "Registered", "{}").await;
    let crashing = Faulty {
        store: store.clone(),
        hook: Crashing {
            stream: "process-welcome",
            lose: None,
        },
    };
    let mut dying = ProcessRunner::load(crashing, Welcome, bank(store, None))
        .await
        .unwrap();
    assert!(matches!(
        dying.catch_up().await,
        Err(ProcessError::Store(skald_core::Error::Io(_)))
    ));
    assert_eq!(
        read_stream(store, "process-welcome:i:104").await.len(),
        1,
        "saved before the crash"
    );
    let mut after = ProcessRunner::load(store.clone(), Welcome, bank(store, None))
        .await
        .unwrap();
    after.catch_up().await.unwrap();
    let state = after.state("104").await.unwrap().unwrap();
    assert_eq!(state.registrations, 2);
    assert_eq!(credited(store, 104).await, 10);
    let parked_106 = read_stream(store, "process-welcome:parked")
        .await
        .iter()
        .filter(|e| e.data.bytes().windows(5).any(|w| w == b"\"106\""))
        .count();
    assert_eq!(parked_106, 1);

    // Transient failures past the policy's limit stop the runner; the batch is not saved.
    register(store, 103).await;
    let mut busy = bank(store, None);
    busy.flaky = usize::MAX;
    let mut runner = ProcessRunner::load(store.clone(), Welcome, busy)
        .await
        .unwrap()
        .retry(quick());
    let checkpoint = runner.checkpoint();
    assert!(matches!(
        runner.catch_up().await,
        Err(ProcessError::Dispatch(SendFailed::Busy))
    ));
    assert_eq!(runner.checkpoint(), checkpoint);
    assert_eq!(credited(store, 103).await, 0);
    // ...and a stop ends a runner that is waiting to try again.
    let mut busy = bank(store, None);
    busy.flaky = usize::MAX;
    let mut waiting = ProcessRunner::load(store.clone(), Welcome, busy)
        .await
        .unwrap()
        .retry(RetryPolicy::forever());
    let stopped = tokio::time::timeout(
        Duration::from_secs(10),
        waiting.run(tokio::time::sleep(Duration::from_millis(300))),
    )
    .await
    .expect("the stop ends the retries");
    assert_eq!(stopped.unwrap(), checkpoint);
}

/// Fails every append to `stream`, as a process killed before that append; with `lose`
/// set, it makes the append and loses the answer, once.
struct Crashing {
    stream: &'static str,
    lose: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

impl<S: EventStore> OnAppend<S> for Crashing {
    async fn append(
        &self,
        store: &S,
        request: skald_core::AppendRequest,
    ) -> skald_core::Result<skald_core::AppendResult> {
        if request.stream.as_str() == self.stream {
            match &self.lose {
                None => return Err(skald_core::Error::Io("killed before this append".into())),
                Some(armed) if armed.swap(false, Ordering::SeqCst) => {
                    store.append(request).await?;
                    return Err(skald_core::Error::Unavailable("the answer was lost".into()));
                }
                Some(_) => {}
            }
        }
        store.append(request).await
    }
}

/// What a review found: a checkpoint saved whose answer was lost does not stop `run` as
/// superseded; a process manager over the global log does not take in another's bookkeeping
/// (two would feed each other checkpoints for ever); a parked record whose id is taken in
/// another stream is an error, not a record silently skipped.
async fn review_findings(store: &skald_storage::Store) {
    let lose = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let losing = Faulty {
        store: store.clone(),
        hook: Crashing {
            stream: "process-welcome",
            lose: Some(lose.clone()),
        },
    };
    register(store, 200).await;
    let mut runner = ProcessRunner::load(losing, Welcome, bank(store, None))
        .await
        .unwrap()
        .retry(quick());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let live = runner.run(async {
        let _ = stopped.await;
    });
    let feed = async {
        register(store, 201).await;
        tokio::time::timeout(Duration::from_secs(30), async {
            while credited(store, 201).await < 10 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("credited after the lost answer");
        let _ = stop.send(());
    };
    let (ran, ()) = tokio::join!(live, feed);
    ran.expect("a lost answer is not another runner");
    assert!(!lose.load(Ordering::SeqCst), "an answer was lost");
    assert_eq!(credited(store, 200).await, 10);

    /// Welcome over the global log, under another name.
    struct Everything(&'static str);
    impl ProcessManager for Everything {
        type Event = UserEvent;
        type State = Welcomed;
        type Command = Credit;
        fn name(&self) -> &str {
            self.0
        }
        fn source(&self) -> ReadSource {
            ReadSource::All(None)
        }
        fn instance(&self, event: &Envelope<UserEvent>) -> Option<String> {
            Welcome.instance(event)
        }
        fn react(&self, state: &mut Welcomed, event: &Envelope<UserEvent>) -> Vec<Credit> {
            Welcome.react(state, event)
        }
    }
    let mut a = ProcessRunner::load(store.clone(), Everything("all-a"), bank(store, None))
        .await
        .unwrap();
    let mut b = ProcessRunner::load(store.clone(), Everything("all-b"), bank(store, None))
        .await
        .unwrap();
    a.catch_up().await.unwrap();
    b.catch_up().await.unwrap();
    let saved = read_stream(store, "process-all-a").await.len();
    for _ in 0..3 {
        a.catch_up().await.unwrap();
        b.catch_up().await.unwrap();
    }
    assert_eq!(read_stream(store, "process-all-a").await.len(), saved);

    // The parked record's id, taken beforehand in another stream.
    let registered = skald_core::EventId(uuid::Uuid::from_u128(0x5eed));
    let key = CommandKey::new(format!("process-welcome/{registered}/0"));
    let mut squatter = skald_core::ProposedEvent::new(
        skald_core::EventType::new("Junk").unwrap(),
        skald_core::EventData::json("{}").unwrap(),
    );
    squatter.id = CommandKey::new(format!("{}/parked", key.as_str())).event_id(0);
    let mut event = skald_core::ProposedEvent::new(
        skald_core::EventType::new("Registered").unwrap(),
        skald_core::EventData::json("{}").unwrap(),
    );
    event.id = registered;
    for (stream, event) in [("junk-1", squatter), ("user-202", event)] {
        store
            .append(skald_core::AppendRequest {
                stream: StreamName::new(stream).unwrap(),
                expected: skald_core::ExpectedRevision::Any,
                condition: None,
                events: vec![event],
            })
            .await
            .unwrap();
    }
    let mut runner = ProcessRunner::load(store.clone(), Welcome, bank(store, None))
        .await
        .unwrap();
    match runner.catch_up().await {
        Err(ProcessError::Store(skald_core::Error::IdReused { .. })) => {}
        other => panic!("expected the parked record to fail, got {other:?}"),
    }
}

/// Many instances with large states: each is saved on its own, so no save comes near the
/// event size limit, which one whole state of them all (1,200 × 1 KiB) would pass.
struct Tally;

#[derive(Clone, Default, Serialize, Deserialize)]
struct Notes {
    text: String,
}

impl ProcessManager for Tally {
    type Event = AnyEvent;
    type State = Notes;
    type Command = ();

    fn name(&self) -> &str {
        "tally"
    }

    fn source(&self) -> ReadSource {
        ReadSource::Category(Category::new("note").unwrap())
    }

    fn instance(&self, event: &Envelope<AnyEvent>) -> Option<String> {
        Some(event.recorded.stream.as_str().to_owned())
    }

    fn react(&self, state: &mut Notes, _: &Envelope<AnyEvent>) -> Vec<()> {
        state.text.push_str(&"n".repeat(1024));
        Vec::new()
    }
}

struct Nowhere;

impl Dispatch<()> for Nowhere {
    type Error = std::io::Error;

    async fn send(&self, (): &(), _: &CommandKey) -> Result<(), std::io::Error> {
        Ok(())
    }

    fn on_failure(&self, _: &std::io::Error) -> Failure {
        Failure::Stop
    }
}

async fn large_states<S: EventStore + Clone>(store: &S) {
    for i in 0..1_200 {
        append_json(store, &format!("note-{i}"), "Noted", "{}").await;
    }
    let mut runner = ProcessRunner::load(store.clone(), Tally, Nowhere)
        .await
        .unwrap()
        .batch(256);
    runner.catch_up().await.unwrap();
    let saved = read_stream(store, "process-tally:i:note-1199").await;
    assert_eq!(saved.len(), 1);
    assert!(saved[0].data.bytes().len() < 2048);
    assert_eq!(
        runner.state("note-0").await.unwrap().unwrap().text.len(),
        1024
    );
}

#[tokio::test]
async fn over_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    snapshots(&store).await;
    keyed_commands(&store).await;
    process_manager(&store).await;
    failures(&store).await;
    large_states(&store).await;
    review_findings(&store).await;
    store.shutdown().await;
}

#[tokio::test]
async fn through_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = serve(dir.path(), listener).await;
    let client = Client::connect(&url).await.unwrap();
    snapshots(&client).await;
    keyed_commands(&client).await;
    process_manager(&client).await;
    failures(&client).await;
    large_states(&client).await;
    server.stop().await;
}
