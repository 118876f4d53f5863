//! The crash test: the real server appends under concurrent load and is killed with SIGKILL
//! at random moments, 20 times. After each restart every acknowledged event is present at the
//! position it was acknowledged with, no unacknowledged append is partly visible, positions are
//! gapless, and new appends succeed.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Http, Server};

const KILLS: usize = 20;
const WRITERS: usize = 8;
const EVENTS_PER_APPEND: usize = 3;

/// One append a writer sent: its event ids and, if acknowledged, its first position.
struct Sent {
    ids: Vec<String>,
    acknowledged: Option<u64>,
}

async fn writer(http: Http, name: String, sent: Arc<Mutex<Vec<Sent>>>) {
    for n in 0.. {
        let ids: Vec<String> = (0..EVENTS_PER_APPEND)
            .map(|_| uuid::Uuid::new_v4().to_string())
            .collect();
        let events: Vec<Value> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| json!({"id": id, "type": "Tick", "data": {"writer": name, "n": n, "i": i, "pad": "p".repeat(200)}}))
            .collect();
        let index = {
            let mut s = sent.lock().unwrap();
            s.push(Sent {
                ids,
                acknowledged: None,
            });
            s.len() - 1
        };
        let body = json!({"events": events}).to_string();
        match http
            .call(
                Method::POST,
                &format!("/v1/streams/{name}"),
                "application/json",
                body,
            )
            .await
        {
            Ok((StatusCode::CREATED, body)) => {
                let v: Value = serde_json::from_slice(&body).unwrap();
                sent.lock().unwrap()[index].acknowledged =
                    Some(v["firstPosition"].as_u64().unwrap());
            }
            // The server died: stop.
            _ => return,
        }
    }
}

/// Checks the whole log against everything sent so far.
fn verify(log: &[Value], sent: &[Sent]) {
    let positions: Vec<u64> = log
        .iter()
        .map(|e| e["position"].as_u64().unwrap())
        .collect();
    assert_eq!(
        positions,
        (0..log.len() as u64).collect::<Vec<_>>(),
        "positions are gapless from 0"
    );
    let by_id: HashMap<&str, u64> = log
        .iter()
        .map(|e| (e["id"].as_str().unwrap(), e["position"].as_u64().unwrap()))
        .collect();
    assert_eq!(by_id.len(), log.len(), "no event is stored twice");
    let mut known = HashSet::new();
    for s in sent {
        let found: Vec<Option<&u64>> = s.ids.iter().map(|id| by_id.get(id.as_str())).collect();
        known.extend(s.ids.iter().map(String::as_str));
        if let Some(first) = s.acknowledged {
            for (i, p) in found.iter().enumerate() {
                assert_eq!(
                    *p,
                    Some(&(first + i as u64)),
                    "acknowledged event {} lost or moved",
                    s.ids[i]
                );
            }
        } else if found.iter().any(Option::is_some) {
            let first = *found[0].expect("an unacknowledged append is visible whole or not at all");
            for (i, p) in found.iter().enumerate() {
                assert_eq!(
                    *p,
                    Some(&(first + i as u64)),
                    "unacknowledged append partly visible"
                );
            }
        }
    }
    for e in log {
        assert!(
            known.contains(e["id"].as_str().unwrap()),
            "an event nobody sent: {e}"
        );
    }
    let mut revisions: BTreeMap<&str, u64> = BTreeMap::new();
    for e in log {
        let next = revisions.entry(e["stream"].as_str().unwrap()).or_insert(0);
        assert_eq!(
            e["revision"].as_u64().unwrap(),
            *next,
            "stream revisions are gapless"
        );
        *next += 1;
    }
}

#[test]
fn acknowledged_appends_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sent = Arc::new(Mutex::new(Vec::<Sent>::new()));
    let mut rng = fastrand::Rng::with_seed(0x5ca1d);
    let mut total_acknowledged = 0;
    for round in 0..KILLS {
        let server = Server::start(dir.path(), &[]);
        let http = Http::new(&server.url);
        let log = runtime.block_on(http.read_all());
        verify(&log, &sent.lock().unwrap());
        let tasks: Vec<_> = (0..WRITERS)
            .map(|w| {
                runtime.spawn(writer(
                    http.clone(),
                    format!("w{w}-r{round}"),
                    Arc::clone(&sent),
                ))
            })
            .collect();
        // Let the load run a random while (until some appends are acknowledged), then crash.
        let acked_before = sent
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.acknowledged.is_some())
            .count();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while sent
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.acknowledged.is_some())
            .count()
            < acked_before + 5
        {
            assert!(
                std::time::Instant::now() < deadline,
                "no appends were acknowledged in 20 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(rng.u64(0..300)));
        server.kill9();
        for t in tasks {
            runtime.block_on(t).unwrap();
        }
        total_acknowledged = sent
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.acknowledged.is_some())
            .count();
    }
    let server = Server::start(dir.path(), &[]);
    let http = Http::new(&server.url);
    let log = runtime.block_on(http.read_all());
    verify(&log, &sent.lock().unwrap());
    assert!(total_acknowledged >= KILLS * 5);
    let (status, _) = runtime
        .block_on(http.call(
            Method::POST,
            "/v1/streams/after-1",
            "application/json",
            json!({"events": [{"type": "X"}]}).to_string(),
        ))
        .unwrap();
    assert_eq!(
        status,
        StatusCode::CREATED,
        "new appends succeed after the crashes"
    );
    let (status, _) = server.terminate();
    assert!(status.success());
}
