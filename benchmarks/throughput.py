"""Sustained write throughput into PostgreSQL: 200k records through `UsageTracker`, against a raw psycopg COPY.

Both write the same rows into the same `token_usage` table (migrated: primary key, indexes and the rollup
triggers of migrations 0002 and 0006), emptied between runs: both pay the same triggers, and the output says
which ones fired. Ours is timed end to end, from the first `track()` to `flush()` returning, with a producer
that keeps up with the writer (the queue stays small): validation, pricing, batching, COPY and one commit per
batch, with the product thread and the writer thread sharing the GIL, the write-ahead journal on (the default).
The baseline is the lower bound of any Python writer: pre-built tuples, one binary COPY, one commit (one run of
each statement-level trigger). A second baseline commits every `batch_size` rows, as the writer does: the
like-with-like figure for what batching itself costs the server (one trigger run and one commit per batch).

Two workloads: records that carry `cost_usd` (as the PydanticAI capability's do: pydantic-ai prices them) and
self-priced records, which the writer prices with genai-prices' compiled prices. Each round runs every side
once, in turn; the ratios are taken within a round and the median over rounds is reported (the machine's load
drifts, and hits a round's sides alike). The harness's pre-built events are moved out of the garbage
collector's sight (`gc.freeze()`) for both sides, so that neither pays for rescanning the harness's own dicts.

    python -m benchmarks.throughput [RECORDS] [ROUNDS]
    PAI_USAGE_BENCH_DURABILITY=memory python -m benchmarks.throughput   # the tracker without its journal
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import sqlalchemy as sa

from benchmarks._pg import pg_schema
from pai_usage import UsageRecord, UsageTracker
from pai_usage._writer import _COLUMN_LIST, _PG_TYPES, _copy_row  # pyright: ignore[reportPrivateUsage]
from pai_usage.migrate import migrate
from pai_usage.tracker import Durability

DURABILITY: Durability = 'memory' if os.environ.get('PAI_USAGE_BENCH_DURABILITY') == 'memory' else 'journal'
"""The tracker's durability: the default journal, or `memory` to see what the journal costs the producer."""

RECORDS = 200_000
ROUNDS = 3
TARGET = 0.7
BATCH = 2000
"""`UsageTracker`'s default `batch_size`: the batched baseline commits as often as the writer does."""


def make_events(n: int, *, priced: bool = True) -> list[dict[str, Any]]:
    start = datetime.now(UTC) - timedelta(days=1)
    # Each model under the provider genai-prices prices it for: the writer prices all of them (none unpriced).
    models = (('openai', 'gpt-4o'), ('anthropic', 'claude-sonnet-4'), ('google-gla', 'gemini-2.5-pro'))
    return [
        {
            'id': uuid.uuid4(),
            'created_at': start + timedelta(milliseconds=i),
            'organization_id': f'org-{i % 50}',
            'user_id': f'user-{i % 1000}',
            'provider': models[i % 3][0],
            'model': models[i % 3][1],
            'operation': 'request',
            'source': 'agent',
            'run_id': f'run-{i // 3}',
            'agent_name': 'bench',
            'input_tokens': 1000 + i % 500,
            'cache_read_tokens': 200,
            'output_tokens': 60 + i % 40,
            **({'cost_usd': '0.0031'} if priced else {}),
            'duration_ms': 850,
            'metadata': {'feature': 'chat'},
        }
        for i in range(n)
    ]


def copy_rows(events: list[dict[str, Any]]) -> list[list[Any]]:
    """The rows exactly as ours stores them (priced: the baseline never prices), built before the clock starts."""
    rows: list[list[Any]] = []
    for e in events:
        record = UsageRecord.model_validate({**e, 'pricing_status': 'priced', 'cost_usd': e.get('cost_usd', '0.0031')})
        rows.append(_copy_row(record))
    return rows


def _conninfo(url: str) -> str:
    return sa.make_url(url).set(drivername='postgresql').render_as_string(hide_password=False)


def raw_copy(url: str, rows: list[list[Any]], *, batch: int | None = None) -> tuple[float, float]:
    """One binary COPY and one commit (or one per `batch` rows), of pre-built rows: wall and process CPU seconds."""
    step = batch or len(rows)
    with psycopg.connect(_conninfo(url)) as conn:
        gc.collect()
        started, cpu = time.perf_counter(), time.process_time()
        for start in range(0, len(rows), step):
            with (
                conn.cursor() as cur,
                cur.copy(f'COPY token_usage ({_COLUMN_LIST}) FROM STDIN (FORMAT BINARY)') as copy,
            ):
                copy.set_types(_PG_TYPES)
                for row in rows[start : start + step]:
                    copy.write_row(row)
            conn.commit()
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        conn.execute('TRUNCATE token_usage')
        conn.commit()
    return elapsed, cpu


