//! Who is calling and what they may do: the middleware that authenticates every request,
//! applies the rate limits and adds the security headers, and the checks each handler makes.
//! The rules are in `docs/security.md`.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use skald_core::{EventStore, ReadSource, StreamName};
use skald_hub::SourceSpec;
use skald_security::{Credentials, LiveRules, Permission, Principal};
use tower::{Layer, Service};

use crate::listener::Connection;
use crate::{App, Problem};

/// The caller of a request: `None` when authentication is off (everything is allowed).
#[derive(Clone)]
pub(crate) struct Caller {
    principal: Option<Arc<Principal>>,
    rules: LiveRules,
}

impl<T: Send + Sync> FromRequestParts<T> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _: &T) -> Result<Self, Problem> {
        // The guard puts it there for every route; its absence is a bug, and fails closed.
        parts.extensions.get::<Caller>().cloned().ok_or_else(|| {
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
                "the request was not authenticated".to_owned(),
            )
        })
    }
}

fn denied(principal: &Principal, permission: Permission, what: &str) -> Problem {
    Problem::forbidden(format!(
        "{} (roles: {}) may not {permission} {what}; an admin can grant it with a rule",
        principal.name,
        if principal.roles.is_empty() {
            "none".to_owned()
        } else {
            principal
                .roles
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        }
    ))
}

impl Caller {
    /// The name audit events record.
    pub fn name(&self) -> &str {
        self.principal.as_ref().map_or("anonymous", |p| &p.name)
    }

    /// `permission` on one stream or saga definition.
    pub fn require(&self, permission: Permission, name: &str) -> Result<(), Problem> {
        match &self.principal {
            None => Ok(()),
            Some(p) if p.may(&self.rules.current(), permission, name) => Ok(()),
            Some(p) => Err(denied(p, permission, &format!("{name:?}"))),
        }
    }

    /// `permission` anywhere (the admin API, listing).
    pub fn require_held(&self, permission: Permission) -> Result<(), Problem> {
        match &self.principal {
            None => Ok(()),
            Some(p) if p.holds(&self.rules.current(), permission) => Ok(()),
            Some(p) => Err(denied(p, permission, "anything here")),
        }
    }

    /// `permission` on at least one stream the source can hold (reads and subscriptions over
    /// many streams, which then deliver only what [`Caller::retain`] keeps).
    pub fn require_some(&self, permission: Permission, scope: Scope<'_>) -> Result<(), Problem> {
        let Some(p) = &self.principal else {
            return Ok(());
        };
        let rules = self.rules.current();
        let ok = match scope {
            Scope::Stream(s) => p.may(&rules, permission, s),
            Scope::Category(c) => {
                p.may(&rules, permission, c) || p.may_some(&rules, permission, &format!("{c}-"))
            }
            Scope::All | Scope::AllUser => p.may_some(&rules, permission, ""),
        };
        if ok {
            Ok(())
        } else {
            Err(denied(p, permission, &scope.describe()))
        }
    }

    /// `permission` on every stream the source can hold (persistent subscriptions, which
    /// cannot skip events).
    pub fn require_all(&self, permission: Permission, scope: Scope<'_>) -> Result<(), Problem> {
        let Some(p) = &self.principal else {
            return Ok(());
        };
        let rules = self.rules.current();
        let ok = match scope {
            Scope::Stream(s) => p.may(&rules, permission, s),
            Scope::Category(c) => p.may_all(&rules, permission, &format!("{c}-"), Some(c)),
            // The global log and queries reach system streams too.
            Scope::All => p.is_admin(),
            Scope::AllUser => p.may_all(&rules, permission, "", None),
        };
        if ok {
            Ok(())
        } else {
            Err(denied(
                p,
                permission,
                &format!("every stream of {}", scope.describe()),
            ))
        }
    }

    /// The problem an append's error becomes for this caller: a reused event id whose stored
    /// event is in a stream the caller may not read is one generic conflict, without the
    /// stream, the position or how the events differ (which would confirm its content).
    pub fn append_problem(&self, error: skald_core::Error) -> Problem {
        match error {
            skald_core::Error::IdReused {
                id,
                stream: Some(stream),
                ..
            } if self.require(Permission::Read, stream.as_str()).is_err() => Problem::new(
                StatusCode::CONFLICT,
                "event-id-reused",
                "Event id reused",
                format!("event id {id} is already used by another event; use a new id"),
            )
            .with("id", serde_json::json!(id)),
            other => Problem::from(other),
        }
    }

