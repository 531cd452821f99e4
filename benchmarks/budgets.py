"""Overhead of `EnforceBudgets` on a `FunctionModel` agent run: in-process, and hard mode on SQLite and PostgreSQL.

Every variant runs the same one-request agent with `TrackUsage` (the baseline is `TrackUsage` alone), in
alternating batches so that drift on a shared machine hits all alike. The budget is never reached, so every
request takes the full path: reserve (in hard mode, one short transaction on the counter row, run off the
event loop), the request, the settle in `track()`, and the release (in hard mode, sent by a background thread).
Prints the median time per run, the ratio to the baseline, and the added microseconds per request.

    python -m benchmarks.budgets [RUNS]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic_ai import Agent
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

from benchmarks._pg import pg_schema
from pai_usage import TrackUsage, UsageDeps, UsageTracker
from pai_usage.budgets import Budget, EnforceBudgets

RUNS = 600
BATCH = 50
DEPS = UsageDeps(organization_id='acme', user_id='u1')


def _answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(
        parts=[TextPart('ok')], provider_name='openai', usage=RequestUsage(input_tokens=1200, output_tokens=60)
    )


def _agent(capabilities: list[AbstractCapability[Any]]) -> Agent[UsageDeps, str]:
    return Agent(FunctionModel(_answer, model_name='gpt-4o'), deps_type=UsageDeps, capabilities=capabilities)


@contextmanager
def _variant(name: str, url: str) -> Iterator[Agent[UsageDeps, str]]:
    tracker = UsageTracker(url, handle_sigterm=False)
    capabilities: list[AbstractCapability[Any]] = [TrackUsage(tracker)]
    enforcer = None
    if name != 'TrackUsage only':
        budgets = [Budget(organization_id='acme', limit_usd=Decimal(1_000)), Budget(limit_usd=Decimal(5_000))]
        enforcer = EnforceBudgets(tracker, budgets=budgets, hard=name.startswith('hard'))
        capabilities.append(enforcer)
    try:
        yield _agent(capabilities)
    finally:
        if enforcer is not None:
            enforcer.close()
        tracker.close()
        tracker.engine.dispose()


async def _batch(agent: Agent[UsageDeps, str], runs: int) -> float:
    start = time.perf_counter()
    for _ in range(runs):
        await agent.run('hi', deps=DEPS)
    return (time.perf_counter() - start) / runs


def main(runs: int = RUNS) -> None:
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        variants: dict[str, str] = {
            'TrackUsage only': f'sqlite:///{folder}/base.db',
            'in-process budgets': f'sqlite:///{folder}/budgets.db',
            'hard mode, SQLite': f'sqlite:///{folder}/hard.db',
        }
        try:
            variants['hard mode, PostgreSQL'] = stack.enter_context(pg_schema())
        except Exception as exc:  # no server: the SQLite figures still stand
            print(f'(PostgreSQL unavailable, skipped: {exc!r})')
        agents = {name: stack.enter_context(_variant(name, url)) for name, url in variants.items()}
        times: dict[str, list[float]] = {name: [] for name in agents}

        async def measure() -> None:
            for agent in agents.values():  # warm up: caches, connections, counter rows
                await _batch(agent, 20)
            for _ in range(max(runs // BATCH, 1)):
                for name, agent in agents.items():
                    times[name].append(await _batch(agent, BATCH))

        asyncio.run(measure())
    base = statistics.median(times['TrackUsage only'])
    print(f'{runs} one-request runs per variant, median of batches of {BATCH}, two budgets per run')
    print(f'{"variant":<24} {"us/run":>10} {"ratio":>7} {"added us/request":>18}')
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f'{name:<24} {median * 1e6:>10.0f} {median / base:>7.2f} {(median - base) * 1e6:>18.0f}')


def _cli(argv: list[str], run: Callable[[int], None]) -> None:
    run(int(argv[0]) if argv else RUNS)


if __name__ == '__main__':
    _cli(sys.argv[1:], main)
