"""Sustained write throughput into PostgreSQL: 200k records through `UsageTracker`, against a raw psycopg COPY.

Both write the same rows into the same `token_usage` table (migrated: primary key, indexes and the rollup
trigger), emptied between runs. Ours is timed end to end, from the first `track()` to `flush()` returning,
with a producer that keeps up with the writer (the queue stays small): validation, batching, COPY and one
commit per batch, with the product thread and the writer thread sharing the GIL. The baseline is the lower
bound of any Python writer: pre-built tuples, one binary COPY, one commit. The harness's pre-built events
are moved out of the garbage collector's sight (`gc.freeze()`) for both sides, so that neither pays for
rescanning the harness's own 200k dicts. Records carry `cost_usd`, as the PydanticAI capability's do
(pydantic-ai prices them); records left for the writer to price with genai-prices cost more (see the
`unpriced` line).

    python -m benchmarks.throughput [RECORDS]
"""

from __future__ import annotations

import gc
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

RECORDS = 200_000
ROUNDS = 2
UNPRICED = 5_000
TARGET = 0.7


def make_events(n: int, *, priced: bool = True) -> list[dict[str, Any]]:
    start = datetime.now(UTC) - timedelta(days=1)
    models = ('gpt-4o', 'claude-sonnet-4', 'gemini-2.5-pro')
    return [
        {
            'id': uuid.uuid4(),
            'created_at': start + timedelta(milliseconds=i),
            'organization_id': f'org-{i % 50}',
            'user_id': f'user-{i % 1000}',
            'provider': 'openai',
            'model': models[i % 3],
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


def raw_copy(url: str, events: list[dict[str, Any]], *, binary: bool = True) -> float:
    # Rows exactly as ours would store them, built before the clock starts.
    rows = [_copy_row(UsageRecord.model_validate({**e, 'pricing_status': 'priced'})) for e in events]
    conninfo = sa.make_url(url).set(drivername='postgresql').render_as_string(hide_password=False)
    with psycopg.connect(conninfo) as conn:
        gc.collect()
        started = time.perf_counter()
        fmt = ' (FORMAT BINARY)' if binary else ''
        with conn.cursor() as cur, cur.copy(f'COPY token_usage ({_COLUMN_LIST}) FROM STDIN{fmt}') as copy:
            copy.set_types(_PG_TYPES)
            for row in rows:
                copy.write_row(row)
        conn.commit()
        elapsed = time.perf_counter() - started
        conn.execute('TRUNCATE token_usage')
        conn.commit()
    return elapsed


def ours(url: str, events: list[dict[str, Any]]) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as spill:
        tracker = UsageTracker(url, spill_dir=spill, handle_sigterm=False)
        tracker.track(make_events(1)[0])
        tracker.flush(60)  # migration and connection out of the way
        engine = tracker.engine
        with engine.begin() as conn:
            conn.exec_driver_sql('TRUNCATE token_usage')
        gc.collect()
        started = time.perf_counter()
        # A producer as fast as the writer can sustain: bursts of 1,000, never more than 5,000 waiting, so the
        # queue stays well under `max_queue` (beyond it, events would go to the spill file and back).
        for i in range(0, len(events), 1000):
            for e in events[i : i + 1000]:
                tracker.track(e)
            while tracker.stats().pending > 5000:
                time.sleep(0.001)
        tracker.flush(600)
        elapsed = time.perf_counter() - started
        stats = tracker.stats()
        tracker.close()
        with engine.begin() as conn:
            written = conn.execute(sa.text('SELECT count(*) FROM token_usage')).scalar_one()
            conn.exec_driver_sql('TRUNCATE token_usage')
        engine.dispose()
        assert stats.spilled == 0, stats
    return elapsed, written


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else RECORDS
    with pg_schema() as url:
        engine = sa.create_engine(url)
        migrate(engine)
        engine.dispose()
        events = make_events(n)
        gc.collect()
        gc.freeze()
        # Alternate the two and keep the best of each: the machine's load drifts, and hits both alike.
        raw_times: list[float] = []
        text_times: list[float] = []
        ours_times: list[float] = []
        written = 0
        for _ in range(ROUNDS):
            raw_times.append(raw_copy(url, events))
            text_times.append(raw_copy(url, events, binary=False))
            elapsed, written = ours(url, events)
            ours_times.append(elapsed)
        unpriced_s, _ = ours(url, make_events(UNPRICED, priced=False))
        gc.unfreeze()
    raw_s, text_s, ours_s = min(raw_times), min(text_times), min(ours_times)
    raw_rate, text_rate, ours_rate = n / raw_s, n / text_s, n / ours_s
    print(f'throughput: {n} records into PostgreSQL token_usage (PK, 4 indexes, rollup trigger), best of {ROUNDS}')
    print(f'  raw psycopg binary COPY, 1 commit: {raw_rate:9,.0f} rows/s  ({raw_s:.2f} s)')
    print(f'  raw psycopg text COPY, 1 commit:   {text_rate:9,.0f} rows/s  ({text_s:.2f} s)')
    print(f'  UsageTracker track() -> written:   {ours_rate:9,.0f} rows/s  ({ours_s:.2f} s, {written} rows)')
    print(f'  ratio ours / raw binary COPY:      {ours_rate / raw_rate:9.2f}  (target >= {TARGET})')
    print(f'  ratio ours / raw text COPY:        {ours_rate / text_rate:9.2f}')
    print(f'  unpriced (genai-prices in writer): {UNPRICED / unpriced_s:9,.0f} rows/s  ({UNPRICED} records)')


if __name__ == '__main__':
    main()
