//! Authorization: permissions, name patterns, rules, and the decision for one principal.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Streams only the server writes and only `admin` reads.
pub const RESERVED_STREAMS: [&str; 3] = ["$security-keys", "$security-rules", "$audit"];

/// The role that holds every permission, whatever the rules say.
pub const ADMIN_ROLE: &str = "admin";

/// Most rules in one set, and most patterns in one rule.
pub const MAX_RULES: usize = 1000;
const MAX_PATTERNS: usize = 100;
const MAX_NAME: usize = 256;

/// What a rule can allow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    Read,
    Append,
    Delete,
    Subscribe,
    Saga,
    Admin,
}

impl Permission {
    pub const ALL: [Permission; 6] = [
        Permission::Read,
        Permission::Append,
        Permission::Delete,
        Permission::Subscribe,
        Permission::Saga,
        Permission::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Read => "read",
            Permission::Append => "append",
            Permission::Delete => "delete",
            Permission::Subscribe => "subscribe",
            Permission::Saga => "saga",
            Permission::Admin => "admin",
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Does glob `pattern` (`*` any run, `?` one character) match `name`? A name starting with `$`
/// (a system stream) is only matched by a pattern that starts with `$`.
pub fn matches(pattern: &str, name: &str) -> bool {
    if name.starts_with('$') != pattern.starts_with('$') {
        return false;
    }
    glob(pattern.as_bytes(), name.as_bytes())
}

/// Does `pattern` match every name that starts with `prefix` (whatever follows)?
pub fn covers_prefix(pattern: &str, prefix: &str) -> bool {
    if prefix.starts_with('$') != pattern.starts_with('$') {
        return false;
    }
    // The pattern covers the prefix if some head of it matches the prefix exactly and the rest
    // of it is only stars (which then match anything that follows).
    let p = pattern.as_bytes();
    (0..=p.len())
        .filter(|&k| p[k..].iter().all(|&c| c == b'*'))
        .any(|k| glob(&p[..k], prefix.as_bytes()))
}

/// Can `pattern` match some name that starts with `prefix`?
pub fn may_match_prefix(pattern: &str, prefix: &str) -> bool {
    if !prefix.is_empty() && prefix.starts_with('$') != pattern.starts_with('$') {
        return false;
    }
    // Compare up to the pattern's first wildcard: the names it matches start with that head.
    let head: &str = pattern.split(['*', '?']).next().unwrap_or("");
    let wild = head.len() < pattern.len();
    if wild {
        head.starts_with(prefix) || prefix.starts_with(head)
    } else {
        pattern.starts_with(prefix)
    }
}

/// Does `pattern` match every name a template can render? `pieces` is the template's text, with
/// `None` for each placeholder, which may become any characters: only a `*` of the pattern may
/// stand for one (a `?` or a literal cannot). Never true of a `$` pattern (a rendered name is
/// never a system stream).
pub fn covers_template(pattern: &str, pieces: &[Option<&str>]) -> bool {
    if pattern.starts_with('$') {
        return false;
    }
    // The template as symbols: `Some(byte)` for its text, `None` for a placeholder.
    let name: Vec<Option<u8>> = pieces
        .iter()
        .flat_map(|piece| match piece {
            Some(text) => text.bytes().map(Some).collect::<Vec<_>>(),
            None => vec![None],
        })
        .collect();
    let p = pattern.as_bytes();
    let (mut i, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        let literal = i < p.len()
            && p[i] != b'*'
            && match name[n] {
                Some(c) => p[i] == b'?' || p[i] == c,
                None => false,
            };
        if literal {
            // `?` is one character: a whole UTF-8 sequence.
            n += if p[i] == b'?' {
                utf8_len(name[n].unwrap_or(0))
            } else {
                1
            };
            i += 1;
        } else if i < p.len() && p[i] == b'*' {
            star = Some((i, n));
            i += 1;
        } else if let Some((si, sn)) = star {
            let next = sn + name[sn].map_or(1, utf8_len);
            star = Some((si, next));
            i = si + 1;
            n = next;
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == b'*')
}

/// Iterative glob matching with one backtrack point: linear in practice, never exponential.
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == name[n]) {
            // `?` is one character: skip a whole UTF-8 sequence.
            if pattern[p] == b'?' {
                n += utf8_len(name[n]);
            } else {
                n += 1;
            }
            p += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if let Some((sp, sn)) = star {
            let next = sn + utf8_len(name[sn]);
            star = Some((sp, next));
            p = sp + 1;
            n = next;
        } else {
            return false;
        }
    }
    n <= name.len() && pattern[p..].iter().all(|&c| c == b'*')
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xF0.. => 4,
        0xE0.. => 3,
        0xC0.. => 2,
        _ => 1,
    }
}

