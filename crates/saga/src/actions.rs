//! Running one attempt of a step's action: an HTTP call, an append, or a wait for an event.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use skald_core::{
    AppendRequest, Error, EventData, EventId, EventStore, EventType, ExpectedRevision, Metadata,
    ProposedEvent, StreamName, Tag,
};
use skald_hub::{Delivery, Hub, Start};

use crate::breaker::Breakers;
use crate::definition::{
    AppendAction, AwaitAction, HttpAction, RetryOn, Selection, event_json, key_at,
};
use crate::egress::{Egress, EgressResolver, Refused};
use crate::template::{Template, render_value};

/// The most bytes of a response body a step takes as its output. It is stored in the step's
/// `StepSucceeded` event, so it stays well under the store's default event-size limit (1 MiB).
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024;

/// The deepest a step's output may nest: it is stored within the step's event and read back
/// with serde_json's limit of 128.
pub const MAX_OUTPUT_DEPTH: usize = 64;

/// How deep a JSON value nests (a scalar is 0), without recursion.
fn depth(value: &Value) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(value, 0usize)];
    while let Some((value, at)) = stack.pop() {
        deepest = deepest.max(at);
        match value {
            Value::Array(items) => stack.extend(items.iter().map(|v| (v, at + 1))),
            Value::Object(map) => stack.extend(map.values().map(|v| (v, at + 1))),
            _ => {}
        }
    }
    deepest
}

/// How much of an error answer's body is quoted in the step's error.
const QUOTED_BODY: usize = 300;

/// Why an attempt failed.
#[derive(Debug)]
pub enum Failure {
    /// The attempt ran out of time.
    Timeout(Duration),
    /// The target could not be reached: nothing was sent.
    Connection(String),
    /// The connection broke after the request may have been sent, before a whole answer came.
    Interrupted(String),
    /// The target answered with a status that is not success.
    Status(u16, String),
    /// The target's circuit breaker is open.
    BreakerOpen(String, Duration),
    /// A template named something that is not there, or rendered into something invalid.
    Render(String),
    /// The target answered with something a step cannot keep (too large).
    Unusable(String),
    /// The store refused or failed an append.
    Store(Error),
    /// An await ran past its deadline.
    AwaitTimedOut,
    /// The registrant may no longer do this, or the egress policy refuses the target: never
    /// retried.
    Forbidden(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Timeout(d) => write!(f, "timed out after {}", humantime::format_duration(*d)),
            Self::Connection(e) => write!(f, "connection failed: {e}"),
            Self::Interrupted(e) => write!(
                f,
                "connection broke after the request was sent (the target may have acted): {e}"
            ),
            Self::Status(code, body) if body.is_empty() => write!(f, "answered {code}"),
            Self::Status(code, body) => write!(f, "answered {code}: {body}"),
            Self::BreakerOpen(host, wait) => write!(
                f,
                "circuit breaker for {host} is open (next trial in {} ms)",
                wait.as_millis()
            ),
            Self::Render(e) | Self::Unusable(e) => f.write_str(e),
            Self::Store(e) => write!(f, "append failed: {e}"),
            Self::AwaitTimedOut => f.write_str("no matching event arrived before the deadline"),
            Self::Forbidden(why) => write!(f, "forbidden: {why}"),
        }
    }
}

impl Failure {
    /// Whether the attempt may have acted although it failed: the request may have reached the
    /// target (a timeout, a connection broken after sending), the target answered success with
    /// something a step cannot keep, or an append's outcome is not known.
    pub fn may_have_acted(&self) -> bool {
        match self {
            Self::Timeout(_) | Self::Interrupted(_) | Self::Unusable(_) => true,
            // The store failed during the write: the event may be there.
            Self::Store(e) => matches!(
                e,
                Error::Unavailable(_) | Error::Io(_) | Error::Corruption { .. }
            ),
            Self::Connection(_)
            | Self::Status(..)
            | Self::BreakerOpen(..)
            | Self::Render(_)
            | Self::AwaitTimedOut
            | Self::Forbidden(_) => false,
        }
    }

    /// Whether a later attempt may succeed, under the step's `retryOn` list.
    pub fn is_retryable(&self, retry_on: &[RetryOn]) -> bool {
        match self {
            Self::BreakerOpen(..) => true,
            Self::Timeout(_) => retry_on.contains(&RetryOn::Timeout),
            Self::Connection(_) | Self::Interrupted(_) => retry_on.contains(&RetryOn::Connection),
            Self::Status(code, _) => {
                retry_on.contains(&RetryOn::Status(*code))
                    || (*code >= 500 && retry_on.contains(&RetryOn::ServerErrors))
                    || ((400..500).contains(code) && retry_on.contains(&RetryOn::ClientErrors))
            }
            Self::Store(Error::Unavailable(_) | Error::StorageFull(_) | Error::Io(_)) => true,
            Self::Render(_)
            | Self::Unusable(_)
            | Self::Store(_)
            | Self::AwaitTimedOut
            | Self::Forbidden(_) => false,
        }
    }
}

