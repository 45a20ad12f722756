-- usage_records partitioned by month of created_at (PostgreSQL declarative partitioning), so a
-- year of 100M rows keeps each month's indexes small, inserts touching only the current month's,
-- and an old month can be detached or dropped whole. gateway/infra/partitions.py explains the
-- choices (no DEFAULT partition; months created ahead, hourly, and on demand by the writer).
--
-- One transaction (the migration runner's): the old table is renamed, a partitioned one is made
-- from it column for column (LIKE: whatever columns earlier migrations added, 013's included),
-- every row copied, the counts compared (the migration aborts, nothing changed, on a mismatch),
-- then the old table's indexes and extended statistics are made again on the new one and the old
-- table dropped. Writers wait on the rename's lock until the commit; nothing is lost meanwhile
-- (records wait in the Redis streams).
--
-- The unique key becomes (request_id, created_at): a key of a partitioned table must contain the
-- partition key. created_at is fixed when the request is admitted (the hold's stamp, carried in
-- the settle's record and in a kept settle), so a record delivered or replayed again has the same
-- created_at and still conflicts: ON CONFLICT DO NOTHING still refuses the duplicate.

ALTER TABLE usage_records RENAME TO usage_records_unpartitioned;
ALTER TABLE usage_records_unpartitioned
    RENAME CONSTRAINT usage_records_pkey TO usage_records_unpartitioned_pkey;

CREATE TABLE usage_records (
    LIKE usage_records_unpartitioned
        INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING GENERATED INCLUDING IDENTITY
        INCLUDING COMMENTS,
    PRIMARY KEY (request_id, created_at)
) PARTITION BY RANGE (created_at);

-- One month's partition (month: any day of it, UTC), named usage_records_YYYY_MM; true when it
-- was made now, false when it was there. Made as a table of its own, then attached: ATTACH
-- PARTITION locks usage_records only against schema changes (SHARE UPDATE EXCLUSIVE), where
-- CREATE TABLE ... PARTITION OF would block every read and insert of it (ACCESS EXCLUSIVE).
-- Concurrent callers (every gateway process runs a writer) are serialised by an advisory lock.
CREATE FUNCTION usage_records_add_month(month date) RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    first date := date_trunc('month', month)::date;
    next date := (date_trunc('month', month) + interval '1 month')::date;
    part text := 'usage_records_' || to_char(first, 'YYYY_MM');
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('usage_records_add_month'));
    IF to_regclass(part) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format(
        'CREATE TABLE %I (LIKE usage_records INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', part);
    EXECUTE format(
        'ALTER TABLE usage_records ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
        part, first::text || ' 00:00:00+00', next::text || ' 00:00:00+00');
    RETURN true;
END
$$;

-- A partition for every month the old rows span, and this month and the next (the gateway makes
-- more ahead at start and every hour).
SELECT usage_records_add_month(m::date)
FROM generate_series(
    date_trunc('month', least(now(), (SELECT min(created_at) FROM usage_records_unpartitioned))
                        AT TIME ZONE 'UTC'),
    date_trunc('month', greatest(now() + interval '1 month',
                                 (SELECT max(created_at) FROM usage_records_unpartitioned))
                        AT TIME ZONE 'UTC'),
    interval '1 month') AS m;

INSERT INTO usage_records SELECT * FROM usage_records_unpartitioned;

DO $$
DECLARE
    before bigint;
    after bigint;
    defs text[];
    def text;
BEGIN
    SELECT count(*) INTO before FROM usage_records_unpartitioned;
    SELECT count(*) INTO after FROM usage_records;
    IF before <> after THEN
        RAISE EXCEPTION 'usage_records partitioning: % rows copied of %; nothing changed',
            after, before;
    END IF;
    -- The old table's indexes (but its key) and extended statistics, made again on the new one
    -- under the same names: on a partitioned table an index is made on every partition, now and
    -- as each month is attached.
    SELECT coalesce(array_agg(pg_get_indexdef(indexrelid) ORDER BY indexrelid), '{}') INTO defs
    FROM pg_index WHERE indrelid = 'usage_records_unpartitioned'::regclass AND NOT indisprimary;
    SELECT defs || coalesce(array_agg(pg_get_statisticsobjdef(oid) ORDER BY oid), '{}') INTO defs
    FROM pg_statistic_ext WHERE stxrelid = 'usage_records_unpartitioned'::regclass;
    DROP TABLE usage_records_unpartitioned;
    FOREACH def IN ARRAY defs LOOP
        EXECUTE regexp_replace(def, '\musage_records_unpartitioned\M', 'usage_records', 'g');
    END LOOP;
END
$$;

ANALYZE usage_records;
