//! `GET /metrics` is valid Prometheus text whose counters move with activity; the health
//! endpoints say whether the store can take appends; every response carries a request id.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use skald_server::{HttpConfig, router};
use skald_storage::{Options, Store};
use tower::ServiceExt;

struct Api {
    router: axum::Router,
    store: Store,
    _dir: tempfile::TempDir,
}

impl Api {
    async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(Options {
            data_dir: dir.path().to_path_buf(),
            ..Options::default()
        })
        .unwrap();
        Self {
            router: router(Arc::new(store.clone()), HttpConfig::default())
                .await
                .unwrap(),
            store,
            _dir: dir,
        }
    }

    async fn call(
        &self,
        method: &str,
        uri: &str,
        id: Option<&str>,
        body: &str,
    ) -> (u16, String, String) {
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json");
        if let Some(id) = id {
            request = request.header("x-request-id", id);
        }
        let response = self
            .router
            .clone()
            .oneshot(request.body(Body::from(body.to_owned())).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        let request_id = response
            .headers()
            .get("x-request-id")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            request_id,
            String::from_utf8(bytes.to_vec()).unwrap(),
        )
    }
}

/// One sample: its name, its labels, its value.
type Sample = (String, BTreeMap<String, String>, f64);

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").expect("label key=\"value\"");
        assert!(valid_name(key), "label name {key:?}");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            let (i, c) = chars.next().expect("a closed label value");
            match c {
                '\\' => match chars.next().expect("an escape").1 {
                    'n' => value.push('\n'),
                    c @ ('\\' | '"') => value.push(c),
                    other => panic!("bad escape \\{other}"),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        assert!(
            labels.insert(key.to_owned(), value).is_none(),
            "label {key} twice"
        );
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    labels
}

/// Checks the text format (version 0.0.4) strictly enough to catch what Prometheus rejects,
/// and returns the samples.
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut family: Option<(String, String)> = None;
    let mut series = HashSet::new();
    let mut samples = Vec::new();
    assert!(text.ends_with('\n'), "the exposition ends with a newline");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, _) = rest.split_once(' ').expect("HELP name text");
            assert!(valid_name(name), "{line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(valid_name(name), "{line}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "TYPE twice: {line}"
            );
            family = Some((name.to_owned(), kind.to_owned()));
            continue;
        }
        assert!(
            !line.starts_with('#') && !line.is_empty(),
            "stray line {line:?}"
        );
        let (series_text, value) = line.rsplit_once(' ').expect("a sample has a value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("value {v:?} in {line}")),
        };
        let (name, labels) = match series_text.split_once('{') {
            Some((name, labels)) => (
                name,
                parse_labels(labels.strip_suffix('}').expect("labels close")),
            ),
            None => (series_text, BTreeMap::new()),
        };
        assert!(valid_name(name), "{line}");
        let (family_name, kind) = family.as_ref().expect("a TYPE before samples");
        let belongs = match kind.as_str() {
            "histogram" => [
                format!("{family_name}_bucket"),
                format!("{family_name}_sum"),
                format!("{family_name}_count"),
            ]
            .contains(&name.to_owned()),
            _ => name == family_name,
        };
        assert!(belongs, "{name} is not part of family {family_name}");
        if kind == "counter" {
            assert!(value >= 0.0, "negative counter: {line}");
        }
        assert!(
            series.insert(format!("{name}{labels:?}")),
            "series twice: {line}"
        );
        samples.push((name.to_owned(), labels, value));
    }
    // Histograms: cumulative buckets ending in +Inf, which equals the count.
    let mut buckets: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for (name, labels, value) in &samples {
        if let Some(base) = name.strip_suffix("_bucket") {
            let mut rest = labels.clone();
            let le = rest.remove("le").expect("a bucket has le");
            let le: f64 = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().unwrap()
            };
            buckets
                .entry(format!("{base}{rest:?}"))
                .or_default()
                .push((le, *value));
        }
    }
    for (key, list) in &buckets {
        assert!(
            list.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
            "{key}: {list:?}"
        );
        assert_eq!(
            list.last().unwrap().0,
            f64::INFINITY,
            "{key} has no +Inf bucket"
        );
    }
    for (name, labels, value) in &samples {
        if let Some(base) = name.strip_suffix("_count")
            && let Some(list) = buckets.get(&format!("{base}{labels:?}"))
        {
            assert_eq!(list.last().unwrap().1, *value, "{name}{labels:?}");
        }
    }
    samples
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| *v)
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"))
}

