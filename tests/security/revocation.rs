//! Revocation and rule changes reach streams that are already open (issue 25): an SSE
//! subscription, a WebSocket with a catch-up subscription and a group consumer, a gRPC
//! subscription and a gRPC group consumer each end with the problem at their next delivery,
//! and deliver nothing after the change.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use skald_proto::v1 as pb;
use skald_proto::v1::groups_client::GroupsClient;
use skald_proto::v1::subscriptions_client::SubscriptionsClient;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tonic::transport::Channel;
use tonic::{Code, Request};

use crate::common::{Api, serve_with_config};

fn authorized<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// Appends one event whose data carries `marker`.
async fn append(api: &Api, admin: &str, marker: &str) {
    let body = json!({"events": [{"type": "Happened", "data": {"marker": marker}}]});
    let a = api
        .call(
            Method::POST,
            "/v1/streams/order-1",
            Some(admin),
            &body.to_string(),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
}

/// Reads an SSE body until `needle` shows up; false when the body ends first.
async fn sse_until(body: &mut hyper::body::Incoming, text: &mut String, needle: &str) -> bool {
    loop {
        if text.contains(needle) {
            return true;
        }
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("the SSE stream moves within 10 s");
        match frame {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    text.push_str(&String::from_utf8_lossy(&data));
                }
            }
            _ => return false,
        }
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next text message, or `None` once the socket closed.
async fn ws_next(ws: &mut Socket) -> Option<Value> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a message within 10 s");
        match message {
            Some(Ok(Message::Text(text))) => return Some(serde_json::from_str(&text).unwrap()),
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
            Some(Ok(_)) => {}
        }
    }
}