/// One rule: `role` may do `allow` on names matching any of `on`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub role: String,
    pub allow: Vec<Permission>,
    #[serde(default = "everything")]
    pub on: Vec<String>,
}

fn everything() -> Vec<String> {
    vec!["*".to_owned()]
}

/// Checks a role name (in rules and on API keys); the error follows the word "role".
pub fn check_role(role: &str) -> Result<(), String> {
    if role.is_empty() || role.len() > MAX_NAME {
        return Err(format!("must be 1 to {MAX_NAME} bytes long"));
    }
    if role.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "{role:?} contains whitespace or a control character"
        ));
    }
    Ok(())
}

/// The whole set of rules in force.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    pub rules: Vec<Rule>,
}

impl Rules {
    /// Checks a set before it is stored; the error names the rule and the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.rules.len() > MAX_RULES {
            return Err(format!(
                "{} rules is over the limit of {MAX_RULES}",
                self.rules.len()
            ));
        }
        for (i, rule) in self.rules.iter().enumerate() {
            let at = format!("rules[{i}]");
            check_role(&rule.role).map_err(|e| format!("{at}.role {e}"))?;
            if rule.allow.is_empty() {
                return Err(format!(
                    "{at}.allow is empty; list some of {}",
                    Permission::ALL.map(Permission::as_str).join(", ")
                ));
            }
            if rule.on.is_empty() || rule.on.len() > MAX_PATTERNS {
                return Err(format!(
                    "{at}.on must list 1 to {MAX_PATTERNS} patterns (leave it out for \"*\")"
                ));
            }
            for (j, pattern) in rule.on.iter().enumerate() {
                if pattern.is_empty() || pattern.len() > MAX_NAME {
                    return Err(format!("{at}.on[{j}] must be 1 to {MAX_NAME} bytes long"));
                }
                if pattern.chars().any(char::is_control) {
                    return Err(format!("{at}.on[{j}] contains a control character"));
                }
            }
        }
        Ok(())
    }
}

/// How a principal proved who it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Authentication is off: everyone is an anonymous admin.
    None,
    ApiKey,
    Jwt,
    Certificate,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::None => "none",
            Method::ApiKey => "api-key",
            Method::Jwt => "jwt",
            Method::Certificate => "certificate",
        }
    }
}

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    /// Unique across the ways of authenticating: `key:ID` (an API key), `jwt:ISSUER:SUBJECT`,
    /// `cert:CN`, or `anonymous`. Rate limits and saga registrants are keyed by it, so a JWT
    /// subject cannot pass for an API key of the same name.
    pub id: String,
    /// What the credential calls itself (the key's name, the token's subject, the CN).
    pub name: String,
    pub roles: BTreeSet<String>,
    pub method: Method,
    /// When the credential stops being valid (seconds since the epoch): a key's expiry, a
    /// token's `exp`. Long-lived streams end then. Not recorded with a saga's registrant,
    /// whose rights are checked against its key's state instead.
    #[serde(skip)]
    pub expires_at: Option<i64>,
    /// For a JWT, which key of the JWKS verified it (`TokenIdentity::key`): a stream opened
    /// with the token ends when that key is removed.
    #[serde(skip)]
    pub signed_by: Option<String>,
}

impl Principal {
    /// The caller when authentication is off.
    pub fn anonymous() -> Self {
        Self {
            id: "anonymous".to_owned(),
            name: "anonymous".to_owned(),
            roles: BTreeSet::from([ADMIN_ROLE.to_owned()]),
            method: Method::None,
            expires_at: None,
            signed_by: None,
        }
    }

    /// The API key it authenticated with, if it did.
    pub fn key_id(&self) -> Option<&str> {
        match self.method {
            Method::ApiKey => self.id.strip_prefix("key:"),
            _ => None,
        }
    }

