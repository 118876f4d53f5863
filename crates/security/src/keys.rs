//! API keys: `skald_<id>_<secret>`, stored as an argon2id hash of the secret.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

/// The prefix that marks a bearer token as an API key.
pub const PREFIX: &str = "skald_";

/// What is known of a key, as the admin API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyInfo {
    pub id: String,
    pub name: String,
    pub roles: BTreeSet<String>,
    /// Unix seconds after which the key is refused.
    pub expires_at: Option<i64>,
    pub created_at: i64,
    pub created_by: String,
    #[serde(default)]
    pub revoked: bool,
}

/// A key as stored in `$security-keys`: what is known of it and the hash of its secret (never
/// the secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKey {
    #[serde(flatten)]
    pub info: KeyInfo,
    /// argon2id PHC string of the secret.
    pub hash: String,
}

/// A new key: the full token (shown once) and what is stored of it.
pub struct NewKey {
    pub token: String,
    pub stored: StoredKey,
}

/// Makes a key with a fresh id and secret.
pub fn generate(
    name: &str,
    roles: BTreeSet<String>,
    expires_at: Option<i64>,
    now: i64,
    by: &str,
) -> Result<NewKey, String> {
    let rng = ring::rand::SystemRandom::new();
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    ring::rand::SecureRandom::fill(&rng, &mut id).map_err(|_| "no randomness available")?;
    ring::rand::SecureRandom::fill(&rng, &mut secret).map_err(|_| "no randomness available")?;
    let id: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let secret = URL_SAFE_NO_PAD.encode(secret);
    let mut salt = [0u8; 16];
    ring::rand::SecureRandom::fill(&rng, &mut salt).map_err(|_| "no randomness available")?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    let hash = argon2::Argon2::default()
        .hash_password(secret.as_bytes(), &salt)
        .map_err(|e| format!("cannot hash the key: {e}"))?
        .to_string();
    Ok(NewKey {
        token: format!("{PREFIX}{id}_{secret}"),
        stored: StoredKey {
            info: KeyInfo {
                id,
                name: name.to_owned(),
                roles,
                expires_at,
                created_at: now,
                created_by: by.to_owned(),
                revoked: false,
            },
            hash,
        },
    })
}

/// Splits `skald_<id>_<secret>`; `None` when the token is not shaped like a key.
pub fn split(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()) && !secret.is_empty())
        .then_some((id, secret))
}

/// Why a key was refused. The wording never contains the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRefusal {
    Malformed,
    Unknown(String),
    Revoked(String),
    Expired(String),
    WrongSecret(String),
    /// Too many wrong secrets for this key id or from this address: refused without checking.
    Throttled(String),
}

/// What checking a key without its hash found: accepted from the cache of verified secrets,
/// or the argon2 hash to verify the secret against (slow: off the lock, off the runtime).
pub enum Check<'a> {
    Accepted(&'a KeyInfo),
    Hash {
        id: String,
        hash: String,
        digest: [u8; 32],
    },
}

/// Whether `secret` is the one `hash` (a PHC string) was made from: argon2, about 25 ms.
pub fn secret_matches(secret: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|hash| {
        argon2::Argon2::default()
            .verify_password(secret.as_bytes(), &hash)
            .is_ok()
    })
}

impl KeyRefusal {
    pub fn reason(&self) -> &'static str {
        match self {
            KeyRefusal::Malformed => "malformed",
            KeyRefusal::Unknown(_) => "unknown-key",
            KeyRefusal::Revoked(_) => "revoked",
            KeyRefusal::Expired(_) => "expired",
            KeyRefusal::WrongSecret(_) => "wrong-secret",
            KeyRefusal::Throttled(_) => "throttled",
        }
    }

    pub fn key_id(&self) -> Option<&str> {
        match self {
            KeyRefusal::Malformed => None,
            KeyRefusal::Unknown(id)
            | KeyRefusal::Revoked(id)
            | KeyRefusal::Expired(id)
            | KeyRefusal::WrongSecret(id)
            | KeyRefusal::Throttled(id) => Some(id),
        }
    }

    pub fn detail(&self) -> String {
        match self {
            KeyRefusal::Malformed => {
                "the API key is not of the form skald_<16 hex digits>_<secret>".to_owned()
            }
            KeyRefusal::Unknown(id) => format!("API key {id} does not exist"),
            KeyRefusal::Revoked(id) => format!("API key {id} was revoked"),
            KeyRefusal::Expired(id) => format!("API key {id} has expired"),
            KeyRefusal::WrongSecret(id) => format!("the secret of API key {id} is wrong"),
            KeyRefusal::Throttled(id) => format!(
                "too many wrong secrets for API key {id} or from this address; wait a few \
                 seconds and retry"
            ),
        }
    }
}

