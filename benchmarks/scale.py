"""Summaries at scale on PostgreSQL: the daily rollup against the raw table, on 5M generated rows.

Generates the rows server-side (`INSERT ... SELECT ... FROM generate_series`) in a private schema, which
is dropped afterwards, then times:

- `get_current_month_usage(org)` for the largest and a median organization,
- a month's summary of all organizations by organization and model,

each on the raw table (with its `(organization_id, created_at)` index) and from the rollup, checking that
both give identical answers, and the write cost of the rollup's trigger.

    python -m benchmarks.scale [ROWS]      # PAI_USAGE_BENCH_PG=postgresql+psycopg://... to choose the server
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import sqlalchemy as sa

from pai_usage import UsageTracker
from pai_usage.migrate import available_migrations, migrate
from pai_usage.rollup import rebuild_rollup, rollup_disabled, rollup_summary, verify_rollup
from pai_usage.summary import month_bounds, query_summary

ROWS = 5_000_000
TARGET_MS = 50.0
REPEAT = 7
WRITE_BATCHES = 100
WRITE_ROUNDS = 4
WRITE_BATCH_ROWS = 500

PG_URL = os.environ.get(
    'PAI_USAGE_BENCH_PG', os.environ.get('PAI_USAGE_TEST_PG', 'postgresql+psycopg://postgres@127.0.0.1:5432/test')
)

T = TypeVar('T')

# 1000 organizations, the largest with ~10% of rows; up to 20 users each, who mostly use one "home" model;
# 10 models on 3 providers; 12 months of history ending now.
_GENERATE = """
INSERT INTO token_usage (
    id, created_at, organization_id, user_id, provider, model, operation, source,
    input_tokens, cache_read_tokens, cache_write_tokens, input_audio_tokens,
    output_tokens, reasoning_tokens, output_audio_tokens, output_image_tokens,
    details, cost_usd, price_source, pricing_status, duration_ms, status, metadata
)
SELECT
    gen_random_uuid(), ts, org, usr,
    (ARRAY['openai','openai','openai','anthropic','anthropic','anthropic','google-gla','google-gla',
           'google-gla','google-gla'])[m],
    (ARRAY['gpt-4o','gpt-4o-mini','o3','claude-sonnet-4','claude-opus-4-5','claude-haiku-4-5',
           'gemini-2.5-pro','gemini-2.5-flash','gemini-2.0-flash','gemini-2.5-flash-image'])[m],
    op, CASE WHEN op = 'request' AND r3 < 0.8 THEN 'agent' ELSE 'direct' END,
    inp, inp / 10, 0, 0, outp, outp / 5, 0, CASE WHEN m = 10 THEN 1290 ELSE 0 END,
    '{}'::jsonb, round((inp * 2.5 + outp * 10) / 1e6, 12), 'bench', 'priced', 800,
    CASE WHEN r3 < 0.01 THEN 'error' ELSE 'ok' END, '{}'::jsonb
