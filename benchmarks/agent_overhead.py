"""Overhead of `TrackUsage` on a `FunctionModel` agent run, against the same agent without it.

Runs 10,000 agent runs of each kind in one process, alternating batches so that drift (CPU frequency,
GC, the writer thread catching up) hits both sides alike. The tracked runs write to a real SQLite
database through the background writer, which is included in the timing (it competes for the GIL).

    python -m benchmarks.agent_overhead [RUNS]
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic_ai import Agent
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.capabilities.abstract import WrapModelRequestHandler, WrapRunHandler
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models import ModelRequestContext
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.run import AgentRunResult
from pydantic_ai.tools import RunContext
from pydantic_ai.usage import RequestUsage

from pai_usage import TrackUsage, UsageDeps, UsageTracker

RUNS = 10_000
BREAKDOWN_RUNS = 2_000
BATCH = 100
TARGET_RATIO = 1.05
TARGET_US_PER_REQUEST = 20.0


def _answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(
        parts=[TextPart('ok')],
        provider_name='openai',
        usage=RequestUsage(input_tokens=1200, cache_read_tokens=200, output_tokens=60),
    )


@dataclass
class _SameHooks(AbstractCapability[Any]):
    """Overrides the hooks `TrackUsage` overrides, doing nothing: pydantic-ai's own cost of such a capability."""

    async def wrap_run(self, ctx: RunContext[Any], *, handler: WrapRunHandler) -> AgentRunResult[Any]:
        return await handler()

    async def wrap_model_request(
        self, ctx: RunContext[Any], *, request_context: ModelRequestContext, handler: WrapModelRequestHandler
    ) -> ModelResponse:
        return await handler(request_context)

    async def after_model_request(
        self, ctx: RunContext[Any], *, request_context: ModelRequestContext, response: ModelResponse
    ) -> ModelResponse:
        return response


class _NullTracker(UsageTracker):
    """Drops records: `TrackUsage`'s caller-side work without the tracker's background writer."""

    def __init__(self) -> None:
        pass

    def track(self, *args: Any, **fields: Any) -> None:
        pass


async def _batch(agent: Agent[UsageDeps, str], deps: UsageDeps, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await agent.run('q', deps=deps)
    return time.perf_counter() - start


@dataclass
class Result:
    """Time spent by a variant and by the untracked agent in the same interleaved batches."""

    name: str
    runs: int
    baseline_s: float
    variant_s: float
    pair_ratios: list[float]

    @property
    def ratio(self) -> float:
        return self.variant_s / self.baseline_s

    @property
    def median_ratio(self) -> float:
        return statistics.median(self.pair_ratios)

    @property
    def us_per_run(self) -> float:
        return (self.variant_s - self.baseline_s) / self.runs * 1e6


async def compare(name: str, plain: Agent[UsageDeps, str], variant: Agent[UsageDeps, str], runs: int) -> Result:
    """Run `runs` runs of each, alternating batches (and which goes first) so drift hits both alike."""
    deps = UsageDeps(user_id='u1', organization_id='org1')
    await _batch(plain, deps, 50)
    await _batch(variant, deps, 50)
    baseline_s = variant_s = 0.0
    ratios: list[float] = []
    done = 0
    gc.collect()
    while done < runs:
        n = min(BATCH, runs - done)
        if (done // BATCH) % 2:
            v = await _batch(variant, deps, n)
            b = await _batch(plain, deps, n)
        else:
            b = await _batch(plain, deps, n)
            v = await _batch(variant, deps, n)
        baseline_s += b
        variant_s += v
        ratios.append(v / b)
        done += n
    return Result(name, runs, baseline_s, variant_s, ratios)


async def measure(runs: int = RUNS, breakdown_runs: int = BREAKDOWN_RUNS) -> tuple[list[Result], int]:
    """The main comparison (real SQLite tracker) and the breakdown; also the rows the tracker wrote."""
    model = FunctionModel(_answer, model_name='gpt-4o')

    def agent(*capabilities: AbstractCapability[Any]) -> Agent[UsageDeps, str]:
        return Agent(model, deps_type=UsageDeps, name='bench', capabilities=list(capabilities))

    plain = agent()
    with tempfile.TemporaryDirectory() as tmp:
        tracker = UsageTracker(f'sqlite:///{Path(tmp) / "bench.db"}')
        try:
            results = [await compare('TrackUsage -> SQLite tracker', plain, agent(TrackUsage(tracker)), runs)]
            assert tracker.flush(120)
            written = tracker.stats().written
        finally:
            tracker.close()
            tracker.engine.dispose()
    if breakdown_runs:
        results.append(await compare('  no-op capability, same hooks', plain, agent(_SameHooks()), breakdown_runs))
        results.append(
            await compare('  TrackUsage -> null tracker', plain, agent(TrackUsage(_NullTracker())), breakdown_runs)
        )
    return results, written


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else RUNS
    results, written = asyncio.run(measure(runs, min(BREAKDOWN_RUNS, runs)))
    main_result = results[0]
    print('agent_overhead: FunctionModel agent runs, 1 model request (1 row) each; untracked agent as baseline')
    print(f'  untracked run: {main_result.baseline_s / main_result.runs * 1e6:.1f} us')
    print(f'  {"variant":34} {"runs":>6} {"ratio":>7} {"median":>7} {"us/request":>11}')
    for r in results:
        print(f'  {r.name:34} {r.runs:6d} {r.ratio:7.3f} {r.median_ratio:7.3f} {r.us_per_run:11.1f}')
    print(f'  rows written: {written} (warm-up included)')
    ok = main_result.ratio <= TARGET_RATIO and main_result.us_per_run <= TARGET_US_PER_REQUEST
    print(
        f'  target: ratio <= {TARGET_RATIO}, <= {TARGET_US_PER_REQUEST:.0f} us per recorded request: '
        f'{"met" if ok else "NOT met"}'
    )


if __name__ == '__main__':
    main()
