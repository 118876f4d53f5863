//! The admin API: API keys and access rules. Every endpoint needs the `admin` permission.

use std::collections::BTreeSet;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;
use skald_core::{EventStore, ExpectedRevision};
use skald_security::{AdminError, Permission, Rule, Rules};

use crate::access::Caller;
use crate::groups::json_ok;
use crate::{App, Problem, body_bytes, parse_json};

fn admin_problem(e: AdminError) -> Problem {
    match e {
        AdminError::Invalid(detail) => Problem::malformed(detail),
        AdminError::NotFound(detail) => Problem::key_not_found(detail),
        AdminError::Store(e) => Problem::from(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NewKeyBody {
    name: String,
    #[serde(default)]
    roles: BTreeSet<String>,
    /// Unix seconds.
    expires_at: Option<i64>,
    /// Or a duration from now, such as `90d` or `12h`.
    expires_in: Option<String>,
}

/// `POST /v1/admin/keys`: 201 with the key, shown this once.
pub(crate) async fn create_key<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    caller.require_held(Permission::Admin)?;
    let body = body_bytes(body, app.config.max_body_bytes)?;
    let b: NewKeyBody = parse_json(&body, "request body")?;
    let expires_at = match (b.expires_at, b.expires_in) {
        (Some(_), Some(_)) => {
            return Err(Problem::malformed("give expiresAt or expiresIn, not both"));
        }
        (Some(at), None) => Some(at),
        (None, Some(text)) => {
            let d = humantime::parse_duration(&text).map_err(|e| {
                Problem::malformed(format!(
                    "expiresIn {text:?} is not a duration such as 90d or 12h: {e}"
                ))
            })?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |n| n.as_secs());
            Some(now.saturating_add(d.as_secs()).min(i64::MAX as u64) as i64)
        }
        (None, None) => None,
    };
    let created = app
        .security
        .create_key(caller.name(), &b.name, b.roles, expires_at)
        .await
        .map_err(admin_problem)?;
    Ok(json_ok(StatusCode::CREATED, &created))
}

/// `GET /v1/admin/keys`: every key, without secrets.
pub(crate) async fn list_keys<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
) -> Result<Response, Problem> {
    caller.require_held(Permission::Admin)?;
    Ok(json_ok(
        StatusCode::OK,
        &json!({ "keys": app.security.list_keys() }),
    ))
}

/// `DELETE /v1/admin/keys/{id}`: revokes at once; again is a no-op.
pub(crate) async fn revoke_key<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    caller.require_held(Permission::Admin)?;
    let info = app
        .security
        .revoke_key(caller.name(), &id)
        .await
        .map_err(admin_problem)?;
    Ok(json_ok(StatusCode::OK, &info))
}

/// `GET /v1/admin/rules`: the rules in force and their revision.
pub(crate) async fn rules<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
) -> Result<Response, Problem> {
    caller.require_held(Permission::Admin)?;
    let (revision, rules) = app.security.rules_with_revision();
    Ok(json_ok(
        StatusCode::OK,
        &json!({ "revision": revision, "rules": rules.rules }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RulesBody {
    rules: Vec<Rule>,
    /// The revision the change is based on; `null`/absent skips the check.
    expected_revision: Option<ExpectedRevision>,
}

/// `PUT /v1/admin/rules`: replaces every rule; in force for the next check.
pub(crate) async fn set_rules<S: EventStore>(
    State(app): State<App<S>>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    caller.require_held(Permission::Admin)?;
    let body = body_bytes(body, app.config.max_body_bytes)?;
    let b: RulesBody = parse_json(&body, "request body")?;
    let rules = Rules { rules: b.rules };
    let revision = app
        .security
        .set_rules(caller.name(), rules.clone(), b.expected_revision)
        .await
        .map_err(admin_problem)?;
    // What was stored, with its revision (a later change may already be in force).
    Ok(json_ok(
        StatusCode::OK,
        &json!({ "revision": revision, "rules": rules.rules }),
    ))
}
