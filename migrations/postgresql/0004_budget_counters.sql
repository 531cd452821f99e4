-- Hard-mode budget counters (pai_usage/budgets/_hard.py, docs/budgets.md): one row per budget scope and
-- period, updated atomically by every process that enforces the budget, so that N processes together
-- keep the same bound as one. Not a SQLModel table: pai_usage/budgets/_hard.py defines it in Core.
-- scope: organization:<id>, user:<id> or all. period: month, week, day, with a time zone unless UTC.
CREATE TABLE IF NOT EXISTS pai_usage_budget_counters (
    scope VARCHAR(300) NOT NULL,
    period VARCHAR(100) NOT NULL,
    period_start TIMESTAMP WITH TIME ZONE NOT NULL,
    spent_usd NUMERIC(24, 12) NOT NULL,
    reserved_usd NUMERIC(24, 12) NOT NULL,
    updated_at TIMESTAMP WITH TIME ZONE NOT NULL,
    PRIMARY KEY (scope, period, period_start)
);
