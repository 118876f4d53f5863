//! Where `http` steps may connect: the `[sagas.egress]` policy (`docs/security.md`, "Sagas run
//! with their registrant's rights"). Checked on every address a host name resolves to, at
//! connection time, and on literal addresses in the URL.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use serde::{Deserialize, Serialize};

/// Addresses never connected to, whatever the policy lists: the cloud metadata services.
const METADATA: [IpAddr; 2] = [
    IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254)),
    IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)),
];

/// Most entries in `allow`.
const MAX_ENTRIES: usize = 256;

/// The hosts and networks `http` steps may reach beyond the public internet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressPolicy {
    /// Host names, addresses, or networks (`10.0.0.0/8`, `fd00::/8`).
    #[serde(default)]
    pub allow: Vec<String>,
}

/// One `allow` entry, parsed.
#[derive(Clone, Debug)]
enum Entry {
    Host(String),
    Network(IpAddr, u8),
}

impl Entry {
    fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Some((address, bits)) = text.split_once('/') {
            let address: IpAddr = address
                .parse()
                .map_err(|_| format!("{text:?}: {address:?} is not an IP address"))?;
            let max = if address.is_ipv4() { 32 } else { 128 };
            let bits: u8 = bits
                .parse()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {max}"))?;
            return Ok(Self::Network(address, bits));
        }
        if let Ok(address) = text.parse::<IpAddr>() {
            let bits = if address.is_ipv4() { 32 } else { 128 };
            return Ok(Self::Network(address, bits));
        }
        let valid = !text.is_empty()
            && text.len() <= 253
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
        if valid {
            Ok(Self::Host(text.to_ascii_lowercase()))
        } else {
            Err(format!(
                "{text:?} is not a host name, an IP address or a network such as 10.0.0.0/8"
            ))
        }
    }

    fn contains(&self, address: IpAddr) -> bool {
        match (self, address) {
            (Self::Network(IpAddr::V4(net), bits), IpAddr::V4(a)) => {
                prefix_eq(&net.octets(), &a.octets(), *bits)
            }
            (Self::Network(IpAddr::V6(net), bits), IpAddr::V6(a)) => {
                prefix_eq(&net.octets(), &a.octets(), *bits)
            }
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let (whole, rest) = ((bits / 8) as usize, bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        a[whole] & mask == b[whole] & mask
    }
}

/// Not on the public internet: refused unless the policy lists it.
fn internal(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(a) => {
            let [x, y, ..] = a.octets();
            a.is_loopback()
                || a.is_private()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_multicast()
                || a.is_broadcast()
                || x == 0
                || (x == 100 && (64..128).contains(&y))
        }
        IpAddr::V6(a) => {
            let first = a.segments()[0];
            a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
        }
    }
}

