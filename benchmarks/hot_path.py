"""The cost of `track()` to the caller, in each durability mode, against two floors measured in the same run.

The floors: a bare `queue.SimpleQueue.put` of the same object, and issue 12's floor, what any tracker must do
at least (`uuid4()` + `datetime.now()` + `SimpleQueue.put`). Events are tracked in bursts of 1,000 with the
writer thread running (it competes for the GIL, as in a real app) and a `flush()` between bursts, untimed, so
that the queue never fills: this measures the hot path, not the spill-on-overflow path. Each call is timed on
its own with `perf_counter_ns`, on every side.

    python -m benchmarks.hot_path [CALLS]
"""

from __future__ import annotations

import gc
import queue
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from pai_usage import UsageTracker
from pai_usage.tracker import Durability

CALLS = 50_000
BURST = 1_000
TARGET_P50_US = 5.0
TARGET_FLOOR_RATIO = 1.3


def fields() -> dict[str, Any]:
    # What the PydanticAI capability passes for one model request.
    return {
        'organization_id': 'org-1',
        'user_id': 'user-1',
        'provider': 'openai',
        'model': 'gpt-4o',
        'operation': 'request',
        'source': 'agent',
        'run_id': 'run-1',
        'agent_name': 'bench',
        'input_tokens': 1200,
        'cache_read_tokens': 200,
        'output_tokens': 60,
        'cost_usd': '0.00305',
        'duration_ms': 850,
    }


def percentiles(ns: list[int]) -> tuple[float, float]:
    ns.sort()
    return ns[len(ns) // 2] / 1000, ns[int(len(ns) * 0.99)] / 1000


def measure_track(calls: int, durability: Durability) -> list[int]:
    latencies: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        tracker = UsageTracker(f'sqlite:///{tmp}/bench.db', spill_dir=tmp, handle_sigterm=False, durability=durability)
        tracker.track(**fields())
        tracker.flush()
        clock = time.perf_counter_ns
        gc.collect()
        for _ in range(calls // BURST):
            for _ in range(BURST):
                f = fields()
                start = clock()
                tracker.track(**f)
                latencies.append(clock() - start)
            tracker.flush()
        stats = tracker.stats()
        tracker.close()
        tracker.engine.dispose()
    assert stats.spilled == 0 and stats.written == calls + 1, stats
    return latencies


def measure_put(calls: int) -> list[int]:
    latencies: list[int] = []
    q: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
    clock = time.perf_counter_ns
    gc.collect()
    for _ in range(calls // BURST):
        for _ in range(BURST):
            f = fields()
            start = clock()
            q.put(f)
            latencies.append(clock() - start)
        while not q.empty():
            q.get_nowait()
    return latencies


def measure_floor(calls: int) -> list[int]:
    """Issue 12's floor: an id, a timestamp and a queue put, the least any tracker does per event."""
    latencies: list[int] = []
    q: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
    clock = time.perf_counter_ns
    uuid4, now = uuid.uuid4, datetime.now
    gc.collect()
    for _ in range(calls // BURST):
        for _ in range(BURST):
            f = fields()
            start = clock()
            f['id'] = uuid4()
            f['created_at'] = now(UTC)
            q.put(f)
            latencies.append(clock() - start)
        while not q.empty():
            q.get_nowait()
    return latencies


def main() -> None:
    calls = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else CALLS
    put_p50, put_p99 = percentiles(measure_put(calls))
    floor_p50, floor_p99 = percentiles(measure_floor(calls))
    modes: list[Durability] = ['memory', 'journal']
    tracked = {mode: percentiles(measure_track(calls, mode)) for mode in modes}
    print(f'hot_path: {calls} calls, per call (perf_counter_ns overhead included on every side)')
    print(f'  SimpleQueue.put:              p50 {put_p50:6.2f} us   p99 {put_p99:6.2f} us')
    print(f'  floor (uuid4 + now + put):    p50 {floor_p50:6.2f} us   p99 {floor_p99:6.2f} us')
    for mode, (p50, p99) in tracked.items():
        print(
            f'  track(), durability={mode + "):":9s} p50 {p50:6.2f} us   p99 {p99:6.2f} us   '
            f'{p50 / floor_p50:4.2f}x floor, {p50 / put_p50:5.1f}x put'
        )
    for mode, (p50, _) in tracked.items():
        under = 'OK' if p50 <= TARGET_P50_US else 'OVER'
        ratio = 'OK' if p50 <= TARGET_FLOOR_RATIO * floor_p50 else 'OVER'
        print(
            f'  {mode}: p50 <= {TARGET_P50_US} us (issue 9): {under};'
            f'  p50 <= {TARGET_FLOOR_RATIO}x floor (issue 12): {ratio}'
        )


if __name__ == '__main__':
    main()
