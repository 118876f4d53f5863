//! Security for every API: who is calling (API keys, JWTs, client certificates), what they may
//! do (rules on name patterns), how fast (rate limits), TLS material, and the audit trail.
//! The design is in `docs/security.md`. Keys and rules are events in system streams, so they
//! survive restarts and changes take effect at once.

mod fetch;
pub mod jwt;
pub mod keys;
pub mod ratelimit;
pub mod rules;
pub mod tls;
pub mod x509;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::{Value, json};
use skald_core::metrics::{Counter, Exposition, Kind};
use skald_core::{
    AppendRequest, EventData, EventStore, EventType, ExpectedRevision, ProposedEvent, ReadSource,
    StreamName,
};
use tokio::sync::mpsc;

pub use jwt::JwtConfig;
pub use keys::KeyInfo;
pub use ratelimit::RateLimitConfig;
pub use rules::{Method, Permission, Principal, Rule, Rules};
pub use tls::{TlsConfig, TlsSource};

/// Where the keys, the rules and the audit trail are stored.
pub mod streams {
    pub const KEYS: &str = "$security-keys";
    pub const RULES: &str = "$security-rules";
    pub const AUDIT: &str = "$audit";
}

/// The file `serve` writes the first admin key to, in the data directory.
pub const INITIAL_KEY_FILE: &str = "initial-admin-key";
/// Audit events waiting to be written; beyond this they are counted and dropped.
const AUDIT_QUEUE: usize = 4096;

/// `[auth]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `Authorization: Bearer skald_<id>_<secret>`.
    pub api_keys: bool,
    /// The client certificate names the principal (needs `[tls] client_ca_file`).
    pub mtls: bool,
    /// `GET /metrics` without credentials.
    pub public_metrics: bool,
    pub jwt: Option<JwtConfig>,
}

impl AuthConfig {
    /// Is any authentication method on?
    pub fn enabled(&self) -> bool {
        self.api_keys || self.mtls || self.jwt.is_some()
    }
}

/// What a request presents.
pub struct Credentials<'a> {
    /// The `Authorization` header, when there is one.
    pub authorization: Option<&'a str>,
    /// The verified client certificate's subject, on an mTLS connection.
    pub certificate: Option<&'a x509::Subject>,
    pub address: IpAddr,
}

/// Why a request was not let in (401).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub method: Method,
    pub reason: &'static str,
    pub detail: String,
    pub key_id: Option<String>,
}

/// Errors of the admin operations.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] skald_core::Error),
}

/// A key as the admin API returns it at creation: the only time the token is shown.
#[derive(Debug, serde::Serialize)]
pub struct CreatedKey {
    pub key: String,
    #[serde(flatten)]
    pub info: KeyInfo,
}

/// The rules in force and their revision in `$security-rules`, shared with every check.
#[derive(Clone, Default)]
pub struct LiveRules(Arc<RwLock<(Option<u64>, Arc<Rules>)>>);

impl LiveRules {
    pub fn current(&self) -> Arc<Rules> {
        Arc::clone(&self.0.read().expect("rules lock").1)
    }
}

