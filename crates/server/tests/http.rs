//! Every endpoint and every error kind of the HTTP API, through the real router over a real
//! embedded store.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use skald_core::Limits;
use skald_server::{HttpConfig, router};
use skald_storage::{Options, Store};
use tower::ServiceExt;

struct Api {
    router: axum::Router,
    store: Store,
    _dir: tempfile::TempDir,
}

struct Answer {
    status: StatusCode,
    content_type: String,
    body: Vec<u8>,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    fn problem(&self, status: u16, kind: &str) -> Value {
        assert_eq!(
            self.status.as_u16(),
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        assert_eq!(self.content_type, "application/problem+json");
        let p = self.json();
        assert_eq!(p["type"], format!("urn:skald:problem:{kind}"), "{p}");
        assert_eq!(p["status"], status);
        assert!(p["title"].is_string() && p["detail"].is_string(), "{p}");
        p
    }
}

impl Api {
    async fn new() -> Self {
        Self::with(Limits::default(), HttpConfig::default()).await
    }

    async fn with(limits: Limits, http: HttpConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            data_dir: dir.path().to_path_buf(),
            limits,
            ..Options::default()
        };
        let (store, _) = Store::open(options).unwrap();
        Self {
            router: router(Arc::new(store.clone()), http).await.unwrap(),
            store,
            _dir: dir,
        }
    }

