"""Summaries over fixed fixture data, checked against totals computed here in Python, on SQLite and PostgreSQL."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import FrozenInstanceError, dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from itertools import cycle, islice

import pytest

from pai_usage import UsageRecord, UsageSummary, UsageTracker
from pai_usage.export import export_rows
from pai_usage.summary import (
    GROUP_BY_DIMENSIONS,
    GroupBy,
    SummaryRow,
    UsageTotals,
    _slot_constructor,  # pyright: ignore[reportPrivateUsage]
    _summary_of,  # pyright: ignore[reportPrivateUsage]
    month_bounds,
    query_summary,
)
from pai_usage.usage import TOKEN_BUCKETS


def _at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def _fixture_records() -> list[UsageRecord]:
    """Two organizations (and unattributed calls), three months, every dimension varied, explicit costs."""
    orgs = ['acme', 'acme', 'globex', 'acme', None, 'globex']
    users = ['alice', 'bob', 'alice', None, None, 'carol']  # `alice` exists in both orgs
    models = [('openai', 'gpt-4o'), ('anthropic', 'claude-sonnet-4'), ('google-gla', 'gemini-2.5-pro')]
    operations = ['agent_run', 'generate_image', 'analyze_text', 'agent_run']
    times = [
        _at(2025, 12, 31, 23, 59, 59, 999_999),
        _at(2026, 1, 1),
        _at(2026, 1, 15, 8, 30),
        _at(2026, 1, 31, 23, 59, 59, 999_999),
        _at(2026, 2, 1),
        _at(2026, 2, 14, 12),
        _at(2026, 1, 15, 23, 0),
    ]
    records: list[UsageRecord] = []
    for i, (org, user, (provider, model), operation, created_at) in enumerate(
        zip(cycle(orgs), cycle(users), cycle(models), cycle(operations), islice(cycle(times), 21), strict=False)
    ):
        unpriced = i % 7 == 3
        records.append(
            UsageRecord(
                created_at=created_at,
                organization_id=org,
                user_id=user,
                provider=provider,
                model=model,
                operation=operation,
                source='agent' if i % 2 else 'direct',
                agent_name=('writer', 'critic', None)[i % 3],
                input_tokens=1_000 + i,
                cache_read_tokens=10 * i,
                cache_write_tokens=i % 3,
                output_tokens=100 + 2 * i,
                reasoning_tokens=5 * (i % 4),
                output_image_tokens=1_290 if operation == 'generate_image' else 0,
                cost_usd=None if unpriced else Decimal('0.000123456789') * (i + 1) + Decimal('0.000000000001'),
                pricing_status='unpriced' if unpriced else 'priced',
                status='error' if i % 5 == 4 else 'ok',
            )
        )
    return records


RECORDS = _fixture_records()


def _key(name: str) -> Callable[[UsageRecord], str | None]:
    if name == 'day':
        return lambda r: r.created_at.astimezone(UTC).strftime('%Y-%m-%d')
    if name == 'month':
        return lambda r: r.created_at.astimezone(UTC).strftime('%Y-%m')
    column = {'organization': 'organization_id', 'user': 'user_id', 'agent': 'agent_name'}.get(name, name)
    return lambda r: getattr(r, column)


def _reference_totals(records: Iterable[UsageRecord]) -> UsageTotals:
    records = list(records)
    return UsageTotals(
        events=len(records),
        cost_usd=sum((r.cost_usd for r in records if r.cost_usd is not None), Decimal(0)),
        unpriced_events=sum(r.cost_usd is None for r in records),
        error_events=sum(r.status == 'error' for r in records),
        **{name: sum(getattr(r, name) for r in records) for name in TOKEN_BUCKETS},
    )


def _reference(
    records: Sequence[UsageRecord],
    group_by: Sequence[str],
    *,
    start: datetime,
    end: datetime,
    organization_id: str | None = None,
    user_id: str | None = None,
) -> tuple[UsageTotals, dict[tuple[str | None, ...], UsageTotals]]:
    selected = [
        r
        for r in records
        if start <= r.created_at < end
        and (organization_id is None or r.organization_id == organization_id)
        and (user_id is None or r.user_id == user_id)
    ]
    keys = [_key(name) for name in group_by]
    groups: dict[tuple[str | None, ...], list[UsageRecord]] = {}
    for record in selected:
        groups.setdefault(tuple(key(record) for key in keys), []).append(record)
    return _reference_totals(selected), {k: _reference_totals(v) for k, v in groups.items()}


def _by_group(summary: UsageSummary) -> dict[tuple[str | None, ...], UsageTotals]:
    return {tuple(row.group[g] for g in summary.group_by): row.totals for row in summary.rows}


@pytest.fixture
def populated(tracker: UsageTracker) -> UsageTracker:
    for record in RECORDS:
        tracker.track(record)
    assert tracker.flush()
    assert tracker.stats().written == len(RECORDS)
    return tracker


EVERYTHING = (_at(2000, 1, 1), _at(2100, 1, 1))


def test_fixture_data_is_varied():
    # Guard the fixture itself, so the grouping tests below cannot pass vacuously.
    for name in GROUP_BY_DIMENSIONS:
        assert len({_key(name)(r) for r in RECORDS}) >= 2, name
    assert any(r.cost_usd is None for r in RECORDS)
    assert any(r.status == 'error' for r in RECORDS)


@pytest.mark.parametrize(
    'group_by',
    [
        *((name,) for name in GROUP_BY_DIMENSIONS),
        (),
        ('organization', 'model'),
        ('month', 'day'),
        ('user', 'operation', 'source'),
        ('provider', 'model', 'month'),
        ('agent', 'status', 'day'),
    ],
    ids=lambda g: ','.join(g) or 'none',
)
def test_summary_groups_and_totals(populated: UsageTracker, group_by: tuple[GroupBy, ...]):
    summary = populated.get_usage_summary(*EVERYTHING, group_by=group_by)
    totals, groups = _reference(RECORDS, group_by, start=EVERYTHING[0], end=EVERYTHING[1])

    assert summary.group_by == group_by
    assert summary.totals == totals
    assert summary.total_cost_usd == totals.cost_usd
    assert _by_group(summary) == groups
    assert len(summary.rows) == len(groups)


def test_rows_are_ordered_by_group(populated: UsageTracker):
    summary = populated.get_usage_summary(*EVERYTHING, group_by=('month', 'model'))
    keys = [(row.group['month'], row.group['model']) for row in summary.rows]
    assert keys == sorted(keys)  # type: ignore[type-var]


@pytest.mark.parametrize(
    ('organization_id', 'user_id'),
    [('acme', None), ('globex', None), (None, 'alice'), ('acme', 'alice'), ('globex', 'alice'), ('nobody', None)],
)
def test_filters(populated: UsageTracker, organization_id: str | None, user_id: str | None):
    start, end = _at(2026, 1, 1), _at(2026, 2, 1)
    summary = populated.get_usage_summary(
        start, end, organization_id=organization_id, user_id=user_id, group_by=('organization', 'user')
    )
    totals, groups = _reference(
        RECORDS, ('organization', 'user'), start=start, end=end, organization_id=organization_id, user_id=user_id
    )
    assert summary.totals == totals
    assert _by_group(summary) == groups
    assert (summary.organization_id, summary.user_id) == (organization_id, user_id)


def test_organizations_are_isolated(populated: UsageTracker):
    # `alice` is a user in both organizations: one organization's summary never shows the other's usage.
    acme = populated.get_usage_summary(*EVERYTHING, organization_id='acme', user_id='alice', group_by=('organization',))
    globex = populated.get_usage_summary(*EVERYTHING, organization_id='globex', user_id='alice', group_by=())
    everyone = populated.get_usage_summary(*EVERYTHING, user_id='alice', group_by=())
    assert {row.group['organization'] for row in acme.rows} == {'acme'}
    assert acme.totals.events > 0
    assert globex.totals.events > 0
    assert acme.totals + globex.totals == everyone.totals


def test_empty_range_is_zero_not_missing(populated: UsageTracker):
    summary = populated.get_usage_summary(_at(2030, 1, 1), _at(2030, 2, 1))
    assert summary.rows == []
    assert summary.totals == UsageTotals()


@pytest.mark.parametrize(
    ('now', 'start', 'end'),
    [
        (_at(2026, 1, 1), _at(2026, 1, 1), _at(2026, 2, 1)),
        (_at(2026, 1, 31, 23, 59, 59, 999_999), _at(2026, 1, 1), _at(2026, 2, 1)),
        (_at(2025, 12, 31, 23, 59, 59, 999_999), _at(2025, 12, 1), _at(2026, 1, 1)),
        (_at(2026, 2, 28, 12), _at(2026, 2, 1), _at(2026, 3, 1)),
        # 20:00 on Jan 31 in New York is already February in UTC.
        (datetime(2026, 1, 31, 20, tzinfo=timezone(timedelta(hours=-5))), _at(2026, 2, 1), _at(2026, 3, 1)),
    ],
)
def test_month_bounds(now: datetime, start: datetime, end: datetime):
    assert month_bounds(now) == (start, end)


@pytest.mark.parametrize(
    ('now', 'inside', 'outside'),
    [
        (
            _at(2026, 1, 20),
            [_at(2026, 1, 1), _at(2026, 1, 31, 23, 59, 59, 999_999)],
            [_at(2025, 12, 31, 23, 59, 59, 999_999), _at(2026, 2, 1)],
        ),
        (
            _at(2025, 12, 31, 23, 59, 59, 999_999),  # December -> January
            [_at(2025, 12, 1), _at(2025, 12, 31, 23, 59, 59, 999_999)],
            [_at(2025, 11, 30, 23, 59, 59, 999_999), _at(2026, 1, 1)],
        ),
    ],
    ids=['january', 'december'],
)
def test_current_month_is_bounded_at_the_edges(
    tracker: UsageTracker, now: datetime, inside: list[datetime], outside: list[datetime]
):
    def track(created_at: datetime, cost: str) -> None:
        tracker.track(
            created_at=created_at,
            organization_id='edge',
            model='gpt-4o',
            cost_usd=Decimal(cost),
            pricing_status='priced',
        )

    for i, created_at in enumerate(inside):
        track(created_at, f'1{i}')
    for i, created_at in enumerate(outside):
        track(created_at, f'0.00{i + 1}')
    tracker.track(created_at=inside[0], organization_id='other', model='gpt-4o', cost_usd=Decimal(100))
    assert tracker.flush()

    summary = tracker.get_current_month_usage('edge', now=now, group_by=('day',))
    assert summary.totals.events == len(inside)
    assert summary.totals.cost_usd == Decimal(10) + Decimal(11)
    assert {row.group['day'] for row in summary.rows} == {d.strftime('%Y-%m-%d') for d in inside}


def test_query_summary_rejects_bad_arguments(tracker: UsageTracker):
    with pytest.raises(ValueError, match='timezone-aware'):
        query_summary(tracker.engine, datetime(2026, 1, 1), _at(2026, 2, 1))
    with pytest.raises(ValueError, match=r"cannot group by \['week'\]"):
        query_summary(tracker.engine, *EVERYTHING, group_by=('week',))  # type: ignore[arg-type]


ODD_IDS = [' spaced ', 'ab\x00c', 'x\ud800y', 'o' * 300, 12345]


@pytest.mark.parametrize('raw_id', ODD_IDS, ids=['spaces', 'nul', 'surrogate', 'long', 'int'])
@pytest.mark.parametrize('group_by', [('model',), ('user',)], ids=['rollup', 'raw'])
def test_a_lookup_by_the_id_given_finds_what_the_ledger_stored(
    tracker: UsageTracker, raw_id: object, group_by: tuple[GroupBy, ...]
):
    """Summaries match ids as the ledger stores them, as budgets do: the app asks with the id it tracked."""
    day = _at(2026, 3, 2)
    for i in range(2):
        tracker.track(
            organization_id=raw_id,
            user_id=raw_id,
            provider='openai',
            model='gpt-4o',
            input_tokens=100 + i,
            created_at=day,
        )
    tracker.track(
        organization_id='other', user_id='other', provider='openai', model='gpt-4o', input_tokens=1, created_at=day
    )
    assert tracker.flush()
    span = (_at(2026, 3, 1), _at(2026, 4, 1))
    for filters in ({'organization_id': raw_id}, {'user_id': raw_id}):
        summary = query_summary(tracker.engine, *span, group_by=group_by, **filters)  # pyright: ignore[reportArgumentType]
        assert summary.totals.events == 2, filters
        assert summary.totals.input_tokens == 201
    assert len(list(export_rows(tracker.engine, *span, organization_id=raw_id))) == 2  # pyright: ignore[reportArgumentType]


def test_a_blank_id_is_a_clear_error(tracker: UsageTracker):
    with pytest.raises(ValueError, match=r"organization_id '   ' is blank"):
        query_summary(tracker.engine, *EVERYTHING, organization_id='   ')


def test_many_small_costs_sum_exactly(tracker: UsageTracker):
    pico = Decimal('0.000000000001')
    for _ in range(300):
        tracker.track(created_at=_at(2026, 1, 2), model='tiny', cost_usd=pico * 3, pricing_status='priced')
    assert tracker.flush()
    summary = tracker.get_usage_summary(*EVERYTHING)
    assert summary.totals.cost_usd == Decimal('0.000000000900')


def _aggregate_row(group: tuple[str | None, ...], events: int, cost: Decimal | None, tokens: int) -> tuple[object, ...]:
    return (*group, events, cost, 0, 0, tokens, 0, 0, 0, tokens, 0, 0, 0)


def _summary(rows: list[tuple[object, ...]], group_by: tuple[GroupBy, ...], **options: bool) -> UsageSummary:
    return _summary_of(
        rows, start=EVERYTHING[0], end=EVERYTHING[1], organization_id=None, user_id=None, group_by=group_by, **options
    )


def test_summary_objects_are_ordinary_frozen_dataclasses():
    # `_summary_of` builds them without `__init__`: they must be indistinguishable from constructed ones.
    summary = _summary([_aggregate_row(('acme', 'gpt-4o'), 2, Decimal('0.5'), 7)], ('organization', 'model'))
    expected = UsageTotals(events=2, cost_usd=Decimal('0.5'), input_tokens=7, output_tokens=7)
    assert summary.rows == [SummaryRow({'organization': 'acme', 'model': 'gpt-4o'}, expected)]
    assert summary.totals == expected
    row = summary.rows[0]
    assert hash(row.totals) == hash(expected)
    assert repr(row.totals) == repr(expected)
    with pytest.raises(FrozenInstanceError):
        row.totals.events = 3  # type: ignore[misc]
    assert (row.totals + row.totals).events == 4


def test_unpriced_groups_cost_zero_and_empty_aggregates_are_dropped():
    summary = _summary([_aggregate_row(('a',), 1, None, 1), _aggregate_row(('b',), 2, Decimal('0.25'), 1)], ('model',))
    assert [r.totals.cost_usd for r in summary.rows] == [Decimal(0), Decimal('0.25')]
    assert summary.totals.cost_usd == Decimal('0.25')
    # An ungrouped aggregate over no rows returns one row of zero events and NULL sums.
    empty = _summary([(0, None, 0, 0, None, None, None, None, None, None, None, None)], ())
    assert empty.rows == [] and empty.totals == UsageTotals()


def test_sums_in_python_never_round():
    # More digits than the default decimal context's 28, well within what `numeric(38, 12)` sums can hold.
    big = Decimal('12345678901234567890.123456789012')
    rows = [_aggregate_row(('acme', 'gpt-4o'), 1, big, 1), _aggregate_row(('acme', 'gpt-4o'), 1, big, 1)]
    merged = _summary(rows, ('organization', 'model'), merge_adjacent=True)
    assert merged.totals.cost_usd == merged.rows[0].totals.cost_usd == Decimal('24691357802469135780.246913578024')
    assert _summary(rows, ('organization', 'model')).totals.cost_usd == merged.totals.cost_usd


def test_merge_adjacent_adds_up_consecutive_rows_of_a_group():
    # A rollup level's rows ordered by the group: `gpt-4o` of `acme` under two providers, and a NULL organization.
    rows = [
        _aggregate_row(('acme', 'gpt-4o'), 1, Decimal('0.1'), 10),
        _aggregate_row(('acme', 'gpt-4o'), 2, Decimal('0.2'), 20),
        _aggregate_row(('acme', 'o3'), 3, Decimal('0.3'), 30),
        _aggregate_row((None, 'o3'), 4, Decimal('0.4'), 40),
        _aggregate_row((None, 'o3'), 5, Decimal('0.5'), 50),
    ]
    summary = _summary(rows, ('organization', 'model'), merge_adjacent=True)
    assert [(r.group['organization'], r.group['model'], r.totals.events, r.totals.cost_usd) for r in summary.rows] == [
        ('acme', 'gpt-4o', 3, Decimal('0.3')),
        ('acme', 'o3', 3, Decimal('0.3')),
        (None, 'o3', 9, Decimal('0.9')),
    ]
    assert (
        summary.totals
        == _summary([row[2:] for row in rows], ()).totals
        == UsageTotals(events=15, cost_usd=Decimal('1.5'), input_tokens=150, output_tokens=150)
    )


@pytest.mark.parametrize('enabled', [True, False])
def test_the_garbage_collector_is_left_as_found(populated: UsageTracker, enabled: bool):
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        assert populated.get_usage_summary(*EVERYTHING, group_by=('organization', 'model')).rows
        assert gc.isenabled() is enabled
        with pytest.raises(TypeError):
            _summary([('gpt-4o', 1, Decimal(1), 0)], ('model',))  # too few sums: fails while the collector is paused
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


def test_the_fast_constructor_refuses_a_class_with_post_init():
    @dataclass(frozen=True, slots=True)
    class Checked:
        value: int

        def __post_init__(self) -> None:
            assert self.value >= 0

    with pytest.raises(TypeError, match='__post_init__'):
        _slot_constructor(Checked)
