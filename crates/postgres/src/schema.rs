//! The versioned schema of `docs/postgres.md`: each version is a list of statements, applied
//! in one transaction under a transaction-scoped advisory lock, so that several nodes starting
//! at once apply each step once (the others wait, then find it done). Works through PgBouncer
//! in transaction mode: nothing here holds a session lock.

use skald_core::Error;

use crate::describe;

/// The newest schema this build knows.
pub const SCHEMA_VERSION: i32 = 1;

/// The key of the advisory lock migrations take.
const LOCK: &str = "skald.schema";

/// The statements that take the schema from version `n - 1` to `n`, at index `n - 1`.
const STEPS: &[&[&str]] = &[&[
    "CREATE TABLE skald.head (
         id            smallint PRIMARY KEY CHECK (id = 1),
         next_position bigint NOT NULL
     )",
    "INSERT INTO skald.head VALUES (1, 0)",
    "CREATE TABLE skald.events (
         position     bigint PRIMARY KEY,
         stream       text   NOT NULL,
         revision     bigint NOT NULL,
         category     text   NOT NULL,
         id           uuid   NOT NULL UNIQUE,
         type         text   NOT NULL,
         content_type text   NOT NULL,
         data         bytea  NOT NULL,
         metadata     text   NOT NULL,
         tags         text[] NOT NULL,
         source       text,
         recorded_at  bigint NOT NULL,
         append_first bigint NOT NULL,
         UNIQUE (stream, revision)
     )",
    "CREATE INDEX events_category ON skald.events (category, position)",
    "CREATE INDEX events_type ON skald.events (type, position)",
    "CREATE TABLE skald.event_tags (
         tag      text   NOT NULL,
         position bigint NOT NULL REFERENCES skald.events (position),
         PRIMARY KEY (tag, position)
     )",
    "CREATE TABLE skald.streams (
         stream        text PRIMARY KEY,
         last_revision bigint NOT NULL,
         last_position bigint NOT NULL
     )",
    "CREATE TABLE skald.leases (
         name       text PRIMARY KEY,
         owner      text NOT NULL,
         fence      bigint NOT NULL,
         expires_at timestamptz NOT NULL
     )",
]];

/// Brings the schema to [`SCHEMA_VERSION`] and returns the version it found. A schema newer
/// than this build knows is refused with the version found, and nothing is changed.
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<i32, Error> {
    let failed = |what: &str, e: tokio_postgres::Error| {
        Error::Unavailable(format!("migrating the schema, {what}: {}", describe(&e)))
    };
    let tx = client
        .transaction()
        .await
        .map_err(|e| failed("beginning", e))?;
    tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&LOCK])
        .await
        .map_err(|e| failed("taking the lock", e))?;
    tx.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS skald;
         CREATE TABLE IF NOT EXISTS skald.meta (key text PRIMARY KEY, value text NOT NULL);",
    )
    .await
    .map_err(|e| failed("creating skald.meta", e))?;
    let found: i32 = match tx
        .query_opt(
            "SELECT value FROM skald.meta WHERE key = 'schema_version'",
            &[],
        )
        .await
        .map_err(|e| failed("reading the version", e))?
    {
        None => 0,
        Some(row) => {
            let text: String = row.get(0);
            text.parse().map_err(|_| Error::Corruption {
                file: "skald.meta".to_owned(),
                offset: 0,
                reason: format!("schema_version is {text:?}, not a number"),
            })?
        }
    };
    if found > SCHEMA_VERSION {
        return Err(Error::InvalidConfig(format!(
            "the PostgreSQL schema is at version {found}, and this Skald knows up to version \
             {SCHEMA_VERSION}: run a Skald at least as new as the one that wrote it"
        )));
    }
    for version in found + 1..=SCHEMA_VERSION {
        for statement in STEPS[(version - 1) as usize] {
            tx.batch_execute(statement)
                .await
                .map_err(|e| failed(&format!("step {version}"), e))?;
        }
    }
    if found < SCHEMA_VERSION {
        tx.execute(
            "INSERT INTO skald.meta VALUES ('schema_version', $1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&SCHEMA_VERSION.to_string()],
        )
        .await
        .map_err(|e| failed("recording the version", e))?;
    }
    tx.commit().await.map_err(|e| failed("committing", e))?;
    Ok(found)
}