    /// An append condition (DCB) looks at the events of every user stream and answers with the
    /// position of one that matches, so it needs `read` on every user stream.
    pub fn require_condition(&self) -> Result<(), Problem> {
        let Some(p) = &self.principal else {
            return Ok(());
        };
        self.require_all(Permission::Read, Scope::AllUser)
            .map_err(|_| {
                Problem::forbidden(format!(
                    "{} may not append with a condition: a condition looks at the events of \
                     every stream and answers with the position of one that matches, so it \
                     needs read on every stream (a rule with on: [\"*\"]); append with an \
                     expected revision instead, or ask an admin for that rule",
                    p.name
                ))
            })
    }

    /// `permission` on every stream a name template can render (`pieces`: its text, `None` for
    /// each placeholder); `what` says where the template is, for the refusal.
    pub fn require_template(
        &self,
        permission: Permission,
        template: &str,
        pieces: &[Option<&str>],
        what: &str,
    ) -> Result<(), Problem> {
        match &self.principal {
            None => Ok(()),
            Some(p) if p.may_template(&self.rules.current(), permission, pieces) => Ok(()),
            Some(p) => Err(denied(
                p,
                permission,
                &format!(
                    "every stream {what} can produce ({template:?}, a placeholder standing for \
                     any characters)"
                ),
            )),
        }
    }

    /// Who the caller is, as a saga definition records its registrant (`None` with
    /// authentication off).
    pub fn registrant(&self) -> Option<serde_json::Value> {
        self.principal
            .as_ref()
            .and_then(|p| serde_json::to_value(&**p).ok())
    }

    /// Whether the caller was named by its client certificate.
    pub fn by_certificate(&self) -> bool {
        self.principal
            .as_ref()
            .is_some_and(|p| p.method == skald_security::Method::Certificate)
    }

    /// Counts a request that did not pass the guard (a relayed WebSocket join) against the
    /// caller's rate limit.
    pub fn limit<S: EventStore>(
        &self,
        security: &skald_security::Security<S>,
    ) -> Result<(), Problem> {
        match &self.principal {
            Some(principal) => security
                .limit_principal(principal)
                .map_err(|wait| Problem::rate_limited("principal", wait)),
            None => Ok(()),
        }
    }

    /// Authentication is off: every check passes, and lookups made only for a check can be
    /// skipped.
    pub fn is_unrestricted(&self) -> bool {
        self.principal.is_none()
    }

    /// Keeps only the events (of any shape) the caller may read, against the rules in force
    /// now: multi-stream reads and subscriptions call this at each delivery.
    pub fn retain<T>(&self, events: &mut Vec<T>, stream: impl Fn(&T) -> &StreamName) {
        if let Some(p) = &self.principal {
            let rules = self.rules.current();
            events.retain(|e| p.may(&rules, Permission::Read, stream(e).as_str()));
        }
    }
}

/// What a long-lived stream needs of its caller, checked again as it runs.
pub(crate) type Needs = Box<dyn Fn(&Caller) -> Result<(), Problem> + Send + Sync>;

/// A caller on a long-lived stream (SSE, a WebSocket and what it carries, gRPC subscriptions
/// and group consumers), checked again before each delivery and heartbeat: whether its
/// credential is still in force (a key not revoked; a key or token not expired) and whether
/// the rules in force still allow what the stream needs. Cheap while nothing changed: one
/// atomic load (and a clock read for a credential that expires).
pub(crate) struct Recheck<S> {
    security: Arc<skald_security::Security<S>>,
    caller: Caller,
    needs: Needs,
    /// The access generation of the last full check; `None` before the first.
    seen: Option<u64>,
}

impl<S: EventStore> Recheck<S> {
    /// The first [`Recheck::check`] is a full one, so that a change between the request's
    /// own checks and the stream's start is not missed.
    pub fn new(security: Arc<skald_security::Security<S>>, caller: Caller, needs: Needs) -> Self {
        Self {
            security,
            caller,
            needs,
            seen: None,
        }
    }

    /// The caller, for the filtering each delivery does.
    pub fn caller(&self) -> &Caller {
        &self.caller
    }

    /// `Err` is the problem to end the stream with: 401 for a credential no longer in force,
    /// 403 for rules that no longer allow the stream.
    pub fn check(&mut self) -> Result<(), Problem> {
        let Some(principal) = self.caller.principal.as_deref() else {
            return Ok(());
        };
        let generation = self.security.access_generation();
        let expiring = principal
            .expires_at
            .is_some_and(|at| skald_security::now_s() >= at);
        if self.seen == Some(generation) && !expiring {
            return Ok(());
        }
        self.security
            .still_in_force(principal)
            .map_err(|(reason, detail)| {
                Problem::unauthenticated(
                    reason,
                    format!("{detail}; the stream ends: connect again with a valid credential"),
                )
            })?;
        (self.needs)(&self.caller)?;
        self.seen = Some(generation);
        Ok(())
    }
}

