-- A daily rollup of token_usage per (organization, provider, model, operation, source, UTC day), kept
-- exact by statement-level triggers on every INSERT, UPDATE, DELETE and TRUNCATE of token_usage.
-- pai_usage/rollup.py reads it for summaries over whole UTC days; see docs/scale.md. Needs PostgreSQL 15+
-- (UNIQUE NULLS NOT DISTINCT). Not mirrored in pai_usage/table.py: the rollup is derived data.
-- The user is not a key: most users make a few requests a day, so a per-user rollup is nearly as large as
-- token_usage itself (68% of it in benchmarks/scale.py). Per-user queries use ix_token_usage_user_created_at.
--
-- The trigger bodies are E'' strings with \073 for ';', because the migration runner splits files on ';'.
CREATE TABLE IF NOT EXISTS token_usage_daily (
    day DATE NOT NULL,
    organization_id VARCHAR(255),
    provider VARCHAR(255),
    model VARCHAR(255),
    operation VARCHAR(255) NOT NULL,
    source VARCHAR(16) NOT NULL,
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
);
CREATE UNIQUE INDEX IF NOT EXISTS ux_token_usage_daily_key
    ON token_usage_daily (organization_id, day, provider, model, operation, source) NULLS NOT DISTINCT;
CREATE INDEX IF NOT EXISTS ix_token_usage_daily_day ON token_usage_daily (day);

-- Adds (sign = 1) or subtracts (sign = -1) a transition table's rows, one upsert per statement.
-- Groups are locked in key order, so concurrent writers cannot deadlock on the rollup.
CREATE OR REPLACE FUNCTION pai_usage_rollup_apply() RETURNS trigger LANGUAGE plpgsql AS E'
BEGIN
    IF TG_OP IN (''INSERT'', ''UPDATE'') THEN
        INSERT INTO token_usage_daily AS d
        SELECT (created_at AT TIME ZONE ''UTC'')::date AS day, organization_id, provider, model,
               operation, source, count(*), coalesce(sum(cost_usd), 0),
               count(*) FILTER (WHERE cost_usd IS NULL), count(*) FILTER (WHERE status = ''error''),
               sum(input_tokens), sum(cache_read_tokens), sum(cache_write_tokens), sum(input_audio_tokens),
               sum(output_tokens), sum(reasoning_tokens), sum(output_audio_tokens), sum(output_image_tokens)
        FROM pai_usage_new_rows
        GROUP BY 1, 2, 3, 4, 5, 6
        ORDER BY 2, 1, 3, 4, 5, 6
        ON CONFLICT (organization_id, day, provider, model, operation, source) DO UPDATE SET
            events = d.events + EXCLUDED.events,
            cost_usd = d.cost_usd + EXCLUDED.cost_usd,
            unpriced_events = d.unpriced_events + EXCLUDED.unpriced_events,
            error_events = d.error_events + EXCLUDED.error_events,
            input_tokens = d.input_tokens + EXCLUDED.input_tokens,
            cache_read_tokens = d.cache_read_tokens + EXCLUDED.cache_read_tokens,
            cache_write_tokens = d.cache_write_tokens + EXCLUDED.cache_write_tokens,
            input_audio_tokens = d.input_audio_tokens + EXCLUDED.input_audio_tokens,
            output_tokens = d.output_tokens + EXCLUDED.output_tokens,
            reasoning_tokens = d.reasoning_tokens + EXCLUDED.reasoning_tokens,
            output_audio_tokens = d.output_audio_tokens + EXCLUDED.output_audio_tokens,
            output_image_tokens = d.output_image_tokens + EXCLUDED.output_image_tokens\073
    END IF\073
    IF TG_OP IN (''DELETE'', ''UPDATE'') THEN
        INSERT INTO token_usage_daily AS d
        SELECT (created_at AT TIME ZONE ''UTC'')::date AS day, organization_id, provider, model,
               operation, source, -count(*), -coalesce(sum(cost_usd), 0),
               -count(*) FILTER (WHERE cost_usd IS NULL), -count(*) FILTER (WHERE status = ''error''),
               -sum(input_tokens), -sum(cache_read_tokens), -sum(cache_write_tokens), -sum(input_audio_tokens),
               -sum(output_tokens), -sum(reasoning_tokens), -sum(output_audio_tokens), -sum(output_image_tokens)
        FROM pai_usage_old_rows
        GROUP BY 1, 2, 3, 4, 5, 6
        ORDER BY 2, 1, 3, 4, 5, 6
        ON CONFLICT (organization_id, day, provider, model, operation, source) DO UPDATE SET
            events = d.events + EXCLUDED.events,
            cost_usd = d.cost_usd + EXCLUDED.cost_usd,
            unpriced_events = d.unpriced_events + EXCLUDED.unpriced_events,
            error_events = d.error_events + EXCLUDED.error_events,
            input_tokens = d.input_tokens + EXCLUDED.input_tokens,
            cache_read_tokens = d.cache_read_tokens + EXCLUDED.cache_read_tokens,
            cache_write_tokens = d.cache_write_tokens + EXCLUDED.cache_write_tokens,
            input_audio_tokens = d.input_audio_tokens + EXCLUDED.input_audio_tokens,
            output_tokens = d.output_tokens + EXCLUDED.output_tokens,
            reasoning_tokens = d.reasoning_tokens + EXCLUDED.reasoning_tokens,
            output_audio_tokens = d.output_audio_tokens + EXCLUDED.output_audio_tokens,
            output_image_tokens = d.output_image_tokens + EXCLUDED.output_image_tokens\073
        DELETE FROM token_usage_daily AS d USING (SELECT DISTINCT (created_at AT TIME ZONE ''UTC'')::date AS day,
               organization_id, provider, model, operation, source FROM pai_usage_old_rows) AS o
        WHERE d.events = 0 AND d.day = o.day
          AND d.organization_id IS NOT DISTINCT FROM o.organization_id
          AND d.provider IS NOT DISTINCT FROM o.provider AND d.model IS NOT DISTINCT FROM o.model
          AND d.operation = o.operation AND d.source = o.source\073
    END IF\073
    RETURN NULL\073