/// The IPv4 address an IPv6 address reaches through a translator or tunnel, judged as that
/// IPv4 address: NAT64 (`64:ff9b::/96`), 6to4 (`2002::/16`) and the old IPv4-compatible form
/// (`::a.b.c.d`).
fn embedded_v4(a: std::net::Ipv6Addr) -> Option<std::net::Ipv4Addr> {
    let o = a.octets();
    let s = a.segments();
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(std::net::Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    if s[0] == 0x2002 {
        return Some(std::net::Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    if s[..6] == [0; 6] && !a.is_loopback() && !a.is_unspecified() {
        return Some(std::net::Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    None
}

/// The policy, parsed.
#[derive(Clone, Debug)]
pub struct Egress {
    entries: Vec<Entry>,
}

impl Egress {
    /// Parses the policy; the error names the entry.
    pub fn new(policy: &EgressPolicy) -> Result<Self, String> {
        if policy.allow.len() > MAX_ENTRIES {
            return Err(format!("allow lists more than {MAX_ENTRIES} entries"));
        }
        let entries = policy
            .allow
            .iter()
            .map(|e| Entry::parse(e).map_err(|why| format!("allow: {why}")))
            .collect::<Result<_, _>>()?;
        Ok(Self { entries })
    }

    /// Whether a step may connect to `address`, reached by the name `host`.
    pub fn allows(&self, host: &str, address: IpAddr) -> bool {
        let address = match address.to_canonical() {
            IpAddr::V6(a) => embedded_v4(a).map_or(IpAddr::V6(a), IpAddr::V4),
            v4 => v4,
        };
        if METADATA.contains(&address) {
            return false;
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let listed = self.entries.iter().any(|e| match e {
            Entry::Host(h) => *h == host,
            network => network.contains(address),
        });
        listed || !internal(address)
    }
}

/// The error a refused connection carries, found again in the client's error chain.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

impl Refused {
    fn of(host: &str, addresses: &[SocketAddr]) -> Self {
        let listed: Vec<String> = addresses.iter().map(|a| a.ip().to_string()).collect();
        Self(format!(
            "the egress policy refuses {host} ({}): private, loopback and link-local addresses \
             need an entry in [sagas.egress] allow, and metadata addresses are never reached",
            if listed.is_empty() {
                "no address".to_owned()
            } else {
                listed.join(", ")
            }
        ))
    }
}

/// The system resolver, with every address checked against the policy.
#[derive(Clone)]
pub struct EgressResolver {
    egress: Arc<Egress>,
    inner: GaiResolver,
}

impl EgressResolver {
    pub fn new(egress: Arc<Egress>) -> Self {
        Self {
            egress,
            inner: GaiResolver::new(),
        }
    }
}

type Resolved = std::vec::IntoIter<SocketAddr>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Name> for EgressResolver {
    type Response = Resolved;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Resolved, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let egress = Arc::clone(&self.egress);
        let lookup = self.inner.call(name.clone());
        Box::pin(async move {
            let all: Vec<SocketAddr> = lookup.await?.collect();
            let allowed: Vec<SocketAddr> = all
                .iter()
                .copied()
                .filter(|a| egress.allows(name.as_str(), a.ip()))
                .collect();
            if allowed.is_empty() {
                return Err(Box::new(Refused::of(name.as_str(), &all)) as BoxError);
            }
            Ok(allowed.into_iter())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn egress(allow: &[&str]) -> Egress {
        Egress::new(&EgressPolicy {
            allow: allow.iter().map(|s| s.to_string()).collect(),
        })
        .unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn internal_addresses_need_an_entry_and_metadata_is_never_reached() {
        let none = egress(&[]);
        assert!(none.allows("example.com", ip("93.184.216.34")));
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd12::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:5",
            "64:ff9b::7f00:1",
            "2002:a00:1::1",
            "::10.0.0.1",
            "::169.254.169.254",
        ] {
            assert!(!none.allows("host", ip(internal)), "{internal}");
        }
        let some = egress(&["127.0.0.1", "10.20.0.0/16", "inventory.internal"]);
        assert!(some.allows("localhost", ip("127.0.0.1")));
        assert!(some.allows("localhost", ip("::ffff:127.0.0.1")));
        assert!(!some.allows("localhost", ip("127.0.0.2")));
        assert!(some.allows("x", ip("10.20.9.9")));
        assert!(!some.allows("x", ip("10.21.0.1")));
        assert!(some.allows("Inventory.Internal.", ip("10.99.0.1")));
        let wide = egress(&["169.254.0.0/16", "0.0.0.0/0", "metadata"]);
        assert!(!wide.allows("metadata", ip("169.254.169.254")));
        assert!(!wide.allows("x", ip("::ffff:169.254.169.254")));
        assert!(!wide.allows("x", ip("64:ff9b::a9fe:a9fe")));
        assert!(
            none.allows("x", ip("64:ff9b::5db8:d822")),
            "a public IPv4 through NAT64"
        );
        assert!(wide.allows("x", ip("169.254.1.1")));
    }

    #[test]
    fn bad_entries_are_refused_naming_them() {
        for bad in ["10.0.0.0/33", "not a host", "1.2.3.4/x", "::/129", ""] {
            let e = Egress::new(&EgressPolicy {
                allow: vec![bad.to_owned()],
            });
            assert!(e.is_err(), "{bad:?}");
        }
    }
}
