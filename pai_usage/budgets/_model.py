"""What a budget is, what its state is, and what a refusal looks like."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, cast

from pydantic_ai.exceptions import UsageLimitExceeded

from ..record import normalize_label
from ._periods import Period, zone

__all__ = (
    'Budget',
    'BudgetExceeded',
    'BudgetMode',
    'BudgetStatus',
    'BudgetWarning',
    'ScopeKind',
    'budgets_from_json',
)

ScopeKind = Literal['organization', 'user']
"""What a budget's key identifies."""
BudgetMode = Literal['raise', 'warn']
"""`raise` refuses the request with `BudgetExceeded`; `warn` only emits a `BudgetWarning`."""

Dimension = Literal['organization', 'user', 'all']


def usd(amount: Decimal) -> str:
    # `Decimal('7.250000000000')` (as NUMERIC(24, 12) reads back) prints as 7.25, and 10 never as 1E+1.
    return f'{amount.normalize():f}'


def scope_name(dim: Dimension, key: str | None) -> str:
    """`organization:acme`, `user:u-42` or `all`: how refusals, reports and hard-mode counters name a scope."""
    return 'all' if dim == 'all' else f'{dim}:{key}'


def period_name(period: Period, timezone: str) -> str:
    """`month`, `day Europe/Paris`, `rolling 1 day, 0:00:00`: a period as reports and counters name it."""
    if isinstance(period, timedelta):
        return f'rolling {period}'
    return period if timezone.upper() == 'UTC' else f'{period} {timezone}'


@dataclass(frozen=True, kw_only=True)
class Budget:
    """A spending limit over a period, for one organization, one user, each tenant, or everything.

    Give at most one of `organization_id`, `user_id` and `scope`; with none, the budget caps all spend.
    Ids are normalized like the ledger's labels (`pai_usage.record.normalize_label`): `' acme '` is `acme`.
    """

    limit_usd: Decimal
    """The most that may be spent in one period, in USD."""
    period: Period = 'month'
    """`day`, `week` (from Monday) or `month` in `timezone`, or a `timedelta` for a rolling window."""
    timezone: str = 'UTC'
    """IANA time zone whose midnight starts a calendar period (`Europe/Paris`); ignored by rolling windows."""
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
    warn_at: tuple[float, ...] = ()
    """Soft limits, as fractions of `limit_usd` (e.g. `(0.5, 0.8)`): each fires once per period."""

    def __post_init__(self) -> None:
        given = [f for f in ('organization_id', 'user_id', 'scope') if getattr(self, f) is not None]
        if len(given) > 1:
            raise ValueError(f'a budget takes at most one of `organization_id`, `user_id` and `scope`, not {given}')
        for attribute in ('organization_id', 'user_id'):
            raw = getattr(self, attribute)
            if raw is not None:
                normalized = normalize_label(raw)
                if normalized is None:
                    raise ValueError(f'`{attribute}` {raw!r} is empty once normalized')
                object.__setattr__(self, attribute, normalized)  # frozen: the one place it is set
        limit = self.limit_usd  # a float would make every sum inexact: refuse it
        if not isinstance(limit, Decimal) or not limit.is_finite() or limit < 0:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f'`limit_usd` must be a finite, non-negative Decimal, not {self.limit_usd!r}')
        if isinstance(self.period, timedelta):
            if self.period <= timedelta(0):
                raise ValueError(f'a rolling `period` must be positive, not {self.period!r}')
        elif self.period not in ('day', 'week', 'month'):
            raise ValueError(f"`period` must be 'day', 'week', 'month' or a timedelta, not {self.period!r}")
        zone(self.timezone)  # raises ValueError if unknown
        if self.timezone.upper() == 'UTC':
            # One spelling: counters (in-process and hard mode's shared row) are keyed on it, and `'utc'` next to
            # `'UTC'` would count each record's spend twice in the one shared row both name.
            object.__setattr__(self, 'timezone', 'UTC')
        object.__setattr__(self, 'warn_at', tuple(sorted(self.warn_at)))
        if any(not 0 < f <= 1 for f in self.warn_at):
            raise ValueError(f'`warn_at` fractions must be in (0, 1], not {self.warn_at!r}')

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
        return f'{target}, ${usd(self.limit_usd)}/{period_name(self.period, self.timezone)}'

    @property
    def rolling(self) -> bool:
        """Whether the period is a rolling window rather than a calendar period."""
        return isinstance(self.period, timedelta)

    def target(self, organization_id: str | None, user_id: str | None, deps: Any) -> tuple[Dimension, str | None]:
        """Which spend this budget limits for a run with this (normalized) attribution; `LookupError` if none."""
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
            key, kind = normalize_label(self.scope(deps)), self.scope_kind
        if key is None:
            raise LookupError
        return kind, key


