//! Skald on PostgreSQL (issue 24; `docs/postgres.md` is the design): the connection settings,
//! with the password kept out of every message; the versioned schema, created and migrated at
//! start under a lock so that nodes starting together do not race; and [`PgStore`], the
//! `EventStore` over it, which any number of nodes may open on one database.

mod schema;
mod store;

use std::fmt;
use std::str::FromStr;

use skald_core::Error;
use tokio_postgres::config::Host;

pub use schema::{SCHEMA_VERSION, migrate};
pub use store::{PgOptions, PgStore};
/// The PostgreSQL client this crate speaks with.
pub use tokio_postgres;

/// Where the store is: a `postgres://` URL (or a `key=value` connection string), parsed and
/// checked. `Display` shows it without its password.
#[derive(Clone)]
pub struct PgUrl {
    config: tokio_postgres::Config,
    shown: String,
}

impl PgUrl {
    /// Parses `url`. A URL that does not parse is an [`Error::InvalidConfig`] that does not
    /// repeat the URL (it may hold a password).
    pub fn parse(url: &str) -> Result<Self, Error> {
        let config = tokio_postgres::Config::from_str(url).map_err(|e| {
            Error::InvalidConfig(format!(
                "the PostgreSQL URL does not parse ({}): write postgres://user@host:port/database",
                redact(&e.to_string(), url)
            ))
        })?;
        if config.get_hosts().is_empty() {
            return Err(Error::InvalidConfig(
                "the PostgreSQL URL names no host: write postgres://user@host:port/database, \
                 or host=/path/of/the/socket/directory"
                    .to_owned(),
            ));
        }
        let shown = shown(&config);
        Ok(Self { config, shown })
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
pub async fn connect(url: &PgUrl) -> Result<tokio_postgres::Client, Error> {
    let (client, connection) = url
        .config
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| Error::Unavailable(format!("PostgreSQL at {url}: {}", describe(&e))))?;
    tokio::spawn(async move {
        // The error reaches the callers of the client as a closed connection.
        let _ = connection.await;
    });
    Ok(client)
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
