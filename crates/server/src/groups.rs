//! The HTTP API of persistent subscriptions: create, update, list, inspect and delete groups,
//! long-poll a batch, acknowledge. The protocol is in `docs/persistent-subscriptions.md`; the
//! logic is in `skald_hub::groups`.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use skald_core::{Error, EventStore};
use skald_hub::SourceSpec;
use skald_hub::groups::{GroupMessage, GroupSettings, NackAction, NewGroup, SettingsUpdate};

use skald_security::Permission;

use crate::access::{Caller, Recheck, Scope};
use crate::cloudevents::write_record;
use crate::start::start_from_json;
use crate::{App, Problem, body_bytes, json_response, parse_json, query_pairs};

/// Most messages one long-poll returns.
pub(crate) const MAX_POLL: usize = 1000;
const DEFAULT_POLL: usize = 10;
const DEFAULT_POLL_WAIT: Duration = Duration::from_secs(10);

/// Input errors of the group API are the client's: 400, worded by the hub.
pub(crate) fn group_problem(e: Error) -> Problem {
    match e {
        Error::InvalidEvent { reason } => Problem::malformed(reason),
        other => Problem::from(other),
    }
}

/// A group hands over every event of its source in order, so using it needs `subscribe` and
/// `read` on every stream the source can hold.
pub(crate) fn allow_group(caller: &Caller, source: &SourceSpec) -> Result<(), Problem> {
    caller.require_all(Permission::Subscribe, Scope::from(source))?;
    caller.require_all(Permission::Read, Scope::from(source))
}

/// Checks the caller against the source of the existing group `name`.
pub(crate) async fn allow_existing<S: EventStore>(
    app: &App<S>,
    caller: &Caller,
    name: &str,
) -> Result<(), Problem> {
    // The group's source is looked up only to check it: polls and acks with authentication
    // off skip the round trip to the group.
    if caller.is_unrestricted() {
        return Ok(());
    }
    let info = app.groups()?.info(name).await.map_err(group_problem)?;
    allow_group(caller, &info.definition.source)
}

/// Checks the caller against the source of the existing group `name`, for a consumer that
/// stays: the check it repeats as it runs.
pub(crate) async fn allow_consumer<S: EventStore>(
    app: &App<S>,
    caller: &Caller,
    name: &str,
) -> Result<Recheck<S>, Problem> {
    if caller.is_unrestricted() {
        return Ok(Recheck::new(
            std::sync::Arc::clone(&app.security),
            caller.clone(),
            Box::new(|_| Ok(())),
        ));
    }
    let info = app.groups()?.info(name).await.map_err(group_problem)?;
    allow_group(caller, &info.definition.source)?;
    Ok(recheck_group(app, caller, info.definition.source))
}

/// A JSON answer with `status`.
pub(crate) fn json_ok(status: StatusCode, value: &impl serde::Serialize) -> Response {
    (
        status,
        json_response(serde_json::to_vec(value).expect("serializable")),
    )
        .into_response()
}

/// `POST /v1/groups`: the body is `name`, `source`, optional `from`, and any settings.
pub(crate) async fn create<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let body = body_bytes(body, app.config.max_body_bytes)?;
    let mut fields: Map<String, Value> = parse_json(&body, "request body")?;
    let name = match fields.remove("name") {
        Some(Value::String(name)) => name,
        Some(other) => {
            return Err(Problem::malformed(format!(
                "name must be a string, got {other}"
            )));
        }
        None => return Err(Problem::malformed("name is required: the group's name")),
    };
    let source: SourceSpec = match fields.remove("source") {
        Some(source) => parse_json(source.to_string().as_bytes(), "source")?,
        None => {
            return Err(Problem::malformed(
                "source is required: {\"all\": {}}, {\"stream\": \"s\"}, {\"category\": \"c\"} \
                 or {\"query\": {\"items\": [..]}}",
            ));
        }
    };
    allow_group(&caller, &source)?;
    let start = start_from_json(
        fields.remove("from"),
        matches!(source, SourceSpec::Stream(_)),
    )?;
    let settings: GroupSettings =
        parse_json(Value::Object(fields).to_string().as_bytes(), "settings")?;
    let info = app
        .groups()?
        .create(NewGroup {
            name,
            source,
            start,
            settings,
        })
        .await
        .map_err(group_problem)?;
    Ok(json_ok(StatusCode::CREATED, &info))
}

pub(crate) async fn list<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
) -> Result<Response, Problem> {
    caller.require_held(Permission::Subscribe)?;
    let mut groups = app.groups()?.list().await.map_err(group_problem)?;
    groups.retain(|g| allow_group(&caller, &g.definition.source).is_ok());
    Ok(json_ok(StatusCode::OK, &json!({ "groups": groups })))
}

pub(crate) async fn info<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, Problem> {
    allow_existing(&app, &caller, &name).await?;
    let info = app.groups()?.info(&name).await.map_err(group_problem)?;
    Ok(json_ok(StatusCode::OK, &info))
}

