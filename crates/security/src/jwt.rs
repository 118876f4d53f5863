//! OIDC bearer tokens: JWTs verified against the issuer's JWKS.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;
use serde_json::Value;

use crate::fetch::Fetcher;
use crate::tls::FileStamp;

/// A JWKS is fetched again for an unknown `kid` at most this often.
pub const MIN_REFRESH: Duration = Duration::from_secs(30);

/// `[auth.jwt]`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    pub issuer: String,
    pub audience: String,
    pub jwks_url: Option<String>,
    pub jwks_file: Option<PathBuf>,
    /// PEM roots to trust for the issuer's HTTPS, instead of the system's.
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    #[serde(default = "default_leeway")]
    pub leeway_s: u64,
    /// Fetch the discovery document and the JWKS over plain HTTP: only when it names the
    /// issuer exactly (a local development issuer), never by default.
    #[serde(default)]
    pub insecure_http_issuer: Option<String>,
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".to_owned()]
}

fn default_roles_claim() -> String {
    "roles".to_owned()
}

fn default_leeway() -> u64 {
    30
}

const ACCEPTABLE: [&str; 9] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

impl JwtConfig {
    /// Whether the issuer's documents may be fetched over plain HTTP.
    pub fn http_allowed(&self) -> bool {
        self.insecure_http_issuer.as_deref() == Some(self.issuer.as_str())
    }

    /// Checks the settings; errors name the key.
    pub fn validate(&self) -> Result<Vec<Algorithm>, String> {
        if self.issuer.is_empty() || self.audience.is_empty() {
            return Err("[auth.jwt] issuer and audience are required".to_owned());
        }
        if let Some(named) = &self.insecure_http_issuer
            && named != &self.issuer
        {
            return Err(format!(
                "[auth.jwt] insecure_http_issuer is {named:?} but the issuer is {:?}; it must \
                 name the issuer exactly",
                self.issuer
            ));
        }
        if self.jwks_file.is_none() && !self.http_allowed() {
            let fetched = self.jwks_url.as_deref().unwrap_or(&self.issuer);
            if fetched.to_ascii_lowercase().starts_with("http://") {
                return Err(format!(
                    "[auth.jwt] the keys would be fetched from {fetched} over plain HTTP, where \
                     anyone on the path can replace them; use https, or jwks_file, or (for a \
                     local development issuer only) insecure_http_issuer = {:?}",
                    self.issuer
                ));
            }
        }
        if self.jwks_url.is_some() && self.jwks_file.is_some() {
            return Err("[auth.jwt] give jwks_url or jwks_file, not both".to_owned());
        }
        if self.algorithms.is_empty() {
            return Err(format!(
                "[auth.jwt] algorithms is empty; list some of {}",
                ACCEPTABLE.join(", ")
            ));
        }
        self.algorithms
            .iter()
            .map(|a| {
                if !ACCEPTABLE.contains(&a.as_str()) {
                    return Err(format!(
                        "[auth.jwt] algorithm {a:?} is not accepted; use {} (HMAC and none are \
                         never accepted)",
                        ACCEPTABLE.join(", ")
                    ));
                }
                a.parse::<Algorithm>()
                    .map_err(|_| format!("unknown algorithm {a}"))
            })
            .collect()
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRefusal {
    pub reason: &'static str,
    pub detail: String,
}

fn refuse(reason: &'static str, detail: impl Into<String>) -> TokenRefusal {
    TokenRefusal {
        reason,
        detail: detail.into(),
    }
}

/// A verified token's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenIdentity {
    pub subject: String,
    pub roles: BTreeSet<String>,
    /// The token's `exp` (seconds since the epoch), with the configured leeway added.
    pub expires_at: Option<i64>,
    /// Which key verified it (see [`JwtVerifier::has_key`]).
    pub key: String,
}

/// A usable key: what decodes, the algorithm it is for, and its identity (a SHA-256 of its
/// JWK), by which a stream opened with a token learns that its key was removed.
type Key = (DecodingKey, Option<Algorithm>, String);

struct Keys {
    by_kid: HashMap<String, Key>,
    /// Keys without a `kid`, usable only when they are the only key.
    anonymous: Vec<Key>,
}

/// Verifies JWTs for one issuer.
pub struct JwtVerifier {
    config: JwtConfig,
    algorithms: Vec<Algorithm>,
    keys: RwLock<Keys>,
    last_refresh: tokio::sync::Mutex<Option<Instant>>,
    fetcher: Option<Fetcher>,
    /// The `jwks_file` as last read, to see when it changes.
    file_seen: Mutex<Option<FileStamp>>,
    /// Held while the file is read and installed, so that two reads cannot install in the
    /// wrong order.
    file_lock: Mutex<()>,
    /// Moves at each install of keys: streams then check that their token's key is still in.
    generation: std::sync::atomic::AtomicU64,
}

impl JwtVerifier {
    /// The issuer tokens must name.
    pub fn issuer(&self) -> &str {
        &self.config.issuer
    }