@dataclass(frozen=True, kw_only=True)
class BudgetStatus:
    """A budget's spend and reservations for one key over one period."""

    budget: Budget
    """The budget."""
    key: str | None
    """The organization or user id the spend is for (None for an all-usage budget)."""
    start: datetime
    """Start of the period (inclusive, UTC)."""
    end: datetime
    """End of the period (exclusive, UTC): when a calendar budget resets. For a rolling window, now."""
    spend_usd: Decimal
    """Spend counted in the period: settled requests, including those the ledger has not written yet."""
    reserved_usd: Decimal = Decimal(0)
    """Estimates held for requests in flight."""

    @property
    def scope(self) -> str:
        """`organization:acme`, `user:u-42` or `all`."""
        if self.key is None:
            return 'all'
        kind = self.budget.scope_kind if callable(self.budget.scope) else None
        if self.budget.organization_id is not None or self.budget.scope == 'organization' or kind == 'organization':
            return f'organization:{self.key}'
        return f'user:{self.key}'

    @property
    def remaining_usd(self) -> Decimal:
        """What may still be admitted in the period: limit minus spend and reservations (never negative)."""
        return max(self.budget.limit_usd - self.spend_usd - self.reserved_usd, Decimal(0))

    @property
    def exceeded(self) -> bool:
        """Whether spend has reached the limit."""
        return self.spend_usd >= self.budget.limit_usd

    @property
    def resets_at(self) -> datetime | None:
        """When a calendar budget starts again from zero; None for a rolling window."""
        return None if self.budget.rolling else self.end

    @property
    def message(self) -> str:
        """A sentence naming the budget, the spend and the limit."""
        budget = self.budget
        who = '' if self.key is None or self.key in budget.label else f' for {self.key!r}'
        if budget.rolling:
            when = f'in the last {budget.period}'
        else:
            when = {'day': 'today', 'week': 'this week', 'month': 'this month'}[cast(str, budget.period)]
            when = f'{when} ({budget.timezone}, since {self.start.astimezone(zone(budget.timezone)):%Y-%m-%d})'
        reserved = f' (+${usd(self.reserved_usd)} reserved in flight)' if self.reserved_usd else ''
        spent = f'spent ${usd(self.spend_usd)}{reserved} of ${usd(budget.limit_usd)} {when}'
        return f'Budget `{budget.label}`{who} exceeded: {spent}'


class BudgetExceeded(UsageLimitExceeded):
    """A request was refused: its budget's spend plus reservations would pass the limit."""

    def __init__(self, status: BudgetStatus, estimate_usd: Decimal = Decimal(0)) -> None:
        self.status = status
        self.estimate_usd = estimate_usd
        """The estimate the refused request would have reserved."""
        message = status.message
        if estimate_usd:
            message += f'; this request would reserve ${usd(estimate_usd)}'
        super().__init__(message)

    def __reduce__(self) -> tuple[type[BudgetExceeded], tuple[BudgetStatus, Decimal]]:
        return type(self), (self.status, self.estimate_usd)  # picklable (across processes) when its budget is

    @property
    def budget(self) -> Budget:
        """The budget exceeded."""
        return self.status.budget

    @property
    def scope(self) -> str:
        """`organization:acme`, `user:u-42` or `all`."""
        return self.status.scope

    @property
    def period(self) -> Period:
        """The budget's period."""
        return self.status.budget.period

    @property
    def period_start(self) -> datetime:
        """Start of the period whose spend was exceeded (UTC)."""
        return self.status.start

    @property
    def spend_usd(self) -> Decimal:
        """What was spent in the period when the request was refused."""
        return self.status.spend_usd

    @property
    def reserved_usd(self) -> Decimal:
        """What requests in flight had reserved when the request was refused."""
        return self.status.reserved_usd

    @property
    def limit_usd(self) -> Decimal:
        """The budget's limit."""
        return self.status.budget.limit_usd


class BudgetWarning(UserWarning):
    """Emitted instead of raising `BudgetExceeded` when `EnforceBudgets(mode='warn')`."""


_JSON_FIELDS = {'limit_usd', 'period', 'timezone', 'organization_id', 'user_id', 'scope', 'name', 'warn_at'}


def budgets_from_json(text: str) -> list[Budget]:
    """Budgets from JSON, for configuration files and `pai-usage budgets --file`.

    A list of objects with `limit_usd` and at most one of `organization_id`, `user_id` and `scope`
    (`"organization"` or `"user"`), plus optional `period` (`day`, `week`, `month`, or a number of seconds for a
    rolling window), `timezone`, `warn_at` (a list of fractions) and `name`:

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
        unknown = set(fields) - _JSON_FIELDS
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
        period = fields.get('period')
        if isinstance(period, (int, float)) and not isinstance(period, bool):
            fields['period'] = timedelta(seconds=period)
        if isinstance(fields.get('warn_at'), list):
            fields['warn_at'] = tuple(cast(list[Any], fields['warn_at']))
        try:
            budgets.append(Budget(**fields))
        except (TypeError, ValueError) as exc:
            raise ValueError(f'budget #{i + 1}: {exc}') from None
    return budgets
