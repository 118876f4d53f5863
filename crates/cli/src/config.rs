//! Settings for `skald serve`: defaults, then an optional TOML file, then `SKALD_*`
//! environment variables, then command-line flags, each overriding the one before.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;
use skald_core::{Durability, Limits};
use skald_server::HttpConfig;

/// The default listen address: loopback only, so a fresh `skald serve` is never exposed.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7340";

/// The TOML file given with `--config`. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub durability: Option<Durability>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    /// The saga engine: `max_running`, `max_starting`, `[sagas.breaker]`.
    #[serde(default)]
    pub sagas: skald_server::SagaOptions,
    /// Listen beyond loopback without authentication.
    pub insecure: Option<bool>,
    /// TLS on the listener (see docs/security.md).
    pub tls: Option<skald_security::TlsConfig>,
    /// Authentication: API keys, JWT, client certificates.
    #[serde(default)]
    pub auth: skald_security::AuthConfig,
    /// Token buckets per principal and per client address.
    #[serde(default)]
    pub rate_limit: skald_security::RateLimitConfig,
    /// Nodes sharing a PostgreSQL store: how they reach each other, and the lease that gives
    /// the consumer groups and sagas one owner.
    #[serde(default)]
    pub cluster: ClusterConfig,
}

/// The `[cluster]` table, read only with a PostgreSQL store (docs/postgres.md, "Owners across
/// nodes").
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// The URL other nodes reach this one at, such as `http://10.0.0.5:7340` (also
    /// `--advertise` and `SKALD_ADVERTISE`). By default the listen address, or this machine's
    /// host name when it listens on every address.
    pub advertise: Option<String>,
    /// How long the node that runs the groups and sagas holds its lease at a time; another node
    /// takes over within about 4/3 of it after the owner dies.
    pub lease_ms: u64,
    /// PEM roots trusted for other nodes' `https://` addresses (default: the system's).
    pub ca_file: Option<PathBuf>,
    /// This node's client certificate (PEM), shown to the nodes it forwards requests to.
    pub cert_file: Option<PathBuf>,
    /// The key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// The CNs of client certificates that are Skald nodes: their forwarded requests name
    /// their callers (docs/postgres.md, "Nodes that know one another").
    pub nodes: Vec<String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            advertise: None,
            lease_ms: 10_000,
            ca_file: None,
            cert_file: None,
            key_file: None,
            nodes: Vec::new(),
        }
    }
}

impl ClusterConfig {
    /// Checks the settings against each other and the listener's (`tls`, `auth`); errors
    /// name the key.
    pub fn validate(
        &self,
        tls: Option<&skald_security::TlsConfig>,
        auth: &skald_security::AuthConfig,
    ) -> anyhow::Result<()> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            anyhow::bail!(
                "config [cluster]: cert_file and key_file go together (this node's certificate \
                 for the other nodes, and its key)"
            );
        }
        if let Some(bad) = self
            .nodes
            .iter()
            .find(|n| n.trim().is_empty() || n.trim() != *n)
        {
            anyhow::bail!(
                "config [cluster]: nodes holds {bad:?}; each entry is the exact CN of a node's \
                 certificate"
            );
        }
        if let Some(cert) = self.cert_file.as_deref().filter(|_| !self.nodes.is_empty()) {
            let subject = skald_security::tls::certificate_subject(cert, "[cluster] cert_file")
                .map_err(|e| anyhow::anyhow!("config {e}"))?;
            let named = match (
                &subject.common_names[..],
                &subject.unreadable_common_names[..],
            ) {
                ([name], []) => self.nodes.contains(name),
                _ => false,
            };
            if !named {
                anyhow::bail!(
                    "config [cluster]: cert_file {} has the CNs {:?}, and nodes must hold its one \
                     CN: the other nodes recognise this one by it",
                    cert.display(),
                    subject.common_names
                );
            }
            let roles: Vec<&String> = subject
                .organizations
                .iter()
                .filter(|o| skald_security::rules::check_role(o).is_ok())
                .collect();
            if !roles.is_empty() {
                anyhow::bail!(
                    "config [cluster]: cert_file {} gives the roles {roles:?} (its O): a node's \
                     certificate must carry none, since shown directly it names a caller",
                    cert.display()
                );
            }
        }
        if self.cert_file.is_some() && auth.mtls && self.nodes.is_empty() {
            anyhow::bail!(
                "config [cluster]: cert_file with [auth] mtls = true needs nodes, the CNs of \
                 the nodes' certificates: otherwise a node that forwards a request of a caller \
                 it knew by certificate would be taken for the caller itself"
            );
        }
        if !self.nodes.is_empty() && (tls.is_none_or(|t| t.client_ca_file.is_none()) || !auth.mtls)
        {
            anyhow::bail!(
                "config [cluster]: nodes needs [tls] client_ca_file and [auth] mtls = true: a \
                 node is recognised by the client certificate the listener verifies, and \
                 without them no request could come from one"
            );
        }
        if !(500..=600_000).contains(&self.lease_ms) {
            anyhow::bail!(
                "config [cluster]: lease_ms is {}, and must be from 500 (half a second) to \
                 600000 (ten minutes)",
                self.lease_ms
            );
        }
        if let Some(address) = &self.advertise {
            let uri: Option<axum::http::Uri> = address.parse().ok();
            let fine = uri.as_ref().is_some_and(|u| {
                matches!(u.scheme_str(), Some("http" | "https"))
                    && u.authority().is_some()
                    && u.path_and_query().is_none_or(|p| p.as_str() == "/")
            });
            if !fine {
                anyhow::bail!(
                    "config [cluster]: advertise {address:?} must be a URL with a scheme and a \
                     host and nothing after them, such as http://10.0.0.5:7340"
                );
            }
        }
        Ok(())
    }

    /// The address to advertise for a node listening on `listen`, with `scheme`.
    pub fn address(&self, listen: SocketAddr, scheme: &str) -> String {
        if let Some(address) = &self.advertise {
            return address.trim_end_matches('/').to_owned();
        }
        if listen.ip().is_unspecified() {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "localhost".to_owned());
            format!("{scheme}://{host}:{}", listen.port())
        } else {
            format!("{scheme}://{listen}")
        }
    }
}

