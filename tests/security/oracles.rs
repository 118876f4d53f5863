//! What a caller cannot learn of streams it may not read (issue 25): an append condition needs
//! read on every stream and never looks at system streams; a filtered page's `next` does not
//! point past events the caller may not see; a reused event id of a stream the caller may not
//! read answers one generic conflict.

use hyper::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::{Api, serve_with_config};

async fn post(api: &Api, token: &str, path: &str, body: Value) -> (StatusCode, Value) {
    let a = api
        .call(Method::POST, path, Some(token), &body.to_string())
        .await;
    (a.status, a.json())
}

fn salary_condition(types: &[&str], tags: &[&str]) -> Value {
    json!({"failIfEventsMatch": {"items": [{"types": types, "tags": tags}]}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_a_caller_may_not_read_answer_nothing_about_their_events() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_with_config(dir.path(), "[auth]\napi_keys = true\n");
    let api = Api::new(&server.url);
    let admin = std::fs::read_to_string(dir.path().join("data/initial-admin-key")).unwrap();
    let admin = admin.trim().to_owned();
    let rules = json!({"rules": [
        {"role": "appender", "allow": ["append"], "on": ["order-*"]},
        {"role": "reader", "allow": ["read"], "on": ["order-*"]},
        {"role": "wide", "allow": ["read"], "on": ["*"]},
        {"role": "wide", "allow": ["append"], "on": ["order-*"]}
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
    let appender = api.key(&admin, "appender", &["appender"]).await;
    let reader = api.key(&admin, "reader", &["reader"]).await;
    let wide = api.key(&admin, "wide", &["wide"]).await;
    let salary_id = "0e0f2f1c-5a6b-4c3d-8e9f-0a1b2c3d4e5f";
    let (status, _) = post(
        &api,
        &admin,
        "/v1/streams/hr-salary-7",
        json!({"events": [{"id": salary_id, "type": "SalarySet", "tags": ["employee:alice"],
                           "data": {"amount": 1}}]}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let order_id = "1e0f2f1c-5a6b-4c3d-8e9f-0a1b2c3d4e5f";
    let (status, _) = post(
        &api,
        &admin,
        "/v1/streams/order-2",
        json!({"events": [{"id": order_id, "type": "Placed", "data": {"a": 1}}]}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);

    // Conditions: only for readers of every stream, and never about system streams.
    let placed = json!([{"type": "Placed", "data": {}}]);
    let (status, answer) = post(
        &api,
        &appender,
        "/v1/streams/order-1",
        json!({"events": placed, "condition": salary_condition(&["SalarySet"], &["employee:alice"])}),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{answer}");
    assert!(
        answer["detail"].as_str().unwrap().contains("condition"),
        "{answer}"
    );
    let (status, answer) = post(
        &api,
        &wide,
        "/v1/streams/order-1",
        json!({"events": placed, "condition": salary_condition(&["ApiKeyCreated"], &[])}),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::CREATED,
        "system streams decide no condition: {answer}"
    );
    let (status, answer) = post(
        &api,
        &wide,
        "/v1/streams/order-1",
        json!({"events": placed, "condition": salary_condition(&["SalarySet"], &["employee:alice"])}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    // A condition's size is bounded: it is checked while the writer waits.
    let many: Vec<String> = (0..65).map(|i| format!("T{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let (status, answer) = post(
        &api,
        &wide,
        "/v1/streams/order-1",
        json!({"events": placed, "condition": salary_condition(&many, &[])}),
    )
    .await;
    assert!(status.is_client_error(), "{status} {answer}");
    assert!(
        answer["detail"]
            .as_str()
            .unwrap()
            .contains("the maximum is 64"),
        "{answer}"
    );

    // A filtered page reads on past what it hides; `next` never points just past it.
    let query = json!({"query": {"items": [{"types": ["SalarySet", "Placed"]}]}, "limit": 1});
    let (status, page) = post(&api, &reader, "/v1/query", query).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{page}");
    assert_eq!(events[0]["type"], "Placed", "{page}");
    assert_eq!(
        page["next"],
        json!(events[0]["position"].as_u64().unwrap() + 1),
        "{page}"
    );
    let only = api
        .call(
            Method::GET,
            "/v1/all?types=SalarySet&limit=1",
            Some(&reader),
            "",
        )
        .await
        .json();
    assert_eq!(only, json!({"events": [], "next": null}));

    // Reused ids: the whole story for readers of the stream holding them, a generic conflict
    // for others.
    let (status, answer) = post(
        &api,
        &appender,
        "/v1/streams/order-1",
        json!({"events": [{"id": salary_id, "type": "SalarySet", "data": {"amount": 1}}]}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(answer["type"], "urn:skald:problem:event-id-reused");
    assert!(
        answer.get("position").is_none() && answer.get("stream").is_none(),
        "{answer}"
    );
    assert!(!answer.to_string().contains("hr-salary"), "{answer}");
    let (status, answer) = post(
        &api,
        &appender,
        "/v1/streams/order-2",
        json!({"events": [{"id": order_id, "type": "Placed", "data": {"a": 2}}]}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert!(answer.get("position").is_none(), "{answer}");
    assert!(
        !answer["detail"].as_str().unwrap().contains("data"),
        "{answer}"
    );
    let (status, answer) = post(
        &api,
        &wide,
        "/v1/streams/order-1",
        json!({"events": [{"id": salary_id, "type": "SalarySet", "data": {"amount": 1}}]}),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(answer["stream"], "hr-salary-7", "{answer}");
    assert!(answer["position"].is_u64(), "{answer}");
}
