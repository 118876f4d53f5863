//! Writing events that already have their positions (`skald migrate`, docs/postgres.md,
//! "Moving an embedded store in"): each page in one transaction under the append lock, at
//! exactly the position the store ends at, so that an interrupted copy leaves a prefix and
//! nothing else can interleave with it.

use skald_core::{Error, RecordedEvent};
use tokio_postgres::Client;

use crate::{PgUrl, connect, describe};

/// A connection that writes pages of events with their positions, revisions, ids and times.
pub struct Importer {
    client: Client,
    url: PgUrl,
}

const EVENTS: &str = "
    SELECT x.*, (sum(x.tc) OVER (ORDER BY x.k) - x.tc)::int AS t0
    FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[], $5::uuid[], $6::text[],
                $7::text[], $8::bytea[], $9::text[], $10::text[], $11::bigint[], $13::int[])
         WITH ORDINALITY AS x(position, stream, revision, category, id, type, content_type,
                              data, metadata, source, recorded_at, tc, k)";

impl Importer {
    /// Connects to `url`; the schema must exist (open a `PgStore` first, which creates it).
    pub async fn connect(url: &PgUrl) -> Result<Self, Error> {
        Ok(Self {
            client: connect(url).await?,
            url: url.clone(),
        })
    }

    /// Writes `events`, which must start at the position the store ends at and follow one
    /// another, in one transaction. Refused, with nothing written, when the store ends
    /// elsewhere (something else wrote to it).
    pub async fn write(&mut self, events: &[RecordedEvent]) -> Result<(), Error> {
        let Some(first) = events.first() else {
            return Ok(());
        };
        let failed = |what: &str, e: tokio_postgres::Error| {
            Error::Unavailable(format!(
                "PostgreSQL at {}, {what}: {}",
                self.url,
                describe(&e)
            ))
        };
        let mut columns = Columns::default();
        for (i, e) in events.iter().enumerate() {
            if e.position.0 != first.position.0 + i as u64 {
                return Err(Error::invalid(format!(
                    "the events to import skip from position {} to {}",
                    first.position.0 + i as u64 - 1,
                    e.position.0
                )));
            }
            columns.push(e);
        }
        let last = events.last().expect("not empty");
        let url = self.url.clone();
        let tx = self
            .client
            .transaction()
            .await
            .map_err(|e| failed("beginning", e))?;
        tx.batch_execute(
            "SET TRANSACTION ISOLATION LEVEL READ COMMITTED; \
             SET LOCAL synchronous_commit = on; SET LOCAL statement_timeout = '60s'; \
             SET LOCAL lock_timeout = '60s'; \
             SELECT pg_advisory_xact_lock(hashtext('skald.append'))",
        )
        .await
        .map_err(|e| failed("taking the append lock", e))?;
        let next: i64 = tx
            .query_one("SELECT next_position FROM skald.head WHERE id = 1", &[])
            .await
            .map_err(|e| failed("reading the head", e))?
            .get(0);
        if next as u64 != first.position.0 {
            return Err(Error::InvalidConfig(format!(
                "the store in PostgreSQL at {url} ends at position {next}, but the next event to \
                 copy is at position {}: something else writes to it; stop every Skald node on \
                 it during the migration",
                first.position.0
            )));
        }
        let c = &columns;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 13] = [
            &c.position,
            &c.stream,
            &c.revision,
            &c.category,
            &c.id,
            &c.event_type,
            &c.content_type,
            &c.data,
            &c.metadata,
            &c.source,
            &c.recorded_at,
            &c.tag,
            &c.tag_count,
        ];
        tx.execute(
            &format!(
                "INSERT INTO skald.events SELECT u.position, u.stream, u.revision, u.category, \
                 u.id, u.type, u.content_type, u.data, u.metadata, \
                 coalesce(($12::text[])[u.t0 + 1 : u.t0 + u.tc], '{{}}'), u.source, \
                 u.recorded_at, u.position FROM ({EVENTS}) u ORDER BY u.position"
            ),
            &params,
        )
        .await
        .map_err(|e| failed("writing events", e))?;
        tx.execute(
            &format!(
                "INSERT INTO skald.event_tags SELECT DISTINCT t.tag, u.position FROM ({EVENTS}) u \
                 CROSS JOIN LATERAL unnest(($12::text[])[u.t0 + 1 : u.t0 + u.tc]) AS t(tag)"
            ),
            &params,
        )
        .await
        .map_err(|e| failed("writing tags", e))?;
        tx.execute(
            "INSERT INTO skald.streams \
             SELECT DISTINCT ON (x.stream) x.stream, x.revision, x.position \
             FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS x(position, stream, revision) \
             ORDER BY x.stream, x.position DESC \
             ON CONFLICT (stream) DO UPDATE \
             SET last_revision = excluded.last_revision, last_position = excluded.last_position",
            &[&c.position, &c.stream, &c.revision],
        )
        .await
        .map_err(|e| failed("writing streams", e))?;
        let end = last.position.0 as i64 + 1;
        let time = c.recorded_at.iter().copied().max().unwrap_or(0);
        tx.execute(
            "UPDATE skald.head SET next_position = $1, recorded_at = greatest(recorded_at, $2) \
             WHERE id = 1",
            &[&end, &time],
        )
        .await
        .map_err(|e| failed("advancing the head", e))?;
        tx.commit().await.map_err(|e| failed("committing", e))
    }
}

