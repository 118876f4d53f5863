//! Aggregate snapshots kept in Skald, keyed commands that are applied once however often they
//! are sent, and a process manager with its state in Skald that resumes after a failure
//! without crediting anyone twice; over the embedded store and through the client.

#[path = "support/account.rs"]
mod account;
mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use account::{Account, AccountCommand};
use serde::{Deserialize, Serialize};
use skald_client::Client;
use skald_client::aggregate::{CommandError, CommandKey, Repository, snapshot_stream};
use skald_client::process::{Dispatch, ProcessError, ProcessManager, ProcessRunner};
use skald_core::{
    Category, Direction, EventStore, ReadRequest, ReadSource, RecordedEvent, StreamName,
};
use support::{append_json, serve, store};

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

/// Credits 10 to every user who registers, once.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Welcome {
    credited: BTreeSet<String>,
}

struct Credit {
    user: String,
}

impl ProcessManager for Welcome {
    type Command = Credit;

    fn name() -> &'static str {
        "welcome"
    }

    fn source() -> ReadSource {
        ReadSource::Category(Category::new("user").unwrap())
    }

    fn react(&mut self, event: &RecordedEvent) -> Vec<Credit> {
        let user = event.stream.as_str().trim_start_matches("user-").to_owned();
        if event.event_type.as_str() == "Registered" && self.credited.insert(user.clone()) {
            vec![Credit { user }]
        } else {
            Vec::new()
        }
    }
}

/// Sends credits as keyed deposits; fails the `fail_on`th send, as a process that dies.
struct Bank<'a, S> {
    store: &'a S,
    sent: AtomicUsize,
    fail_on: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct SendFailed(String);

impl<S: EventStore> Dispatch<Credit> for Bank<'_, S> {
    type Error = SendFailed;

    async fn send(&self, command: &Credit, key: &CommandKey) -> Result<(), SendFailed> {
        let n = self.sent.fetch_add(1, Ordering::SeqCst) + 1;
        if self.fail_on == Some(n) {
            return Err(SendFailed("the bank is down".into()));
        }
        Repository::<S, Account>::new(self.store)
            .retry_on_conflict(3)
            .execute_keyed(&command.user, &AccountCommand::Deposit(10), key)
            .await
            .map(|_| ())
            .map_err(|e| SendFailed(e.to_string()))
    }
}

fn bank<S>(store: &S, fail_on: Option<usize>) -> Bank<'_, S> {
    Bank {
        store,
        sent: AtomicUsize::new(0),
        fail_on,
    }
}

async fn register<S: EventStore>(store: &S, user: u32) {
    Repository::<S, Account>::new(store)
        .execute(&user.to_string(), &open("someone"))
        .await
        .unwrap();
    append_json(store, &format!("user-{user}"), "Registered", "{}").await;
}

async fn process_manager<S: EventStore>(store: &S) {
    for user in 0..30 {
        register(store, user).await;
    }
    // Registered twice: credited once all the same.
    append_json(store, "user-3", "Registered", "{}").await;

    // The 13th credit fails: the first batch of 8 is saved, the second is not.
    let mut failing = ProcessRunner::<_, Welcome, _>::load(store, bank(store, Some(13)))
        .await
        .unwrap()
        .batch(8);
    match failing.catch_up().await {
        Err(ProcessError::Dispatch(SendFailed(_))) => {}
        other => panic!("expected the send to fail, got {other:?}"),
    }
    assert_eq!(failing.state().credited.len(), 8);

    // A new runner picks up from the saved state and sends the second batch's credits again,
    // with the same keys: nobody is credited twice.
    let mut runner = ProcessRunner::<_, Welcome, _>::load(store, bank(store, None))
        .await
        .unwrap()
        .batch(8);
    assert_eq!(runner.state().credited.len(), 8);
    let checkpoint = runner.catch_up().await.unwrap();
    assert_eq!(runner.state().credited.len(), 30);
    let repo = Repository::<S, Account>::new(store);
    for user in 0..30 {
        let loaded = repo.load(&user.to_string()).await.unwrap();
        assert_eq!(loaded.state.balance, 10, "user {user}");
    }

    // A second runner that loaded the same state cannot save over the first.
    let mut rival = ProcessRunner::<_, Welcome, _>::load(store, bank(store, None))
        .await
        .unwrap();
    register(store, 30).await;
    assert!(runner.catch_up().await.unwrap() > checkpoint);
    match rival.catch_up().await {
        Err(ProcessError::Superseded(name)) => assert_eq!(name, "welcome"),
        other => panic!("expected the rival to be superseded, got {other:?}"),
    }

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
            while repo.load("31").await.unwrap().state.balance < 10 {
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
    assert_eq!(runner.state().credited.len(), 32);
    // Its state, reloaded from Skald, is what it had.
    let reloaded = ProcessRunner::<_, Welcome, _>::load(store, bank(store, None))
        .await
        .unwrap();
    assert_eq!(reloaded.state().credited, runner.state().credited);
    assert_eq!(reloaded.checkpoint(), runner.checkpoint());
}

#[tokio::test]
async fn over_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    snapshots(&store).await;
    keyed_commands(&store).await;
    process_manager(&store).await;
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
    server.stop().await;
}