/// The streams a read, a subscription or a group reaches.
#[derive(Clone, Copy)]
pub(crate) enum Scope<'a> {
    Stream(&'a str),
    Category(&'a str),
    /// The global log, filtered or not, and queries.
    All,
    /// Every stream that is not a system stream (a saga trigger by types or by query).
    AllUser,
}

impl Scope<'_> {
    fn describe(self) -> String {
        match self {
            Scope::Stream(s) => format!("stream {s:?}"),
            Scope::Category(c) => format!("category {c:?}"),
            Scope::All => "the global log".to_owned(),
            Scope::AllUser => "every stream".to_owned(),
        }
    }
}

impl<'a> From<&'a ReadSource> for Scope<'a> {
    fn from(source: &'a ReadSource) -> Self {
        match source {
            ReadSource::Stream(s) => Scope::Stream(s.as_str()),
            ReadSource::Category(c) => Scope::Category(c.as_str()),
            ReadSource::All(_) | ReadSource::Query(_) => Scope::All,
        }
    }
}

impl<'a> From<&'a SourceSpec> for Scope<'a> {
    fn from(source: &'a SourceSpec) -> Self {
        match source {
            SourceSpec::Stream(s) => Scope::Stream(s),
            SourceSpec::Category(c) => Scope::Category(c),
            SourceSpec::All(_) | SourceSpec::Query(_) => Scope::All,
        }
    }
}

fn is_public(path: &str, method: &Method, public_metrics: bool) -> bool {
    if method == Method::POST {
        return is_public_grpc(path);
    }
    method == Method::GET
        && (matches!(path, "/health/live" | "/health/ready" | "/v1/openapi.json")
            || (path == "/metrics" && public_metrics))
}

/// The guard as a tower layer: authenticates, rate-limits, answers CORS preflights, and adds
/// the security headers. (A hand-written layer: `axum::middleware::from_fn` cost a boxed
/// service clone per request on the append path.)
pub(crate) struct GuardLayer<S> {
    pub app: App<S>,
}

impl<S> Clone for GuardLayer<S> {
    fn clone(&self) -> Self {
        Self {
            app: Arc::clone(&self.app),
        }
    }
}

impl<S, I> Layer<I> for GuardLayer<S> {
    type Service = Guard<S, I>;

    fn layer(&self, inner: I) -> Guard<S, I> {
        Guard {
            inner,
            app: Arc::clone(&self.app),
        }
    }
}

pub(crate) struct Guard<S, I> {
    inner: I,
    app: App<S>,
}

impl<S, I: Clone> Clone for Guard<S, I> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            app: Arc::clone(&self.app),
        }
    }
}

impl<S, I> Service<Request> for Guard<S, I>
where
    S: EventStore,
    I: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    I::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let app = Arc::clone(&self.app);
        // The clone that was made ready is the one that serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let grpc = is_grpc(request.headers());
            let origin = if app.config.cors_allowed_origins.is_empty() {
                None
            } else {
                request
                    .headers()
                    .get(header::ORIGIN)
                    .and_then(|o| app.allowed_origin(o))
            };
            if let Err(refused) = admit(&app, &mut request, origin.clone()).await {
                let response = match refused {
                    Refused::Preflight(response) => response,
                    Refused::Problem(problem) if grpc => problem.to_grpc_status().into_http(),
                    Refused::Problem(problem) => problem.into_response(),
                };
                return Ok(finish(response, &app, origin));
            }
            match app.coordination.route(&request) {
                crate::coordination::Route::Local => {}
                crate::coordination::Route::Forward(owner) => {
                    // Passed on only for a caller this node named by its certificate.
                    let certificate = request
                        .extensions()
                        .get::<Connection>()
                        .and_then(|c| c.certificate.clone())
                        .filter(|_| {
                            request
                                .extensions()
                                .get::<Caller>()
                                .is_some_and(Caller::by_certificate)
                        });
                    let response = app
                        .coordination
                        .forward(request, &owner, grpc, certificate.as_deref())
                        .await;
                    return Ok(finish(response, &app, origin));
                }
                crate::coordination::Route::Refuse(problem) => {
                    let response = if grpc {
                        problem.to_grpc_status().into_http()
                    } else {
                        problem.into_response()
                    };
                    return Ok(finish(response, &app, origin));
                }
            }
            let path = grpc.then(|| request.uri().path().to_owned());
            let mut response = inner.call(request).await?;
            // Only the fallbacks answer a gRPC request with anything but gRPC.
            if let Some(path) = path
                && !is_grpc(response.headers())
            {
                response = tonic::Status::unimplemented(format!(
                    "no gRPC method {path} here; the services are in proto/skald/v1/skald.proto"
                ))
                .into_http();
            }
            Ok(finish(response, &app, origin))
        })
    }
}