/// The HTTP client steps call targets with: `http://` and `https://`, keep-alive connections,
/// pooled per host, every resolved address checked against the egress policy.
pub struct HttpClient {
    client: Client<HttpsConnector<HttpConnector<EgressResolver>>, Full<Bytes>>,
    egress: Arc<Egress>,
}

/// A client for saga steps. `https://` targets are trusted by the PEM roots of `ca_file`, or
/// by the system's; the error says what is wrong with `ca_file`.
pub fn http_client(egress: Arc<Egress>, ca_file: Option<&Path>) -> Result<HttpClient, String> {
    let tls = skald_security::tls::client_config(ca_file, None)?;
    let mut connector = HttpConnector::new_with_resolver(EgressResolver::new(Arc::clone(&egress)));
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    connector.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector);
    let client = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector);
    Ok(HttpClient { client, egress })
}

fn render_text(text: &str, context: &Value) -> Result<String, Failure> {
    Template::parse(text)
        .and_then(|t| t.render_text(context))
        .map_err(Failure::Render)
}

/// Calls an HTTP target once. The answer's body is the output: JSON when it parses, else text.
pub async fn call_http(
    client: &HttpClient,
    breakers: &Breakers,
    action: &HttpAction,
    context: &Value,
    idempotency_key: &str,
    traceparent: Option<&str>,
    timeout: Duration,
) -> Result<Value, Failure> {
    let url = render_text(&action.url, context)?;
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| Failure::Render(format!("url {url:?} is not a valid URL: {e}")))?;
    let host = uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .ok_or_else(|| Failure::Render(format!("url {url:?} has no host")))?;
    // A literal address is never resolved, so the resolver's check does not see it.
    let literal = uri
        .host()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']'));
    if let Some(address) = literal.and_then(|h| h.parse::<std::net::IpAddr>().ok())
        && !client.egress.allows(literal.unwrap_or_default(), address)
    {
        let refused = Refused(format!(
            "the egress policy refuses {address}: private, loopback and link-local addresses \
             need an entry in [sagas.egress] allow, and metadata addresses are never reached"
        ));
        return Err(Failure::Forbidden(refused.0));
    }
    let mut request = hyper::Request::builder()
        .method(action.method.as_str())
        .uri(uri)
        .header("idempotency-key", idempotency_key)
        .header("user-agent", concat!("skald/", env!("CARGO_PKG_VERSION")));
    if let Some(traceparent) = traceparent {
        request = request.header("traceparent", traceparent);
    }
    for (name, value) in &action.headers {
        request = request.header(name.as_str(), render_text(value, context)?);
    }
    let body = match &action.body {
        Some(body) => {
            request = request.header("content-type", "application/json");
            let rendered = render_value(body, context).map_err(Failure::Render)?;
            Bytes::from(rendered.to_string())
        }
        None => Bytes::new(),
    };
    let request = request
        .body(Full::new(body))
        .map_err(|e| Failure::Render(format!("the request cannot be built: {e}")))?;
    breakers
        .admit(&host)
        .map_err(|r| Failure::BreakerOpen(host.clone(), r.retry_in))?;
    let outcome = tokio::time::timeout(timeout, async {
        let response = client
            .client
            .request(request)
            .await
            .map_err(|e| match refusal(&e) {
                Some(refused) => Failure::Forbidden(refused.0.clone()),
                None if e.is_connect() => Failure::Connection(error_chain(&e)),
                None => Failure::Interrupted(error_chain(&e)),
            })?;
        let status = response.status().as_u16();
        let success = match &action.success_status {
            Some(codes) => codes.contains(&status),
            None => (200..300).contains(&status),
        };
        let bytes = match Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
        {
            Ok(body) => body.to_bytes(),
            // A failure answer is a failure whatever its size: only its start is quoted.
            Err(e)
                if !success
                    && e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some() =>
            {
                Bytes::from(format!(
                    "(an answer over {} KiB)",
                    MAX_RESPONSE_BYTES / 1024
                ))
            }
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                return Err(Failure::Unusable(format!(
                    "the answer is over the {} KiB a step's output may hold",
                    MAX_RESPONSE_BYTES / 1024
                )));
            }
            Err(e) => {
                return Err(Failure::Interrupted(format!(
                    "reading the answer failed: {e}"
                )));
            }
        };
        Ok::<_, Failure>((status, bytes))
    })
    .await
    .unwrap_or(Err(Failure::Timeout(timeout)));
    let (status, bytes) = match outcome {
        Err(Failure::Forbidden(why)) => return Err(Failure::Forbidden(why)),
        Ok(answer) => {
            breakers.record(&host, answer.0 < 500);
            answer
        }
        Err(failure) => {
            breakers.record(&host, false);
            return Err(failure);
        }
    };
    let success = match &action.success_status {
        Some(codes) => codes.contains(&status),
        None => (200..300).contains(&status),
    };
    if !success {
        let text = String::from_utf8_lossy(&bytes);
        let quoted: String = text.chars().take(QUOTED_BODY).collect();
        return Err(Failure::Status(status, quoted));
    }
    let output = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    // What is stored is the output as JSON, escapes included (a control byte takes six):
    // the cap holds for that, not for the bytes received.
    if depth(&output) > MAX_OUTPUT_DEPTH {
        return Err(Failure::Unusable(format!(
            "the answer nests deeper than {MAX_OUTPUT_DEPTH} levels, more than a step's output \
             may (it is stored inside the step's event, whose JSON may nest 128 deep)"
        )));
    }
    let stored = serde_json::to_string(&output).map_or(usize::MAX, |text| text.len());
    if stored > MAX_RESPONSE_BYTES {
        return Err(Failure::Unusable(format!(
            "the answer takes {stored} bytes once stored as JSON, over the {} KiB a step's \
             output may hold",
            MAX_RESPONSE_BYTES / 1024
        )));
    }
    Ok(output)
}

