//! What held in the break-in review of issue 25, kept holding: system streams behind encoding
//! tricks on every door, a second Authorization header, keys of another store, request
//! smuggling with Content-Length and Transfer-Encoding, and X-Forwarded-For against the
//! per-address limit.

use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{Api, serve_with_config};

/// Sends raw bytes and returns everything the server answers until it closes or goes quiet.
async fn raw(url: &str, request: &[u8]) -> String {
    let addr = url.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_doors_that_held_keep_holding() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_with_config(
        dir.path(),
        "[auth]\napi_keys = true\n[rate_limit]\nper_address = { rate = 0.1, burst = 400 }\n",
    );
    let api = Api::new(&server.url);
    let admin = std::fs::read_to_string(dir.path().join("data/initial-admin-key")).unwrap();
    let admin = admin.trim().to_owned();
    let rules = json!({"rules": [
        {"role": "everything", "allow": ["read", "append", "subscribe"], "on": ["*"]}
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
    let wide = api.key(&admin, "wide", &["everything"]).await;

    // System streams: `*` never reaches them, however the name is spelled.
    let names = [
        "%24security-keys",
        "%2524security-keys",
        "%24SECURITY-KEYS",
        "order-1%2F..%2F%24security-keys",
        "..%2F%24security-keys",
        "%24security-keys%00",
        "%00%24security-keys",
        "%24audit",
    ];
    for name in names {
        for (method, path) in [
            (Method::GET, format!("/v1/streams/{name}")),
            (Method::GET, format!("/v1/streams/{name}/head")),
            (Method::POST, format!("/v1/streams/{name}")),
            (Method::GET, format!("/v1/categories/{name}")),
        ] {
            let body = r#"{"events":[{"type":"Forged","data":{}}]}"#;
            let a = api.call(method.clone(), &path, Some(&wide), body).await;
            let text = String::from_utf8_lossy(&a.body);
            // Nothing of a system stream is shown. Stream doors refuse the `$` names; encoded
            // twice, the name is a user stream called `%24security-keys`, which is allowed. A
            // category with `-` or `/` in it matches no stream.
            let may_succeed = name.starts_with("%25") || path.starts_with("/v1/categories/");
            assert!(
                (may_succeed || a.status.is_client_error())
                    && !text.contains("ApiKeyCreated")
                    && !text.contains("\"stream\":\"$"),
                "{method} {path}: {} {text}",
                a.status
            );
        }
        let (status, text) = api
            .stream_until(
                &format!("/v1/subscribe/streams/{name}"),
                Some(&wide),
                "ApiKeyCreated",
                Duration::from_millis(300),
            )
            .await;
        assert!(
            (name.starts_with("%25") || status.is_client_error())
                && !text.contains("ApiKeyCreated"),
            "SSE {name}: {status} {text}"
        );
    }

    for system in ["%24security-keys", "%24audit"] {
        let a = api
            .call(
                Method::GET,
                &format!("/v1/streams/{system}?limit=1000"),
                Some(&admin),
                "",
            )
            .await;
        assert!(
            !String::from_utf8_lossy(&a.body).contains("Forged"),
            "{system}"
        );
    }

    // A second Authorization header never adds rights: the first decides.
    let host = server.url.trim_start_matches("http://").to_owned();
    for (first, second) in [
        ("Bearer nonsense", admin.as_str()),
        ("Bearer ", admin.as_str()),
    ] {
        let answer = raw(
            &server.url,
            format!(
                "GET /v1/admin/keys HTTP/1.1\r\nhost: {host}\r\nauthorization: {first}\r\n\
                 authorization: Bearer {second}\r\nconnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    }
    let answer = raw(
        &server.url,
        format!(
            "GET /v1/admin/keys HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {wide}\r\n\
             authorization: Bearer {admin}\r\nconnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");

    // A key of another store is unknown here.
    let other_dir = tempfile::tempdir().unwrap();
    let other = serve_with_config(other_dir.path(), "[auth]\napi_keys = true\n");
    let foreign = std::fs::read_to_string(other_dir.path().join("data/initial-admin-key")).unwrap();
    let a = api
        .call(Method::GET, "/v1/admin/keys", Some(foreign.trim()), "")
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.json()["reason"], "unknown-key", "{:?}", a.body);
    drop(other);

    // Content-Length with Transfer-Encoding: refused, and nothing smuggled runs.
    let smuggled = format!(
        "POST /v1/streams/order-1 HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {wide}\r\n\
         content-type: application/json\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n\
         0\r\n\r\nPOST /v1/streams/order-smuggled HTTP/1.1\r\nhost: {host}\r\n\
         authorization: Bearer {wide}\r\ncontent-type: application/json\r\ncontent-length: 41\r\n\r\n\
         {{\"events\":[{{\"type\":\"Smuggled\",\"data\":1}}]}}"
    );
    let answer = raw(&server.url, smuggled.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let a = api
        .call(Method::GET, "/v1/streams/order-smuggled", Some(&admin), "")
        .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{:?}", a.body);

    // X-Forwarded-For does not make a new client: the address bucket still runs out.
    let mut limited = false;
    for i in 0..450 {
        let answer = raw(
            &server.url,
            format!(
                "GET /v1/info HTTP/1.1\r\nhost: {host}\r\nx-forwarded-for: 10.0.{}.{}\r\n\
                 connection: close\r\n\r\n",
                i / 256,
                i % 256
            )
            .as_bytes(),
        )
        .await;
        if answer.starts_with("HTTP/1.1 429") {
            limited = true;
            break;
        }
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    }
    assert!(limited, "X-Forwarded-For escaped the per-address limit");
}
