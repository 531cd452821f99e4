"""`TrackUsage`: one row per model response, in every run mode, adding up to `result.usage` exactly."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import anyio
import genai_prices
import pytest
import sqlalchemy as sa
from pydantic_ai import Agent, ModelRetry, RunContext, UsageLimitExceeded
from pydantic_ai.capabilities import AbstractCapability, ModelFallback
from pydantic_ai.exceptions import RetryModelRequest
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models import ModelRequestContext
from pydantic_ai.models.fallback import FallbackModel
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel
from pydantic_ai.run import AgentRunResultEvent
from pydantic_ai.usage import RequestUsage, RunUsage, UsageLimits

from pai_usage import UsageContext, UsageDeps, UsageTracker, current_usage_context, usage_context
from pai_usage.capability import PYDANTIC_AI_PRICE_SOURCE, TrackUsage
from pai_usage.pricing import price_fields
from pai_usage.table import TOKEN_USAGE
from tests._helpers import LazyDeps

pytestmark = pytest.mark.anyio

MODELS = [('gpt-4o', 'openai'), ('claude-sonnet-4', 'anthropic'), ('gemini-2.5-pro', 'google-gla')]
TOOL_USAGE: dict[str, Any] = {'input_tokens': 1200, 'cache_read_tokens': 300, 'output_tokens': 80}
FINAL_USAGE: dict[str, Any] = {'input_tokens': 1500, 'output_tokens': 40}
DEPS = UsageDeps(user_id='u1', organization_id='org1')


def rows(tracker: UsageTracker) -> list[dict[str, Any]]:
    assert tracker.flush()
    with tracker.engine.connect() as conn:
        return [dict(m) for m in conn.execute(sa.select(TOKEN_USAGE).order_by(TOKEN_USAGE.c.created_at)).mappings()]


def inclusive(rows: list[dict[str, Any]]) -> tuple[int, int, int, int]:
    """(input incl. cache, output incl. reasoning, cache reads, cache writes) summed over rows."""
    return (
        sum(
            r['input_tokens'] + r['cache_read_tokens'] + r['cache_write_tokens'] + r['input_audio_tokens'] for r in rows
        ),
        sum(
            r['output_tokens'] + r['reasoning_tokens'] + r['output_audio_tokens'] + r['output_image_tokens']
            for r in rows
        ),
        sum(r['cache_read_tokens'] for r in rows),
        sum(r['cache_write_tokens'] for r in rows),
    )


def assert_adds_up(rows: list[dict[str, Any]], usage: RunUsage) -> None:
    expected = (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.cache_write_tokens)
    assert inclusive(rows) == expected


def price(usage: dict[str, Any], model: str, provider: str) -> Decimal:
    # A fresh object each time: pydantic-ai fills in `cost` on the usage objects it is handed.
    return genai_prices.calc_price(RequestUsage(**usage), model, provider_id=provider).total_price


def model_fn(provider: str) -> Callable[[list[ModelMessage], AgentInfo], ModelResponse]:
    """Calls the tool `lookup` once (if the agent has tools), then answers."""

    def fn(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if info.function_tools and len(messages) == 1:
            return ModelResponse(
                parts=[ToolCallPart('lookup', {})],
                provider_name=provider,
                usage=RequestUsage(**TOOL_USAGE),
                provider_response_id='r1',
            )
        return ModelResponse(parts=[TextPart('done')], provider_name=provider, usage=RequestUsage(**FINAL_USAGE))

    return fn


async def stream_fn(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
    if info.function_tools and len(messages) == 1:
        yield {0: DeltaToolCall(name='lookup', json_args='{}')}
        return
    for word in ('the ', 'answer ', 'is ', 'done'):
        yield word


def make_agent(
    tracker: UsageTracker | None, model: str = 'gpt-4o', provider: str = 'openai', *, tool: bool = True, **kw: Any
) -> Agent[Any, str]:
    caps = [TrackUsage(tracker)] if tracker is not None else []
    agent = Agent(
        FunctionModel(model_fn(provider), stream_function=stream_fn, model_name=model),
        deps_type=UsageDeps,
        capabilities=caps,
        name='helper',
        **kw,
    )
    if tool:

        @agent.tool_plain
        def lookup() -> str:
            return 'looked up'

    return agent


# --- every run mode ---


async def run_mode(agent: Agent[Any, str], mode: str, deps: Any = DEPS) -> tuple[str, RunUsage]:
    if mode == 'run':
        result = await agent.run('q', deps=deps)
        return result.output, result.usage
    if mode == 'run_sync':

        def in_thread() -> Any:
            try:
                return agent.run_sync('q', deps=deps)
            finally:  # run_sync leaves the worker thread's event loop open
                asyncio.get_event_loop().close()
                asyncio.set_event_loop(None)

        result = await anyio.to_thread.run_sync(in_thread)
        return result.output, result.usage
    if mode == 'run_stream':
        async with agent.run_stream('q', deps=deps) as stream:
            output = await stream.get_output()
        return output, stream.usage
    if mode == 'run_stream_events':
        async with agent.run_stream_events('q', deps=deps) as events:
            async for event in events:
                if isinstance(event, AgentRunResultEvent):
                    return event.result.output, event.result.usage
        raise AssertionError('no result event')
    assert mode == 'iter'
    async with agent.iter('q', deps=deps) as run:
        async for _ in run:
            pass
    assert run.result is not None
    return run.result.output, run.result.usage


MODES = ['run', 'run_sync', 'run_stream', 'run_stream_events', 'iter']


@pytest.mark.parametrize('mode', MODES)
async def test_every_mode_adds_up(tracker: UsageTracker, mode: str) -> None:
    output, usage = await run_mode(make_agent(tracker), mode)
    assert output
    got = rows(tracker)
    assert [r['operation'] for r in got] == ['agent_request', 'agent_request']
    assert {r['status'] for r in got} == {'ok'}
    assert {(r['organization_id'], r['user_id'], r['source'], r['agent_name']) for r in got} == {
        ('org1', 'u1', 'agent', 'helper')
    }
    assert len({r['run_id'] for r in got}) == 1
    assert got[0]['run_id'] is not None
    assert all(r['duration_ms'] is not None for r in got)
    # A stream read to its end is a complete response (`response_state` marks only streams cut short).
    assert [r['metadata'].get('response_state') for r in got] == [None, None]
    assert_adds_up(got, usage)
    assert sum(r['cost_usd'] for r in got) == usage.cost


@pytest.mark.parametrize(('model', 'provider'), MODELS)
async def test_row_per_response_with_genai_prices_cost(tracker: UsageTracker, model: str, provider: str) -> None:
    result = await make_agent(tracker, model, provider).run('q', deps=DEPS)
    tool_row, final_row = rows(tracker)
    assert (tool_row['model'], tool_row['provider'], tool_row['request_id']) == (model, provider, 'r1')
    # pydantic-ai's inclusive input (1200, of which 300 cached) becomes 900 uncached + 300 cache reads.
    assert (tool_row['input_tokens'], tool_row['cache_read_tokens'], tool_row['output_tokens']) == (900, 300, 80)
    assert (final_row['input_tokens'], final_row['output_tokens']) == (1500, 40)
    assert tool_row['cost_usd'] == price(TOOL_USAGE, model, provider)
    assert final_row['cost_usd'] == price(FINAL_USAGE, model, provider)
    assert {r['pricing_status'] for r in (tool_row, final_row)} == {'priced'}
    assert tool_row['price_source'] == PYDANTIC_AI_PRICE_SOURCE
    assert_adds_up([tool_row, final_row], result.usage)


async def test_unknown_model_is_priced_by_the_tracker_or_unpriced(tracker: UsageTracker) -> None:
    result = await make_agent(tracker, 'my-private-model', 'acme').run('q', deps=DEPS)
    got = rows(tracker)
    assert {(r['cost_usd'], r['pricing_status']) for r in got} == {(None, 'unpriced')}
    assert_adds_up(got, result.usage)


def answering(usage: RequestUsage, details: dict[str, Any] | None = None, model: str = 'o3') -> Agent[UsageDeps, str]:
    def fn(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart('ok')], provider_name='openai', usage=usage, provider_details=details)

    return Agent(FunctionModel(fn, model_name=model), deps_type=UsageDeps)


@pytest.mark.parametrize(
    ('details', 'tier'),
    [({'service_tier': 'priority'}, 'priority'), ({'service_tier': 'flex'}, 'flex'), (None, None)],
    ids=['priority', 'flex', 'standard'],
)
async def test_the_tier_pydantic_ai_priced_is_stored(
    tracker: UsageTracker, details: dict[str, Any] | None, tier: str | None
) -> None:
    """The row names the tier its cost is for, so that repricing it from its columns gives the same cost."""
    agent = answering(RequestUsage(input_tokens=100_000, output_tokens=2_000), details)
    result = await agent.run('q', deps=DEPS, capabilities=[TrackUsage(tracker)])
    [row] = rows(tracker)
    assert (row['service_tier'], row['cost_usd']) == (tier, result.usage.cost)
    assert 'price_context' not in row['metadata']  # the tier says it all
    unpriced = {**row, 'cost_usd': None, 'pricing_status': None, 'price_source': None}
    assert price_fields(unpriced).cost_usd == row['cost_usd']


async def test_a_response_without_usage_is_unpriced_not_a_priced_zero(tracker: UsageTracker) -> None:
    await answering(RequestUsage(unmeasured_requests=1), model='gpt-4o').run(
        'q', deps=DEPS, capabilities=[TrackUsage(tracker)]
    )
    [row] = rows(tracker)
    assert (row['cost_usd'], row['pricing_status'], row['metadata']['usage_missing']) == (None, 'unpriced', True)


async def test_reasoning_audio_and_image_tokens_land_in_their_buckets(tracker: UsageTracker) -> None:
    usage = RequestUsage(
        input_tokens=500,
        input_audio_tokens=100,
        cache_read_tokens=50,
        output_tokens=2000,
        output_reasoning_tokens=300,
        output_audio_tokens=0,
        details={'thoughts_tokens': 300},
    )
    usage.output_image_tokens = 1290  # pyright: ignore[reportAttributeAccessIssue]

    def fn(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart('img')], provider_name='google-gla', usage=usage)

    agent = Agent(FunctionModel(fn, model_name='gemini-2.5-flash-image'), capabilities=[TrackUsage(tracker)])
    result = await agent.run('q', deps=DEPS)
    (row,) = rows(tracker)
    assert row['input_tokens'] == 350
    assert row['input_audio_tokens'] == 100
    assert row['cache_read_tokens'] == 50
    assert row['reasoning_tokens'] == 300
    assert row['output_image_tokens'] == 1290
    assert row['output_tokens'] == 410
    assert row['details'] == {'thoughts_tokens': 300}
    assert_adds_up([row], result.usage)


# --- streams abandoned early, and usage no hook saw ---


async def slow_stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
    for _ in range(50):
        yield 'word '
        await asyncio.sleep(0.005)


async def failing_stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
    yield 'one '
    yield 'two '
    raise Boom('stream')


@pytest.mark.parametrize('how', ['abandoned', 'failed', 'timeout'])
async def test_stream_ending_early_is_a_row_for_its_model(tracker: UsageTracker, how: str) -> None:
    """pydantic-ai bills a stream cut off, failed or timed out without `after_model_request`: the wrapper records it."""
    model = FunctionModel(stream_function=failing_stream if how == 'failed' else slow_stream, model_name='gpt-4o')
    agent = Agent(model, capabilities=[TrackUsage(tracker)])
    usage = RunUsage()  # the run's usage, also when it raises
    expected = {'abandoned': None, 'failed': Boom, 'timeout': TimeoutError}[how]
    try:
        async with asyncio.timeout(None) as deadline:
            async with agent.run_stream('q', deps=DEPS, usage=usage) as stream:
                async for _ in stream.stream_text(delta=True):
                    if how == 'abandoned':
                        break
                    if how == 'timeout':  # once it billed something: time out at the next wait
                        deadline.reschedule(asyncio.get_running_loop().time())
    except (Boom, TimeoutError) as exc:
        assert type(exc) is expected
    else:
        assert expected is None
    got = rows(tracker)
    assert usage.output_tokens > 0
    assert_adds_up(got, usage)
    assert sum(r['cost_usd'] for r in got) == usage.cost
    (request,) = [r for r in got if r['operation'] == 'agent_request']
    assert request['model'] == 'gpt-4o'
    assert request['price_source'] == PYDANTIC_AI_PRICE_SOURCE
    assert request['metadata']['response_state'] != 'complete'
    assert request['status'] == ('error' if how == 'failed' else 'ok')
    assert [(r['operation'], r['status']) for r in got if r is not request] == [('agent_run', 'error')]


async def test_response_rejected_by_model_retry_is_still_recorded(tracker: UsageTracker) -> None:
    agent = make_agent(tracker, tool=False)
    calls = 0

    @agent.output_validator
    def check(output: str) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ModelRetry('again')
        return output

    result = await agent.run('q', deps=DEPS)
    got = rows(tracker)
    assert len(got) == 2
    assert_adds_up(got, result.usage)


# --- failures are billed, and the caller sees the same exception ---


@dataclass
class Boom(Exception):
    what: str


async def test_tool_error_records_requests_and_marker(tracker: UsageTracker) -> None:
    agent = make_agent(tracker, tool=False)
    error = Boom('tool')

    @agent.tool_plain
    def lookup() -> str:
        raise error

    with pytest.raises(Boom) as info:
        await agent.run('q', deps=DEPS)
    assert info.value is error
    got = rows(tracker)
    assert [(r['operation'], r['status']) for r in got] == [('agent_request', 'ok'), ('agent_run', 'error')]
    assert got[1]['metadata'] == {'error_type': 'Boom'}
    assert (got[1]['cost_usd'], got[1]['input_tokens'], got[1]['output_tokens']) == (0, 0, 0)
    assert tracker.stats().errors == 1
    assert got[0]['input_tokens'] + got[0]['cache_read_tokens'] == TOOL_USAGE['input_tokens']


async def test_usage_limit_exceeded(tracker: UsageTracker) -> None:
    agent = make_agent(tracker)
    with pytest.raises(UsageLimitExceeded):
        await agent.run('q', deps=DEPS, usage_limits=UsageLimits(output_tokens_limit=50))
    got = rows(tracker)
    assert got[-1]['operation'] == 'agent_run'
    assert got[-1]['metadata'] == {'error_type': 'UsageLimitExceeded'}
    assert inclusive(got)[:2] == (TOOL_USAGE['input_tokens'], TOOL_USAGE['output_tokens'])


async def test_exhausted_output_retries(tracker: UsageTracker) -> None:
    agent = make_agent(tracker, tool=False, retries=1)

    @agent.output_validator
    def never(output: str) -> str:
        raise ModelRetry('no')

    with pytest.raises(Exception) as info:
        await agent.run('q', deps=DEPS)
    got = rows(tracker)
    requests = [r for r in got if r['operation'] == 'agent_request']
    assert len(requests) == 2
    assert inclusive(requests)[:2] == (2 * FINAL_USAGE['input_tokens'], 2 * FINAL_USAGE['output_tokens'])
    assert got[-1]['metadata'] == {'error_type': type(info.value).__name__}


@pytest.mark.parametrize('how', ['timeout', 'cancel'])
async def test_timeout_and_cancellation(tracker: UsageTracker, how: str) -> None:
    agent = make_agent(tracker, tool=False)
    started = asyncio.Event()

    @agent.tool_plain
    async def lookup() -> str:
        started.set()
        await asyncio.sleep(30)
        return 'never'

    async def run() -> None:
        async with asyncio.timeout(None) as deadline:
            task = asyncio.current_task()
            assert task is not None
            waiter = asyncio.create_task(started.wait())
            waiter.add_done_callback(
                lambda _: deadline.reschedule(asyncio.get_running_loop().time()) if how == 'timeout' else task.cancel()
            )
            await agent.run('q', deps=DEPS)

    with pytest.raises(TimeoutError if how == 'timeout' else asyncio.CancelledError):
        await run()
    got = rows(tracker)
    assert [(r['operation'], r['status']) for r in got] == [('agent_request', 'ok'), ('agent_run', 'error')]
    assert got[1]['metadata'] == {'error_type': 'CancelledError'}


# --- fallback ---


def reject_bad(response: ModelResponse) -> bool:
    return response.text == 'bad'


def spends_and_is_rejected(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(
        parts=[TextPart('bad')], provider_name='anthropic', usage=RequestUsage(input_tokens=700, output_tokens=30)
    )


REJECTED_PRICE = price({'input_tokens': 700, 'output_tokens': 30}, 'claude-sonnet-4', 'anthropic')


@pytest.mark.parametrize('how', ['FallbackModel', 'ModelFallback-outer', 'ModelFallback-inner'])
async def test_fallback_failed_attempts_get_their_own_rows(tracker: UsageTracker, how: str) -> None:
    first = FunctionModel(spends_and_is_rejected, model_name='claude-sonnet-4')
    second = FunctionModel(model_fn('openai'), model_name='gpt-4o')
    if how == 'FallbackModel':
        agent = Agent(FallbackModel(first, second, fallback_on=reject_bad), capabilities=[TrackUsage(tracker)])
    else:
        caps: list[AbstractCapability[Any]] = [ModelFallback(second, fallback_on=reject_bad), TrackUsage(tracker)]
        agent = Agent(first, capabilities=caps if how.endswith('outer') else caps[::-1])
    result = await agent.run('q', deps=DEPS)
    got = rows(tracker)
    assert [(r['model'], r['provider'], r['status']) for r in got] == [
        ('claude-sonnet-4', 'anthropic', 'error'),
        ('gpt-4o', 'openai', 'ok'),
    ]
    assert got[0]['metadata'] == {'attempt_outcome': 'rejected'}
    assert got[0]['cost_usd'] == REJECTED_PRICE
    assert_adds_up(got, result.usage)
    assert sum(r['cost_usd'] for r in got) == result.usage.cost


@pytest.mark.parametrize('how', ['cancel', 'timeout', 'error'])
async def test_rejected_attempt_is_billed_when_the_next_model_never_answers(tracker: UsageTracker, how: str) -> None:
    """Issue 13 #9/#10: the first model spent tokens and was rejected, then the run died during the second."""
    started = asyncio.Event()

    async def never_answers(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        started.set()
        if how == 'error':
            raise Boom('second')  # not covered by `fallback_on`: pydantic-ai carries the attempts on it
        await asyncio.sleep(30)
        raise AssertionError('not reached')

    model = FallbackModel(
        FunctionModel(spends_and_is_rejected, model_name='claude-sonnet-4'),
        FunctionModel(never_answers, model_name='gpt-4o'),
        fallback_on=reject_bad,
    )
    agent = Agent(model, capabilities=[TrackUsage(tracker)])
    usage = RunUsage()

    async def run() -> None:
        async with asyncio.timeout(None) as deadline:
            task = asyncio.current_task()
            assert task is not None
            waiter = asyncio.create_task(started.wait())
            if how == 'cancel':
                waiter.add_done_callback(lambda _: task.cancel())
            elif how == 'timeout':
                waiter.add_done_callback(lambda _: deadline.reschedule(asyncio.get_running_loop().time()))
            await agent.run('q', deps=DEPS, usage=usage)

    with pytest.raises({'cancel': asyncio.CancelledError, 'timeout': TimeoutError, 'error': Boom}[how]):
        await run()
    got = rows(tracker)
    assert [(r['operation'], r['model'], r['status']) for r in got] == [
        ('agent_request', 'claude-sonnet-4', 'error'),
        ('agent_run', None, 'error'),
    ]
    assert got[0]['metadata'] == {'attempt_outcome': 'rejected'}
    assert got[0]['price_source'] == PYDANTIC_AI_PRICE_SOURCE
    # What was billed: genai-prices' price of the failed attempt's usage, and the run's own count of it.
    assert sum(r['cost_usd'] for r in got) == REJECTED_PRICE == usage.cost
    assert_adds_up(got, usage)


@dataclass
class RejectFirst(AbstractCapability[Any]):
    """Rejects the first response of each run with `RetryModelRequest`, as a response-checking fallback would."""

    rejected: int = 0

    async def for_run(self, ctx: RunContext[Any]) -> RejectFirst:
        return RejectFirst()

    async def after_model_request(
        self, ctx: RunContext[Any], *, request_context: ModelRequestContext, response: ModelResponse
    ) -> ModelResponse:
        if not self.rejected:
            self.rejected += 1
            raise RetryModelRequest()
        return response


@pytest.mark.parametrize('order', ['reject-outside', 'reject-inside'])
async def test_response_rejected_by_a_hook_is_one_error_row(tracker: UsageTracker, order: str) -> None:
    caps: list[AbstractCapability[Any]] = [RejectFirst(), TrackUsage(tracker)]
    agent = Agent(
        FunctionModel(model_fn('openai'), model_name='gpt-4o'),
        capabilities=caps if order == 'reject-outside' else caps[::-1],
    )
    result = await agent.run('q', deps=DEPS)
    got = rows(tracker)
    assert [(r['status'], r['metadata'].get('attempt_outcome')) for r in got] == [('error', 'rejected'), ('ok', None)]
    assert_adds_up(got, result.usage)
    assert sum(r['cost_usd'] for r in got) == result.usage.cost


# --- delegation ---


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('child_tracked', [True, False], ids=['child-tracked', 'child-untracked'])
async def test_delegation_counts_each_request_once(tracker: UsageTracker, child_tracked: bool, mode: str) -> None:
    child = make_agent(tracker if child_tracked else None, 'claude-sonnet-4', 'anthropic', tool=False)
    child.name = 'child'
    seen: list[UsageContext | None] = []

    parent = make_agent(tracker, tool=False)

    @parent.tool
    async def lookup(ctx: RunContext[UsageDeps]) -> str:
        seen.append(current_usage_context())
        result = await child.run('sub', usage=ctx.usage)  # no deps: attribution flows through the context
        return result.output

    _, usage = await run_mode(parent, mode)
    got = rows(tracker)
    assert_adds_up(got, usage)
    assert sum(r['cost_usd'] for r in got) == usage.cost
    parent_run = seen[0]
    assert parent_run is not None and parent_run.organization_id == 'org1' and parent_run.run_id
    assert {(r['organization_id'], r['user_id']) for r in got} == {('org1', 'u1')}
    parent_rows = [r for r in got if r['run_id'] == parent_run.run_id]
    child_rows = [r for r in got if r['run_id'] != parent_run.run_id]
    if child_tracked:
        assert [r['model'] for r in parent_rows] == ['gpt-4o', 'gpt-4o']
        assert [(r['model'], r['agent_name'], r['parent_run_id']) for r in child_rows] == [
            ('claude-sonnet-4', 'child', parent_run.run_id)
        ]
    else:
        # Nobody saw the child's request: the parent records it as its run's remainder.
        assert child_rows == []
        assert [r['operation'] for r in parent_rows] == ['agent_request', 'agent_request', 'agent_run_remainder']
        assert parent_rows[-1]['cost_usd'] == price(FINAL_USAGE, 'claude-sonnet-4', 'anthropic')


async def test_concurrent_delegates_sharing_usage(tracker: UsageTracker) -> None:
    tracked = make_agent(tracker, 'claude-sonnet-4', 'anthropic', tool=False)
    untracked = make_agent(None, 'gemini-2.5-pro', 'google-gla', tool=False)
    parent = make_agent(tracker, tool=False)

    @parent.tool
    async def lookup(ctx: RunContext[UsageDeps]) -> str:
        results = await asyncio.gather(
            *(agent.run('sub', usage=ctx.usage) for agent in (tracked, untracked, tracked, untracked))
        )
        return ' '.join(r.output for r in results)

    result = await parent.run('q', deps=DEPS)
    got = rows(tracker)
    assert_adds_up(got, result.usage)
    assert sum(r['cost_usd'] for r in got) == result.usage.cost
    child_rows = [r for r in got if r['parent_run_id'] is not None]
    assert [r['model'] for r in child_rows] == ['claude-sonnet-4', 'claude-sonnet-4']
    assert len({r['run_id'] for r in child_rows}) == 2


async def test_untracked_parent_tracked_child_records_only_the_child(tracker: UsageTracker) -> None:
    child = make_agent(tracker, 'claude-sonnet-4', 'anthropic', tool=False)
    parent = make_agent(None, tool=False)

    @parent.tool
    async def lookup(ctx: RunContext[UsageDeps]) -> str:
        return (await child.run('sub', usage=ctx.usage, deps=ctx.deps)).output

    result = await parent.run('q', deps=DEPS)
    (row,) = rows(tracker)
    assert row['model'] == 'claude-sonnet-4'
    assert result.usage.requests == 3


# --- concurrency ---


async def test_fifty_concurrent_runs_are_attributed_right(tracker: UsageTracker) -> None:
    agent = make_agent(tracker)
    results: dict[str, RunUsage] = {}

    async def one(i: int) -> None:
        result = await agent.run('q', deps=UsageDeps(user_id=f'u{i}', organization_id=f'org{i}'))
        results[f'org{i}'] = result.usage

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(one, i)
    got = rows(tracker)
    assert len(got) == 100
    for org, usage in results.items():
        mine = [r for r in got if r['organization_id'] == org]
        assert len(mine) == 2
        assert {r['user_id'] for r in mine} == {org.replace('org', 'u')}
        assert len({r['run_id'] for r in mine}) == 1
        assert_adds_up(mine, usage)


# --- attribution and tracker resolution ---


async def test_deps_without_attribution_warn_once_and_record_null(
    tracker: UsageTracker, caplog: pytest.LogCaptureFixture
) -> None:
    @dataclass
    class PlainDeps:
        brand: str

    agent = make_agent(tracker)
    with caplog.at_level(logging.WARNING, logger='pai_usage'):
        await agent.run('q', deps=PlainDeps('b'))
        await agent.run('q', deps=PlainDeps('b'))
    got = rows(tracker)
    assert len(got) == 4
    assert {(r['organization_id'], r['user_id']) for r in got} == {(None, None)}
    assert len([m for m in caplog.messages if 'PlainDeps' in m]) == 1


async def test_deps_whose_attribute_fails_still_record_the_run(
    tracker: UsageTracker, caplog: pytest.LogCaptureFixture
) -> None:
    before = TrackUsage.errors
    output, usage = await run_mode(make_agent(tracker), 'run', LazyDeps('user_id', organization_id='acme'))
    got = rows(tracker)
    assert output and len(got) == 2
    assert {(r['organization_id'], r['user_id']) for r in got} == {('acme', None)}
    assert_adds_up(got, usage)
    assert TrackUsage.errors == before + 1 and 'deps.user_id' in caplog.text


@pytest.mark.parametrize(
    ('outer', 'deps', 'billed'),
    [
        pytest.param(('o1', 'u1'), ('o2', None), ('o2', None), id='another-org-keeps-no-user-of-the-first'),
        pytest.param(('o1', 'u1'), ('o1', None), ('o1', 'u1'), id='same-org-inherits-the-user'),
        pytest.param(('o1', 'u1'), (None, 'u2'), ('o1', 'u2'), id='a-user-inherits-the-org'),
        pytest.param(('o1', None), ('o2', 'u2'), ('o2', 'u2'), id='deps-name-both'),
    ],
)
async def test_deps_inside_a_usage_context(
    tracker: UsageTracker, outer: tuple[str, str | None], deps: tuple[str | None, str | None], billed: tuple[str, ...]
) -> None:
    with usage_context(organization_id=outer[0], user_id=outer[1]):
        await run_mode(make_agent(tracker, tool=False), 'run', UsageDeps(organization_id=deps[0], user_id=deps[1]))
        with usage_context(organization_id=deps[0], user_id=deps[1]) as nested:
            assert (nested.organization_id, nested.user_id) == billed  # the same rule for a nested block
    assert {(r['organization_id'], r['user_id']) for r in rows(tracker)} == {billed}


async def test_deps_naming_the_contexts_org_in_another_spelling_keep_its_user(tracker: UsageTracker) -> None:
    # The ledger stores ' o1 ' as 'o1': one organization, so the context's user stays with it.
    with usage_context(organization_id='o1', user_id='u1'):
        await run_mode(make_agent(tracker, tool=False), 'run', UsageDeps(organization_id=' o1 '))
    assert {(r['organization_id'], r['user_id']) for r in rows(tracker)} == {('o1', 'u1')}


async def test_tracker_resolution_order(sqlite_url: str, tmp_path: Any) -> None:
    with (
        UsageTracker(sqlite_url, flush_interval=0.01) as deps_tracker,
        UsageTracker(f'sqlite:///{tmp_path}/cap.db', flush_interval=0.01) as cap_tracker,
        UsageTracker(f'sqlite:///{tmp_path}/ctx.db', flush_interval=0.01) as ctx_tracker,
    ):
        agent = make_agent(cap_tracker, tool=False)
        await agent.run('q', deps=UsageDeps(user_id='u', organization_id='o', tracker=deps_tracker))
        await agent.run('q', deps=DEPS)
        ambient = make_agent(None, tool=False)
        with usage_context(tracker=ctx_tracker, organization_id='ambient-org'):
            await ambient.run('q', capabilities=[TrackUsage()])
        assert len(rows(deps_tracker)) == 1
        assert len(rows(cap_tracker)) == 1
        (ctx_row,) = rows(ctx_tracker)
        assert ctx_row['organization_id'] == 'ambient-org'
        for t in (deps_tracker, cap_tracker, ctx_tracker):
            t.engine.dispose()


@pytest.mark.parametrize(
    'database', ['postgresql+psycopg://postgres@127.0.0.1:1/x', 'sqlite:////nonexistent/dir/usage.db']
)
async def test_unreachable_database_never_gets_in_the_way(database: str) -> None:
    tracker = UsageTracker(database, flush_interval=0.01)
    tracked = make_agent(tracker)
    untracked = make_agent(None)
    try:
        with_tracking = await tracked.run('q', deps=DEPS)
        without = await untracked.run('q', deps=DEPS)
        assert with_tracking.output == without.output
        assert with_tracking.usage == without.usage
    finally:
        tracker.close(timeout=0.5)
    tracker.engine.dispose()


async def test_two_track_usage_on_one_run_record_it_once(
    tracker: UsageTracker, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    agent = make_agent(tracker)
    result = await agent.run('q', deps=DEPS, capabilities=[TrackUsage(tracker)])
    got = rows(tracker)
    assert len(got) == 2
    assert_adds_up(got, result.usage)
    assert 'second TrackUsage' not in caplog.text
    with UsageTracker(sqlite_url.replace('.db', '-other.db')) as other:
        await agent.run('q', deps=DEPS, capabilities=[TrackUsage(other)])  # ignored: and said so
        assert other.stats().enqueued == 0
    assert len(rows(tracker)) == 4
    assert 'second TrackUsage on one run names another tracker' in caplog.text


async def test_capability_failure_is_swallowed_and_reconciled(
    tracker: UsageTracker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError('bug')

    monkeypatch.setattr(TrackUsage, '_record_response', broken)
    before = TrackUsage.errors
    with caplog.at_level(logging.CRITICAL, logger='pai_usage'):
        result = await make_agent(tracker).run('q', deps=DEPS)
    assert result.output == 'done'
    assert TrackUsage.errors > before
    # The requests could not be recorded one by one, so the run's remainder row carries them all.
    got = rows(tracker)
    assert [(r['operation'], r['model']) for r in got] == [('agent_run_remainder', None)]
    assert_adds_up(got, result.usage)
    assert got[0]['cost_usd'] == result.usage.cost


async def test_capability_metadata_on_every_row(tracker: UsageTracker) -> None:
    agent = make_agent(None)
    with usage_context(metadata={'feature': 'ads'}):
        await agent.run('q', deps=DEPS, capabilities=[TrackUsage(tracker, metadata={'app': 'studio'})])
    assert [r['metadata'] for r in rows(tracker)] == [{'feature': 'ads', 'app': 'studio'}] * 2


async def test_direct_calls_in_tools_see_the_run_context(tracker: UsageTracker) -> None:
    agent = make_agent(tracker, tool=False)
    seen: list[UsageContext | None] = []

    @agent.tool_plain
    def lookup() -> str:
        seen.append(current_usage_context())
        return 'x'

    with usage_context(metadata={'feature': 'ads'}):
        await agent.run('q', deps=DEPS)
    (ctx,) = seen
    assert ctx is not None
    assert (ctx.organization_id, ctx.user_id, ctx.agent_name, ctx.tracker) == ('org1', 'u1', 'helper', tracker)
    assert {r['run_id'] for r in rows(tracker)} == {ctx.run_id}
    assert {r['metadata']['feature'] for r in rows(tracker)} == {'ads'}
    assert current_usage_context() is None
