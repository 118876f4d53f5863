//! Persistent subscriptions against the real store: competing consumers, pinned ordering,
//! timeouts, retry then park, replay of parked messages, and a restart that loses nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use skald_core::*;
use skald_hub::groups::{
    ConsumerEvent, GroupMessage, GroupSettings, NackAction, NewGroup, SettingsUpdate, Strategy,
};
use skald_hub::{AllSpec, Groups, Hub, HubOptions, SourceSpec, Start};
use skald_storage::{Options, Store};

const WAIT: Duration = Duration::from_secs(10);

async fn open(dir: &Path) -> (Store, Groups<Store>, Hub<Store>) {
    // A read whose future was dropped (a `select!` that took another branch) still finishes
    // on the blocking pool and holds the store, and so its directory lock, for a moment after
    // everything stopped.
    let mut attempts = 0;
    let store = loop {
        let opened = Store::open(Options {
            data_dir: dir.to_path_buf(),
            durability: Durability::None,
            ..Options::default()
        });
        match opened {
            Ok((store, _)) => break store,
            Err(Error::Unavailable(_)) if attempts < 100 => {
                attempts += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    let hub = Hub::start(Arc::new(store.clone()), HubOptions::default());
    let groups = Groups::start(hub.clone()).await.unwrap();
    (store, groups, hub)
}

async fn stop(store: Store, groups: Groups<Store>, hub: Hub<Store>) {
    hub.shutdown();
    groups.stopped().await;
    hub.stopped().await;
    store.shutdown().await;
}

/// Appends `count` events and returns the position of the first. Positions are not counted
/// from 0 here: creating a group writes events of its own (to system streams).
async fn append(store: &Store, stream: &str, count: usize) -> u64 {
    let events = (0..count)
        .map(|i| {
            ProposedEvent::new(
                EventType::new("Happened").unwrap(),
                EventData::json(format!("{{\"i\":{i}}}")).unwrap(),
            )
        })
        .collect();
    store
        .append(AppendRequest {
            stream: StreamName::new(stream).unwrap(),
            expected: ExpectedRevision::Any,
            condition: None,
            events,
        })
        .await
        .unwrap()
        .first_position
        .0
}

fn group(name: &str, settings: GroupSettings) -> NewGroup {
    NewGroup {
        name: name.into(),
        source: SourceSpec::All(AllSpec::default()),
        start: Start::Beginning,
        settings,
    }
}

async fn next(consumer: &mut skald_hub::groups::Consumer) -> Vec<GroupMessage> {
    match tokio::time::timeout(WAIT, consumer.next()).await {
        Ok(ConsumerEvent::Messages(m)) => m,
        Ok(ConsumerEvent::Ended(e)) => panic!("consumer ended: {e}"),
        Err(_) => panic!("no message within {WAIT:?}"),
    }
}

fn positions(from: u64, count: u64) -> Vec<String> {
    (from..from + count).map(|p| p.to_string()).collect()
}

fn ids(messages: &[GroupMessage]) -> Vec<String> {
    messages.iter().map(|m| m.ack_id.clone()).collect()
}

/// What an ack id names without its delivery and incarnation: `17` of `17.2.5f0c1a9e`.
fn key(ack_id: &str) -> &str {
    ack_id.rsplitn(3, '.').nth(2).expect("KEY.DELIVERY.TOKEN")
}

fn keys(messages: &[GroupMessage]) -> Vec<String> {
    messages.iter().map(|m| key(&m.ack_id).to_owned()).collect()
}

#[tokio::test]
async fn competing_consumers_share_every_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let (store, groups, hub) = open(dir.path()).await;
    groups
        .create(group("g", GroupSettings::default()))
        .await
        .unwrap();
    let mut a = groups.join("g", "a", "test", 5).await.unwrap();
    let mut b = groups.join("g", "b", "test", 5).await.unwrap();
    let base = append(&store, "order-0", 25).await;
    for s in 1..4 {
        append(&store, &format!("order-{s}"), 25).await;
    }
    let mut seen: BTreeMap<u64, &str> = BTreeMap::new();
    let mut first_ack_id = None;
    let mut per_consumer = [0usize; 2];
    while seen.len() < 100 {
        let (name, batch) = tokio::select! {
            batch = next(&mut a) => ("a", batch),
            batch = next(&mut b) => ("b", batch),
        };
        for m in &batch {
            if m.event.position.0 == base {
                first_ack_id = Some(m.ack_id.clone());
            }
            assert_eq!(m.deliveries, 1, "nothing times out here");
            assert!(
                seen.insert(m.event.position.0, name).is_none(),
                "delivered twice"
            );
        }
        per_consumer[usize::from(name == "b")] += batch.len();
        let outcome = groups.ack("g", ids(&batch)).await.unwrap();
        assert_eq!(outcome.done, batch.len());
        assert!(outcome.unknown.is_empty());
    }
    assert!(per_consumer.iter().all(|n| *n > 0), "{per_consumer:?}");
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (base..base + 100).collect::<Vec<_>>()
    );
    // A second ack of the same message is unknown, not an error.
    let first = first_ack_id.unwrap();
    let again = groups
        .ack("g", vec![first.clone(), "nonsense".into()])
        .await
        .unwrap();
    assert_eq!(again.done, 0);
    assert_eq!(again.unknown, [first, "nonsense".to_owned()]);
    let info = groups.info("g").await.unwrap();
    assert_eq!(info.stats.in_flight, 0);
    assert_eq!(info.stats.consumers.len(), 2);
    assert_eq!(info.stats.delivered, 100);
    drop((a, b));
    stop(store, groups, hub).await;
}

#[tokio::test]
async fn pinned_consumers_get_whole_streams_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (store, groups, hub) = open(dir.path()).await;
    let settings = GroupSettings {
        strategy: Strategy::Pinned,
        ..GroupSettings::default()
    };
    groups.create(group("p", settings)).await.unwrap();
    let mut consumers = Vec::new();
    for name in ["c1", "c2", "c3"] {
        consumers.push(groups.join("p", name, "test", 4).await.unwrap());
    }
    // Interleaved appends to six streams.
    let base = store.next_position().await.unwrap();
    for round in 0..10 {
        for s in 0..6 {
            append(&store, &format!("acct-{s}"), 1 + (round + s) % 2).await;
        }
    }
    let total = (store.next_position().await.unwrap() - base) as usize;
    let mut owner: BTreeMap<String, usize> = BTreeMap::new();
    let mut revisions: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut received = 0;
    // Every consumer runs until all the events have been received by someone.
    let counted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut tasks = tokio::task::JoinSet::new();
    for (index, mut consumer) in consumers.into_iter().enumerate() {
        let groups = groups.clone();
        let counted = Arc::clone(&counted);
        tasks.spawn(async move {
            let mut got = Vec::new();
            loop {
                let next = tokio::time::timeout(Duration::from_millis(50), consumer.next()).await;
                let batch = match next {
                    Ok(ConsumerEvent::Messages(batch)) => batch,
                    Ok(ConsumerEvent::Ended(e)) => panic!("ended: {e}"),
                    Err(_) => {
                        let done = counted.load(std::sync::atomic::Ordering::SeqCst) >= total;
                        if done || tokio::time::Instant::now() > deadline {
                            return (index, got);
                        }
                        continue;
                    }
                };
                counted.fetch_add(batch.len(), std::sync::atomic::Ordering::SeqCst);
                for m in &batch {
                    got.push((m.event.stream.to_string(), m.event.revision.0));
                }
                // Slow consumers: the others must not take their streams meanwhile.
                tokio::time::sleep(Duration::from_millis(5)).await;
                groups.ack("p", ids(&batch)).await.unwrap();
            }
        });
    }
    while let Some(result) = tasks.join_next().await {
        let (index, got) = result.unwrap();
        received += got.len();
        for (stream, revision) in got {
            let first = *owner.entry(stream.clone()).or_insert(index);
            assert_eq!(first, index, "stream {stream} went to two consumers");
            revisions.entry(stream).or_default().push(revision);
        }
    }
    assert_eq!(received, total);
    for (stream, revisions) in revisions {
        let expected: Vec<u64> = (0..revisions.len() as u64).collect();
        assert_eq!(revisions, expected, "stream {stream} out of order");
    }
    let owners: BTreeSet<usize> = owner.values().copied().collect();
    assert!(
        owners.len() > 1,
        "every stream went to one consumer: {owner:?}"
    );
    stop(store, groups, hub).await;
}

