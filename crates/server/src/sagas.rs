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
use skald_saga::definition::Reach;
use skald_saga::{
    Authority, InstanceFilter, InstanceHistory, InstanceSummary, MAX_LISTED, Need, SagaDefinition,
    SagaState,
};

use skald_security::{Permission, Principal, Security};

use crate::access::{Caller, Scope};
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

/// Registers a definition for the caller after checking that it holds every right the
/// definition will use (HTTP and gRPC; `docs/security.md`, "Sagas run with their registrant's
/// rights").
pub(crate) async fn register_text<S: EventStore>(
    app: &App<S>,
    caller: &Caller,
    text: &str,
) -> Result<skald_saga::Registration, Problem> {
    caller.require_held(Permission::Saga)?;
    let definition = skald_saga::parse(text)
        .map_err(|e| Problem::from(skald_core::Error::InvalidSaga(e.to_string())))?;
    require_rights(caller, &definition)?;
    Ok(app
        .sagas()?
        .register_as(definition, caller.registrant())
        .await?)
}

/// `saga` on the name; `read` and `subscribe` on everything its trigger and awaits can match;
/// `append` on every stream its append templates can produce.
fn require_rights(caller: &Caller, definition: &SagaDefinition) -> Result<(), Problem> {
    caller.require(Permission::Saga, &definition.name)?;
    for (_where, reach) in definition.reads() {
        let scope = match reach {
            Reach::Category(c) => Scope::Category(c),
            Reach::Anything => Scope::AllUser,
        };
        for permission in [Permission::Read, Permission::Subscribe] {
            caller.require_all(permission, scope)?;
        }
    }
    for (what, stream) in definition.appended_streams() {
        let template = skald_saga::template::Template::parse(stream)
            .map_err(|e| Problem::malformed(format!("{what}: {e}")))?;
        caller.require_template(Permission::Append, stream, &template.pieces(), &what)?;
    }
    Ok(())
}

/// Who may see a saga's data: the trigger's data, step outputs and errors are shown only to
/// callers who may read the trigger's stream.
pub(crate) fn may_see_data(caller: &Caller, summary: &InstanceSummary) -> bool {
    caller
        .require(Permission::Read, &summary.trigger_stream)
        .is_ok()
}

/// What a caller who may not read the trigger's stream sees instead of data.
const HIDDEN: &str = "hidden: you may not read the trigger's stream";

/// Removes what the caller may not see from a summary: the last error, and the correlation key
/// (a value of the trigger's data).
pub(crate) fn redact_summary(caller: &Caller, summary: &mut InstanceSummary) {
    if may_see_data(caller, summary) {
        return;
    }
    if summary.last_error.is_some() {
        summary.last_error = Some(HIDDEN.to_owned());
    }
    summary.correlation_key = HIDDEN.to_owned();
}

/// Removes what the caller may not see from a history: the trigger's data (its id, stream, type
/// and position stay), step outputs, errors and reasons.
pub(crate) fn redact_history(caller: &Caller, history: &mut InstanceHistory) {
    if may_see_data(caller, &history.summary) {
        // An await's output is another stream's event: shown only to its readers.
        for entry in &mut history.history {
            let stream = entry.data["output"]["stream"].as_str().map(str::to_owned);
            if entry.event_type == "StepSucceeded"
                && let Some(stream) = stream
                && caller.require(Permission::Read, &stream).is_err()
            {
                entry.data["output"] = json!(HIDDEN);
            }
        }
        return;
    }
    redact_summary(caller, &mut history.summary);
    for entry in &mut history.history {
        let data = &mut entry.data;
        match entry.event_type.as_str() {
            "SagaStarted" => {
                let t = &data["trigger"];
                data["trigger"] = json!({
                    "id": t["id"], "stream": t["stream"], "type": t["type"], "position": t["position"],
                });
                data["correlationKey"] = json!(HIDDEN);
            }
            "StepSucceeded" => data["output"] = json!(HIDDEN),
            "StepFailed" | "SagaStuck" => data["error"] = json!(HIDDEN),
            "SagaCompensating" => data["reason"] = json!(HIDDEN),
            _ => {}
        }
    }
}

/// `GET /v1/sagas`: every definition with its versions and instance counts.
pub(crate) async fn list<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
) -> Result<Response, Problem> {
    caller.require_held(Permission::Saga)?;
    let mut sagas = app.sagas()?.definitions();
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
        &app.sagas()?.definition(&name, version)?,
    ))
}

/// What can be done to a definition besides registering it.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Change {
    Disable,
    Enable,
    Delete,
}

impl Change {
    fn audited_as(self) -> &'static str {
        match self {
            Change::Disable => "SagaDisabled",
            Change::Enable => "SagaEnabled",
            Change::Delete => "SagaDeleted",
        }
    }
}