def ours(url: str, events: list[dict[str, Any]]) -> tuple[float, float, int]:
    """Wall and process CPU seconds (producer and writer threads) to write `events`, and the rows written."""
    with tempfile.TemporaryDirectory() as spill:
        tracker = UsageTracker(url, spill_dir=spill, handle_sigterm=False, durability=DURABILITY)
        tracker.track(make_events(1)[0])
        tracker.flush(60)  # migration and connection out of the way
        engine = tracker.engine
        with engine.begin() as conn:
            conn.exec_driver_sql('TRUNCATE token_usage')
        gc.collect()
        started, cpu = time.perf_counter(), time.process_time()
        # A producer as fast as the writer can sustain: bursts of 1,000, never more than 5,000 waiting, so the
        # queue stays well under `max_queue` (beyond it, events would go to the spill file and back).
        for i in range(0, len(events), 1000):
            for e in events[i : i + 1000]:
                tracker.track(e)
            while tracker.stats().pending > 5000:
                time.sleep(0.001)
        tracker.flush(600)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        stats = tracker.stats()
        tracker.close()
        with engine.begin() as conn:
            written = conn.execute(sa.text('SELECT count(*) FROM token_usage')).scalar_one()
            conn.exec_driver_sql('TRUNCATE token_usage')
        engine.dispose()
        assert stats.spilled == 0, stats
    return elapsed, cpu, written


def triggers(url: str) -> list[str]:
    """The user triggers on `token_usage`, which every side pays alike."""
    with psycopg.connect(_conninfo(url)) as conn:
        names = conn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'token_usage'::regclass AND NOT tgisinternal ORDER BY 1"
        ).fetchall()
    return [name for (name,) in names]


def main() -> None:
    args = [int(a) for a in sys.argv[1:] if a.isdigit()]
    n = args[0] if args else RECORDS
    rounds = args[1] if len(args) > 1 else ROUNDS
    with pg_schema() as url:
        engine = sa.create_engine(url)
        migrate(engine)
        engine.dispose()
        fired = triggers(url)
        priced, unpriced = make_events(n), make_events(n, priced=False)
        rows = copy_rows(priced)
        gc.collect()
        gc.freeze()
        times: dict[str, list[float]] = {'raw': [], 'batched': [], 'priced': [], 'self-priced': []}
        cpus: dict[str, list[float]] = {name: [] for name in times}
        written: dict[str, int] = {}
        for _ in range(rounds):
            for name, batch in (('raw', None), ('batched', BATCH)):
                elapsed, cpu = raw_copy(url, rows, batch=batch)
                times[name].append(elapsed)
                cpus[name].append(cpu)
            for name, events in (('priced', priced), ('self-priced', unpriced)):
                elapsed, cpu, written[name] = ours(url, events)
                times[name].append(elapsed)
                cpus[name].append(cpu)
        gc.unfreeze()

    def rate(name: str) -> str:
        return f'{n / statistics.median(times[name]):9,.0f} rows/s  (median {statistics.median(times[name]):.2f} s)'

    def ratio(name: str, base: str) -> str:
        ratios = [b / o for o, b in zip(times[name], times[base], strict=True)]
        each = ' '.join(f'{r:.2f}' for r in ratios)
        return f'{statistics.median(ratios):5.2f}  (rounds: {each})'

    print(
        f'throughput: {n} records into PostgreSQL token_usage, {rounds} rounds, ratios per round, median;'
        f' durability={DURABILITY}'
    )
    print(f'  every side pays the same triggers: {", ".join(fired) or "none"} (statement-level: once per COPY)')
    print(f'  raw binary COPY, 1 commit:             {rate("raw")}')
    print(f'  raw binary COPY, commit per {BATCH}:     {rate("batched")}')
    print(f'  ours, priced (cost_usd given):         {rate("priced")}, {written["priced"]} rows')
    print(f'  ours, self-priced (genai-prices):      {rate("self-priced")}, {written["self-priced"]} rows')
    print(f'  ratio priced / raw COPY:               {ratio("priced", "raw")}  target >= {TARGET}')
    print(f'  ratio self-priced / raw COPY:          {ratio("self-priced", "raw")}  target >= {TARGET}')
    print(f'  ratio priced / batched raw COPY:       {ratio("priced", "batched")}  (like with like: same commits)')
    print(f'  ratio self-priced / batched raw COPY:  {ratio("self-priced", "batched")}')
    print(f'  batched / 1-commit raw COPY:           {ratio("batched", "raw")}  (what a commit per batch costs)')
    print("  per row, median over rounds: wall us = this process's CPU us + us waiting on the server, not overlapped")
    for name in times:
        wall = statistics.median(times[name]) / n * 1e6
        cpu = statistics.median(cpus[name]) / n * 1e6
        print(f'    {name:12} {wall:6.1f} = CPU {cpu:5.1f} + wait {wall - cpu:5.1f}')


if __name__ == '__main__':
    main()