/// The security of one server.
pub struct Security<S> {
    store: Arc<S>,
    config: AuthConfig,
    keys: RwLock<keys::KeyRing>,
    rules: LiveRules,
    jwt: Option<jwt::JwtVerifier>,
    by_principal: Option<ratelimit::Limiter<String>>,
    by_address: Option<ratelimit::Limiter<IpAddr>>,
    /// Admin writes one at a time, so each sees the revision the last one left.
    writes: tokio::sync::Mutex<()>,
    audit: mpsc::Sender<(String, Value)>,
    metrics: Metrics,
    tls: Option<Arc<TlsSource>>,
    /// How many failed authentications each client address may have logged and audited one
    /// by one (beyond it they are only counted), and all addresses together.
    failure_budget: (ratelimit::Limiter<IpAddr>, ratelimit::Limiter<()>),
    /// Wrong secrets that needed argon2, per key id and per address: beyond them, keys are
    /// refused as throttled without hashing.
    wrong_secrets: (
        ratelimit::Limiter<(String, IpAddr)>,
        ratelimit::Limiter<IpAddr>,
    ),
    /// Argon2 verifications under way (each takes about 19 MiB and 25 ms of a core).
    hashing: Arc<tokio::sync::Semaphore>,
    /// Moves whenever access can have shrunk (a key revoked, the rules replaced): long-lived
    /// streams check their caller again when it differs from what they saw.
    access_generation: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct Metrics {
    failures: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    limited_principal: Counter,
    limited_address: Counter,
    audit_written: Arc<Counter>,
    audit_dropped: Counter,
    /// Failed authentications beyond the budget: neither logged nor audited one by one.
    failures_suppressed: Counter,
    /// Of those, how many since the last `AuthenticationFailed` written (which then says so).
    suppressed_since_audit: std::sync::atomic::AtomicU64,
}

/// Failed authentications logged and audited one by one, per client address.
const FAILURES_LOGGED_PER_ADDRESS: ratelimit::Bucket = ratelimit::Bucket {
    rate: 1.0,
    burst: 20.0,
};

/// Failed authentications logged and audited one by one, from all addresses together.
const FAILURES_LOGGED: ratelimit::Bucket = ratelimit::Bucket {
    rate: 100.0,
    burst: 200.0,
};

/// API key verifications that cost argon2 (a key's first use since the start, and every
/// wrong guess at one not yet verified), per key id and client address and per client
/// address: 10, then one every 2 seconds; a right secret does not count. Beyond them the key
/// is refused (`throttled`) unchecked.
const WRONG_SECRETS: ratelimit::Bucket = ratelimit::Bucket {
    rate: 0.5,
    burst: 10.0,
};

/// Argon2 verifications at once.
const HASHES_AT_ONCE: usize = 2;

/// Seconds since the Unix epoch, as credentials' expiry times are given.
pub fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The rules for a principal's name (an API key's, a client certificate's CN): 1 to 128 bytes,
/// no control characters and no markup characters, since names end up in logs, audit events
/// and pages.
pub fn check_principal_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 {
        return Err(format!(
            "must be 1 to 128 bytes long (this one is {})",
            name.len()
        ));
    }
    if let Some(c) = name.chars().find(|&c| {
        c.is_control() || invisible(c) || matches!(c, '<' | '>' | '&' | '"' | '\'' | '`')
    }) {
        return Err(format!(
            "must be printable, visible characters without < > & \" ' or ` (it contains {c:?}, \
             U+{:04X})",
            c as u32
        ));
    }
    Ok(())
}

/// Characters that change how a name reads without being seen: soft hyphen, format controls
/// (zero-width, bidirectional overrides and isolates), line and paragraph separators, tags.
/// Spaces other than the ASCII one count too, and so do fillers and variation selectors.
fn invisible(c: char) -> bool {
    matches!(c,
        '\u{00A0}' | '\u{00AD}' | '\u{034F}' | '\u{0600}'..='\u{0605}' | '\u{061C}' | '\u{06DD}'
        | '\u{115F}'..='\u{1160}' | '\u{17B4}'..='\u{17B5}' | '\u{180B}'..='\u{180F}'
        | '\u{2000}'..='\u{200F}' | '\u{2028}'..='\u{202F}' | '\u{205F}'..='\u{206F}'
        | '\u{3000}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFA0}'
        | '\u{FFF9}'..='\u{FFFB}' | '\u{1BCA0}'..='\u{1BCA3}' | '\u{13430}'..='\u{1343F}'
        | '\u{E0000}'..='\u{E0FFF}')
}

/// The principal a client certificate names: its one common name, within the name rules.
fn certificate_name(subject: &x509::Subject) -> Result<&str, String> {
    if let Some(kind) = subject.unreadable_common_names.first() {
        return Err(format!(
            "the client certificate's subject has a common name (CN) in {kind}, which is not \
             read; issue it with the CN as a UTF8String or PrintableString"
        ));
    }
    match subject.common_names.as_slice() {
        [cn] => check_principal_name(cn)
            .map(|()| cn.as_str())
            .map_err(|e| format!("the client certificate's common name (CN) {e}")),
        [] => Err("the client certificate's subject has no common name (CN)".to_owned()),
        many => Err(format!(
            "the client certificate's subject has {} common names (CN); exactly one must name \
             the principal",
            many.len()
        )),
    }
}

fn system_stream(name: &str) -> StreamName {
    StreamName::system(name).expect("system stream names are valid")
}

/// An append of `events` to the system stream `name`.
fn system_append(
    name: &str,
    expected: ExpectedRevision,
    events: Vec<ProposedEvent>,
) -> AppendRequest {
    AppendRequest {
        stream: system_stream(name),
        expected,
        condition: None,
        events,
    }
}

fn event(kind: &str, data: &Value) -> ProposedEvent {
    ProposedEvent::new(
        EventType::new(kind).expect("audit event types are valid"),
        EventData::json(data.to_string()).expect("JSON"),
    )
}

