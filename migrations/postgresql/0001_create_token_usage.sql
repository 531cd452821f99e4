-- The usage ledger: one row per usage event, agent runs and direct API calls side by side.
-- Column semantics: docs/columns.md. Must match pai_usage/table.py (tests/test_migrate.py checks).
CREATE TABLE IF NOT EXISTS token_usage (
    id UUID PRIMARY KEY,
    created_at TIMESTAMP WITH TIME ZONE NOT NULL,
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
    details JSONB NOT NULL,
    units NUMERIC(20, 6),
    unit_type VARCHAR(255),
    cost_usd NUMERIC(24, 12),
    price_source VARCHAR(100),
    pricing_status VARCHAR(16) NOT NULL,
    duration_ms INTEGER,
    status VARCHAR(16) NOT NULL,
    metadata JSONB NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_token_usage_created_at ON token_usage (created_at);
CREATE INDEX IF NOT EXISTS ix_token_usage_org_created_at ON token_usage (organization_id, created_at);
CREATE INDEX IF NOT EXISTS ix_token_usage_user_created_at ON token_usage (user_id, created_at);
CREATE INDEX IF NOT EXISTS ix_token_usage_run_id ON token_usage (run_id);