    async fn call(
        &self,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: impl Into<Body>,
    ) -> Answer {
        let mut request = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let response = self
            .router
            .clone()
            .oneshot(request.body(body.into()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        Answer {
            status,
            content_type,
            body,
        }
    }

    async fn post_json(&self, uri: &str, body: Value) -> Answer {
        self.call(
            "POST",
            uri,
            &[("content-type", "application/json")],
            body.to_string(),
        )
        .await
    }

    async fn get(&self, uri: &str) -> Answer {
        self.call("GET", uri, &[], Body::empty()).await
    }
}

fn ev(t: &str, tags: &[&str]) -> Value {
    json!({"type": t, "data": {"at": t}, "tags": tags})
}

#[tokio::test]
async fn append_then_read_a_stream_forward_and_backward() {
    let api = Api::new().await;
    let a = api
        .post_json(
            "/v1/streams/order-1",
            json!({"events": [ev("Placed", &[]), ev("Paid", &[])]}),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert_eq!(
        a.json(),
        json!({"firstPosition": 0, "lastPosition": 1, "firstRevision": 0, "lastRevision": 1, "replayed": false})
    );
    let page = api.get("/v1/streams/order-1").await.json();
    assert_eq!(page["events"].as_array().unwrap().len(), 2);
    assert_eq!(page["next"], Value::Null);
    let e = &page["events"][0];
    assert_eq!(e["specversion"], "1.0");
    assert_eq!(e["type"], "Placed");
    assert_eq!(e["subject"], "order-1");
    assert_eq!(e["stream"], "order-1");
    assert_eq!(e["data"], json!({"at": "Placed"}));
    assert_eq!(e["revision"], 0);
    assert!(e["time"].as_str().unwrap().ends_with('Z'));

    let back = api
        .get("/v1/streams/order-1?direction=backward&limit=1")
        .await
        .json();
    assert_eq!(back["events"][0]["type"], "Paid");
    assert_eq!(back["next"], 0);
    let from = api.get("/v1/streams/order-1?from=1").await.json();
    assert_eq!(from["events"][0]["revision"], 1);
}

#[tokio::test]
async fn expected_revision_conflicts_say_expected_and_actual() {
    let api = Api::new().await;
    api.post_json("/v1/streams/acc-1", json!({"events": [ev("Opened", &[])]}))
        .await;
    let p = api
        .post_json(
            "/v1/streams/acc-1",
            json!({"expectedRevision": 5, "events": [ev("X", &[])]}),
        )
        .await
        .problem(409, "wrong-expected-revision");
    assert_eq!(p["expectedRevision"], 5);
    assert_eq!(p["actualRevision"], 0);
    assert_eq!(p["stream"], "acc-1");
    let p = api
        .post_json(
            "/v1/streams/acc-2",
            json!({"expectedRevision": "streamExists", "events": [ev("X", &[])]}),
        )
        .await
        .problem(409, "wrong-expected-revision");
    assert_eq!(p["actualRevision"], Value::Null);
    let ok = api
        .post_json(
            "/v1/streams/acc-1",
            json!({"expectedRevision": 0, "events": [ev("X", &[])]}),
        )
        .await;
    assert_eq!(ok.status, StatusCode::CREATED);
    let ok = api
        .post_json(
            "/v1/streams/acc-3",
            json!({"expectedRevision": "noStream", "events": [ev("X", &[])]}),
        )
        .await;
    assert_eq!(ok.status, StatusCode::CREATED);
}

#[tokio::test]
async fn a_dcb_condition_fails_with_the_matching_position() {
    let api = Api::new().await;
    api.post_json(
        "/v1/streams/user-1",
        json!({"events": [ev("Registered", &["username:ada"])]}),
    )
    .await;
    let condition = json!({"failIfEventsMatch": {"items": [{"types": ["Registered"], "tags": ["username:ada"]}]}});
    let p = api
        .post_json(
            "/v1/streams/user-2",
            json!({"condition": condition, "events": [ev("Registered", &["username:ada"])]}),
        )
        .await
        .problem(409, "append-condition-failed");
    assert_eq!(p["position"], 0);
    // After the matching event the condition holds.
    let after = json!({"failIfEventsMatch": condition["failIfEventsMatch"], "after": 0});
    let ok = api
        .post_json(
            "/v1/streams/user-2",
            json!({"condition": after, "events": [ev("Registered", &["username:bob"])]}),
        )
        .await;
    assert_eq!(
        ok.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&ok.body)
    );
}

#[tokio::test]
async fn idempotent_retries_return_the_original_result_and_reused_ids_conflict() {
    let api = Api::new().await;
    let id = "7d444840-9dc0-11d1-b245-5ffdce74fad2";
    let body = json!({"events": [{"id": id, "type": "Paid", "data": {"amount": 5}}]});
    let first = api.post_json("/v1/streams/pay-1", body.clone()).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let again = api.post_json("/v1/streams/pay-1", body).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.json()["firstPosition"], first.json()["firstPosition"]);
    assert_eq!(again.json()["replayed"], true);
    let p = api
        .post_json(
            "/v1/streams/pay-1",
            json!({"events": [{"id": id, "type": "Paid", "data": {"amount": 6}}]}),
        )
        .await
        .problem(409, "event-id-reused");
    assert_eq!(p["id"], id);
    assert!(
        p["detail"].as_str().unwrap().contains("data differs"),
        "{p}"
    );
    let head = api.get("/v1/streams/pay-1/head").await.json();
    assert_eq!(head, json!({"revision": 0, "position": 0}));
}

#[tokio::test]
async fn malformed_bodies_are_400_and_say_where() {
    let api = Api::new().await;
    let bad_json = api
        .call(
            "POST",
            "/v1/streams/s-1",
            &[("content-type", "application/json")],
            "{\"events\": [",
        )
        .await
        .problem(400, "malformed-request");
    assert!(
        bad_json["detail"].as_str().unwrap().contains("line 1"),
        "{bad_json}"
    );
    let wrong_type = api
        .post_json("/v1/streams/s-1", json!({"events": [{"type": 5}]}))
        .await
        .problem(400, "malformed-request");
    assert!(
        wrong_type["detail"]
            .as_str()
            .unwrap()
            .contains("events[0].type"),
        "{wrong_type}"
    );
    let unknown = api
        .post_json(
            "/v1/streams/s-1",
            json!({"events": [{"type": "A", "tag": ["x"]}]}),
        )
        .await
        .problem(400, "malformed-request");
    assert!(
        unknown["detail"]
            .as_str()
            .unwrap()
            .contains("unknown field `tag`"),
        "{unknown}"
    );
    let bad_expected = api
        .post_json(
            "/v1/streams/s-1",
            json!({"expectedRevision": "sometimes", "events": [ev("A", &[])]}),
        )
        .await
        .problem(400, "malformed-request");
    assert!(
        bad_expected["detail"]
            .as_str()
            .unwrap()
            .contains("expectedRevision"),
        "{bad_expected}"
    );
    api.call(
        "POST",
        "/v1/streams/s-1",
        &[("content-type", "text/plain")],
        "hi",
    )
    .await
    .problem(415, "unsupported-media-type");
    // Nothing of the failed requests was stored.
    api.get("/v1/streams/s-1")
        .await
        .problem(404, "stream-not-found");
}

#[tokio::test]
async fn invalid_events_are_422() {
    let limits = Limits {
        max_event_bytes: 200,
        max_events_per_append: 2,
        ..Limits::default()
    };
    let api = Api::with(limits, HttpConfig::default()).await;
    let p = api
        .post_json("/v1/streams/has%20space", json!({"events": [ev("A", &[])]}))
        .await
        .problem(422, "invalid-event");
    assert!(p["detail"].as_str().unwrap().contains("stream name"), "{p}");
    api.post_json("/v1/streams/%24system", json!({"events": [ev("A", &[])]}))
        .await
        .problem(422, "invalid-event");
    let p = api
        .post_json("/v1/streams/s-1", json!({"events": [{"type": ""}]}))
        .await
        .problem(422, "invalid-event");
    assert!(p["detail"].as_str().unwrap().contains("events[0]"), "{p}");
    let big = json!({"events": [{"type": "A", "data": {"x": "y".repeat(300)}}]});
    let p = api
        .post_json("/v1/streams/s-1", big)
        .await
        .problem(422, "invalid-event");
    assert!(p["detail"].as_str().unwrap().contains("limit"), "{p}");
    let many = json!({"events": [ev("A", &[]), ev("B", &[]), ev("C", &[])]});
    api.post_json("/v1/streams/s-1", many)
        .await
        .problem(422, "invalid-event");
    api.post_json("/v1/streams/s-1", json!({"events": []}))
        .await
        .problem(422, "invalid-event");
}

#[tokio::test]
async fn oversize_bodies_are_413() {
    let api = Api::with(
        Limits::default(),
        HttpConfig {
            max_body_bytes: 1024,
            ..HttpConfig::default()
        },
    )
    .await;
    let body = json!({"events": [{"type": "A", "data": "x".repeat(2000)}]}).to_string();
    let p = api
        .call(
            "POST",
            "/v1/streams/s-1",
            &[("content-type", "application/json")],
            body,
        )
        .await
        .problem(413, "payload-too-large");
    assert_eq!(p["limit"], 1024);
}

#[tokio::test]
async fn cloudevents_batch_mode_appends_with_the_header_revision() {
    let api = Api::new().await;
    let batch = json!([
        {"specversion": "1.0", "id": "0f8fad5b-d9cb-469f-a165-70867728950e", "type": "A", "source": "/x", "subject": "b-1", "data": {"n": 1}},
        {"specversion": "1.0", "type": "B", "source": "/x", "datacontenttype": "application/octet-stream", "data_base64": "AAEC"}
    ]);
    let headers = [
        ("content-type", "application/cloudevents-batch+json"),
        ("skald-expected-revision", "noStream"),
    ];
    let a = api
        .call("POST", "/v1/streams/b-1", &headers, batch.to_string())
        .await;
    assert_eq!(
        a.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    let page = api.get("/v1/streams/b-1").await.json();
    assert_eq!(
        page["events"][0]["id"],
        "0f8fad5b-d9cb-469f-a165-70867728950e"
    );
    assert_eq!(page["events"][0]["source"], "/x");
    assert_eq!(page["events"][1]["data_base64"], "AAEC");
    let again = api
        .call(
            "POST",
            "/v1/streams/b-1",
            &headers,
            json!([{"type": "C"}]).to_string(),
        )
        .await;
    again.problem(409, "wrong-expected-revision");
    let wrong_subject = json!([{"type": "A", "subject": "other"}]);
    api.call(
        "POST",
        "/v1/streams/b-1",
        &headers[..1],
        wrong_subject.to_string(),
    )
    .await
    .problem(400, "malformed-request");
}

#[tokio::test]
async fn all_category_and_query_reads() {
    let api = Api::new().await;
    api.post_json(
        "/v1/streams/order-1",
        json!({"events": [ev("Placed", &["customer:1"])]}),
    )
    .await;
    api.post_json(
        "/v1/streams/user-1",
        json!({"events": [ev("Registered", &["customer:1"])]}),
    )
    .await;
    api.post_json(
        "/v1/streams/order-2",
        json!({"events": [ev("Placed", &["customer:2"])]}),
    )
    .await;

    let all = api.get("/v1/all").await.json();
    let positions: Vec<_> = all["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["position"].clone())
        .collect();
    assert_eq!(positions, vec![json!(0), json!(1), json!(2)]);
    let filtered = api
        .get("/v1/all?types=Placed&tags=customer%3A2")
        .await
        .json();
    assert_eq!(filtered["events"].as_array().unwrap().len(), 1);
    assert_eq!(filtered["events"][0]["stream"], "order-2");
    let page = api.get("/v1/all?from=1&limit=1").await.json();
    assert_eq!(page["events"][0]["position"], 1);
    assert_eq!(page["next"], 2);

    let cat = api.get("/v1/categories/order").await.json();
    let streams: Vec<_> = cat["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["stream"].clone())
        .collect();
    assert_eq!(streams, vec![json!("order-1"), json!("order-2")]);

    let q = api
        .post_json(
            "/v1/query",
            json!({"query": {"items": [{"tags": ["customer:1"]}]}, "from": 1}),
        )
        .await
        .json();
    assert_eq!(q["events"].as_array().unwrap().len(), 1);
    assert_eq!(q["events"][0]["type"], "Registered");
    api.post_json("/v1/query", json!({"query": {"items": []}}))
        .await
        .problem(422, "invalid-event");
    api.post_json("/v1/query", json!({"items": []}))
        .await
        .problem(400, "malformed-request");
}

#[tokio::test]
async fn ndjson_streams_every_event_across_pages() {
    let api = Api::new().await;
    for chunk in 0..5 {
        let events: Vec<Value> = (0..1000)
            .map(|i| json!({"type": "T", "data": {"i": chunk * 1000 + i}}))
            .collect();
        let a = api
            .post_json("/v1/streams/big-1", json!({"events": events}))
            .await;
        assert_eq!(a.status, StatusCode::CREATED);
    }
    let a = api
        .call(
            "GET",
            "/v1/all",
            &[("accept", "application/x-ndjson")],
            Body::empty(),
        )
        .await;
    assert_eq!(a.content_type, "application/x-ndjson");
    let lines: Vec<Value> = a
        .body
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5000);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["position"], i as u64);
        assert_eq!(line["data"]["i"], i as u64);
    }
    let limited = api
        .call(
            "GET",
            "/v1/streams/big-1?from=4990&limit=5",
            &[("accept", "application/x-ndjson")],
            Body::empty(),
        )
        .await;
    assert_eq!(limited.body.iter().filter(|b| **b == b'\n').count(), 5);
}

#[tokio::test]
async fn bad_parameters_are_400() {
    let api = Api::new().await;
    api.post_json("/v1/streams/s-1", json!({"events": [ev("A", &[])]}))
        .await;
    let p = api
        .get("/v1/all?from=-3")
        .await
        .problem(400, "malformed-request");
    assert!(p["detail"].as_str().unwrap().contains("from"), "{p}");
    api.get("/v1/streams/s-1?direction=sideways")
        .await
        .problem(400, "malformed-request");
    api.get("/v1/all?limit=5000")
        .await
        .problem(400, "malformed-request");
    let p = api
        .get("/v1/all?form=3")
        .await
        .problem(400, "malformed-request");
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("unknown query parameter"),
        "{p}"
    );
    api.get("/v1/all?direction=backward")
        .await
        .problem(400, "malformed-request");
}