impl<S: EventStore> Security<S> {
    /// Loads keys and rules from the store and starts the audit writer. With authentication
    /// off, every caller is an anonymous admin and nothing is checked.
    pub async fn start(
        store: Arc<S>,
        config: AuthConfig,
        rate_limit: RateLimitConfig,
        tls: Option<Arc<TlsSource>>,
    ) -> Result<Arc<Self>, String> {
        for (key, bucket) in [
            ("per_principal", &rate_limit.per_principal),
            ("per_address", &rate_limit.per_address),
        ] {
            if let Some(b) = bucket {
                b.validate(key)?;
            }
        }
        if config.mtls
            && !tls
                .as_ref()
                .is_some_and(|t| t.requires_client_certificate())
        {
            return Err(
                "[auth] mtls = true needs [tls] with client_ca_file, so that clients present \
                 a certificate"
                    .to_owned(),
            );
        }
        let jwt = match &config.jwt {
            Some(c) => Some(jwt::JwtVerifier::new(c.clone()).await?),
            None => None,
        };
        let (security, queue) = Self::assemble(Arc::clone(&store), config, jwt, rate_limit, tls);
        let security = Arc::new(security);
        if let Some(tls) = &security.tls {
            // Handshakes refused for the client's certificate are authentication failures:
            // counted, logged and audited like the others, within the same budget.
            let weak = Arc::downgrade(&security);
            tls.on_refused(Box::new(move |reason, detail, address| {
                if let Some(security) = weak.upgrade() {
                    security.refused(
                        &Refusal {
                            method: Method::Certificate,
                            reason,
                            detail: format!("TLS handshake refused: {detail}"),
                            key_id: None,
                        },
                        address,
                    );
                }
            }));
        }
        if security.jwt.as_ref().is_some_and(|j| j.from_file()) {
            watch_jwks_file(Arc::downgrade(&security));
        }
        security.load().await.map_err(|e| e.to_string())?;
        tokio::spawn(write_audit(
            store,
            queue,
            Arc::clone(&security.metrics.audit_written),
        ));
        Ok(security)
    }

    /// Authentication off, nothing loaded: every caller is an anonymous admin.
    pub fn disabled(store: Arc<S>) -> Arc<Self> {
        let (security, _queue) = Self::assemble(
            store,
            AuthConfig::default(),
            None,
            RateLimitConfig::default(),
            None,
        );
        Arc::new(security)
    }

    /// Nothing loaded yet; the receiver is the audit queue's other end.
    fn assemble(
        store: Arc<S>,
        config: AuthConfig,
        jwt: Option<jwt::JwtVerifier>,
        rate_limit: RateLimitConfig,
        tls: Option<Arc<TlsSource>>,
    ) -> (Self, mpsc::Receiver<(String, Value)>) {
        let (audit, queue) = mpsc::channel(AUDIT_QUEUE);
        let security = Self {
            store,
            jwt,
            by_principal: rate_limit.per_principal.map(ratelimit::Limiter::new),
            by_address: rate_limit.per_address.map(ratelimit::Limiter::new),
            config,
            keys: RwLock::new(keys::KeyRing::default()),
            rules: LiveRules::default(),
            writes: tokio::sync::Mutex::new(()),
            audit,
            metrics: Metrics::default(),
            tls,
            access_generation: std::sync::atomic::AtomicU64::new(0),
            failure_budget: (
                ratelimit::Limiter::new(FAILURES_LOGGED_PER_ADDRESS),
                ratelimit::Limiter::new(FAILURES_LOGGED),
            ),
            wrong_secrets: (
                ratelimit::Limiter::new(WRONG_SECRETS),
                ratelimit::Limiter::new(WRONG_SECRETS),
            ),
            hashing: Arc::new(tokio::sync::Semaphore::new(HASHES_AT_ONCE)),
        };
        (security, queue)
    }

    async fn read_stream(
        &self,
        name: &str,
        each: impl FnMut(&skald_core::RecordedEvent),
    ) -> skald_core::Result<()> {
        skald_core::read_to_end(&*self.store, ReadSource::Stream(system_stream(name)), each).await
    }

