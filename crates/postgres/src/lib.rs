//! Skald on PostgreSQL (issue 24; `docs/postgres.md` is the design): the connection settings,
//! with the password kept out of every message; the versioned schema, created and migrated at
//! start under a lock so that nodes starting together do not race; and [`PgStore`], the
//! `EventStore` over it, which any number of nodes may open on one database.

mod conn;
mod import;
mod lease;
mod schema;
mod shared;
mod store;
mod tailer;
mod tls;
mod writer;

use std::fmt;
use std::str::FromStr;

use skald_core::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_postgres::config::Host;
use tokio_postgres::{AsyncMessage, Client, Connection};

pub use import::Importer;
pub use lease::{Held, Holder, Lease};
pub use tls::RustlsConnector;

pub use conn::PgOptions;
pub use schema::{SCHEMA_VERSION, migrate};
pub use store::PgStore;
/// The PostgreSQL client this crate speaks with.
pub use tokio_postgres;

/// Where the store is: a `postgres://` URL (or a `key=value` connection string), parsed and
/// checked. `Display` shows it without its password.
///
/// TLS: `sslmode=verify-full` (or `require`, which Skald checks just as strictly) connects
/// with rustls and checks the server's certificate and host name against `sslrootcert=FILE`,
/// or the system's roots; `verify-ca` (a certificate for any host) is refused.
#[derive(Clone)]
pub struct PgUrl {
    config: tokio_postgres::Config,
    shown: String,
    tls: Option<RustlsConnector>,
}

impl PgUrl {
    /// Parses `url`. A URL that does not parse is an [`Error::InvalidConfig`] that does not
    /// repeat the URL (it may hold a password).
    pub fn parse(url: &str) -> Result<Self, Error> {
        let (url, tls) = take_tls_settings(url)?;
        let url = url.as_str();
        let config = tokio_postgres::Config::from_str(url).map_err(|e| {
            Error::InvalidConfig(format!(
                "the PostgreSQL URL does not parse ({}): write postgres://user@host:port/database",
                redact(&e.to_string(), url)
            ))
        })?;
        let mut config = config;
        if !url.contains("target_session_attrs") {
            // Of several hosts (a primary and its standbys), only one that takes writes.
            config.target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite);
        }
        if config.get_hosts().is_empty() {
            return Err(Error::InvalidConfig(
                "the PostgreSQL URL names no host: write postgres://user@host:port/database, \
                 or host=/path/of/the/socket/directory"
                    .to_owned(),
            ));
        }
        let mut shown = shown(&config);
        let tls = match tls {
            Tls::Off => None,
            Tls::Verify { ca } => {
                shown.push_str("?sslmode=verify-full");
                Some(RustlsConnector::new(
                    ca.as_deref().map(std::path::Path::new),
                )?)
            }
        };
        Ok(Self { config, shown, tls })
    }

    /// Whether connections use TLS.
    pub fn uses_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The parsed settings.
    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }
}

impl fmt::Display for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgUrl({})", self.shown)
    }
}

/// `postgres://user@host:port/database`, never with the password.
fn shown(config: &tokio_postgres::Config) -> String {
    let user = config
        .get_user()
        .map(|u| format!("{u}@"))
        .unwrap_or_default();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .zip(config.get_ports().iter().chain(std::iter::repeat(&5432)))
        .map(|(host, port)| match host {
            Host::Tcp(name) => format!("{name}:{port}"),
            Host::Unix(path) => format!("[{}]:{port}", path.display()),
        })
        .collect();
    let database = config.get_dbname().unwrap_or("");
    format!("postgres://{user}{}/{database}", hosts.join(","))
}

/// `text` with the password of `url` (if any) blanked out, for errors that quote it.
fn redact(text: &str, url: &str) -> String {
    let password = url
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(credentials, _)| credentials.split_once(':'))
        .map(|(_, password)| password)
        .filter(|p| !p.is_empty());
    match password {
        Some(p) => text.replace(p, "****"),
        None => text.to_owned(),
    }
}