    /// Loads the keys: from the file, or by fetching (a failed fetch is retried when a token
    /// arrives; a bad file is an error now).
    pub async fn new(config: JwtConfig) -> Result<Self, String> {
        let algorithms = config.validate()?;
        let fetcher = if config.jwks_file.is_none() {
            Some(Fetcher::new(
                config.ca_file.as_deref(),
                config.http_allowed(),
            )?)
        } else {
            None
        };
        let verifier = Self {
            config,
            algorithms,
            keys: RwLock::new(Keys {
                by_kid: HashMap::new(),
                anonymous: Vec::new(),
            }),
            last_refresh: tokio::sync::Mutex::new(None),
            fetcher,
            file_seen: Mutex::new(None),
            file_lock: Mutex::new(()),
            generation: std::sync::atomic::AtomicU64::new(0),
        };
        if verifier.config.jwks_file.is_some() {
            verifier
                .read_file()
                .map_err(|e| format!("[auth.jwt] {e}"))?;
        } else if let Err(e) = verifier.refresh().await {
            tracing::warn!(error = %e, "cannot fetch the JWKS yet; will retry when a token arrives");
        }
        Ok(verifier)
    }

    /// Reads `jwks_file` and installs its keys; a file that cannot be read or is not a JWK
    /// set is an error and the keys in use stay.
    fn read_file(&self) -> Result<usize, String> {
        let file = self.config.jwks_file.as_ref().expect("keys from a file");
        let _reading = self.file_lock.lock().expect("jwks lock");
        let stamp = FileStamp::of(file);
        let bytes = std::fs::read(file)
            .map_err(|e| format!("cannot read jwks_file {}: {e}", file.display()))?;
        let installed = self
            .install(&bytes)
            .map_err(|e| format!("jwks_file {}: {e}", file.display()));
        // A broken file is not read again until it changes.
        *self.file_seen.lock().expect("jwks lock") = stamp;
        installed
    }

    /// Whether the keys come from a file (which `reload_file` re-reads).
    pub fn from_file(&self) -> bool {
        self.config.jwks_file.is_some()
    }

    /// Reads `jwks_file` again if it changed (or always, when `force`: SIGHUP). A file that
    /// cannot be used keeps the keys in use, and is logged.
    pub fn reload_file(&self, force: bool) {
        let Some(file) = &self.config.jwks_file else {
            return;
        };
        if !force && *self.file_seen.lock().expect("jwks lock") == FileStamp::of(file) {
            return;
        }
        match self.read_file() {
            Ok(n) => tracing::info!(file = %file.display(), keys = n, "JWKS file reloaded"),
            Err(e) => tracing::error!(error = %e, "JWKS reload failed; the keys in use stay"),
        }
    }