    async fn load(&self) -> skald_core::Result<()> {
        let mut ring = keys::KeyRing::default();
        self.read_stream(streams::KEYS, |e| apply_key_event(&mut ring, e))
            .await?;
        *self.keys.write().expect("keys lock") = ring;
        let mut rules = (None, Rules::default());
        self.read_stream(streams::RULES, |e| {
            let data: Value = serde_json::from_slice(e.data.bytes()).unwrap_or_default();
            match serde_json::from_value::<Rules>(json!({ "rules": data["rules"] })) {
                Ok(r) => rules = (Some(e.revision.0), r),
                Err(err) => tracing::error!(
                    position = e.position.0,
                    error = %err,
                    "an AccessRulesSet event cannot be read; the rules before it stay in force"
                ),
            }
        })
        .await?;
        *self.rules.0.write().expect("rules lock") = (rules.0, Arc::new(rules.1));
        Ok(())
    }

    /// Is authentication on?
    pub fn enabled(&self) -> bool {
        self.config.enabled()
    }

    pub fn public_metrics(&self) -> bool {
        !self.enabled() || self.config.public_metrics
    }

    pub fn tls(&self) -> Option<&Arc<TlsSource>> {
        self.tls.as_ref()
    }

    /// Whether a principal recorded earlier (a saga's registrant) may still do `permission` on
    /// `name`, against the rules in force now; for an API key, the key must also still be
    /// known, unrevoked and unexpired. `Err` says why not. (A JWT's or certificate's roles are
    /// those it had when it was recorded: nothing tells the server that a token expired or a
    /// certificate was revoked since.)
    pub fn recorded_may(
        &self,
        principal: &Principal,
        permission: Permission,
        name: &str,
    ) -> Result<(), String> {
        if !self.enabled() {
            return Ok(());
        }
        self.key_in_force(principal)?;
        if principal.may(&self.rules.current(), permission, name) {
            Ok(())
        } else {
            Err(format!(
                "{} may not {permission} {name:?} under the rules in force",
                principal.id
            ))
        }
    }

    /// A handle that always sees the rules in force, for checks made later (subscriptions).
    pub fn live_rules(&self) -> LiveRules {
        self.rules.clone()
    }

    /// Takes a token from the client address's bucket.
    pub fn limit_address(&self, address: IpAddr) -> Result<(), Duration> {
        match &self.by_address {
            Some(l) => l.take(&address, Instant::now()).inspect_err(|_| {
                self.metrics.limited_address.inc();
            }),
            None => Ok(()),
        }
    }

    /// Takes a token from the principal's bucket.
    pub fn limit_principal(&self, principal: &Principal) -> Result<(), Duration> {
        match &self.by_principal {
            Some(l) => l
                .take(&principal.id, Instant::now())
                .inspect_err(|_| self.metrics.limited_principal.inc()),
            None => Ok(()),
        }
    }

    /// Who is calling, or why they are refused (counted and audited).
    pub async fn authenticate(&self, credentials: Credentials<'_>) -> Result<Principal, Refusal> {
        if !self.enabled() {
            return Ok(Principal::anonymous());
        }
        let result = self.identify(&credentials).await;
        if let Err(refusal) = &result {
            self.refused(refusal, credentials.address);
        }
        result
    }

