//! The limits against abuse and the CLI's admin commands: WebSocket subscriptions checked per
//! subscription, CORS off by default and on for listed origins, oversized headers (431), slow
//! clients dropped after the header-read timeout, and `skald keys` / `skald rules`.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::common::{Api, serve_with_config};
use crate::support::skald;

async fn ws_next(
    ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a message in time")
            .expect("the socket is open")
            .unwrap();
        if let Message::Text(text) = message {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_admin_commands_websocket_checks_cors_and_header_limits() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_with_config(
        dir.path(),
        "[auth]\napi_keys = true\n[http]\ncors_allowed_origins = [\"https://app.example\"]\nheader_read_timeout_ms = 500\nmax_header_bytes = 8192\n",
    );
    let api = Api::new(&server.url);
    let key_file = dir.path().join("data/initial-admin-key");
    let admin = std::fs::read_to_string(&key_file)
        .unwrap()
        .trim()
        .to_owned();

    // The CLI: rules from a file, a key made and listed and revoked, with the key from a file.
    let rules = dir.path().join("rules.json");
    std::fs::write(
        &rules,
        json!({"rules": [
            {"role": "subscriber", "allow": ["read", "subscribe"], "on": ["order-*"]},
            {"role": "reader", "allow": ["read"], "on": ["order-*"]}
        ]})
        .to_string(),
    )
    .unwrap();
    let base = [
        "--server",
        server.url.as_str(),
        "--token-file",
        key_file.to_str().unwrap(),
    ];
    let run = |args: &[&str]| skald(&[args, &base[..]].concat());
    let (ok, out, err) = run(&["rules", "set", rules.to_str().unwrap()]);
    assert!(ok && out.contains("revision 0, 2 rules"), "{out}{err}");
    let (ok, _, err) = run(&[
        "rules",
        "set",
        rules.to_str().unwrap(),
        "--expected-revision",
        "7",
    ]);
    assert!(!ok && err.contains("409"), "{err}");
    let (ok, out, err) = run(&["keys", "create", "--name", "ws", "--role", "subscriber"]);
    assert!(ok, "{err}");
    let subscriber = out.trim().to_owned();
    assert!(
        subscriber.starts_with("skald_") && err.contains("not shown again"),
        "{out}{err}"
    );
    let (ok, out, _) = run(&[
        "keys",
        "create",
        "--name",
        "r",
        "--role",
        "reader",
        "--expires-in",
        "1h",
    ]);
    assert!(ok);
    let reader = out.trim().to_owned();
    let (ok, out, _) = run(&["keys", "list"]);
    assert!(
        ok && out.contains("initial-admin")
            && out.contains("subscriber")
            && !out.contains(&subscriber[23..]),
        "{out}"
    );
    let (ok, _, err) = skald(&["info", "--server", &server.url]);
    assert!(
        !ok && err.contains("401") && err.contains("no credentials"),
        "{err}"
    );
    let (ok, _, err) = skald(&["keys", "list", "--server", &server.url, "--token", &reader]);
    assert!(!ok && err.contains("403"), "{err}");

    // WebSocket: the socket opens with credentials; each subscription is checked, and what
    // it delivers is filtered.
    assert_eq!(
        api.append(Some(&admin), "order-1").await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        api.append(Some(&admin), "payment-1").await.status,
        StatusCode::CREATED
    );
    let ws_url = format!("{}/v1/ws", server.url.replace("http://", "ws://"));
    let refused = tokio_tungstenite::connect_async(ws_url.as_str()).await;
    assert!(
        refused.is_err(),
        "a WebSocket without credentials was opened"
    );
    let open = |token: &str| {
        let mut request = ws_url.as_str().into_client_request().unwrap();
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        tokio_tungstenite::connect_async(request)
    };
    let (mut ws, _) = open(&reader).await.unwrap();
    ws.send(Message::Text(
        json!({"type": "subscribe", "id": "a", "source": {"all": {}}})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let reply = ws_next(&mut ws).await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["problem"]["status"], 403, "{reply}");
    let (mut ws, _) = open(&subscriber).await.unwrap();
    ws.send(Message::Text(
        json!({"type": "subscribe", "id": "a", "source": {"all": {}}, "from": 0})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let mut seen = Vec::new();
    loop {
        let m = ws_next(&mut ws).await;
        match m["type"].as_str() {
            Some("events") => seen.extend(
                m["events"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["stream"].as_str().unwrap().to_owned()),
            ),
            Some("caught-up") => break,
            _ => {}
        }
    }
    assert_eq!(
        seen,
        vec!["order-1".to_owned()],
        "only the readable stream is delivered"
    );

    // CORS: a listed origin gets its headers and a preflight answer; another gets none.
    let preflight = hyper::Request::builder()
        .method(Method::OPTIONS)
        .uri(format!("{}/v1/streams/order-1", server.url))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let answer = client.request(preflight).await.unwrap();
    assert_eq!(answer.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        answer.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert!(
        answer.headers()["access-control-allow-headers"]
            .to_str()
            .unwrap()
            .contains("authorization")
    );
    for (origin, allowed) in [
        ("https://app.example", true),
        ("https://evil.example", false),
    ] {
        let request = hyper::Request::get(format!("{}/health/live", server.url))
            .header("origin", origin)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let answer = client.request(request).await.unwrap();
        assert_eq!(
            answer.headers().contains_key("access-control-allow-origin"),
            allowed,
            "{origin}"
        );
    }

    // A request head over max_header_bytes: 431.
    let addr = server.url.trim_start_matches("http://").to_owned();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let big = format!(
        "GET /health/live HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let _ = tcp.write_all(big.as_bytes()).await;
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut answer))
        .await
        .unwrap()
        .unwrap_or(0);
    let head = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 431"), "{head:?}");

    // A client that sends half a request head and stops is dropped after the timeout.
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /health/live HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "a slow client was still connected after 10 s"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_wait_until_one_closes() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_with_config(
        dir.path(),
        "[http]\nmax_connections = 2\nheader_read_timeout_ms = 60000\n",
    );
    let addr = server.url.trim_start_matches("http://").to_owned();
    // Two connections that send nothing hold both slots.
    let first = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let _second = tokio::net::TcpStream::connect(&addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut third = tokio::net::TcpStream::connect(&addr).await.unwrap();
    third
        .write_all(b"GET /health/live HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0u8; 512];
    let early = tokio::time::timeout(Duration::from_secs(1), third.read(&mut answer)).await;
    assert!(
        early.is_err(),
        "a third connection was served beyond max_connections = 2"
    );
    // One closes: the waiting connection is accepted and answered.
    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(10), third.read(&mut answer))
        .await
        .expect("served once a slot was free")
        .unwrap();
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"));
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_requests_grows_neither_the_metrics_nor_the_audit_trail() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_with_config(dir.path(), "[auth]\napi_keys = true\n");
    let api = Api::new(&server.url);
    let admin = std::fs::read_to_string(dir.path().join("data/initial-admin-key")).unwrap();
    let admin = admin.trim().to_owned();
    // Invented methods of 1 KiB each, without credentials: each answered 401.
    const FLOOD: usize = 300;
    for i in 0..FLOOD {
        let name = format!("X{i:04}{}", "M".repeat(1024));
        let method = Method::from_bytes(name.as_bytes()).unwrap();
        let a = api.call(method, "/v1/info", None, "").await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    }
    let metrics = api.call(Method::GET, "/metrics", Some(&admin), "").await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(!text.contains("MMMM"), "a made-up method became a label");
    assert!(text.contains("method=\"_OTHER\""), "{text}");
    assert!(
        text.len() < 200_000,
        "the exposition is {} bytes",
        text.len()
    );
    let value = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    };
    assert!(value("skald_auth_failures_total") >= FLOOD as f64, "{text}");
    let suppressed = value("skald_auth_failures_suppressed_total");
    assert!(suppressed > 0.0, "{text}");

    // After a pause the next failure is audited and says how many were not.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let a = api
        .call(Method::GET, "/v1/info", Some("skald_zz"), "")
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let deadline = Instant::now() + Duration::from_secs(10);
    let (failures, told) = loop {
        let audit = api
            .call(
                Method::GET,
                "/v1/streams/$audit?limit=1000",
                Some(&admin),
                "",
            )
            .await
            .json();
        let failed: Vec<Value> = audit["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == "AuthenticationFailed")
            .cloned()
            .collect();
        let told: f64 = failed
            .iter()
            .filter_map(|e| e["data"]["suppressedBefore"].as_f64())
            .sum();
        if told > 0.0 || Instant::now() > deadline {
            break (failed.len(), told);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(failures < 60, "{failures} failures audited one by one");
    assert_eq!(told, suppressed, "the audit trail counts what it left out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secrets_that_cost_a_hash_are_throttled() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_with_config(dir.path(), "[auth]\napi_keys = true\n");
    let api = Api::new(&server.url);
    let admin = std::fs::read_to_string(dir.path().join("data/initial-admin-key")).unwrap();
    let admin = admin.trim().to_owned();
    let used = api.key(&admin, "used", &[]).await;
    let unused = api.key(&admin, "unused", &[]).await;
    let wrong = |token: &str| {
        let (prefix, _) = token.rsplit_once('_').unwrap();
        format!("{prefix}_wrongsecret")
    };
    let reason = |a: &crate::common::Answer| a.json()["reason"].as_str().unwrap_or("").to_owned();
    // A key verified once is checked against its cached digest: wrong secrets cost nothing.
    // (A key with no roles learns the version from /v1/info, nothing more.)
    let info = api.call(Method::GET, "/v1/info", Some(&used), "").await;
    assert_eq!(info.status, StatusCode::OK);
    assert_eq!(
        info.json().as_object().unwrap().keys().collect::<Vec<_>>(),
        ["version"]
    );
    for _ in 0..15 {
        let a = api
            .call(Method::GET, "/v1/info", Some(&wrong(&used)), "")
            .await;
        assert_eq!(reason(&a), "wrong-secret");
    }
    // A key not verified since the start costs argon2 per guess: ten, then throttled.
    let mut reasons = Vec::new();
    for _ in 0..12 {
        let a = api
            .call(Method::GET, "/v1/info", Some(&wrong(&unused)), "")
            .await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
        reasons.push(reason(&a));
    }
    assert_eq!(reasons[..10], vec!["wrong-secret"; 10][..], "{reasons:?}");
    assert_eq!(reasons[10..], ["throttled", "throttled"], "{reasons:?}");
}