    fn install(&self, bytes: &[u8]) -> Result<usize, String> {
        #[derive(Deserialize)]
        struct Set {
            keys: Vec<Value>,
        }
        let set: Set = serde_json::from_slice(bytes).map_err(|e| format!("not a JWK set: {e}"))?;
        let mut keys = Keys {
            by_kid: HashMap::new(),
            anonymous: Vec::new(),
        };
        for raw in &set.keys {
            let kid = raw["kid"].as_str().unwrap_or("(none)");
            // Key by key: one this build cannot use (ES512, secp256k1, X25519, HMAC) is
            // skipped, and the others still work.
            let usable = serde_json::from_value::<Jwk>(raw.clone())
                .map_err(|e| e.to_string())
                .and_then(|jwk| {
                    if matches!(
                        jwk.common.public_key_use,
                        Some(PublicKeyUse::Encryption | PublicKeyUse::Other(_))
                    ) {
                        return Err("its use is not sig".to_owned());
                    }
                    if jwk
                        .common
                        .key_operations
                        .as_ref()
                        .is_some_and(|ops| !ops.contains(&KeyOperations::Verify))
                    {
                        return Err("its key_ops do not include verify".to_owned());
                    }
                    let key = DecodingKey::from_jwk(&jwk).map_err(|e| e.to_string())?;
                    Ok((jwk, key))
                });
            let (jwk, key) = match usable {
                Ok(usable) => usable,
                Err(why) => {
                    tracing::warn!(kid, "a JWKS key is skipped: {why}");
                    continue;
                }
            };
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok());
            // The RFC 7638 thumbprint: the key's required members only, so that the same key
            // with a renewed x5c or an added alg keeps its identity.
            let members: &[&str] = match raw["kty"].as_str() {
                Some("EC") => &["crv", "kty", "x", "y"],
                Some("RSA") => &["e", "kty", "n"],
                Some("OKP") => &["crv", "kty", "x"],
                _ => &[],
            };
            let thumbprint_input = if members.is_empty() {
                raw.to_string()
            } else {
                Value::Object(
                    members
                        .iter()
                        .map(|m| ((*m).to_owned(), raw[*m].clone()))
                        .collect(),
                )
                .to_string()
            };
            let identity = ring::digest::digest(&ring::digest::SHA256, thumbprint_input.as_bytes())
                .as_ref()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>();
            match &jwk.common.key_id {
                Some(kid) => {
                    keys.by_kid.insert(kid.clone(), (key, alg, identity));
                }
                None => keys.anonymous.push((key, alg, identity)),
            }
        }
        let n = keys.by_kid.len() + keys.anonymous.len();
        *self.keys.write().expect("jwks lock") = keys;
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Ok(n)
    }

    async fn refresh(&self) -> Result<usize, String> {
        let Some(fetcher) = &self.fetcher else {
            return self.read_file();
        };
        let url = match &self.config.jwks_url {
            Some(url) => url.clone(),
            None => {
                let discovery = format!(
                    "{}/.well-known/openid-configuration",
                    self.config.issuer.trim_end_matches('/')
                );
                let doc = fetcher.get(&discovery).await?;
                let doc: Value = serde_json::from_slice(&doc)
                    .map_err(|e| format!("{discovery} is not JSON: {e}"))?;
                doc["jwks_uri"]
                    .as_str()
                    .ok_or_else(|| format!("{discovery} has no jwks_uri"))?
                    .to_owned()
            }
        };
        let bytes = fetcher.get(&url).await?;
        self.install(&bytes).map_err(|e| format!("{url}: {e}"))
    }

    /// Whether the key of this identity (`TokenIdentity::key`) is still in the JWKS.
    pub fn has_key(&self, identity: &str) -> bool {
        let keys = self.keys.read().expect("jwks lock");
        keys.by_kid
            .values()
            .chain(keys.anonymous.iter())
            .any(|key| key.2 == identity)
    }

