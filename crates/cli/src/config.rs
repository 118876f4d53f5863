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
}

/// Engine tuning in the `[storage]` table.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
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
    pub storage: skald_storage::Options,
    pub sagas: skald_server::SagaOptions,
    pub tls: Option<skald_security::TlsConfig>,
    pub auth: skald_security::AuthConfig,
    pub rate_limit: skald_security::RateLimitConfig,
}

/// Merges the sources. `flag_*` come from the command line or the environment (clap reads
/// `SKALD_*` for each), which both override the file.
pub fn merge(
    file: FileConfig,
    flag_data_dir: Option<PathBuf>,
    flag_listen: Option<String>,
    flag_durability: Option<Durability>,
    flag_insecure: bool,
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
    skald_saga::egress::Egress::new(&sagas.egress)
        .map_err(|e| anyhow::anyhow!("config [sagas.egress] {e}"))?;
    Ok(ServeConfig {
        listen,
        sagas,
        tls: file.tls,
        auth: file.auth,
        rate_limit: file.rate_limit,
        http: file.http,
        storage: skald_storage::Options {
            data_dir: flag_data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("skald-data")),
            durability: flag_durability.or(file.durability).unwrap_or_default(),
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
        let c = merge(file, Some("/from/flag".into()), None, None, false).unwrap();
        assert_eq!(c.storage.data_dir, PathBuf::from("/from/flag"));
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.storage.limits.max_events_per_append, 5);
        assert_eq!(c.storage.durability, Durability::Fsync);
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
        let c = merge(file, None, None, None, false).unwrap();
        assert_eq!(c.sagas, skald_server::SagaOptions::default());
        assert_eq!(sagas.breaker.open_for, Duration::from_secs(10));
        assert_eq!(c.storage.limits, Limits::default());
        let err = toml::from_str::<FileConfig>("[sagas.breaker]\nopen_for = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a duration"), "{err}");
        let zero: FileConfig = toml::from_str("[sagas]\nmax_running = 0\n").unwrap();
        let err = merge(zero, None, None, None, false)
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
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("IP:PORT"), "{err}");
        let file: FileConfig = toml::from_str("[limits]\nmax_stream_name_bytes = 0\n").unwrap();
        assert!(merge(file, None, None, None, false).is_err());
        // Beyond loopback, no authentication is refused unless insecure is asked for.
        let open = || {
            merge(
                FileConfig::default(),
                None,
                Some("0.0.0.0:7340".into()),
                None,
                false,
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
                true
            )
            .is_ok()
        );
        let keys: FileConfig = toml::from_str("[auth]\napi_keys = true\n").unwrap();
        assert!(merge(keys, None, Some("0.0.0.0:7340".into()), None, false).is_ok());
        // A file that parses but does not merge: the error.
        let refused = |text: &str| {
            let file: FileConfig = toml::from_str(text).unwrap();
            merge(file, None, None, None, false)
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
    }
}
