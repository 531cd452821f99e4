"""`pai_usage.testing`: the pytest plugin, run from a sample app's test suite, and its in-memory ledger."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal
from importlib.metadata import entry_points
from pathlib import Path

import genai_prices
import pytest
from pydantic_ai import Agent, RunContext
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

import pai_usage
from pai_usage import TrackUsage, UsageDeps, UsageTracker
from pai_usage.testing import UsageLedger, assert_every_request_recorded, capture_usage, memory_tracker

pytest_plugins = ['pytester']

ROOT = Path(__file__).resolve().parent.parent

SAMPLE_SUITE = """
import os
from decimal import Decimal

import genai_prices
import pytest
from pydantic_ai import Agent
from pydantic_ai.messages import ModelResponse, TextPart
from pydantic_ai.models.function import FunctionModel
from pydantic_ai.usage import RequestUsage

import pai_usage
from pai_usage import TrackUsage, UnknownFieldWarning, UsageDeps, get_tracker


def reply(messages, info):
    return ModelResponse(
        parts=[TextPart('hi')], provider_name='openai', usage=RequestUsage(input_tokens=1000, output_tokens=100)
    )


agent = Agent(FunctionModel(reply, model_name='gpt-4o'), deps_type=UsageDeps, capabilities=[TrackUsage()])
ACME = UsageDeps(user_id='u1', organization_id='acme')
EXPECTED = genai_prices.calc_price(
    RequestUsage(input_tokens=1000, output_tokens=100), 'gpt-4o', provider_id='openai'
).total_price


def test_ledger_captures_the_run(usage_ledger):
    result = agent.run_sync('hi', deps=ACME)
    usage_ledger.assert_every_request_recorded(result)
    [row] = usage_ledger.rows(model='gpt-4o', source='agent')
    assert (row.organization_id, row.user_id, row.run_id) == ('acme', 'u1', result.run_id)
    assert usage_ledger.total_cost(org='acme') == EXPECTED
    assert usage_ledger.total_cost(org='globex') == 0
    assert get_tracker().stats().enqueued == 0  # captured on the caller's thread, never queued


def test_a_new_test_starts_empty(usage_ledger):
    assert usage_ledger.records == []


def test_default_tracker_is_in_memory():
    tracker = get_tracker()
    assert tracker.engine.url.database in (None, '', ':memory:')
    agent.run_sync('hi', deps=ACME)
    assert tracker.flush()
    summary = tracker.get_current_month_usage('acme')
    assert (summary.totals.events, summary.totals.cost_usd) == (1, EXPECTED)


def test_off_switch(usage_ledger):
    tracker = pai_usage.configure(enabled=False)
    try:
        agent.run_sync('hi', deps=ACME)
        get_tracker().track(model='gpt-4o')
    finally:
        pai_usage.configure(enabled=True)
    assert usage_ledger.records == []
    assert tracker.stats().disabled == 2  # the run's row and the direct one, counted, not recorded
    assert tracker.engine.url.database in (None, '', ':memory:')  # configure() without a URL stays in memory


@pytest.mark.parametrize('attempt', [1, 2])
def test_each_test_sees_its_own_mistakes(usage_ledger, attempt):
    with pytest.warns(UnknownFieldWarning, match='`inputtokens`'):
        get_tracker().track(model='gpt-4o', inputtokens=5)
    assert len(usage_ledger.rows(model='gpt-4o')) == 1


def test_env_var_of_the_real_ledger_is_ignored():
    assert os.environ['PAI_USAGE_DATABASE_URL'].endswith('real_ledger.db')
    assert get_tracker().engine.url.database in (None, '', ':memory:')
