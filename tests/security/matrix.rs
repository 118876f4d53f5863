//! Every role against every endpoint: allowed and denied, rules changed without a restart,
//! filtered multi-stream reads, revoked and expired keys, the audit trail, rate limits, and
//! no secret in the logs.

use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::{Answer, Api, assert_refused, serve_with_config};

const ROLES: [&str; 7] = [
    "admin",
    "ops",
    "reader",
    "writer",
    "subscriber",
    "sagaop",
    "guest",
];

fn rules() -> Value {
    json!({"rules": [
        {"role": "reader", "allow": ["read"], "on": ["order-*"]},
        {"role": "writer", "allow": ["read", "append"], "on": ["order-*"]},
        {"role": "subscriber", "allow": ["read", "subscribe"], "on": ["order*"]},
        {"role": "sagaop", "allow": ["saga"], "on": ["order-*"]},
        {"role": "ops", "allow": ["admin"]}
    ]})
}

/// One operation of the matrix: what it does, and the roles that may.
async fn operate(api: &Api, op: &str, role: &str, token: &str) -> StatusCode {
    let t = Some(token);
    let get = |path: &'static str| api.call(Method::GET, path, t, "");
    let a: Answer = match op {
        "append order" => api.append(t, "order-1").await,
        "append payment" => api.append(t, "payment-1").await,
        "read order" => get("/v1/streams/order-1").await,
        "read payment" => get("/v1/streams/payment-1").await,
        "head order" => get("/v1/streams/order-1/head").await,
        "read all" => get("/v1/all").await,
        "read category order" => get("/v1/categories/order").await,
        "read category payment" => get("/v1/categories/payment").await,
        "query" => {
            api.call(
                Method::POST,
                "/v1/query",
                t,
                r#"{"query":{"items":[{"types":["Happened"]}]}}"#,
            )
            .await
        }
        "subscribe order" | "subscribe all" => {
            let path = if op == "subscribe all" {
                "/v1/subscribe/all"
            } else {
                "/v1/subscribe/streams/order-1"
            };
            let (status, _) = api.stream(path, t, Duration::from_millis(300)).await;
            return status;
        }
        "create group" => {
            let body = json!({"name": format!("g-{role}"), "source": {"category": "order"}});
            api.call(Method::POST, "/v1/groups", t, &body.to_string())
                .await
        }
        "list groups" => get("/v1/groups").await,
        "list sagas" => get("/v1/sagas").await,
        "list saga instances" => get("/v1/saga-instances").await,
        "disable saga" => {
            api.call(Method::POST, "/v1/sagas/order-flow/disable", t, "")
                .await
        }
        "enable saga" => {
            api.call(Method::POST, "/v1/sagas/order-flow/enable", t, "")
                .await
        }
        "list keys" => get("/v1/admin/keys").await,
        "get rules" => get("/v1/admin/rules").await,
        "metrics" => get("/metrics").await,
        "read audit" => get("/v1/streams/$audit").await,
        "append audit" => api.append(t, "$audit").await,
        "append security" => api.append(t, "$security-rules").await,
        "info" => get("/v1/info").await,
        "health" => get("/health/ready").await,
        other => panic!("unknown operation {other}"),
    };
    if a.status == StatusCode::FORBIDDEN {
        assert_eq!(
            a.json()["type"],
            "urn:skald:problem:forbidden",
            "{op} {role}"
        );
    }
    a.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_against_every_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_with_config(dir.path(), "[auth]\napi_keys = true\n");
    let api = Api::new(&server.url);
    let initial = std::fs::read_to_string(dir.path().join("data/initial-admin-key")).unwrap();
    let admin = initial.trim().to_owned();
    assert!(admin.starts_with("skald_"));
    let mut secrets = vec![admin.clone()];

    // Nothing without credentials, and each wrong key says why.
    assert_refused(
        &api.call(Method::GET, "/v1/info", None, "").await,
        "missing",
    );
    assert_refused(
        &api.call(Method::GET, "/v1/info", Some("skald_zz"), "")
            .await,
        "malformed",
    );
    assert_refused(
        &api.call(
            Method::GET,
            "/v1/info",
            Some("skald_0123456789abcdef_nope"),
            "",
        )
        .await,
        "unknown-key",
    );
    let wrong = format!("{}x", admin);
    let refused = api.call(Method::GET, "/v1/info", Some(&wrong), "").await;
    assert_refused(&refused, "wrong-secret");
    assert!(!String::from_utf8_lossy(&refused.body).contains(&admin[23..]));
    assert_refused(
        &api.call(
            Method::GET,
            "/v1/info",
            Some("eyJhbGciOiJub25lIn0.e30."),
            "",
        )
        .await,
        "unsupported",
    );
    // Public endpoints need nothing; they carry the security headers.
    let live = api.call(Method::GET, "/health/live", None, "").await;
    assert_eq!(live.status, StatusCode::OK);
    assert_eq!(live.headers["x-content-type-options"], "nosniff");
    assert_eq!(live.headers["x-frame-options"], "DENY");
    assert!(live.headers.contains_key("content-security-policy"));
    assert!(
        !live.headers.contains_key("access-control-allow-origin"),
        "CORS is off by default"
    );
    assert_eq!(
        api.call(Method::GET, "/v1/openapi.json", None, "")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        api.call(Method::GET, "/metrics", None, "").await.status,
        StatusCode::UNAUTHORIZED
    );

    let set = api
        .call(
            Method::PUT,
            "/v1/admin/rules",
            Some(&admin),
            &rules().to_string(),
        )
        .await;
    assert_eq!(set.status, StatusCode::OK, "{:?}", set.body);
    let revision = set.json()["revision"].as_u64().unwrap();
    let bad = api
        .call(
            Method::PUT,
            "/v1/admin/rules",
            Some(&admin),
            r#"{"rules":[{"role":"x","allow":["fly"]}]}"#,
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(
        bad.json()["detail"].as_str().unwrap().contains("fly"),
        "{}",
        bad.json()
    );
    assert_eq!(
        api.append(Some(&admin), "order-1").await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        api.append(Some(&admin), "payment-1").await.status,
        StatusCode::CREATED
    );

    let flow = json!({
        "name": "order-flow", "version": 1,
        "trigger": {"category": "order", "types": ["OrderPlaced"]},
        "correlationKey": "/data/id",
        "steps": [{"name": "note", "pivot": true,
                   "action": {"append": {"stream": "ledger-{{saga.correlationKey}}", "type": "Noted"}}}]
    });
    let registered = api
        .call(Method::POST, "/v1/sagas", Some(&admin), &flow.to_string())
        .await;
    assert_eq!(
        registered.status,
        StatusCode::CREATED,
        "{:?}",
        registered.body
    );

    let mut tokens = std::collections::BTreeMap::new();
    for role in ROLES {
        let token = api.key(&admin, &format!("{role}-key"), &[role]).await;
        secrets.push(token.clone());
        tokens.insert(role, token);
    }
    let everyone: &[&str] = &ROLES;
    let readers: &[&str] = &["admin", "reader", "writer", "subscriber"];
    let matrix: Vec<(&str, &[&str])> = vec![
        ("append order", &["admin", "writer"]),
        ("append payment", &["admin"]),
        ("read order", readers),
        ("read payment", &["admin"]),
        ("head order", readers),
        ("read all", readers),
        ("read category order", readers),
        ("read category payment", &["admin"]),
        ("query", readers),
        ("subscribe order", &["admin", "subscriber"]),
        ("subscribe all", &["admin", "subscriber"]),
        ("create group", &["admin", "subscriber"]),
        ("list groups", &["admin", "subscriber"]),
        ("list sagas", &["admin", "sagaop"]),
        ("list saga instances", &["admin", "sagaop"]),
        ("disable saga", &["admin", "sagaop"]),
        ("enable saga", &["admin", "sagaop"]),
        ("list keys", &["admin", "ops"]),
        ("get rules", &["admin", "ops"]),
        ("metrics", &["admin", "ops"]),
        ("read audit", &["admin", "ops"]),
        ("append audit", &[]),
        ("append security", &[]),
        ("info", everyone),
        ("health", everyone),
    ];
    let mut wrong = Vec::new();
    for (op, allowed) in &matrix {
        for role in ROLES {
            let status = operate(&api, op, role, &tokens[role]).await;
            let expect_allowed = allowed.contains(&role);
            // System streams are refused as invalid names for appends, before any rule.
            let refusal = if *op == "append audit" || *op == "append security" {
                StatusCode::UNPROCESSABLE_ENTITY
            } else {
                StatusCode::FORBIDDEN
            };
            let ok = if expect_allowed {
                status.is_success()
            } else {
                status == refusal
            };
            if !ok {
                wrong.push(format!(
                    "{op} as {role}: {status} (allowed: {expect_allowed})"
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "the matrix does not hold:\n{}",
        wrong.join("\n")
    );

    // Multi-stream reads and subscriptions deliver only readable streams.
    let all = api
        .call(
            Method::GET,
            "/v1/all?limit=1000",
            Some(&tokens["reader"]),
            "",
        )
        .await;
    let streams: Vec<String> = all.json()["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["stream"].as_str().unwrap().to_owned())
        .collect();
    assert!(streams.iter().any(|s| s == "order-1"), "{streams:?}");
    assert!(
        streams.iter().all(|s| s.starts_with("order-")),
        "{streams:?}"
    );
    let (_, sse) = api
        .stream(
            "/v1/subscribe/all",
            Some(&tokens["subscriber"]),
            Duration::from_secs(5),
        )
        .await;
    assert!(sse.contains("\"stream\":\"order-1\""), "{sse}");
    assert!(
        !sse.contains("payment-1") && !sse.contains("$security"),
        "{sse}"
    );

    // Rules change without a restart, at the expected revision only.
    let reader = tokens["reader"].clone();
    assert_eq!(
        api.append(Some(&reader), "order-2").await.status,
        StatusCode::FORBIDDEN
    );
    let mut more = rules();
    more["rules"]
        .as_array_mut()
        .unwrap()
        .push(json!({"role": "reader", "allow": ["append"], "on": ["order-2"]}));
    more["expectedRevision"] = json!(revision + 5);
    let stale = api
        .call(
            Method::PUT,
            "/v1/admin/rules",
            Some(&admin),
            &more.to_string(),
        )
        .await;
    assert_eq!(stale.status, StatusCode::CONFLICT, "{:?}", stale.body);
    more["expectedRevision"] = json!(revision);
    let set = api
        .call(
            Method::PUT,
            "/v1/admin/rules",
            Some(&tokens["ops"]),
            &more.to_string(),
        )
        .await;
    assert_eq!(set.status, StatusCode::OK, "{:?}", set.body);
    assert_eq!(
        api.append(Some(&reader), "order-2").await.status,
        StatusCode::CREATED
    );

    // A revoked key is refused at once; an expired one too.
    let writer_id = tokens["writer"][6..22].to_owned();
    let revoked = api
        .call(
            Method::DELETE,
            &format!("/v1/admin/keys/{writer_id}"),
            Some(&admin),
            "",
        )
        .await;
    assert_eq!(revoked.status, StatusCode::OK);
    assert_eq!(revoked.json()["revoked"], true);
    assert_refused(
        &api.append(Some(&tokens["writer"]), "order-1").await,
        "revoked",
    );
    let missing = api
        .call(
            Method::DELETE,
            "/v1/admin/keys/ffffffffffffffff",
            Some(&admin),
            "",
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let soon = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 2;
    let short = api
        .call(
            Method::POST,
            "/v1/admin/keys",
            Some(&admin),
            &json!({"name": "short", "roles": ["reader"], "expiresAt": soon}).to_string(),
        )
        .await;
    let short = short.json()["key"].as_str().unwrap().to_owned();
    secrets.push(short.clone());
    assert_eq!(
        api.call(Method::GET, "/v1/info", Some(&short), "")
            .await
            .status,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert_refused(
        &api.call(Method::GET, "/v1/info", Some(&short), "").await,
        "expired",
    );
    // Listing shows no hash and no secret.
    let listed = api
        .call(Method::GET, "/v1/admin/keys", Some(&admin), "")
        .await;
    let text = String::from_utf8_lossy(&listed.body).into_owned();
    assert!(
        !text.contains("argon2") && !text.contains(&admin[23..]),
        "{text}"
    );

    // The audit trail has each kind of event; only admins read it.
    let mut kinds = std::collections::BTreeSet::new();
    for _ in 0..50 {
        let audit = api
            .call(
                Method::GET,
                "/v1/streams/$audit?limit=1000",
                Some(&admin),
                "",
            )
            .await;
        kinds = audit.json()["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["type"].as_str().unwrap().to_owned())
            .collect();
        if kinds.contains("AuthenticationFailed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for kind in [
        "AuthenticationFailed",
        "ApiKeyCreated",
        "ApiKeyRevoked",
        "AccessRulesChanged",
    ] {
        assert!(
            kinds.contains(kind),
            "no {kind} in the audit trail: {kinds:?}"
        );
    }
    let metrics = api.call(Method::GET, "/metrics", Some(&admin), "").await;
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        metrics.contains("skald_auth_failures_total{method=\"api-key\",reason=\"revoked\"} 1"),
        "{metrics}"
    );

    // No secret reached the logs.
    let (status, stderr) = server.terminate();
    assert!(status.success());
    assert!(
        stderr.contains("authentication failed"),
        "the failures are logged"
    );
    for secret in &secrets {
        let (_, secret_part) = secret[6..].split_once('_').unwrap();
        assert!(
            !stderr.contains(secret_part),
            "a key's secret is in the logs"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_with_config(
        dir.path(),
        "[auth]\napi_keys = true\n[rate_limit]\nper_principal = { rate = 0.1, burst = 3 }\nper_address = { rate = 0.1, burst = 12 }\n",
    );
    let api = Api::new(&server.url);
    let admin = std::fs::read_to_string(dir.path().join("data/initial-admin-key")).unwrap();
    let admin = admin.trim();
    let a = api.key(admin, "a", &["admin"]).await;
    let b = api.key(admin, "b", &["admin"]).await;
    for _ in 0..3 {
        assert_eq!(
            api.call(Method::GET, "/v1/info", Some(&a), "").await.status,
            StatusCode::OK
        );
    }
    let limited = api.call(Method::GET, "/v1/info", Some(&a), "").await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.json()["type"], "urn:skald:problem:rate-limited");
    let retry: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&retry), "{retry}");
    // Another principal has its own bucket.
    assert_eq!(
        api.call(Method::GET, "/v1/info", Some(&b), "").await.status,
        StatusCode::OK
    );
    let metrics = api.call(Method::GET, "/metrics", Some(&b), "").await;
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        metrics.contains("skald_rate_limited_total{scope=\"principal\"} 1"),
        "{metrics}"
    );
    // The address bucket runs out too, before credentials are even looked at.
    let mut by_address = None;
    for _ in 0..20 {
        let answer = api.call(Method::GET, "/v1/info", None, "").await;
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            by_address = Some(answer);
            break;
        }
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    }
    let by_address = by_address.expect("the address bucket ran out");
    assert!(
        by_address.json()["detail"]
            .as_str()
            .unwrap()
            .contains("client address")
    );
    // Health checks are never limited.
    assert_eq!(
        api.call(Method::GET, "/health/live", None, "").await.status,
        StatusCode::OK
    );
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_rules_follow_definition_names_and_cancellations_are_audited() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_with_config(dir.path(), "[auth]\napi_keys = true\n");
    let api = Api::new(&server.url);
    let admin = std::fs::read_to_string(dir.path().join("data/initial-admin-key")).unwrap();
    let admin = admin.trim();
    // A definition acts with its registrant's rights, so the operator needs those it uses too.
    let rules = json!({"rules": [
        {"role": "trips", "allow": ["saga"], "on": ["trip-*"]},
        {"role": "trips", "allow": ["read", "subscribe"], "on": ["trip*", "confirm*"]},
        {"role": "trips", "allow": ["append"], "on": ["hold-*"]},
        {"role": "other", "allow": ["saga"], "on": ["billing-*"]}
    ]});
    let set = api
        .call(
            Method::PUT,
            "/v1/admin/rules",
            Some(admin),
            &rules.to_string(),
        )
        .await;
    assert_eq!(set.status, StatusCode::OK);
    let trips = api.key(admin, "trips-operator", &["trips"]).await;
    let other = api.key(admin, "billing-operator", &["other"]).await;
    let definition = r#"
name: trip-booking
version: 1
trigger: {category: trip, types: [TripBooked]}
correlationKey: /data/id
steps:
  - name: hold
    action: {append: {stream: "hold-{{saga.correlationKey}}", type: SeatHeld, data: {}}}
    compensation: {append: {stream: "hold-{{saga.correlationKey}}", type: SeatReleased, data: {}}}
  - name: confirm
    action: {await: {category: confirm, types: [Confirmed], correlation: /data/id, timeout: 1h}}
"#;
    let register = |token: &str| {
        let api = api.clone();
        let token = token.to_owned();
        async move {
            let request = hyper::Request::post(format!("{}/v1/sagas", api.base))
                .header("content-type", "application/yaml")
                .header("authorization", format!("Bearer {token}"))
                .body(http_body_util::Full::new(bytes::Bytes::from(definition)))
                .unwrap();
            let client =
                hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                    .build_http();
            client.request(request).await.unwrap().status()
        }
    };
    assert_eq!(register(&other).await, StatusCode::FORBIDDEN);
    assert_eq!(register(&trips).await, StatusCode::CREATED);
    let listed = api.call(Method::GET, "/v1/sagas", Some(&other), "").await;
    assert_eq!(
        listed.json()["sagas"],
        json!([]),
        "another role's definitions are not listed"
    );
    let booked = r#"{"events":[{"type":"TripBooked","data":{"id":"t1"}}]}"#;
    assert_eq!(
        api.call(Method::POST, "/v1/streams/trip-1", Some(admin), booked)
            .await
            .status,
        StatusCode::CREATED
    );
    let mut id = String::new();
    for _ in 0..100 {
        let instances = api
            .call(
                Method::GET,
                "/v1/saga-instances?state=running",
                Some(&trips),
                "",
            )
            .await
            .json();
        if let Some(i) = instances["instances"].as_array().and_then(|a| a.first())
            && i["completedSteps"]
                .as_array()
                .is_some_and(|s| !s.is_empty())
        {
            id = i["sagaId"].as_str().unwrap().to_owned();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!id.is_empty(), "the saga did not start");
    // Another role's instance is answered as one that does not exist, naming nothing.
    let path = format!("/v1/saga-instances/{id}/cancel");
    let body = r#"{"reason":"customer called"}"#;
    let missing = api
        .call(
            Method::GET,
            "/v1/saga-instances/no-such-id",
            Some(&other),
            "",
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    for (method, path, body) in [
        (Method::POST, path.clone(), body),
        (Method::GET, format!("/v1/saga-instances/{id}"), ""),
        (Method::POST, format!("/v1/saga-instances/{id}/retry"), ""),
    ] {
        let a = api.call(method, &path, Some(&other), body).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}");
        assert!(
            !String::from_utf8_lossy(&a.body).contains("trip"),
            "{path}: {:?}",
            a.body
        );
        assert_eq!(
            a.json()["detail"]
                .as_str()
                .unwrap()
                .replace(&id, "no-such-id"),
            missing.json()["detail"].as_str().unwrap(),
            "the same answer as for no instance"
        );
    }
    assert_eq!(
        api.call(Method::POST, &path, Some(&trips), body)
            .await
            .status,
        StatusCode::ACCEPTED
    );
    let audit = api
        .call(
            Method::GET,
            "/v1/streams/$audit?limit=1000",
            Some(admin),
            "",
        )
        .await
        .json();
    let cancelled: Vec<&Value> = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "SagaCancelRequested")
        .collect();
    assert_eq!(cancelled.len(), 1, "{audit}");
    assert_eq!(cancelled[0]["data"]["by"], "trips-operator");
    assert_eq!(cancelled[0]["data"]["instance"], json!(id));
    assert_eq!(cancelled[0]["data"]["reason"], "customer called");
    drop(server);
}