#[tokio::test]
async fn unacknowledged_messages_are_delivered_again_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (store, groups, hub) = open(dir.path()).await;
    let settings = GroupSettings {
        message_timeout_ms: 100,
        retry_delay_ms: 10,
        ..GroupSettings::default()
    };
    groups.create(group("t", settings)).await.unwrap();
    let base = append(&store, "order-1", 1).await.to_string();
    let mut forgetful = groups.join("t", "forgetful", "test", 1).await.unwrap();
    let first = next(&mut forgetful).await;
    assert_eq!(
        (key(&first[0].ack_id), first[0].deliveries),
        (base.as_str(), 1)
    );
    // Not acknowledged: it comes back, counted, to whoever has room.
    let again = next(&mut forgetful).await;
    assert_eq!(
        (key(&again[0].ack_id), again[0].deliveries),
        (base.as_str(), 2)
    );
    // A late ack of the first delivery names no delivery in flight: it settles nothing.
    let late = groups.ack("t", ids(&first)).await.unwrap();
    assert_eq!((late.done, late.unknown), (0, ids(&first)));
    assert_eq!(groups.ack("t", ids(&again)).await.unwrap().done, 1);
    assert_eq!(groups.info("t").await.unwrap().stats.lag, 0);
    drop(forgetful);
    stop(store, groups, hub).await;
}

