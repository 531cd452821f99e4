-- Costs (issue 13): the service tier a request was served at, and the audit trail of `pai-usage reprice`.
-- Costs are scaled integers (1e-12 USD), as in token_usage. Must match pai_usage/table.py and pai_usage/reprice.py.
ALTER TABLE token_usage ADD COLUMN service_tier VARCHAR(32);
CREATE TABLE IF NOT EXISTS token_usage_reprice (
    usage_id CHAR(32) NOT NULL,
    repriced_at DATETIME NOT NULL,
    old_cost_usd BIGINT,
    old_pricing_status VARCHAR(16) NOT NULL,
    old_price_source VARCHAR(100),
    new_cost_usd BIGINT,
    new_pricing_status VARCHAR(16) NOT NULL,
    new_price_source VARCHAR(100),
    PRIMARY KEY (usage_id, repriced_at)
);
CREATE INDEX IF NOT EXISTS ix_token_usage_reprice_usage_id ON token_usage_reprice (usage_id);
