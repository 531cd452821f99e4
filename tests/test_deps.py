"""`UsageDeps` and the `HasUsageAttribution` protocol: who an agent run is billed to."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

from pai_usage import HasUsageAttribution, TrackUsage, UsageDeps, UsageTracker, usage_context
from pai_usage.table import TOKEN_USAGE

pytestmark = pytest.mark.anyio


@dataclass
class AdDeps(UsageDeps):
    brand_id: str


class PydanticDeps(BaseModel):
    user_id: int
    organization_id: str


@dataclass
class NoAttribution:
    brand_id: str


def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(
        parts=[TextPart('ok')], provider_name='openai', usage=RequestUsage(input_tokens=10, output_tokens=2)
    )


def attribution(tracker: UsageTracker) -> list[tuple[Any, Any]]:
    assert tracker.flush()
    with tracker.engine.connect() as conn:
        return [(r.organization_id, r.user_id) for r in conn.execute(TOKEN_USAGE.select())]


def test_usage_deps_subclass_adds_fields() -> None:
    deps = AdDeps('brand-1', user_id='u1', organization_id='org1')
    assert (deps.brand_id, deps.user_id, deps.organization_id, deps.tracker) == ('brand-1', 'u1', 'org1', None)
    assert isinstance(deps, HasUsageAttribution)
    assert isinstance(PydanticDeps(user_id=1, organization_id='o'), HasUsageAttribution)
    assert not isinstance(NoAttribution('b'), HasUsageAttribution)


@pytest.mark.parametrize(
    ('deps', 'expected'),
    [
        (AdDeps('b', user_id='u1', organization_id='org1'), ('org1', 'u1')),
        (PydanticDeps(user_id=42, organization_id='org2'), ('org2', '42')),
        (UsageDeps(organization_id='org3'), ('org3', None)),
    ],
    ids=['subclass', 'protocol', 'org-only'],
)
async def test_attribution_from_deps(tracker: UsageTracker, deps: Any, expected: tuple[Any, Any]) -> None:
    agent = Agent(FunctionModel(answer, model_name='gpt-4o'), deps_type=type(deps), capabilities=[TrackUsage(tracker)])
    result = await agent.run('q', deps=deps)
    assert result.output == 'ok'
    assert attribution(tracker) == [expected]


async def test_no_deps_inherit_the_ambient_context(tracker: UsageTracker, caplog: pytest.LogCaptureFixture) -> None:
    agent = Agent(FunctionModel(answer, model_name='gpt-4o'), capabilities=[TrackUsage(tracker)])
    with caplog.at_level(logging.WARNING, logger='pai_usage'), usage_context(organization_id='org9', user_id='u9'):
        await agent.run('q')
    assert attribution(tracker) == [('org9', 'u9')]
    assert not [m for m in caplog.messages if 'attribution' in m]


async def test_deps_without_attribution_never_fail_the_run(
    tracker: UsageTracker, caplog: pytest.LogCaptureFixture
) -> None:
    @dataclass
    class BrandDeps:  # a new class per test: the warning is once per deps type and process
        brand_id: str

    agent = Agent(FunctionModel(answer, model_name='gpt-4o'), capabilities=[TrackUsage(tracker)])
    with caplog.at_level(logging.WARNING, logger='pai_usage'):
        for _ in range(3):
            assert (await agent.run('q', deps=BrandDeps('b'))).output == 'ok'
    assert attribution(tracker) == [(None, None)] * 3
    assert len([m for m in caplog.messages if 'BrandDeps' in m]) == 1


async def test_each_new_deps_type_warns_even_when_it_reuses_a_freed_id(
    tracker: UsageTracker, caplog: pytest.LogCaptureFixture
) -> None:
    # A class freed and a new one allocated often get the same id(): the warning must follow the type.
    agent = Agent(FunctionModel(answer, model_name='gpt-4o'), capabilities=[TrackUsage(tracker)])
    with caplog.at_level(logging.WARNING, logger='pai_usage'):
        for _ in range(5):

            @dataclass
            class PerRequestDeps:
                brand_id: str

            await agent.run('q', deps=PerRequestDeps('b'))
            await agent.run('q', deps=PerRequestDeps('b'))
            del PerRequestDeps
            gc.collect()
    assert len([m for m in caplog.messages if 'PerRequestDeps' in m]) == 5