#[tokio::test]
async fn retried_messages_are_parked_after_the_most_deliveries_and_can_be_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let (store, groups, hub) = open(dir.path()).await;
    let settings = GroupSettings {
        max_deliveries: 3,
        retry_delay_ms: 10,
        ..GroupSettings::default()
    };
    groups.create(group("r", settings)).await.unwrap();
    let base = append(&store, "order-1", 3).await;
    let mut c = groups.join("r", "c", "test", 10).await.unwrap();
    let batch = next(&mut c).await;
    assert_eq!(keys(&batch), positions(base, 3));
    groups.ack("r", ids(&batch[..1])).await.unwrap();
    // Message 1 is skipped; message 2 fails three times.
    groups
        .nack("r", ids(&batch[1..2]), NackAction::Skip, String::new())
        .await
        .unwrap();
    let mut deliveries = 1;
    let mut retried = ids(&batch[2..]);
    loop {
        let outcome = groups
            .nack(
                "r",
                retried.clone(),
                NackAction::Retry,
                "the service is down".into(),
            )
            .await
            .unwrap();
        assert_eq!(outcome.done, 1);
        if deliveries == 3 {
            break;
        }
        let batch = next(&mut c).await;
        deliveries += 1;
        assert_eq!(batch[0].deliveries, deliveries);
        retried = ids(&batch);
    }
    let parked_stream = StreamName::system("$parked-r").unwrap();
    let mut parked = 0;
    for _ in 0..500 {
        parked = groups.info("r").await.unwrap().stats.parked;
        if parked == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(parked, 1);
    let entry = store
        .read(ReadRequest {
            source: ReadSource::Stream(parked_stream),
            from: None,
            direction: Direction::Forward,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(entry.events.len(), 1);
    let data: serde_json::Value = serde_json::from_slice(entry.events[0].data.bytes()).unwrap();
    assert_eq!(data["position"], base + 2);
    assert_eq!(data["deliveries"], 3);
    assert!(
        data["reason"]
            .as_str()
            .unwrap()
            .contains("the service is down")
    );
    // Everything is done: the checkpoint is past all three.
    let checkpoint = groups.info("r").await.unwrap().stats.checkpoint;
    assert!(checkpoint >= base + 3, "{checkpoint}");

    assert_eq!(groups.replay_parked("r").await.unwrap(), 1);
    let replayed = next(&mut c).await;
    assert_eq!(keys(&replayed), ["parked-0"]);
    assert_eq!(replayed[0].event.position.0, base + 2);
    assert_eq!(replayed[0].deliveries, 1);
    groups.ack("r", ids(&replayed)).await.unwrap();
    let mut info = groups.info("r").await.unwrap();
    for _ in 0..500 {
        if info.stats.parked == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        info = groups.info("r").await.unwrap();
    }
    assert_eq!(info.stats.parked, 0);
    drop(c);
    stop(store, groups, hub).await;
}

#[tokio::test]
async fn a_restart_delivers_every_unacknowledged_message_again() {
    let dir = tempfile::tempdir().unwrap();
    let (store, groups, hub) = open(dir.path()).await;
    let settings = GroupSettings {
        checkpoint_after_ms: 10,
        ..GroupSettings::default()
    };
    groups.create(group("d", settings)).await.unwrap();
    let base = append(&store, "order-1", 30).await;
    let mut c = groups.join("d", "c", "test", 30).await.unwrap();
    let mut batch = Vec::new();
    while batch.len() < 30 {
        batch.extend(next(&mut c).await);
    }
    // The first 10 are acknowledged, the 11th is not, the next 9 are.
    let acked: Vec<String> = batch
        .iter()
        .filter(|m| {
            let i = m.event.position.0 - base;
            i < 10 || (11..20).contains(&i)
        })
        .map(|m| m.ack_id.clone())
        .collect();
    groups.ack("d", acked).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(c);
    stop(store, groups, hub).await;

    let (store, groups, hub) = open(dir.path()).await;
    let info = groups.info("d").await.unwrap();
    assert_eq!(
        info.stats.checkpoint,
        base + 10,
        "the checkpoint stops at the first unacked"
    );
    let mut c = groups.join("d", "c", "test", 100).await.unwrap();
    let mut again = Vec::new();
    while again.len() < 20 {
        again.extend(next(&mut c).await);
    }
    let positions: Vec<u64> = again.iter().map(|m| m.event.position.0).collect();
    // At least once: 10 and everything after it, including the acks past the checkpoint.
    assert_eq!(positions, (base + 10..base + 30).collect::<Vec<_>>());
    groups.ack("d", ids(&again)).await.unwrap();
    drop(c);
    stop(store, groups, hub).await;
}

#[tokio::test]
async fn groups_are_created_updated_listed_and_deleted_durably() {
    let dir = tempfile::tempdir().unwrap();
    let (store, groups, hub) = open(dir.path()).await;
    let head = append(&store, "order-1", 5).await + 5;
    let mut new = group("orders", GroupSettings::default());
    new.source = SourceSpec::Category("order".into());
    new.start = Start::Now;
    let created = groups.create(new.clone()).await.unwrap();
    assert_eq!(
        created.definition.start,
        skald_hub::groups::GroupStart::Position(head)
    );
    let err = groups.create(new.clone()).await.unwrap_err();
    assert!(matches!(err, Error::GroupExists(_)), "{err}");
    for bad in [
        NewGroup {
            name: "bad name".into(),
            ..new.clone()
        },
        NewGroup {
            start: Start::Revision(3),
            name: "other".into(),
            ..new.clone()
        },
        NewGroup {
            settings: GroupSettings {
                buffer_size: 0,
                ..GroupSettings::default()
            },
            name: "other".into(),
            ..new.clone()
        },
    ] {
        let err = groups.create(bad).await.unwrap_err();
        assert!(matches!(err, Error::InvalidEvent { .. }), "{err}");
    }
    let updated = groups
        .update(
            "orders",
            &SettingsUpdate {
                max_deliveries: Some(3),
                strategy: Some(Strategy::Pinned),
                ..SettingsUpdate::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(updated.definition.settings.max_deliveries, 3);
    groups
        .create(group("other", GroupSettings::default()))
        .await
        .unwrap();
    groups.delete("other").await.unwrap();
    assert!(matches!(
        groups.delete("other").await.unwrap_err(),
        Error::GroupNotFound(_)
    ));
    stop(store, groups, hub).await;

    let (store, groups, hub) = open(dir.path()).await;
    let list = groups.list().await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].definition.name, "orders");
    assert_eq!(list[0].definition.settings.max_deliveries, 3);
    assert_eq!(list[0].definition.settings.strategy, Strategy::Pinned);
    // A new group of a deleted group's name starts afresh.
    let again = groups
        .create(group("other", GroupSettings::default()))
        .await
        .unwrap();
    assert_eq!(again.stats.checkpoint, 0);
    let mut c = groups.join("other", "c", "test", 10).await.unwrap();
    assert_eq!(next(&mut c).await.len(), 5);
    drop(c);
    stop(store, groups, hub).await;
}

#[tokio::test]
async fn a_consumer_that_leaves_gives_its_messages_to_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (store, groups, hub) = open(dir.path()).await;
    groups
        .create(group("l", GroupSettings::default()))
        .await
        .unwrap();
    let base = append(&store, "order-1", 4).await;
    let mut first = groups.join("l", "first", "test", 10).await.unwrap();
    assert_eq!(next(&mut first).await.len(), 4);
    let mut second = groups.join("l", "second", "test", 10).await.unwrap();
    drop(first);
    let batch = next(&mut second).await;
    assert_eq!(keys(&batch), positions(base, 4));
    assert!(batch.iter().all(|m| m.deliveries == 2));
    // Deleting the group ends its consumers.
    groups.delete("l").await.unwrap();
    match tokio::time::timeout(WAIT, second.next()).await.unwrap() {
        ConsumerEvent::Ended(Error::GroupNotFound(name)) => assert_eq!(name, "l"),
        other => panic!("{other:?}"),
    }
    stop(store, groups, hub).await;
}

#[tokio::test]
async fn long_polls_return_what_is_there_or_nothing_after_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let (store, groups, hub) = open(dir.path()).await;
    groups
        .create(group("h", GroupSettings::default()))
        .await
        .unwrap();
    let empty = groups
        .poll("h", "http", 10, Duration::from_millis(50))
        .await
        .unwrap();
    assert!(empty.is_empty());
    append(&store, "order-1", 15).await;
    let first = groups.poll("h", "http", 10, WAIT).await.unwrap();
    assert_eq!(first.len(), 10);
    let second = groups.poll("h", "http", 10, WAIT).await.unwrap();
    assert_eq!(second.len(), 5, "the first poll's messages stay in flight");
    let outcome = groups.ack("h", ids(&first)).await.unwrap();
    assert_eq!(outcome.done, 10);
    assert_eq!(groups.info("h").await.unwrap().stats.in_flight, 5);
    stop(store, groups, hub).await;
}

