-- A monthly level beside the daily rollup (0002): one row per (organization, provider, model, UTC month) with the
-- same sums, kept exact by the same statement-level triggers, in the same statement as the daily level.
-- pai_usage/rollup.py reads whole months from here (when a summary is grouped and filtered by nothing finer than
-- organization, provider, model and month) and the days around them, or anything by operation, source or day,
-- from token_usage_daily.
--
-- Why this grain: the daily rollup's key is nearly as fine as the events (it holds ~half as many rows as
-- token_usage), and a monthly level on the same key still holds 3-4 rows per (organization, model) and month.
-- Keyed on (month, organization, provider, model) it holds one: a month of every organization by organization and
-- model reads exactly as many rows as the answer has, whatever the ledger's size (docs/scale.md).
--
-- The trigger function now applies each statement's net change once per level and group: an UPDATE (a reprice,
-- a re-attribution) adds its new rows and subtracts its old ones in one upsert, and skips groups whose sums do not
-- change. Groups left with no events are removed.
--
-- The trigger bodies are E'' strings with \073 for ';', because the migration runner splits files on ';'.
CREATE TABLE IF NOT EXISTS token_usage_monthly (
    month DATE NOT NULL,
    organization_id VARCHAR(255),
    provider VARCHAR(255),
    model VARCHAR(255),
    events BIGINT NOT NULL,
    cost_usd NUMERIC(38, 12) NOT NULL,
    unpriced_events BIGINT NOT NULL,
    error_events BIGINT NOT NULL,
    input_tokens BIGINT NOT NULL,
    cache_read_tokens BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL,
    input_audio_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    reasoning_tokens BIGINT NOT NULL,
    output_audio_tokens BIGINT NOT NULL,
    output_image_tokens BIGINT NOT NULL
) WITH (fillfactor = 80);
CREATE UNIQUE INDEX IF NOT EXISTS ux_token_usage_monthly_key
    ON token_usage_monthly (organization_id, month, provider, model) NULLS NOT DISTINCT;
CREATE INDEX IF NOT EXISTS ix_token_usage_monthly_month ON token_usage_monthly (month, organization_id, model);
-- Every write updates the current month's rows in place: free space on their pages keeps those updates HOT
-- (no new index entries). The daily level's rows are updated all day long in the same way.
ALTER TABLE token_usage_daily SET (fillfactor = 80);

