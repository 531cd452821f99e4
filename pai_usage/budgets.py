"""Spending budgets per organization, user or tenant, enforced before each model request.

```python
budgets = EnforceBudgets(tracker, budgets=[Budget(scope='organization', limit_usd=Decimal(100))])
agent = Agent(model, deps_type=UsageDeps, capabilities=[TrackUsage(tracker), budgets])
```

`EnforceBudgets` checks the ledger's spend for the current UTC day or month before every model request,
from an in-memory cache: each (organization or user, period) is read from the database at most once per
`refresh_interval`, and records the tracker writes in this process in the meantime are added as they are
written. Periods are UTC calendar days and months, so a budget resets at 00:00 UTC on the 1st.
"""

from __future__ import annotations

import asyncio
import json
import threading
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal, cast
from uuid import UUID

import sqlalchemy as sa
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.exceptions import UsageLimitExceeded
from pydantic_ai.tools import AgentDepsT, RunContext
from sqlalchemy.exc import SQLAlchemyError

from ._format import format_usd
from ._log import RateLimitedLog
from .context import current_usage_context
from .record import UsageRecord
from .summary import month_bounds, query_summary

if TYPE_CHECKING:
    from pydantic_ai.models import ModelRequestContext

    from .tracker import UsageTracker

__all__ = (
    'Budget',
    'BudgetExceeded',
    'BudgetMode',
    'BudgetStatus',
    'BudgetWarning',
    'EnforceBudgets',
    'Period',
    'ScopeKind',
    'budget_report',
    'budgets_from_json',
    'format_budgets',
    'period_bounds',
)

Period = Literal['month', 'day']
"""A UTC calendar period a budget resets on."""
ScopeKind = Literal['organization', 'user']
"""What a budget's key identifies."""
BudgetMode = Literal['raise', 'warn']
"""`raise` stops the run with `BudgetExceeded`; `warn` only emits a `BudgetWarning`."""

_log = RateLimitedLog()

_Dimension = Literal['organization', 'user', 'all']
_CacheKey = tuple[_Dimension, str | None, Period, datetime]


def period_bounds(period: Period, moment: datetime) -> tuple[datetime, datetime]:
    """The UTC calendar day or month containing `moment`, as `[start, end)`."""
    if moment.tzinfo is None:
        raise ValueError('`moment` must be timezone-aware')
    if period == 'month':
        return month_bounds(moment)
    moment = moment.astimezone(UTC)
    start = datetime(moment.year, moment.month, moment.day, tzinfo=UTC)
    return start, start + timedelta(days=1)


@dataclass(frozen=True, kw_only=True)
class Budget:
    """A spending limit over a UTC calendar period, for one organization, one user, each tenant, or everything.

    Give at most one of `organization_id`, `user_id` and `scope`; with none, the budget caps all spend.
    """

    limit_usd: Decimal
    """The most that may be spent in one period, in USD. Requests stop once spend reaches it."""
    period: Period = 'month'
    """`month` or `day`, in UTC."""
    organization_id: str | None = None
    """A budget for this organization only."""
    user_id: str | None = None
    """A budget for this user only."""
    scope: ScopeKind | Callable[[Any], str | None] | None = None
    """One budget per tenant: `'organization'` or `'user'` for the run's own organization or user, or a
    callable that takes the run's deps and returns the key (None: the budget does not apply to the run)."""
    scope_kind: ScopeKind = 'organization'
    """What a callable `scope` returns: an organization id (default) or a user id."""
    name: str | None = None
    """How messages and reports name the budget; derived from the fields when None."""

    def __post_init__(self) -> None:
        given = [f for f in ('organization_id', 'user_id', 'scope') if getattr(self, f) is not None]
        if len(given) > 1:
            raise ValueError(f'a budget takes at most one of `organization_id`, `user_id` and `scope`, not {given}')
        limit = self.limit_usd  # a float would make every sum inexact: refuse it
        if not isinstance(limit, Decimal) or not limit.is_finite() or limit < 0:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f'`limit_usd` must be a finite, non-negative Decimal, not {self.limit_usd!r}')
        if self.period not in ('month', 'day'):
            raise ValueError(f"`period` must be 'month' or 'day', not {self.period!r}")

    @property
    def label(self) -> str:
        """The budget's name, or a description of it."""
        if self.name:
            return self.name
        if self.organization_id is not None:
            target = f'organization {self.organization_id}'
        elif self.user_id is not None:
            target = f'user {self.user_id}'
        elif self.scope is None:
            target = 'all usage'
        else:
            target = f'per {self.scope if isinstance(self.scope, str) else self.scope_kind}'
        return f'{target}, ${_usd(self.limit_usd)}/{self.period}'

    def target(self, organization_id: str | None, user_id: str | None, deps: Any) -> tuple[_Dimension, str | None]:
        """Which spend this budget limits for a run with this attribution, or raise `LookupError` if none."""
        if self.organization_id is not None:
            if organization_id != self.organization_id:
                raise LookupError
            return 'organization', organization_id
        if self.user_id is not None:
            if user_id != self.user_id:
                raise LookupError
            return 'user', user_id
        if self.scope is None:
            return 'all', None
        if self.scope == 'organization':
            key, kind = organization_id, 'organization'
        elif self.scope == 'user':
            key, kind = user_id, 'user'
        else:
            key, kind = self.scope(deps), self.scope_kind
        if key is None:
            raise LookupError
        return kind, key