#[tokio::test]
async fn a_batch_queued_as_a_wait_runs_out_is_returned_and_one_sent_after_goes_back_undelivered() {
    let dir = tempfile::tempdir().unwrap();
    let (store, groups, hub) = open(dir.path()).await;
    groups
        .create(group("late", GroupSettings::default()))
        .await
        .unwrap();
    let mut consumer = groups.join("late", "poller", "test", 10).await.unwrap();
    // A batch reaches the consumer's queue, unread: the state a long-poll is in when the
    // group hands over a batch at the moment its wait runs out.
    let first = append(&store, "order-1", 1).await;
    let deadline = std::time::Instant::now() + WAIT;
    while groups.info("late").await.unwrap().stats.in_flight < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing was handed over"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let taken = consumer.stop_taking().await;
    assert_eq!(taken.len(), 1, "the queued batch was swallowed");
    assert_eq!(taken[0].event.position.0, first);
    assert_eq!(taken[0].deliveries, 1);
    // What the group hands it after that goes back at once, its delivery not counted: another
    // consumer gets it as a first delivery, without waiting for a message timeout.
    let second = append(&store, "order-2", 1).await;
    let deadline = std::time::Instant::now() + WAIT;
    let again = loop {
        let polled = groups
            .poll("late", "other", 10, Duration::from_millis(200))
            .await
            .unwrap();
        if let Some(m) = polled.into_iter().find(|m| m.event.position.0 == second) {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the second event stayed hidden"
        );
    };
    assert_eq!(
        again.deliveries, 1,
        "a batch that never arrived counted as a delivery"
    );
    drop(consumer);
    stop(store, groups, hub).await;
}

#[tokio::test]
async fn stale_acks_and_nacks_settle_nothing_after_a_timeout_or_a_re_created_group() {
    let dir = tempfile::tempdir().unwrap();
    let (store, groups, hub) = open(dir.path()).await;
    let settings = GroupSettings {
        message_timeout_ms: 100,
        retry_delay_ms: 10,
        ..GroupSettings::default()
    };
    groups.create(group("s", settings.clone())).await.unwrap();
    append(&store, "order-1", 1).await;
    // A takes the message and is too slow: it goes to B.
    let mut a = groups.join("s", "a", "test", 1).await.unwrap();
    let taken_by_a = next(&mut a).await;
    drop(a);
    let mut b = groups.join("s", "b", "test", 1).await.unwrap();
    let taken_by_b = next(&mut b).await;
    assert_eq!(taken_by_b[0].deliveries, 2);
    // A's late skip and ack settle nothing; B's delivery stays B's.
    for stale in [
        groups
            .nack("s", ids(&taken_by_a), NackAction::Skip, "late".into())
            .await
            .unwrap(),
        groups.ack("s", ids(&taken_by_a)).await.unwrap(),
    ] {
        assert_eq!((stale.done, stale.unknown), (0, ids(&taken_by_a)));
    }
    assert_eq!(groups.info("s").await.unwrap().stats.in_flight, 1);
    let outcome = groups
        .nack("s", ids(&taken_by_b), NackAction::Retry, "later".into())
        .await
        .unwrap();
    assert_eq!(outcome.done, 1, "B's nack was taken by A's stale ack");
    drop(b);

    // A group is deleted and created again under its name: an ack id of the old one names
    // nothing, though the same message is again at its first delivery.
    groups.create(group("r", settings)).await.unwrap();
    let mut c = groups.join("r", "c", "test", 1).await.unwrap();
    let old = next(&mut c).await;
    assert_eq!(old[0].deliveries, 1);
    drop(c);
    groups.delete("r").await.unwrap();
    groups
        .create(group("r", GroupSettings::default()))
        .await
        .unwrap();
    let mut d = groups.join("r", "d", "test", 1).await.unwrap();
    let new = next(&mut d).await;
    assert_eq!(
        (new[0].event.position, new[0].deliveries),
        (old[0].event.position, 1)
    );
    let stale = groups.ack("r", ids(&old)).await.unwrap();
    assert_eq!((stale.done, stale.unknown), (0, ids(&old)));
    assert_eq!(groups.ack("r", ids(&new)).await.unwrap().done, 1);
    drop(d);
    stop(store, groups, hub).await;
}