#[tokio::test]
async fn metrics_are_valid_prometheus_text_and_move_with_activity() {
    let api = Api::new().await;
    let (status, _, before) = api.call("GET", "/metrics", None, "").await;
    assert_eq!(status, 200);
    let before = parse_exposition(&before);
    assert_eq!(value(&before, "skald_events_stored", &[]), 0.0);
    assert_eq!(
        value(
            &before,
            "skald_build_info",
            &[("version", skald_server::VERSION)]
        ),
        1.0
    );
    assert!(value(&before, "process_resident_memory_bytes", &[]) > 0.0);
    assert!(value(&before, "process_open_fds", &[]) > 0.0);
    assert_eq!(value(&before, "skald_ready", &[]), 1.0);

    let events = json!({"events": [{"type": "A"}, {"type": "B"}]}).to_string();
    for _ in 0..3 {
        let (status, _, body) = api.call("POST", "/v1/streams/order-1", None, &events).await;
        assert_eq!(status, 201, "{body}");
    }
    let conflict = json!({"expectedRevision": "noStream", "events": [{"type": "A"}]}).to_string();
    assert_eq!(
        api.call("POST", "/v1/streams/order-1", None, &conflict)
            .await
            .0,
        409
    );
    let (_, _, _) = api.call("GET", "/v1/streams/order-1", None, "").await;
    let (_, _, middle) = api.call("GET", "/metrics", None, "").await;
    let middle = parse_exposition(&middle);
    // The stream read: one page of six events (starting up read the groups' definitions).
    let read = |samples: &[Sample], name| value(samples, name, &[]) - value(&before, name, &[]);
    assert_eq!(read(&middle, "skald_reads_total"), 1.0);
    assert_eq!(read(&middle, "skald_events_read_total"), 6.0);
    api.call(
        "POST",
        "/v1/groups",
        None,
        &json!({"name": "g", "source": {"all": {}}}).to_string(),
    )
    .await;

    let (_, _, after) = api.call("GET", "/metrics", None, "").await;
    let after = parse_exposition(&after);
    // Three appends of ours; creating the group wrote its definition and its first checkpoint.
    assert_eq!(
        value(&after, "skald_appends_total", &[("result", "written")]),
        5.0
    );
    assert_eq!(
        value(&after, "skald_appends_total", &[("result", "rejected")]),
        1.0
    );
    // Six events of order-1, and the group's definition and first checkpoint.
    assert_eq!(value(&after, "skald_events_written_total", &[]), 8.0);
    assert!(value(&after, "skald_bytes_written_total", &[]) > 0.0);
    // One at a time, so one group commit (and one fdatasync) each.
    assert_eq!(
        value(&after, "skald_fsync_duration_seconds_count", &[]),
        5.0
    );
    assert!(value(&after, "skald_append_batch_events_count", &[]) >= 3.0);
    assert!(value(&after, "skald_reads_total", &[]) >= 1.0);
    assert_eq!(
        value(
            &after,
            "skald_http_requests_total",
            &[
                ("route", "/v1/streams/{stream}"),
                ("method", "POST"),
                ("status", "201")
            ]
        ),
        3.0
    );
    assert_eq!(
        value(
            &after,
            "skald_http_request_duration_seconds_count",
            &[("route", "/v1/streams/{stream}"), ("method", "POST")]
        ),
        4.0
    );
    assert_eq!(
        value(&after, "skald_group_consumers", &[("group", "g")]),
        0.0
    );
    assert_eq!(
        value(&after, "skald_group_in_flight", &[("group", "g")]),
        0.0
    );
    assert!(
        value(&after, "skald_live_subscribers", &[]) >= 1.0,
        "the group reads live"
    );
}

