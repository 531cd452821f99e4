"""One process of the multi-process hard-mode budget test: concurrent looping runs until the budget refuses them.

`python tests/_budget_worker.py URL LIMIT RUNS DELAY BARRIER_DIR INDEX PROCESSES` prints one JSON line:
`{"refused": n, "other": m}`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic_ai import Agent
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.messages import ModelMessage, ModelResponse, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

from pai_usage import TrackUsage, UsageTracker
from pai_usage.budgets import Budget, BudgetExceeded, EnforceBudgets
from pai_usage.deps import UsageDeps

INPUT_TOKENS = 100
OUTPUT_TOKENS = (10, 40, 25, 70, 55)
"""Output tokens of a run's successive requests: requests of different sizes, the largest 70."""


def looping_agent(delay: float, capabilities: Sequence[AbstractCapability[Any]]) -> Agent[UsageDeps, str]:
    """An agent whose model calls the `again` tool forever, `delay` seconds per request: only a budget stops it."""

    async def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if delay:
            await asyncio.sleep(delay)
        step = sum(isinstance(m, ModelResponse) for m in messages)
        return ModelResponse(
            parts=[ToolCallPart('again', {})],
            provider_name='openai',
            usage=RequestUsage(input_tokens=INPUT_TOKENS, output_tokens=OUTPUT_TOKENS[step % len(OUTPUT_TOKENS)]),
        )

    agent = Agent(FunctionModel(model, model_name='gpt-4o'), deps_type=UsageDeps, capabilities=list(capabilities))

    @agent.tool_plain
    def again() -> str:  # pyright: ignore[reportUnusedFunction]
        return 'again'

    return agent


async def main() -> None:
    url, limit, runs, delay, barrier, index, processes = sys.argv[1:]
    tracker = UsageTracker(url, handle_sigterm=False)
    enforcer = EnforceBudgets(
        tracker,
        budgets=[Budget(organization_id='acme', limit_usd=Decimal(limit))],
        hard=True,
        refresh_interval=3600,  # only the shared counters tell this process what the others spent
    )
    agent = looping_agent(float(delay), [TrackUsage(tracker), enforcer])
    enforcer.statuses(organization_id='acme')  # connect and create the counter row before the race starts
    # Start together: each process says it is ready, then waits for the others.
    (Path(barrier) / f'ready-{index}').touch()
    while len(list(Path(barrier).glob('ready-*'))) < int(processes):
        time.sleep(0.01)
    outcomes = await asyncio.gather(
        *(agent.run('go', deps=UsageDeps(organization_id='acme')) for _ in range(int(runs))), return_exceptions=True
    )
    enforcer.close()
    assert tracker.close(), 'the ledger got every row'
    refused = sum(isinstance(o, BudgetExceeded) for o in outcomes)
    print(json.dumps({'refused': refused, 'other': [repr(o) for o in outcomes if not isinstance(o, BudgetExceeded)]}))


if __name__ == '__main__':  # pragma: no cover - run as a subprocess
    asyncio.run(main())