-- Groups are locked in key order, monthly level first, so concurrent writers cannot deadlock on the rollup.
CREATE OR REPLACE FUNCTION pai_usage_rollup_apply() RETURNS trigger LANGUAGE plpgsql AS E'
BEGIN
    IF TG_OP = ''INSERT'' THEN
        INSERT INTO token_usage_monthly AS r
        SELECT date_trunc(''month'', created_at AT TIME ZONE ''UTC'')::date,
               organization_id, provider, model,
               sum(sign), coalesce(sum(sign * cost_usd), 0),
               coalesce(sum(sign) FILTER (WHERE cost_usd IS NULL), 0),
               coalesce(sum(sign) FILTER (WHERE status = ''error''), 0),
               sum(sign * input_tokens), sum(sign * cache_read_tokens), sum(sign * cache_write_tokens), sum(sign * input_audio_tokens),
               sum(sign * output_tokens), sum(sign * reasoning_tokens), sum(sign * output_audio_tokens), sum(sign * output_image_tokens)
        FROM (SELECT 1 AS sign, * FROM pai_usage_new_rows) AS t
        GROUP BY 1, 2, 3, 4
        ORDER BY 2, 1, 3, 4
        ON CONFLICT (organization_id, month, provider, model) DO UPDATE SET
            events = r.events + EXCLUDED.events,
            cost_usd = r.cost_usd + EXCLUDED.cost_usd,
            unpriced_events = r.unpriced_events + EXCLUDED.unpriced_events,
            error_events = r.error_events + EXCLUDED.error_events,
            input_tokens = r.input_tokens + EXCLUDED.input_tokens,
            cache_read_tokens = r.cache_read_tokens + EXCLUDED.cache_read_tokens,
            cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens,
            input_audio_tokens = r.input_audio_tokens + EXCLUDED.input_audio_tokens,
            output_tokens = r.output_tokens + EXCLUDED.output_tokens,
            reasoning_tokens = r.reasoning_tokens + EXCLUDED.reasoning_tokens,
            output_audio_tokens = r.output_audio_tokens + EXCLUDED.output_audio_tokens,
            output_image_tokens = r.output_image_tokens + EXCLUDED.output_image_tokens\073
        INSERT INTO token_usage_daily AS r
        SELECT (created_at AT TIME ZONE ''UTC'')::date,
               organization_id, provider, model, operation, source,
               sum(sign), coalesce(sum(sign * cost_usd), 0),
               coalesce(sum(sign) FILTER (WHERE cost_usd IS NULL), 0),
               coalesce(sum(sign) FILTER (WHERE status = ''error''), 0),
               sum(sign * input_tokens), sum(sign * cache_read_tokens), sum(sign * cache_write_tokens), sum(sign * input_audio_tokens),
               sum(sign * output_tokens), sum(sign * reasoning_tokens), sum(sign * output_audio_tokens), sum(sign * output_image_tokens)
        FROM (SELECT 1 AS sign, * FROM pai_usage_new_rows) AS t
        GROUP BY 1, 2, 3, 4, 5, 6
        ORDER BY 2, 1, 3, 4, 5, 6
        ON CONFLICT (organization_id, day, provider, model, operation, source) DO UPDATE SET
            events = r.events + EXCLUDED.events,
            cost_usd = r.cost_usd + EXCLUDED.cost_usd,
            unpriced_events = r.unpriced_events + EXCLUDED.unpriced_events,
            error_events = r.error_events + EXCLUDED.error_events,
            input_tokens = r.input_tokens + EXCLUDED.input_tokens,
            cache_read_tokens = r.cache_read_tokens + EXCLUDED.cache_read_tokens,
            cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens,
            input_audio_tokens = r.input_audio_tokens + EXCLUDED.input_audio_tokens,
            output_tokens = r.output_tokens + EXCLUDED.output_tokens,
            reasoning_tokens = r.reasoning_tokens + EXCLUDED.reasoning_tokens,
            output_audio_tokens = r.output_audio_tokens + EXCLUDED.output_audio_tokens,
            output_image_tokens = r.output_image_tokens + EXCLUDED.output_image_tokens\073
    END IF\073
    IF TG_OP = ''DELETE'' THEN
        INSERT INTO token_usage_monthly AS r
        SELECT date_trunc(''month'', created_at AT TIME ZONE ''UTC'')::date,
               organization_id, provider, model,
               sum(sign), coalesce(sum(sign * cost_usd), 0),
               coalesce(sum(sign) FILTER (WHERE cost_usd IS NULL), 0),
               coalesce(sum(sign) FILTER (WHERE status = ''error''), 0),
               sum(sign * input_tokens), sum(sign * cache_read_tokens), sum(sign * cache_write_tokens), sum(sign * input_audio_tokens),
               sum(sign * output_tokens), sum(sign * reasoning_tokens), sum(sign * output_audio_tokens), sum(sign * output_image_tokens)
        FROM (SELECT -1 AS sign, * FROM pai_usage_old_rows) AS t
        GROUP BY 1, 2, 3, 4
        ORDER BY 2, 1, 3, 4
        ON CONFLICT (organization_id, month, provider, model) DO UPDATE SET
            events = r.events + EXCLUDED.events,
            cost_usd = r.cost_usd + EXCLUDED.cost_usd,
            unpriced_events = r.unpriced_events + EXCLUDED.unpriced_events,
            error_events = r.error_events + EXCLUDED.error_events,
            input_tokens = r.input_tokens + EXCLUDED.input_tokens,
            cache_read_tokens = r.cache_read_tokens + EXCLUDED.cache_read_tokens,
            cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens,
            input_audio_tokens = r.input_audio_tokens + EXCLUDED.input_audio_tokens,
            output_tokens = r.output_tokens + EXCLUDED.output_tokens,
            reasoning_tokens = r.reasoning_tokens + EXCLUDED.reasoning_tokens,
            output_audio_tokens = r.output_audio_tokens + EXCLUDED.output_audio_tokens,
            output_image_tokens = r.output_image_tokens + EXCLUDED.output_image_tokens\073
        INSERT INTO token_usage_daily AS r
        SELECT (created_at AT TIME ZONE ''UTC'')::date,
               organization_id, provider, model, operation, source,
               sum(sign), coalesce(sum(sign * cost_usd), 0),
               coalesce(sum(sign) FILTER (WHERE cost_usd IS NULL), 0),
               coalesce(sum(sign) FILTER (WHERE status = ''error''), 0),
               sum(sign * input_tokens), sum(sign * cache_read_tokens), sum(sign * cache_write_tokens), sum(sign * input_audio_tokens),
               sum(sign * output_tokens), sum(sign * reasoning_tokens), sum(sign * output_audio_tokens), sum(sign * output_image_tokens)
        FROM (SELECT -1 AS sign, * FROM pai_usage_old_rows) AS t
        GROUP BY 1, 2, 3, 4, 5, 6
        ORDER BY 2, 1, 3, 4, 5, 6
        ON CONFLICT (organization_id, day, provider, model, operation, source) DO UPDATE SET
            events = r.events + EXCLUDED.events,
            cost_usd = r.cost_usd + EXCLUDED.cost_usd,
            unpriced_events = r.unpriced_events + EXCLUDED.unpriced_events,
            error_events = r.error_events + EXCLUDED.error_events,
            input_tokens = r.input_tokens + EXCLUDED.input_tokens,
            cache_read_tokens = r.cache_read_tokens + EXCLUDED.cache_read_tokens,
            cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens,
            input_audio_tokens = r.input_audio_tokens + EXCLUDED.input_audio_tokens,
            output_tokens = r.output_tokens + EXCLUDED.output_tokens,
            reasoning_tokens = r.reasoning_tokens + EXCLUDED.reasoning_tokens,
            output_audio_tokens = r.output_audio_tokens + EXCLUDED.output_audio_tokens,
            output_image_tokens = r.output_image_tokens + EXCLUDED.output_image_tokens\073
        DELETE FROM token_usage_monthly AS r USING (SELECT DISTINCT date_trunc(''month'', created_at AT TIME ZONE ''UTC'')::date AS month,
               organization_id, provider, model FROM pai_usage_old_rows) AS o
        WHERE r.events = 0 AND r.month = o.month
          AND r.organization_id IS NOT DISTINCT FROM o.organization_id
          AND r.provider IS NOT DISTINCT FROM o.provider
          AND r.model IS NOT DISTINCT FROM o.model\073
        DELETE FROM token_usage_daily AS r USING (SELECT DISTINCT (created_at AT TIME ZONE ''UTC'')::date AS day,
               organization_id, provider, model, operation, source FROM pai_usage_old_rows) AS o
        WHERE r.events = 0 AND r.day = o.day
          AND r.organization_id IS NOT DISTINCT FROM o.organization_id
          AND r.provider IS NOT DISTINCT FROM o.provider
          AND r.model IS NOT DISTINCT FROM o.model
          AND r.operation = o.operation AND r.source = o.source\073
    END IF\073
    IF TG_OP = ''UPDATE'' THEN
        -- Net change per group: groups whose sums do not change (an UPDATE of metadata) are left alone.
        INSERT INTO token_usage_monthly AS r
        SELECT date_trunc(''month'', created_at AT TIME ZONE ''UTC'')::date,
               organization_id, provider, model,
               sum(sign), coalesce(sum(sign * cost_usd), 0),
               coalesce(sum(sign) FILTER (WHERE cost_usd IS NULL), 0),
               coalesce(sum(sign) FILTER (WHERE status = ''error''), 0),
               sum(sign * input_tokens), sum(sign * cache_read_tokens), sum(sign * cache_write_tokens), sum(sign * input_audio_tokens),
               sum(sign * output_tokens), sum(sign * reasoning_tokens), sum(sign * output_audio_tokens), sum(sign * output_image_tokens)
        FROM (SELECT 1 AS sign, * FROM pai_usage_new_rows UNION ALL SELECT -1, * FROM pai_usage_old_rows) AS t
        GROUP BY 1, 2, 3, 4
        HAVING sum(sign) <> 0 OR coalesce(sum(sign * cost_usd), 0) <> 0
            OR coalesce(sum(sign) FILTER (WHERE cost_usd IS NULL), 0) <> 0
            OR coalesce(sum(sign) FILTER (WHERE status = ''error''), 0) <> 0
            OR sum(sign * input_tokens) <> 0
            OR sum(sign * cache_read_tokens) <> 0
            OR sum(sign * cache_write_tokens) <> 0
            OR sum(sign * input_audio_tokens) <> 0
            OR sum(sign * output_tokens) <> 0
            OR sum(sign * reasoning_tokens) <> 0
            OR sum(sign * output_audio_tokens) <> 0
            OR sum(sign * output_image_tokens) <> 0
        ORDER BY 2, 1, 3, 4
        ON CONFLICT (organization_id, month, provider, model) DO UPDATE SET
            events = r.events + EXCLUDED.events,
            cost_usd = r.cost_usd + EXCLUDED.cost_usd,
            unpriced_events = r.unpriced_events + EXCLUDED.unpriced_events,
            error_events = r.error_events + EXCLUDED.error_events,
            input_tokens = r.input_tokens + EXCLUDED.input_tokens,
            cache_read_tokens = r.cache_read_tokens + EXCLUDED.cache_read_tokens,
            cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens,
            input_audio_tokens = r.input_audio_tokens + EXCLUDED.input_audio_tokens,
            output_tokens = r.output_tokens + EXCLUDED.output_tokens,
            reasoning_tokens = r.reasoning_tokens + EXCLUDED.reasoning_tokens,
            output_audio_tokens = r.output_audio_tokens + EXCLUDED.output_audio_tokens,
            output_image_tokens = r.output_image_tokens + EXCLUDED.output_image_tokens\073
        INSERT INTO token_usage_daily AS r
        SELECT (created_at AT TIME ZONE ''UTC'')::date,
               organization_id, provider, model, operation, source,
               sum(sign), coalesce(sum(sign * cost_usd), 0),
               coalesce(sum(sign) FILTER (WHERE cost_usd IS NULL), 0),
               coalesce(sum(sign) FILTER (WHERE status = ''error''), 0),
               sum(sign * input_tokens), sum(sign * cache_read_tokens), sum(sign * cache_write_tokens), sum(sign * input_audio_tokens),
               sum(sign * output_tokens), sum(sign * reasoning_tokens), sum(sign * output_audio_tokens), sum(sign * output_image_tokens)
        FROM (SELECT 1 AS sign, * FROM pai_usage_new_rows UNION ALL SELECT -1, * FROM pai_usage_old_rows) AS t
        GROUP BY 1, 2, 3, 4, 5, 6
        HAVING sum(sign) <> 0 OR coalesce(sum(sign * cost_usd), 0) <> 0
            OR coalesce(sum(sign) FILTER (WHERE cost_usd IS NULL), 0) <> 0
            OR coalesce(sum(sign) FILTER (WHERE status = ''error''), 0) <> 0
            OR sum(sign * input_tokens) <> 0
            OR sum(sign * cache_read_tokens) <> 0
            OR sum(sign * cache_write_tokens) <> 0
            OR sum(sign * input_audio_tokens) <> 0
            OR sum(sign * output_tokens) <> 0
            OR sum(sign * reasoning_tokens) <> 0
            OR sum(sign * output_audio_tokens) <> 0
            OR sum(sign * output_image_tokens) <> 0
        ORDER BY 2, 1, 3, 4, 5, 6
        ON CONFLICT (organization_id, day, provider, model, operation, source) DO UPDATE SET
            events = r.events + EXCLUDED.events,
            cost_usd = r.cost_usd + EXCLUDED.cost_usd,
            unpriced_events = r.unpriced_events + EXCLUDED.unpriced_events,
            error_events = r.error_events + EXCLUDED.error_events,
            input_tokens = r.input_tokens + EXCLUDED.input_tokens,
            cache_read_tokens = r.cache_read_tokens + EXCLUDED.cache_read_tokens,
            cache_write_tokens = r.cache_write_tokens + EXCLUDED.cache_write_tokens,
            input_audio_tokens = r.input_audio_tokens + EXCLUDED.input_audio_tokens,
            output_tokens = r.output_tokens + EXCLUDED.output_tokens,
            reasoning_tokens = r.reasoning_tokens + EXCLUDED.reasoning_tokens,
            output_audio_tokens = r.output_audio_tokens + EXCLUDED.output_audio_tokens,
            output_image_tokens = r.output_image_tokens + EXCLUDED.output_image_tokens\073
        DELETE FROM token_usage_monthly AS r USING (SELECT DISTINCT date_trunc(''month'', created_at AT TIME ZONE ''UTC'')::date AS month,
               organization_id, provider, model FROM pai_usage_old_rows) AS o
        WHERE r.events = 0 AND r.month = o.month
          AND r.organization_id IS NOT DISTINCT FROM o.organization_id
          AND r.provider IS NOT DISTINCT FROM o.provider
          AND r.model IS NOT DISTINCT FROM o.model\073
        DELETE FROM token_usage_daily AS r USING (SELECT DISTINCT (created_at AT TIME ZONE ''UTC'')::date AS day,
               organization_id, provider, model, operation, source FROM pai_usage_old_rows) AS o
        WHERE r.events = 0 AND r.day = o.day
          AND r.organization_id IS NOT DISTINCT FROM o.organization_id
          AND r.provider IS NOT DISTINCT FROM o.provider
          AND r.model IS NOT DISTINCT FROM o.model
          AND r.operation = o.operation AND r.source = o.source\073
    END IF\073
    RETURN NULL\073