#[tokio::test]
async fn heads_info_routes_and_shutdown() {
    let api = Api::new().await;
    api.get("/v1/streams/nope-1/head")
        .await
        .problem(404, "stream-not-found");
    api.get("/v1/streams/nope-1")
        .await
        .problem(404, "stream-not-found");
    let info = api.get("/v1/info").await.json();
    assert_eq!(info["headPosition"], Value::Null);
    assert_eq!(info["durability"], "fsync");
    api.post_json("/v1/streams/s-1", json!({"events": [ev("A", &[])]}))
        .await;
    let info = api.get("/v1/info").await.json();
    assert_eq!(info["headPosition"], 0);
    assert!(info["storageBytes"].as_u64().unwrap() > 0);

    api.get("/v2/nothing").await.problem(404, "not-found");
    api.call("DELETE", "/v1/all", &[], Body::empty())
        .await
        .problem(405, "method-not-allowed");

    api.store.shutdown().await;
    api.post_json("/v1/streams/s-1", json!({"events": [ev("A", &[])]}))
        .await
        .problem(503, "unavailable");
    // Reads go on after the writer stopped.
    assert_eq!(api.get("/v1/streams/s-1").await.status, StatusCode::OK);
}

#[tokio::test]
async fn the_openapi_document_lists_every_route() {
    let api = Api::new().await;
    let doc = api.get("/v1/openapi.json").await.json();
    assert_eq!(doc["openapi"], "3.1.0");
    for (path, method) in [
        ("/v1/streams/{stream}", "post"),
        ("/v1/streams/{stream}", "get"),
        ("/v1/streams/{stream}/head", "get"),
        ("/v1/all", "get"),
        ("/v1/categories/{category}", "get"),
        ("/v1/query", "post"),
        ("/v1/info", "get"),
        ("/v1/openapi.json", "get"),
        ("/v1/subscribe/all", "get"),
        ("/v1/subscribe/streams/{stream}", "get"),
        ("/v1/subscribe/categories/{category}", "get"),
        ("/v1/subscribe/query", "get"),
        ("/v1/ws", "get"),
        ("/v1/groups", "post"),
        ("/v1/groups", "get"),
        ("/v1/groups/{name}", "get"),
        ("/v1/groups/{name}", "patch"),
        ("/v1/groups/{name}", "delete"),
        ("/v1/groups/{name}/replay-parked", "post"),
        ("/v1/groups/{name}/messages", "get"),
        ("/v1/groups/{name}/ack", "post"),
        ("/v1/groups/{name}/nack", "post"),
        ("/v1/sagas", "post"),
        ("/v1/sagas", "get"),
        ("/v1/sagas/{name}", "get"),
        ("/v1/sagas/{name}", "delete"),
        ("/v1/sagas/{name}/disable", "post"),
        ("/v1/sagas/{name}/enable", "post"),
        ("/v1/saga-instances", "get"),
        ("/v1/saga-instances/{id}", "get"),
        ("/v1/saga-instances/{id}/retry", "post"),
        ("/v1/saga-instances/{id}/cancel", "post"),
        ("/v1/admin/keys", "post"),
        ("/v1/admin/keys", "get"),
        ("/v1/admin/keys/{id}", "delete"),
        ("/v1/admin/rules", "get"),
        ("/v1/admin/rules", "put"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} missing from the OpenAPI document"
        );
    }
}