#[tokio::test]
async fn a_consumer_dropped_with_batches_it_never_took_gives_them_back_undelivered() {
    let dir = tempfile::tempdir().unwrap();
    let (store, groups, hub) = open(dir.path()).await;
    groups
        .create(group("gone", GroupSettings::default()))
        .await
        .unwrap();
    // A batch waits in the consumer's queue when it goes away (an HTTP client that hung up
    // during its long-poll).
    let consumer = groups.join("gone", "poller", "test", 10).await.unwrap();
    let first = append(&store, "order-1", 1).await;
    let deadline = std::time::Instant::now() + WAIT;
    while groups.info("gone").await.unwrap().stats.in_flight < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing was handed over"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(consumer);
    let polled = groups.poll("gone", "other", 10, WAIT).await.unwrap();
    assert_eq!(polled.len(), 1);
    assert_eq!(polled[0].event.position.0, first);
    assert_eq!(
        polled[0].deliveries, 1,
        "a batch no one took counted as a delivery"
    );
    stop(store, groups, hub).await;
}

fn pinned(timeout_ms: u64) -> GroupSettings {
    GroupSettings {
        strategy: Strategy::Pinned,
        message_timeout_ms: timeout_ms,
        retry_delay_ms: 10,
        max_retry_delay_ms: 10,
        ..GroupSettings::default()
    }
}

#[tokio::test]
async fn pinned_order_holds_when_an_earlier_message_times_out_or_is_nacked() {
    let dir = tempfile::tempdir().unwrap();
    let (store, groups, hub) = open(dir.path()).await;
    groups.create(group("pin", pinned(150))).await.unwrap();
    let base = append(&store, "c-x", 3).await;
    // A takes all three; the first is nacked for a retry: the two after it come back too,
    // and go out again after it, in order.
    let mut a = groups.join("pin", "a", "test", 3).await.unwrap();
    let mut held = Vec::new();
    while held.len() < 3 {
        held.extend(next(&mut a).await);
    }
    let outcome = groups
        .nack("pin", ids(&held[..1]), NackAction::Retry, "later".into())
        .await
        .unwrap();
    assert_eq!(outcome.done, 1);
    // The later two were taken back: A's acks of them settle nothing.
    let stale = groups.ack("pin", ids(&held[1..])).await.unwrap();
    assert_eq!((stale.done, stale.unknown), (0, ids(&held[1..])));
    let mut again = Vec::new();
    while again.len() < 3 {
        again.extend(next(&mut a).await);
    }
    let order: Vec<u64> = again.iter().map(|m| m.event.position.0).collect();
    assert_eq!(order, [base, base + 1, base + 2]);

    groups.ack("pin", ids(&again)).await.unwrap();
    drop(a);
    stop(store, groups, hub).await;
}

/// The stream name the group pins to the second of two consumer names (FNV-1a, as the group
/// does), so that the test knows where a stream goes once B has joined.
fn stream_pinned_to_second(prefix: &str) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|name| {
            let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
            for byte in name.bytes() {
                hash ^= u64::from(byte);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
            hash % 2 == 1
        })
        .unwrap()
}

#[tokio::test]
async fn pinned_order_holds_when_an_earlier_message_times_out_while_a_later_one_is_out() {
    let dir = tempfile::tempdir().unwrap();
    let (store, groups, hub) = open(dir.path()).await;
    groups.create(group("pin", pinned(400))).await.unwrap();
    let stream = stream_pinned_to_second("c");
    // A, alone, takes the stream's first event; B joins (the stream now hashes to B); the
    // second event goes to A, which holds the stream.
    let mut a = groups.join("pin", "a", "test", 5).await.unwrap();
    let first = append(&store, &stream, 1).await;
    let n1 = next(&mut a).await;
    assert_eq!(n1[0].event.position.0, first);
    let mut b = groups.join("pin", "b", "test", 5).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let second = append(&store, &stream, 1).await;
    let n2 = next(&mut a).await;
    assert_eq!(n2[0].event.position.0, second);
    // The first times out while A still holds the second: it may not go to B alone.
    let redelivered = next(&mut b).await;
    assert_eq!(redelivered[0].event.position.0, first);
    let late = groups.ack("pin", ids(&n2)).await.unwrap();
    assert_eq!(
        (late.done, late.unknown),
        (0, ids(&n2)),
        "A still held the second event while B got the first"
    );
    let mut got = redelivered;
    while got.len() < 2 {
        got.extend(next(&mut b).await);
    }
    let order: Vec<u64> = got.iter().map(|m| m.event.position.0).collect();
    assert_eq!(order, [first, second]);
    groups.ack("pin", ids(&got)).await.unwrap();
    drop((a, b));
    stop(store, groups, hub).await;
}