"""


def reply(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(
        parts=[TextPart('hi')], provider_name='openai', usage=RequestUsage(input_tokens=1000, output_tokens=100)
    )


AGENT = Agent(FunctionModel(reply, model_name='gpt-4o'), deps_type=UsageDeps, capabilities=[TrackUsage()])
ACME = UsageDeps(user_id='u1', organization_id='acme')
EXPECTED = genai_prices.calc_price(
    RequestUsage(input_tokens=1000, output_tokens=100), 'gpt-4o', provider_id='openai'
).total_price


def test_plugin_is_registered_by_entry_point():
    [plugin] = [ep for ep in entry_points(group='pytest11') if ep.name == 'pai_usage']
    assert plugin.value == 'pai_usage.testing'


def test_sample_suite_uses_the_plugin(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    # A subprocess, as a user's suite: the plugin comes from the entry point, with the real ledger in the env.
    real = pytester.path / 'real_ledger.db'
    monkeypatch.setenv('PAI_USAGE_DATABASE_URL', f'sqlite:///{real}')
    monkeypatch.delenv('PAI_USAGE_DISABLED', raising=False)
    docs_sample = re.search(r'```python\n(.*?)```', (ROOT / 'docs' / 'testing.md').read_text(), re.S)
    assert docs_sample is not None and 'usage_ledger' in docs_sample.group(1)
    pytester.makepyfile(test_app=SAMPLE_SUITE, test_docs_sample=docs_sample.group(1))
    pytester.makeini('[pytest]\nfilterwarnings = error\n')
    result = pytester.runpytest_subprocess('-p', 'no:cacheprovider', '-q')
    result.assert_outcomes(passed=8)
    assert not real.exists()
    assert not (pytester.path / 'pai_usage.db').exists()


@pytest.mark.anyio
async def test_ledger_catches_records_of_every_tracker(tmp_path: Path):
    with UsageTracker(f'sqlite:///{tmp_path}/app.db', spill=False) as tracker:
        with capture_usage() as ledger:
            result = await AGENT.run('hi', deps=UsageDeps(user_id='u1', organization_id='acme', tracker=tracker))
            assert_every_request_recorded(result)
        assert ledger.total_cost(org='acme') == EXPECTED
        assert tracker.stats().enqueued == 0
        tracker.track(organization_id='acme', model='gpt-4o', provider='openai', input_tokens=1)  # after: written
        assert tracker.flush()
        assert tracker.get_current_month_usage('acme').totals.events == 1
    tracker.engine.dispose()


@pytest.mark.anyio
async def test_assert_every_request_recorded_fails_when_rows_are_missing(usage_ledger: UsageLedger):
    result = await AGENT.run('hi', deps=ACME)
    usage_ledger.clear()
    with pytest.raises(AssertionError, match='recorded none'):
        usage_ledger.assert_every_request_recorded(result)
    # A sub-agent without the capability leaves its usage to the parent's remainder row: not "every request".
    child = Agent(FunctionModel(reply, model_name='gpt-4o'))
    parent = Agent(FunctionModel(_delegate, model_name='gpt-4o'), deps_type=UsageDeps, capabilities=[TrackUsage()])

    @parent.tool
    async def ask_child(ctx: RunContext[UsageDeps]) -> str:  # pyright: ignore[reportUnusedFunction]
        return (await child.run('q', usage=ctx.usage)).output

    result = await parent.run('go', deps=ACME)
    assert result.usage.input_tokens == 10 + 20 + 1000
    with pytest.raises(AssertionError, match=r'1100 tokens of run .* were recorded by no request row'):
        usage_ledger.assert_every_request_recorded(result)


def _delegate(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    if not any(isinstance(p, ToolReturnPart) for m in messages for p in m.parts):
        return ModelResponse(
            parts=[ToolCallPart('ask_child', {})], usage=RequestUsage(input_tokens=10, output_tokens=1)
        )
    return ModelResponse(parts=[TextPart('done')], usage=RequestUsage(input_tokens=20, output_tokens=2))


def test_ledger_helpers(usage_ledger: UsageLedger):
    tracker = pai_usage.get_tracker()
    tracker.track(organization_id='acme', provider='openai', model='gpt-4o', input_tokens=1000, output_tokens=100)
    tracker.track(organization_id='acme', provider='openai', model='gpt-4o', cost_usd=Decimal('0.5'))
    tracker.track(organization_id='globex', provider='acme', model='my-own-model', input_tokens=7)
    assert [r.pricing_status for r in usage_ledger.records] == ['priced', 'priced', 'unpriced']
    assert usage_ledger.total_cost(org='acme') == EXPECTED + Decimal('0.5')
    assert usage_ledger.total_tokens(model='gpt-4o') == 1100
    assert len(usage_ledger.rows(organization_id='acme', model='gpt-4o')) == 2
    with pytest.raises(AssertionError, match='unpriced: acme/my-own-model'):
        usage_ledger.total_cost()
    with pytest.raises(TypeError, match='`colour` is not'):
        usage_ledger.rows(colour='red')


def test_ledger_keeps_no_values_of_invalid_records(usage_ledger: UsageLedger):
    pai_usage.get_tracker().track(model='gpt-4o', input_tokens=-5, cost_usd='secret-prompt-text' * 20)
    assert usage_ledger.records == []
    assert sorted(m.split(':')[0] for m in usage_ledger.invalid) == ['cost_usd', 'input_tokens']
    assert 'secret' not in ''.join(usage_ledger.invalid)


def test_env_off_switch(monkeypatch: pytest.MonkeyPatch, usage_ledger: UsageLedger):
    monkeypatch.setenv('PAI_USAGE_DISABLED', '1')
    with memory_tracker() as tracker:
        tracker.track(provider='openai', model='gpt-4o', input_tokens=1)
        assert tracker.flush()
        assert (tracker.stats().disabled, tracker.stats().enqueued) == (1, 0)
        assert tracker.get_current_month_usage('acme').totals.events == 0
    assert usage_ledger.records == []
    tracker.engine.dispose()


def test_assert_every_request_recorded_needs_a_capture():
    with pytest.raises(RuntimeError, match='usage_ledger'):
        assert_every_request_recorded(object())


def test_sqlite_memory_tracker_writes_and_reads_one_database():
    with UsageTracker('sqlite:///:memory:', flush_interval=0.01, spill=False) as tracker:
        tracker.track(organization_id='acme', provider='openai', model='gpt-4o', input_tokens=1000, output_tokens=100)
        assert tracker.flush()
        summary = tracker.get_current_month_usage('acme')
        assert (summary.totals.events, summary.totals.cost_usd) == (1, EXPECTED)
        assert tracker.stats().written == 1
    tracker.engine.dispose()
    with memory_tracker() as other:  # a fresh database each time
        assert other.get_current_month_usage('acme', now=datetime.now(UTC)).totals.events == 0
    other.engine.dispose()
