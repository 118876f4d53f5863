//! Consumer groups and sagas through the client: a group created, consumed with acks, a retry
//! and a park, its parked message replayed, its settings changed, and its deletion ending the
//! consumer; a saga registered (a replay the second time, line and column for a broken one),
//! run by a trigger event, and refused what does not apply to a finished instance.

mod support;

use std::time::Duration;

use skald_client::proto::{GroupSettings, NackAction, SagaState};
use skald_client::{Client, GroupMessage, Start};
use skald_core::{Category, Error, ReadSource};
use support::{append_json, serve};

/// The next `n` messages, however they are batched.
async fn take(consumer: &mut skald_client::Consumer, n: usize) -> Vec<GroupMessage> {
    let mut got = Vec::new();
    while got.len() < n {
        let batch = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .expect("messages arrive")
            .unwrap()
            .expect("the call goes on");
        got.extend(batch);
    }
    assert_eq!(got.len(), n, "no more than asked for: {got:?}");
    got
}

#[tokio::test]
async fn groups_through_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = serve(dir.path(), listener).await;
    let client = Client::connect(&url).await.unwrap();
    for i in 1..=5 {
        append_json(&client, &format!("job-{i}"), "Queued", "{}").await;
    }
    let source = ReadSource::Category(Category::new("job").unwrap());
    let settings = GroupSettings {
        retry_delay_ms: Some(10),
        max_retry_delay_ms: Some(10),
        max_deliveries: Some(5),
        ..Default::default()
    };
    let info = client
        .create_group("workers", &source, Start::Beginning, settings)
        .await
        .unwrap();
    assert_eq!(info.name, "workers");
    match client
        .create_group("workers", &source, Start::Beginning, settings)
        .await
    {
        Err(Error::GroupExists(name)) => assert_eq!(name, "workers"),
        other => panic!("expected GroupExists, got {other:?}"),
    }

    let mut consumer = client.consume("workers", "w1", 10).await.unwrap();
    let messages = take(&mut consumer, 5).await;
    let streams: Vec<&str> = messages.iter().map(|m| m.event.stream.as_str()).collect();
    assert_eq!(streams, ["job-1", "job-2", "job-3", "job-4", "job-5"]);
    assert!(messages.iter().all(|m| m.deliveries == 1));
    let ids: Vec<String> = messages.iter().map(|m| m.ack_id.clone()).collect();
    let outcome = consumer.ack(&ids[..3]).await.unwrap();
    assert_eq!((outcome.done, outcome.unknown.len()), (3, 0));
    let outcome = consumer
        .nack(&ids[3..4], NackAction::Retry, "try again")
        .await
        .unwrap();
    assert_eq!(outcome.done, 1);
    let outcome = consumer
        .nack(&ids[4..5], NackAction::Park, "bad data")
        .await
        .unwrap();
    assert_eq!(outcome.done, 1);
    let outcome = consumer.ack(&["nope".to_owned()]).await.unwrap();
    assert_eq!(
        (outcome.done, outcome.unknown),
        (0, vec!["nope".to_owned()])
    );

    // The retried message comes back, delivered a second time.
    let again = take(&mut consumer, 1).await;
    assert_eq!(
        (again[0].event.stream.as_str(), again[0].deliveries),
        ("job-4", 2)
    );
    consumer.ack(&[again[0].ack_id.clone()]).await.unwrap();

    // The parked one, replayed.
    let stats = client.group("workers").await.unwrap().stats.unwrap();
    assert_eq!(stats.parked, 1);
    assert_eq!(client.replay_parked("workers").await.unwrap(), 1);
    let replayed = take(&mut consumer, 1).await;
    assert_eq!(replayed[0].event.stream.as_str(), "job-5");
    consumer.ack(&[replayed[0].ack_id.clone()]).await.unwrap();

    let updated = client
        .update_group(
            "workers",
            GroupSettings {
                max_deliveries: Some(9),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let kept = updated.settings.unwrap();
    assert_eq!(
        (kept.max_deliveries, kept.retry_delay_ms),
        (Some(9), Some(10))
    );
    let names: Vec<String> = client
        .list_groups()
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.name)
        .collect();
    assert_eq!(names, ["workers"]);
    assert!(matches!(
        client.group("missing").await,
        Err(Error::GroupNotFound(_))
    ));

    // Deleting the group ends its consumer's call.
    client.delete_group("workers").await.unwrap();
    match tokio::time::timeout(Duration::from_secs(30), consumer.next())
        .await
        .expect("the call ends")
    {
        Err(Error::GroupNotFound(_)) => {}
        other => panic!("expected GroupNotFound, got {other:?}"),
    }
    server.stop().await;
}