#[tokio::test]
async fn pinned_polls_under_one_name_do_not_split_a_stream() {
    let dir = tempfile::tempdir().unwrap();
    let (store, groups, hub) = open(dir.path()).await;
    groups.create(group("polls", pinned(60_000))).await.unwrap();
    let base = append(&store, "c-y", 2).await;
    // Two polls without a consumer name (both "http"): the first takes the stream's first
    // event; the second gets nothing of that stream until it is acknowledged.
    let first = groups
        .poll("polls", "http", 1, Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(first[0].event.position.0, base);
    let second = groups
        .poll("polls", "http", 1, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(
        second.is_empty(),
        "a second poll got {:?} while the first held the stream",
        second
            .iter()
            .map(|m| m.event.position.0)
            .collect::<Vec<_>>()
    );
    groups.ack("polls", ids(&first)).await.unwrap();
    let third = groups
        .poll("polls", "http", 1, Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(third[0].event.position.0, base + 1);
    stop(store, groups, hub).await;
}

/// A group holds its window by bytes, not only by count: an idle group over large events holds
/// about `bufferBytes` (plus one store page), and one poll answer holds no more.
#[tokio::test]
async fn windows_and_batches_of_large_events_are_bounded_by_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (store, groups, hub) = open(dir.path()).await;
    const EVENTS: usize = 200;
    let pad = "x".repeat(100 * 1024);
    for i in 0..EVENTS {
        store
            .append(AppendRequest {
                stream: StreamName::new(format!("big-{}", i % 7)).unwrap(),
                expected: ExpectedRevision::Any,
                condition: None,
                events: vec![ProposedEvent::new(
                    EventType::new("Large").unwrap(),
                    EventData::json(format!("{{\"i\":{i},\"pad\":\"{pad}\"}}")).unwrap(),
                )],
            })
            .await
            .unwrap();
    }
    let settings = GroupSettings::default();
    assert_eq!(settings.buffer_bytes, 1024 * 1024, "the default");
    groups.create(group("large", settings)).await.unwrap();
    // The group fills its window with nobody taking: wait until it stops growing.
    let mut held = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = groups.info("large").await.unwrap().stats.available;
        if now == held && now > 0 {
            break;
        }
        held = now;
    }
    let event_bytes = 100 * 1024 + 200;
    let bound = 1024 * 1024 + MAX_READ_PAGE_BYTES + event_bytes;
    assert!(
        held * event_bytes <= bound,
        "an idle group holds {held} events of 100 KiB, over about {bound} bytes"
    );
    // A poll for all of them gets no more than the window, and everything arrives in the end,
    // once each, in order.
    let mut seen = Vec::new();
    while seen.len() < EVENTS {
        let batch = groups.poll("large", "c", EVENTS, WAIT).await.unwrap();
        assert!(!batch.is_empty(), "after {} of {EVENTS}", seen.len());
        let bytes: usize = batch.iter().map(|m| m.event.size()).sum();
        assert!(bytes <= bound, "a poll answer of {bytes} bytes");
        let ids: Vec<String> = batch.iter().map(|m| m.ack_id.clone()).collect();
        for m in &batch {
            let data: serde_json::Value = serde_json::from_slice(m.event.data.bytes()).unwrap();
            seen.push(data["i"].as_u64().unwrap() as usize);
        }
        groups.ack("large", ids).await.unwrap();
    }
    assert_eq!(seen, (0..EVENTS).collect::<Vec<_>>());
    stop(store, groups, hub).await;
}

/// One step of the pinned-ordering property test.
#[derive(Clone, Debug)]
enum Op {
    /// Appends events to stream `s{0}`.
    Append(usize, usize),
    /// Consumer slot `0` takes what it is sent within a moment.
    Take(usize),
    /// Slot `0` acknowledges its oldest `1` messages.
    Ack(usize, usize),
    /// Slot `0` turns its oldest message down for a retry.
    Retry(usize),
    /// Slot `0` skips its oldest message.
    Skip(usize),
    /// Slot `0` leaves, and a new consumer of the same name joins.
    Leave(usize),
    /// Time passes (message timeouts are 120 ms).
    Sleep(u64),
    /// The store, hub and groups stop and start again.
    Restart,
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        3 => (0..3usize, 1..4usize).prop_map(|(s, n)| Op::Append(s, n)),
        6 => (0..2usize).prop_map(Op::Take),
        3 => (0..2usize, 1..3usize).prop_map(|(c, n)| Op::Ack(c, n)),
        1 => (0..2usize).prop_map(Op::Retry),
        1 => (0..2usize).prop_map(Op::Skip),
        1 => (0..2usize).prop_map(Op::Leave),
        2 => (0..200u64).prop_map(Op::Sleep),
        1 => Just(Op::Restart),
    ]
}

/// What the test knows: every appended event (position to stream), the positions settled for
/// good (an ack or skip the group answered as done), each slot's messages received and not yet
/// acknowledged or turned down by it, oldest first, and the positions each slot's consumer was
/// sent and that are not settled. A slot may still be sent a message it saw before (a timeout
/// redelivers it, perhaps behind an older batch it has not read), so `seen` forgets a position
/// only when it is settled or the consumer leaves.
struct Model {
    streams: BTreeMap<u64, String>,
    done: BTreeSet<u64>,
    held: [Vec<GroupMessage>; 2],
    seen: [BTreeSet<u64>; 2],
    /// The latest delivery of each position any consumer received.
    latest: BTreeMap<u64, u32>,
}

impl Model {
    /// An ack or nack answered `done` must be of the latest delivery a consumer received: a
    /// stale one (the message went out again since) settles nothing.
    fn check_settled(&self, message: &GroupMessage, done: usize) -> Result<(), String> {
        let position = message.event.position.0;
        let latest = self.latest.get(&position).copied().unwrap_or(0);
        if done > 0 && message.deliveries < latest {
            return Err(format!(
                "a stale ack or nack of delivery {} of position {position} settled it, though \
                 delivery {latest} was out",
                message.deliveries
            ));
        }
        Ok(())
    }

    fn settle(&mut self, position: u64) {
        self.done.insert(position);
        for seen in &mut self.seen {
            seen.remove(&position);
        }
    }