END';

CREATE OR REPLACE FUNCTION pai_usage_rollup_truncate() RETURNS trigger LANGUAGE plpgsql AS E'
BEGIN
    TRUNCATE token_usage_daily\073
    RETURN NULL\073
END';

-- No write may slip between the triggers' creation and the backfill.
LOCK TABLE token_usage IN SHARE ROW EXCLUSIVE MODE;
CREATE OR REPLACE TRIGGER pai_usage_rollup_insert AFTER INSERT ON token_usage
    REFERENCING NEW TABLE AS pai_usage_new_rows FOR EACH STATEMENT EXECUTE FUNCTION pai_usage_rollup_apply();
CREATE OR REPLACE TRIGGER pai_usage_rollup_update AFTER UPDATE ON token_usage
    REFERENCING OLD TABLE AS pai_usage_old_rows NEW TABLE AS pai_usage_new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pai_usage_rollup_apply();
CREATE OR REPLACE TRIGGER pai_usage_rollup_delete AFTER DELETE ON token_usage
    REFERENCING OLD TABLE AS pai_usage_old_rows FOR EACH STATEMENT EXECUTE FUNCTION pai_usage_rollup_apply();
CREATE OR REPLACE TRIGGER pai_usage_rollup_truncate AFTER TRUNCATE ON token_usage
    FOR EACH STATEMENT EXECUTE FUNCTION pai_usage_rollup_truncate();

TRUNCATE token_usage_daily;
INSERT INTO token_usage_daily
SELECT (created_at AT TIME ZONE 'UTC')::date AS day, organization_id, provider, model,
       operation, source, count(*), coalesce(sum(cost_usd), 0),
       count(*) FILTER (WHERE cost_usd IS NULL), count(*) FILTER (WHERE status = 'error'),
       sum(input_tokens), sum(cache_read_tokens), sum(cache_write_tokens), sum(input_audio_tokens),
       sum(output_tokens), sum(reasoning_tokens), sum(output_audio_tokens), sum(output_image_tokens)
FROM token_usage
GROUP BY 1, 2, 3, 4, 5, 6;