#[tokio::test]
async fn persistent_subscription_groups_over_http() {
    let api = Api::new().await;
    api.post_json(
        "/v1/streams/order-1",
        json!({"events": [ev("Placed", &[]), ev("Paid", &[]), ev("Shipped", &[])]}),
    )
    .await;
    let created = api
        .post_json(
            "/v1/groups",
            json!({"name": "billing", "source": {"category": "order"}, "maxDeliveries": 2,
                   "retryDelayMs": 1, "messageTimeoutMs": 60000}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let g = created.json();
    assert_eq!(g["name"], "billing");
    assert_eq!(g["settings"]["maxDeliveries"], 2);
    assert_eq!(g["settings"]["strategy"], "round-robin");
    api.post_json(
        "/v1/groups",
        json!({"name": "billing", "source": {"all": {}}}),
    )
    .await
    .problem(409, "group-exists");

    // Long-poll: the three events, each with an ack id.
    let batch = api
        .get("/v1/groups/billing/messages?count=10&wait=5000&consumer=worker-1")
        .await;
    assert_eq!(batch.status, StatusCode::OK);
    let messages = batch.json()["messages"].as_array().unwrap().clone();
    assert_eq!(messages.len(), 3);
    assert_eq!(messages[0]["deliveries"], 1);
    assert_eq!(messages[0]["event"]["type"], "Placed");
    let id = |i: usize| messages[i]["ackId"].as_str().unwrap().to_owned();
    let acked = api
        .post_json("/v1/groups/billing/ack", json!({"ids": [id(0), "999"]}))
        .await
        .json();
    assert_eq!(acked, json!({"done": 1, "unknown": ["999"]}));
    api.post_json(
        "/v1/groups/billing/nack",
        json!({"ids": [id(1)], "action": "skip"}),
    )
    .await;
    // Retry once: redelivered; then retry again: parked (maxDeliveries 2).
    api.post_json(
        "/v1/groups/billing/nack",
        json!({"ids": [id(2)], "action": "retry", "reason": "card service down"}),
    )
    .await;
    let again = api
        .get("/v1/groups/billing/messages?wait=5000")
        .await
        .json();
    assert_eq!(again["messages"][0]["deliveries"], 2);
    // The nack names this delivery: the first one's ack id no longer does.
    let stale = api
        .post_json(
            "/v1/groups/billing/nack",
            json!({"ids": [id(2)], "action": "retry"}),
        )
        .await
        .json();
    assert_eq!(stale, json!({"done": 0, "unknown": [id(2)]}));
    api.post_json(
        "/v1/groups/billing/nack",
        json!({"ids": [again["messages"][0]["ackId"]], "action": "retry"}),
    )
    .await;
    let mut info = api.get("/v1/groups/billing").await.json();
    for _ in 0..500 {
        if info["stats"]["parked"] == 1 && info["stats"]["lag"] == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        info = api.get("/v1/groups/billing").await.json();
    }
    assert_eq!(info["stats"]["parked"], 1, "{info}");
    assert_eq!(info["stats"]["inFlight"], 0);
    assert_eq!(info["stats"]["lag"], 0, "{info}");
    let replay = api
        .call(
            "POST",
            "/v1/groups/billing/replay-parked",
            &[],
            Body::empty(),
        )
        .await;
    assert_eq!(replay.status, StatusCode::ACCEPTED);
    assert_eq!(replay.json()["replaying"], 1);
    let replayed = api
        .get("/v1/groups/billing/messages?wait=5000")
        .await
        .json();
    let replayed_id = replayed["messages"][0]["ackId"].as_str().unwrap();
    assert!(replayed_id.starts_with("parked-0."), "{replayed_id}");
    assert_eq!(replayed["messages"][0]["event"]["type"], "Shipped");

    // Settings change in place; source and start do not.
    let patched = api
        .call(
            "PATCH",
            "/v1/groups/billing",
            &[("content-type", "application/json")],
            json!({"strategy": "pinned"}).to_string(),
        )
        .await;
    assert_eq!(patched.json()["settings"]["strategy"], "pinned");
    let fixed = api
        .call(
            "PATCH",
            "/v1/groups/billing",
            &[("content-type", "application/json")],
            json!({"source": {"all": {}}}).to_string(),
        )
        .await
        .problem(400, "malformed-request");
    assert!(
        fixed["detail"]
            .as_str()
            .unwrap()
            .contains("delete the group")
    );
    let list = api.get("/v1/groups").await.json();
    assert_eq!(list["groups"].as_array().unwrap().len(), 1);
    let deleted = api
        .call("DELETE", "/v1/groups/billing", &[], Body::empty())
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    api.get("/v1/groups/billing")
        .await
        .problem(404, "group-not-found");
    api.post_json("/v1/groups/billing/ack", json!({"ids": ["1"]}))
        .await
        .problem(404, "group-not-found");
}

#[tokio::test]
async fn bad_group_requests_say_what_is_wrong() {
    let api = Api::new().await;
    let cases = [
        (json!({"source": {"all": {}}}), "name is required"),
        (json!({"name": "a b", "source": {"all": {}}}), "group name"),
        (json!({"name": "g"}), "source is required"),
        (json!({"name": "g", "source": {"everything": {}}}), "source"),
        (
            json!({"name": "g", "source": {"all": {}}, "from": {"revision": 2}}),
            "revision",
        ),
        (
            json!({"name": "g", "source": {"all": {}}, "maxDeliveries": 0}),
            "maxDeliveries",
        ),
        (
            json!({"name": "g", "source": {"all": {}}, "strategy": "random"}),
            "strategy",
        ),
        (
            json!({"name": "g", "source": {"all": {}}, "bufferSiz": 10}),
            "bufferSiz",
        ),
        (
            json!({"name": "g", "source": {"stream": "$groups"}}),
            "reserved",
        ),
    ];
    for (body, needle) in cases {
        let p = api
            .post_json("/v1/groups", body.clone())
            .await
            .problem(400, "malformed-request");
        assert!(
            p["detail"].as_str().unwrap().contains(needle),
            "{body}: {p}"
        );
    }
    api.post_json("/v1/groups", json!({"name": "g", "source": {"all": {}}}))
        .await;
    for (uri, needle) in [
        ("/v1/groups/g/messages?count=0", "count"),
        ("/v1/groups/g/messages?count=5000", "count"),
        ("/v1/groups/g/messages?wait=soon", "wait"),
        ("/v1/groups/g/messages?limit=1", "limit"),
    ] {
        let p = api.get(uri).await.problem(400, "malformed-request");
        assert!(p["detail"].as_str().unwrap().contains(needle), "{uri}: {p}");
    }
    let p = api
        .post_json(
            "/v1/groups/g/nack",
            json!({"ids": ["1"], "action": "later"}),
        )
        .await
        .problem(400, "malformed-request");
    assert!(p["detail"].as_str().unwrap().contains("action"), "{p}");
    api.get("/v1/groups/nope/messages?wait=0")
        .await
        .problem(404, "group-not-found");
}

const SHIPMENT_SAGA: &str = r#"
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
    action: {append: {stream: "ship-{{saga.correlationKey}}", type: Ship, data: {at: "{{trigger.data.at}}"}}}
"#;

async fn register(api: &Api, content_type: &str, text: &str) -> Answer {
    api.call(
        "POST",
        "/v1/sagas",
        &[("content-type", content_type)],
        text.to_owned(),
    )
    .await
}

#[tokio::test]
async fn sagas_over_http_register_run_and_explain_themselves() {
    let api = Api::new().await;
    let created = register(&api, "application/yaml", SHIPMENT_SAGA).await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert_eq!(
        created.json(),
        json!({"name": "shipment", "version": 1, "replayed": false})
    );
    let again = register(&api, "application/yaml", SHIPMENT_SAGA).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.json()["replayed"], true);
    // The same definition as JSON is the same definition.
    let shown = api.get("/v1/sagas/shipment").await;
    assert_eq!(shown.status, StatusCode::OK);
    let as_json = shown.json().to_string();
    assert_eq!(
        register(&api, "application/json", &as_json).await.json()["replayed"],
        true
    );

    let broken = SHIPMENT_SAGA.replace(
        "    compensation: {append: {stream: \"stock-{{saga.correlationKey}}\", type: Release}}\n",
        "",
    );
    let p = register(&api, "application/yaml", &broken)
        .await
        .problem(422, "invalid-saga-definition");
    let detail = p["detail"].as_str().unwrap();
    assert!(detail.contains("line 7, column 5"), "{detail}");
    assert!(
        detail.contains("\"reserve\" has no compensation"),
        "{detail}"
    );
    let p = register(&api, "application/yaml", "name: [unclosed\n")
        .await
        .problem(422, "invalid-saga-definition");
    assert!(p["detail"].as_str().unwrap().contains("line 2"), "{p}");
    register(&api, "text/csv", SHIPMENT_SAGA)
        .await
        .problem(415, "unsupported-media-type");
    api.get("/v1/sagas/nope")
        .await
        .problem(404, "saga-not-found");
    api.get("/v1/sagas/shipment?version=2")
        .await
        .problem(404, "saga-not-found");
    api.get("/v1/sagas/shipment?version=x")
        .await
        .problem(400, "malformed-request");
    let listed = api.get("/v1/sagas").await.json();
    assert_eq!(listed["sagas"][0]["name"], "shipment");
    assert_eq!(listed["sagas"][0]["versions"], json!([1]));

    api.post_json(
        "/v1/streams/order-7",
        json!({"events": [ev("Placed", &[])]}),
    )
    .await;
    let instance = loop {
        let found = api
            .get("/v1/saga-instances?state=completed&definition=shipment")
            .await
            .json();
        if let Some(first) = found["instances"].as_array().unwrap().first() {
            break first.clone();
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_eq!(instance["correlationKey"], "order-7");
    assert_eq!(instance["completedSteps"], json!(["reserve", "ship"]));
    let id = instance["sagaId"].as_str().unwrap();
    let history = api.get(&format!("/v1/saga-instances/{id}")).await.json();
    let types: Vec<&str> = history["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        [
            "SagaStarted",
            "StepSucceeded",
            "StepSucceeded",
            "SagaCompleted"
        ]
    );
    // The command the saga appended carries the saga's ids in its metadata.
    let shipped = api.get("/v1/streams/ship-order-7").await.json();
    let event = &shipped["events"][0];
    assert_eq!(event["type"], "Ship");
    assert_eq!(event["data"], json!({"at": "Placed"}));
    assert_eq!(event["metadata"]["sagaId"], id);
    assert!(event["metadata"]["causationId"].is_string(), "{event}");

    api.get("/v1/saga-instances?state=bogus")
        .await
        .problem(400, "malformed-request");
    api.get("/v1/saga-instances?limit=0")
        .await
        .problem(400, "malformed-request");
    api.post_json(&format!("/v1/saga-instances/{id}/retry"), json!({}))
        .await
        .problem(409, "saga-conflict");
    api.post_json(
        &format!("/v1/saga-instances/{id}/cancel"),
        json!({"reason": "late"}),
    )
    .await
    .problem(409, "saga-conflict");
    api.post_json("/v1/saga-instances/nope/cancel", json!({}))
        .await
        .problem(404, "saga-not-found");
    api.get("/v1/saga-instances/nope")
        .await
        .problem(404, "saga-not-found");
    let metrics = String::from_utf8(api.get("/metrics").await.body).unwrap();
    assert!(
        metrics.contains("skald_sagas{definition=\"shipment\",state=\"completed\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("skald_saga_step_attempts_total{definition=\"shipment\",step=\"ship\",phase=\"action\",outcome=\"succeeded\"} 1"));
}
