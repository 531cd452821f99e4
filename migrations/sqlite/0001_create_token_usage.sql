-- The usage ledger on SQLite. Exact decimals are stored as scaled integers:
-- cost_usd in 1e-12 USD (pico-dollars), units in 1e-6 units (see pai_usage/table.py: ExactDecimal).
CREATE TABLE IF NOT EXISTS token_usage (
    id CHAR(32) NOT NULL PRIMARY KEY,
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
    units BIGINT,
    unit_type VARCHAR(255),
    cost_usd BIGINT,
    price_source VARCHAR(100),
    pricing_status VARCHAR(16) NOT NULL,
    duration_ms INTEGER,
    status VARCHAR(16) NOT NULL,
    metadata JSON NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_token_usage_created_at ON token_usage (created_at);
CREATE INDEX IF NOT EXISTS ix_token_usage_org_created_at ON token_usage (organization_id, created_at);
CREATE INDEX IF NOT EXISTS ix_token_usage_user_created_at ON token_usage (user_id, created_at);
CREATE INDEX IF NOT EXISTS ix_token_usage_run_id ON token_usage (run_id);
