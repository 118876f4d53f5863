//! The versioned schema of `docs/postgres.md`: each version is a list of statements, applied
//! in one transaction under a transaction-scoped advisory lock, so that several nodes starting
//! at once apply each step once (the others wait, then find it done). Works through PgBouncer
//! in transaction mode: nothing here holds a session lock.

use skald_core::Error;

use crate::describe;

/// The newest schema this build knows.
pub const SCHEMA_VERSION: i32 = 2;

/// The key of the advisory lock migrations take.
const LOCK: &str = "skald.schema";

/// The statements that take the schema from version `n - 1` to `n`, at index `n - 1`.
const STEPS: &[&[&str]] = &[
    // 1: the event store, and leases.
    &[
        "CREATE TABLE skald.head (
         id            smallint PRIMARY KEY CHECK (id = 1),
         next_position bigint NOT NULL,
         recorded_at   bigint NOT NULL DEFAULT 0
     )",
        "INSERT INTO skald.head VALUES (1, 0, 0)",
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
        APPEND_FUNCTION,
    ],
    // 2: where a lease's holder can be reached, so that other nodes forward it their requests.
    &["ALTER TABLE skald.leases ADD COLUMN address text NOT NULL DEFAULT ''"],
];

/// `skald.append` (docs/postgres.md, "The append function"): one batch of appends in one
/// transaction, serialized by an advisory lock. Each append is one slice of the event arrays
/// (`a_count` events each) and of the tag array (`e_tag_count` tags per event). One row per
/// append answers it, in order: `ok` (its first position and revision), `stored` (some of its
/// ids are stored: their positions, and nothing written), `wrong-revision` (the stream's last
/// revision, null for no stream) or `condition-failed` (the first matching position).
///
/// Decided append by append in memory (the ids stored before the batch and the streams' last
/// revisions are read once), and written set-based: the appends decided so far are inserted in
/// three statements before a DCB condition is checked (so that it sees them), before the
/// stored events of an id an earlier append of the batch wrote are looked up, and at the end.
///
/// Its names resolve only in pg_catalog (its own tables are qualified), so that nothing a role
/// creates on the search path can stand in for an operator it uses. Its statements are planned
/// for each call's arrays and never with a sequential scan: a plan cached for the session,
/// chosen while the tables were small, scanned `events` whole to look ids up, and a batch's 64
/// stream names made the planner scan `streams` whole (measured: a sequential scan per call,
/// 4,300 events/s instead of 12,250).
const APPEND_FUNCTION: &str = r#"
CREATE FUNCTION skald.append(
    p_now bigint,
    a_stream text[], a_category text[], a_expected bigint[], a_count int[], a_condition text[],
    e_id uuid[], e_type text[], e_content_type text[], e_data bytea[], e_metadata text[],
    e_source text[], e_tag_count int[], t_tag text[]
) RETURNS TABLE (kind text, at bigint, revision bigint, stored bigint[])
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_custom_plan
SET enable_seqscan = off
AS $fn$
DECLARE
    appends int := coalesce(cardinality(a_stream), 0);
    next_pos bigint;
    now_us bigint;
    stored_ids uuid[];
    batch_ids uuid[] := '{}';
    start_pos bigint;
    revs jsonb;
    a_ev0 int[];
    t_start int[];
    first_pos bigint[] := '{}';
    first_rev bigint[] := '{}';
    flushed int := 0;
    n int;
    ev0 int;
    last_rev bigint;
    expected bigint;
    cond jsonb;
    item jsonb;
    from_pos bigint;
    hit bigint;
    best bigint;
    item_types text[];
    item_tags text[];