/// Why the guard answered a request itself.
enum Refused {
    /// A CORS preflight, answered whole.
    Preflight(Response),
    /// 401 or 429, as a problem document or a gRPC status.
    Problem(Problem),
}

/// Lets the request in (with its `Caller`), or answers it: a CORS preflight, 401 or 429.
async fn admit<S: EventStore>(
    app: &App<S>,
    request: &mut Request,
    allowed_origin: Option<HeaderValue>,
) -> Result<(), Refused> {
    if request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        let mut response = StatusCode::NO_CONTENT.into_response();
        if let Some(allowed) = allowed_origin {
            let h = response.headers_mut();
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(
                    "authorization, content-type, accept, last-event-id, x-request-id, \
                     skald-expected-revision, traceparent, tracestate",
                ),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
        }
        return Err(Refused::Preflight(response));
    }
    let security = &app.security;
    let connection = request.extensions().get::<Connection>();
    let address = connection
        .and_then(|c| c.peer)
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.ip());
    let mut certificate = connection.and_then(|c| c.certificate.clone());
    // A request another node forwarded names its caller by the caller's own credentials,
    // never by the certificate of the connection it came on: a node's is not the caller's,
    // and one that is not a node's did not forward it (docs/postgres.md, "Nodes that know
    // one another").
    let forwarded = request
        .headers()
        .contains_key(crate::coordination::FORWARDED_HEADER);
    let from_node = forwarded
        && certificate
            .as_deref()
            .is_some_and(|subject| app.coordination.is_node(subject));
    if forwarded {
        certificate = None;
    }
    if from_node {
        let refused = |detail| Refused::Problem(Problem::unauthenticated("certificate", detail));
        match crate::coordination::forwarded_certificate(request.headers()) {
            Ok(Some(subject)) => {
                let now = skald_security::now_s();
                if let Some(after) = subject.not_after.filter(|after| *after < now) {
                    return Err(refused(format!(
                        "the client certificate another node forwarded expired at {}",
                        skald_security::x509::format_time(after)
                    )));
                }
                certificate = Some(Arc::new(subject));
            }
            Ok(None) => {}
            Err(detail) => return Err(refused(detail)),
        }
    }
    let path = request.uri().path();
    let public = is_public(path, request.method(), security.public_metrics());
    // The forwarding node took the caller's address's token already.
    if !path.starts_with("/health/")
        && !from_node
        && let Err(wait) = security.limit_address(address)
    {
        return Err(Refused::Problem(Problem::rate_limited(
            "client address",
            wait,
        )));
    }
    let principal = if !security.enabled() || public {
        None
    } else {
        let authorization = header_text(request.headers(), header::AUTHORIZATION);
        let credentials = Credentials {
            authorization: authorization.as_deref(),
            certificate: certificate.as_deref(),
            address,
        };
        match security.authenticate(credentials).await {
            Ok(principal) => {
                if let Err(wait) = security.limit_principal(&principal) {
                    return Err(Refused::Problem(Problem::rate_limited("principal", wait)));
                }
                Some(Arc::new(principal))
            }
            Err(refusal) => {
                return Err(Refused::Problem(Problem::unauthenticated(
                    refusal.reason,
                    refusal.detail,
                )));
            }
        }
    };
    request.extensions_mut().insert(Caller {
        principal,
        rules: security.live_rules(),
    });
    Ok(())
}

fn header_text(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn finish<S: EventStore>(
    mut response: Response,
    app: &App<S>,
    allowed_origin: Option<HeaderValue>,
) -> Response {
    let h = response.headers_mut();
    h.reserve(7);
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    if app.security.tls().is_some() {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    if let Some(origin) = allowed_origin {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    response
}

/// The health service's name; its methods are public, like `/health/*`.
pub(crate) const HEALTH: &str = "grpc.health.v1.Health";
/// The reflection services' names; public, like the OpenAPI document.
pub(crate) const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
pub(crate) const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

/// Whether `path` is a method of a service that needs no credentials: health checks and
/// reflection.
fn is_public_grpc(path: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .is_some_and(|(service, _)| [HEALTH, REFLECTION_V1, REFLECTION_V1ALPHA].contains(&service))
}

/// Whether a request speaks gRPC (its errors are then gRPC statuses, not problem documents).
pub(crate) fn is_grpc(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}
