-- Hard-mode reservations per holder (pai_usage/budgets/_hard.py, docs/budgets.md): what each process holds on
-- each counter of pai_usage_budget_counters, and when it last said it is alive. A process killed mid-request
-- stops heartbeating; once its heartbeat is older than the enforcer's hold_ttl, any other process gives its
-- reservations back to the counter. Amounts are scaled integers in 1e-12 USD, like the counters.
CREATE TABLE IF NOT EXISTS pai_usage_budget_holds (
    scope VARCHAR(300) NOT NULL,
    period VARCHAR(100) NOT NULL,
    period_start DATETIME NOT NULL,
    holder VARCHAR(200) NOT NULL,
    reserved_usd BIGINT NOT NULL,
    heartbeat_at DATETIME NOT NULL,
    PRIMARY KEY (scope, period, period_start, holder)
);
CREATE INDEX IF NOT EXISTS ix_pai_usage_budget_holds_heartbeat_at ON pai_usage_budget_holds (heartbeat_at);
