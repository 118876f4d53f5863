//! The aggregate framework on a bank account: given-when-then without a store, upcasting of an
//! old event shape, the repository against the embedded store and against a server through
//! the client (conflicts retried or reported), and a DCB decision keeping usernames unique
//! without an aggregate.

use serde::{Deserialize, Serialize};
#[path = "support/account.rs"]
mod account;
mod support;

use account::{Account, AccountCommand, AccountError, AccountEvent};
use skald_client::Client;
use skald_client::aggregate::{
    AnyEvent, CodecError, CommandError, DecideError, Decider, Envelope, Event, Repository,
    StateQuery, decode, given, propose, tag,
};
use support::{Faulty, OnAppend, serve, store};

use skald_core::{
    AppendRequest, Error, EventStore, EventType, ExpectedRevision, Query, StreamName, Tag,
};

#[test]
fn given_when_then() {
    given::<Account>([])
        .when(AccountCommand::Open {
            owner: "ada".into(),
        })
        .then(vec![AccountEvent::Opened {
            owner: "ada".into(),
        }]);
    given::<Account>([
        AccountEvent::Opened {
            owner: "ada".into(),
        },
        AccountEvent::Deposited { amount: 10 },
    ])
    .when(AccountCommand::Withdraw(4))
    .then(vec![AccountEvent::Withdrawn { amount: 4 }]);
    given::<Account>([
        AccountEvent::Opened {
            owner: "ada".into(),
        },
        AccountEvent::Deposited { amount: 10 },
    ])
    .when(AccountCommand::Withdraw(11))
    .then_rejected(|e| {
        assert_eq!(
            *e,
            AccountError::Insufficient {
                balance: 10,
                asked: 11
            }
        )
    });
    given::<Account>([])
        .when(AccountCommand::Deposit(1))
        .then_rejected(|e| assert_eq!(*e, AccountError::NotOpen));
}

#[test]
#[should_panic(expected = "the command caused other events")]
fn given_when_then_fails_on_other_events() {
    given::<Account>([AccountEvent::Opened {
        owner: "ada".into(),
    }])
    .when(AccountCommand::Deposit(5))
    .then(vec![AccountEvent::Deposited { amount: 6 }]);
}