/// Connects to `url` and runs the connection in a task of its own. A server that cannot be
/// reached is [`Error::Unavailable`], with the URL shown without its password.
pub async fn connect(url: &PgUrl) -> Result<Client, Error> {
    connect_listening(url).await.map(|(client, _)| client)
}

/// [`connect`], with the notifications the connection receives (after a `LISTEN`) sent to the
/// receiver as they arrive. The receiver ends when the connection does.
pub(crate) async fn connect_listening(
    url: &PgUrl,
) -> Result<(Client, mpsc::UnboundedReceiver<()>), Error> {
    let unreachable = |e: tokio_postgres::Error| {
        Error::Unavailable(format!("PostgreSQL at {url}: {}", describe(&e)))
    };
    match &url.tls {
        None => {
            let (client, connection) = url
                .config
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(unreachable)?;
            Ok((client, drive(connection)))
        }
        Some(tls) => {
            let (client, connection) =
                url.config.connect(tls.clone()).await.map_err(unreachable)?;
            Ok((client, drive(connection)))
        }
    }
}

/// Runs `connection` in a task of its own, passing on notifications; its errors reach the
/// callers of its client as a closed connection.
fn drive<S, T>(mut connection: Connection<S, T>) -> mpsc::UnboundedReceiver<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (wake, woken) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(_))) => {
                    let _ = wake.send(());
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            }
        }
    });
    woken
}

/// What a URL asks of TLS.
enum Tls {
    /// No TLS.
    Off,
    /// TLS, checking the server against the CA file `ca`, or the system's roots.
    Verify { ca: Option<String> },
}

/// `url` without the TLS settings tokio-postgres does not know (`sslmode=verify-full`,
/// `sslrootcert`), and what it asks of TLS.
fn take_tls_settings(url: &str) -> Result<(String, Tls), Error> {
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    let (head, params): (&str, Vec<&str>) = if is_url {
        match url.split_once('?') {
            Some((head, query)) => (head, query.split('&').collect()),
            None => (url, Vec::new()),
        }
    } else {
        ("", url.split_whitespace().collect())
    };
    let mut mode: Option<String> = None;
    let mut ca: Option<String> = None;
    let mut kept = Vec::new();
    for param in params {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        let value = if is_url {
            percent_decode(value)
        } else {
            value.to_owned()
        };
        match key {
            "sslmode" => mode = Some(value),
            "sslrootcert" => ca = Some(value),
            _ => kept.push(param),
        }
    }
    let tls = match (mode.as_deref(), &ca) {
        (Some("verify-full" | "require"), _) | (None, Some(_)) => true,
        (Some("verify-ca"), _) => {
            return Err(Error::InvalidConfig(
                "sslmode=verify-ca (a certificate for any host name) is not supported: use                  sslmode=verify-full, with sslrootcert=FILE when the CA is not in the system's roots"
                    .to_owned(),
            ));
        }
        (Some("disable" | "prefer" | "allow"), Some(_)) => {
            return Err(Error::InvalidConfig(
                "sslrootcert is given but sslmode does not ask for TLS: use sslmode=verify-full"
                    .to_owned(),
            ));
        }
        (Some("disable" | "prefer" | "allow"), None) | (None, None) => false,
        (Some(other), _) => {
            return Err(Error::InvalidConfig(format!(
                "sslmode={other} is not known: use disable or verify-full"
            )));
        }
    };
    if tls {
        kept.push("sslmode=require");
    } else if mode.as_deref() == Some("disable") {
        kept.push("sslmode=disable");
    }
    let rebuilt = if is_url {
        if kept.is_empty() {
            head.to_owned()
        } else {
            format!("{head}?{}", kept.join("&"))
        }
    } else {
        kept.join(" ")
    };
    Ok((rebuilt, if tls { Tls::Verify { ca } } else { Tls::Off }))
}

/// `%XX` escapes decoded (the URL form of a socket directory or a CA file's path).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(byte) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
        {
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A PostgreSQL error as one line: the server's message and code when it sent one.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}
