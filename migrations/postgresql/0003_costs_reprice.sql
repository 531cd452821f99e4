-- Costs (issue 13): the service tier a request was served at, and the audit trail of `pai-usage reprice`.
-- Must match pai_usage/table.py and pai_usage/reprice.py (tests/test_migrate.py checks).
ALTER TABLE token_usage ADD COLUMN IF NOT EXISTS service_tier VARCHAR(32);
-- One row per repriced row and run: the cost before, the cost after, and the rule behind each.
CREATE TABLE IF NOT EXISTS token_usage_reprice (
    usage_id UUID NOT NULL,
    repriced_at TIMESTAMP WITH TIME ZONE NOT NULL,
    old_cost_usd NUMERIC(24, 12),
    old_pricing_status VARCHAR(16) NOT NULL,
    old_price_source VARCHAR(100),
    new_cost_usd NUMERIC(24, 12),
    new_pricing_status VARCHAR(16) NOT NULL,
    new_price_source VARCHAR(100),
    PRIMARY KEY (usage_id, repriced_at)
);
CREATE INDEX IF NOT EXISTS ix_token_usage_reprice_usage_id ON token_usage_reprice (usage_id);