    /// Pinned ordering, as consumers can see it: when a consumer receives a message, every
    /// earlier message of its stream is settled or was sent to that same consumer (received
    /// before it), so no two consumers ever work on one stream at once.
    fn receive(&mut self, slot: usize, batch: Vec<GroupMessage>) -> Result<(), String> {
        for message in batch {
            let position = message.event.position.0;
            let stream = message.event.stream.as_str().to_owned();
            for (&earlier, s) in self.streams.range(..position) {
                if *s == stream
                    && !self.done.contains(&earlier)
                    && !self.seen[slot].contains(&earlier)
                {
                    return Err(format!(
                        "slot {slot} got position {position} of {stream} while {earlier} of it \
                         was neither settled nor sent to that slot (seen: {:?})",
                        self.seen
                    ));
                }
            }
            self.seen[slot].insert(position);
            let latest = self.latest.entry(position).or_default();
            *latest = (*latest).max(message.deliveries);
            self.held[slot].retain(|m| m.event.position.0 != position);
            self.held[slot].push(message);
        }
        Ok(())
    }
}

async fn pinned_run(ops: Vec<Op>) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let (mut store, mut groups, mut hub) = open(dir.path()).await;
    let settings = GroupSettings {
        strategy: Strategy::Pinned,
        message_timeout_ms: 120,
        max_deliveries: 10_000,
        retry_delay_ms: 5,
        max_retry_delay_ms: 5,
        ..GroupSettings::default()
    };
    groups.create(group("p", settings)).await.unwrap();
    let names = ["a", "b"];
    let mut consumers = Vec::new();
    for name in names {
        consumers.push(groups.join("p", name, "test", 3).await.unwrap());
    }
    let mut model = Model {
        streams: BTreeMap::new(),
        done: BTreeSet::new(),
        held: [Vec::new(), Vec::new()],
        seen: [BTreeSet::new(), BTreeSet::new()],
        latest: BTreeMap::new(),
    };
    for op in ops {
        match op {
            Op::Append(s, n) => {
                let first = append(&store, &format!("s{s}"), n).await;
                for p in first..first + n as u64 {
                    model.streams.insert(p, format!("s{s}"));
                }
            }
            Op::Take(c) => {
                if let Ok(event) =
                    tokio::time::timeout(Duration::from_millis(30), consumers[c].next()).await
                {
                    match event {
                        ConsumerEvent::Messages(batch) => model.receive(c, batch)?,
                        ConsumerEvent::Ended(e) => return Err(format!("consumer ended: {e}")),
                    }
                }
            }
            Op::Ack(c, n) => {
                let n = n.min(model.held[c].len());
                let acked: Vec<GroupMessage> = model.held[c].drain(..n).collect();
                for message in acked {
                    let outcome = groups.ack("p", vec![message.ack_id.clone()]).await.unwrap();
                    model.check_settled(&message, outcome.done)?;
                    if outcome.done == 1 {
                        model.settle(message.event.position.0);
                    }
                }
            }
            Op::Retry(c) | Op::Skip(c) if !model.held[c].is_empty() => {
                let message = model.held[c].remove(0);
                let action = match op {
                    Op::Skip(_) => NackAction::Skip,
                    _ => NackAction::Retry,
                };
                let outcome = groups
                    .nack("p", vec![message.ack_id.clone()], action, "test".into())
                    .await
                    .unwrap();
                model.check_settled(&message, outcome.done)?;
                if outcome.done == 1 && matches!(op, Op::Skip(_)) {
                    model.settle(message.event.position.0);
                }
                if outcome.done == 1 && matches!(op, Op::Retry(_)) {
                    // The later messages of its stream this consumer holds are taken back.
                    let stream = message.event.stream.clone();
                    let position = message.event.position.0;
                    model.held[c]
                        .retain(|m| m.event.stream != stream || m.event.position.0 < position);
                }
            }
            Op::Retry(_) | Op::Skip(_) => {}
            Op::Leave(c) => {
                consumers[c] = groups.join("p", names[c], "test", 3).await.unwrap();
                model.held[c].clear();
                model.seen[c].clear();
            }
            Op::Sleep(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
            Op::Restart => {
                drop(consumers);
                stop(store, groups, hub).await;
                (store, groups, hub) = open(dir.path()).await;
                consumers = Vec::new();
                for name in names {
                    consumers.push(groups.join("p", name, "test", 3).await.unwrap());
                }
                model.held = [Vec::new(), Vec::new()];
                model.seen = [BTreeSet::new(), BTreeSet::new()];
                // Delivery counts start again with the group.
                model.latest.clear();
            }
        }
    }
    // In the end every event is delivered and settled: nothing is lost.
    let deadline = std::time::Instant::now() + WAIT;
    while model.streams.keys().any(|p| !model.done.contains(p)) {
        if std::time::Instant::now() > deadline {
            let missing: Vec<_> = model
                .streams
                .keys()
                .filter(|p| !model.done.contains(p))
                .collect();
            return Err(format!("never settled: {missing:?}"));
        }
        for (c, consumer) in consumers.iter_mut().enumerate() {
            if let Ok(ConsumerEvent::Messages(batch)) =
                tokio::time::timeout(Duration::from_millis(20), consumer.next()).await
            {
                model.receive(c, batch)?;
            }
            let held: Vec<GroupMessage> = model.held[c].drain(..).collect();
            for message in held {
                let outcome = groups.ack("p", vec![message.ack_id.clone()]).await.unwrap();
                model.check_settled(&message, outcome.done)?;
                if outcome.done == 1 {
                    model.settle(message.event.position.0);
                }
            }
        }
    }
    drop(consumers);
    stop(store, groups, hub).await;
    Ok(())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: 24,
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// Pinned ordering and no loss under timeouts, nacks, skips, leaves and restarts.
    #[test]
    fn pinned_groups_keep_stream_order_and_lose_nothing(
        ops in proptest::collection::vec(op(), 1..30)
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let result = runtime.block_on(pinned_run(ops));
        proptest::prop_assert!(result.is_ok(), "{}", result.unwrap_err());
    }
}

