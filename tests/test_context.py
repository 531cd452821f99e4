"""The usage context reaches worker threads through `run_in_thread` / `with_current_context`."""

# ruff: noqa: F811  (the fake server's fixtures are imported, then named as test arguments)

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import pytest
from pydantic_ai import Agent, RunContext
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

from pai_usage import TrackUsage, UsageDeps, current_usage_context, run_in_thread, usage_context, with_current_context
from pai_usage.gemini import GeminiService
from pai_usage.testing import UsageLedger
from tests.fake_gemini import fake_gemini, gemini_client  # noqa: F401 - fixtures

pytestmark = pytest.mark.anyio

ACME = UsageDeps(user_id='u1', organization_id='acme')


def _call_tool_once(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    if not any(isinstance(p, ToolReturnPart) for m in messages for p in m.parts):
        return ModelResponse(parts=[ToolCallPart('describe', {})], usage=RequestUsage(input_tokens=10))
    return ModelResponse(parts=[TextPart('done')], usage=RequestUsage(input_tokens=20))


@pytest.mark.parametrize('how', ['run_in_executor', 'thread_pool', 'bare_executor'])
async def test_gemini_call_in_an_executor_keeps_the_runs_context(
    gemini_client: Any, usage_ledger: UsageLedger, how: str
):
    service = GeminiService(gemini_client)  # no deps: attribution comes from the run
    agent = Agent(FunctionModel(_call_tool_once, model_name='gpt-4o'), deps_type=UsageDeps, capabilities=[TrackUsage()])

    @agent.tool
    async def describe(ctx: RunContext[UsageDeps]) -> str:  # pyright: ignore[reportUnusedFunction]
        loop = asyncio.get_running_loop()
        if how == 'run_in_executor':
            return await loop.run_in_executor(None, run_in_thread(service.analyze_text, 'a text', 'summarize'))
        if how == 'thread_pool':
            with ThreadPoolExecutor(2) as pool:
                [text] = pool.map(with_current_context(service.analyze_text), ['a text'])
                return text
        return await loop.run_in_executor(None, service.analyze_text, 'a text')  # what loses the context

    result = await agent.run('go', deps=ACME)
    [row] = usage_ledger.rows(source='direct')
    assert row.operation == 'analyze_text'
    if how == 'bare_executor':
        assert (row.organization_id, row.run_id) == (None, None)
    else:
        assert (row.organization_id, row.user_id, row.run_id) == ('acme', 'u1', result.run_id)
        assert row.agent_name == agent.name


def test_with_current_context_copies_the_context_at_wrap_time():
    with usage_context(organization_id='acme'):
        wrapped = with_current_context(lambda: current_usage_context())
    with usage_context(organization_id='globex'):
        seen = wrapped()
    assert seen is not None and seen.organization_id == 'acme'
    # Concurrent calls of one wrapper each get their own copy (a `Context` cannot be entered twice at once).
    with usage_context(organization_id='acme'), ThreadPoolExecutor(4) as pool:
        orgs = list(pool.map(with_current_context(lambda _: current_usage_context()), range(16)))
    assert {c.organization_id for c in orgs if c is not None} == {'acme'} and None not in orgs


def test_run_in_thread_binds_arguments():
    def add(a: int, b: int, *, c: int = 0) -> tuple[int, str | None]:
        context = current_usage_context()
        return a + b + c, context.organization_id if context else None

    with usage_context(organization_id='acme'):
        call = run_in_thread(add, 1, 2, c=3)
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(call).result() == (6, 'acme')


async def test_deps_as_the_context_inside_a_run(gemini_client: Any, usage_ledger: UsageLedger):
    """`usage_context(deps)` (or `usage_context=deps` on a service) attributes like the deps; in a run it stays
    linked to the run."""
    service = GeminiService(gemini_client)
    agent = Agent(FunctionModel(_call_tool_once, model_name='gpt-4o'), deps_type=UsageDeps, capabilities=[TrackUsage()])
    other = UsageDeps(user_id='u2', organization_id='globex')

    @agent.tool_plain
    async def describe() -> str:  # pyright: ignore[reportUnusedFunction]
        with usage_context(other):
            await service.aanalyze_text('a text', 'summarize')
        return await GeminiService(gemini_client, usage_context=other).aanalyze_text('a text', 'summarize')

    result = await agent.run('go', deps=ACME)
    rows = usage_ledger.rows(source='direct')
    assert [(r.organization_id, r.user_id) for r in rows] == [('globex', 'u2')] * 2
    assert rows[0].run_id == result.run_id  # the block inherits the run; the service's own context names none


@pytest.mark.parametrize('bad', [object(), 'acme', 42])
def test_a_context_that_names_nobody_is_refused_where_it_is_given(bad: object):
    with pytest.raises(TypeError, match='UsageDeps'), usage_context(bad):
        pass
    with pytest.raises(TypeError, match='UsageDeps'):
        GeminiService(None, usage_context=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ('organization_id', 'expected'),
    [('', 'outer-org'), (None, 'outer-org'), (0, '0'), (42, '42'), ('acme', 'acme')],
)
async def test_deps_ids_are_read_as_a_run_reads_them(
    organization_id: object, expected: str, usage_ledger: UsageLedger
) -> None:
    """`usage_context(deps)` (and so a direct Gemini call with `deps=`) reads ids as `TrackUsage` and budgets do."""
    deps = UsageDeps(organization_id=cast(Any, organization_id))
    seen: list[str | None] = []

    def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        context = current_usage_context()
        seen.append(context.organization_id if context is not None else None)
        return ModelResponse(parts=[TextPart('ok')], provider_name='openai', usage=RequestUsage(input_tokens=1))

    agent = Agent(FunctionModel(answer, model_name='gpt-4o'), deps_type=UsageDeps, capabilities=[TrackUsage()])
    with usage_context(organization_id='outer-org'):
        with usage_context(deps) as block:
            assert block.organization_id == expected
        await agent.run('hi', deps=deps)
    assert seen == [expected]
    assert [r.organization_id for r in usage_ledger.records] == [expected]
