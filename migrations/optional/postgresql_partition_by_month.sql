-- OPTIONAL, PostgreSQL 15+ only, never applied by `pai-usage migrate`: turns `token_usage` into a table
-- partitioned by RANGE (created_at), one partition per UTC month plus a DEFAULT partition. For large
-- installations that want to drop or archive whole months cheaply; see docs/scale.md for when it pays off.
--
-- Apply it after the regular migrations (0001, 0002), as the tables' owner or a superuser, in ONE transaction:
--     psql "$DATABASE_URL" -v ON_ERROR_STOP=1 --single-transaction \
--         -f migrations/optional/postgresql_partition_by_month.sql
-- or `pai_usage.partitions.apply_partitioning(engine)`. Applying it again does nothing.
--
-- COST: it takes an ACCESS EXCLUSIVE lock on `token_usage` (no reads, no writes) and REWRITES the whole table,
-- then rebuilds every index, all in one transaction: budget minutes per ten million rows and twice the table's
-- disk space. The tracker's writes meanwhile wait or spill to disk and are replayed afterwards: none are lost.
--
-- What changes:
-- * The primary key becomes (id, created_at): a partitioned table's unique keys must include the partition key.
--   `created_at` is set once by `track()` and carried through retries and spill replays, so (id, created_at)
--   still identifies one event exactly once. Inserts that ignore duplicates must say `ON CONFLICT DO NOTHING`
--   (no conflict target) or `ON CONFLICT (id, created_at) DO NOTHING`: `ON CONFLICT (id)` no longer matches a key.
-- * Columns, defaults, NOT NULLs, check constraints, comments, indexes (now partitioned indexes), triggers
--   (the daily rollup's statement-level triggers with transition tables, which PostgreSQL supports on a
--   partitioned table: they see the rows of every partition), the owner, table-level grants, row-level security
--   and its policies are carried over (a trigger disabled on purpose stays disabled). Column-level grants and
--   views on `token_usage` are not: a view makes the migration fail (drop it first, recreate it afterwards).
-- * The rows are copied with the new table's triggers not yet in place, so the rollups stay exact.
-- * Partitions `token_usage_YYYY_MM` are created for every month that has rows and for the current month and
--   the next three; other months go to `token_usage_default`, so an insert never fails. Create upcoming
--   months ahead of time with `pai_usage.partitions.ensure_month_partitions(engine)` (or
--   `SELECT pai_usage_create_month_partition(date '2027-01-01')`) from a cron job or at app start.
-- * Retention: `DROP TABLE token_usage_2025_01` (or DETACH PARTITION) removes a month instantly, but fires no
--   DELETE trigger: call `pai_usage.rollup.rebuild_rollup(engine)` afterwards, or delete the month's rows
--   from `token_usage_daily` and `token_usage_monthly` in the same transaction.

-- Creates the partition of `token_usage` for the UTC month containing `month`, unless it exists; returns its
-- name, or NULL when there was nothing to do. Rows of that month already in the DEFAULT partition are moved into
-- the new partition (without touching the rollup: they stay in `token_usage`). Takes an ACCESS EXCLUSIVE lock
-- on `token_usage` for a moment (longer if the DEFAULT partition holds many rows).
CREATE OR REPLACE FUNCTION pai_usage_create_month_partition(month date) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    first_day date := date_trunc('month', month)::date;
    part_name text := 'token_usage_' || to_char(first_day, 'YYYY_MM');
    part text;
    -- Literal UTC bounds: the session's TimeZone must not move a month's edges.
    lower_bound text := to_char(first_day, 'YYYY-MM-DD') || ' 00:00:00+00';
    upper_bound text := to_char((first_day + interval '1 month')::date, 'YYYY-MM-DD') || ' 00:00:00+00';
    parent regclass := to_regclass('token_usage');
    default_part regclass;
BEGIN
    IF parent IS NULL OR (SELECT relkind FROM pg_class WHERE oid = parent) <> 'p' THEN
        RAISE EXCEPTION '`token_usage` is not partitioned: apply postgresql_partition_by_month.sql first';
    END IF;
    -- In the parent's schema, whatever the search path.
    part := format('%I.%I', (SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                             WHERE c.oid = parent), part_name);
    IF to_regclass(part) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    -- Serializes concurrent callers (two app instances starting at once): the loser sees the partition.
    LOCK TABLE token_usage IN ACCESS EXCLUSIVE MODE;
    IF to_regclass(part) IS NOT NULL THEN
        RETURN NULL;
    END IF;
    SELECT inhrelid::regclass INTO default_part FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = parent AND pg_get_expr(c.relpartbound, c.oid) = 'DEFAULT';
    IF default_part IS NOT NULL AND EXISTS (
        SELECT FROM token_usage WHERE tableoid = default_part
          AND created_at >= lower_bound::timestamptz AND created_at < upper_bound::timestamptz
    ) THEN
        -- PostgreSQL refuses a new partition while DEFAULT holds rows for its range: move them first. DML on a
        -- partition itself fires none of the parent's statement-level triggers, so the rollup is left as it is.
        EXECUTE format('CREATE TABLE %s (LIKE token_usage INCLUDING ALL)', part);
        EXECUTE format(
            'WITH moved AS (DELETE FROM %s WHERE created_at >= %L AND created_at < %L RETURNING *) '
            'INSERT INTO %s SELECT * FROM moved', default_part, lower_bound, upper_bound, part);
        EXECUTE format('ALTER TABLE token_usage ATTACH PARTITION %s FOR VALUES FROM (%L) TO (%L)',
                       part, lower_bound, upper_bound);
    ELSE
        EXECUTE format('CREATE TABLE %s PARTITION OF token_usage FOR VALUES FROM (%L) TO (%L)',
                       part, lower_bound, upper_bound);
    END IF;
    -- Run by a superuser, the partition would be the superuser's: give it to the parent's owner, like the rest.
    IF (SELECT relowner FROM pg_class WHERE oid = parent)
       <> (SELECT relowner FROM pg_class WHERE oid = part::regclass) THEN
        EXECUTE format('ALTER TABLE %s OWNER TO %I', part,
                       (SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = parent));
    END IF;
    RETURN part_name;
