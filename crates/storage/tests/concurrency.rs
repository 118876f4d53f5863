//! Checks made inside one group commit: concurrent appends land in the same batch, so each
//! must see the ones before it, including records still in the write buffer.

use std::sync::Arc;

use skald_core::*;
use skald_storage::{Options, Store};

fn open(dir: &std::path::Path) -> Store {
    let options = Options {
        data_dir: dir.to_path_buf(),
        ..Options::default()
    };
    Store::open(options).unwrap().0
}

fn registered(user: usize, name: &str, id: EventId) -> AppendRequest {
    let mut event = ProposedEvent::new(
        EventType::new("Registered").unwrap(),
        EventData::json(format!("{{\"user\":{user}}}")).unwrap(),
    );
    event.id = id;
    event.tags = vec![Tag::new(format!("username:{name}")).unwrap()];
    AppendRequest {
        stream: StreamName::new(format!("user-{user}")).unwrap(),
        expected: ExpectedRevision::NoStream,
        condition: Some(AppendCondition {
            query: Query::new(vec![QueryItem {
                types: vec![EventType::new("Registered").unwrap()],
                tags: vec![Tag::new(format!("username:{name}")).unwrap()],
            }])
            .unwrap(),
            after: None,
        }),
        events: vec![event],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_of_one_username_admit_exactly_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    for round in 0..5 {
        let name = format!("ada{round}");
        let tasks: Vec<_> = (0..50)
            .map(|user| {
                let (store, name) = (Arc::clone(&store), name.clone());
                tokio::spawn(async move {
                    store
                        .append(registered(round * 100 + user, &name, EventId::generate()))
                        .await
                })
            })
            .collect();
        let mut won = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok(r) => won.push(r.first_position),
                Err(Error::ConditionFailed { position }) => {
                    assert!(!won.is_empty() || position.0 > 0 || round == 0)
                }
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert_eq!(won.len(), 1, "exactly one claim of {name} succeeds");
        let page = store
            .read(ReadRequest {
                source: ReadSource::Query(
                    Query::new(vec![QueryItem {
                        types: vec![],
                        tags: vec![Tag::new(format!("username:{name}")).unwrap()],
                    }])
                    .unwrap(),
                ),
                from: None,
                direction: Direction::Forward,
                limit: 100,
            })
            .await
            .unwrap();
        assert_eq!(page.events.len(), 1);
        assert_eq!(page.events[0].position, won[0]);
    }
    store.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_copies_of_one_append_store_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    let mut request = registered(1, "bob", EventId::generate());
    request.condition = None;
    request.expected = ExpectedRevision::Any;
    request.events.push(ProposedEvent::new(
        EventType::new("Second").unwrap(),
        EventData::json("{}").unwrap(),
    ));
    // Filler appends keep the writer busy, so the copies queue up and share group commits.
    let mut fillers = Vec::new();
    let mut copies = Vec::new();
    for i in 0..200 {
        let filler_store = Arc::clone(&store);
        fillers.push(tokio::spawn(async move {
            let event = ProposedEvent::new(
                EventType::new("Filler").unwrap(),
                EventData::json("{}").unwrap(),
            );
            let stream = StreamName::new(format!("filler-{i}")).unwrap();
            filler_store
                .append(AppendRequest {
                    stream,
                    expected: ExpectedRevision::Any,
                    condition: None,
                    events: vec![event],
                })
                .await
                .unwrap()
        }));
        if i % 10 == 0 {
            let (store, request) = (Arc::clone(&store), request.clone());
            copies.push(tokio::spawn(
                async move { store.append(request).await.unwrap() },
            ));
        }
    }
    let mut results = Vec::new();
    for t in copies {
        results.push(t.await.unwrap());
    }
    for t in fillers {
        t.await.unwrap();
    }
    assert_eq!(
        results.iter().filter(|r| !r.replayed).count(),
        1,
        "written once"
    );
    let first = results[0].first_position;
    assert!(
        results
            .iter()
            .all(|r| r.first_position == first && r.last_position.0 == first.0 + 1)
    );
    assert_eq!(store.head(), 202);
    store.shutdown().await;
}

/// Conditions never look at system streams (`$...`), and one that finds only their events for
/// long is refused rather than holding the writer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditions_pass_over_system_streams_within_a_bound() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let secret = |n: usize| AppendRequest {
        stream: StreamName::system("$security-keys").unwrap(),
        expected: ExpectedRevision::Any,
        condition: None,
        events: (0..n)
            .map(|_| {
                ProposedEvent::new(
                    EventType::new("ApiKeyCreated").unwrap(),
                    EventData::json("{}").unwrap(),
                )
            })
            .collect(),
    };
    let guarded = |after: Option<Position>| AppendRequest {
        stream: StreamName::new("order-1").unwrap(),
        expected: ExpectedRevision::Any,
        condition: Some(AppendCondition {
            query: Query::new(vec![QueryItem {
                types: vec![EventType::new("ApiKeyCreated").unwrap()],
                tags: vec![],
            }])
            .unwrap(),
            after,
        }),
        events: vec![ProposedEvent::new(
            EventType::new("Placed").unwrap(),
            EventData::json("{}").unwrap(),
        )],
    };
    store.append(secret(3)).await.unwrap();
    store
        .append(guarded(None))
        .await
        .expect("system events decide nothing");
    for _ in 0..5 {
        store.append(secret(1000)).await.unwrap();
    }
    match store.append(guarded(None)).await {
        Err(Error::InvalidEvent { reason }) => {
            assert!(reason.contains("system streams"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let head = Position(store.head() - 1);
    store
        .append(guarded(Some(head)))
        .await
        .expect("after the system events there is nothing to pass over");
    store.shutdown().await;
}
