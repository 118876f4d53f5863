//! The gRPC API behind the same guard as HTTP: credentials checked (UNAUTHENTICATED with the
//! reason), rules applied per method (PERMISSION_DENIED), multi-stream subscriptions filtered,
//! groups needing every stream, health and reflection public, and gRPC over TLS (ALPN h2) with
//! a client certificate.

use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::json;
use skald_proto::v1 as pb;
use skald_proto::v1::groups_client::GroupsClient;
use skald_proto::v1::streams_client::StreamsClient;
use skald_proto::v1::subscriptions_client::SubscriptionsClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;

use crate::common::{Api, serve_with_config};

fn authorized<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

fn append(stream: &str) -> pb::AppendRequest {
    pb::AppendRequest {
        stream: stream.to_owned(),
        expected_revision: None,
        condition: None,
        events: vec![pb::ProposedEvent {
            r#type: "Happened".into(),
            data: b"{}".to_vec(),
            ..Default::default()
        }],
    }
}

fn source(kind: pb::source::Kind) -> Option<pb::Source> {
    Some(pb::Source { kind: Some(kind) })
}

fn reason(status: &Status) -> (String, String) {
    let details = status.get_error_details();
    let info = details.error_info().expect("an ErrorInfo");
    (
        info.reason.clone(),
        info.metadata.get("reason").cloned().unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_pass_the_same_guard_and_rules() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_with_config(dir.path(), "[auth]\napi_keys = true\n");
    let api = Api::new(&server.url);
    let admin = std::fs::read_to_string(dir.path().join("data/initial-admin-key"))
        .unwrap()
        .trim()
        .to_owned();
    let rules = json!({"rules": [
        {"role": "reader", "allow": ["read"], "on": ["order-*"]},
        {"role": "subscriber", "allow": ["read", "subscribe"], "on": ["order*"]},
    ]});
    let set = api
        .call(
            Method::PUT,
            "/v1/admin/rules",
            Some(&admin),
            &rules.to_string(),
        )
        .await;
    assert_eq!(set.status, StatusCode::OK);
    let reader = api.key(&admin, "reader-key", &["reader"]).await;
    let subscriber = api.key(&admin, "subscriber-key", &["subscriber"]).await;

    let channel = Channel::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut streams = StreamsClient::new(channel.clone());

    // No credentials, a wrong key: UNAUTHENTICATED, saying why.
    let missing = streams
        .append(authorized(append("order-1"), None))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert_eq!(
        reason(&missing),
        ("unauthenticated".into(), "missing".into())
    );
    let wrong = streams
        .info(authorized(pb::InfoRequest {}, Some(&format!("{admin}x"))))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert_eq!(reason(&wrong).1, "wrong-secret");
    assert!(!wrong.message().contains(&admin[23..]), "{wrong:?}");

    // The admin appends; the reader reads order-* and nothing else, and may not append.
    for stream in ["order-1", "payment-1", "order-2"] {
        streams
            .append(authorized(append(stream), Some(&admin)))
            .await
            .unwrap();
    }
    let denied = streams
        .append(authorized(append("order-1"), Some(&reader)))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(reason(&denied).0, "forbidden");
    assert!(denied.message().contains("reader-key"), "{denied:?}");
    let read = |stream: &str, token: &str| {
        let request = authorized(
            pb::ReadRequest {
                source: source(pb::source::Kind::Stream(stream.into())),
                ..Default::default()
            },
            Some(token),
        );
        let mut client = streams.clone();
        async move { client.read(request).await.map(|_| ()) }
    };
    read("order-1", &reader).await.unwrap();
    assert_eq!(
        read("payment-1", &reader).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    assert_eq!(
        read("$audit", &reader).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    read("$audit", &admin).await.unwrap();

    // Subscriptions: the reader may not subscribe; the subscriber's view of the global log is
    // filtered to order streams.
    let mut subscriptions = SubscriptionsClient::new(channel.clone());
    let all = || pb::SubscribeRequest {
        source: source(pb::source::Kind::All(Default::default())),
        start: None,
    };
    let denied = subscriptions
        .subscribe(authorized(all(), Some(&reader)))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    let mut sub = subscriptions
        .subscribe(authorized(all(), Some(&subscriber)))
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(20), sub.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match message.kind.unwrap() {
            pb::subscribe_response::Kind::Events(batch) => {
                seen.extend(batch.events.into_iter().map(|e| e.stream));
            }
            pb::subscribe_response::Kind::CaughtUp(_) => break,
        }
    }
    assert_eq!(seen, ["order-1", "order-2"]);

    // Groups: joining needs subscribe and read on every stream of the group's source.
    for (name, source) in [
        ("orders", json!({"category": "order"})),
        ("payments", json!({"category": "payment"})),
    ] {
        let created = api
            .call(
                Method::POST,
                "/v1/groups",
                Some(&admin),
                &json!({"name": name, "source": source}).to_string(),
            )
            .await;
        assert_eq!(created.status, StatusCode::CREATED);
    }
    let join = |group: &str, token: &str| {
        let request = authorized(
            futures_util::stream::iter([pb::ConsumeRequest {
                kind: Some(pb::consume_request::Kind::Join(pb::Join {
                    group: group.into(),
                    consumer: String::new(),
                    capacity: 1,
                })),
            }]),
            Some(token),
        );
        let mut client = GroupsClient::new(channel.clone());
        async move { client.consume(request).await.map(|_| ()) }
    };
    join("orders", &subscriber).await.unwrap();
    let create = |name: &str, category: &str, token: &str| {
        let request = authorized(
            pb::CreateGroupRequest {
                name: name.into(),
                source: source(pb::source::Kind::Category(category.into())),
                start: None,
                settings: None,
            },
            Some(token),
        );
        let mut client = GroupsClient::new(channel.clone());
        async move { client.create(request).await.map(|_| ()) }
    };
    create("mine", "order", &subscriber).await.unwrap();
    assert_eq!(
        create("theirs", "payment", &subscriber)
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let listed = GroupsClient::new(channel.clone())
        .list(authorized(pb::ListGroupsRequest {}, Some(&subscriber)))
        .await
        .unwrap()
        .into_inner()
        .groups;
    let mut names: Vec<_> = listed.into_iter().map(|g| g.name).collect();
    names.sort();
    assert_eq!(
        names,
        ["mine", "orders"],
        "the list shows what the caller may use"
    );
    assert_eq!(
        join("payments", &subscriber).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    assert_eq!(
        join("orders", &reader).await.unwrap_err().code(),
        Code::PermissionDenied
    );

    // Sagas need the saga permission.
    let denied = skald_proto::v1::sagas_client::SagasClient::new(channel.clone())
        .list_instances(authorized(
            pb::ListSagaInstancesRequest::default(),
            Some(&reader),
        ))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    skald_proto::v1::sagas_client::SagasClient::new(channel.clone())
        .list_instances(authorized(
            pb::ListSagaInstancesRequest::default(),
            Some(&admin),
        ))
        .await
        .unwrap();

    // Health checks and reflection need no credentials, like /health/* and the OpenAPI document.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // Watches, which need no credentials and never end by themselves, are bounded per address.
    let mut watches = Vec::new();
    let refused = loop {
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        match health
            .watch(tonic_health::pb::HealthCheckRequest::default())
            .await
        {
            Ok(watch) => {
                let mut watch = watch.into_inner();
                assert!(watch.message().await.unwrap().is_some(), "a first status");
                watches.push(watch);
            }
            Err(status) => break status,
        }
        assert!(watches.len() <= 16, "more than 16 watches from one address");
    };
    assert_eq!(watches.len(), 16);
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("health watches"), "{refused:?}");
    // Closing one makes room for another.
    drop(watches.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        match health
            .watch(tonic_health::pb::HealthCheckRequest::default())
            .await
        {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted);
                assert!(
                    std::time::Instant::now() < deadline,
                    "the closed watch still counts"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_skald"))
        .args(["certs", "dev", "--out", certs.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let server = serve_with_config(
        dir.path(),
        &format!(
            "[tls]\ncert_file = \"{0}/server.pem\"\nkey_file = \"{0}/server-key.pem\"\nclient_ca_file = \"{0}/ca.pem\"\n[auth]\nmtls = true\n",
            certs.display()
        ),
    );
    let read = |name: &str| std::fs::read(certs.join(name)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .domain_name("localhost");
    let url = server.url.clone();

    // Without a client certificate the handshake (or the first call) fails.
    let refused = match Channel::from_shared(url.clone())
        .unwrap()
        .tls_config(tls.clone())
        .unwrap()
        .connect()
        .await
    {
        Err(_) => true,
        Ok(channel) => StreamsClient::new(channel)
            .info(pb::InfoRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "a gRPC client without a certificate was served");

    // With one (CN=dev-client, O=admin): HTTP/2 by ALPN, and the certificate is the principal.
    let channel = Channel::from_shared(url)
        .unwrap()
        .tls_config(tls.identity(Identity::from_pem(
            read("client.pem"),
            read("client-key.pem"),
        )))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut streams = StreamsClient::new(channel);
    let appended = streams
        .append(append("order-1"))
        .await
        .unwrap()
        .into_inner();
    // Served with the certificate as the principal. The refused handshake above is audited by
    // a background task, whose `$audit` event may land before or after this append.
    let info = streams.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert!(
        info.head_position >= Some(appended.first_position),
        "{info:?} {appended:?}"
    );
    drop(server);
}
