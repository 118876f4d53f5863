//! Persistent subscriptions through the real binary: the `skald subscription` commands, and a
//! group that survives kill -9 in the middle of appends and acknowledgements without losing a
//! message.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Http, Server, skald};

#[test]
fn subscription_commands_create_list_inspect_replay_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let s = format!("--server={}", server.url);
    let (ok, out, err) = skald(&[
        "subscription",
        "create",
        "billing",
        "--category",
        "order",
        "--from",
        "now",
        "--strategy",
        "pinned",
        "--max-deliveries",
        "3",
        &s,
    ]);
    assert!(ok, "{err}");
    let created: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(created["settings"]["strategy"], "pinned");
    assert_eq!(created["source"], json!({"category": "order"}));

    let (ok, _, err) = skald(&["subscription", "create", "billing", "--stream", "x", &s]);
    assert!(!ok);
    assert!(err.contains("already exists"), "{err}");
    let (ok, _, err) = skald(&[
        "subscription",
        "create",
        "other",
        "--category",
        "order",
        "--from",
        "revision:4",
        &s,
    ]);
    assert!(!ok);
    assert!(err.contains("revision"), "{err}");
    let (ok, _, err) = skald(&[
        "subscription",
        "create",
        "other",
        "--stream",
        "a",
        "--category",
        "b",
        &s,
    ]);
    assert!(!ok);
    assert!(err.contains("one source"), "{err}");

    // The group's bookkeeping lives in system streams, which `skald tail` leaves out unless
    // asked.
    let (ok, _, err) = skald(&["append", &s, "order-1", "--type", "Placed"]);
    assert!(ok, "{err}");
    let (ok, out, err) = skald(&["tail", &s, "--from", "start", "--limit", "1", "--json"]);
    assert!(ok, "{err}");
    let first: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(first["stream"], "order-1", "{out}");
    let (ok, out, err) = skald(&[
        "tail", &s, "--from", "start", "--limit", "1", "--json", "--system",
    ]);
    assert!(ok, "{err}");
    let first: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(first["stream"], "$groups", "{out}");

    let (ok, out, err) = skald(&["subscription", "list", &s]);
    assert!(ok, "{err}");
    assert!(
        out.contains("billing") && out.contains("category order"),
        "{out}"
    );
    let (ok, out, _) = skald(&["subscription", "info", "billing", &s]);
    assert!(ok);
    let info: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["stats"]["parked"], 0);
    let (ok, out, _) = skald(&["subscription", "replay-parked", "billing", &s]);
    assert!(ok);
    assert!(out.contains("replaying 0 parked messages"), "{out}");
    let (ok, out, _) = skald(&["subscription", "delete", "billing", &s]);
    assert!(ok);
    assert!(out.contains("deleted billing"), "{out}");
    let (ok, _, err) = skald(&["subscription", "info", "billing", &s]);
    assert!(!ok);
    assert!(err.contains("not found"), "{err}");
    let (ok, out, _) = skald(&["subscription", "list", &s]);
    assert!(ok);
    assert!(out.contains("no groups"), "{out}");
}

async fn append(http: &Http, i: usize) -> Option<u64> {
    let body = json!({"events": [{"type": "Placed", "data": {"i": i}}]}).to_string();
    match http
        .call(
            Method::POST,
            &format!("/v1/streams/order-{}", i % 7),
            "application/json",
            body,
        )
        .await
    {
        Ok((StatusCode::CREATED, body)) => {
            let result: Value = serde_json::from_slice(&body).unwrap();
            Some(result["firstPosition"].as_u64().unwrap())
        }
        // The server was killed under it: not acknowledged, so not owed to anyone.
        _ => None,
    }
}

/// Polls a batch and acknowledges it; returns the positions delivered, or `None` once the
/// server is gone.
async fn consume(http: &Http) -> Option<Vec<u64>> {
    let (status, body) = http
        .call(
            Method::GET,
            "/v1/groups/ledger/messages?count=25&wait=200",
            "application/json",
            String::new(),
        )
        .await
        .ok()?;
    if status != StatusCode::OK {
        return None;
    }
    let batch: Value = serde_json::from_slice(&body).unwrap();
    let messages = batch["messages"].as_array().unwrap();
    let ids: Vec<&Value> = messages.iter().map(|m| &m["ackId"]).collect();
    let positions = messages
        .iter()
        .map(|m| m["event"]["position"].as_u64().unwrap())
        .collect();
    if !ids.is_empty() {
        http.call(
            Method::POST,
            "/v1/groups/ledger/ack",
            "application/json",
            json!({ "ids": ids }).to_string(),
        )
        .await
        .ok()?;
    }
    Some(positions)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_loses_nothing_when_the_server_is_killed_mid_stream() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let http = Http::new(&server.url);
    let (status, body) = http
        .call(
            Method::POST,
            "/v1/groups",
            "application/json",
            json!({"name": "ledger", "source": {"category": "order"}, "checkpointAfterMs": 20})
                .to_string(),
        )
        .await
        .unwrap();
    assert_eq!(
        status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&body)
    );

    // Appends and a consumer run together; the server is killed while both are busy.
    let appender = {
        let http = http.clone();
        tokio::spawn(async move {
            let mut stored = Vec::new();
            for i in 0..400 {
                if let Some(position) = append(&http, i).await {
                    stored.push(position);
                }
            }
            stored
        })
    };
    let mut delivered: BTreeSet<u64> = BTreeSet::new();
    let started = Instant::now();
    while delivered.len() < 100 && started.elapsed() < Duration::from_secs(60) {
        delivered.extend(consume(&http).await.unwrap());
    }
    server.kill9();
    let mut stored: BTreeSet<u64> = appender.await.unwrap().into_iter().collect();
    assert!(delivered.len() >= 100, "the consumer was starved");

    let server = Server::start(dir.path(), &[]);
    let http = Http::new(&server.url);
    // What was stored but not acknowledged before the kill is delivered now; so is anything
    // appended after the restart.
    for i in 400..450 {
        stored.insert(append(&http, i).await.unwrap());
    }
    let mut redelivered = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !stored.is_subset(&delivered) && Instant::now() < deadline {
        let batch = consume(&http).await.unwrap();
        redelivered += batch.iter().filter(|p| delivered.contains(p)).count();
        delivered.extend(batch);
    }
    let missing: Vec<_> = stored.difference(&delivered).collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    // At least once, not "all over again": the checkpoint had moved before the kill.
    assert!(redelivered < 400, "{redelivered} redelivered");
    let (_, body) = http
        .call(
            Method::GET,
            "/v1/groups/ledger",
            "application/json",
            String::new(),
        )
        .await
        .unwrap();
    let info: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(info["stats"]["inFlight"], 0, "{info}");
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{stderr}");
}
