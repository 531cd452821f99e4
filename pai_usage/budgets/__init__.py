"""Spending budgets per organization, user, tenant or everything, held before each request.

```python
budgets = EnforceBudgets(tracker, budgets=[Budget(scope='organization', limit_usd=Decimal(100))])
agent = Agent(model, deps_type=UsageDeps, capabilities=[TrackUsage(tracker), budgets])
```

Spend counts the moment a request settles (the tracker's `track()` hands each record to the enforcer before
its writer has it), every request reserves an estimate before it starts, and a request is refused when spent +
reserved + its estimate would pass the limit. In one process, spend exceeds a limit by at most one request per
concurrent run; `hard=True` keeps the same bound across processes with atomic counters in the database. The
ledger is re-read every `refresh_interval` for spend no enforcer saw. See `docs/budgets.md`.
"""

from __future__ import annotations

from ._enforce import (
    REFUSED_SOURCE,
    WARNING_EVENT,
    BudgetHold,
    EnforceBudgets,
    Estimate,
    budget_report,
    format_budgets,
    reserve_direct,
)
from ._hard import BUDGET_COUNTERS, BUDGET_HOLDS
from ._model import (
    Budget,
    BudgetExceeded,
    BudgetMode,
    BudgetStatus,
    BudgetWarning,
    ScopeKind,
    budgets_from_json,
)
from ._periods import CalendarPeriod, Period, period_bounds

__all__ = (
    'BUDGET_COUNTERS',
    'BUDGET_HOLDS',
    'REFUSED_SOURCE',
    'WARNING_EVENT',
    'Budget',
    'BudgetExceeded',
    'BudgetHold',
    'BudgetMode',
    'BudgetStatus',
    'BudgetWarning',
    'CalendarPeriod',
    'EnforceBudgets',
    'Estimate',
    'Period',
    'ScopeKind',
    'budget_report',
    'budgets_from_json',
    'format_budgets',
    'period_bounds',
    'reserve_direct',
)
