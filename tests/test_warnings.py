"""Developer mistakes warn once per kind (or raise in strict mode); runtime faults stay in logging."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.test import TestModel
from pydantic_ai.usage import RequestUsage

import pai_usage
from pai_usage import (
    MissingAttributionWarning,
    PaiUsageWarning,
    TrackUsage,
    UnknownFieldWarning,
    UnpricedModelWarning,
    UsageDeps,
    UsageTracker,
    set_strict,
)
from pai_usage._warnings import reset
from tests._helpers import token_usage_rows

SECRET = 'the user prompt, which must never be stored or logged'


@pytest.fixture(autouse=True)
def _fresh_warnings() -> Iterator[None]:
    reset()
    set_strict(None)
    yield
    reset()
    set_strict(None)


@pytest.fixture
def sqlite_tracker(sqlite_url: str) -> Iterator[UsageTracker]:
    with UsageTracker(sqlite_url, flush_interval=0.01) as tracker:
        yield tracker
    tracker.engine.dispose()


def test_categories_are_ours_and_exported():
    for category in (UnknownFieldWarning, MissingAttributionWarning, UnpricedModelWarning):
        assert issubclass(category, PaiUsageWarning)
        assert getattr(pai_usage, category.__name__) is category
    assert issubclass(PaiUsageWarning, UserWarning)


def test_unknown_fields_warn_once_with_names_only(
    sqlite_tracker: UsageTracker, caplog: pytest.LogCaptureFixture, tmp_path: Path
):
    caplog.set_level(logging.DEBUG, logger='pai_usage')
    with pytest.warns(UnknownFieldWarning) as caught:
        sqlite_tracker.track(provider='openai', model='gpt-4o', inputtokens=5, prompt=SECRET)
        sqlite_tracker.track(provider='openai', model='gpt-4o', inputtokens=6, prompt=SECRET)  # the same kind again
        sqlite_tracker.track({'provider': 'openai', 'model': 'gpt-4o', 'output_tokens': 1, 'prompt': SECRET})
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2, messages  # `inputtokens, prompt` once, then `prompt` alone once
    assert '`inputtokens`, `prompt`' in messages[0] and 'discarded' in messages[0]
    assert caught[0].filename == __file__  # points at the caller's `track()`
    assert sqlite_tracker.flush()
    rows = token_usage_rows(sqlite_tracker.engine)
    assert len(rows) == 3  # the rest of each record is kept
    assert sqlite_tracker.stats().invalid == 0
    everything = repr(rows) + caplog.text + ''.join(messages)
    spill = sqlite_tracker.spill_dir
    if spill is not None and spill.exists():
        everything += ''.join(p.read_text(errors='replace') for p in spill.rglob('*') if p.is_file())
    assert SECRET not in everything


def test_known_fields_do_not_warn(sqlite_tracker: UsageTracker):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        sqlite_tracker.track(pai_usage.UsageRecord(provider='openai', model='gpt-4o'), input_tokens=1)
        sqlite_tracker.track(provider='openai', model='gpt-4o', input_tokens=1, metadata={'prompt_id': 7})
        assert sqlite_tracker.flush()
    assert [w for w in caught if issubclass(w.category, PaiUsageWarning)] == []


@pytest.mark.parametrize('how', ['set_strict', 'env'])
def test_strict_mode_raises(sqlite_tracker: UsageTracker, monkeypatch: pytest.MonkeyPatch, how: str):
    if how == 'set_strict':
        set_strict(True)
    else:
        monkeypatch.setenv('PAI_USAGE_STRICT', '1')
    with pytest.raises(UnknownFieldWarning, match='inputtokens'):
        sqlite_tracker.track(model='gpt-4o', inputtokens=5)
    # The call fails, but the billing row is kept, without the unknown field: a mistake never costs a record.
    assert sqlite_tracker.flush()
    assert sqlite_tracker.stats().written == 1
    assert sqlite_tracker.stats().dropped == 0


@pytest.mark.parametrize('how', ['strict', 'error-filter'])
@pytest.mark.anyio
async def test_a_held_warning_never_costs_another_record(sqlite_tracker: UsageTracker, how: str):
    """The writer's warning about one record surfaces at a later call, which still records its own row."""
    if how == 'strict':
        set_strict(True)
    agent = Agent(FunctionModel(_reply, model_name='gpt-4o'), capabilities=[TrackUsage(tracker=sqlite_tracker)])
    with warnings.catch_warnings():
        if how == 'error-filter':
            warnings.simplefilter('error', PaiUsageWarning)
        sqlite_tracker.track(provider='acme', model='my-private-model', input_tokens=10)
        deadline = time.monotonic() + 10
        while sqlite_tracker.stats().written < 1 and time.monotonic() < deadline:
            time.sleep(0.01)  # priced (unpriced, and the warning held) in the writer thread
        for _ in range(3):  # the capability's rows: its calls never raise into the run
            await agent.run('hi', deps=UsageDeps(user_id='u1', organization_id='acme'))
        with pytest.raises(UnpricedModelWarning, match='my-private-model'):
            sqlite_tracker.track(provider='openai', model='gpt-4o', input_tokens=7)  # the next call of ours
        sqlite_tracker.track(provider='openai', model='gpt-4o', input_tokens=8)
        assert sqlite_tracker.flush()
    rows = token_usage_rows(sqlite_tracker.engine)
    assert sorted(r['input_tokens'] for r in rows if r['model'] == 'gpt-4o' and r['source'] == 'direct') == [7, 8]
    assert len([r for r in rows if r['operation'] == 'agent_request']) == 3
    assert sqlite_tracker.stats().dropped == 0


