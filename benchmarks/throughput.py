"""Sustained write throughput into PostgreSQL: 200k records through `UsageTracker`, against a raw psycopg COPY.

Both write the same rows into the same `token_usage` table (migrated: primary key, indexes and the rollup
trigger), emptied between runs. Ours is timed end to end, from the first `track()` to `flush()` returning:
validation, batching, COPY and one commit per batch, with the product thread and the writer thread sharing
the GIL. The baseline is the lower bound of any Python writer: pre-built tuples, one binary COPY, one
commit. Records carry `cost_usd`, as the PydanticAI capability's do (pydantic-ai prices them); records
left for the writer to price with genai-prices cost more (see the `unpriced` line).

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
UNPRICED = 5_000
TARGET = 0.5


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


def raw_copy(url: str, events: list[dict[str, Any]]) -> float:
    # Rows exactly as ours would store them, built before the clock starts.
    rows = [_copy_row(UsageRecord.model_validate({**e, 'pricing_status': 'priced'})) for e in events]
    conninfo = sa.make_url(url).set(drivername='postgresql').render_as_string(hide_password=False)
    with psycopg.connect(conninfo) as conn:
        gc.collect()
        started = time.perf_counter()
        with conn.cursor() as cur, cur.copy(f'COPY token_usage ({_COLUMN_LIST}) FROM STDIN (FORMAT BINARY)') as copy:
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
        # A queue as large as the run: this measures the writer, not the spill-on-overflow path.
        tracker = UsageTracker(url, spill_dir=spill, max_queue=len(events) + 1, handle_sigterm=False)
        tracker.track(make_events(1)[0])
        tracker.flush(60)  # migration and connection out of the way
        engine = tracker.engine
        with engine.begin() as conn:
            conn.exec_driver_sql('TRUNCATE token_usage')
        gc.collect()
        started = time.perf_counter()
        for e in events:
            tracker.track(e)
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
        raw_s = min(raw_copy(url, events), raw_copy(url, events))
        ours_s, written = ours(url, events)
        unpriced_s, _ = ours(url, make_events(UNPRICED, priced=False))
    raw_rate, ours_rate = n / raw_s, n / ours_s
    print(f'throughput: {n} records into PostgreSQL token_usage (PK, 4 indexes, rollup trigger)')
    print(f'  raw psycopg binary COPY, 1 commit: {raw_rate:9,.0f} rows/s  ({raw_s:.2f} s)')
    print(f'  UsageTracker track() -> flush():   {ours_rate:9,.0f} rows/s  ({ours_s:.2f} s, {written} rows)')
    print(f'  ratio ours / raw COPY:             {ours_rate / raw_rate:9.2f}  (target >= {TARGET})')
    print(f'  unpriced (genai-prices in writer): {UNPRICED / unpriced_s:9,.0f} rows/s  ({UNPRICED} records)')


if __name__ == '__main__':
    main()
