-- A readable raw table on SQLite: `SELECT * FROM token_usage` shows what PostgreSQL shows.
-- - cost_usd and units: exact decimals as TEXT with a fixed number of decimals (`0.002523000000` dollars,
--   `2.500000` units) instead of scaled integers (`2523000000` pico-dollars). Summaries add them exactly as
--   integers: sum(CAST(replace(cost_usd, '.', '') AS INTEGER)) is pico-dollars (pai_usage.table.exact_sum).
--   The CHECKs keep that exact: a value not in that canonical form (a REAL, `0.5`) is refused.
-- - id: dashed UUID text (`12345678-1234-...`), like run_id and exports, instead of 32 hex digits.
-- - created_at: UTC text with its zone (`2026-12-01 09:30:00.000000+00:00`) instead of naive text.
-- SQLite cannot change a column's type: the table is rebuilt, rows copied and converted, indexes recreated.
-- Views on token_usage must be dropped before and recreated after (SQLite checks them on RENAME).
CREATE TABLE token_usage_0005 (
    id CHAR(36) NOT NULL PRIMARY KEY,
    created_at DATETIME NOT NULL,
    organization_id VARCHAR(255),
    user_id VARCHAR(255),
    provider VARCHAR(255),
    model VARCHAR(255),
    operation VARCHAR(255) NOT NULL,
    source VARCHAR(16) NOT NULL,
    run_id VARCHAR(255),
    parent_run_id VARCHAR(255),
    agent_name VARCHAR(255),
    request_id VARCHAR(255),
    input_tokens BIGINT NOT NULL,
    cache_read_tokens BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL,
    input_audio_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    reasoning_tokens BIGINT NOT NULL,
    output_audio_tokens BIGINT NOT NULL,
    output_image_tokens BIGINT NOT NULL,
    details JSON NOT NULL,
    units TEXT CHECK (units IS NULL OR units = printf('%s%d.%06d', CASE WHEN units GLOB '-*' THEN '-' ELSE '' END,
        abs(CAST(replace(units, '.', '') AS INTEGER)) / 1000000, abs(CAST(replace(units, '.', '') AS INTEGER)) %
            1000000)),
    unit_type VARCHAR(255),
    cost_usd TEXT CHECK (cost_usd IS NULL OR cost_usd = printf('%s%d.%012d', CASE WHEN cost_usd GLOB '-*' THEN '-'
        ELSE '' END,
        abs(CAST(replace(cost_usd, '.', '') AS INTEGER)) / 1000000000000, abs(CAST(replace(cost_usd, '.', '') AS
            INTEGER)) % 1000000000000)),
    price_source VARCHAR(100),
    pricing_status VARCHAR(16) NOT NULL,
    duration_ms INTEGER,
    status VARCHAR(16) NOT NULL,
    metadata JSON NOT NULL,
    service_tier VARCHAR(32)
);
INSERT INTO token_usage_0005 (id, created_at, organization_id, user_id, provider, model, operation, source, run_id,
    parent_run_id, agent_name, request_id, input_tokens, cache_read_tokens, cache_write_tokens, input_audio_tokens,
    output_tokens, reasoning_tokens, output_audio_tokens, output_image_tokens, details, units, unit_type, cost_usd,
    price_source, pricing_status, duration_ms, status, metadata, service_tier)
SELECT
    CASE WHEN length(id) = 32
        THEN lower(substr(id, 1, 8) || '-' || substr(id, 9, 4) || '-' || substr(id, 13, 4) || '-'
                   || substr(id, 17, 4) || '-' || substr(id, 21, 12))
        ELSE lower(id) END,
    CASE WHEN created_at GLOB '*+00:00' THEN created_at
         WHEN length(created_at) = 19 THEN created_at || '.000000+00:00'
         ELSE created_at || '+00:00' END,
    organization_id, user_id, provider, model, operation, source, run_id, parent_run_id, agent_name, request_id,
        input_tokens, cache_read_tokens, cache_write_tokens, input_audio_tokens, output_tokens, reasoning_tokens,
        output_audio_tokens, output_image_tokens, details,
    CASE WHEN units IS NULL THEN NULL ELSE printf('%s%d.%06d', CASE WHEN units < 0 THEN '-' ELSE '' END,
           abs(units) / 1000000, abs(units) % 1000000) END,
    unit_type,
    CASE WHEN cost_usd IS NULL THEN NULL ELSE printf('%s%d.%012d', CASE WHEN cost_usd < 0 THEN '-' ELSE '' END,
           abs(cost_usd) / 1000000000000, abs(cost_usd) % 1000000000000) END,
    price_source, pricing_status, duration_ms, status, metadata, service_tier
FROM token_usage;
DROP TABLE token_usage;
ALTER TABLE token_usage_0005 RENAME TO token_usage;
CREATE INDEX IF NOT EXISTS ix_token_usage_created_at ON token_usage (created_at);
CREATE INDEX IF NOT EXISTS ix_token_usage_org_created_at ON token_usage (organization_id, created_at);
CREATE INDEX IF NOT EXISTS ix_token_usage_user_created_at ON token_usage (user_id, created_at);
CREATE INDEX IF NOT EXISTS ix_token_usage_run_id ON token_usage (run_id);

-- The reprice audit trail (0003) gets the same readable forms: dashed ids, costs as fixed-decimal text.
CREATE TABLE token_usage_reprice_0005 (
    usage_id CHAR(36) NOT NULL,
    repriced_at DATETIME NOT NULL,
    old_cost_usd TEXT,
    old_pricing_status VARCHAR(16) NOT NULL,
    old_price_source VARCHAR(100),
    new_cost_usd TEXT,
    new_pricing_status VARCHAR(16) NOT NULL,
    new_price_source VARCHAR(100),
    PRIMARY KEY (usage_id, repriced_at)
);
INSERT INTO token_usage_reprice_0005
SELECT
    CASE WHEN length(usage_id) = 32
        THEN lower(substr(usage_id, 1, 8) || '-' || substr(usage_id, 9, 4) || '-' || substr(usage_id, 13, 4) || '-'
                   || substr(usage_id, 17, 4) || '-' || substr(usage_id, 21, 12))
        ELSE lower(usage_id) END,
    CASE WHEN repriced_at GLOB '*+00:00' THEN repriced_at
         WHEN length(repriced_at) = 19 THEN repriced_at || '.000000+00:00'
         ELSE repriced_at || '+00:00' END,
    CASE WHEN old_cost_usd IS NULL THEN NULL ELSE printf('%s%d.%012d', CASE WHEN old_cost_usd < 0 THEN '-' ELSE ''
        END, abs(old_cost_usd) / 1000000000000, abs(old_cost_usd) % 1000000000000) END,
    old_pricing_status, old_price_source,
    CASE WHEN new_cost_usd IS NULL THEN NULL ELSE printf('%s%d.%012d', CASE WHEN new_cost_usd < 0 THEN '-' ELSE ''
        END, abs(new_cost_usd) / 1000000000000, abs(new_cost_usd) % 1000000000000) END,
    new_pricing_status, new_price_source
FROM token_usage_reprice;
DROP TABLE token_usage_reprice;
ALTER TABLE token_usage_reprice_0005 RENAME TO token_usage_reprice;
CREATE INDEX IF NOT EXISTS ix_token_usage_reprice_usage_id ON token_usage_reprice (usage_id);