/// The egress policy's refusal, if that is why the connection failed.
fn refusal<'e>(e: &'e (dyn std::error::Error + 'static)) -> Option<&'e Refused> {
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(refused) = s.downcast_ref::<Refused>() {
            return Some(refused);
        }
        source = s.source();
    }
    None
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Appends one event. Its id is fixed by `event_id`, so a repeated attempt is an idempotent
/// replay. Output: where it landed.
pub async fn append<S: EventStore>(
    store: &S,
    action: &AppendAction,
    context: &Value,
    event_id: uuid::Uuid,
    metadata: &Value,
    may_append: impl Fn(&str) -> Result<(), String>,
) -> Result<Value, Failure> {
    let stream = render_text(&action.stream, context)?;
    let stream = StreamName::new(stream).map_err(|e| Failure::Render(e.to_string()))?;
    may_append(stream.as_str()).map_err(Failure::Forbidden)?;
    let data = render_value(&action.data, context).map_err(Failure::Render)?;
    let data = if data.is_null() { json!({}) } else { data };
    let mut tags = Vec::with_capacity(action.tags.len());
    for tag in &action.tags {
        tags.push(
            Tag::new(render_text(tag, context)?).map_err(|e| Failure::Render(e.to_string()))?,
        );
    }
    let event = ProposedEvent {
        id: EventId(event_id),
        event_type: EventType::new(action.event_type.as_str())
            .map_err(|e| Failure::Render(e.to_string()))?,
        data: EventData::json(data.to_string()).map_err(|e| Failure::Render(e.to_string()))?,
        metadata: Metadata::new(metadata.to_string())
            .map_err(|e| Failure::Render(e.to_string()))?,
        tags,
        source: None,
    };
    let result = store
        .append(AppendRequest {
            stream: stream.clone(),
            expected: ExpectedRevision::Any,
            condition: None,
            events: vec![event],
        })
        .await
        .map_err(Failure::Store)?;
    Ok(json!({
        "stream": stream.as_str(),
        "position": result.first_position.0,
        "revision": result.first_revision.0,
    }))
}

/// Waits for the first event after `after` that `selection` matches, that `may_read` admits,
/// and whose value at `pointer` is `key`, until `deadline`. Output: the event.
pub async fn await_event<S: EventStore>(
    hub: &Hub<S>,
    action: &AwaitAction,
    pointer: &str,
    key: &str,
    after: u64,
    deadline: tokio::time::Instant,
    may_read: impl Fn(&str) -> bool,
) -> Result<Value, Failure> {
    let selection = Selection::new(
        action.category.as_deref(),
        &action.types,
        action.query.as_deref(),
    );
    let mut subscription = hub
        .subscribe(selection.read_source(), Start::Position(after + 1))
        .await
        .map_err(Failure::Store)?;
    let wait = async {
        loop {
            match subscription.next().await.map_err(Failure::Store)? {
                Delivery::Events(events) => {
                    for event in events {
                        if !selection.matches(&event) || !may_read(event.stream.as_str()) {
                            continue;
                        }
                        let json = event_json(&event);
                        if key_at(&json, pointer).as_deref() == Some(key) {
                            return Ok(json);
                        }
                    }
                }
                Delivery::CaughtUp { .. } => {}
            }
        }
    };
    tokio::time::timeout_at(deadline, wait)
        .await
        .unwrap_or(Err(Failure::AwaitTimedOut))
}