    async fn identify(&self, credentials: &Credentials<'_>) -> Result<Principal, Refusal> {
        if let Some(header) = credentials.authorization {
            let token = header
                .strip_prefix("Bearer ")
                .or_else(|| header.strip_prefix("bearer "))
                .map(str::trim)
                .ok_or_else(|| Refusal {
                    method: Method::None,
                    reason: "scheme",
                    detail: "the Authorization header must be `Bearer <API key or token>`"
                        .to_owned(),
                    key_id: None,
                })?;
            if token.starts_with(keys::PREFIX) && self.config.api_keys {
                return self
                    .verify_key(token, credentials.address)
                    .await
                    .map(|key| Principal {
                        id: format!("key:{}", key.id),
                        name: key.name,
                        roles: key.roles,
                        method: Method::ApiKey,
                        expires_at: key.expires_at,
                        signed_by: None,
                    })
                    .map_err(|refusal| Refusal {
                        method: Method::ApiKey,
                        reason: refusal.reason(),
                        detail: refusal.detail(),
                        key_id: refusal.key_id().map(str::to_owned),
                    });
            }
            return match &self.jwt {
                Some(verifier) => match verifier.verify(token).await {
                    Ok(identity) => Ok(Principal {
                        id: format!("jwt:{}:{}", verifier.issuer(), identity.subject),
                        name: identity.subject,
                        roles: identity.roles,
                        method: Method::Jwt,
                        expires_at: identity.expires_at,
                        signed_by: Some(identity.key),
                    }),
                    Err(refusal) => Err(Refusal {
                        method: Method::Jwt,
                        reason: refusal.reason,
                        detail: refusal.detail,
                        key_id: None,
                    }),
                },
                None => Err(Refusal {
                    method: Method::None,
                    reason: "unsupported",
                    detail: if self.config.api_keys {
                        "the bearer token is not an API key (skald_...) and JWTs are not \
                         configured"
                            .to_owned()
                    } else {
                        "bearer tokens are not accepted by this server".to_owned()
                    },
                    key_id: None,
                }),
            };
        }
        if self.config.mtls
            && let Some(subject) = credentials.certificate
        {
            return match certificate_name(subject) {
                Ok(cn) => Ok(Principal {
                    id: format!("cert:{cn}"),
                    name: cn.to_owned(),
                    // An O that is not a valid role name could match no rule: it gives nothing.
                    roles: subject
                        .organizations
                        .iter()
                        .filter(|o| rules::check_role(o).is_ok())
                        .cloned()
                        .collect(),
                    method: Method::Certificate,
                    expires_at: subject.not_after.map(|t| t + 1),
                    signed_by: None,
                }),
                Err(detail) => Err(Refusal {
                    method: Method::Certificate,
                    reason: "certificate",
                    detail,
                    key_id: None,
                }),
            };
        }
        let mut accepted = Vec::new();
        if self.config.api_keys {
            accepted.push("an API key (Authorization: Bearer skald_...)");
        }
        if self.jwt.is_some() {
            accepted.push("a JWT (Authorization: Bearer ...)");
        }
        if self.config.mtls {
            accepted.push("a client certificate");
        }
        Err(Refusal {
            method: Method::None,
            reason: "missing",
            detail: format!(
                "no credentials; this server accepts {}",
                accepted.join(" or ")
            ),
            key_id: None,
        })
    }