/// The keys in force, by id, with a cache of verified secrets.
#[derive(Default)]
pub struct KeyRing {
    keys: HashMap<String, StoredKey>,
    /// id → SHA-256 of a secret argon2 accepted, so that argon2 runs once per key.
    verified: Mutex<HashMap<String, [u8; 32]>>,
}

impl KeyRing {
    /// Applies a stored key or a revocation.
    pub fn insert(&mut self, key: StoredKey) {
        self.verified
            .lock()
            .expect("key cache")
            .remove(&key.info.id);
        self.keys.insert(key.info.id.clone(), key);
    }

    pub fn revoke(&mut self, id: &str) -> Option<&KeyInfo> {
        self.verified.lock().expect("key cache").remove(id);
        let key = self.keys.get_mut(id)?;
        key.info.revoked = true;
        Some(&key.info)
    }

    pub fn get(&self, id: &str) -> Option<&KeyInfo> {
        self.keys.get(id).map(|k| &k.info)
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn list(&self) -> Vec<KeyInfo> {
        let mut keys: Vec<KeyInfo> = self.keys.values().map(|k| k.info.clone()).collect();
        keys.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        keys
    }

    /// Checks a bearer token that starts with [`PREFIX`], all at once (argon2 included).
    pub fn verify(&self, token: &str, now: i64) -> Result<&KeyInfo, KeyRefusal> {
        match self.check(token, now)? {
            Check::Accepted(info) => Ok(info),
            Check::Hash { id, hash, digest } => {
                let (_, secret) = split(token).ok_or(KeyRefusal::Malformed)?;
                if !secret_matches(secret, &hash) {
                    return Err(KeyRefusal::WrongSecret(id));
                }
                self.remember(&id, digest);
                Ok(&self.keys[&id].info)
            }
        }
    }

    /// Remembers that argon2 accepted the secret whose SHA-256 is `digest` for key `id`.
    pub fn remember(&self, id: &str, digest: [u8; 32]) {
        if self.keys.contains_key(id) {
            self.verified
                .lock()
                .expect("key cache")
                .insert(id.to_owned(), digest);
        }
    }

    /// Checks a bearer token that starts with [`PREFIX`] as far as it can without argon2: its
    /// form, the key's state, and the cache of verified secrets.
    pub fn check(&self, token: &str, now: i64) -> Result<Check<'_>, KeyRefusal> {
        let (id, secret) = split(token).ok_or(KeyRefusal::Malformed)?;
        let key = self
            .keys
            .get(id)
            .ok_or_else(|| KeyRefusal::Unknown(id.to_owned()))?;
        if key.info.revoked {
            return Err(KeyRefusal::Revoked(id.to_owned()));
        }
        if key.info.expires_at.is_some_and(|at| now >= at) {
            return Err(KeyRefusal::Expired(id.to_owned()));
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
        let digest: [u8; 32] = digest.as_ref().try_into().expect("SHA-256 is 32 bytes");
        let cached = self.verified.lock().expect("key cache").get(id).copied();
        if let Some(known) = cached {
            return if same(&known, &digest) {
                Ok(Check::Accepted(&key.info))
            } else {
                Err(KeyRefusal::WrongSecret(id.to_owned()))
            };
        }
        Ok(Check::Hash {
            id: id.to_owned(),
            hash: key.hash.clone(),
            digest,
        })
    }
}

/// Compares without an early exit, so the time taken says nothing about where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_verifies_once_made_and_not_after_revocation() {
        let new = generate("ci", BTreeSet::from(["writer".into()]), Some(1000), 10, "t").unwrap();
        assert!(new.token.starts_with("skald_"));
        assert!(!new.stored.hash.contains(split(&new.token).unwrap().1));
        assert!(new.stored.hash.starts_with("$argon2id$"));
        let mut ring = KeyRing::default();
        ring.insert(new.stored.clone());
        assert_eq!(ring.verify(&new.token, 20).unwrap().name, "ci");
        // Again, from the cache.
        assert_eq!(ring.verify(&new.token, 21).unwrap().name, "ci");
        let wrong = format!("{}x", new.token);
        assert_eq!(
            ring.verify(&wrong, 22).unwrap_err().reason(),
            "wrong-secret"
        );
        assert_eq!(
            ring.verify(&new.token, 1000).unwrap_err().reason(),
            "expired"
        );
        ring.revoke(&new.stored.info.id);
        let refusal = ring.verify(&new.token, 30).unwrap_err();
        assert_eq!(refusal.reason(), "revoked");
        assert!(!refusal.detail().contains(split(&new.token).unwrap().1));
        assert_eq!(
            ring.verify("skald_0123456789abcdef_x", 1)
                .unwrap_err()
                .reason(),
            "unknown-key"
        );
        assert_eq!(
            ring.verify("skald_nope", 1).unwrap_err(),
            KeyRefusal::Malformed
        );
    }
}