/// The repository's behaviour, the same over any store.
async fn account_story<S: EventStore + Clone>(store: &S) {
    let repo = Repository::<S, Account>::new(store);
    repo.execute(
        "1",
        &AccountCommand::Open {
            owner: "ada".into(),
        },
    )
    .await
    .unwrap();
    // An old-shaped event in the stream is upcast when loaded.
    store
        .append(AppendRequest {
            stream: StreamName::new("account-1").unwrap(),
            expected: ExpectedRevision::Any,
            condition: None,
            events: vec![skald_core::ProposedEvent::new(
                EventType::new("MoneyDeposited").unwrap(),
                skald_core::EventData::json(r#"{"cents":25}"#).unwrap(),
            )],
        })
        .await
        .unwrap();
    repo.execute("1", &AccountCommand::Deposit(5))
        .await
        .unwrap();
    let loaded = repo.load("1").await.unwrap();
    assert_eq!(loaded.state.balance, 30);
    assert_eq!(loaded.revision, Some(skald_core::Revision(2)));
    match repo.execute("1", &AccountCommand::Withdraw(31)).await {
        Err(CommandError::Rejected(AccountError::Insufficient { balance: 30, .. })) => {}
        other => panic!("expected a rejection, got {other:?}"),
    }

    // Another writer appends between the load and the save: without retries the command
    // fails with the conflict; with one retry it is decided again on the newer state.
    let interloper = Faulty {
        store: store.clone(),
        hook: Interloper {
            armed: std::sync::atomic::AtomicBool::new(true),
        },
    };
    let strict = Repository::<_, Account>::new(&interloper);
    match strict.execute("1", &AccountCommand::Withdraw(1)).await {
        Err(CommandError::Conflict(Error::WrongExpectedRevision { .. })) => {}
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(repo.load("1").await.unwrap().state.balance, 30 + 100);
    interloper
        .hook
        .armed
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let patient = Repository::<_, Account>::new(&interloper).retry_on_conflict(1);
    patient
        .execute("1", &AccountCommand::Withdraw(1))
        .await
        .unwrap();
    assert_eq!(repo.load("1").await.unwrap().state.balance, 30 + 200 - 1);
    // Eight writers at once, each retrying until it lands.
    let patient = Repository::<S, Account>::new(store).retry_on_conflict(10);
    let results = futures_util::future::join_all(
        (0..8).map(|_| patient.execute("1", &AccountCommand::Withdraw(1))),
    )
    .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(repo.load("1").await.unwrap().state.balance, 229 - 8);
}

/// Once armed, deposits 100 into the stream just before the next append: a concurrent
/// writer at the worst moment.
struct Interloper {
    armed: std::sync::atomic::AtomicBool,
}

impl<S: EventStore> OnAppend<S> for Interloper {
    async fn append(
        &self,
        store: &S,
        request: AppendRequest,
    ) -> skald_core::Result<skald_core::AppendResult> {
        if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            store
                .append(AppendRequest {
                    stream: request.stream.clone(),
                    expected: ExpectedRevision::Any,
                    condition: None,
                    events: vec![propose(&AccountEvent::Deposited { amount: 100 }).unwrap()],
                })
                .await?;
        }
        store.append(request).await
    }
}

/// Usernames are unique without a "usernames" aggregate: a decision over the events tagged
/// with the name, and an append conditioned on it.
async fn unique_usernames<S: EventStore>(store: &S) {
    #[derive(Serialize, Deserialize, Event)]
    #[serde(tag = "type", content = "data")]
    enum UserEvent {
        Registered {
            #[tag("username")]
            name: String,
        },
    }
    /// Whether a username is taken: the events tagged with it.
    struct Taken {
        name: String,
        taken: bool,
    }
    impl StateQuery for Taken {
        type Event = UserEvent;
        type Error = std::convert::Infallible;
        fn query(&self) -> Result<Query, CodecError> {
            Ok(UserEvent::query(vec![tag("username", &self.name)?]))
        }
        fn fold(&mut self, _: Envelope<UserEvent>) -> Result<(), Self::Error> {
            self.taken = true;
            Ok(())
        }
    }
    #[derive(Debug, thiserror::Error)]
    #[error("username {0} is taken")]
    struct IsTaken(String);
    async fn register<S: EventStore>(
        store: &S,
        user: &str,
        name: &str,
        attempts: u32,
    ) -> Result<Option<skald_core::AppendResult>, DecideError<std::convert::Infallible, IsTaken>>
    {
        Decider::new(store)
            .attempts(attempts)
            .execute(
                || Taken {
                    name: name.to_owned(),
                    taken: false,
                },
                &StreamName::new(format!("user-{user}")).unwrap(),
                |state| {
                    if state.taken {
                        return Err(IsTaken(name.to_owned()));
                    }
                    Ok(vec![UserEvent::Registered { name: name.into() }])
                },
            )
            .await
    }
    register(store, "1", "ada", 1).await.unwrap();
    assert!(
        matches!(
            register(store, "2", "ada", 1).await,
            Err(DecideError::Rejected(IsTaken(_)))
        ),
        "taken"
    );
    register(store, "3", "grace", 1).await.unwrap();
    // Two users racing for one name: exactly one wins; the loser's append fails its condition
    // (with one attempt, it is Contended) or sees the name taken, if it decided after the
    // winner's append.
    let (a, b) = tokio::join!(
        register(store, "4", "linus", 1),
        register(store, "5", "linus", 1)
    );
    assert_eq!(
        [&a, &b].iter().filter(|r| r.is_ok()).count(),
        1,
        "{a:?} {b:?}"
    );
    assert!(
        [&a, &b].iter().any(|r| matches!(
            r,
            Err(DecideError::Contended { attempts: 1 } | DecideError::Rejected(_))
        )),
        "{a:?} {b:?}"
    );
    // The event carries its tag from the #[tag] field, and a decision with retries settles
    // a race by deciding again: the loser sees the name taken.
    let (c, d) = tokio::join!(
        register(store, "6", "kay", 5),
        register(store, "7", "kay", 5)
    );
    assert_eq!([&c, &d].iter().filter(|r| r.is_ok()).count(), 1);
    assert!(
        [&c, &d]
            .iter()
            .any(|r| matches!(r, Err(DecideError::Rejected(IsTaken(_))))),
        "{c:?} {d:?}"
    );
    let read = store
        .read(skald_core::ReadRequest {
            source: skald_core::ReadSource::Query(UserEvent::query(vec![
                Tag::new("username:kay").unwrap(),
            ])),
            from: None,
            direction: skald_core::Direction::Forward,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(read.events.len(), 1);
}

#[tokio::test]
async fn the_repository_and_decisions_over_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    account_story(&store).await;
    unique_usernames(&store).await;
    // What the repository wrote reads back as typed events.
    let page = store
        .read(skald_core::ReadRequest {
            source: skald_core::ReadSource::Stream(StreamName::new("account-1").unwrap()),
            from: None,
            direction: skald_core::Direction::Forward,
            limit: 1,
        })
        .await
        .unwrap();
    assert_eq!(
        decode::<AccountEvent>(&page.events[0]).unwrap(),
        AccountEvent::Opened {
            owner: "ada".into()
        }
    );
    store.shutdown().await;
}

#[tokio::test]
async fn the_repository_and_decisions_through_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = serve(dir.path(), listener).await;
    let client = Client::connect(&url).await.unwrap();
    account_story(&client).await;
    unique_usernames(&client).await;
    server.stop().await;
}

/// A stored event as the store would give it back, for decoding tests.
fn stored(proposed: skald_core::ProposedEvent) -> skald_core::RecordedEvent {
    skald_core::RecordedEvent {
        id: proposed.id,
        stream: StreamName::new("t-1").unwrap(),
        event_type: proposed.event_type,
        data: proposed.data,
        metadata: proposed.metadata,
        tags: proposed.tags,
        source: None,
        recorded_at: skald_core::Timestamp(0),
        revision: skald_core::Revision(0),
        position: skald_core::Position(7),
    }
}

/// What the derive and the decoder must get right beyond the plain case: unit variants, old
/// names (aliases, a rename's deserialize name, an upcaster's source type) that stay inside
/// queries and read back, given-when-then on a versioned event, and `AnyEvent` over versioned
/// and non-JSON events.
#[test]
fn typed_events_round_trip_in_every_shape() {
    #[derive(Debug, PartialEq, Serialize, Deserialize, Event)]
    #[serde(tag = "type", content = "data", deny_unknown_fields)]
    enum Shapes {
        Pinged,
        #[serde(alias = "OldNamed")]
        Named {
            name: String,
        },
        #[serde(rename = "Moved", alias = "Relocated")]
        Moved(#[tag("to")] String),
    }
    assert_eq!(Shapes::TYPES, ["Pinged", "Named", "Moved"]);
    assert_eq!(Shapes::ALIASES, ["OldNamed", "Relocated"]);
    for event in [
        Shapes::Pinged,
        Shapes::Named { name: "x".into() },
        Shapes::Moved("here".into()),
    ] {
        let proposed = propose(&event).unwrap();
        assert_eq!(decode::<Shapes>(&stored(proposed)).unwrap(), event);
    }
    assert_eq!(
        propose(&Shapes::Moved("here".into())).unwrap().tags,
        [Tag::new("to:here").unwrap()]
    );
    let mut old = propose(&Shapes::Named { name: "y".into() }).unwrap();
    old.event_type = EventType::new("OldNamed").unwrap();
    assert_eq!(
        decode::<Shapes>(&stored(old)).unwrap(),
        Shapes::Named { name: "y".into() }
    );
    let types: Vec<String> = Shapes::query_item(vec![])
        .types
        .iter()
        .map(|t| t.as_str().to_owned())
        .collect();
    assert_eq!(types, ["Pinged", "Named", "Moved", "OldNamed", "Relocated"]);

    // The upcaster's source type is in the query, so an old event is not left out of a
    // decision or a projection.
    let account_types: Vec<String> = AccountEvent::query_item(vec![])
        .types
        .iter()
        .map(|t| t.as_str().to_owned())
        .collect();
    assert!(account_types.contains(&"MoneyDeposited".to_owned()));

    // Given-when-then reads events back as they are written, version included.
    given::<Account>([AccountEvent::Opened {
        owner: "ada".into(),
    }])
    .when(AccountCommand::Deposit(3))
    .then(vec![AccountEvent::Deposited { amount: 3 }]);

    // AnyEvent takes a version-2 event, and one whose data is not JSON.
    let v2 = stored(propose(&AccountEvent::Deposited { amount: 3 }).unwrap());
    let any = skald_client::aggregate::decode_known::<AnyEvent>(&v2)
        .unwrap()
        .unwrap();
    assert_eq!(any.event_type, "Deposited");
    assert_eq!(any.data["amount"], 3);
    let mut binary = skald_core::ProposedEvent::new(
        EventType::new("Blob").unwrap(),
        skald_core::EventData::with_content_type("application/octet-stream", vec![0, 159, 146])
            .unwrap(),
    );
    binary.metadata = skald_core::Metadata::empty();
    let any = skald_client::aggregate::decode_known::<AnyEvent>(&stored(binary))
        .unwrap()
        .unwrap();
    assert_eq!(
        (any.event_type.as_str(), any.data),
        ("Blob", serde_json::Value::Null)
    );
}