FROM (
    SELECT ts, org, usr, inp, outp, r3,
           CASE WHEN r1 < 0.8 THEN abs(hashtext(usr)) % 10 ELSE floor(r2 * 10)::int END + 1 AS m,
           CASE WHEN r3 < 0.9 THEN 'request' WHEN r3 < 0.95 THEN 'generate_image' ELSE 'analyze_text' END AS op
    FROM (
        SELECT :now - random() * interval '365 days' AS ts,
               'org-' || o AS org, 'org-' || o || '-user-' || floor(random() ^ 2 * 20)::int AS usr,
               random() AS r1, random() AS r2, random() AS r3,
               100 + floor(random() * 4900)::int AS inp, 10 + floor(random() * 990)::int AS outp
        FROM (SELECT floor(1000 * random() ^ 3)::int AS o FROM generate_series(1, :rows)) AS g
    ) AS a
) AS b
"""

_INDEXES = (
    'ALTER TABLE token_usage ADD PRIMARY KEY (id)',
    'CREATE INDEX ix_token_usage_created_at ON token_usage (created_at)',
    'CREATE INDEX ix_token_usage_org_created_at ON token_usage (organization_id, created_at)',
    'CREATE INDEX ix_token_usage_user_created_at ON token_usage (user_id, created_at)',
    'CREATE INDEX ix_token_usage_run_id ON token_usage (run_id)',
)


def _timed(fn: Callable[[], T], repeat: int = REPEAT) -> tuple[float, T]:
    """Median milliseconds over `repeat` runs after one warm-up, and the last result."""
    result = fn()
    times: list[float] = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), result


def _step(label: str, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    print(f'  {label} ...', end='', flush=True)
    result = fn()
    print(f' {time.perf_counter() - start:.1f} s', flush=True)
    return result


def _only_first_migration() -> Path:
    root = Path(tempfile.mkdtemp(prefix='pai_usage_bench_'))
    (root / 'postgresql').mkdir()
    first = available_migrations('postgresql')[0]
    (root / 'postgresql' / first.name).write_text(first.sql)
    return root


def _load(engine: sa.Engine, rows: int, now: datetime) -> None:
    root = _only_first_migration()
    try:
        migrate(engine, root=root)
    finally:
        shutil.rmtree(root)
    with engine.begin() as conn:
        # Bulk load without indexes, then build them: much faster than maintaining them row by row.
        conn.exec_driver_sql('ALTER TABLE token_usage DROP CONSTRAINT token_usage_pkey')
        for index in ('created_at', 'org_created_at', 'user_created_at', 'run_id'):
            conn.exec_driver_sql(f'DROP INDEX ix_token_usage_{index}')
    with engine.begin() as conn:
        _step(f'generate {rows:,} rows', lambda: conn.execute(sa.text(_GENERATE), {'rows': rows, 'now': now}))
    with engine.begin() as conn:
        _step('build the indexes of migration 0001', lambda: [conn.exec_driver_sql(sql) for sql in _INDEXES])
    with engine.connect().execution_options(isolation_level='AUTOCOMMIT') as conn:
        _step('vacuum analyze', lambda: conn.exec_driver_sql('VACUUM ANALYZE token_usage'))


def _set_trigger(engine: sa.Engine, enabled: bool) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f'ALTER TABLE token_usage {"ENABLE" if enabled else "DISABLE"} TRIGGER pai_usage_rollup_insert'
        )


def _write_cost(engine: sa.Engine, now: datetime) -> dict[str, tuple[float, float]]:
    """Rows per second without and with the rollup trigger, alternating rounds so drift hits both alike.

    Server-side 500-row `INSERT ... SELECT` batches measure the database's cost alone; the tracker rows go
    through `UsageTracker.track()` and its COPY writer, end to end, with every row of a batch in its own
    rollup group (the worst case) or a batch spread over 10 organizations (a busy app's usual batch).
    """
    tracker = UsageTracker(engine, auto_migrate=False, batch_size=WRITE_BATCH_ROWS)
    per_round = WRITE_BATCHES // WRITE_ROUNDS

    def sql() -> None:
        for _ in range(per_round):
            with engine.begin() as conn:
                conn.execute(sa.text(_GENERATE), {'rows': WRITE_BATCH_ROWS, 'now': now})

    def tracked(orgs: int) -> Callable[[], None]:
        def write() -> None:
            for j in range(per_round * WRITE_BATCH_ROWS):
                tracker.track(
                    organization_id=f'org-{j % orgs}',
                    user_id=f'org-{j % orgs}-user-{j % 7}',
                    provider='openai',
                    model='gpt-4o',
                    input_tokens=1200,
                    output_tokens=60,
                    cost_usd=Decimal('0.0036'),
                )
            assert tracker.flush(120)

        return write

    kinds: dict[str, Callable[[], None]] = {
        'INSERT ... SELECT, server-side': sql,
        'track() + writer, 500 groups/batch': tracked(1000),
        'track() + writer, 10 groups/batch': tracked(10),
    }
    seconds = {(kind, on): 0.0 for kind in kinds for on in (False, True)}
    for i in range(WRITE_ROUNDS * 2):
        on = i % 2 == 1
        _set_trigger(engine, on)
        for kind, write in kinds.items():
            start = time.perf_counter()
            write()
            seconds[kind, on] += time.perf_counter() - start
    tracker.close()
    _set_trigger(engine, True)
    rows = per_round * WRITE_ROUNDS * WRITE_BATCH_ROWS
    return {kind: (rows / seconds[kind, False], rows / seconds[kind, True]) for kind in kinds}


def run(rows: int = ROWS) -> bool:
    """Run the benchmark; returns whether the 50 ms target was met."""
    now = datetime.now(UTC)
    schema = f'pai_bench_{uuid.uuid4().hex[:10]}'
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA {schema}')
    sep = '&' if '?' in PG_URL else '?'
    url = f'{PG_URL}{sep}options={quote(f"-csearch_path={schema}")}'
    engine = sa.create_engine(url, pool_size=2)
    print(f'scale benchmark: PostgreSQL, {rows:,} rows over 12 months, 1000 organizations, schema {schema}')
    try:
        _load(engine, rows, now)
        _step('migration 0002: triggers and rollup backfill', lambda: migrate(engine))
        with engine.connect().execution_options(isolation_level='AUTOCOMMIT') as conn:
            conn.exec_driver_sql('VACUUM ANALYZE token_usage_daily')
            rollup_rows = conn.exec_driver_sql('SELECT count(*) FROM token_usage_daily').scalar_one()
            month_rows = conn.execute(
                sa.text('SELECT count(*) FROM token_usage WHERE created_at >= :s'), {'s': month_bounds(now)[0]}
            ).scalar_one()
            by_org = conn.execute(
                sa.text(
                    'SELECT organization_id, count(*) AS n FROM token_usage WHERE created_at >= :s '
                    'GROUP BY organization_id ORDER BY n DESC'
                ),
                {'s': month_bounds(now)[0]},
            ).all()
        largest, median = by_org[0], by_org[len(by_org) // 2]
        print(
            f'  rollup: {rollup_rows:,} rows ({rollup_rows / rows:.1%} of raw); this month: {month_rows:,} raw rows; '
            f'largest org {largest[0]} {largest[1]:,} rows ({largest[1] / month_rows:.0%}), '
            f'median org {median[0]} {median[1]:,} rows'
        )

        tracker = UsageTracker(engine, auto_migrate=False)
        start, end = month_bounds(now)
        results: list[tuple[str, float, float]] = []
        identical = True

        def compare(label: str, raw_fn: Callable[[], Any], fast_fn: Callable[[], Any]) -> None:
            nonlocal identical
            with rollup_disabled():
                raw_ms, raw = _timed(raw_fn)
            fast_ms, fast = _timed(fast_fn)
            identical = identical and fast == raw and fast is not None
            results.append((label, raw_ms, fast_ms))

        for name, (org, _) in (('largest', largest), ('median', median)):
            compare(
                f'get_current_month_usage({name} org)',
                lambda org=org: tracker.get_current_month_usage(org, now=now),
                lambda org=org: rollup_summary(engine, start, end, organization_id=org, group_by=('model',)),
            )
        compare(
            'month summary, all orgs, by org and model',
            lambda: query_summary(engine, start, end, group_by=('organization', 'model')),
            lambda: rollup_summary(engine, start, end, group_by=('organization', 'model')),
        )

        print(f'\n  {"query":<45} {"raw":>10} {"rollup":>10} {"ratio":>8}')
        for label, raw_ms, fast_ms in results:
            print(f'  {label:<45} {raw_ms:>7.1f} ms {fast_ms:>7.1f} ms {raw_ms / fast_ms:>7.1f}x')
        print(f'  rollup answers identical to the raw table: {identical}')

        rows_written = WRITE_BATCHES * WRITE_BATCH_ROWS
        print(f'\n  write cost of the rollup trigger ({rows_written:,} rows each way, {WRITE_BATCH_ROWS}-row batches):')
        for label, (plain, triggered) in _write_cost(engine, now).items():
            print(
                f'    {label:<36} {plain:>9,.0f} rows/s without, {triggered:>9,.0f} rows/s with '
                f'({plain / triggered - 1:+.0%} time per row)'
            )
        # The rows written with the trigger disabled are missing from the rollup: rebuild it, as after a bulk load.
        _step('rebuild_rollup() after writing with the trigger disabled', lambda: rebuild_rollup(engine))
        exact = _step('verify_rollup() over this month', lambda: verify_rollup(engine, start, end) == [])
        print(f'  rollup equals the raw table, group by group: {exact}')
        identical = identical and exact
        current_ms = results[0][2]
        met = current_ms <= TARGET_MS and identical
        print(
            f'\n  target: current month for the largest org <= {TARGET_MS:.0f} ms: '
            f'{"MET" if met else "MISSED"} ({current_ms:.1f} ms from the rollup)'
        )
        tracker.close()
        return met
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA {schema} CASCADE')
        admin.dispose()


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else ROWS
    run(rows)


if __name__ == '__main__':
    main()