impl Importer {
    /// Marks the store as being imported into: nodes refuse to start on it until
    /// [`Importer::finish`]. Refused while any Skald node is connected to the database.
    pub async fn begin(&self, from: &str) -> Result<(), Error> {
        let failed = |e: tokio_postgres::Error| {
            Error::Unavailable(format!("PostgreSQL at {}: {}", self.url, describe(&e)))
        };
        let nodes: i64 = self
            .client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND application_name LIKE 'skald %' AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .map_err(failed)?
            .get(0);
        if nodes > 0 {
            return Err(Error::InvalidConfig(format!(
                "{nodes} connections of running Skald nodes are open on PostgreSQL at {}: stop \
                 every node before migrating into it",
                self.url
            )));
        }
        self.client
            .execute(
                "INSERT INTO skald.meta VALUES ('importing', $1) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[&from],
            )
            .await
            .map_err(failed)?;
        Ok(())
    }

    /// Checks what the events imply of the other tables (the stream rows, the tag rows, the
    /// head), then lets nodes start on the store again.
    pub async fn finish(&self) -> Result<(), Error> {
        let failed = |e: tokio_postgres::Error| {
            Error::Unavailable(format!("PostgreSQL at {}: {}", self.url, describe(&e)))
        };
        let row = self
            .client
            .query_one(
                "SELECT (SELECT count(*) FROM skald.events), \
                        (SELECT next_position FROM skald.head WHERE id = 1), \
                        (SELECT count(*) FROM (SELECT DISTINCT ON (stream) stream, revision, \
                             position FROM skald.events ORDER BY stream, position DESC) l \
                         FULL JOIN skald.streams s USING (stream) \
                         WHERE l.stream IS NULL OR s.stream IS NULL \
                            OR s.last_revision <> l.revision OR s.last_position <> l.position), \
                        (SELECT count(*) FROM skald.event_tags), \
                        (SELECT coalesce(sum((SELECT count(DISTINCT t) FROM unnest(e.tags) t)), 0) \
                         FROM skald.events e)::bigint",
                &[],
            )
            .await
            .map_err(failed)?;
        let (events, head, streams, tags, expected_tags): (i64, i64, i64, i64, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        let mut wrong = Vec::new();
        if head != events {
            wrong.push(format!(
                "the head says {head} events, the table holds {events}"
            ));
        }
        if streams != 0 {
            wrong.push(format!("{streams} stream rows disagree with their events"));
        }
        if tags != expected_tags {
            wrong.push(format!(
                "{tags} tag rows where the events carry {expected_tags} tags"
            ));
        }
        if !wrong.is_empty() {
            return Err(Error::Corruption {
                file: format!("the store in PostgreSQL at {}", self.url),
                offset: 0,
                reason: wrong.join("; "),
            });
        }
        self.client
            .execute("DELETE FROM skald.meta WHERE key = 'importing'", &[])
            .await
            .map_err(failed)?;
        Ok(())
    }
}

/// A page of events as the arrays the statements take.
#[derive(Default)]
struct Columns {
    position: Vec<i64>,
    stream: Vec<String>,
    revision: Vec<i64>,
    category: Vec<String>,
    id: Vec<uuid::Uuid>,
    event_type: Vec<String>,
    content_type: Vec<String>,
    data: Vec<Vec<u8>>,
    metadata: Vec<String>,
    source: Vec<Option<String>>,
    recorded_at: Vec<i64>,
    tag: Vec<String>,
    tag_count: Vec<i32>,
}

impl Columns {
    fn push(&mut self, e: &RecordedEvent) {
        self.position.push(e.position.0 as i64);
        self.stream.push(e.stream.as_str().to_owned());
        self.revision.push(e.revision.0 as i64);
        self.category.push(e.stream.category_str().to_owned());
        self.id.push(e.id.0);
        self.event_type.push(e.event_type.as_str().to_owned());
        self.content_type.push(e.data.content_type().to_owned());
        self.data.push(e.data.bytes().to_vec());
        self.metadata.push(e.metadata.as_str().to_owned());
        self.source.push(e.source.clone());
        self.recorded_at.push(e.recorded_at.0);
        self.tag_count.push(e.tags.len() as i32);
        self.tag
            .extend(e.tags.iter().map(|t| t.as_str().to_owned()));
    }
}