class BudgetExceeded(UsageLimitExceeded):
    """A model request was refused because a budget's spend for the current period reached its limit."""

    def __init__(self, status: BudgetStatus) -> None:
        self.status = status
        super().__init__(status.message)

    def __reduce__(self) -> tuple[type[BudgetExceeded], tuple[BudgetStatus]]:
        return type(self), (self.status,)  # picklable (across processes) when its budget is

    @property
    def budget(self) -> Budget:
        """The budget exceeded."""
        return self.status.budget

    @property
    def spend_usd(self) -> Decimal:
        """What was spent in the period when the request was refused."""
        return self.status.spend_usd

    @property
    def limit_usd(self) -> Decimal:
        """The budget's limit."""
        return self.status.budget.limit_usd


class BudgetWarning(UserWarning):
    """Emitted instead of raising `BudgetExceeded` when `EnforceBudgets(mode='warn')`."""


@dataclass(frozen=True, kw_only=True)
class BudgetStatus:
    """A budget's spend for one key over one period."""

    budget: Budget
    """The budget."""
    key: str | None
    """The organization or user id the spend is for (None for an all-usage budget)."""
    start: datetime
    """Start of the period (inclusive, UTC)."""
    end: datetime
    """End of the period (exclusive, UTC)."""
    spend_usd: Decimal
    """Known spend in the period."""

    @property
    def remaining_usd(self) -> Decimal:
        """What may still be spent in the period (never negative)."""
        return max(self.budget.limit_usd - self.spend_usd, Decimal(0))

    @property
    def exceeded(self) -> bool:
        """Whether spend has reached the limit."""
        return self.spend_usd >= self.budget.limit_usd

    @property
    def message(self) -> str:
        """A sentence naming the budget, the spend and the limit."""
        who = '' if self.key is None or self.key in self.budget.label else f' for {self.key!r}'
        return (
            f'Budget `{self.budget.label}`{who} exceeded: spent ${_usd(self.spend_usd)} '
            f'of ${_usd(self.budget.limit_usd)} {"this month" if self.budget.period == "month" else "today"} '
            f'(UTC, since {self.start:%Y-%m-%d})'
        )


@dataclass
class _Spend:
    """Cached spend of one key over one period."""

    start: datetime
    end: datetime
    db_usd: Decimal = Decimal(0)
    fetched_at: datetime | None = None
    local: dict[UUID, Decimal] = field(default_factory=dict[UUID, Decimal])
    """Costs of records this process wrote after the last read began: not (surely) in `db_usd` yet."""
    refresh_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def total(self) -> Decimal:
        return self.db_usd + sum(self.local.values(), Decimal(0))


def _usd(amount: Decimal) -> str:
    # `Decimal('7.250000000000')` (as NUMERIC(24, 12) reads back) prints as 7.25, and 10 never as 1E+1.
    return f'{amount.normalize():f}'


def _utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