/// Which engine stores the events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// The embedded engine, in `data_dir`.
    #[default]
    Embedded,
    /// PostgreSQL at `postgres_url` (docs/postgres.md).
    Postgres,
}

/// The `[storage]` table: the backend, and its tuning.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub backend: StoreBackend,
    /// `postgres://user@host:port/database` when `backend = "postgres"`.
    pub postgres_url: Option<String>,
    /// The deadline of every PostgreSQL call, in milliseconds.
    pub postgres_timeout_ms: u64,
    /// Connections each node opens for reads.
    pub postgres_readers: usize,
    pub segment_bytes: u64,
    pub write_queue_capacity: usize,
    pub max_batch_events: usize,
    pub checkpoint_interval_ms: u64,
    pub verify_index_on_open: bool,
}

impl Default for StorageConfig {
    fn default() -> Self {
        let o = skald_storage::Options::default();
        Self {
            backend: StoreBackend::Embedded,
            postgres_url: None,
            postgres_timeout_ms: 5000,
            postgres_readers: 4,
            segment_bytes: o.segment_bytes,
            write_queue_capacity: o.write_queue_capacity,
            max_batch_events: o.max_batch_events,
            checkpoint_interval_ms: o.checkpoint_interval.as_millis() as u64,
            verify_index_on_open: o.verify_index_on_open,
        }
    }
}

impl FileConfig {
    /// Reads and checks a config file; errors name the file and the key.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("config file {} is invalid", path.display()))
    }
}

/// Everything `serve` needs, merged from all sources.
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub http: HttpConfig,
    /// The embedded engine's settings; with PostgreSQL, `data_dir` still holds the initial
    /// admin key's file.
    pub storage: skald_storage::Options,
    /// Set when the events are in PostgreSQL instead.
    pub postgres: Option<skald_postgres::PgOptions>,
    pub sagas: skald_server::SagaOptions,
    pub tls: Option<skald_security::TlsConfig>,
    pub auth: skald_security::AuthConfig,
    pub rate_limit: skald_security::RateLimitConfig,
    pub cluster: ClusterConfig,
}

