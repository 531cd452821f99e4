-- Hard-mode budget counters (pai_usage/budgets/_hard.py, docs/budgets.md): one row per budget scope and
-- period, updated atomically by every process that enforces the budget. Amounts are scaled integers in
-- 1e-12 USD, like token_usage.cost_usd (pai_usage/table.py: ExactDecimal).
CREATE TABLE IF NOT EXISTS pai_usage_budget_counters (
    scope VARCHAR(300) NOT NULL,
    period VARCHAR(100) NOT NULL,
    period_start DATETIME NOT NULL,
    spent_usd BIGINT NOT NULL,
    reserved_usd BIGINT NOT NULL,
    updated_at DATETIME NOT NULL,
    PRIMARY KEY (scope, period, period_start)
);