    /// Verifies an API key. The first use of a key since the start needs argon2 (about 25 ms):
    /// it runs on the blocking pool, at most [`HASHES_AT_ONCE`] at a time, without the key
    /// ring's lock, and only while the key id and the address have not failed too often.
    async fn verify_key(&self, token: &str, address: IpAddr) -> Result<KeyInfo, keys::KeyRefusal> {
        let (id, hash, digest) = {
            let ring = self.keys.read().expect("keys lock");
            match ring.check(token, now_s())? {
                keys::Check::Accepted(info) => return Ok(info.clone()),
                keys::Check::Hash { id, hash, digest } => (id, hash, digest),
            }
        };
        // Each hash is paid for before it runs, so neither concurrent guesses nor ones that
        // hang up early escape the budget; a secret that turns out right gets it back.
        let now = std::time::Instant::now();
        let (by_key, by_address) = &self.wrong_secrets;
        let pair = (id.clone(), address);
        if by_key.take(&pair, now).is_err() {
            return Err(keys::KeyRefusal::Throttled(id));
        }
        if by_address.take(&address, now).is_err() {
            by_key.give_back(&pair);
            return Err(keys::KeyRefusal::Throttled(id));
        }
        // The permit goes with the hash, so that a request given up while it runs still holds
        // its place until argon2 finishes.
        let slot = Arc::clone(&self.hashing)
            .acquire_owned()
            .await
            .expect("the hashing semaphore is never closed");
        let secret = keys::split(token)
            .map(|(_, secret)| secret.to_owned())
            .ok_or(keys::KeyRefusal::Malformed)?;
        let matches = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            keys::secret_matches(&secret, &hash)
        })
        .await
        .unwrap_or(false);
        if !matches {
            return Err(keys::KeyRefusal::WrongSecret(id));
        }
        by_key.give_back(&pair);
        by_address.give_back(&address);
        // The key may have been revoked while argon2 ran: check it again.
        let ring = self.keys.read().expect("keys lock");
        ring.remember(&id, digest);
        match ring.check(token, now_s())? {
            keys::Check::Accepted(info) => Ok(info.clone()),
            keys::Check::Hash { id, .. } => Err(keys::KeyRefusal::WrongSecret(id)),
        }
    }

    fn refused(&self, refusal: &Refusal, address: IpAddr) {
        *self
            .metrics
            .failures
            .lock()
            .expect("metrics lock")
            .entry((refusal.method.as_str(), refusal.reason))
            .or_default() += 1;
        // A flood of bad credentials must not flood the log and `$audit` too: beyond the
        // budget, failures are only counted, and the next one audited says how many were not.
        let now = std::time::Instant::now();
        let (per_address, overall) = &self.failure_budget;
        if per_address.take(&address, now).is_err() || overall.take(&(), now).is_err() {
            self.metrics.failures_suppressed.inc();
            self.metrics
                .suppressed_since_audit
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        let suppressed = self
            .metrics
            .suppressed_since_audit
            .swap(0, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(
            method = refusal.method.as_str(),
            reason = refusal.reason,
            address = %address,
            "authentication failed: {}",
            refusal.detail
        );
        let mut data = json!({
            "method": refusal.method.as_str(),
            "reason": refusal.reason,
            "detail": refusal.detail,
            "address": address.to_string(),
        });
        if let Some(id) = &refusal.key_id {
            data["keyId"] = json!(id);
        }
        if suppressed > 0 {
            data["suppressedBefore"] = json!(suppressed);
        }
        self.audit_later("AuthenticationFailed", data);
    }

    /// Queues an audit event; when the queue is full it is counted and dropped.
    pub fn audit_later(&self, kind: &str, data: Value) {
        if self.audit.try_send((kind.to_owned(), data)).is_err() {
            self.metrics.audit_dropped.inc();
        }
    }

    /// Writes an audit event now.
    pub async fn audit_now(&self, kind: &str, data: Value) -> skald_core::Result<()> {
        self.store
            .append(system_append(
                streams::AUDIT,
                ExpectedRevision::Any,
                vec![event(kind, &data)],
            ))
            .await?;
        self.metrics.audit_written.inc();
        Ok(())
    }

    /// Every key, without secrets.
    pub fn list_keys(&self) -> Vec<KeyInfo> {
        self.keys.read().expect("keys lock").list()
    }

    /// Makes a key, stores it, audits it, and returns it (the only time the token is shown).
    pub async fn create_key(
        &self,
        by: &str,
        name: &str,
        roles: BTreeSet<String>,
        expires_at: Option<i64>,
    ) -> Result<CreatedKey, AdminError> {
        check_principal_name(name).map_err(|e| AdminError::Invalid(format!("name {e}")))?;
        for role in &roles {
            rules::check_role(role).map_err(|e| AdminError::Invalid(format!("role {e}")))?;
        }
        let now = now_s();
        if expires_at.is_some_and(|at| at <= now) {
            return Err(AdminError::Invalid(
                "expiresAt is in the past; give a future time".to_owned(),
            ));
        }
        let new = keys::generate(name, roles, expires_at, now, by).map_err(AdminError::Invalid)?;
        let _one = self.writes.lock().await;
        let data = serde_json::to_value(&new.stored).expect("serializable");
        self.store
            .append(system_append(
                streams::KEYS,
                ExpectedRevision::Any,
                vec![event("ApiKeyCreated", &data)],
            ))
            .await?;
        self.keys
            .write()
            .expect("keys lock")
            .insert(new.stored.clone());
        let info = new.stored.info.clone();
        self.audit_now(
            "ApiKeyCreated",
            json!({"id": info.id, "name": info.name, "roles": info.roles, "expiresAt": info.expires_at, "by": by}),
        )
        .await?;
        Ok(CreatedKey {
            key: new.token,
            info,
        })
    }

    /// Revokes a key; revoking a revoked key again changes nothing.
    pub async fn revoke_key(&self, by: &str, id: &str) -> Result<KeyInfo, AdminError> {
        let _one = self.writes.lock().await;
        let known = self.keys.read().expect("keys lock").get(id).cloned();
        let Some(key) = known else {
            return Err(AdminError::NotFound(format!("API key {id} does not exist")));
        };
        if key.revoked {
            return Ok(key);
        }
        self.store
            .append(system_append(
                streams::KEYS,
                ExpectedRevision::Any,
                vec![event("ApiKeyRevoked", &json!({"id": id, "revokedBy": by}))],
            ))
            .await?;
        let info = self
            .keys
            .write()
            .expect("keys lock")
            .revoke(id)
            .cloned()
            .expect("the key exists");
        self.access_changed();
        self.audit_now(
            "ApiKeyRevoked",
            json!({"id": id, "name": info.name, "by": by}),
        )
        .await?;
        Ok(info)
    }

    /// For a principal that authenticated with an API key: whether the key is still known,
    /// unrevoked and unexpired. `Err` says why not.
    fn key_in_force(&self, principal: &Principal) -> Result<(), String> {
        let Some(id) = principal.key_id() else {
            return Ok(());
        };
        let ring = self.keys.read().expect("keys lock");
        match ring.get(id) {
            None => Err(format!("API key {id} is unknown")),
            Some(key) if key.revoked => Err(format!("API key {id} was revoked")),
            Some(key) if key.expires_at.is_some_and(|at| now_s() >= at) => {
                Err(format!("API key {id} has expired"))
            }
            Some(_) => Ok(()),
        }
    }

    /// Whether the credential a caller authenticated with is still in force: not past its
    /// expiry (a key's, a token's `exp`), and for an API key, not revoked since. Long-lived
    /// streams ask at each delivery once [`Security::access_generation`] moved or the expiry
    /// came; `Err` is the reason to end them with (`revoked`, `expired`).
    pub fn still_in_force(&self, principal: &Principal) -> Result<(), (&'static str, String)> {
        if !self.enabled() {
            return Ok(());
        }
        if principal.expires_at.is_some_and(|at| now_s() >= at) {
            return Err((
                "expired",
                format!("the credential of {} has expired", principal.name),
            ));
        }
        if let (Some(key), Some(jwt)) = (&principal.signed_by, &self.jwt)
            && !jwt.has_key(key)
        {
            return Err((
                "revoked",
                format!(
                    "the key that signed the token of {} is no longer in the JWKS",
                    principal.name
                ),
            ));
        }
        self.key_in_force(principal).map_err(|why| {
            let reason = if why.ends_with("expired") {
                "expired"
            } else {
                "revoked"
            };
            (reason, why)
        })
    }

    /// A number that moves whenever access can have shrunk: a key revoked, the rules replaced.
    pub fn access_generation(&self) -> u64 {
        // A JWKS that loses a key shrinks access too.
        self.access_generation
            .load(std::sync::atomic::Ordering::Acquire)
            .wrapping_add(self.jwt.as_ref().map_or(0, |jwt| jwt.generation()))
    }

    fn access_changed(&self) {
        self.access_generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// The rules in force and their revision (`None` before any were set).
    pub fn rules_with_revision(&self) -> (Option<u64>, Arc<Rules>) {
        let r = self.rules.0.read().expect("rules lock");
        (r.0, Arc::clone(&r.1))
    }

    /// Replaces the rules, at `expected` when given (a conflict otherwise), and audits it.
    pub async fn set_rules(
        &self,
        by: &str,
        rules: Rules,
        expected: Option<ExpectedRevision>,
    ) -> Result<u64, AdminError> {
        rules.validate().map_err(AdminError::Invalid)?;
        let _one = self.writes.lock().await;
        let data = json!({ "rules": rules.rules, "by": by });
        let result = self
            .store
            .append(system_append(
                streams::RULES,
                expected.unwrap_or(ExpectedRevision::Any),
                vec![event("AccessRulesSet", &data)],
            ))
            .await?;
        let revision = result.last_revision.0;
        *self.rules.0.write().expect("rules lock") = (Some(revision), Arc::new(rules.clone()));
        self.access_changed();
        self.audit_now(
            "AccessRulesChanged",
            json!({ "revision": revision, "rules": rules.rules, "by": by }),
        )
        .await?;
        Ok(revision)
    }

    /// With API keys on and none ever made, makes `initial-admin` and writes it to
    /// `<data_dir>/initial-admin-key` (0600). Returns the file's path when it did.
    pub async fn ensure_initial_key(
        &self,
        data_dir: &Path,
    ) -> Result<Option<std::path::PathBuf>, String> {
        if !self.config.api_keys || !self.keys.read().expect("keys lock").is_empty() {
            return Ok(None);
        }
        let created = self
            .create_key(
                "skald serve",
                "initial-admin",
                BTreeSet::from([rules::ADMIN_ROLE.to_owned()]),
                None,
            )
            .await
            .map_err(|e| format!("cannot create the initial admin key: {e}"))?;
        let path = data_dir.join(INITIAL_KEY_FILE);
        tls::write_private(&path, format!("{}\n", created.key).as_bytes(), true)?;
        Ok(Some(path))
    }

    /// Appends the security metrics.
    pub fn write_metrics(&self, out: &mut Exposition) {
        out.family(
            "skald_auth_failures_total",
            Kind::Counter,
            "Requests refused for their credentials, by method and reason.",
        );
        for ((method, reason), n) in self.metrics.failures.lock().expect("metrics lock").iter() {
            out.sample(
                "skald_auth_failures_total",
                &[("method", method), ("reason", reason)],
                *n as f64,
            );
        }
        out.family(
            "skald_rate_limited_total",
            Kind::Counter,
            "Requests answered 429, by the bucket that was empty.",
        );
        out.sample(
            "skald_rate_limited_total",
            &[("scope", "principal")],
            self.metrics.limited_principal.get() as f64,
        );
        out.sample(
            "skald_rate_limited_total",
            &[("scope", "address")],
            self.metrics.limited_address.get() as f64,
        );
        out.single(
            "skald_audit_events_total",
            Kind::Counter,
            "Events written to the $audit stream.",
            self.metrics.audit_written.get() as f64,
        );
        out.single(
            "skald_audit_dropped_total",
            Kind::Counter,
            "Audit events dropped because the audit queue was full.",
            self.metrics.audit_dropped.get() as f64,
        );
        out.single(
            "skald_auth_failures_suppressed_total",
            Kind::Counter,
            "Failed authentications beyond the logging budget (20 per address, then 1 a second; \
             200, then 100 a second, overall): counted, not logged or audited one by one.",
            self.metrics.failures_suppressed.get() as f64,
        );
        out.family(
            "skald_tls_reloads_total",
            Kind::Counter,
            "Reloads of the TLS certificate files, by outcome (no samples without TLS).",
        );
        if let Some(tls) = &self.tls {
            out.sample(
                "skald_tls_reloads_total",
                &[("outcome", "success")],
                tls.reloaded.get() as f64,
            );
            out.sample(
                "skald_tls_reloads_total",
                &[("outcome", "failure")],
                tls.reload_failures.get() as f64,
            );
        }
        out.family(
            "skald_tls_handshake_failures_total",
            Kind::Counter,
            "TLS handshakes refused, by reason (no-certificate, unknown-issuer, expired, \
             not-yet-valid, bad-signature, wrong-purpose, revoked... for client certificates; \
             incompatible, malformed, alert, io... for the rest).",
        );
        if let Some(tls) = &self.tls {
            for (reason, n) in tls.refused_handshakes() {
                out.sample(
                    "skald_tls_handshake_failures_total",
                    &[("reason", reason)],
                    n as f64,
                );
            }
        }
        out.family(
            "skald_tls_certificate_expiry_timestamp_seconds",
            Kind::Gauge,
            "When the served TLS certificate expires (its notAfter), in seconds since the epoch.",
        );
        if let Some(not_after) = self.tls.as_ref().and_then(|t| t.not_after()) {
            out.sample(
                "skald_tls_certificate_expiry_timestamp_seconds",
                &[],
                not_after as f64,
            );
        }
    }
}

/// Re-reads `[auth.jwt] jwks_file` when it changes (checked as often as the TLS files) and
/// on SIGHUP, so that a key removed from it stops being trusted without a restart.
fn watch_jwks_file<S: EventStore>(security: std::sync::Weak<Security<S>>) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = signal(SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(tls::WATCH_INTERVAL);
        loop {
            let forced = tokio::select! {
                _ = tick.tick() => false,
                Some(()) = async { match &mut hup { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            };
            let Some(security) = security.upgrade() else {
                return;
            };
            // Reading and hashing the file is blocking work.
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(jwt) = &security.jwt {
                    jwt.reload_file(forced);
                }
            })
            .await;
        }
    });
}