#[tokio::test]
async fn health_says_live_and_ready_and_why_not() {
    let api = Api::new().await;
    let (status, _, body) = api.call("GET", "/health/live", None, "").await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"live"}"#));
    let (status, _, body) = api.call("GET", "/health/ready", None, "").await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ready"}"#));
    api.store.shutdown().await;
    let (status, _, body) = api.call("GET", "/health/ready", None, "").await;
    assert_eq!(status, 503);
    let problem: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(problem["type"], "urn:skald:problem:not-ready");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("shutting down"),
        "{problem}"
    );
    // Live is about the process, not the store.
    assert_eq!(api.call("GET", "/health/live", None, "").await.0, 200);
}

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let api = Api::new().await;
    let (_, id, _) = api
        .call("GET", "/v1/info", Some("client-chosen-7"), "")
        .await;
    assert_eq!(id, "client-chosen-7");
    let (_, first, _) = api.call("GET", "/v1/info", None, "").await;
    let (_, second, _) = api.call("GET", "/nowhere", None, "").await;
    assert!(!first.is_empty() && !second.is_empty());
    assert_ne!(first, second);
    // An id that could not be a header of ours is replaced, not echoed.
    let (_, replaced, _) = api
        .call("GET", "/v1/info", Some(&"x".repeat(300)), "")
        .await;
    assert!(replaced.len() < 100, "{replaced}");
}

#[test]
fn the_format_checker_rejects_what_prometheus_rejects() {
    let good = "# HELP a_total x\n# TYPE a_total counter\na_total{k=\"v\\\"\"} 1\n";
    assert_eq!(parse_exposition(good).len(), 1);
    for bad in [
        "a_total 1\n",                          // no TYPE
        "# TYPE a_total counter\na_total -1\n", // negative counter
        "# TYPE a gauge\na 1\na 2\n",           // series twice
        "# TYPE a gauge\nb 1\n",                // outside its family
        "# TYPE a gauge\na{k=\"v} 1\n",         // unclosed label
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\n",
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 3\n", // count differs
        "# TYPE 1a gauge\n1a 1\n",                                  // bad name
    ] {
        let result = std::panic::catch_unwind(|| parse_exposition(bad));
        assert!(result.is_err(), "accepted: {bad:?}");
    }
}

/// The metric names a text uses: `skald_*` and `process_*`, without histogram suffixes.
fn metric_names(text: &str) -> HashSet<String> {
    let mut names = HashSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        // Past the middle of a character (an ellipsis in the prose): not a name's start.
        if !text.is_char_boundary(i) {
            i += 1;
            continue;
        }
        let rest = &text[i..];
        let starts = rest.starts_with("skald_") || rest.starts_with("process_");
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts && boundary {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let name = &rest[..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            // Crate names appear in log targets and filters; they are not metrics.
            let crates = ["skald_server", "skald_hub", "skald_core", "skald_storage"];
            if !crates.contains(&base) {
                names.insert(base.to_owned());
            }
            i += end;
        } else {
            i += 1;
        }
    }
    names
}

#[tokio::test]
async fn the_dashboard_and_the_alerts_use_only_metrics_the_server_exposes() {
    let api = Api::new().await;
    let (_, _, text) = api.call("GET", "/metrics", None, "").await;
    let exposed: HashSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap().to_owned())
        .collect();
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    for file in [
        "deploy/grafana/skald.json",
        "deploy/prometheus/skald-alerts.yml",
        "docs/observability.md",
    ] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        let mut used = metric_names(&text);
        assert!(!used.is_empty(), "{file} names no metric");
        // A node on PostgreSQL writes these instead of the disk's; crates/postgres checks
        // them against its own exposition.
        used.retain(|name| !name.starts_with("skald_postgres_"));
        let unknown: Vec<_> = used.difference(&exposed).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics the server does not expose: {unknown:?}"
        );
    }
    // And the documentation lists every family the server exposes.
    let documented =
        metric_names(&std::fs::read_to_string(format!("{root}/docs/observability.md")).unwrap());
    let undocumented: Vec<_> = exposed.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "not in docs/observability.md: {undocumented:?}"
    );
}
