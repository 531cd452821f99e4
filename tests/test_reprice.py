"""Reprice: stored costs recomputed from stored usage with today's tables, shown per model, applied and audited."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import genai_prices
import pytest
import sqlalchemy as sa
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

from pai_usage import PriceTable, TokenPrice, TrackUsage, UsageDeps, UsageRecord, UsageTracker, set_price_table
from pai_usage._cli import cli_logic
from pai_usage.pricing import price_fields, price_fields_many
from pai_usage.reprice import REPRICE_AUDIT, reprice
from pai_usage.table import TOKEN_USAGE

WHEN = datetime(2026, 6, 10, 12, tzinfo=UTC)
SINCE = datetime(2026, 6, 1, tzinfo=UTC)
OLD = PriceTable(tokens=(TokenPrice('gpt-4o', provider='openai', input_mtok=Decimal(1), output_mtok=Decimal(2)),))
"""The contract price the rows were written with, since withdrawn."""


def _genai(model: str, provider: str, **usage: int) -> Decimal:
    return genai_prices.calc_price(
        genai_prices.Usage(**usage), model, provider_id=provider, genai_request_timestamp=WHEN
    ).total_price


def _populate(tracker: UsageTracker) -> dict[str, Any]:
    """Rows priced under `OLD`, plus rows reprice must leave alone; their ids by name."""
    set_price_table(OLD)
    records = {
        'gpt-a': UsageRecord(created_at=WHEN, organization_id='acme', provider='openai', model='gpt-4o',
                             input_tokens=10_000, output_tokens=1_000),
        'gpt-b': UsageRecord(created_at=WHEN, organization_id='globex', provider='openai', model='gpt-4o',
                             input_tokens=2_000, output_tokens=300),
        'claude': UsageRecord(created_at=WHEN, organization_id='acme', provider='anthropic', model='claude-sonnet-4',
                              input_tokens=5_000, output_tokens=100),
        'gateway': UsageRecord(created_at=WHEN, organization_id='acme', provider='my-gateway', model='gpt-4o-mini',
                               input_tokens=7_000, output_tokens=700),
        # A failed run's zero-cost marker and a response without usage: nothing to price them from.
        'marker': UsageRecord(created_at=WHEN, organization_id='acme', operation='agent_run', source='agent',
                              status='error', cost_usd=Decimal(0), pricing_status='priced'),
        'no-usage': UsageRecord(created_at=WHEN, organization_id='acme', provider='google-gla',
                                model='gemini-2.5-flash', pricing_status='unpriced', metadata={'usage_missing': True}),
        # Costs the caller passed (no override names these models): kept as given, by the writer and by reprice.
        'given': UsageRecord(created_at=WHEN, organization_id='acme', provider='openai', model='gpt-4o-mini',
                             input_tokens=10_000, output_tokens=1_000, cost_usd=Decimal('0.001')),
        'given-unknown': UsageRecord(created_at=WHEN, organization_id='acme', provider='my-lab', model='my-model',
                                     input_tokens=10_000, output_tokens=1_000, cost_usd=Decimal('0.5')),
        'given-source': UsageRecord(created_at=WHEN, organization_id='acme', provider='openai', model='gpt-4o-mini',
                                    input_tokens=10_000, cost_usd=Decimal('0.002'), price_source='contract 2026'),
        'before': UsageRecord(created_at=datetime(2026, 5, 1, tzinfo=UTC), provider='openai', model='gpt-4o',
                              input_tokens=1_000),
    }  # fmt: skip
    for record in records.values():
        tracker.track(record)
    assert tracker.flush()
    set_price_table(None)
    return {name: record.id for name, record in records.items()}


def _rows(engine: sa.Engine) -> dict[Any, dict[str, Any]]:
    with engine.connect() as conn:
        return {row['id']: dict(row) for row in conn.execute(sa.select(TOKEN_USAGE)).mappings()}


def test_dry_run_shows_the_difference_and_changes_nothing(tracker: UsageTracker):
    ids = _populate(tracker)
    before = _rows(tracker.engine)
    result = reprice(tracker.engine, since=SINCE)
    assert not result.applied
    assert _rows(tracker.engine) == before
    by_model = {(g.provider, g.model): g for g in result.groups}
    gpt = by_model[('openai', 'gpt-4o')]
    assert (gpt.rows, gpt.changed) == (2, 2)
    assert gpt.old_total == before[ids['gpt-a']]['cost_usd'] + before[ids['gpt-b']]['cost_usd']
    assert gpt.new_total == _genai('gpt-4o', 'openai', input_tokens=10_000, output_tokens=1_000) + _genai(
        'gpt-4o', 'openai', input_tokens=2_000, output_tokens=300
    )
    for given in (by_model[('openai', 'gpt-4o-mini')], by_model[('my-lab', 'my-model')]):
        assert given.changed == 0 and given.new_total == given.old_total > 0
    claude = by_model[('anthropic', 'claude-sonnet-4')]
    assert (claude.rows, claude.changed, claude.old_total) == (1, 0, claude.new_total)
    assert (by_model[(None, None)].changed, by_model[('google-gla', 'gemini-2.5-flash')].changed) == (0, 0)
    assert result.rows == 9  # `before` is outside the range
    with tracker.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(REPRICE_AUDIT)).scalar_one() == 0


def test_apply_updates_audits_and_keeps_summaries_exact(tracker: UsageTracker):
    ids = _populate(tracker)
    before = _rows(tracker.engine)
    set_price_table(PriceTable(provider_aliases={'my-gateway': 'openai'}))  # the gateway is mapped now
    result = reprice(tracker.engine, since=SINCE, apply=True)
    assert result.applied and result.changed == 3

    after = _rows(tracker.engine)
    assert after[ids['gpt-a']]['cost_usd'] == _genai('gpt-4o', 'openai', input_tokens=10_000, output_tokens=1_000)
    assert after[ids['gateway']]['cost_usd'] == _genai('gpt-4o-mini', 'openai', input_tokens=7_000, output_tokens=700)
    assert before[ids['gateway']]['pricing_status'] == 'unpriced'
    for name in ('gpt-a', 'gpt-b', 'gateway'):
        assert (after[ids[name]]['pricing_status'], after[ids[name]]['price_source']) == (
            'priced',
            f'genai-prices {genai_prices.__version__}',
        )
    for name in ('claude', 'marker', 'no-usage', 'given', 'given-unknown', 'given-source', 'before'):
        assert after[ids[name]] == before[ids[name]]
    assert after[ids['given-unknown']]['cost_usd'] == Decimal('0.5')

    with tracker.engine.connect() as conn:
        audit = {row['usage_id']: row for row in conn.execute(sa.select(REPRICE_AUDIT)).mappings()}
    assert set(audit) == {ids['gpt-a'], ids['gpt-b'], ids['gateway']}
    entry = audit[ids['gpt-a']]
    assert (entry['old_cost_usd'], entry['old_pricing_status'], entry['old_price_source']) == (
        before[ids['gpt-a']]['cost_usd'],
        'override',
        'config: tokens openai/gpt-4o',
    )
    assert (entry['new_cost_usd'], entry['repriced_at']) == (after[ids['gpt-a']]['cost_usd'], result.repriced_at)

    # Applying again finds nothing left to change.
    assert reprice(tracker.engine, since=SINCE, apply=True).changed == 0
    _assert_rollup_equals_raw(tracker.engine)


def _assert_rollup_equals_raw(engine: sa.Engine) -> None:
    if engine.dialect.name != 'postgresql':
        return  # the daily rollup (migration 0002) is PostgreSQL's
    key = 'day, organization_id, provider, model, operation, source'
    with engine.connect() as conn:
        raw = conn.execute(
            sa.text(
                "SELECT (created_at AT TIME ZONE 'UTC')::date AS day, organization_id, provider, model, operation, "
                'source, count(*), coalesce(sum(cost_usd), 0), '
                "count(*) FILTER (WHERE pricing_status = 'unpriced') FROM token_usage GROUP BY 1, 2, 3, 4, 5, 6"
            )
        ).all()
        rollup = conn.execute(
            sa.text(f'SELECT {key}, events, cost_usd, unpriced_events FROM token_usage_daily WHERE events > 0')
        ).all()
    assert sorted(map(tuple, rollup), key=str) == sorted(map(tuple, raw), key=str)


@pytest.mark.parametrize(
    ('options', 'changed'),
    [
        (['--model', 'gpt-4o'], 2),
        (['--org', 'globex'], 1),
        (['--until', '2026-06-10'], 0),
    ],
)
def test_filters(tracker: UsageTracker, options: list[str], changed: int, capsys: pytest.CaptureFixture[str]):
    _populate(tracker)
    url = tracker.engine.url.render_as_string(hide_password=False)
    assert cli_logic(['reprice', '--database-url', url, '--since', '2026-06-01', *options]) == 0
    out = capsys.readouterr().out
    total = [line for line in out.splitlines() if line.startswith('total')]
    assert total and total[0].split()[2] == str(changed)
    assert 'dry run' in out


def test_cli_apply(tracker: UsageTracker, capsys: pytest.CaptureFixture[str]):
    ids = _populate(tracker)
    url = tracker.engine.url.render_as_string(hide_password=False)
    assert cli_logic(['reprice', '--database-url', url, '--since', '2026-06-01', '--apply']) == 0
    out = capsys.readouterr().out
    assert 'openai/gpt-4o ' in out and 'applied: 2 rows updated' in out
    assert _rows(tracker.engine)[ids['gpt-b']]['cost_usd'] == _genai(
        'gpt-4o', 'openai', input_tokens=2_000, output_tokens=300
    )
    _assert_rollup_equals_raw(tracker.engine)


def test_cli_rejects_a_bad_date(capsys: pytest.CaptureFixture[str], sqlite_url: str):
    assert cli_logic(['reprice', '--database-url', sqlite_url, '--since', 'last week']) == 2
    assert '--since' in capsys.readouterr().err


@pytest.mark.parametrize(
    ('model', 'usage'),
    [
        ('gpt-4o', {'input_tokens': 1_000, 'output_tokens': 100}),
        # Output tokens genai-prices has no price for: free to it and to pydantic-ai, which priced the row.
        ('text-embedding-3-large', {'input_tokens': 100_000, 'output_tokens': 10}),
    ],
)
def test_costs_pydantic_ai_gave_are_repriced_as_pydantic_ai_prices(
    tracker: UsageTracker, model: str, usage: dict[str, int]
) -> None:
    """With unchanged prices nothing changes: not the cost, not the status (a source text alone is no change)."""

    def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(
            parts=[TextPart('ok')], provider_name='openai', usage=RequestUsage(**usage), timestamp=WHEN
        )

    agent = Agent(FunctionModel(answer, model_name=model), deps_type=UsageDeps, capabilities=[TrackUsage(tracker)])
    agent.run_sync('hi', deps=UsageDeps(organization_id='acme'))
    assert tracker.flush()
    before = _rows(tracker.engine)
    [row] = [r for r in before.values() if r['operation'] == 'agent_request']
    assert row['cost_usd'] == _genai(model, 'openai', **usage) > 0
    result = reprice(tracker.engine, since=SINCE, apply=True)
    [group] = [g for g in result.groups if g.model == model]
    assert (group.changed, group.new_total, group.new_unpriced) == (0, group.old_total, 0)
    assert _rows(tracker.engine) == before


def _priced_with(model: str, provider: str, usage: RequestUsage, context: dict[str, Any] | None) -> Decimal:
    return genai_prices.calc_price(
        usage, model, provider_id=provider, genai_request_timestamp=WHEN, price_context=context
    ).total_price


@pytest.mark.parametrize(
    ('provider', 'model', 'details', 'stored'),
    [
        pytest.param(
            'anthropic',
            'claude-opus-4-8',
            {'speed': 'fast', 'finish_reason': 'end_turn'},
            {'speed': 'fast'},
            id='anthropic-fast-mode',
        ),
        pytest.param(
            'openrouter',
            'mistralai/mistral-large-4-0',
            {'route': 'mistral/eu', 'downstream_provider': 'Mistral', 'cost': 0.08, 'is_byok': False},
            {'route': 'mistral/eu'},
            id='openrouter-route',
        ),
        pytest.param(
            'anthropic',
            'claude-opus-4-8',
            {'processing': 'batch', 'speed': 'fast'},
            {'speed': 'fast'},  # `batch` is the row's `service_tier`
            id='batch-and-fast-mode',
        ),
    ],
)
def test_price_context_pydantic_ai_priced_with_survives_reprice(
    tracker: UsageTracker,
    capsys: pytest.CaptureFixture[str],
    provider: str,
    model: str,
    details: dict[str, Any],
    stored: dict[str, str],
) -> None:
    """pydantic-ai prices a response with its whole `provider_details`: the row keeps what of it sets the price."""
    usage = RequestUsage(input_tokens=100_000, output_tokens=2_000)

    def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(
            parts=[TextPart('ok')], provider_name=provider, provider_details=details, usage=usage, timestamp=WHEN
        )

    agent = Agent(FunctionModel(answer, model_name=model), deps_type=UsageDeps, capabilities=[TrackUsage(tracker)])
    agent.run_sync('hi', deps=UsageDeps(organization_id='acme'))
    assert tracker.flush()
    before = _rows(tracker.engine)
    [row] = [r for r in before.values() if r['operation'] == 'agent_request']
    expected = _priced_with(model, provider, usage, details)
    assert expected != _priced_with(model, provider, usage, None)  # the context changes the price: the test can fail
    assert row['cost_usd'] == expected
    assert row['metadata']['price_context'] == stored

    url = tracker.engine.url.render_as_string(hide_password=False)
    assert cli_logic(['reprice', '--database-url', url, '--since', '2026-06-01']) == 0
    [total] = [line for line in capsys.readouterr().out.splitlines() if line.startswith('total')]
    assert total.split()[2] == '0'  # rows changed
    assert cli_logic(['reprice', '--database-url', url, '--since', '2026-06-01', '--apply']) == 0
    assert _rows(tracker.engine) == before

    # Priced again from the row alone, as the writer and budgets price it.
    unpriced = {**row, 'cost_usd': None, 'pricing_status': None, 'price_source': None}
    assert price_fields(unpriced).cost_usd == expected
    assert price_fields_many([unpriced]) == [price_fields(unpriced)]


def test_a_direct_call_passes_its_price_context_in_metadata(tracker: UsageTracker) -> None:
    usage = RequestUsage(input_tokens=100_000, output_tokens=2_000)
    context = {'speed': 'fast'}
    record = UsageRecord(
        created_at=WHEN,
        provider='anthropic',
        model='claude-opus-4-8',
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        metadata={'price_context': context, 'feature': 'summaries'},
    )
    tracker.track(record)
    assert tracker.flush()
    row = _rows(tracker.engine)[record.id]
    expected = _priced_with('claude-opus-4-8', 'anthropic', usage, context)
    assert expected != _priced_with('claude-opus-4-8', 'anthropic', usage, None)
    assert (row['cost_usd'], row['pricing_status']) == (expected, 'priced')
    result = reprice(tracker.engine, since=SINCE, apply=True)
    assert result.changed == 0
    assert _rows(tracker.engine)[record.id] == row