fn apply_key_event(ring: &mut keys::KeyRing, e: &skald_core::RecordedEvent) {
    let data: Value = serde_json::from_slice(e.data.bytes()).unwrap_or_default();
    match e.event_type.as_str() {
        "ApiKeyCreated" => match serde_json::from_value::<keys::StoredKey>(data) {
            Ok(key) => ring.insert(key),
            Err(err) => {
                tracing::error!(position = e.position.0, error = %err, "an ApiKeyCreated event cannot be read; that key is not accepted")
            }
        },
        "ApiKeyRevoked" => {
            if let Some(id) = data["id"].as_str() {
                ring.revoke(id);
            }
        }
        _ => {}
    }
}

/// Writes queued audit events in batches.
async fn write_audit<S: EventStore>(
    store: Arc<S>,
    mut queue: mpsc::Receiver<(String, Value)>,
    written: Arc<Counter>,
) {
    let mut batch = Vec::new();
    while queue.recv_many(&mut batch, 256).await > 0 {
        let events: Vec<ProposedEvent> = batch
            .drain(..)
            .map(|(kind, data)| event(&kind, &data))
            .collect();
        let n = events.len() as u64;
        let appended = store
            .append(system_append(streams::AUDIT, ExpectedRevision::Any, events))
            .await;
        match appended {
            Ok(_) => written.add(n),
            Err(skald_core::Error::Unavailable(reason)) => {
                tracing::warn!(events = n, "audit events not written: {reason}");
            }
            Err(e) => tracing::error!(error = %e, events = n, "cannot write audit events"),
        }
    }
}