pub(crate) async fn update<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    allow_existing(&app, &caller, &name).await?;
    let body = body_bytes(body, app.config.max_body_bytes)?;
    let fields: Map<String, Value> = parse_json(&body, "request body")?;
    for fixed in ["name", "source", "from"] {
        if fields.contains_key(fixed) {
            return Err(Problem::malformed(format!(
                "{fixed} is fixed when a group is created; delete the group and create it \
                 again to change it"
            )));
        }
    }
    let update: SettingsUpdate = parse_json(&body, "request body")?;
    let info = app
        .groups()?
        .update(&name, &update)
        .await
        .map_err(group_problem)?;
    Ok(json_ok(StatusCode::OK, &info))
}

pub(crate) async fn delete<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, Problem> {
    allow_existing(&app, &caller, &name).await?;
    app.groups()?.delete(&name).await.map_err(group_problem)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(crate) async fn replay_parked<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, Problem> {
    allow_existing(&app, &caller, &name).await?;
    let replaying = app
        .groups()?
        .replay_parked(&name)
        .await
        .map_err(group_problem)?;
    Ok(json_ok(
        StatusCode::ACCEPTED,
        &json!({ "replaying": replaying }),
    ))
}

/// `GET /v1/groups/{name}/messages?count=N&wait=MS&consumer=NAME`.
pub(crate) async fn poll<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, Problem> {
    allow_existing(&app, &caller, &name).await?;
    let mut count = DEFAULT_POLL;
    let mut wait = DEFAULT_POLL_WAIT;
    let mut consumer = "http".to_owned();
    for (key, value) in query_pairs(raw, &["count", "wait", "consumer"])? {
        let number = |max: u64| {
            value
                .parse::<u64>()
                .ok()
                .filter(|n| (1..=max).contains(n) || (key == "wait" && *n == 0))
                .ok_or_else(|| {
                    Problem::malformed(format!(
                        "query parameter {key} must be a whole number up to {max}, got {value:?}"
                    ))
                })
        };
        match key.as_str() {
            "count" => count = number(MAX_POLL as u64)? as usize,
            "wait" => {
                wait = Duration::from_millis(number(crate::MAX_POLL_WAIT.as_millis() as u64)?)
            }
            "consumer" => {
                if value.is_empty() || value.len() > 128 {
                    return Err(Problem::malformed(
                        "query parameter consumer must be 1 to 128 bytes long",
                    ));
                }
                consumer = value;
            }
            _ => unreachable!("checked against the allowed list"),
        }
    }
    let messages = app
        .groups()?
        .poll(&name, &consumer, count, wait)
        .await
        .map_err(group_problem)?;
    let _delivering =
        crate::observe::deliver_spans("group-http", messages.iter().map(|m| &m.event));
    let mut out = Vec::with_capacity(messages.len() * 600 + 16);
    out.extend_from_slice(b"{\"messages\":");
    write_messages(&mut out, &messages);
    out.push(b'}');
    Ok(json_response(out).into_response())
}

/// `[{"ackId": .., "deliveries": .., "event": CloudEvent}, ...]`.
pub(crate) fn write_messages(out: &mut Vec<u8>, messages: &[GroupMessage]) {
    out.push(b'[');
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(
            format!(
                "{{\"ackId\":{},\"deliveries\":{},\"event\":",
                Value::String(m.ack_id.clone()),
                m.deliveries
            )
            .as_bytes(),
        );
        write_record(out, &m.event);
        out.push(b'}');
    }
    out.push(b']');
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckBody {
    ids: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NackBody {
    ids: Vec<String>,
    action: NackAction,
    #[serde(default)]
    reason: String,
}

pub(crate) async fn ack<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    allow_existing(&app, &caller, &name).await?;
    let body = body_bytes(body, app.config.max_body_bytes)?;
    let b: AckBody = parse_json(&body, "request body")?;
    let outcome = app
        .groups()?
        .ack(&name, b.ids)
        .await
        .map_err(group_problem)?;
    Ok(json_ok(StatusCode::OK, &outcome))
}

pub(crate) async fn nack<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    allow_existing(&app, &caller, &name).await?;
    let body = body_bytes(body, app.config.max_body_bytes)?;
    let b: NackBody = parse_json(&body, "request body")?;
    let outcome = app
        .groups()?
        .nack(&name, b.ids, b.action, b.reason)
        .await
        .map_err(group_problem)?;
    Ok(json_ok(StatusCode::OK, &outcome))
}

/// The check a consumer of a group reading `source` repeats as it runs.
pub(crate) fn recheck_group<S: EventStore>(
    app: &App<S>,
    caller: &Caller,
    source: SourceSpec,
) -> Recheck<S> {
    Recheck::new(
        std::sync::Arc::clone(&app.security),
        caller.clone(),
        Box::new(move |caller| allow_group(caller, &source)),
    )
}
