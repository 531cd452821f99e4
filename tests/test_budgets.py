from __future__ import annotations

# ruff: noqa: F811  (the fake Gemini server's fixtures are imported, then named as test arguments)
import asyncio
import gc
import json
import logging
import pickle
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import genai_prices
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from google import genai
from pydantic_ai import Agent, RunContext
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.exceptions import UsageLimitExceeded
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.fallback import FallbackModel
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel
from pydantic_ai.usage import RequestUsage, UsageLimits

import pai_usage.budgets._enforce as budgets_enforce
from pai_usage import PriceTable, TokenPrice, TrackUsage, UsageTracker, usage_context
from pai_usage.budgets import (
    BUDGET_COUNTERS,
    BUDGET_HOLDS,
    WARNING_EVENT,
    Budget,
    BudgetExceeded,
    BudgetHold,
    BudgetStatus,
    BudgetWarning,
    EnforceBudgets,
    budget_report,
    budgets_from_json,
    format_budgets,
    period_bounds,
)
from pai_usage.budgets._periods import zone
from pai_usage.deps import UsageDeps
from pai_usage.gemini import GeminiService
from pai_usage.migrate import migrate
from tests._budget_worker import INPUT_TOKENS, OUTPUT_TOKENS, looping_agent
from tests._faults import wait_until
from tests._helpers import LazyDeps, token_usage_rows, watch_fork_gate, writes_held
from tests.fake_gemini import FakeGemini, fake_gemini, gemini_client  # noqa: F401 - fixtures

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


@pytest.mark.parametrize('override', [False, True])
def test_counts_the_cost_the_ledger_stores(database_url: str, override: bool) -> None:
    # A caller-given cost (pydantic-ai's) is replaced by the tracker's own token override in the ledger:
    # the budget must count that same figure, not the one the caller passed.
    table = (
        PriceTable(tokens=(TokenPrice('gpt-4o', input_mtok=Decimal(100), output_mtok=Decimal(200)),))
        if override
        else None
    )
    now = datetime(2026, 5, 5, tzinfo=UTC)
    with UsageTracker(database_url, flush_interval=0.005, price_table=table) as tracker:
        enforcer = EnforceBudgets(
            tracker,
            budgets=[Budget(organization_id='acme', limit_usd=Decimal(1000))],
            refresh_interval=3600,
            clock=Clock(now),
        )
        assert [s.spend_usd for s in enforcer.statuses(ACME)] == [0]
        tracker.track(
            organization_id='acme',
            provider='openai',
            model='gpt-4o',
            input_tokens=1000,
            output_tokens=100,
            cost_usd=Decimal('0.0035'),
            created_at=now,
        )
        counted = enforcer.statuses(ACME)[0].spend_usd  # before the writer has the row
        assert tracker.flush()
        [row] = tracker.get_usage_summary(now, now + timedelta(seconds=1), group_by=()).rows
        enforcer.close()
    tracker.engine.dispose()
    assert counted == row.totals.cost_usd
    assert counted == (Decimal('0.12') if override else Decimal('0.0035'))


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


