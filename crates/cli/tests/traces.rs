//! One trace from an append through the store, to a subscriber and into a saga's HTTP step,
//! as an OTLP receiver in this test sees it: the real binary exports to it over HTTP.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes as AxumBytes;
use axum::http::HeaderMap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use support::{Http, Server};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

/// Every span the receiver got, flattened out of the OTLP requests.
fn spans(received: &Mutex<Vec<Value>>) -> Vec<Value> {
    received
        .lock()
        .unwrap()
        .iter()
        .flat_map(|request| {
            request["resourceSpans"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|r| r["scopeSpans"].as_array().into_iter().flatten())
                .flat_map(|s| s["spans"].as_array().into_iter().flatten())
                .cloned()
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_covers_an_append_its_delivery_and_a_saga_http_step() {
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = Arc::clone(&received);
    let receiver = serve(axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: HeaderMap, body: AxumBytes| {
            let sink = Arc::clone(&sink);
            async move {
                assert_eq!(headers["content-type"], "application/json");
                sink.lock()
                    .unwrap()
                    .push(serde_json::from_slice(&body).unwrap());
                "{}"
            }
        }),
    ))
    .await;
    let called: Arc<Mutex<Vec<String>>> = Arc::default();
    let calls = Arc::clone(&called);
    let target = serve(axum::Router::new().fallback(move |headers: HeaderMap| {
        let calls = Arc::clone(&calls);
        async move {
            let traceparent = headers
                .get("traceparent")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            calls.lock().unwrap().push(traceparent);
            "{}"
        }
    }))
    .await;

    let dir = tempfile::tempdir().unwrap();
    let config = support::loopback_targets_config(dir.path());
    let server = tokio::task::block_in_place(|| {
        Server::start_with_env(
            dir.path(),
            &["--config", &config],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.as_str()),
                ("OTEL_BSP_SCHEDULE_DELAY", "50"),
                ("OTEL_SERVICE_NAME", "skald-test"),
            ],
        )
    });
    let http = Http::new(&server.url);
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let definition = format!(
        "name: notify\nversion: 1\ntrigger: {{category: order, types: [OrderPlaced]}}\n\
         correlationKey: /data/orderId\nsteps:\n  - name: tell\n    pivot: true\n    \
         action: {{http: {{method: POST, url: \"{target}/told\"}}}}\n"
    );
    let request = Request::post(format!("{}/v1/sagas", server.url))
        .header("content-type", "application/yaml")
        .body(Full::new(Bytes::from(definition)))
        .unwrap();
    assert_eq!(
        client.request(request).await.unwrap().status(),
        StatusCode::CREATED
    );

    // A persistent subscription on the category, and a live subscriber, before the append.
    let (status, _) = http
        .call(
            Method::POST,
            "/v1/groups",
            "application/json",
            json!({"name": "billing", "source": {"category": "order"}}).to_string(),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED);
    // A live subscriber on the category, before the append.
    let request = Request::get(format!("{}/v1/subscribe/categories/order", server.url))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let mut sse = client.request(request).await.unwrap().into_body();

    let body = json!({"events": [{"type": "OrderPlaced", "data": {"orderId": "7"}}]});
    let request = Request::post(format!("{}/v1/streams/order-7", server.url))
        .header("content-type", "application/json")
        .header("traceparent", format!("00-{TRACE}-{CLIENT_SPAN}-01"))
        .header("tracestate", "vendor=1")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    assert_eq!(
        client.request(request).await.unwrap().status(),
        StatusCode::CREATED
    );

    // The subscriber receives the event with the append's context in its metadata.
    let mut text = String::new();
    let delivered = tokio::time::timeout(Duration::from_secs(20), async {
        while !text.contains("OrderPlaced") {
            if let Some(Ok(frame)) = sse.frame().await
                && let Ok(data) = frame.into_data()
            {
                text.push_str(&String::from_utf8_lossy(&data));
            }
        }
        text.clone()
    })
    .await
    .expect("the subscriber gets the event");
    let record: Value = serde_json::from_str(
        delivered
            .lines()
            .find_map(|l| {
                l.strip_prefix("data: ")
                    .filter(|d| d.contains("OrderPlaced"))
            })
            .unwrap(),
    )
    .unwrap();
    let stored = record["metadata"]["traceparent"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        stored.starts_with(&format!("00-{TRACE}-")) && stored.ends_with("-01"),
        "{stored}"
    );
    assert_eq!(record["metadata"]["tracestate"], "vendor=1");
    let append_span = stored.split('-').nth(2).unwrap().to_owned();

    let (status, polled) = http
        .call(
            Method::GET,
            "/v1/groups/billing/messages?count=1&wait=10000",
            "application/json",
            String::new(),
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let polled: Value = serde_json::from_slice(&polled).unwrap();
    assert_eq!(
        polled["messages"][0]["event"]["metadata"]["traceparent"],
        stored.as_str()
    );

    // Wait for the spans: the request, the append, the delivery and the saga step.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (request_span, append, deliver, step) = loop {
        let all = spans(&received);
        let find = |name: &str| all.iter().find(|s| s["name"] == name).cloned();
        let group_delivery = all.iter().any(|s| {
            s["name"] == "deliver"
                && s["parentSpanId"] == append_span.as_str()
                && s["attributes"].as_array().unwrap().contains(
                    &json!({"key": "skald.transport", "value": {"stringValue": "group-http"}}),
                )
        });
        if let (true, Some(r), Some(a), Some(d), Some(s)) = (
            group_delivery,
            find("POST /v1/streams/{stream}"),
            find("store.append"),
            find("deliver"),
            find("saga notify tell action"),
        ) {
            break (r, a, d, s);
        }
        assert!(Instant::now() < deadline, "spans so far: {all:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for span in [&request_span, &append, &deliver, &step] {
        assert_eq!(span["traceId"], TRACE, "{span}");
    }
    assert_eq!(request_span["parentSpanId"], CLIENT_SPAN);
    assert_eq!(request_span["kind"], 2);
    assert_eq!(append["parentSpanId"], request_span["spanId"]);
    assert_eq!(append["spanId"], append_span.as_str());
    assert_eq!(deliver["parentSpanId"], append_span.as_str());
    assert_eq!(deliver["kind"], 5);
    assert_eq!(step["parentSpanId"], append_span.as_str());
    assert_eq!(step["kind"], 3);
    // The saga's HTTP call carried the step's span as its parent.
    let step_span = step["spanId"].as_str().unwrap();
    assert_eq!(
        *called.lock().unwrap(),
        [format!("00-{TRACE}-{step_span}-01")]
    );
    let service =
        received.lock().unwrap()[0]["resourceSpans"][0]["resource"]["attributes"][0].clone();
    assert_eq!(
        service,
        json!({"key": "service.name", "value": {"stringValue": "skald-test"}})
    );

    let (status, metrics) = http
        .call(Method::GET, "/metrics", "text/plain", String::new())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let metrics = String::from_utf8_lossy(&metrics).into_owned();
    let exported: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("skald_trace_spans_exported_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(exported >= 4.0, "{metrics}");
    let (status, stderr) = tokio::task::block_in_place(|| server.terminate());
    assert!(status.success(), "{stderr}");
}

#[test]
fn a_bad_otel_setting_stops_serve_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(support::SKALD)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL"), "{stderr}");
}