    /// Moves whenever keys are installed (a file read, a fetch).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    fn key_for(&self, kid: Option<&str>) -> Option<Key> {
        let keys = self.keys.read().expect("jwks lock");
        match kid {
            Some(kid) => keys.by_kid.get(kid).cloned(),
            None if keys.by_kid.len() + keys.anonymous.len() == 1 => keys
                .anonymous
                .first()
                .cloned()
                .or_else(|| keys.by_kid.values().next().cloned()),
            None => None,
        }
    }

    /// Verifies `token`, fetching the JWKS again (rate-limited) for an unknown `kid`.
    pub async fn verify(&self, token: &str) -> Result<TokenIdentity, TokenRefusal> {
        let header = token.split('.').next().unwrap_or("");
        let header: Value = URL_SAFE_NO_PAD
            .decode(header)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| refuse("malformed", "the bearer token is not a JWT"))?;
        // No critical extension is understood here, so a token that names one is refused
        // (RFC 7515 4.1.11).
        if header.get("crit").is_some() {
            return Err(refuse(
                "unsupported",
                "the token's header names critical extensions (crit), which this server does \
                 not understand",
            ));
        }
        let alg_name = header["alg"].as_str().unwrap_or("");
        let alg = self
            .algorithms
            .iter()
            .find(|a| format!("{a:?}") == alg_name)
            .copied()
            .ok_or_else(|| {
                refuse(
                    "algorithm",
                    format!(
                        "the token's algorithm {alg_name:?} is not accepted (accepted: {})",
                        self.config.algorithms.join(", ")
                    ),
                )
            })?;
        let kid = header["kid"].as_str();
        let mut found = self.key_for(kid);
        if found.is_none() {
            let mut last = self.last_refresh.lock().await;
            // Another request may have refreshed while this one waited.
            found = self.key_for(kid);
            if found.is_none() && last.is_none_or(|at| at.elapsed() >= MIN_REFRESH) {
                *last = Some(Instant::now());
                if let Err(e) = self.refresh().await {
                    tracing::warn!(error = %e, "cannot refresh the JWKS");
                }
                found = self.key_for(kid);
            }
        }
        let (key, key_alg, identity) = found.ok_or_else(|| match kid {
            Some(kid) => refuse(
                "unknown-key",
                format!(
                    "the token is signed by key {kid:?}, which the issuer's JWKS does not have"
                ),
            ),
            None => refuse(
                "unknown-key",
                "the token has no kid and the JWKS has more than one key",
            ),
        })?;
        if key_alg.is_some_and(|k| k != alg) {
            return Err(refuse(
                "algorithm",
                format!("the token's algorithm {alg_name} is not the one its key is for"),
            ));
        }
        let mut validation = Validation::new(alg);
        validation.algorithms = vec![alg];
        validation.leeway = self.config.leeway_s;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Value>(token, &key, &validation).map_err(|e| match e
            .kind()
        {
            ErrorKind::ExpiredSignature => refuse("expired", "the token has expired"),
            ErrorKind::ImmatureSignature => {
                refuse("not-yet-valid", "the token is not valid yet (nbf)")
            }
            ErrorKind::InvalidAudience => refuse(
                "audience",
                format!("the token is not for audience {:?}", self.config.audience),
            ),
            ErrorKind::InvalidIssuer => refuse(
                "issuer",
                format!("the token is not from issuer {:?}", self.config.issuer),
            ),
            ErrorKind::InvalidSignature => {
                refuse("signature", "the token's signature does not verify")
            }
            ErrorKind::MissingRequiredClaim(claim) => {
                refuse("claims", format!("the token has no {claim} claim"))
            }
            ErrorKind::InvalidAlgorithm => refuse(
                "algorithm",
                "the token's algorithm does not fit its key".to_owned(),
            ),
            other => refuse("malformed", format!("the token is malformed: {other:?}")),
        })?;
        let claims = data.claims;
        let subject = claims["sub"]
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| refuse("claims", "the token's sub is not a string"))?
            .to_owned();
        let mut at = &claims;
        for part in self.config.roles_claim.split('.') {
            at = &at[part];
        }
        let roles = match at {
            Value::Array(items) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            Value::String(s) => s.split_whitespace().map(str::to_owned).collect(),
            _ => BTreeSet::new(),
        };
        let expires_at = claims["exp"]
            .as_i64()
            .map(|exp| exp.saturating_add(i64::try_from(self.config.leeway_s).unwrap_or(0)));
        Ok(TokenIdentity {
            subject,
            roles,
            expires_at,
            key: identity,
        })
    }
}