@pytest.mark.postgres
def test_spend_the_writer_has_not_written_stays_counted_however_far_behind_it_is(
    pg_schema_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More unwritten records than the budget remembers for later counters: the over-limit spend still counts."""
    monkeypatch.setattr(budgets_enforce, '_RECENT_CAP', 5)  # 200,000 by default: the bound, not a timing knob
    now = datetime.now(UTC)
    with UsageTracker(pg_schema_url) as tracker:
        seed(tracker, (now, 'warmup', '0.01'))
        clock = Clock(now)
        enforcer = EnforceBudgets(
            tracker, budgets=[Budget(organization_id='acme', limit_usd=Decimal(100))], clock=clock
        )
        enforcer.check(organization_id='acme')
        # A maintenance job holds writes back; budget reads still answer.
        with writes_held(pg_schema_url):
            tracker.track(organization_id='acme', provider='openai', model='gpt-4o', cost_usd=Decimal(150))
            for _ in range(3):
                for _ in range(20):
                    tracker.track(organization_id='other', provider='openai', model='gpt-4o', cost_usd=Decimal('0.01'))
                clock.now += timedelta(seconds=61)  # the next read of the ledger is due
                with pytest.raises(BudgetExceeded) as exc_info:
                    enforcer.check(organization_id='acme')
                assert exc_info.value.spend_usd == Decimal(150)
        assert tracker.flush(timeout=30)
        clock.now += timedelta(seconds=61)
        [status] = enforcer.statuses(organization_id='acme')
        assert status.spend_usd == Decimal(150), 'written now: counted once, from the ledger'


@pytest.mark.parametrize('hard', [False, True], ids=['default', 'hard'])
def test_a_restart_counts_the_spend_it_replays_at_once(database_url: str, hard: bool) -> None:
    """Spend an earlier process left on disk (the database was down as it stopped) counts once it is replayed.

    Not only at the next `refresh_interval` (60 s): before, the new process's first read, made before the
    replay, let a second limit through for a minute (probe: $0.21 recorded against $0.10, in both modes).
    """
    with UsageTracker(database_url) as warm:
        seed(warm, (datetime.now(UTC), 'warmup', '0.01'))  # the table exists, so that writes can be held
    with writes_held(database_url):
        earlier = UsageTracker(database_url)
        earlier.track(organization_id='acme', provider='openai', model='gpt-4o', cost_usd=Decimal(150))
        assert not earlier.close(timeout=2), 'the database cannot take it: it goes to the spill file'
        tracker = UsageTracker(database_url)
        enforcer = EnforceBudgets(tracker, budgets=[Budget(organization_id='acme', limit_usd=Decimal(100))], hard=hard)
        enforcer.check(organization_id='acme')  # read before the replay: the ledger has none of it yet
    try:
        wait_until(lambda: tracker.stats().replayed >= 1, what="the replay of the earlier process's spill file")
        with pytest.raises(BudgetExceeded) as exc_info:
            enforcer.check(organization_id='acme')
        assert exc_info.value.spend_usd == Decimal(150)
    finally:
        tracker.close()
        tracker.engine.dispose()
        earlier.engine.dispose()


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


def test_concurrent_runs_in_threads(fast_tracker: UsageTracker) -> None:
    # One capability shared by agents running on several threads, each with its own event loop.
    now = datetime(2026, 5, 5, tzinfo=UTC)
    seed(fast_tracker, (now, 'acme', '4.99'))
    enforcer = EnforceBudgets(
        fast_tracker, budgets=[Budget(organization_id='acme', limit_usd=Decimal(5))], clock=Clock(now)
    )
    queries = SpendQueries(fast_tracker.engine)
    barrier = threading.Barrier(8)

    def run() -> str:
        barrier.wait()
        return asyncio.run(agent(enforcer).run('hi', deps=ACME)).output

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda _: run(), range(8))) == ['ok'] * 8
    assert queries.count == 1

    seed(fast_tracker, (now, 'acme', '0.01'))  # reaches the limit exactly
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(run) for _ in range(8)]
    assert all(isinstance(f.exception(), BudgetExceeded) for f in futures)


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
    ('deps', 'ambient', 'budget'),
    [
        # An empty id names no one: the ledger bills the enclosing context's organization (or user), so must budgets.
        (UsageDeps(organization_id='', user_id='u1'), {'organization_id': 'acme'}, {'organization_id': 'acme'}),
        (
            UsageDeps(organization_id='acme', user_id=''),
            {'organization_id': 'acme', 'user_id': 'u1'},
            {'user_id': 'u1'},
        ),
        # A user of another organization is not inherited, by the ledger or by budgets.
        (
            UsageDeps(organization_id='globex'),
            {'organization_id': 'acme', 'user_id': 'u1'},
            {'organization_id': 'globex'},
        ),
        # A non-text id is stored as its text: `Budget(organization_id='42')` is the budget of deps naming 42.
        (UsageDeps(organization_id=cast(Any, 42)), {}, {'organization_id': '42'}),
    ],
    ids=['empty-org', 'empty-user', 'other-org', 'int-org'],
)
async def test_budgets_apply_to_the_payer_the_ledger_bills(
    fast_tracker: UsageTracker, deps: UsageDeps, ambient: dict[str, str], budget: dict[str, str]
) -> None:
    enforcer = EnforceBudgets(fast_tracker, budgets=[Budget(limit_usd=Decimal('0.001'), **budget)])
    tracked = Agent(
        FunctionModel(reply, model_name='gpt-4o'),
        deps_type=UsageDeps,
        capabilities=[TrackUsage(fast_tracker), enforcer],
    )
    with usage_context(**ambient):
        await tracked.run('hi', deps=deps)  # $0.00035 of the $0.001: the fourth run is refused
        assert fast_tracker.flush()
        for _ in range(5):
            try:
                await tracked.run('hi', deps=deps)
            except BudgetExceeded:
                break
        else:
            pytest.fail('the budget of the payer the ledger bills was never applied')
        with pytest.raises(BudgetExceeded):
            enforcer.check(deps)
    assert fast_tracker.flush()
    with fast_tracker.engine.connect() as conn:
        billed = conn.execute(
            sa.text("SELECT DISTINCT organization_id, user_id FROM token_usage WHERE operation = 'agent_request'")
        ).all()
    assert len(billed) == 1
    column, value = next(iter(budget.items()))
    assert dict(zip(('organization_id', 'user_id'), billed[0], strict=True))[column] == value


def test_deps_whose_attribute_fails_are_checked_on_the_rest(
    fast_tracker: UsageTracker, caplog: pytest.LogCaptureFixture
) -> None:
    now = datetime(2026, 5, 5, tzinfo=UTC)
    seed(fast_tracker, (now, 'acme', '6'))
    enforcer = EnforceBudgets(
        fast_tracker, budgets=[Budget(user_id='acme-user', limit_usd=Decimal(5))], clock=Clock(now)
    )
    with pytest.raises(BudgetExceeded, match='user acme-user'):  # not the RuntimeError: the user is still known
        enforcer.check(LazyDeps('organization_id', user_id='acme-user'))
    assert 'deps.organization_id' in caplog.text


@pytest.mark.parametrize(
    ('fields', 'match'),
    [
        ({'organization_id': 'a', 'user_id': 'b'}, 'at most one'),
        ({'organization_id': 'a', 'scope': 'user'}, 'at most one'),
        ({'limit_usd': Decimal(-1)}, 'non-negative'),
        ({'limit_usd': Decimal('NaN')}, 'finite'),
        ({'limit_usd': 5.0}, 'Decimal'),
        ({'period': 'fortnight'}, 'period'),
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
    assert '2026-05-16' in text[3] and '2026-06-01' in text[1]  # when each resets
    assert all(len(line) <= 100 for line in text)


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


def test_discarded_enforcer_is_not_kept_alive(fast_tracker: UsageTracker) -> None:
    enforcer = EnforceBudgets(fast_tracker, budgets=[Budget(limit_usd=Decimal(1))])
    enforcer.check()  # warm its cache, so the listener has something to update
    ref = weakref.ref(enforcer)
    del enforcer
    gc.collect()
    assert ref() is None
    seed(fast_tracker, (datetime.now(UTC), 'acme', '1'))  # the tracker's listener copes with the dead enforcer
    assert fast_tracker.stats().written == 1


def test_fresh_database_has_no_spend(sqlite_url: str) -> None:
    # The writer creates the table on its first write: a budget check may come before it.
    with UsageTracker(sqlite_url, flush_interval=0.005) as tracker:
        enforcer = EnforceBudgets(tracker, budgets=[Budget(organization_id='acme', limit_usd=Decimal(1))])
        assert [s.spend_usd for s in enforcer.statuses(organization_id='acme')] == [Decimal(0)]
        seed(tracker, (datetime.now(UTC), 'acme', '1'))
        with pytest.raises(BudgetExceeded):  # counted as soon as written, without waiting for a refresh
            enforcer.check(organization_id='acme')
    tracker.engine.dispose()


def test_unreachable_database(caplog: pytest.LogCaptureFixture) -> None:
    tracker = UsageTracker('postgresql+psycopg://postgres@127.0.0.1:1/none', auto_migrate=False)
    budgets = [Budget(organization_id='acme', limit_usd=Decimal(1))]
    EnforceBudgets(tracker, budgets=budgets).check(organization_id='acme')  # fails open, and says so
    assert 'could not read spend for budgets, allowing' in caplog.text
    with pytest.raises(sa.exc.OperationalError):
        EnforceBudgets(tracker, budgets=budgets, fail_open=False).check(organization_id='acme')
    tracker.close()
    tracker.engine.dispose()


def test_budgets_from_json() -> None:
    budgets = budgets_from_json(
        '[{"scope": "organization", "limit_usd": "100"},'
        ' {"organization_id": "acme", "limit_usd": 0.1, "period": "day", "name": "acme daily"},'
        ' {"user_id": "u1", "limit_usd": 5}]'
    )
    assert budgets == [
        Budget(scope='organization', limit_usd=Decimal(100)),
        Budget(organization_id='acme', limit_usd=Decimal('0.1'), period='day', name='acme daily'),
        Budget(user_id='u1', limit_usd=Decimal(5)),
    ]


@pytest.mark.parametrize(
    ('text', 'match'),
    [
        ('{', 'not valid JSON'),
        ('{"limit_usd": 1}', 'JSON list'),
        ('[1]', 'is not an object'),
        ('[{"limit_usd": 1, "org": "a"}]', r"unknown fields \['org'\]"),
        ('[{"scope": "tenant", "limit_usd": 1}]', 'scope'),
        ('[{"organization_id": "a"}]', 'needs a `limit_usd`'),
        ('[{"limit_usd": true}]', 'needs a `limit_usd`'),
        ('[{"limit_usd": "ten"}]', 'not a number'),
        ('[{"limit_usd": "-1"}]', r'budget #1: .*non-negative'),
        ('[{"limit_usd": 1}, {"limit_usd": 1, "organization_id": "a", "user_id": "b"}]', 'budget #2: .*at most one'),
    ],
)
def test_budgets_from_json_rejects(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        budgets_from_json(text)


async def test_with_track_usage(fast_tracker: UsageTracker) -> None:
    # The two capabilities together: TrackUsage records each request, EnforceBudgets stops the run once spent.
    track = TrackUsage(fast_tracker)
    first = Agent(FunctionModel(reply, model_name='gpt-4o'), deps_type=UsageDeps, capabilities=[track])
    await first.run('hi', deps=ACME)
    assert fast_tracker.flush()
    one_run = fast_tracker.get_current_month_usage('acme').total_cost_usd
    assert one_run > 0  # FunctionModel as gpt-4o on openai is priced

    enforcer = EnforceBudgets(
        fast_tracker, budgets=[Budget(organization_id='acme', limit_usd=one_run * 3)], refresh_interval=3600
    )
    both = Agent(FunctionModel(reply, model_name='gpt-4o'), deps_type=UsageDeps, capabilities=[track, enforcer])
    await both.run('hi', deps=ACME)
    assert fast_tracker.flush()
    await both.run('hi', deps=ACME)  # spend: 2 runs before this one
    assert fast_tracker.flush()  # 3 runs written: the next request reaches the limit, without a database read
    with pytest.raises(BudgetExceeded) as exc_info:
        await both.run('hi', deps=ACME)
    assert exc_info.value.spend_usd == one_run * 3
    assert (await both.run('hi', deps=GLOBEX)).output == 'ok'


def test_budget_exceeded_pickles() -> None:
    status = BudgetStatus(
        budget=Budget(organization_id='acme', limit_usd=Decimal(5)),
        key='acme',
        start=datetime(2026, 5, 1, tzinfo=UTC),
        end=datetime(2026, 6, 1, tzinfo=UTC),
        spend_usd=Decimal('5.5'),
    )
    error = pickle.loads(pickle.dumps(BudgetExceeded(status)))
    assert isinstance(error, BudgetExceeded)
    assert (error.spend_usd, error.limit_usd, str(error)) == (Decimal('5.5'), Decimal(5), str(BudgetExceeded(status)))
    assert status.remaining_usd == 0 and status.exceeded


# --- the bound: spend <= limit + one request per concurrent run ------------------------------------------


def request_cost(output_tokens: int) -> Decimal:
    usage = RequestUsage(input_tokens=INPUT_TOKENS, output_tokens=output_tokens)
    return genai_prices.calc_price(usage, 'gpt-4o', provider_id='openai').total_price


LARGEST = request_cost(max(OUTPUT_TOKENS))


def ledger(tracker: UsageTracker) -> list[dict[str, Any]]:
    assert tracker.flush()
    return token_usage_rows(tracker.engine)


def spent(rows: list[dict[str, Any]]) -> Decimal:
    return sum((r['cost_usd'] for r in rows if r['cost_usd'] is not None), Decimal(0))


def assert_bounded(
    tracker: UsageTracker, outcomes: list[Any], limit: Decimal, runs: int, largest: Decimal = LARGEST
) -> list[dict[str, Any]]:
    """Every run was stopped by the budget, spend reached at least half the limit and at most one request per run
    beyond it, and each refusal is a zero-cost `refused` row."""
    assert [type(o).__name__ for o in outcomes if not isinstance(o, BudgetExceeded)] == []
    rows = ledger(tracker)
    requests = [r for r in rows if r['operation'] == 'agent_request' and r['status'] == 'ok']
    assert requests and max(r['cost_usd'] for r in requests) <= largest
    total = spent(rows)
    assert limit / 2 <= total <= limit + runs * largest
    refused = [r for r in rows if r['status'] == 'refused']
    assert len(refused) == runs and all(r['cost_usd'] == 0 for r in refused)
    return rows


@pytest.fixture
def slow_writer(sqlite_url: str) -> Iterator[UsageTracker]:
    """The default flush interval: budgets must not wait for the writer."""
    with UsageTracker(sqlite_url) as tracker:
        yield tracker
    tracker.engine.dispose()


@pytest.mark.parametrize('delay', [0, 0.1], ids=['0ms', '100ms'])
@pytest.mark.parametrize('runs', [1, 20, 100])
async def test_bound_in_one_process(slow_writer: UsageTracker, runs: int, delay: float) -> None:
    limit = (3 if runs == 1 else 1) * runs * LARGEST  # a few requests per run
    enforcer = EnforceBudgets(
        slow_writer, budgets=[Budget(organization_id='acme', limit_usd=limit)], refresh_interval=3600
    )
    agent = looping_agent(delay, [TrackUsage(slow_writer), enforcer])
    outcomes = await asyncio.gather(*(agent.run('go', deps=ACME) for _ in range(runs)), return_exceptions=True)
    assert_bounded(slow_writer, outcomes, limit, runs)
    if runs == 1:
        # One run reserves its previous request's cost: it stops before a request that would not fit.
        assert spent(ledger(slow_writer)) <= limit


@pytest.mark.parametrize(
    'poison',
    [
        pytest.param({'cost_usd': float('nan')}, id='nan-cost'),
        pytest.param({'cost_usd': Decimal('-5')}, id='negative-cost'),
        pytest.param({'cost_usd': float('inf')}, id='infinite-cost'),
        pytest.param({'input_tokens': -(10**9)}, id='negative-tokens'),
    ],
)
async def test_a_record_the_ledger_rejects_counts_nothing(fast_tracker: UsageTracker, poison: dict[str, Any]) -> None:
    """Spend counts what the ledger stores: a record the writer rejects neither raises, lowers nor blocks a budget."""
    limit = 3 * LARGEST
    enforcer = EnforceBudgets(fast_tracker, budgets=[Budget(organization_id='acme', limit_usd=limit)])
    fast_tracker.track(
        **{'provider': 'openai', 'model': 'gpt-4o', 'organization_id': 'acme', 'input_tokens': 100, **poison}
    )
    [status] = enforcer.statuses(organization_id='acme')
    assert status.spend_usd == 0
    outcomes = await asyncio.gather(
        looping_agent(0, [TrackUsage(fast_tracker), enforcer]).run('go', deps=ACME), return_exceptions=True
    )
    assert_bounded(fast_tracker, outcomes, limit, 1)
    assert fast_tracker.stats().invalid == 1


async def test_unpriced_usage_is_not_counted_and_says_so(
    fast_tracker: UsageTracker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger='pai_usage')
    enforcer = EnforceBudgets(fast_tracker, budgets=[Budget(organization_id='acme', limit_usd=Decimal('0.01'))])
    unknown = Agent(
        FunctionModel(reply, model_name='gpt-4o-2099'),
        deps_type=UsageDeps,
        capabilities=[TrackUsage(fast_tracker), enforcer],
    )
    for _ in range(3):
        await unknown.run('q', deps=ACME)
    [status] = enforcer.statuses(ACME)
    assert status.spend_usd == 0
    warned = [r for r in caplog.records if 'no price is known' in r.getMessage()]
    assert len(warned) == 1 and 'openai/gpt-4o-2099' in warned[0].getMessage()


async def test_a_fallback_chain_is_estimated_whole(fast_tracker: UsageTracker) -> None:
    """Each attempt of a `FallbackModel` bills: the next request reserves what all of them cost."""

    def rejected(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        usage = RequestUsage(input_tokens=INPUT_TOKENS, output_tokens=400)
        return ModelResponse(parts=[TextPart('bad')], provider_name='openai', usage=usage)

    def is_bad(response: ModelResponse) -> bool:  # annotated: FallbackModel tells response checks by the type
        return response.text == 'bad'

    looping = looping_agent(0, [])
    fallback = FallbackModel(
        FunctionModel(rejected, model_name='gpt-4o'),
        looping.model,  # pyright: ignore[reportArgumentType]
        fallback_on=is_bad,
    )
    chain = request_cost(400) + request_cost(OUTPUT_TOKENS[0])
    enforcer = EnforceBudgets(fast_tracker, budgets=[Budget(organization_id='acme', limit_usd=chain * 3 / 2)])
    agent = looping_agent(0, [TrackUsage(fast_tracker), enforcer])
    with pytest.raises(BudgetExceeded) as exc_info:
        await agent.run('go', deps=ACME, model=fallback)
    assert exc_info.value.estimate_usd == chain, 'the second request reserves the whole first chain'
    assert spent(ledger(fast_tracker)) == chain


@pytest.mark.parametrize('delay', [0, 0.1], ids=['0ms', '100ms'])
async def test_bound_in_hard_mode(database_url: str, delay: float) -> None:
    runs = 20
    limit = 3 * runs * LARGEST
    with UsageTracker(database_url) as tracker:
        enforcer = EnforceBudgets(
            tracker, budgets=[Budget(organization_id='acme', limit_usd=limit)], hard=True, refresh_interval=3600
        )
        agent = looping_agent(delay, [TrackUsage(tracker), enforcer])
        outcomes = await asyncio.gather(*(agent.run('go', deps=ACME) for _ in range(runs)), return_exceptions=True)
        enforcer.close()
        rows = assert_bounded(tracker, outcomes, limit, runs)
        [status] = enforcer.statuses(ACME)
        # The shared counter holds what the ledger holds, and no reservation outlives its request.
        assert (status.spend_usd, status.reserved_usd) == (spent(rows), 0)
        [reported] = budget_report(tracker.engine, enforcer.budgets)
        assert (reported.spend_usd, reported.reserved_usd) == (spent(rows), 0)
    tracker.engine.dispose()


async def test_hard_mode_reaches_sqlite_only_inside_the_fork_gate(sqlite_url: str) -> None:
    with UsageTracker(sqlite_url) as tracker:
        outside = watch_fork_gate(tracker.engine)
        enforcer = EnforceBudgets(
            tracker, budgets=[Budget(organization_id='acme', limit_usd=Decimal('0.01'))], hard=True, refresh_interval=0
        )
        agent = looping_agent(0, [TrackUsage(tracker), enforcer])
        outcomes = await asyncio.gather(*(agent.run('go', deps=ACME) for _ in range(5)), return_exceptions=True)
        assert all(isinstance(o, BudgetExceeded) for o in outcomes), outcomes
        enforcer.sync()
        enforcer.close()
        assert len(ledger(tracker)) >= 5
    tracker.engine.dispose()
    assert outside == []


def test_bound_across_processes_in_hard_mode(pg_schema_url: str, tmp_path: Path) -> None:
    processes, runs = 4, 3
    limit = 2 * processes * runs * LARGEST
    worker = Path(__file__).with_name('_budget_worker.py')
    children = [
        subprocess.Popen(
            [sys.executable, str(worker), pg_schema_url, str(limit), str(runs), '0.02', str(tmp_path), str(i), '4'],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    results = [child.communicate(timeout=120) for child in children]
    for child, (out, err) in zip(children, results, strict=True):
        assert child.returncode == 0, err
        assert json.loads(out) == {'refused': runs, 'other': []}
    with UsageTracker(pg_schema_url, auto_migrate=False) as tracker:
        rows = token_usage_rows(tracker.engine)
        total = spent(rows)
        assert limit / 2 <= total <= limit + processes * runs * LARGEST
        assert sum(r['status'] == 'refused' for r in rows) == processes * runs
        [status] = budget_report(tracker.engine, [Budget(organization_id='acme', limit_usd=limit)])
        assert (status.spend_usd, status.reserved_usd) == (total, 0)  # counters and ledger agree
    tracker.engine.dispose()


def attempt(
    enforcer: EnforceBudgets[Any], org: str, estimate: Decimal, holds: list[BudgetHold], admitted: list[bool]
) -> None:
    """Reserve `estimate` for `org`: append the hold to `holds`, and to `admitted` whether it was admitted."""
    try:
        holds.append(enforcer.reserve(organization_id=org, estimate=estimate))
    except BudgetExceeded:
        admitted.append(False)
    else:
        admitted.append(True)


@pytest.mark.parametrize('carrier', ['sync thread', 'another reservation'])
def test_a_reservation_never_commits_before_the_settled_spend_it_follows(database_url: str, carrier: str) -> None:
    """Hard mode: what a process settled before its next reservation is on the counter row when that one is.

    Process A settles $0.6 of a $1 limit; whoever carries it to the row (the background sync, or another thread's
    reservation) is held inside its transaction, just before its UPDATE. Meanwhile A reserves again (it knows its
    own spend, so it may) and process B asks for $0.5. Whichever of the two reaches the row second must see A's
    $0.6: both admitted means the row let A have two requests uncounted, and processes together went past the
    documented bound by one request per such window (the independent tester's 8 x 4 runs: $1.275 for $1.24).
    """
    settled, asked = Decimal('0.6'), Decimal('0.5')
    orgs = [f'org-{i}' for i in range(4)]  # the fault, once per counter
    budgets = [Budget(scope='organization', limit_usd=Decimal(1))]
    carrier_name = 'pai-usage-budgets' if carrier == 'sync thread' else 'carrier'
    at_the_row, go = threading.Event(), threading.Event()

    def hold_the_carrier(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if (
            threading.current_thread().name == carrier_name
            and statement.lstrip().startswith('UPDATE pai_usage_budget_counters')
            and not at_the_row.is_set()
        ):
            at_the_row.set()
            go.wait(10)

    with UsageTracker(database_url) as tracker_a, UsageTracker(database_url) as tracker_b:
        a = EnforceBudgets(tracker_a, budgets=budgets, hard=True)
        b = EnforceBudgets(tracker_b, budgets=budgets, hard=True)
        for org in orgs:
            a.reserve(organization_id=org).release()  # the counter row exists, and A's sync thread runs
            b.statuses(organization_id=org)  # B has read the ledger: until it reads again, only the row has A's spend
        if carrier == 'another reservation':
            a.close()  # no sync thread: the settled spend rides with A's next reservation, from another thread
        sa.event.listen(tracker_a.engine, 'before_cursor_execute', hold_the_carrier)
        both_admitted: list[str] = []
        for org in orgs:
            at_the_row.clear()
            go.clear()
            holds: list[BudgetHold] = []
            a_admitted: list[bool] = []
            threads = [
                threading.Thread(target=attempt, args=(a, org, Decimal(0), holds, a_admitted), name=name)
                for name in ('carrier', 'next')
            ]
            tracker_a.track(organization_id=org, provider='openai', model='gpt-4o', cost_usd=settled)  # settles
            if carrier == 'another reservation':
                threads[0].start()
            assert at_the_row.wait(10), 'the settled spend was sent'
            threads[1].start()
            threads[1].join(0.5)  # A's next reservation: before the fix, admitted at once, on a row without $0.6
            b_outcome: list[bool] = []
            attempt(b, org, asked, holds, b_outcome)
            [b_admitted] = b_outcome
            go.set()
            for thread in threads:
                if thread.ident is not None:
                    thread.join(10)
            if any(a_admitted) and b_admitted:
                both_admitted.append(org)
            for hold in holds:
                hold.release()
        a.close()  # the hook stays, disarmed: `at_the_row` is set (removing it races the sync thread's statements)
        b.close()
        rows = token_usage_rows(tracker_a.engine) if tracker_a.flush() else []
        statuses = [s for org in orgs for s in a.statuses(organization_id=org)]
        assert [(s.spend_usd, s.reserved_usd) for s in statuses] == [(settled, 0)] * len(orgs), 'nothing lost or kept'
        assert spent(rows) == settled * len(orgs)
    for engine in (tracker_a.engine, tracker_b.engine):
        engine.dispose()
    assert both_admitted == []


def test_a_run_cancelled_while_it_reserves_gives_the_reservation_back(database_url: str) -> None:
    """Hard mode: a run cancelled while its reservation is in the worker thread releases it once that ends.

    Cancelling the `await` does not stop the thread: its reservation still commits on the counter row. Released
    as a local hold only, it stayed on the row (heartbeated) until the process exited, and refused others.
    """
    orgs = [f'org-{i}' for i in range(3)]  # the fault, three times
    estimate = Decimal('0.4')
    at_the_row, go = threading.Event(), threading.Event()

    def hold_the_reservation(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if (
            threading.current_thread().name.startswith('asyncio')
            and 'pai_usage_budget_counters' in statement
            and not at_the_row.is_set()
        ):
            at_the_row.set()
            go.wait(10)

    async def cancel_while_reserving(enforcer: EnforceBudgets[Any], org: str) -> None:
        run = asyncio.create_task(agent(enforcer).run('hi', deps=UsageDeps(organization_id=org)))
        assert await asyncio.to_thread(at_the_row.wait, 10), 'the reservation reached the counter row'
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        go.set()

    with UsageTracker(database_url) as tracker:
        enforcer = EnforceBudgets(tracker, budgets=[Budget(scope='organization', limit_usd=Decimal(1))], hard=True)
        enforcer.estimate = estimate
        sa.event.listen(tracker.engine, 'before_cursor_execute', hold_the_reservation)
        for org in orgs:
            at_the_row.clear()
            go.clear()
            asyncio.run(cancel_while_reserving(enforcer, org))
            wait_until(lambda org=org: not enforcer.statuses(organization_id=org)[0].reserved_usd, 10, 'the release')
            at_the_row.set()  # disarmed while this org's status is read
        held = [s.reserved_usd for org in orgs for s in enforcer.statuses(organization_id=org)]
        enforcer.close()
    tracker.engine.dispose()
    assert held == [0] * len(orgs)


def test_spend_sent_before_the_counter_row_exists_still_reaches_it(database_url: str) -> None:
    """Hard mode: settled spend synced while no process has made the row yet waits for the row, and is not lost.

    A new row starts from its creator's ledger read, which need not have this process's unwritten records; so a
    delta the sync found no row for must go with this process's next reservation, not vanish.
    """
    settled = Decimal('0.6')
    budgets = [Budget(organization_id='acme', limit_usd=Decimal(1))]
    with UsageTracker(database_url) as tracker_a, UsageTracker(database_url) as tracker_b:
        migrate(tracker_a.engine)
        a = EnforceBudgets(tracker_a, budgets=budgets, hard=True)
        b = EnforceBudgets(tracker_b, budgets=budgets, hard=True)
        a.statuses(organization_id='acme')  # A has the counter in memory; no row yet
        b.statuses(organization_id='acme')  # B has read the ledger: $0
        tracker_a.track(organization_id='acme', provider='openai', model='gpt-4o', cost_usd=settled)
        a.sync()  # finds no row
        b.reserve(organization_id='acme').release()  # B makes the row, from its ledger read
        a.reserve(organization_id='acme').release()  # A's first statement on it carries the $0.6
        with pytest.raises(BudgetExceeded) as exc_info:
            b.reserve(organization_id='acme', estimate=Decimal('0.5'))
        assert exc_info.value.spend_usd == settled
        a.close()
        b.close()
    for engine in (tracker_a.engine, tracker_b.engine):
        engine.dispose()


HOLDER = """
import sys, time
from decimal import Decimal
from pai_usage import UsageTracker
from pai_usage.budgets import Budget, EnforceBudgets
tracker = UsageTracker(sys.argv[1], handle_sigterm=False)
enforcer = EnforceBudgets(
    tracker, budgets=[Budget(organization_id='acme', limit_usd=Decimal(1))], hard=True, hold_ttl=float(sys.argv[2])
)
hold = enforcer.reserve(organization_id='acme', estimate=Decimal('0.8'))
print('held', flush=True)
time.sleep(600)
"""


def test_a_killed_process_gives_its_reservations_back(database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Hard mode: a live process's hold stands past `hold_ttl` (heartbeats); once SIGKILLed, it is given back."""
    ttl = 2.0
    caplog.set_level(logging.WARNING, logger='pai_usage')
    child = subprocess.Popen(
        [sys.executable, '-c', HOLDER, database_url, str(ttl)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b'held\n', child.stderr.read() if child.stderr else None
        with UsageTracker(database_url) as tracker:
            enforcer = EnforceBudgets(
                tracker, budgets=[Budget(organization_id='acme', limit_usd=Decimal(1))], hard=True, hold_ttl=ttl
            )
            time.sleep(2.5 * ttl)
            with pytest.raises(BudgetExceeded) as exc_info:  # 0.8 held by a live process + 0.5 > 1
                enforcer.reserve(organization_id='acme', estimate=Decimal('0.5'))
            assert exc_info.value.reserved_usd == Decimal('0.8')
            child.kill()  # SIGKILL: no release, no exit hook
            child.communicate(timeout=10)
            holds: list[BudgetHold] = []

            def admitted() -> bool:
                try:
                    holds.append(enforcer.reserve(organization_id='acme', estimate=Decimal('0.5')))
                except BudgetExceeded:
                    return False
                return True

            wait_until(admitted, timeout=10 * ttl, what="the killed process's hold to be given back")
            [status] = enforcer.statuses(organization_id='acme')
            assert status.reserved_usd == Decimal('0.5'), 'exactly the dead hold was given back, ours stands'
            holds[0].release()
            [status] = enforcer.statuses(organization_id='acme')
            assert status.reserved_usd == 0
            enforcer.close()
        tracker.engine.dispose()
    finally:
        child.kill()
        child.communicate(timeout=10)
    assert any('gave back $0.8' in r.getMessage() for r in caplog.records)


async def stream_forever(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[DeltaToolCalls]:
    yield {0: DeltaToolCall(name='again', json_args='{}')}


def streaming_agent(*capabilities: AbstractCapability[Any]) -> Agent[UsageDeps, str]:
    agent = Agent(
        FunctionModel(stream_function=stream_forever, model_name='gpt-4o'),
        deps_type=UsageDeps,
        capabilities=list(capabilities),
    )

    @agent.tool_plain
    def again() -> str:  # pyright: ignore[reportUnusedFunction]
        return 'again'

    return agent


async def stream_once(agent: Agent[UsageDeps, str], deps: UsageDeps, limits: UsageLimits | None = None) -> None:
    async with agent.run_stream('go', deps=deps, usage_limits=limits) as result:
        await result.get_output()


async def test_bound_for_streams(slow_writer: UsageTracker) -> None:
    runs = 20
    # A streamed request's usage is estimated by FunctionModel: measure one to size the limit.
    with pytest.raises(UsageLimitExceeded):
        await stream_once(streaming_agent(TrackUsage(slow_writer)), GLOBEX, UsageLimits(request_limit=1))
    [probe] = [r for r in ledger(slow_writer) if r['operation'] == 'agent_request']
    assert probe['cost_usd'] > 0
    limit = 3 * runs * probe['cost_usd']

    enforcer = EnforceBudgets(slow_writer, budgets=[Budget(organization_id='acme', limit_usd=limit)])
    agent = streaming_agent(TrackUsage(slow_writer), enforcer)
    outcomes = await asyncio.gather(*(stream_once(agent, ACME) for _ in range(runs)), return_exceptions=True)
    assert [type(o).__name__ for o in outcomes if not isinstance(o, BudgetExceeded)] == []
    acme = [r for r in ledger(slow_writer) if r['organization_id'] == 'acme']
    largest = max(r['cost_usd'] for r in acme)  # later requests of a run carry more history: cost more
    assert limit / 2 <= spent(acme) <= limit + runs * largest
    assert sum(r['status'] == 'refused' for r in acme) == runs


async def test_bound_for_sub_agents(slow_writer: UsageTracker) -> None:
    # Each parent run delegates to a child run that loops; both carry the capabilities, so the child's
    # requests count and are held like the parent's. A parent waits on its child: one request in flight each.
    runs = 20
    limit = 2 * runs * LARGEST
    enforcer = EnforceBudgets(slow_writer, budgets=[Budget(organization_id='acme', limit_usd=limit)])
    child = looping_agent(0, [TrackUsage(slow_writer), enforcer])

    def delegate(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(
            parts=[ToolCallPart('ask_child', {})],
            provider_name='openai',
            usage=RequestUsage(input_tokens=INPUT_TOKENS, output_tokens=OUTPUT_TOKENS[0]),
        )

    parent = Agent(
        FunctionModel(delegate, model_name='gpt-4o'),
        deps_type=UsageDeps,
        capabilities=[TrackUsage(slow_writer), enforcer],
    )

    @parent.tool
    async def ask_child(ctx: RunContext[UsageDeps]) -> str:  # pyright: ignore[reportUnusedFunction]
        return (await child.run('go', deps=ctx.deps, usage=ctx.usage)).output

    outcomes = await asyncio.gather(*(parent.run('go', deps=ACME) for _ in range(runs)), return_exceptions=True)
    rows = assert_bounded(slow_writer, outcomes, limit, runs)
    assert {r['parent_run_id'] is not None for r in rows if r['status'] == 'ok'} == {False, True}


async def test_bound_for_direct_gemini_calls(
    gemini_client: genai.Client, fake_gemini: FakeGemini, slow_writer: UsageTracker
) -> None:
    threads = 8
    service = GeminiService(gemini_client, deps=UsageDeps(organization_id=' acme '), tracker=slow_writer)
    first = service.tracked_generate_content(model='gemini-2.0-flash', contents='how much?')
    assert first.usage_metadata is not None
    one = ledger(slow_writer)[0]['cost_usd']
    assert one == genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=first.usage_metadata.prompt_token_count,
            output_tokens=first.usage_metadata.candidates_token_count,
        ),
        'gemini-2.0-flash',
        provider_id='google-gla',
    ).total_price.quantize(Decimal('1e-12'))
    limit = one + 3 * threads * one
    enforcer = EnforceBudgets(
        slow_writer, budgets=[Budget(organization_id='acme', limit_usd=limit)], refresh_interval=3600
    )

    def loop() -> BaseException | None:
        try:
            for _ in range(100):  # far more than the budget allows
                service.tracked_generate_content(model='gemini-2.0-flash', contents='how much?')
        except BudgetExceeded as exc:
            return exc
        return None

    with ThreadPoolExecutor(threads) as pool:
        outcomes = list(pool.map(lambda _: loop(), range(threads)))
    assert all(isinstance(o, BudgetExceeded) for o in outcomes)
    rows = ledger(slow_writer)
    assert limit / 2 <= spent(rows) <= limit + threads * one
    assert [s.reserved_usd for s in enforcer.statuses(organization_id='acme')] == [0]
    refused = [r for r in rows if r['status'] == 'refused']
    assert len(refused) == threads
    assert {(r['source'], r['organization_id'], r['operation'], r['cost_usd']) for r in refused} == {
        ('direct', 'acme', 'generate_content', 0)
    }


async def test_parallel_direct_calls_in_a_run_reserve_the_previous_call(
    gemini_client: genai.Client, fake_gemini: FakeGemini, slow_writer: UsageTracker
) -> None:
    """A tool that makes parallel Gemini calls: each call reserves the last call's cost, so only the first wave
    (nothing known yet) can pass the limit, however many waves follow."""
    wave = 8
    service = GeminiService(gemini_client, tracker=slow_writer)
    with usage_context(UsageDeps(organization_id='acme')):
        service.tracked_generate_content(model='gemini-2.0-flash', contents='how much?')
    one = ledger(slow_writer)[0]['cost_usd']
    limit = one * (3 * wave + wave // 2)  # waves straddle the limit: an estimate of 0 would let one through whole
    enforcer = EnforceBudgets(
        slow_writer, budgets=[Budget(organization_id='acme', limit_usd=limit)], refresh_interval=3600
    )

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        # A request far cheaper than a call (FunctionModel would estimate an empty usage).
        usage = RequestUsage(input_tokens=1, output_tokens=1)
        return ModelResponse(parts=[ToolCallPart('draw', {})], provider_name='google-gla', usage=usage)

    capabilities = [TrackUsage(slow_writer), enforcer]
    drawing = Agent(FunctionModel(model, model_name='gemini-2.0-flash'), deps_type=UsageDeps, capabilities=capabilities)

    @drawing.tool_plain
    async def draw() -> str:  # pyright: ignore[reportUnusedFunction]
        calls = (service.atracked_generate_content(model='gemini-2.0-flash', contents='how much?') for _ in range(wave))
        await asyncio.gather(*calls)
        return 'again'

    for _ in range(3):  # the budget stops each run; a new run starts knowing the last call's cost
        with pytest.raises(BudgetExceeded):
            await drawing.run('go', deps=UsageDeps(organization_id='acme'))
    rows = ledger(slow_writer)
    assert spent(rows) <= limit
    assert spent(rows) > limit - wave * one  # stopped by the limit, not before it


async def test_a_refusal_does_not_lower_the_next_direct_estimate(
    gemini_client: genai.Client, fake_gemini: FakeGemini, slow_writer: UsageTracker
) -> None:
    service = GeminiService(gemini_client, tracker=slow_writer)

    async def call(organization_id: str) -> None:
        with usage_context(organization_id=organization_id):
            await service.atracked_generate_content(model='gemini-2.0-flash', contents='how much?')

    with usage_context(organization_id='nobody'):
        service.tracked_generate_content(model='gemini-2.0-flash', contents='how much?')
    one = ledger(slow_writer)[0]['cost_usd']
    budgets = [
        Budget(organization_id='acme', limit_usd=one * 3 / 2),
        Budget(organization_id='globex', limit_usd=one * 5 / 2),
    ]
    enforcer = EnforceBudgets(slow_writer, budgets=budgets, refresh_interval=3600)
    await call('acme')  # the enforcer learns what a call costs
    with pytest.raises(BudgetExceeded):
        await call('acme')  # a refused row, cost 0: no guide to what the next call costs
    outcomes = await asyncio.gather(*(call('globex') for _ in range(8)), return_exceptions=True)
    assert sum(o is None for o in outcomes) == 2  # each reserved one call's cost: two fit
    assert spent([r for r in ledger(slow_writer) if r['organization_id'] == 'globex']) <= one * 5 / 2
    assert [s.reserved_usd for s in enforcer.statuses(organization_id='globex')] == [0]


# --- periods, identities, refusals, soft limits ----------------------------------------------------------


class TickingModel:
    """Each response is stamped with the injected clock, which a tool moves on: a run that crosses midnight."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def __call__(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        step = sum(isinstance(m, ModelResponse) for m in messages)
        parts: list[Any] = [ToolCallPart('tick', {})] if step == 0 else [TextPart('done')]
        return ModelResponse(
            parts=parts,
            provider_name='openai',
            usage=RequestUsage(input_tokens=INPUT_TOKENS, output_tokens=OUTPUT_TOKENS[step]),
            timestamp=self.clock(),
        )


@pytest.mark.parametrize('timezone_name', ['UTC', 'Europe/Paris'])
async def test_run_crossing_midnight(fast_tracker: UsageTracker, timezone_name: str) -> None:
    tz = zone(timezone_name)
    midnight = datetime(2026, 3, 11, tzinfo=tz).astimezone(UTC)
    first, second = request_cost(OUTPUT_TOKENS[0]), request_cost(OUTPUT_TOKENS[1])
    seed(fast_tracker, (midnight - timedelta(hours=1), 'acme', str(second)))  # the day before: nearly spent
    clock = Clock(midnight - timedelta(seconds=1))
    budget = Budget(organization_id='acme', limit_usd=first + second, period='day', timezone=timezone_name)
    enforcer = EnforceBudgets(fast_tracker, budgets=[budget], clock=clock, refresh_interval=3600)
    agent = Agent(
        FunctionModel(TickingModel(clock), model_name='gpt-4o'),
        deps_type=UsageDeps,
        capabilities=[TrackUsage(fast_tracker), enforcer],
    )

    @agent.tool_plain
    def tick() -> str:  # pyright: ignore[reportUnusedFunction]
        clock.now = midnight  # the run's second request is made in the new day
        return 'tick'

    # The first request fits the old day; the second would not, but it is made in the new day, which resets.
    assert (await agent.run('go', deps=ACME)).output == 'done'
    assert [s.spend_usd for s in enforcer.statuses(ACME)] == [second]
    assert fast_tracker.flush()
    day_before = budget_report(fast_tracker.engine, [budget], now=midnight - US)
    assert [s.spend_usd for s in day_before] == [second + first]
    assert [s.resets_at for s in day_before] == [midnight]
    clock.now = midnight - US  # back in the old day (the cache of that period was dropped): spent
    with pytest.raises(BudgetExceeded) as exc_info:
        await agent.run('go', deps=ACME)
    assert exc_info.value.period_start == midnight - timedelta(days=1)


@pytest.mark.parametrize(
    ('budget_id', 'run_id'), [(' acme ', 'acme'), ('acme', '\tacme\n'), (' acme', ' acme ')], ids=repr
)
async def test_whitespace_ids(slow_writer: UsageTracker, budget_id: str, run_id: str) -> None:
    budget = Budget(organization_id=budget_id, limit_usd=2 * LARGEST)
    assert budget.organization_id == 'acme'  # as the ledger stores it
    enforcer = EnforceBudgets(slow_writer, budgets=[budget], refresh_interval=3600)
    agent = looping_agent(0, [TrackUsage(slow_writer), enforcer])
    outcomes = await asyncio.gather(agent.run('go', deps=UsageDeps(organization_id=run_id)), return_exceptions=True)
    rows = assert_bounded(slow_writer, outcomes, budget.limit_usd, 1)
    assert {r['organization_id'] for r in rows} == {'acme'}


def test_empty_ids_are_rejected() -> None:
    with pytest.raises(ValueError, match='empty once normalized'):
        Budget(organization_id='  ', limit_usd=Decimal(1))


async def test_refusal(slow_writer: UsageTracker) -> None:
    budget = Budget(organization_id='acme', limit_usd=LARGEST, name='acme cap')
    enforcer = EnforceBudgets(slow_writer, budgets=[budget], estimate=LARGEST / 2)
    agent = looping_agent(0, [TrackUsage(slow_writer), enforcer])
    with pytest.raises(BudgetExceeded) as exc_info:
        await agent.run('go', deps=ACME)
    error = exc_info.value
    first, second = request_cost(OUTPUT_TOKENS[0]), request_cost(OUTPUT_TOKENS[1])
    assert first + LARGEST / 2 <= LARGEST < first + second + LARGEST / 2  # two requests fit, not three
    assert (error.scope, error.period, error.limit_usd) == ('organization:acme', 'month', LARGEST)
    assert (error.spend_usd, error.reserved_usd, error.estimate_usd) == (first + second, 0, LARGEST / 2)
    assert pickle.loads(pickle.dumps(error)).estimate_usd == LARGEST / 2
    [refused] = [r for r in ledger(slow_writer) if r['status'] == 'refused']
    assert (refused['cost_usd'], refused['organization_id'], refused['model'], refused['source']) == (
        0,
        'acme',
        'gpt-4o',
        'agent',
    )
    assert refused['metadata']['budget'] == 'acme cap'
    assert refused['run_id'] == next(r['run_id'] for r in ledger(slow_writer) if r['status'] == 'ok')


async def test_max_tokens_estimate(slow_writer: UsageTracker) -> None:
    reserve = genai_prices.calc_price(genai_prices.Usage(output_tokens=1000), 'gpt-4o', provider_id='openai')
    budget = Budget(organization_id='acme', limit_usd=reserve.total_price - US_DOLLAR_FRACTION)
    enforcer = EnforceBudgets(slow_writer, budgets=[budget], estimate='max_tokens')
    agent = looping_agent(0, [TrackUsage(slow_writer), enforcer])
    with pytest.raises(BudgetExceeded) as exc_info:  # max_tokens could cost more than the whole budget
        await agent.run('go', deps=ACME, model_settings={'max_tokens': 1000})
    assert (exc_info.value.estimate_usd, exc_info.value.spend_usd) == (reserve.total_price, 0)


US_DOLLAR_FRACTION = Decimal('0.000001')


async def test_soft_limits(slow_writer: UsageTracker) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    fired: list[tuple[str | None, float, Decimal]] = []
    budget = Budget(organization_id='acme', limit_usd=6 * LARGEST, warn_at=(0.5, 0.25))
    enforcer = EnforceBudgets(
        slow_writer, budgets=[budget], on_warning=lambda status, at: fired.append((status.key, at, status.spend_usd))
    )
    agent = looping_agent(0, [TrackUsage(slow_writer), enforcer])
    with provider.get_tracer('test').start_as_current_span('app'):
        with pytest.raises(BudgetExceeded):
            await agent.run('go', deps=ACME)
        with pytest.raises(BudgetExceeded):
            await agent.run('go', deps=ACME)  # already past both thresholds this period: nothing fires again
    assert [(key, at) for key, at, _ in fired] == [('acme', 0.25), ('acme', 0.5)]
    assert all(spend >= Decimal(str(at)) * budget.limit_usd for _, at, spend in fired)
    [span] = exporter.get_finished_spans()
    events = [e for e in span.events if e.name == WARNING_EVENT]
    assert [e.attributes and e.attributes['pai_usage.budget.threshold'] for e in events] == [0.25, 0.5]
    provider.shutdown()


async def test_rolling_window(fast_tracker: UsageTracker) -> None:
    now = datetime(2026, 5, 5, 12, tzinfo=UTC)
    seed(fast_tracker, (now - timedelta(hours=2), 'acme', '100'), (now - timedelta(minutes=30), 'acme', '4'))
    budget = Budget(organization_id='acme', limit_usd=Decimal(5), period=timedelta(hours=1))
    assert budget.label == 'organization acme, $5/rolling 1:00:00'
    clock = Clock(now)
    enforcer = EnforceBudgets(fast_tracker, budgets=[budget], clock=clock, refresh_interval=60)
    [status] = enforcer.statuses(ACME)
    assert (status.spend_usd, status.start, status.resets_at) == (Decimal(4), now - timedelta(hours=1), None)
    seed(fast_tracker, (now, 'acme', '1'))
    with pytest.raises(BudgetExceeded):
        enforcer.check(ACME)
    clock.now = now + timedelta(minutes=45)  # the $4 left the window
    assert [s.spend_usd for s in enforcer.statuses(ACME)] == [Decimal(1)]
    with pytest.raises(ValueError, match='rolling windows are in-process only'):
        EnforceBudgets(fast_tracker, budgets=[budget], hard=True)


@pytest.mark.parametrize(
    ('period', 'timezone_name', 'moment', 'expected'),
    [
        # Weeks start on Monday: Sunday 2026-03-08 23:30 in New York is Monday 04:30 UTC.
        ('week', 'America/New_York', datetime(2026, 3, 9, 3, 30, tzinfo=UTC), ((2026, 3, 2, 5), (2026, 3, 9, 4))),
        ('week', 'UTC', datetime(2026, 3, 9, tzinfo=UTC), ((2026, 3, 9, 0), (2026, 3, 16, 0))),
        # Paris: midnight is 23:00 UTC in winter, 22:00 in summer (DST began 2026-03-29).
        ('day', 'Europe/Paris', datetime(2026, 3, 28, 23, 30, tzinfo=UTC), ((2026, 3, 28, 23), (2026, 3, 29, 22))),
        ('month', 'Asia/Tokyo', datetime(2026, 12, 31, 15, tzinfo=UTC), ((2026, 12, 31, 15), (2027, 1, 31, 15))),
    ],
)
def test_calendar_periods_in_a_time_zone(
    period: Any, timezone_name: str, moment: datetime, expected: tuple[tuple[int, ...], tuple[int, ...]]
) -> None:
    start, end = expected
    assert period_bounds(period, moment, timezone_name) == (datetime(*start, tzinfo=UTC), datetime(*end, tzinfo=UTC))


def test_unknown_time_zone() -> None:
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        Budget(limit_usd=Decimal(1), timezone='Mars/Olympus')


def test_counter_tables_match_their_migrations(database_url: str) -> None:
    engine = sa.create_engine(database_url)
    migrate(engine)

    def ours(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        table = obj if type_ == 'table' else getattr(obj, 'table', None)
        return getattr(table, 'name', None) in (BUDGET_COUNTERS.name, BUDGET_HOLDS.name)

    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={'compare_type': True, 'include_object': ours})
        assert compare_metadata(context, BUDGET_COUNTERS.metadata) == []
    engine.dispose()


@pytest.mark.parametrize('hard', [False, True], ids=['in-process', 'hard'])
def test_holds_reserve_until_released(database_url: str, hard: bool) -> None:
    with UsageTracker(database_url) as tracker:
        enforcer = EnforceBudgets(tracker, budgets=[Budget(organization_id='acme', limit_usd=Decimal(1))], hard=hard)
        with enforcer.reserve(organization_id=' acme', estimate=Decimal('0.6')) as hold:
            assert [s.reserved_usd for s in enforcer.statuses(organization_id='acme')] == [Decimal('0.6')]
            with pytest.raises(BudgetExceeded) as exc_info:  # 0.6 held + 0.6 asked > 1
                enforcer.reserve(organization_id='acme', estimate=Decimal('0.6'))
            assert (exc_info.value.reserved_usd, exc_info.value.estimate_usd) == (Decimal('0.6'), Decimal('0.6'))
            enforcer.reserve(organization_id='acme', estimate=Decimal('0.4')).release()  # exactly fits
        hold.release()  # idempotent
        [status] = enforcer.statuses(organization_id='acme')
        assert (status.reserved_usd, status.remaining_usd) == (0, 1)
        line = format_budgets([status]).splitlines()[1]
        # spend, reserved, remaining, limit
        assert [w for w in line.split() if w.startswith('$')] == ['$0.0000', '$0.0000', '$1.0000', '$1.0000']
        enforcer.close()
    tracker.engine.dispose()


@pytest.mark.parametrize('hard', [False, True], ids=['in-process', 'hard'])
@pytest.mark.parametrize('spelling', ['utc', 'Utc'])
async def test_utc_under_another_spelling_counts_each_record_once(database_url: str, hard: bool, spelling: str) -> None:
    with UsageTracker(database_url) as tracker:
        budgets = [
            Budget(organization_id='acme', limit_usd=Decimal(1)),
            Budget(scope='organization', limit_usd=Decimal(5), timezone=spelling),
        ]
        assert budgets[1].timezone == 'UTC'
        enforcer = EnforceBudgets(tracker, budgets=budgets, hard=hard)
        tracked = Agent(
            FunctionModel(reply, model_name='gpt-4o'), deps_type=UsageDeps, capabilities=[TrackUsage(tracker), enforcer]
        )
        for _ in range(4):
            await tracked.run('hi', deps=ACME)
        assert tracker.flush()
        if hard:
            enforcer.sync()
        ledger_spend = spent(token_usage_rows(tracker.engine))
        assert ledger_spend > 0
        assert [s.spend_usd for s in enforcer.statuses(ACME)] == [ledger_spend, ledger_spend]
        enforcer.close()
    tracker.engine.dispose()