const SHIPMENT: &str = r#"
name: shipment
version: 1
trigger: {category: order, types: [Placed]}
correlationKey: /stream
steps:
  - name: reserve
    action: {append: {stream: "stock-{{saga.correlationKey}}", type: Reserve}}
    compensation: {append: {stream: "stock-{{saga.correlationKey}}", type: Release}}
  - name: ship
    pivot: true
    action: {append: {stream: "ship-{{saga.correlationKey}}", type: Ship}}
"#;

#[tokio::test]
async fn sagas_through_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = serve(dir.path(), listener).await;
    let client = Client::connect(&url).await.unwrap();

    let registered = client.register_saga(SHIPMENT).await.unwrap();
    assert_eq!(
        (
            registered.name.as_str(),
            registered.version,
            registered.replayed
        ),
        ("shipment", 1, false)
    );
    assert!(client.register_saga(SHIPMENT).await.unwrap().replayed);
    let broken = SHIPMENT.replace("    pivot: true\n", "    pivot: maybe\n");
    match client.register_saga(&broken).await {
        Err(Error::InvalidSaga(detail)) => assert!(detail.contains("line 11"), "{detail}"),
        other => panic!("expected InvalidSaga, got {other:?}"),
    }
    let definitions = client.saga_definitions().await.unwrap();
    assert_eq!(definitions.len(), 1);
    assert_eq!(definitions[0].latest_version, 1);
    let definition = client.saga_definition("shipment", Some(1)).await.unwrap();
    assert!(
        definition.json.contains("\"reserve\""),
        "{}",
        definition.json
    );

    append_json(&client, "order-7", "Placed", "{}").await;
    let finished = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let done = client
                .saga_instances(Some(SagaState::Completed), Some("shipment"), 0)
                .await
                .unwrap();
            if let Some(instance) = done.into_iter().next() {
                return instance;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the saga completes");
    assert_eq!(finished.correlation_key, "order-7");
    assert_eq!(finished.completed_steps, ["reserve", "ship"]);
    let instance = client.saga_instance(&finished.saga_id).await.unwrap();
    assert!(
        instance.history.iter().any(|h| h.r#type == "SagaCompleted"),
        "{:?}",
        instance.history
    );
    assert!(matches!(
        client.retry_saga(&finished.saga_id).await,
        Err(Error::SagaConflict(_))
    ));
    assert!(matches!(
        client
            .cancel_saga(&finished.saga_id, "changed my mind")
            .await,
        Err(Error::SagaConflict(_))
    ));
    assert!(matches!(
        client.saga_instance("no-such-saga").await,
        Err(Error::SagaNotFound(_))
    ));

    assert!(client.disable_saga("shipment").await.unwrap().changed);
    assert!(!client.disable_saga("shipment").await.unwrap().changed);
    assert!(!client.saga_definitions().await.unwrap()[0].enabled);
    assert!(client.enable_saga("shipment").await.unwrap().changed);
    assert!(client.delete_saga("shipment").await.unwrap().changed);
    assert!(client.saga_definitions().await.unwrap().is_empty());
    assert!(matches!(
        client.enable_saga("shipment").await,
        Err(Error::SagaNotFound(_))
    ));
    server.stop().await;
}
