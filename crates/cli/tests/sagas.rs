//! Sagas through the real binary: the `skald saga` commands, and sagas that survive kill -9 in
//! the middle of their steps, each reaching a final state with no step lost, no compensation
//! skipped, and idempotency keys stable. Target services are real HTTP servers on loopback.

mod support;

#[path = "../../postgres/tests/support/mod.rs"]
mod cluster;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode as AxumStatus, Uri};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use support::{Http, Server, skald};

#[derive(Clone, Debug)]
struct Call {
    path: String,
    key: String,
    order: String,
}

/// The inventory, payment and shipping services in one: every call is recorded; `/ship` fails
/// with 400 for orders in `failing`, `/refund` answers 500 while `refund_down` is set.
#[derive(Clone, Default)]
struct Target {
    calls: Arc<Mutex<Vec<Call>>>,
    failing: Arc<Mutex<BTreeSet<String>>>,
    refund_down: Arc<Mutex<bool>>,
    delay: Duration,
}

impl Target {
    async fn start(delay: Duration) -> (Self, String) {
        let target = Self {
            delay,
            ..Self::default()
        };
        let shared = target.clone();
        let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
            let target = shared.clone();
            async move { target.answer(uri, headers, body).await }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (target, base)
    }

    async fn answer(&self, uri: Uri, headers: HeaderMap, body: Bytes) -> (AxumStatus, String) {
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let order = body["order"].as_str().unwrap_or("").to_owned();
        let key = headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        self.calls.lock().unwrap().push(Call {
            path: uri.path().to_owned(),
            key,
            order: order.clone(),
        });
        tokio::time::sleep(self.delay).await;
        let path = uri.path();
        if path == "/ship" && self.failing.lock().unwrap().contains(&order) {
            return (AxumStatus::BAD_REQUEST, r#"{"error":"no carrier"}"#.into());
        }
        if path == "/refund" && *self.refund_down.lock().unwrap() {
            return (AxumStatus::INTERNAL_SERVER_ERROR, "down".into());
        }
        (
            AxumStatus::OK,
            json!({ "ref": format!("{path}-{order}") }).to_string(),
        )
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

fn saga_yaml(base: &str) -> String {
    format!(
        r#"# An order across inventory, payment and shipping.
name: order
version: 1
trigger: {{category: order, types: [OrderPlaced]}}
correlationKey: /data/orderId
defaults:
  timeout: 5s
  retry: {{maxAttempts: 3, initialBackoff: 50ms, maxBackoff: 200ms}}
steps:
  - name: reserve
    action: {{http: {{method: POST, url: "{base}/reserve", body: {{order: "{{{{trigger.data.orderId}}}}"}}}}}}
    compensation: {{http: {{method: POST, url: "{base}/unreserve", body: {{order: "{{{{trigger.data.orderId}}}}"}}}}}}
  - name: charge
    action: {{http: {{method: POST, url: "{base}/charge", body: {{order: "{{{{trigger.data.orderId}}}}"}}}}}}
    compensation: {{http: {{method: POST, url: "{base}/refund", body: {{order: "{{{{trigger.data.orderId}}}}"}}}}}}
  - name: ship
    action: {{http: {{method: POST, url: "{base}/ship", body: {{order: "{{{{trigger.data.orderId}}}}"}}}}}}
    compensation: {{http: {{method: POST, url: "{base}/unship", body: {{order: "{{{{trigger.data.orderId}}}}"}}}}}}
"#
    )
}

async fn place(http: &Http, order: &str) {
    let body = json!({"events": [{"type": "OrderPlaced", "data": {"orderId": order}}]});
    let (status, answer) = http
        .call(
            Method::POST,
            &format!("/v1/streams/order-{order}"),
            "application/json",
            body.to_string(),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED, "{answer:?}");
}

/// Every instance, or `None` when the node answered anything but 200 (on a shared store, while
/// the node that runs the sagas changes).
async fn instances(http: &Http) -> Option<Vec<Value>> {
    let (status, body) = http
        .call(
            Method::GET,
            "/v1/saga-instances?limit=1000",
            "application/json",
            String::new(),
        )
        .await
        .ok()?;
    if status != StatusCode::OK {
        return None;
    }
    let answer: Value = serde_json::from_slice(&body).unwrap();
    Some(answer["instances"].as_array().unwrap().clone())
}

/// Waits until `count` instances exist and every one is in one of `states`.
async fn wait_final(http: &Http, count: usize, states: &[&str], within: Duration) -> Vec<Value> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = instances(http).await {
            let done = found
                .iter()
                .filter(|i| states.contains(&i["state"].as_str().unwrap()))
                .count();
            if found.len() == count && done == count {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "{done} of {count} sagas final ({} exist): {:?}",
                found.len(),
                found.iter().map(|i| i["state"].clone()).collect::<Vec<_>>()
            );
        }
        assert!(Instant::now() < deadline, "the sagas were never listed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn run_skald(args: Vec<String>) -> (bool, String, String) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    skald(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_commands_register_show_list_history_and_retry() {
    let dir = tempfile::tempdir().unwrap();
    let (target, base) = Target::start(Duration::ZERO).await;
    let config = support::loopback_targets_config(dir.path());
    let server = Server::start(dir.path(), &["--config", &config]);
    let http = Http::new(&server.url);
    let s = format!("--server={}", server.url);
    let file = dir.path().join("order.yaml");
    std::fs::write(&file, saga_yaml(&base)).unwrap();
    let file = file.to_str().unwrap().to_owned();
    let cli = |args: &[&str]| {
        let mut all: Vec<String> = vec!["saga".into()];
        all.extend(args.iter().map(|a| a.to_string()));
        all.push(s.clone());
        tokio::task::block_in_place(|| run_skald(all))
    };

    let (ok, out, err) = cli(&["register", &file]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "registered order version 1");
    let (ok, out, _) = cli(&["register", &file]);
    assert!(ok && out.contains("already registered"), "{out}");
    let broken = dir.path().join("broken.yaml");
    let text = saga_yaml(&base);
    let without: String = text
        .lines()
        .filter(|l| !l.contains("/refund"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&broken, without.replace("version: 1", "version: 2")).unwrap();
    let (ok, _, err) = cli(&["register", broken.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("Invalid saga definition: line 13, column 5"),
        "{err}"
    );
    assert!(err.contains("\"charge\" has no compensation"), "{err}");
    let (ok, _, err) = cli(&["register", "/nonexistent/saga.yaml"]);
    assert!(
        !ok && err.contains("cannot read /nonexistent/saga.yaml"),
        "{err}"
    );

    place(&http, "1").await;
    let done = wait_final(&http, 1, &["completed"], Duration::from_secs(20)).await;
    let id = done[0]["sagaId"].as_str().unwrap().to_owned();
    let (ok, out, err) = cli(&["instances", "--state", "completed"]);
    assert!(ok, "{err}");
    assert!(out.contains(&id) && out.contains("order v1"), "{out}");
    let (ok, out, _) = cli(&["history", &id]);
    assert!(ok);
    for line in [
        "SagaStarted",
        "StepSucceeded",
        "charge (action)",
        "SagaCompleted",
    ] {
        assert!(out.contains(line), "{line} missing from:\n{out}");
    }
    let (ok, out, _) = cli(&["list"]);
    assert!(
        ok && out.contains("order") && out.contains("completed 1"),
        "{out}"
    );
    let (ok, out, _) = cli(&["show", "order"]);
    assert!(ok);
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["steps"][1]["name"], "charge");
    let (ok, _, err) = cli(&["instances", "--state", "sideways"]);
    assert!(!ok && err.contains("is not one of running"), "{err}");

    // Shipping fails and the refund service is down: the saga is stuck until retried.
    target.failing.lock().unwrap().insert("2".into());
    *target.refund_down.lock().unwrap() = true;
    place(&http, "2").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let stuck = loop {
        let (ok, out, _) = cli(&["instances", "--state", "stuck", "--json"]);
        assert!(ok);
        let found: Value = serde_json::from_str(&out).unwrap();
        if let Some(first) = found["instances"].as_array().unwrap().first() {
            break first["sagaId"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "no saga got stuck");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (ok, out, _) = cli(&["history", &stuck]);
    assert!(
        ok && out.contains("SagaStuck") && out.contains("answered 500"),
        "{out}"
    );
    let (ok, _, err) = cli(&["cancel", &stuck]);
    assert!(
        !ok && err.contains("only a running saga can be cancelled"),
        "{err}"
    );
    *target.refund_down.lock().unwrap() = false;
    let (ok, out, err) = cli(&["retry", &stuck]);
    assert!(ok, "{err}");
    assert!(out.contains("compensating again"), "{out}");
    wait_final(
        &http,
        2,
        &["completed", "compensated"],
        Duration::from_secs(20),
    )
    .await;
    let paths: Vec<String> = target
        .calls()
        .into_iter()
        .filter(|c| c.order == "2")
        .map(|c| c.path)
        .collect();
    assert_eq!(
        paths.iter().filter(|p| *p == "/unreserve").count(),
        1,
        "{paths:?}"
    );
    assert_eq!(paths.last().unwrap(), "/unreserve");

    // Disable, enable and delete.
    let (ok, out, err) = cli(&["disable", "order"]);
    assert!(ok && out.trim() == "order is disabled", "{out}{err}");
    let (ok, out, _) = cli(&["disable", "order"]);
    assert!(ok && out.contains("already"), "{out}");
    let (ok, out, _) = cli(&["list"]);
    assert!(ok && out.contains("disabled"), "{out}");
    let (ok, out, err) = cli(&["enable", "order"]);
    assert!(ok && out.trim() == "order is enabled", "{out}{err}");
    let (ok, out, err) = cli(&["delete", "order"]);
    assert!(ok && out.trim() == "order is deleted", "{out}{err}");
    let (ok, out, _) = cli(&["list"]);
    assert!(ok && !out.contains("order"), "{out}");
    let (ok, _, err) = cli(&["enable", "order"]);
    assert!(!ok && err.contains("was deleted"), "{err}");
    let (status, _) = server.terminate();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_survive_kill_9_in_the_middle_of_their_steps() {
    const ORDERS: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let (target, base) = Target::start(Duration::from_millis(15)).await;
    // Every fourth order cannot ship and must be compensated.
    for i in (0..ORDERS).step_by(4) {
        target.failing.lock().unwrap().insert(i.to_string());
    }
    let file = dir.path().join("order.yaml");
    std::fs::write(&file, saga_yaml(&base)).unwrap();
    let data = dir.path().join("data");
    let config = support::loopback_targets_config(&data);
    let server = tokio::task::block_in_place(|| Server::start(&data, &["--config", &config]));
    let http = Http::new(&server.url);
    let (ok, _, err) = tokio::task::block_in_place(|| {
        run_skald(vec![
            "saga".into(),
            "register".into(),
            file.to_str().unwrap().into(),
            format!("--server={}", server.url),
        ])
    });
    assert!(ok, "{err}");
    for i in 0..ORDERS {
        place(&http, &i.to_string()).await;
    }
    // Kill three times while steps are in flight, each time further along.
    let mut server = server;
    let mut resumed = false;
    for round in 1..=3 {
        let deadline = Instant::now() + Duration::from_secs(60);
        while target.calls().len() < round * ORDERS {
            assert!(
                Instant::now() < deadline,
                "the sagas stopped making progress"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::task::block_in_place(|| server.kill9());
        let at_kill = target.calls().len();
        server = tokio::task::block_in_place(|| Server::start(&data, &["--config", &config]));
        let deadline = Instant::now() + Duration::from_secs(30);
        while target.calls().len() == at_kill && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        resumed |= target.calls().len() > at_kill;
    }
    assert!(resumed, "no restart resumed anything");
    let http = Http::new(&server.url);
    let all = wait_final(
        &http,
        ORDERS,
        &["completed", "compensated"],
        Duration::from_secs(90),
    )
    .await;
    check_orders(&all, &target.calls(), ORDERS);
    let (status, stderr) = tokio::task::block_in_place(|| server.terminate());
    assert!(status.success(), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_on_three_nodes_finish_when_the_node_running_them_is_killed() {
    const ORDERS: usize = 120;
    const LEASE_MS: u64 = 1500;
    let pg = cluster::Cluster::start();
    pg.database("skald").await;
    let store = pg.postgres_url("skald");
    let dir = tempfile::tempdir().unwrap();
    let (target, base) = Target::start(Duration::from_millis(15)).await;
    for i in (0..ORDERS).step_by(4) {
        target.failing.lock().unwrap().insert(i.to_string());
    }
    let (mut nodes, urls) =
        tokio::task::block_in_place(|| support::start_nodes(dir.path(), 3, &store, LEASE_MS));
    let owner = support::owner_among(&urls, Duration::from_secs(30)).await;
    let follower = (owner + 1) % 3;
    // Registered through a node that does not run the sagas: forwarded to the one that does.
    let file = dir.path().join("order.yaml");
    std::fs::write(&file, saga_yaml(&base)).unwrap();
    let (ok, _, err) = tokio::task::block_in_place(|| {
        run_skald(vec![
            "saga".into(),
            "register".into(),
            file.to_str().unwrap().into(),
            format!("--server={}", urls[follower]),
        ])
    });
    assert!(ok, "{err}");
    // Orders placed through every node; the trigger loop on the owner starts them all.
    for i in 0..ORDERS {
        place(&Http::new(&urls[i % 3]), &i.to_string()).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while target.calls().len() < ORDERS {
        assert!(Instant::now() < deadline, "the sagas made no progress");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let at_kill = target.calls().len();
    tokio::task::block_in_place(|| nodes[owner].take().unwrap().kill9());
    let survivors: Vec<String> = (0..3)
        .filter(|&i| i != owner)
        .map(|i| urls[i].clone())
        .collect();
    support::owner_among(&survivors, Duration::from_secs(30)).await;
    let all = wait_final(
        &Http::new(&survivors[0]),
        ORDERS,
        &["completed", "compensated"],
        Duration::from_secs(90),
    )
    .await;
    let calls = target.calls();
    assert!(
        calls.len() > at_kill,
        "nothing ran after the owner was killed"
    );
    check_orders(&all, &calls, ORDERS);
    for node in nodes.into_iter().flatten() {
        let (status, stderr) = tokio::task::block_in_place(|| node.terminate());
        assert!(status.success(), "{stderr}");
    }
}

/// Every order reached its final state (every fourth compensated), each step was called
/// with its one idempotency key however often it was called, nothing else was called, and
/// compensations ran in reverse.
fn check_orders(all: &[Value], calls: &[Call], orders: usize) {
    let by_order: BTreeMap<String, &Value> = all
        .iter()
        .map(|i| (i["correlationKey"].as_str().unwrap().to_owned(), i))
        .collect();
    assert_eq!(by_order.len(), orders, "one instance per order");
    for i in 0..orders {
        let order = i.to_string();
        let instance = by_order[&order];
        let id = instance["sagaId"].as_str().unwrap();
        let mine: Vec<&Call> = calls.iter().filter(|c| c.order == order).collect();
        let keys_of = |path: &str| -> BTreeSet<&str> {
            mine.iter()
                .filter(|c| c.path == path)
                .map(|c| c.key.as_str())
                .collect()
        };
        let expected: &[(&str, &str)] = if i % 4 == 0 {
            assert_eq!(instance["state"], "compensated", "order {order}");
            &[
                ("/reserve", "reserve:action"),
                ("/charge", "charge:action"),
                ("/ship", "ship:action"),
                ("/refund", "charge:compensation"),
                ("/unreserve", "reserve:compensation"),
            ]
        } else {
            assert_eq!(instance["state"], "completed", "order {order}");
            &[
                ("/reserve", "reserve:action"),
                ("/charge", "charge:action"),
                ("/ship", "ship:action"),
            ]
        };
        for (path, key) in expected {
            // Called at least once, and every call (before and after the crash) carried the
            // same idempotency key.
            assert_eq!(
                keys_of(path),
                BTreeSet::from([format!("{id}:{key}").as_str()]),
                "order {order} {path}: {mine:?}"
            );
        }
        let called: BTreeSet<&str> = mine.iter().map(|c| c.path.as_str()).collect();
        let allowed: BTreeSet<&str> = expected.iter().map(|(p, _)| *p).collect();
        assert_eq!(
            called, allowed,
            "order {order} called what it should not: {mine:?}"
        );
        if i % 4 == 0 {
            // Compensations in reverse: the last refund before the first unreserve.
            let last_refund = mine.iter().rposition(|c| c.path == "/refund").unwrap();
            let first_unreserve = mine.iter().position(|c| c.path == "/unreserve").unwrap();
            assert!(last_refund < first_unreserve, "order {order}: {mine:?}");
        }
    }
}

/// Runs `examples/order-fulfillment` as its README says: the Python services, the definition,
/// one order that completes and one whose payment is declined and compensated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_fulfillment_example_runs_as_its_readme_says() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let root =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/order-fulfillment");
    let dir = tempfile::tempdir().unwrap();
    // The services take three consecutive ports; try a few bases until all three are free.
    let (services, base) = (0..20)
        .find_map(|attempt| {
            let base = 20_000 + (std::process::id() as u16 % 20_000) + attempt * 97;
            let mut child = Command::new("python3")
                .arg(root.join("services.py"))
                .args(["--base-port", &base.to_string()])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("python3 runs (the example's services need it)");
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            let listening = (0..3).all(|_| {
                lines
                    .next()
                    .and_then(Result::ok)
                    .is_some_and(|l| l.contains("listening"))
            });
            if listening {
                std::thread::spawn(move || lines.for_each(drop));
                Some((KillOnDrop(child), base))
            } else {
                let _ = child.kill();
                let _ = child.wait();
                None
            }
        })
        .expect("three free ports for the services");
    let definition = std::fs::read_to_string(root.join("order-fulfillment.yaml"))
        .unwrap()
        .replace("127.0.0.1:8081", &format!("127.0.0.1:{base}"))
        .replace("127.0.0.1:8082", &format!("127.0.0.1:{}", base + 1))
        .replace("127.0.0.1:8083", &format!("127.0.0.1:{}", base + 2));
    let file = dir.path().join("order-fulfillment.yaml");
    std::fs::write(&file, definition).unwrap();
    let data = dir.path().join("data");
    // The example's own configuration, as its README runs it.
    let config = root.join("skald.toml").to_string_lossy().into_owned();
    let server = tokio::task::block_in_place(|| Server::start(&data, &["--config", &config]));
    let s = format!("--server={}", server.url);
    let cli = |args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.push(s.clone());
        tokio::task::block_in_place(|| run_skald(all))
    };
    let (ok, out, err) = cli(&["saga", "register", file.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("registered order-fulfillment version 1"),
        "{out}"
    );
    let order = r#"{"orderId": "1001", "total": 40, "items": [{"sku": "mug", "qty": 2}]}"#;
    let (ok, _, err) = cli(&[
        "append",
        "order-1001",
        "--type",
        "OrderPlaced",
        "--data",
        order,
    ]);
    assert!(ok, "{err}");
    let piano = r#"{"orderId": "1002", "total": 5000, "items": [{"sku": "piano", "qty": 1}]}"#;
    let (ok, _, err) = cli(&[
        "append",
        "order-1002",
        "--type",
        "OrderPlaced",
        "--data",
        piano,
    ]);
    assert!(ok, "{err}");
    let http = Http::new(&server.url);
    let all = wait_final(
        &http,
        2,
        &["completed", "compensated"],
        Duration::from_secs(30),
    )
    .await;
    let state_of = |key: &str| {
        all.iter()
            .find(|i| i["correlationKey"] == key)
            .map(|i| {
                (
                    i["state"].as_str().unwrap().to_owned(),
                    i["lastError"].clone(),
                )
            })
            .unwrap()
    };
    assert_eq!(state_of("1001").0, "completed");
    let (state, error) = state_of("1002");
    assert_eq!(state, "compensated");
    assert!(
        error
            .as_str()
            .unwrap()
            .contains("charge-card (action): answered 402"),
        "{error}"
    );
    // The confirmation the saga appended, with the outputs of earlier steps.
    let (ok, out, _) = cli(&["read", "order-1001"]);
    assert!(ok);
    let confirmed: Value =
        serde_json::from_str(out.lines().nth(1).expect("OrderConfirmed")).unwrap();
    assert_eq!(confirmed["type"], "OrderConfirmed");
    assert!(
        confirmed["data"]["tracking"]
            .as_str()
            .unwrap()
            .starts_with("TRACK-"),
        "{confirmed}"
    );
    let (ok, out, _) = cli(&["saga", "instances"]);
    assert!(
        ok && out.contains("compensated") && out.contains("completed"),
        "{out}"
    );
    drop(services);
    let (status, _) = tokio::task::block_in_place(|| server.terminate());
    assert!(status.success());
}

/// A child process stopped (by its id) when the test ends, passing or failing.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
