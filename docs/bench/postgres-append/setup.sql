CREATE TABLE plain (position bigserial PRIMARY KEY, stream text NOT NULL, data bytea NOT NULL);
CREATE INDEX plain_stream ON plain (stream, position);
CREATE TABLE head (id smallint PRIMARY KEY CHECK (id = 1), next_position bigint NOT NULL);
INSERT INTO head VALUES (1, 0);
CREATE TABLE events (position bigint PRIMARY KEY, stream text NOT NULL, revision bigint NOT NULL,
  id uuid NOT NULL UNIQUE, data bytea NOT NULL, UNIQUE (stream, revision));
CREATE TABLE streams (stream text PRIMARY KEY, last_revision bigint NOT NULL);
-- n events for random streams, positions from the locked head row; revisions from streams.
CREATE FUNCTION append_head(n int) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE p bigint; s text; r bigint;
BEGIN
  SELECT next_position INTO p FROM head WHERE id = 1 FOR UPDATE;
  FOR i IN 0 .. n - 1 LOOP
    s := 's' || (random() * 10000)::int;
    INSERT INTO streams VALUES (s, 0) ON CONFLICT (stream) DO UPDATE SET last_revision = streams.last_revision + 1 RETURNING last_revision INTO r;
    INSERT INTO events VALUES (p + i, s, r, gen_random_uuid(), convert_to(repeat('x', 256), 'UTF8'));
  END LOOP;
  UPDATE head SET next_position = p + n WHERE id = 1;
  RETURN p;
END $$;
-- The same, serialized by a transaction-scoped advisory lock instead of the row lock.
CREATE TABLE head2 (id smallint PRIMARY KEY, next_position bigint NOT NULL);
INSERT INTO head2 VALUES (1, 0);
CREATE TABLE events2 (LIKE events INCLUDING ALL);
CREATE TABLE streams2 (LIKE streams INCLUDING ALL);
CREATE FUNCTION append_adv(n int) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE p bigint; s text; r bigint;
BEGIN
  PERFORM pg_advisory_xact_lock(42);
  SELECT next_position INTO p FROM head2 WHERE id = 1;
  FOR i IN 0 .. n - 1 LOOP
    s := 's' || (random() * 10000)::int;
    INSERT INTO streams2 VALUES (s, 0) ON CONFLICT (stream) DO UPDATE SET last_revision = streams2.last_revision + 1 RETURNING last_revision INTO r;
    INSERT INTO events2 VALUES (p + i, s, r, gen_random_uuid(), convert_to(repeat('x', 256), 'UTF8'));
  END LOOP;
  UPDATE head2 SET next_position = p + n WHERE id = 1;
  RETURN p;
END $$;
-- Set-based: the whole batch in three statements (what a batch passed as arrays would do).
CREATE TABLE head3 (id smallint PRIMARY KEY, next_position bigint NOT NULL);
INSERT INTO head3 VALUES (1, 0);
CREATE TABLE events3 (LIKE events INCLUDING ALL);
CREATE TABLE streams3 (LIKE streams INCLUDING ALL);
CREATE FUNCTION append_set(n int) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE p bigint;
BEGIN
  PERFORM pg_advisory_xact_lock(43);
  SELECT next_position INTO p FROM head3 WHERE id = 1;
  WITH b AS (SELECT i, 's' || (random() * 10000)::int AS s FROM generate_series(0, n - 1) i),
       c AS (SELECT s, count(*) AS k FROM b GROUP BY s),
       up AS (INSERT INTO streams3 AS t (stream, last_revision) SELECT s, k - 1 FROM c
              ON CONFLICT (stream) DO UPDATE SET last_revision = t.last_revision + excluded.last_revision + 1
              RETURNING stream, last_revision),
       r AS (SELECT b.i, b.s,
                    up.last_revision - count(*) OVER (PARTITION BY b.s)
                      + row_number() OVER (PARTITION BY b.s ORDER BY b.i) AS rev
             FROM b JOIN up ON up.stream = b.s)
  INSERT INTO events3 SELECT p + i, s, rev, gen_random_uuid(), convert_to(repeat('x', 256), 'UTF8') FROM r;
  UPDATE head3 SET next_position = p + n WHERE id = 1;
  RETURN p;
END $$;