/// What the socket says about `id` until it reports an error: the markers it delivered, and
/// the error.
async fn ws_until_error(ws: &mut Socket, ids: &[&str]) -> Vec<(String, Value)> {
    let mut errors = Vec::new();
    while errors.len() < ids.len() {
        let m = ws_next(ws).await.expect("the socket stays open");
        if m["type"] == "error" {
            errors.push((m["id"].as_str().unwrap_or("").to_owned(), m.clone()));
        } else {
            assert!(
                !m.to_string().contains("after-rules"),
                "delivered after the rules changed: {m}"
            );
        }
    }
    errors
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_and_rule_changes_end_open_streams() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_with_config(dir.path(), "[auth]\napi_keys = true\n");
    let api = Api::new(&server.url);
    let admin = std::fs::read_to_string(dir.path().join("data/initial-admin-key")).unwrap();
    let admin = admin.trim().to_owned();
    let rules = json!({"rules": [
        {"role": "watcher", "allow": ["read", "subscribe"], "on": ["order*"]}
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
    let sse_key = api.key(&admin, "sse-watcher", &["watcher"]).await;
    let ws_key = api.key(&admin, "ws-watcher", &["watcher"]).await;
    let consumer_key = api.key(&admin, "grpc-consumer", &["watcher"]).await;
    let subscriber_key = api.key(&admin, "grpc-subscriber", &["watcher"]).await;
    for group in ["web", "rpc"] {
        let created = api
            .call(
                Method::POST,
                "/v1/groups",
                Some(&admin),
                &json!({"name": group, "source": {"category": "order"}}).to_string(),
            )
            .await;
        assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    }

    // Every kind of stream, open.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let sse = hyper::Request::get(format!(
        "{}/v1/subscribe/categories/order?from=now",
        server.url
    ))
    .header("authorization", format!("Bearer {sse_key}"))
    .body(http_body_util::Full::default())
    .unwrap();
    let sse = client.request(sse).await.unwrap();
    assert_eq!(sse.status(), StatusCode::OK);
    let mut sse_body = sse.into_body();
    let mut sse_text = String::new();
    assert!(sse_until(&mut sse_body, &mut sse_text, "retry:").await);

    let ws_url = format!("{}/v1/ws", server.url.replace("http://", "ws://"));
    let mut request = ws_url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {ws_key}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    for subscribe in [
        json!({"type": "subscribe", "id": "s", "source": {"category": "order"}, "from": "now"}),
        json!({"type": "subscribe", "id": "g", "group": "web"}),
    ] {
        ws.send(Message::Text(subscribe.to_string().into()))
            .await
            .unwrap();
        // A caught-up of the first subscription may come before the second's answer.
        let reply = loop {
            let m = ws_next(&mut ws).await.unwrap();
            if m["type"] != "caught-up" {
                break m;
            }
        };
        assert_eq!(reply["type"], "subscribed", "{reply}");
    }

    let channel = Channel::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut subscription = SubscriptionsClient::new(channel.clone())
        .subscribe(authorized(
            pb::SubscribeRequest {
                source: Some(pb::Source {
                    kind: Some(pb::source::Kind::Category("order".into())),
                }),
                start: Some(pb::subscribe_request::Start::At(pb::StartAt::Now as i32)),
            },
            &subscriber_key,
        ))
        .await
        .unwrap()
        .into_inner();
    // The request stream stays open: a consumer whose requests end is ended.
    let join = futures_util::stream::iter([pb::ConsumeRequest {
        kind: Some(pb::consume_request::Kind::Join(pb::Join {
            group: "rpc".into(),
            consumer: String::new(),
            capacity: 10,
        })),
    }])
    .chain(futures_util::stream::pending());
    let mut consumer = GroupsClient::new(channel.clone())
        .consume(authorized(join, &consumer_key))
        .await
        .unwrap()
        .into_inner();
    let joined = consumer.message().await.unwrap().unwrap();
    assert!(matches!(
        joined.kind,
        Some(pb::consume_response::Kind::Joined(_))
    ));

    // Each delivers while access holds.
    append(&api, &admin, "before").await;
    assert!(sse_until(&mut sse_body, &mut sse_text, "before").await);
    let mut delivered = 0;
    while delivered < 2 {
        let m = ws_next(&mut ws).await.unwrap();
        if m.to_string().contains("before") {
            delivered += 1;
        }
    }
    let next = |m: &pb::SubscribeResponse| {
        matches!(&m.kind, Some(pb::subscribe_response::Kind::Events(b))
                 if b.events.iter().any(|e| String::from_utf8_lossy(&e.data).contains("before")))
    };
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), subscription.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if next(&m) {
            break;
        }
    }
    let m = tokio::time::timeout(Duration::from_secs(10), consumer.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(
        m.kind,
        Some(pb::consume_response::Kind::Messages(_))
    ));

    // Revoked keys: the SSE subscription and the gRPC consumer end, with nothing more.
    for key in [&sse_key, &consumer_key] {
        let id = key.split('_').nth(1).unwrap();
        let revoked = api
            .call(
                Method::DELETE,
                &format!("/v1/admin/keys/{id}"),
                Some(&admin),
                "",
            )
            .await;
        assert!(revoked.status.is_success());
    }
    append(&api, &admin, "after-revocation").await;
    let ended = sse_until(&mut sse_body, &mut sse_text, "event: error").await;
    assert!(ended, "the SSE stream ended without a reason: {sse_text}");
    assert!(sse_text.contains("revoked"), "{sse_text}");
    assert!(!sse_text.contains("after-revocation"), "{sse_text}");
    assert!(
        !sse_until(&mut sse_body, &mut sse_text, "after-revocation").await,
        "the SSE stream goes on"
    );
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), consumer.message())
            .await
            .expect("the consumer moves within 10 s")
        {
            Err(status) => break status,
            Ok(Some(m)) => assert!(
                !format!("{m:?}").contains("after-revocation"),
                "delivered after revocation: {m:?}"
            ),
            Ok(None) => panic!("the consumer ended without a status"),
        }
    };
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("revoked"), "{status:?}");

    // Rules that no longer allow them: the WebSocket's subscription and group consumer, and
    // the gRPC subscription, end.
    let set = api
        .call(
            Method::PUT,
            "/v1/admin/rules",
            Some(&admin),
            r#"{"rules": []}"#,
        )
        .await;
    assert_eq!(set.status, StatusCode::OK);
    append(&api, &admin, "after-rules").await;
    let errors = ws_until_error(&mut ws, &["s", "g"]).await;
    for (id, error) in &errors {
        assert_eq!(error["problem"]["status"], 403, "{id}: {error}");
    }
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), subscription.message())
            .await
            .expect("the subscription moves within 10 s")
        {
            Err(status) => break status,
            Ok(Some(m)) => assert!(
                !format!("{m:?}").contains("after-rules"),
                "delivered after the rules changed: {m:?}"
            ),
            Ok(None) => panic!("the subscription ended without a status"),
        }
    };
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    // A revoked key's socket answers its next message with the reason, and closes.
    let id = ws_key.split('_').nth(1).unwrap();
    let revoked = api
        .call(
            Method::DELETE,
            &format!("/v1/admin/keys/{id}"),
            Some(&admin),
            "",
        )
        .await;
    assert!(revoked.status.is_success());
    ws.send(Message::Text(json!({"type": "ping"}).to_string().into()))
        .await
        .unwrap();
    let reply = ws_next(&mut ws).await.expect("an error before the close");
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["problem"]["reason"], "revoked", "{reply}");
    assert!(ws_next(&mut ws).await.is_none(), "the socket closes");

    // The group got back what the ended consumers held: a new consumer receives it.
    let m = api
        .call(
            Method::GET,
            "/v1/groups/rpc/messages?wait=2000&count=10",
            Some(&admin),
            "",
        )
        .await;
    assert_eq!(m.status, StatusCode::OK, "{:?}", m.body);
    assert!(
        String::from_utf8_lossy(&m.body).contains("after-revocation"),
        "{:?}",
        m.body
    );
}