END';

CREATE OR REPLACE FUNCTION pai_usage_rollup_truncate() RETURNS trigger LANGUAGE plpgsql AS E'
BEGIN
    TRUNCATE token_usage_daily, token_usage_monthly\073
    RETURN NULL\073
END';

-- No write may slip between the new trigger function and the backfill; the daily level is exact, so the monthly
-- one is its sum.
LOCK TABLE token_usage IN SHARE ROW EXCLUSIVE MODE;
TRUNCATE token_usage_monthly;
INSERT INTO token_usage_monthly
SELECT date_trunc('month', day)::date, organization_id, provider, model, sum(events), sum(cost_usd), sum(unpriced_events), sum(error_events), sum(input_tokens), sum(cache_read_tokens), sum(cache_write_tokens), sum(input_audio_tokens), sum(output_tokens), sum(reasoning_tokens), sum(output_audio_tokens), sum(output_image_tokens)
FROM token_usage_daily
GROUP BY 1, 2, 3, 4
ORDER BY 1, 2, 4, 3;  -- each month's rows together, in the order summaries read them

-- Where the optional row-level security (migrations/optional/postgresql_rls.sql) is on, the monthly level gets
-- the same policy, and the replaced functions get back their SECURITY DEFINER (CREATE OR REPLACE resets it).
-- Roles get the rights on the monthly level they have on the daily one: an application role that writes the
-- daily level through the triggers (no row-level security) must write the monthly one too.
DO E'
DECLARE
    grantee name\073
    privilege text\073