END
$$;

DO $$
DECLARE
    source_table regclass;
    schema_name text;
    index_defs text[];
    trigger_defs text[];
    policy_defs text[];
    grant_defs text[];
    row_security boolean;
    force_row_security boolean;
    owner_name text;
    ddl text;
    month date;
BEGIN
    IF to_regclass('token_usage') IS NULL THEN
        RAISE EXCEPTION '`token_usage` does not exist: run `pai-usage migrate` first';
    END IF;
    LOCK TABLE token_usage IN ACCESS EXCLUSIVE MODE;
    -- Looked up after the lock: a concurrent run of this file may have converted the table while we waited.
    source_table := to_regclass('token_usage');
    IF (SELECT relkind FROM pg_class WHERE oid = source_table) = 'p' THEN
        RAISE NOTICE '`token_usage` is already partitioned: nothing to do';
        RETURN;
    END IF;
    SELECT n.nspname, pg_get_userbyid(c.relowner), c.relrowsecurity, c.relforcerowsecurity
    INTO schema_name, owner_name, row_security, force_row_security
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = source_table;

    -- What to carry over, captured while the definitions still name `token_usage`.
    SELECT coalesce(array_agg(pg_get_indexdef(indexrelid) ORDER BY indexrelid), '{}') INTO index_defs
    FROM pg_index WHERE indrelid = source_table AND NOT indisprimary;
    -- A trigger disabled on purpose (e.g. during a bulk load) stays disabled.
    SELECT coalesce(array_agg(definition ORDER BY tgname, step), '{}') INTO trigger_defs FROM (
        SELECT tgname, 1 AS step, pg_get_triggerdef(oid) AS definition FROM pg_trigger
        WHERE tgrelid = source_table AND NOT tgisinternal
        UNION ALL
        SELECT tgname, 2, format('ALTER TABLE token_usage %s TRIGGER %I',
                                 CASE tgenabled WHEN 'D' THEN 'DISABLE' WHEN 'R' THEN 'ENABLE REPLICA'
                                                ELSE 'ENABLE ALWAYS' END, tgname)
        FROM pg_trigger WHERE tgrelid = source_table AND NOT tgisinternal AND tgenabled <> 'O'
    ) AS t;
    SELECT coalesce(array_agg(format(
        'CREATE POLICY %I ON token_usage AS %s FOR %s TO %s%s%s', policyname, permissive, cmd,
        (SELECT string_agg(CASE WHEN r = 'public' THEN 'PUBLIC' ELSE quote_ident(r) END, ', ') FROM unnest(roles) AS r),
        ' USING (' || qual || ')', ' WITH CHECK (' || with_check || ')') ORDER BY policyname), '{}')
    INTO policy_defs FROM pg_policies WHERE schemaname = schema_name AND tablename = 'token_usage';
    SELECT coalesce(array_agg(format('GRANT %s ON token_usage TO %s%s', a.privilege_type,
        CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END,
        CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END)), '{}')
    INTO grant_defs FROM pg_class c, aclexplode(c.relacl) AS a WHERE c.oid = source_table AND a.grantee <> c.relowner;

    ALTER TABLE token_usage RENAME TO token_usage_unpartitioned;
    -- Same columns, in the same order, with their defaults, constraints, comments and storage.
    CREATE TABLE token_usage (LIKE token_usage_unpartitioned INCLUDING ALL EXCLUDING INDEXES)
        PARTITION BY RANGE (created_at);
    -- Same owner (run by a superuser, it would be the superuser's, and the app would lose its access).
    IF owner_name <> current_user THEN
        EXECUTE format('ALTER TABLE token_usage OWNER TO %I', owner_name);
    END IF;
    FOR month IN
        SELECT DISTINCT date_trunc('month', created_at AT TIME ZONE 'UTC')::date FROM token_usage_unpartitioned
        UNION
        SELECT (date_trunc('month', now() AT TIME ZONE 'UTC') + n * interval '1 month')::date
        FROM generate_series(0, 3) AS n
    LOOP
        PERFORM pai_usage_create_month_partition(month);
    END LOOP;
    CREATE TABLE token_usage_default PARTITION OF token_usage DEFAULT;
    IF owner_name <> current_user THEN
        EXECUTE format('ALTER TABLE token_usage_default OWNER TO %I', owner_name);
    END IF;

    -- The new table has no triggers yet: the copy leaves the rollup as it is, which is already exact.
    INSERT INTO token_usage SELECT * FROM token_usage_unpartitioned;
    DROP TABLE token_usage_unpartitioned;  -- RESTRICT: a view on it stops the migration here

    -- Indexes are built once, after the copy (faster than maintaining them row by row).
    ALTER TABLE token_usage ADD CONSTRAINT token_usage_pkey PRIMARY KEY (id, created_at);
    FOREACH ddl IN ARRAY index_defs || trigger_defs || policy_defs || grant_defs LOOP
        EXECUTE ddl;
    END LOOP;
    IF row_security THEN
        ALTER TABLE token_usage ENABLE ROW LEVEL SECURITY;
    END IF;
    IF force_row_security THEN
        ALTER TABLE token_usage FORCE ROW LEVEL SECURITY;
    END IF;
END
$$;

-- Fresh statistics for the new table and its partitions (autovacuum never analyzes a partitioned parent).
ANALYZE token_usage;