BEGIN
    -- Every append transaction of every node takes this lock first, so they run one at a
    -- time and commit in position order (docs/postgres.md, "Why no reader skips an event").
    PERFORM pg_advisory_xact_lock(hashtext('skald.append'));
    SELECT h.next_position, greatest(h.recorded_at, p_now) INTO next_pos, now_us
        FROM skald.head h WHERE h.id = 1;
    start_pos := next_pos;
    stored_ids := ARRAY(SELECT e.id FROM skald.events e WHERE e.id = ANY (e_id));
    SELECT coalesce(jsonb_object_agg(s.stream, s.last_revision), '{}'::jsonb) INTO revs
        FROM skald.streams s WHERE s.stream = ANY (a_stream);
    -- Where each append's events and each event's tags start in the arrays.
    a_ev0 := ARRAY(SELECT (sum(c) OVER (ORDER BY k) - c)::int
                   FROM unnest(a_count) WITH ORDINALITY AS t(c, k) ORDER BY k);
    t_start := ARRAY(SELECT (sum(c) OVER (ORDER BY k) - c)::int
                     FROM unnest(e_tag_count) WITH ORDINALITY AS t(c, k) ORDER BY k);
    FOR i IN 1 .. appends + 1 LOOP
        -- Before a condition is checked, before the events of an id this batch wrote are
        -- looked up, and at the end: write what is decided so far.
        IF flushed < i - 1 AND (i > appends OR a_condition[i] IS NOT NULL
                OR batch_ids && e_id[a_ev0[i] + 1 : a_ev0[i] + a_count[i]]) THEN
            INSERT INTO skald.events
                SELECT first_pos[a.app] + g.idx, a_stream[a.app], first_rev[a.app] + g.idx,
                       a_category[a.app], e_id[x.k], e_type[x.k], e_content_type[x.k],
                       e_data[x.k], e_metadata[x.k],
                       coalesce(t_tag[t_start[x.k] + 1 : t_start[x.k] + e_tag_count[x.k]], '{}'),
                       e_source[x.k], now_us, first_pos[a.app]
                FROM generate_series(flushed + 1, i - 1) AS a(app)
                CROSS JOIN LATERAL generate_series(0, a_count[a.app] - 1) AS g(idx)
                CROSS JOIN LATERAL (SELECT a_ev0[a.app] + g.idx + 1 AS k) x
                WHERE first_pos[a.app] IS NOT NULL
                ORDER BY 1;
            INSERT INTO skald.event_tags
                SELECT DISTINCT t.tag, first_pos[a.app] + g.idx
                FROM generate_series(flushed + 1, i - 1) AS a(app)
                CROSS JOIN LATERAL generate_series(0, a_count[a.app] - 1) AS g(idx)
                CROSS JOIN LATERAL (SELECT a_ev0[a.app] + g.idx + 1 AS k) x
                CROSS JOIN LATERAL unnest(t_tag[t_start[x.k] + 1 : t_start[x.k] + e_tag_count[x.k]]) AS t(tag)
                WHERE first_pos[a.app] IS NOT NULL;
            INSERT INTO skald.streams
                SELECT DISTINCT ON (a_stream[a.app]) a_stream[a.app],
                       first_rev[a.app] + a_count[a.app] - 1, first_pos[a.app] + a_count[a.app] - 1
                FROM generate_series(flushed + 1, i - 1) AS a(app)
                WHERE first_pos[a.app] IS NOT NULL
                ORDER BY a_stream[a.app], a.app DESC
                ON CONFLICT (stream) DO UPDATE
                SET last_revision = excluded.last_revision, last_position = excluded.last_position;
            flushed := i - 1;
        END IF;
        EXIT WHEN i > appends;

        n := a_count[i];
        ev0 := a_ev0[i];
        kind := NULL; at := NULL; revision := NULL; stored := NULL;
        -- Ids stored before the batch, or by its earlier appends (a node may send a retry in
        -- the same batch as its original).
        IF (stored_ids || batch_ids) && e_id[ev0 + 1 : ev0 + n] THEN
            stored := ARRAY(SELECT e.position FROM skald.events e
                            WHERE e.id = ANY (e_id[ev0 + 1 : ev0 + n]));
            kind := 'stored';
            RETURN NEXT;
            CONTINUE;
        END IF;

        last_rev := (revs ->> a_stream[i])::bigint;
        expected := a_expected[i];
        IF (expected = -2 AND last_rev IS NOT NULL)
            OR (expected = -3 AND last_rev IS NULL)
            OR (expected >= 0 AND last_rev IS DISTINCT FROM expected) THEN
            kind := 'wrong-revision';
            revision := last_rev;
            RETURN NEXT;
            CONTINUE;
        END IF;

        IF a_condition[i] IS NOT NULL THEN
            cond := a_condition[i]::jsonb;
            from_pos := coalesce((cond ->> 'after')::bigint + 1, 0);
            best := NULL;
            FOR item IN SELECT * FROM jsonb_array_elements(cond -> 'items') LOOP
                item_types := ARRAY(SELECT jsonb_array_elements_text(item -> 'types'));
                item_tags := ARRAY(SELECT jsonb_array_elements_text(item -> 'tags'));
                hit := NULL;
                -- Events of system streams ($...) never decide a condition.
                IF cardinality(item_tags) > 0 THEN
                    SELECT t.position INTO hit
                        FROM skald.event_tags t JOIN skald.events e ON e.position = t.position
                        WHERE t.tag = item_tags[1] AND t.position >= from_pos
                          AND e.tags @> item_tags
                          AND (cardinality(item_types) = 0 OR e.type = ANY (item_types))
                          AND left(e.stream, 1) <> '$'
                        ORDER BY t.position LIMIT 1;
                ELSIF cardinality(item_types) > 0 THEN
                    SELECT e.position INTO hit FROM skald.events e
                        WHERE e.type = ANY (item_types) AND e.position >= from_pos
                          AND left(e.stream, 1) <> '$'
                        ORDER BY e.position LIMIT 1;
                ELSE
                    SELECT e.position INTO hit FROM skald.events e
                        WHERE e.position >= from_pos AND left(e.stream, 1) <> '$'
                        ORDER BY e.position LIMIT 1;
                END IF;
                IF hit IS NOT NULL AND (best IS NULL OR hit < best) THEN
                    best := hit;
                END IF;
            END LOOP;
            IF best IS NOT NULL THEN
                kind := 'condition-failed';
                at := best;
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;

        first_pos[i] := next_pos;
        first_rev[i] := coalesce(last_rev + 1, 0);
        batch_ids := batch_ids || e_id[ev0 + 1 : ev0 + n];
        revs := jsonb_set(revs, ARRAY[a_stream[i]], to_jsonb(first_rev[i] + n - 1));
        next_pos := next_pos + n;
        kind := 'ok';
        at := first_pos[i];
        revision := first_rev[i];
        RETURN NEXT;
    END LOOP;
    -- A batch that wrote nothing leaves the head, and the recorded time, as they were.
    IF next_pos > start_pos THEN
        UPDATE skald.head SET next_position = next_pos, recorded_at = now_us WHERE id = 1;
    END IF;
END
$fn$"#;

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