/// Disables, enables or deletes definition `name` for the caller (`saga` on the name) and
/// records who did it in the audit trail. `Ok(false)` when it was so already (nothing written).
pub(crate) async fn change_audited<S: EventStore>(
    app: &App<S>,
    caller: &Caller,
    name: &str,
    change: Change,
) -> Result<bool, Problem> {
    caller.require(Permission::Saga, name)?;
    let by = caller.registrant();
    let changed = match change {
        Change::Disable => app.sagas()?.disable(name, by).await?,
        Change::Enable => app.sagas()?.enable(name, by).await?,
        Change::Delete => app.sagas()?.delete(name, by).await?,
    };
    if changed {
        app.security
            .audit_now(
                change.audited_as(),
                json!({"definition": name, "by": caller.name()}),
            )
            .await?;
    }
    Ok(changed)
}

/// `POST /v1/sagas/{name}/disable`: its triggers start no more instances.
pub(crate) async fn disable<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, Problem> {
    let changed = change_audited(&app, &caller, &name, Change::Disable).await?;
    Ok(json_ok(
        StatusCode::OK,
        &json!({"name": name, "enabled": false, "changed": changed}),
    ))
}

/// `POST /v1/sagas/{name}/enable`: its triggers start instances again, from now on.
pub(crate) async fn enable<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, Problem> {
    let changed = change_audited(&app, &caller, &name, Change::Enable).await?;
    Ok(json_ok(
        StatusCode::OK,
        &json!({"name": name, "enabled": true, "changed": changed}),
    ))
}

/// `DELETE /v1/sagas/{name}`: refused (409) while an instance of it is unfinished.
pub(crate) async fn delete<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, Problem> {
    let changed = change_audited(&app, &caller, &name, Change::Delete).await?;
    Ok(json_ok(
        StatusCode::OK,
        &json!({"name": name, "deleted": true, "changed": changed}),
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
    let mut instances = app.sagas()?.instances(&filter);
    instances.retain(|i| caller.require(Permission::Saga, &i.definition).is_ok());
    for summary in &mut instances {
        redact_summary(&caller, summary);
    }
    Ok(json_ok(StatusCode::OK, &json!({ "instances": instances })))
}

/// `GET /v1/saga-instances/{id}`: the instance and its whole history.
pub(crate) async fn history<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    allow_instance(&app, &caller, &id).await?;
    let mut history = app.sagas()?.history(&id).await?;
    redact_history(&caller, &mut history);
    Ok(json_ok(StatusCode::OK, &history))
}

/// Checks `saga` on the definition of instance `id`. An instance of a definition the caller
/// may not steer is answered as one that does not exist (404), naming nothing.
pub(crate) async fn allow_instance<S: EventStore>(
    app: &App<S>,
    caller: &Caller,
    id: &str,
) -> Result<(), Problem> {
    if caller.is_unrestricted() {
        return Ok(());
    }
    caller.require_held(Permission::Saga)?;
    let summary = app.sagas()?.summary(id).await?;
    if caller
        .require(Permission::Saga, &summary.definition)
        .is_err()
    {
        return Err(skald_saga::Sagas::<S>::not_found(id).into());
    }
    Ok(())
}

/// `POST /v1/saga-instances/{id}/retry`: resume a stuck instance.
pub(crate) async fn retry<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    allow_instance(&app, &caller, &id).await?;
    Ok(json_ok(
        StatusCode::ACCEPTED,
        &app.sagas()?.retry(&id).await?,
    ))
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
    let summary = app.sagas()?.cancel(id, reason).await?;
    app.security
        .audit_now(
            "SagaCancelRequested",
            json!({"instance": id, "definition": summary.definition, "reason": reason, "by": caller.name()}),
        )
        .await?;
    Ok(summary)
}

/// What a saga's registrant may still do, from the keys and rules in force (the engine asks at
/// each trigger and step).
pub struct SagaAuthority<S> {
    security: std::sync::Arc<Security<S>>,
}

impl<S> SagaAuthority<S> {
    pub fn new(security: std::sync::Arc<Security<S>>) -> Self {
        Self { security }
    }
}

impl<S: EventStore> Authority for SagaAuthority<S> {
    fn check(&self, registrant: Option<&Value>, need: Need<'_>) -> Result<(), String> {
        if !self.security.enabled() {
            return Ok(());
        }
        let Some(registrant) = registrant else {
            return Err(
                "the definition was registered before registrants were recorded; \
                 register it again so that it runs with its registrant's rights"
                    .to_owned(),
            );
        };
        let principal: Principal = serde_json::from_value(registrant.clone())
            .map_err(|e| format!("the recorded registrant cannot be read: {e}"))?;
        let (permission, name) = match need {
            Need::Read(stream) => (Permission::Read, stream),
            Need::Append(stream) => (Permission::Append, stream),
        };
        self.security.recorded_may(&principal, permission, name)
    }
}