    /// May do `permission` on every stream a template can render: `pieces` is its text, with
    /// `None` for each `{{...}}` (any characters).
    pub fn may_template(
        &self,
        rules: &Rules,
        permission: Permission,
        pieces: &[Option<&str>],
    ) -> bool {
        match self.patterns(rules, permission) {
            None => true,
            Some(patterns) => patterns.iter().any(|p| covers_template(p, pieces)),
        }
    }

    pub fn is_admin(&self) -> bool {
        self.roles.contains(ADMIN_ROLE)
    }

    /// The patterns on which the rules give this principal `permission`, or `None` when it
    /// holds it everywhere (admin).
    fn patterns<'r>(&self, rules: &'r Rules, permission: Permission) -> Option<Vec<&'r str>> {
        if self.is_admin() {
            return None;
        }
        Some(
            rules
                .rules
                .iter()
                .filter(|r| self.roles.contains(&r.role) && r.allow.contains(&permission))
                .flat_map(|r| r.on.iter().map(String::as_str))
                .collect(),
        )
    }

    /// Holds `permission` anywhere at all (the admin API needs only this).
    pub fn holds(&self, rules: &Rules, permission: Permission) -> bool {
        self.patterns(rules, permission)
            .is_none_or(|p| !p.is_empty())
    }

    /// May do `permission` on the stream or saga `name`. Reserved streams: admin only.
    pub fn may(&self, rules: &Rules, permission: Permission, name: &str) -> bool {
        if RESERVED_STREAMS.contains(&name) && permission != Permission::Saga {
            return self.holds(rules, Permission::Admin);
        }
        match self.patterns(rules, permission) {
            None => true,
            Some(patterns) => patterns.iter().any(|p| matches(p, name)),
        }
    }

    /// May do `permission` on every name starting with `prefix` (and on `exact`, when given).
    pub fn may_all(
        &self,
        rules: &Rules,
        permission: Permission,
        prefix: &str,
        exact: Option<&str>,
    ) -> bool {
        match self.patterns(rules, permission) {
            None => true,
            Some(patterns) => {
                patterns.iter().any(|p| covers_prefix(p, prefix))
                    && exact.is_none_or(|e| patterns.iter().any(|p| matches(p, e)))
            }
        }
    }

    /// May do `permission` on some name starting with `prefix`.
    pub fn may_some(&self, rules: &Rules, permission: Permission, prefix: &str) -> bool {
        match self.patterns(rules, permission) {
            None => true,
            Some(patterns) => patterns.iter().any(|p| may_match_prefix(p, prefix)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(roles: &[&str]) -> Principal {
        Principal {
            id: "key:p".into(),
            name: "p".into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            method: Method::ApiKey,
            expires_at: None,
            signed_by: None,
        }
    }

    #[test]
    fn a_template_is_covered_only_by_patterns_that_match_every_rendering() {
        let salary = [Some("hr-salary-"), None];
        assert!(covers_template("hr-salary-*", &salary));
        assert!(covers_template("hr-*", &salary));
        assert!(covers_template("*", &salary));
        assert!(
            !covers_template("hr-salary-?", &salary),
            "? is one character"
        );
        assert!(
            !covers_template("hr-salary-?*", &salary),
            "the key may be empty"
        );
        assert!(!covers_template("hr-salary-1*", &salary));
        assert!(!covers_template("evil-*", &salary));
        assert!(!covers_template("$*", &salary));
        let leading = [None, Some("-audit")];
        assert!(!covers_template("order-*", &leading));
        assert!(covers_template("*-audit", &leading));
        assert!(covers_template("*", &leading));
        let fixed = [Some("shipping-1")];
        assert!(covers_template("shipping-?", &fixed));
        assert!(covers_template("shipping-1", &fixed));
        assert!(!covers_template("shipping-2", &fixed));
        let two = [Some("a-"), None, Some("-b-"), None];
        assert!(covers_template("a-*-b-*", &two));
        assert!(covers_template("a-*", &two));
        assert!(!covers_template("a-*-c-*", &two));
        // Every rendering a covering pattern admits is matched by it.
        for value in ["", "1", "x-y", "é"] {
            let rendered = format!("hr-salary-{value}");
            assert!(matches("hr-salary-*", &rendered));
        }
    }

    #[test]
    fn globs_match_as_documented() {
        assert!(matches("*", "order-1"));
        assert!(matches("order-*", "order-1"));
        assert!(!matches("order-*", "orders"));
        assert!(matches("order-?", "order-é"));
        assert!(!matches("order-?", "order-12"));
        assert!(matches("*-1", "order-1"));
        assert!(matches("a*b*c", "axxbyyc"));
        assert!(!matches("a*b*c", "axxbyy"));
        assert!(matches("exact", "exact"));
        assert!(!matches("exact", "exact2"));
        // `*` never reaches system streams; `$`-patterns only reach them.
        assert!(!matches("*", "$saga-1"));
        assert!(matches("$saga-*", "$saga-1"));
        assert!(!matches("$*", "order-1"));
        // Pathological patterns stay fast.
        let long = "a".repeat(200);
        assert!(!matches(
            &"*a".repeat(50).replace("**", "*"),
            &(long.clone() + "b")
        ));
    }

    #[test]
    fn coverage_of_a_prefix_is_exact() {
        assert!(covers_prefix("*", "order-"));
        assert!(covers_prefix("order-*", "order-"));
        assert!(covers_prefix("ord*", "order-"));
        assert!(covers_prefix("o*-*", "order-"));
        assert!(!covers_prefix("order-1*", "order-"));
        assert!(!covers_prefix("*x*", "order-"));
        assert!(!covers_prefix("o*s", "order-"));
        assert!(!covers_prefix("order-?", "order-"));
        assert!(covers_prefix("*", ""));
        assert!(!covers_prefix("order-*", ""));
        assert!(!covers_prefix("$*", ""));
        assert!(covers_prefix("$*", "$"));
        assert!(!covers_prefix("*", "$"));
    }

    #[test]
    fn some_match_of_a_prefix() {
        assert!(may_match_prefix("order-1", "order-"));
        assert!(may_match_prefix("order-*", "order-"));
        assert!(may_match_prefix("o*", "order-"));
        assert!(may_match_prefix("*", "order-"));
        assert!(!may_match_prefix("payment-*", "order-"));
        assert!(!may_match_prefix("order", "order-"));
        assert!(may_match_prefix("x", ""));
    }

    #[test]
    fn decisions_follow_the_rules_and_deny_the_rest() {
        let rules: Rules = serde_json::from_str(
            r#"{"rules":[
              {"role":"writer","allow":["read","append"],"on":["order-*"]},
              {"role":"reader","allow":["read"]},
              {"role":"ops","allow":["admin"]}
            ]}"#,
        )
        .unwrap();
        rules.validate().unwrap();
        let writer = principal(&["writer"]);
        assert!(writer.may(&rules, Permission::Append, "order-1"));
        assert!(!writer.may(&rules, Permission::Append, "payment-1"));
        assert!(!writer.may(&rules, Permission::Subscribe, "order-1"));
        assert!(writer.may_all(&rules, Permission::Read, "order-", None));
        assert!(!writer.may_all(&rules, Permission::Read, "order-", Some("order")));
        assert!(!writer.may_all(&rules, Permission::Read, "", None));
        assert!(writer.may_some(&rules, Permission::Read, ""));
        let reader = principal(&["reader"]);
        assert!(reader.may(&rules, Permission::Read, "anything"));
        assert!(!reader.may(&rules, Permission::Read, "$audit"));
        assert!(!reader.may(&rules, Permission::Read, "$saga-1"));
        assert!(!reader.holds(&rules, Permission::Admin));
        let ops = principal(&["ops"]);
        assert!(ops.may(&rules, Permission::Read, "$audit"));
        assert!(!principal(&[]).may(&rules, Permission::Read, "order-1"));
        let admin = principal(&["admin"]);
        assert!(admin.may(&rules, Permission::Delete, "$saga-1"));
        assert!(admin.may_all(&rules, Permission::Read, "", None));
    }

    #[test]
    fn bad_rules_are_named() {
        let bad: Rules =
            serde_json::from_str(r#"{"rules":[{"role":"r","allow":[],"on":["*"]}]}"#).unwrap();
        assert!(bad.validate().unwrap_err().contains("rules[0].allow"));
        let bad: Rules =
            serde_json::from_str(r#"{"rules":[{"role":"r","allow":["read"],"on":[""]}]}"#).unwrap();
        assert!(bad.validate().unwrap_err().contains("rules[0].on[0]"));
        let err = serde_json::from_str::<Rules>(r#"{"rules":[{"role":"r","allow":["write"]}]}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `write`"), "{err}");
    }
}