BEGIN
    IF (SELECT relrowsecurity FROM pg_class WHERE oid = to_regclass(''token_usage_daily'')) THEN
        ALTER TABLE token_usage_monthly ENABLE ROW LEVEL SECURITY\073
        DROP POLICY IF EXISTS pai_usage_tenant_isolation ON token_usage_monthly\073
        CREATE POLICY pai_usage_tenant_isolation ON token_usage_monthly
            USING (organization_id = current_setting(''pai_usage.organization_id'', true))
            WITH CHECK (organization_id = current_setting(''pai_usage.organization_id'', true))\073
        ALTER FUNCTION pai_usage_rollup_apply() SECURITY DEFINER SET search_path FROM CURRENT\073
        ALTER FUNCTION pai_usage_rollup_truncate() SECURITY DEFINER SET search_path FROM CURRENT\073
    END IF\073
    FOR grantee, privilege IN SELECT g.grantee, g.privilege_type FROM information_schema.role_table_grants AS g
                   WHERE g.table_schema = current_schema() AND g.table_name = ''token_usage_daily''
                     AND g.grantee <> current_user LOOP
        EXECUTE ''GRANT '' || privilege || '' ON token_usage_monthly TO ''
            || CASE WHEN grantee = ''PUBLIC'' THEN ''PUBLIC'' ELSE quote_ident(grantee) END\073
    END LOOP\073
END';