def _reply(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(parts=[TextPart('hi')], provider_name='openai', usage=RequestUsage(input_tokens=5))


class _Anonymous:
    """Deps without `user_id` / `organization_id`."""


@pytest.mark.anyio
async def test_deps_without_attribution_warn_once(sqlite_tracker: UsageTracker):
    agent = Agent(FunctionModel(_reply, model_name='gpt-4o'), deps_type=_Anonymous, capabilities=[TrackUsage()])
    with (
        pytest.warns(MissingAttributionWarning, match='`_Anonymous` have no `user_id`') as caught,
        pai_usage.usage_context(tracker=sqlite_tracker),
    ):
        await agent.run('hi', deps=_Anonymous())
        await agent.run('hi', deps=_Anonymous())
    assert len(caught) == 1
    assert sqlite_tracker.flush()
    assert len(token_usage_rows(sqlite_tracker.engine)) == 2  # still recorded, unattributed

    with warnings.catch_warnings(record=True) as attributed:
        warnings.simplefilter('always')
        await agent.run('hi', deps=UsageDeps(user_id='u1', tracker=sqlite_tracker))  # pyright: ignore[reportArgumentType]
    assert [w for w in attributed if issubclass(w.category, PaiUsageWarning)] == []


@pytest.mark.anyio
async def test_strict_mode_fails_an_unattributed_run(sqlite_tracker: UsageTracker):
    set_strict(True)
    agent = Agent(FunctionModel(_reply, model_name='gpt-4o'), capabilities=[TrackUsage(tracker=sqlite_tracker)])
    with pytest.raises(MissingAttributionWarning):
        await agent.run('hi')


def test_unpriced_model_warns_on_the_callers_thread(sqlite_tracker: UsageTracker):
    with pytest.warns(UnpricedModelWarning, match='`acme/my-private-model`') as caught:
        sqlite_tracker.track(provider='acme', model='my-private-model', input_tokens=10)
        sqlite_tracker.track(provider='acme', model='my-private-model', input_tokens=20)
        assert sqlite_tracker.flush()  # priced in the writer thread; reported here
    assert len(caught) == 1
    assert caught[0].filename == __file__
    assert sqlite_tracker.stats().unpriced == 2


@pytest.mark.anyio
async def test_test_model_is_not_a_mistake(sqlite_tracker: UsageTracker):
    agent = Agent(TestModel(), capabilities=[TrackUsage(tracker=sqlite_tracker)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        await agent.run('hi', deps=UsageDeps(user_id='u1'))
        assert sqlite_tracker.flush()
    assert [w for w in caught if issubclass(w.category, UnpricedModelWarning)] == []


def test_runtime_faults_stay_in_logging(tmp_path: Path):
    # A database that cannot be written is the operator's problem, not the developer's: logged and counted.
    missing = tmp_path / 'no' / 'such' / 'dir' / 'usage.db'
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        tracker = UsageTracker(
            f'sqlite:///{missing}', flush_interval=0.01, retry_interval=0.01, spill_after=0.05, spill_dir=tmp_path
        )
        tracker.track(provider='openai', model='gpt-4o', input_tokens=1)
        tracker.flush(timeout=5)
        tracker.close(timeout=1)
    assert [w for w in caught if issubclass(w.category, PaiUsageWarning)] == []
    # Logged too, but rate-limited per process: an earlier test may have used up this minute's message.
    assert tracker.stats().failed_writes >= 1
    tracker.engine.dispose()
