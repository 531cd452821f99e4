from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic_ai import Agent
from pydantic_ai.exceptions import UsageLimitExceeded
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

from pai_usage import UsageTracker, usage_context
from pai_usage.budgets import (
    Budget,
    BudgetExceeded,
    BudgetWarning,
    EnforceBudgets,
    budget_report,
    format_budgets,
    period_bounds,
)
from pai_usage.deps import UsageDeps

pytestmark = pytest.mark.anyio

US = timedelta(microseconds=1)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class SpendQueries:
    """Counts the SUM queries a budget check sends to the database."""

    def __init__(self, engine: sa.Engine) -> None:
        self.count = 0
        sa.event.listen(engine, 'before_cursor_execute', self._on_execute)

    def _on_execute(self, *args: Any) -> None:
        statement: str = args[2]
        if statement.lstrip().upper().startswith('SELECT') and 'sum(' in statement.lower():
            self.count += 1


def reply(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(
        parts=[TextPart('ok')], provider_name='openai', usage=RequestUsage(input_tokens=100, output_tokens=10)
    )


def agent(enforcer: EnforceBudgets[Any]) -> Agent[Any, str]:
    return Agent(FunctionModel(reply, model_name='gpt-4o'), deps_type=object, capabilities=[enforcer])


@pytest.fixture
def fast_tracker(database_url: str) -> Iterator[UsageTracker]:
    with UsageTracker(database_url, flush_interval=0.005) as tracker:
        yield tracker
    tracker.engine.dispose()


def seed(tracker: UsageTracker, *spends: tuple[datetime, str, str]) -> None:
    for created_at, organization_id, cost in spends:
        tracker.track(
            organization_id=organization_id,
            user_id=f'{organization_id}-user',
            provider='openai',
            model='gpt-4o',
            cost_usd=Decimal(cost),
            created_at=created_at,
        )
    assert tracker.flush()


ACME = UsageDeps(organization_id='acme', user_id='acme-user')
GLOBEX = UsageDeps(organization_id='globex', user_id='globex-user')


@pytest.mark.parametrize(
    'new_period',
    [datetime(2026, 2, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)],
    ids=['month-end', 'december-to-january'],
)
async def test_month_boundary(fast_tracker: UsageTracker, new_period: datetime) -> None:
    old_start, old_end = period_bounds('month', new_period - US)
    assert old_end == new_period
    seed(
        fast_tracker,
        (old_start - US, 'acme', '100'),  # the month before: never counted
        (old_start, 'acme', '3'),
        (new_period - US, 'acme', '3'),
        (new_period, 'acme', '1'),  # first instant of the new month
    )
    clock = Clock(new_period - US)
    enforcer = EnforceBudgets(
        fast_tracker, budgets=[Budget(organization_id='acme', limit_usd=Decimal(5))], refresh_interval=3600, clock=clock
    )

    assert [s.spend_usd for s in enforcer.statuses(ACME)] == [Decimal(3 + 3)]
    with pytest.raises(BudgetExceeded):
        await agent(enforcer).run('hi', deps=ACME)

    # The new month starts at 00:00 UTC on the 1st, however fresh the cache of the old one is.
    clock.now = new_period
    result = await agent(enforcer).run('hi', deps=ACME)
    assert result.output == 'ok'
    assert [s.spend_usd for s in enforcer.statuses(ACME)] == [Decimal(1)]


async def test_day_boundary(fast_tracker: UsageTracker) -> None:
    day = datetime(2026, 3, 10, tzinfo=UTC)
    seed(
        fast_tracker,
        (day - US, 'acme', '2'),
        (day, 'acme', '3'),
        (day + timedelta(days=1) - US, 'acme', '3'),
        (day + timedelta(days=1), 'acme', '1'),
    )
    daily = Budget(organization_id='acme', limit_usd=Decimal(5), period='day', name='acme daily')
    monthly = Budget(organization_id='acme', limit_usd=Decimal(50), name='acme monthly')
    clock = Clock(day + timedelta(days=1) - US)
    enforcer = EnforceBudgets(fast_tracker, budgets=[daily, monthly], refresh_interval=3600, clock=clock)

    with pytest.raises(BudgetExceeded) as exc_info:
        await agent(enforcer).run('hi', deps=ACME)
    assert exc_info.value.budget is daily
    assert exc_info.value.spend_usd == Decimal(3 + 3)
    assert 'spent $6 of $5 today (UTC, since 2026-03-10)' in str(exc_info.value)

    clock.now = day + timedelta(days=1)
    assert (await agent(enforcer).run('hi', deps=ACME)).output == 'ok'
    spend = {s.budget.name: s.spend_usd for s in enforcer.statuses(ACME)}
    assert spend == {'acme daily': Decimal(1), 'acme monthly': Decimal(2 + 3 + 3 + 1)}


async def test_exception_names_budget_spend_and_limit(fast_tracker: UsageTracker) -> None:
    now = datetime(2026, 5, 5, 12, tzinfo=UTC)
    seed(fast_tracker, (now - timedelta(hours=1), 'acme', '7.25'))
    budget = Budget(organization_id='acme', limit_usd=Decimal('7.25'), name='acme cap')
    enforcer = EnforceBudgets(fast_tracker, budgets=[budget], clock=Clock(now))

    with pytest.raises(UsageLimitExceeded) as exc_info:  # a pydantic-ai usage-limit error, like `UsageLimits`
        await agent(enforcer).run('hi', deps=ACME)
    error = exc_info.value
    assert isinstance(error, BudgetExceeded)
    assert (error.budget, error.spend_usd, error.limit_usd) == (budget, Decimal('7.25'), Decimal('7.25'))
    assert '`acme cap`' in str(error)
    assert 'spent $7.25 of $7.25 this month' in str(error)
    assert 'since 2026-05-01' in str(error)


async def test_warn_mode(fast_tracker: UsageTracker) -> None:
    now = datetime(2026, 5, 5, tzinfo=UTC)
    seed(fast_tracker, (now, 'acme', '6'))
    enforcer = EnforceBudgets(
        fast_tracker, budgets=[Budget(organization_id='acme', limit_usd=Decimal(5))], mode='warn', clock=Clock(now)
    )
    with pytest.warns(BudgetWarning, match=r'spent \$6 of \$5 this month'):
        result = await agent(enforcer).run('hi', deps=ACME)
    assert result.output == 'ok'


async def test_org_without_budget(fast_tracker: UsageTracker) -> None:
    now = datetime(2026, 5, 5, tzinfo=UTC)
    seed(fast_tracker, (now, 'acme', '6'), (now, 'globex', '600'))
    enforcer = EnforceBudgets(
        fast_tracker, budgets=[Budget(organization_id='acme', limit_usd=Decimal(5))], clock=Clock(now)
    )
    queries = SpendQueries(fast_tracker.engine)

    assert (await agent(enforcer).run('hi', deps=GLOBEX)).output == 'ok'
    assert (await agent(enforcer).run('hi')).output == 'ok'  # no attribution at all
    assert queries.count == 0  # no budget applies: nothing to read
    with pytest.raises(BudgetExceeded):
        await agent(enforcer).run('hi', deps=ACME)
    assert queries.count == 1


async def test_cached_spend_and_this_process_writes(fast_tracker: UsageTracker) -> None:
    now = datetime(2026, 5, 5, tzinfo=UTC)
    seed(fast_tracker, (now, 'acme', '2'))
    clock = Clock(now)
    enforcer = EnforceBudgets(
        fast_tracker, budgets=[Budget(organization_id='acme', limit_usd=Decimal(5))], refresh_interval=60, clock=clock
    )
    queries = SpendQueries(fast_tracker.engine)

    for _ in range(3):
        await agent(enforcer).run('hi', deps=ACME)
    assert queries.count == 1  # one read per key and interval, not one per request

    # Records this process writes count at once, without a read (other processes' count at the next refresh).
    seed(fast_tracker, (now, 'acme', '1.5'), (now, 'globex', '50'), (now - timedelta(days=40), 'acme', '50'))
    assert [s.spend_usd for s in enforcer.statuses(ACME)] == [Decimal('3.5')]
    seed(fast_tracker, (now, 'acme', '1.5'))
    with pytest.raises(BudgetExceeded):
        await agent(enforcer).run('hi', deps=ACME)
    assert queries.count == 1

    clock.now += timedelta(seconds=60)
    with pytest.raises(BudgetExceeded) as exc_info:
        await agent(enforcer).run('hi', deps=ACME)
    assert queries.count == 2
    assert exc_info.value.spend_usd == Decimal(2 + 1.5 + 1.5)  # refreshed from the database, nothing counted twice


async def test_concurrent_runs(fast_tracker: UsageTracker) -> None:
    now = datetime(2026, 5, 5, tzinfo=UTC)
    seed(fast_tracker, (now, 'acme', '4'))
    enforcer = EnforceBudgets(
        fast_tracker, budgets=[Budget(organization_id='acme', limit_usd=Decimal(5))], clock=Clock(now)
    )
    queries = SpendQueries(fast_tracker.engine)

    results = await asyncio.gather(*(agent(enforcer).run('hi', deps=ACME) for _ in range(20)))
    assert [r.output for r in results] == ['ok'] * 20
    assert queries.count == 1  # cold cache, 20 runs at once: one read

    seed(fast_tracker, (now, 'acme', '1'))
    outcomes = await asyncio.gather(
        *(agent(enforcer).run('hi', deps=ACME) for _ in range(20)),
        *(agent(enforcer).run('hi', deps=GLOBEX) for _ in range(5)),
        return_exceptions=True,
    )
    assert all(isinstance(o, BudgetExceeded) for o in outcomes[:20])
    assert all(not isinstance(o, BaseException) for o in outcomes[20:])
    assert queries.count == 1


@dataclass
class TenantDeps:
    tenant: str | None


async def test_per_tenant_scopes(fast_tracker: UsageTracker) -> None:
    now = datetime(2026, 5, 5, tzinfo=UTC)
    seed(fast_tracker, (now, 'acme', '6'), (now, 'globex', '1'))
    enforcer = EnforceBudgets(
        fast_tracker,
        budgets=[Budget(scope=lambda deps: deps.tenant, limit_usd=Decimal(5))],
        clock=Clock(now),
    )
    with pytest.raises(BudgetExceeded, match="for 'acme'"):
        await agent(enforcer).run('hi', deps=TenantDeps('acme'))
    assert (await agent(enforcer).run('hi', deps=TenantDeps('globex'))).output == 'ok'
    assert (await agent(enforcer).run('hi', deps=TenantDeps(None))).output == 'ok'

    # Per user, from the ambient usage context when the deps carry no attribution.
    per_user = EnforceBudgets(fast_tracker, budgets=[Budget(scope='user', limit_usd=Decimal(2))], clock=Clock(now))
    with usage_context(organization_id='acme', user_id='globex-user'):
        assert (await agent(per_user).run('hi')).output == 'ok'
    with usage_context(organization_id='globex', user_id='acme-user'), pytest.raises(BudgetExceeded):
        await agent(per_user).run('hi')


def test_check_outside_a_run(fast_tracker: UsageTracker) -> None:
    now = datetime(2026, 5, 5, tzinfo=UTC)
    seed(fast_tracker, (now, 'acme', '6'))
    enforcer = EnforceBudgets(
        fast_tracker, budgets=[Budget(user_id='acme-user', limit_usd=Decimal(5))], clock=Clock(now)
    )
    enforcer.check(organization_id='acme', user_id='globex-user')
    with pytest.raises(BudgetExceeded, match='user acme-user'):
        enforcer.check(user_id='acme-user')


@pytest.mark.parametrize(
    ('fields', 'match'),
    [
        ({'organization_id': 'a', 'user_id': 'b'}, 'at most one'),
        ({'organization_id': 'a', 'scope': 'user'}, 'at most one'),
        ({'limit_usd': Decimal(-1)}, 'non-negative'),
        ({'limit_usd': Decimal('NaN')}, 'finite'),
        ({'limit_usd': 5.0}, 'Decimal'),
        ({'period': 'week'}, 'period'),
    ],
)
def test_budget_validation(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Budget(**{'limit_usd': Decimal(1), **fields})


def test_report_and_format(sqlite_url: str) -> None:
    now = datetime(2026, 5, 15, tzinfo=UTC)
    with UsageTracker(sqlite_url, flush_interval=0.005) as tracker:
        seed(tracker, (now, 'acme', '6'), (now, 'globex', '1'), (now - timedelta(days=5), 'globex', '1'))
        budgets = [
            Budget(scope='organization', limit_usd=Decimal(5)),
            Budget(limit_usd=Decimal(100), period='day', name='everything'),
        ]
        statuses = budget_report(tracker.engine, budgets, now=now)
    tracker.engine.dispose()

    assert [(s.budget.label, s.key, s.spend_usd, s.exceeded) for s in statuses] == [
        ('per organization, $5/month', 'acme', Decimal(6), True),
        ('per organization, $5/month', 'globex', Decimal(2), False),
        ('everything', None, Decimal(7), False),
    ]
    assert statuses[1].remaining_usd == Decimal(3)
    text = format_budgets(statuses).splitlines()
    assert len(text) == 4
    assert 'acme' in text[1] and text[1].endswith('EXCEEDED') and '120%' in text[1]
    assert 'globex' in text[2] and not text[2].endswith('EXCEEDED') and '40%' in text[2]
    assert '2026-05-15' in text[3] and '2026-05-01' in text[1]


@pytest.mark.parametrize(
    ('period', 'moment', 'expected'),
    [
        ('month', datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), ((2026, 12, 1), (2027, 1, 1))),
        ('month', datetime(2027, 1, 1, tzinfo=UTC), ((2027, 1, 1), (2027, 2, 1))),
        # 00:30 on New Year's Day in Paris is still December in UTC.
        ('month', datetime(2027, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))), ((2026, 12, 1), (2027, 1, 1))),
        ('day', datetime(2028, 2, 28, 23, 59, tzinfo=UTC), ((2028, 2, 28), (2028, 2, 29))),
        ('day', datetime(2028, 2, 29, 22, 0, tzinfo=timezone(timedelta(hours=-5))), ((2028, 3, 1), (2028, 3, 2))),
    ],
)
def test_period_bounds(period: Any, moment: datetime, expected: tuple[tuple[int, ...], tuple[int, ...]]) -> None:
    start, end = expected
    assert period_bounds(period, moment) == (datetime(*start, tzinfo=UTC), datetime(*end, tzinfo=UTC))


def test_period_bounds_rejects_naive() -> None:
    with pytest.raises(ValueError, match='timezone-aware'):
        period_bounds('day', datetime(2026, 1, 1))