/// Two owners of one group at once, as two nodes of a shared store might be for a moment:
/// the one whose state write finds the other's stops its consumers (it is fenced), opens the
/// group again from the state the other wrote, and serves on from there; once its own hub is
/// stopping (its term ended), a fenced owner stays stopped.
#[tokio::test]
async fn an_owner_fenced_by_another_stops_and_opens_the_group_again_from_its_state() {
    let dir = tempfile::tempdir().unwrap();
    let (store, groups_a, hub) = open(dir.path()).await;
    let settings = GroupSettings {
        checkpoint_after_ms: 10,
        message_timeout_ms: 60_000,
        ..GroupSettings::default()
    };
    groups_a.create(group("d", settings)).await.unwrap();
    // The second owner runs on a scope of the same hub, as a term on another node would.
    let scope_b = hub.scoped();
    let groups_b = Groups::start(scope_b.clone()).await.unwrap();
    let base = append(&store, "order-1", 30).await;

    // A takes ten and acknowledges them: its checkpoint moves past them.
    let mut on_a = groups_a.join("d", "a", "test", 10).await.unwrap();
    let taken = next(&mut on_a).await;
    assert_eq!(taken.len(), 10);
    groups_a.ack("d", ids(&taken)).await.unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while groups_a.info("d").await.unwrap().stats.checkpoint < base + 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "A wrote no checkpoint"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // B, which read the state before A wrote, delivers and acknowledges too; its checkpoint
    // write expects the revision it read, finds A's, and B ends its consumer.
    let mut on_b = groups_b.join("d", "b", "test", 5).await.unwrap();
    let stale = next(&mut on_b).await;
    groups_b.ack("d", ids(&stale)).await.unwrap();
    match tokio::time::timeout(WAIT, async {
        loop {
            if let ConsumerEvent::Ended(e) = on_b.next().await {
                return e;
            }
        }
    })
    .await
    {
        Ok(Error::Unavailable(reason)) => assert!(reason.contains("moved"), "{reason}"),
        other => panic!("B's consumer was not ended by the fence: {other:?}"),
    }

    // B is still an owner (its hub is not stopping): it opens the group again from A's
    // checkpoint, not from where it was.
    let deadline = tokio::time::Instant::now() + WAIT;
    let info = loop {
        if let Ok(info) = groups_b.info("d").await {
            break info;
        }
        assert!(tokio::time::Instant::now() < deadline, "B never reopened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(info.stats.checkpoint >= base + 10, "{:?}", info.stats);
    let mut on_b = groups_b.join("d", "b", "test", 30).await.unwrap();
    let after = next(&mut on_b).await;
    assert!(
        after.iter().all(|m| m.event.position.0 >= base + 10),
        "B delivered what A's acknowledged checkpoint had passed: {:?}",
        keys(&after)
    );
    drop(on_b);

    // B's term ends: its group stops for good (its supervisor does not open it again), and A
    // goes on serving.
    scope_b.shutdown();
    tokio::time::timeout(WAIT, groups_b.stopped())
        .await
        .expect("B's group stops when its term ends");
    let rest = next(&mut on_a).await;
    groups_a.ack("d", ids(&rest)).await.unwrap();
    drop(on_a);
    stop(store, groups_a, hub).await;
}

/// A group on a hub scoped to a lease (`Hub::scoped_until`) serves while the lease is
/// extended, and stops by itself when it runs out, with no one calling `shutdown`: its
/// consumers are ended and it writes nothing more, not even the last checkpoint a stop writes.
#[tokio::test]
async fn a_group_on_a_hub_scoped_to_a_lease_stops_by_itself_when_the_lease_runs_out() {
    let dir = tempfile::tempdir().unwrap();
    // No group exists yet, so the groups on the hub itself run none.
    let (store, unused, hub) = open(dir.path()).await;
    // Created in one term, which ends; checkpoints only when a group stops.
    let settings = GroupSettings {
        checkpoint_after_ms: 600_000,
        ..GroupSettings::default()
    };
    let first = hub.scoped();
    let setup = Groups::start(first.clone()).await.unwrap();
    setup.create(group("d", settings)).await.unwrap();
    first.shutdown();
    setup.stopped().await;

    let lease = Duration::from_millis(300);
    let term = hub.scoped_until(std::time::Instant::now() + lease);
    let groups = Groups::start(term.clone()).await.unwrap();
    append(&store, "order-1", 20).await;
    let mut c = groups.join("d", "c", "test", 5).await.unwrap();
    // Extended for a while: it serves on.
    for _ in 0..4 {
        term.extend(std::time::Instant::now() + lease);
        let batch = next(&mut c).await;
        groups.ack("d", ids(&batch)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(!term.is_stopping());
    let checkpoints = StreamName::system("$group-d").unwrap();
    let written = store.stream_head(&checkpoints).await.unwrap();
    // Not extended: it stops at the end of the lease, though its acknowledgements are not
    // checkpointed yet.
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            if let ConsumerEvent::Ended(e) = c.next().await {
                return e;
            }
        }
    })
    .await
    .expect("the consumer is ended when the lease runs out");
    assert!(matches!(ended, Error::Unavailable(_)), "{ended}");
    assert!(term.expired() && term.is_stopping());
    // A renewal that comes back too late does not bring the term back: it has stopped.
    term.extend(std::time::Instant::now() + Duration::from_secs(60));
    assert!(term.expired() && term.is_stopping());
    tokio::time::timeout(WAIT, groups.stopped()).await.unwrap();
    assert_eq!(
        store.stream_head(&checkpoints).await.unwrap(),
        written,
        "a checkpoint was written after the lease ran out"
    );
    drop(c);
    stop(store, unused, hub).await;
}