@dataclass
class EnforceBudgets(AbstractCapability[AgentDepsT]):
    """A PydanticAI capability that refuses model requests once a budget's spend reaches its limit.

    It reads spend from the tracker's database, caches it for `refresh_interval` seconds per organization,
    user and period, and adds the cost of each record the tracker writes in the meantime. Records written by
    other processes count from the next refresh. Combine it with `TrackUsage`, which records the spend.

    The run's organization and user come from its deps (`organization_id`, `user_id` attributes), else from
    the ambient `UsageContext`.
    """

    tracker: UsageTracker
    """The tracker whose database holds the ledger; its writes are added to the cached spend."""
    _: KW_ONLY
    budgets: Sequence[Budget] = ()
    """The budgets to enforce; every one that applies to a run is checked."""
    mode: BudgetMode = 'raise'
    """`raise` (refuse the request) or `warn` (emit a `BudgetWarning` and go on)."""
    refresh_interval: float = 60.0
    """Seconds a cached spend is trusted before it is read from the database again."""
    clock: Callable[[], datetime] = _utcnow
    """Returns the current time (timezone-aware): injectable for tests."""
    fail_open: bool = True
    """When spend cannot be read (database down), allow requests on the last known spend and log an error,
    rather than fail every run. False raises the database error instead."""

    _cache: dict[_CacheKey, _Spend] = field(default_factory=dict[_CacheKey, _Spend], init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in ('raise', 'warn'):
            raise ValueError(f"`mode` must be 'raise' or 'warn', not {self.mode!r}")
        # A weak reference: the tracker outlives enforcers, and must not keep discarded ones (and caches) alive.
        observe = weakref.WeakMethod(self.observe)

        def listener(record: UsageRecord) -> None:
            method = observe()
            if method is not None:
                method(record)

        self.tracker.add_listener(listener)

    @classmethod
    def get_serialization_name(cls) -> str | None:
        return None  # takes a tracker and callables: not spec-serializable

    async def before_model_request(
        self, ctx: RunContext[AgentDepsT], request_context: ModelRequestContext
    ) -> ModelRequestContext:
        """Check every applicable budget; raise `BudgetExceeded` (or warn) if one is exhausted."""
        now = self.clock()
        targets = self._targets(ctx.deps)
        if not targets:
            return request_context
        stale = [key for key in self._keys(targets, now) if self._is_stale(key, now)]
        if stale:
            await asyncio.to_thread(self._refresh_all, stale, now)
        self._enforce(targets, now)
        return request_context

    def check(self, deps: Any = None, *, organization_id: str | None = None, user_id: str | None = None) -> None:
        """The same check outside an agent run (e.g. before a direct API call). May block on a refresh."""
        now = self.clock()
        targets = self._targets(deps, organization_id, user_id)
        self._refresh_all([key for key in self._keys(targets, now) if self._is_stale(key, now)], now)
        self._enforce(targets, now)

    def statuses(
        self, deps: Any = None, *, organization_id: str | None = None, user_id: str | None = None
    ) -> list[BudgetStatus]:
        """The budgets that apply to this attribution, with their spend (refreshed if stale)."""
        now = self.clock()
        targets = self._targets(deps, organization_id, user_id)
        self._refresh_all([key for key in self._keys(targets, now) if self._is_stale(key, now)], now)
        return [self._status(budget, dim, key, now) for budget, dim, key in targets]

    def observe(self, record: UsageRecord) -> None:
        """Tracker listener: add a written record's cost to the cached spend it belongs to."""
        if record.cost_usd is None or not record.cost_usd:
            return
        targets: tuple[tuple[_Dimension, str | None], ...] = (
            ('organization', record.organization_id),
            ('user', record.user_id),
            ('all', None),
        )
        periods: tuple[Period, ...] = ('month', 'day')
        with self._lock:
            if not self._cache:
                return
            for period in periods:
                start, _ = period_bounds(period, record.created_at)
                for dim, key in targets:
                    spend = self._cache.get((dim, key, period, start))
                    if spend is not None:
                        spend.local[record.id] = record.cost_usd

    def _targets(
        self, deps: Any, organization_id: str | None = None, user_id: str | None = None
    ) -> list[tuple[Budget, _Dimension, str | None]]:
        if organization_id is None and user_id is None:
            organization_id, user_id = _attribution(deps)
        targets: list[tuple[Budget, _Dimension, str | None]] = []
        for budget in self.budgets:
            try:
                dim, key = budget.target(organization_id, user_id, deps)
            except LookupError:
                continue
            targets.append((budget, dim, key))
        return targets

    def _keys(self, targets: Iterable[tuple[Budget, _Dimension, str | None]], now: datetime) -> list[_CacheKey]:
        keys: set[_CacheKey] = {
            (dim, key, budget.period, period_bounds(budget.period, now)[0]) for budget, dim, key in targets
        }
        return sorted(keys, key=repr)

    def _is_stale(self, key: _CacheKey, now: datetime) -> bool:
        spend = self._cache.get(key)
        if spend is None or spend.fetched_at is None:
            return True
        age = (now - spend.fetched_at).total_seconds()
        return age >= self.refresh_interval or age < 0

    def _refresh_all(self, keys: Sequence[_CacheKey], now: datetime) -> None:
        for key in keys:
            self._refresh(key, now)

    def _refresh(self, key: _CacheKey, now: datetime) -> None:
        dim, value, period, start = key
        with self._lock:
            spend = self._cache.get(key)
            if spend is None:
                # A new period for this key: forget its previous periods.
                for old in [k for k in self._cache if k[:3] == key[:3]]:
                    del self._cache[old]
                spend = self._cache[key] = _Spend(start, period_bounds(period, start)[1])
        with spend.refresh_lock:
            if not self._is_stale(key, now):
                return  # another caller refreshed it while we waited
            with self._lock:
                # Records written before the read begins are in its result; later ones may or may not be,
                # so they stay in `local` until the next refresh (at worst counted twice until then).
                seen = set(spend.local)
            try:
                total = _spend(self.tracker.engine, dim, value, spend.start, spend.end)
            except SQLAlchemyError as exc:
                if not _has_ledger(self.tracker.engine):
                    total = Decimal(0)  # nothing tracked yet: the writer creates the table on its first write
                elif self.fail_open:
                    # Keep the last known spend (plus this process's writes) and try again next interval.
                    _log.error('budget-read', 'pai-usage: could not read spend for budgets, allowing: %r', exc)
                    with self._lock:
                        spend.fetched_at = now
                    return
                else:
                    raise
            with self._lock:
                spend.db_usd = total
                spend.fetched_at = now
                for record_id in seen:
                    spend.local.pop(record_id, None)

    def _status(self, budget: Budget, dim: _Dimension, key: str | None, now: datetime) -> BudgetStatus:
        start, end = period_bounds(budget.period, now)
        with self._lock:
            spend = self._cache.get((dim, key, budget.period, start))
            total = spend.total if spend is not None else Decimal(0)
        return BudgetStatus(budget=budget, key=key, start=start, end=end, spend_usd=total)

    def _enforce(self, targets: Sequence[tuple[Budget, _Dimension, str | None]], now: datetime) -> None:
        for budget, dim, key in targets:
            status = self._status(budget, dim, key, now)
            if not status.exceeded:
                continue
            if self.mode == 'raise':
                raise BudgetExceeded(status)
            warnings.warn(status.message, BudgetWarning, stacklevel=3)


def _attribution(deps: Any) -> tuple[str | None, str | None]:
    organization_id = getattr(deps, 'organization_id', None)
    user_id = getattr(deps, 'user_id', None)
    context = current_usage_context()
    if context is not None:
        organization_id = organization_id if isinstance(organization_id, str) else context.organization_id
        user_id = user_id if isinstance(user_id, str) else context.user_id
    return (
        organization_id if isinstance(organization_id, str) else None,
        user_id if isinstance(user_id, str) else None,
    )


def _has_ledger(engine: sa.Engine) -> bool:
    try:
        with engine.connect() as conn:
            return sa.inspect(conn).has_table('token_usage')
    except SQLAlchemyError:
        return True  # unreachable: report the original error


def _spend(engine: sa.Engine, dim: _Dimension, key: str | None, start: datetime, end: datetime) -> Decimal:
    summary = query_summary(
        engine,
        start,
        end,
        organization_id=key if dim == 'organization' else None,
        user_id=key if dim == 'user' else None,
        group_by=(),
    )
    return summary.totals.cost_usd


def budgets_from_json(text: str) -> list[Budget]:
    """Budgets from JSON, for configuration files and `pai-usage budgets --file`.

    A list of objects with `limit_usd` and at most one of `organization_id`, `user_id` and `scope`
    (`"organization"` or `"user"`), plus optional `period` and `name`:

    ```json
    [{"scope": "organization", "limit_usd": "100"}, {"organization_id": "acme", "limit_usd": "20", "period": "day"}]
    ```

    Raises `ValueError` on anything else.
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f'budgets are not valid JSON: {exc}') from None
    if not isinstance(data, list):
        raise ValueError('budgets must be a JSON list of objects')
    budgets: list[Budget] = []
    for i, item in enumerate(cast(list[Any], data)):
        if not isinstance(item, dict):
            raise ValueError(f'budget #{i + 1} is not an object')
        fields = cast(dict[str, Any], item)
        unknown = set(fields) - {'limit_usd', 'period', 'organization_id', 'user_id', 'scope', 'name'}
        if unknown:
            raise ValueError(f'budget #{i + 1} has unknown fields {sorted(unknown)}')
        if fields.get('scope') not in (None, 'organization', 'user'):
            raise ValueError(f"budget #{i + 1}: `scope` must be 'organization' or 'user' in JSON")
        limit = fields.get('limit_usd')
        if isinstance(limit, bool) or not isinstance(limit, (str, int, float)):
            raise ValueError(f'budget #{i + 1} needs a `limit_usd`')
        try:
            # Through `str`, so that 0.1 is exactly 0.1, not the float nearest to it.
            fields['limit_usd'] = Decimal(str(limit))
        except ArithmeticError:
            raise ValueError(f'budget #{i + 1}: `limit_usd` {limit!r} is not a number') from None
        try:
            budgets.append(Budget(**fields))
        except (TypeError, ValueError) as exc:
            raise ValueError(f'budget #{i + 1}: {exc}') from None
    return budgets


def budget_report(engine: sa.Engine, budgets: Sequence[Budget], *, now: datetime | None = None) -> list[BudgetStatus]:
    """Spend against every budget for the current period; per-tenant budgets list each key with spend.

    This is what `pai-usage budgets` prints (through `format_budgets`). Reads the database.
    """
    now = now or _utcnow()
    statuses: list[BudgetStatus] = []
    for budget in budgets:
        start, end = period_bounds(budget.period, now)
        if budget.scope is None:
            dim: _Dimension = (
                'organization' if budget.organization_id is not None else 'user' if budget.user_id else 'all'
            )
            key = budget.organization_id if dim == 'organization' else budget.user_id
            statuses.append(
                BudgetStatus(
                    budget=budget, key=key, start=start, end=end, spend_usd=_spend(engine, dim, key, start, end)
                )
            )
            continue
        kind = budget.scope if isinstance(budget.scope, str) else budget.scope_kind
        group = 'organization' if kind == 'organization' else 'user'
        summary = query_summary(engine, start, end, group_by=(group,))
        for row in summary.rows:
            key = row.group[group]
            if key is not None:
                statuses.append(
                    BudgetStatus(budget=budget, key=key, start=start, end=end, spend_usd=row.totals.cost_usd)
                )
    return statuses


def format_budgets(statuses: Iterable[BudgetStatus], *, width: int = 20) -> str:
    """A plain-text table of spend against limits, with a bar per row (`pai-usage budgets`)."""
    lines = [f'{"budget":<36} {"key":<20} {"period":<10} {"spend":>14} {"limit":>14} {"used":>6}  ']
    for status in statuses:
        limit = status.budget.limit_usd
        used = status.spend_usd / limit if limit else Decimal(1 if status.spend_usd else 0)
        filled = min(int(used * width), width)
        bar = '#' * filled + '.' * (width - filled)
        flag = '  EXCEEDED' if status.exceeded else ''
        lines.append(
            f'{status.budget.label[:36]:<36} {(status.key or "-")[:20]:<20} {status.start:%Y-%m-%d} '
            f'{format_usd(status.spend_usd):>14} {format_usd(limit):>14} {used:>6.0%}  {bar}{flag}'
        )
    return '\n'.join(line.rstrip() for line in lines)
