//! The HTTP API of sagas: register and show definitions, list instances, show one instance's
//! history, retry a stuck one, cancel a running one. The engine is `skald_saga`; the format is
//! in `docs/sagas.md`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};
use skald_core::EventStore;
use skald_saga::{InstanceFilter, MAX_LISTED, SagaState};

use skald_security::Permission;

use crate::access::Caller;
use crate::groups::json_ok;
use crate::{App, Problem, body_bytes, parse_json, query_pairs};

/// `POST /v1/sagas`: a definition as YAML or JSON. 201 when registered, 200 when this exact
/// definition already was.
pub(crate) async fn register<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let body = body_bytes(body, app.config.max_body_bytes)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/yaml");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if !matches!(
        essence,
        "application/yaml" | "application/x-yaml" | "text/yaml" | "application/json" | "text/plain"
    ) {
        return Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
            format!(
                "a saga definition is sent as application/yaml or application/json, not \
                 {content_type:?}"
            ),
        ));
    }
    let text = std::str::from_utf8(&body)
        .map_err(|e| Problem::malformed(format!("the definition is not UTF-8 text: {e}")))?;
    let registration = register_text(&app, &caller, text).await?;
    let status = if registration.replayed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok(json_ok(status, &registration))
}

/// Registers a definition after checking `saga` on its name (HTTP and gRPC).
pub(crate) async fn register_text<S: EventStore>(
    app: &App<S>,
    caller: &Caller,
    text: &str,
) -> Result<skald_saga::Registration, Problem> {
    caller.require_held(Permission::Saga)?;
    // Parsed here only to check the name (the engine parses it again to register it).
    if !caller.is_unrestricted()
        && let Ok(definition) = skald_saga::parse(text)
    {
        caller.require(Permission::Saga, &definition.name)?;
    }
    Ok(app.sagas.register(text).await?)
}

/// `GET /v1/sagas`: every definition with its versions and instance counts.
pub(crate) async fn list<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
) -> Result<Response, Problem> {
    caller.require_held(Permission::Saga)?;
    let mut sagas = app.sagas.definitions();
    sagas.retain(|d| caller.require(Permission::Saga, &d.name).is_ok());
    Ok(json_ok(StatusCode::OK, &json!({ "sagas": sagas })))
}

/// `GET /v1/sagas/{name}?version=N`: one definition, the newest version by default.
pub(crate) async fn show<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Response, Problem> {
    caller.require(Permission::Saga, &name)?;
    let mut version = None;
    for (key, value) in query_pairs(query, &["version"])? {
        if key == "version" {
            version = Some(value.parse::<u32>().map_err(|_| {
                Problem::malformed(format!("version must be a whole number, got {value:?}"))
            })?);
        }
    }
    Ok(json_ok(
        StatusCode::OK,
        &app.sagas.definition(&name, version)?,
    ))
}

/// `GET /v1/saga-instances?state=&definition=&limit=`: instances, newest first.
pub(crate) async fn instances<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    RawQuery(query): RawQuery,
) -> Result<Response, Problem> {
    caller.require_held(Permission::Saga)?;
    let mut filter = InstanceFilter::default();
    for (key, value) in query_pairs(query, &["state", "definition", "limit"])? {
        match key.as_str() {
            "state" => {
                filter.state = Some(SagaState::parse(&value).ok_or_else(|| {
                    Problem::malformed(format!(
                        "state {value:?} is not one of {}",
                        SagaState::ALL.map(SagaState::as_str).join(", ")
                    ))
                })?);
            }
            "definition" => filter.definition = Some(value),
            _ => {
                let limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|l| (1..=MAX_LISTED).contains(l));
                filter.limit = Some(limit.ok_or_else(|| {
                    Problem::malformed(format!("limit must be 1 to {MAX_LISTED}, got {value:?}"))
                })?);
            }
        }
    }
    let mut instances = app.sagas.instances(&filter);
    instances.retain(|i| caller.require(Permission::Saga, &i.definition).is_ok());
    Ok(json_ok(StatusCode::OK, &json!({ "instances": instances })))
}

/// `GET /v1/saga-instances/{id}`: the instance and its whole history.
pub(crate) async fn history<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let history = app.sagas.history(&id).await?;
    caller.require(Permission::Saga, &history.summary.definition)?;
    Ok(json_ok(StatusCode::OK, &history))
}

/// Checks `saga` on the definition of instance `id`.
pub(crate) async fn allow_instance<S: EventStore>(
    app: &App<S>,
    caller: &Caller,
    id: &str,
) -> Result<(), Problem> {
    // The whole history is read only to learn the definition, so not with authentication off.
    if caller.is_unrestricted() {
        return Ok(());
    }
    caller.require_held(Permission::Saga)?;
    let history = app.sagas.history(id).await?;
    caller.require(Permission::Saga, &history.summary.definition)
}

/// `POST /v1/saga-instances/{id}/retry`: resume a stuck instance.
pub(crate) async fn retry<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    allow_instance(&app, &caller, &id).await?;
    Ok(json_ok(StatusCode::ACCEPTED, &app.sagas.retry(&id).await?))
}

/// `POST /v1/saga-instances/{id}/cancel` with an optional `{"reason": "..."}`.
pub(crate) async fn cancel<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    allow_instance(&app, &caller, &id).await?;
    let body = body_bytes(body, app.config.max_body_bytes)?;
    let reason = if body.iter().all(u8::is_ascii_whitespace) {
        "cancelled through the API".to_owned()
    } else {
        let fields: serde_json::Map<String, Value> = parse_json(&body, "request body")?;
        match fields.get("reason") {
            Some(Value::String(r)) => r.clone(),
            None => "cancelled through the API".to_owned(),
            Some(other) => {
                return Err(Problem::malformed(format!(
                    "reason must be a string, got {other}"
                )));
            }
        }
    };
    let summary = cancel_audited(&app, &caller, &id, &reason).await?;
    Ok(json_ok(StatusCode::ACCEPTED, &summary))
}

/// Cancels instance `id` (already checked) and records who asked in the audit trail.
pub(crate) async fn cancel_audited<S: EventStore>(
    app: &App<S>,
    caller: &Caller,
    id: &str,
    reason: &str,
) -> Result<skald_saga::InstanceSummary, Problem> {
    let summary = app.sagas.cancel(id, reason).await?;
    app.security
        .audit_now(
            "SagaCancelRequested",
            json!({"instance": id, "definition": summary.definition, "reason": reason, "by": caller.name()}),
        )
        .await?;
    Ok(summary)
}