/// Merges the sources. `flag_*` come from the command line or the environment (clap reads
/// `SKALD_*` for each), which both override the file.
pub fn merge(
    file: FileConfig,
    flag_data_dir: Option<PathBuf>,
    flag_listen: Option<String>,
    flag_durability: Option<Durability>,
    flag_insecure: bool,
    flag_store: Option<String>,
) -> anyhow::Result<ServeConfig> {
    let listen_text = flag_listen
        .or(file.listen)
        .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
    let listen: SocketAddr = listen_text.parse().with_context(|| {
        format!("listen address {listen_text:?} is not of the form IP:PORT, such as 127.0.0.1:7340")
    })?;
    let insecure = flag_insecure || file.insecure.unwrap_or(false);
    if !file.auth.enabled() && !listen.ip().is_loopback() && !insecure {
        anyhow::bail!(
            "refusing to listen on {listen} without authentication: anyone who can reach it \
             could read and write every stream. Turn on [auth] (api_keys, jwt or mtls; see \
             docs/security.md), listen on 127.0.0.1, or pass --insecure if the network is \
             trusted"
        );
    }
    if let Some(jwt) = &file.auth.jwt {
        jwt.validate().map_err(|e| anyhow::anyhow!("config {e}"))?;
    }
    for (key, bucket) in [
        ("per_principal", &file.rate_limit.per_principal),
        ("per_address", &file.rate_limit.per_address),
    ] {
        if let Some(b) = bucket {
            b.validate(key).map_err(|e| anyhow::anyhow!("config {e}"))?;
        }
    }
    file.limits
        .validate()
        .map_err(|e| anyhow::anyhow!("config [limits]: {e}"))?;
    file.http
        .validate()
        .map_err(|e| anyhow::anyhow!("config [http]: {e}"))?;
    let s = file.storage;
    if s.segment_bytes < 4096 || s.write_queue_capacity == 0 || s.max_batch_events == 0 {
        anyhow::bail!(
            "config [storage]: segment_bytes must be at least 4096, write_queue_capacity and \
             max_batch_events at least 1"
        );
    }
    let sagas = file.sagas;
    if sagas.max_running == 0
        || sagas.max_starting == 0
        || sagas.max_starts_per_second == 0
        || sagas.breaker.failure_threshold == 0
    {
        anyhow::bail!(
            "config [sagas]: max_running, max_starting, max_starts_per_second and \
             breaker.failure_threshold must be at least 1"
        );
    }
    file.cluster.validate(file.tls.as_ref(), &file.auth)?;
    skald_saga::egress::Egress::new(&sagas.egress)
        .map_err(|e| anyhow::anyhow!("config [sagas.egress] {e}"))?;
    // Read now, so that a bad file stops the start instead of every saga engine's start (on a
    // shared store, every term's).
    if let Some(ca) = &sagas.ca_file {
        skald_security::tls::client_config(Some(ca), None)
            .map_err(|e| anyhow::anyhow!("config [sagas] ca_file: {e}"))?;
    }
    let durability = flag_durability.or(file.durability).unwrap_or_default();
    let postgres_url = match (flag_store, s.backend, s.postgres_url) {
        (Some(url), _, _) => Some(url),
        (None, StoreBackend::Postgres, Some(url)) => Some(url),
        (None, StoreBackend::Postgres, None) => anyhow::bail!(
            "config [storage]: backend = \"postgres\" needs postgres_url = \"postgres://user@host/db\" \
             (or --store / SKALD_STORE)"
        ),
        (None, StoreBackend::Embedded, Some(_)) => anyhow::bail!(
            "config [storage]: postgres_url is set but backend is \"embedded\": add \
             backend = \"postgres\" to use it, or remove postgres_url"
        ),
        (None, StoreBackend::Embedded, None) => None,
    };
    let postgres = match postgres_url {
        None => None,
        Some(url) => {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                anyhow::bail!(
                    "the store must be a postgres:// URL, such as postgres://skald@db.internal/skald \
                     (the embedded engine is the default, chosen by --data-dir)"
                );
            }
            if s.postgres_timeout_ms == 0 || s.postgres_readers == 0 {
                anyhow::bail!(
                    "config [storage]: postgres_timeout_ms and postgres_readers must be at least 1"
                );
            }
            let url = skald_postgres::PgUrl::parse(&url).map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut options = skald_postgres::PgOptions::new(url);
            options.durability = durability;
            options.limits = file.limits.clone();
            options.timeout = Duration::from_millis(s.postgres_timeout_ms);
            options.readers = s.postgres_readers;
            Some(options)
        }
    };
    Ok(ServeConfig {
        postgres,
        listen,
        sagas,
        tls: file.tls,
        auth: file.auth,
        rate_limit: file.rate_limit,
        cluster: file.cluster,
        http: file.http,
        storage: skald_storage::Options {
            data_dir: flag_data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("skald-data")),
            durability,
            limits: file.limits,
            segment_bytes: s.segment_bytes,
            write_queue_capacity: s.write_queue_capacity,
            max_batch_events: s.max_batch_events,
            checkpoint_interval: Duration::from_millis(s.checkpoint_interval_ms.max(1)),
            verify_index_on_open: s.verify_index_on_open,
            ..skald_storage::Options::default()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let file: FileConfig = toml::from_str(
            "data_dir = \"/from/file\"\nlisten = \"127.0.0.1:9000\"\n[limits]\nmax_events_per_append = 5\n",
        )
        .unwrap();
        let c = merge(file, Some("/from/flag".into()), None, None, false, None).unwrap();
        assert_eq!(c.storage.data_dir, PathBuf::from("/from/flag"));
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.storage.limits.max_events_per_append, 5);
        assert_eq!(c.storage.durability, Durability::Fsync);
    }

    #[test]
    fn a_node_advertises_its_setting_its_listen_address_or_its_host_name() {
        let listen: SocketAddr = "10.0.0.5:7340".parse().unwrap();
        let mut cluster = ClusterConfig::default();
        assert_eq!(cluster.address(listen, "https"), "https://10.0.0.5:7340");
        let any: SocketAddr = "0.0.0.0:7340".parse().unwrap();
        let named = cluster.address(any, "http");
        assert!(
            named.starts_with("http://") && named.ends_with(":7340"),
            "{named}"
        );
        assert!(!named.contains("0.0.0.0"), "{named}");
        cluster.advertise = Some("http://node-1.internal:7340/".into());
        cluster
            .validate(None, &skald_security::AuthConfig::default())
            .unwrap();
        assert_eq!(cluster.address(any, "http"), "http://node-1.internal:7340");
    }

    #[test]
    fn a_nodes_own_certificate_must_be_named_in_nodes_and_give_no_roles() {
        let dir = tempfile::tempdir().unwrap();
        skald_security::tls::write_dev_certificates(dir.path()).unwrap();
        let tls = skald_security::TlsConfig {
            cert_file: dir.path().join("server.pem"),
            key_file: dir.path().join("server-key.pem"),
            client_ca_file: Some(dir.path().join("ca.pem")),
            crl_file: None,
        };
        let auth = skald_security::AuthConfig {
            mtls: true,
            ..Default::default()
        };
        let check = |cert: &str, nodes: &[&str]| {
            ClusterConfig {
                cert_file: Some(dir.path().join(format!("{cert}.pem"))),
                key_file: Some(dir.path().join(format!("{cert}-key.pem"))),
                nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
                ..ClusterConfig::default()
            }
            .validate(Some(&tls), &auth)
            .map_err(|e| e.to_string())
        };
        check("node", &["skald-node"]).unwrap();
        let err = check("node", &["skald-nodes"]).unwrap_err();
        assert!(err.contains("must hold its one CN"), "{err}");
        let err = check("client", &["dev-client"]).unwrap_err();
        assert!(err.contains("roles [\"admin\"]"), "{err}");
        let err = check("missing", &["skald-node"]).unwrap_err();
        assert!(err.contains("[cluster] cert_file"), "{err}");
    }

    #[test]
    fn the_readme_config_parses_and_states_the_defaults() {
        let readme = include_str!("../../../README.md");
        let start = readme
            .find("```toml\n")
            .expect("the README has a config file")
            + 8;
        let end = start + readme[start..].find("```").expect("closed");
        let file: FileConfig = toml::from_str(&readme[start..end]).unwrap();
        let sagas = file.sagas.clone();
        let c = merge(file, None, None, None, false, None).unwrap();
        assert_eq!(c.sagas, skald_server::SagaOptions::default());
        assert_eq!(sagas.breaker.open_for, Duration::from_secs(10));
        assert_eq!(c.storage.limits, Limits::default());
        let err = toml::from_str::<FileConfig>("[sagas.breaker]\nopen_for = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a duration"), "{err}");
        let zero: FileConfig = toml::from_str("[sagas]\nmax_running = 0\n").unwrap();
        let err = merge(zero, None, None, None, false, None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("[sagas]"), "{err}");
    }

    #[test]
    fn bad_config_is_a_clear_error() {
        let err = toml::from_str::<FileConfig>("lisen = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `lisen`"), "{err}");
        let err = toml::from_str::<FileConfig>("durability = \"sometimes\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("durability"), "{err}");
        let err = merge(
            FileConfig::default(),
            None,
            Some("localhost".into()),
            None,
            false,
            None,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("IP:PORT"), "{err}");
        let file: FileConfig = toml::from_str("[limits]\nmax_stream_name_bytes = 0\n").unwrap();
        assert!(merge(file, None, None, None, false, None).is_err());
        // Beyond loopback, no authentication is refused unless insecure is asked for.
        let open = || {
            merge(
                FileConfig::default(),
                None,
                Some("0.0.0.0:7340".into()),
                None,
                false,
                None,
            )
        };
        let err = open().err().unwrap().to_string();
        assert!(
            err.contains("without authentication") && err.contains("--insecure"),
            "{err}"
        );
        assert!(
            merge(
                FileConfig::default(),
                None,
                Some("0.0.0.0:7340".into()),
                None,
                true,
                None
            )
            .is_ok()
        );
        let keys: FileConfig = toml::from_str("[auth]\napi_keys = true\n").unwrap();
        assert!(merge(keys, None, Some("0.0.0.0:7340".into()), None, false, None).is_ok());
        // A file that parses but does not merge: the error.
        let refused = |text: &str| {
            let file: FileConfig = toml::from_str(text).unwrap();
            merge(file, None, None, None, false, None)
                .err()
                .unwrap()
                .to_string()
        };
        let err =
            refused("[auth.jwt]\nissuer = \"i\"\naudience = \"a\"\nalgorithms = [\"HS256\"]\n");
        assert!(
            err.contains("HS256") && err.contains("never accepted"),
            "{err}"
        );
        let err = refused("[rate_limit]\nper_address = { rate = 0, burst = 1 }\n");
        assert!(err.contains("per_address"), "{err}");
        let err = refused("[sagas]\nca_file = \"/no/such/ca.pem\"\n");
        assert!(
            err.contains("[sagas] ca_file") && err.contains("/no/such/ca.pem"),
            "{err}"
        );
        let err = refused("[cluster]\nlease_ms = 100\n");
        assert!(err.contains("lease_ms is 100"), "{err}");
        let err = refused("[cluster]\ncert_file = \"node.pem\"\n");
        assert!(err.contains("cert_file and key_file go together"), "{err}");
        let err = refused(
            "[auth]\nmtls = true\n[cluster]\ncert_file = \"n.pem\"\nkey_file = \"k.pem\"\n",
        );
        assert!(err.contains("needs nodes"), "{err}");
        let err = refused("[cluster]\nnodes = [\" skald-node\"]\n");
        assert!(err.contains("exact CN"), "{err}");
        // Without a listener that verifies client certificates, no request comes from a node.
        let err = refused("[cluster]\nnodes = [\"skald-node\"]\n");
        assert!(
            err.contains("nodes needs [tls] client_ca_file and [auth] mtls"),
            "{err}"
        );
        for bad in [
            "10.0.0.5:7340",
            "ftp://node",
            "http://node:7340/api",
            "http://",
        ] {
            let err = refused(&format!("[cluster]\nadvertise = \"{bad}\"\n"));
            assert!(err.contains("advertise") && err.contains(bad), "{err}");
        }
        let err = refused("[storage]\nbackend = \"postgres\"\n");
        assert!(err.contains("needs postgres_url"), "{err}");
        let err = refused("[storage]\npostgres_url = \"postgres://a@b/c\"\n");
        assert!(err.contains("backend = \"postgres\""), "{err}");
        let err = refused("[storage]\nbackend = \"postgres\"\npostgres_url = \"mysql://a@b/c\"\n");
        assert!(err.contains("postgres:// URL"), "{err}");
        // The password of a URL that does not parse is not repeated.
        let err = merge(
            FileConfig::default(),
            None,
            None,
            None,
            false,
            Some("postgres://ada:s3cret@db:notaport/skald".into()),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            err.contains("does not parse") && !err.contains("s3cret"),
            "{err}"
        );
    }

    #[test]
    fn the_store_flag_chooses_postgres_over_the_file() {
        let file: FileConfig = toml::from_str(
            "durability = \"none\"\n[storage]\npostgres_timeout_ms = 900\npostgres_readers = 2\n",
        )
        .unwrap();
        let c = merge(
            file,
            None,
            None,
            None,
            false,
            Some("postgres://ada:pw@db.internal:5433/skald".into()),
        )
        .unwrap();
        let pg = c.postgres.expect("postgres chosen");
        assert_eq!(pg.url.to_string(), "postgres://ada@db.internal:5433/skald");
        assert_eq!(pg.timeout, Duration::from_millis(900));
        assert_eq!(pg.readers, 2);
        assert_eq!(pg.durability, Durability::None);
        let file: FileConfig = toml::from_str(
            "[storage]\nbackend = \"postgres\"\npostgres_url = \"postgres://a@b/c\"\n",
        )
        .unwrap();
        let c = merge(file, None, None, None, false, None).unwrap();
        assert_eq!(c.postgres.unwrap().url.to_string(), "postgres://a@b:5432/c");
        assert!(
            merge(FileConfig::default(), None, None, None, false, None)
                .unwrap()
                .postgres
                .is_none()
        );
    }
}
