"""Summaries at scale on PostgreSQL: the raw table against the daily and monthly rollups, at a pinned "now".

Generates the rows server-side (`INSERT ... SELECT ... FROM generate_series`) in a private schema, which
is dropped afterwards: 12 months ending at `--now` (default the last hour of November 2026, so "the current
month" is a full month whatever today's date), 1000 organizations, the largest holding ~12% of the rows. Then
times, on the raw table (with its indexes), from the daily level only, and from the rollup as summaries use it:

- `get_current_month_usage(org)` for the largest and the median organization,
- the current month's summary of all organizations by organization and model,

checks that every answer is identical to the raw table's, prints each figure against its target, and measures
the write cost of the rollup's triggers.

    python -m benchmarks.scale                      # 1M rows (what `make bench` runs)
    python -m benchmarks.scale --rows 10000000      # the issue's 10M-row figures: several minutes
    PAI_USAGE_BENCH_PG=postgresql+psycopg://...     # to choose the server
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
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
from sqlalchemy import event

from pai_usage import UsageTracker
from pai_usage.migrate import available_migrations, migrate
from pai_usage.rollup import (
    _daily_level_only,  # pyright: ignore[reportPrivateUsage]
    rebuild_rollup,
    rollup_disabled,
    verify_rollup,
)
from pai_usage.summary import month_bounds, query_summary

ROWS = 1_000_000
NOW = datetime(2026, 11, 30, 23, 0, tzinfo=UTC)
"""The default pinned "now": the last hour of a month, so the current month holds a full month of rows."""
TARGETS_MS = {'largest': 5.0, 'all': 100.0}
"""The issue's goals: the largest organization's month, and all organizations' month by organization and model."""
REPEAT = 7
WRITE_BATCHES = 100
WRITE_ROUNDS = 4
WRITE_BATCH_ROWS = 500

PG_URL = os.environ.get(
    'PAI_USAGE_BENCH_PG', os.environ.get('PAI_USAGE_TEST_PG', 'postgresql+psycopg://postgres@127.0.0.1:5432/test')
)

T = TypeVar('T')

# 1000 organizations, the largest with ~12% of rows (org-0: floor(1000 * u^3.3) = 0 for u < 0.123); up to 20 users
# each, who mostly use one "home" model; 10 models on 3 providers; 12 months of history ending at `now`.
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
        FROM (SELECT floor(1000 * random() ^ 3.3)::int AS o FROM generate_series(1, :rows)) AS g
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
        conn.exec_driver_sql("SET LOCAL maintenance_work_mem = '256MB'")  # this session only
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


def _server_ms(engine: sa.Engine, fn: Callable[[], Any]) -> float:
    """Median server-side execution time of the last statement `fn` runs (the summary's own query), in ms.

    Against the end-to-end figure it splits a summary's time between PostgreSQL and Python.
    """
    statements: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        statements.append((statement, parameters))

    event.listen(engine, 'before_cursor_execute', capture)
    try:
        fn()
    finally:
        event.remove(engine, 'before_cursor_execute', capture)
    statement, parameters = statements[-1]
    times: list[float] = []
    with engine.connect() as conn:
        for _ in range(REPEAT):
            plan = conn.exec_driver_sql(f'EXPLAIN (ANALYZE, FORMAT JSON) {statement}', parameters).scalar_one()
            times.append(float(plan[0]['Execution Time']))
    return statistics.median(times)


def _verdict(ms: float, target: float | None) -> str:
    if target is None:
        return ''
    return f'{ms / target:>5.2f}x of <= {target:.0f} ms  {"MET" if ms <= target else "MISSED"}'


def run(rows: int = ROWS, now: datetime = NOW, *, writes: bool = True) -> bool:
    """Run the benchmark; returns whether both targets were met with answers identical to the raw table's."""
    schema = f'pai_bench_{uuid.uuid4().hex[:10]}'
    admin = sa.create_engine(PG_URL)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA {schema}')
    sep = '&' if '?' in PG_URL else '?'
    url = f'{PG_URL}{sep}options={quote(f"-csearch_path={schema}")}'
    engine = sa.create_engine(url, pool_size=2)
    start, end = month_bounds(now)
    print(
        f'scale benchmark: PostgreSQL, {rows:,} rows over the 12 months to {now:%Y-%m-%d %H:%M} UTC, '
        f'1000 organizations, schema {schema}'
    )
    try:
        _load(engine, rows, now)
        _step('migrations 0002-0006: rollup triggers and backfill', lambda: migrate(engine))
        with engine.connect().execution_options(isolation_level='AUTOCOMMIT') as conn:
            conn.exec_driver_sql('VACUUM ANALYZE token_usage_daily')
            conn.exec_driver_sql('VACUUM ANALYZE token_usage_monthly')
            daily_rows = conn.exec_driver_sql('SELECT count(*) FROM token_usage_daily').scalar_one()
            monthly_rows = conn.exec_driver_sql('SELECT count(*) FROM token_usage_monthly').scalar_one()
            month_monthly = conn.execute(
                sa.text('SELECT count(*) FROM token_usage_monthly WHERE month = :m'), {'m': start.date()}
            ).scalar_one()
            by_org = conn.execute(
                sa.text(
                    'SELECT organization_id, count(*) AS n FROM token_usage WHERE created_at >= :s AND created_at < :e '
                    'GROUP BY organization_id ORDER BY n DESC, organization_id'
                ),
                {'s': start, 'e': end},
            ).all()
        month_rows = sum(n for _, n in by_org)
        largest, median = by_org[0], by_org[len(by_org) // 2]
        print(
            f'  daily rollup: {daily_rows:,} rows ({daily_rows / rows:.1%} of raw); monthly rollup: {monthly_rows:,} '
            f'rows ({monthly_rows / rows:.1%} of raw, {month_monthly:,} for {start:%Y-%m})\n'
            f'  {start:%Y-%m}: {month_rows:,} raw rows; largest org {largest[0]} {largest[1]:,} rows '
            f'({largest[1] / month_rows:.1%}), median org {median[0]} {median[1]:,} rows'
        )

        tracker = UsageTracker(engine, auto_migrate=False)
        results: list[tuple[str, float, float, float, float, float | None]] = []
        identical = True

        def compare(label: str, fn: Callable[[], Any], target: float | None) -> None:
            nonlocal identical
            with rollup_disabled():
                raw_ms, raw = _timed(fn)
            with _daily_level_only():
                daily_ms, daily = _timed(fn)
            rollup_ms, rolled = _timed(fn)
            identical = identical and raw == daily == rolled and bool(raw.rows)
            results.append((label, raw_ms, daily_ms, rollup_ms, _server_ms(engine, fn), target))

        for name, (org, _) in (('largest', largest), ('median', median)):
            compare(
                f'current month, {name} org, by model',
                lambda org=org: tracker.get_current_month_usage(org, now=now),
                TARGETS_MS.get(name),
            )
        compare(
            'current month, all orgs, by org and model',
            lambda: query_summary(engine, start, end, group_by=('organization', 'model')),
            TARGETS_MS['all'],
        )

        print(
            f'\n  {"query":<42} {"raw":>10} {"daily":>10} {"rollup":>10} {"of it SQL":>10} {"raw/rollup":>10}'
            '   rollup vs target'
        )
        for label, raw_ms, daily_ms, rollup_ms, sql_ms, target in results:
            print(
                f'  {label:<42} {raw_ms:>7.1f} ms {daily_ms:>7.1f} ms {rollup_ms:>7.1f} ms {sql_ms:>7.2f} ms'
                f' {raw_ms / rollup_ms:>9.1f}x   {_verdict(rollup_ms, target)}'
            )
        print(
            '  (raw: the raw table; daily: the daily level only; rollup: as summaries read it; of it SQL: the\n'
            "   rollup's query inside PostgreSQL, EXPLAIN ANALYZE; the rest is round trips and building the result)"
        )
        print(f'  answers identical to the raw table (daily level and rollup): {identical}')

        if writes:
            rows_written = WRITE_BATCHES * WRITE_BATCH_ROWS
            print(
                f'\n  write cost of the rollup triggers, both levels ({rows_written:,} rows each way, '
                f'{WRITE_BATCH_ROWS}-row batches):'
            )
            for label, (plain, triggered) in _write_cost(engine, now).items():
                print(
                    f'    {label:<36} {plain:>9,.0f} rows/s without, {triggered:>9,.0f} rows/s with '
                    f'({plain / triggered - 1:+.0%} time per row)'
                )
            # The rows written with the trigger disabled are missing from the rollup: rebuild it, as after a bulk load.
            _step('rebuild_rollup() after writing with the trigger disabled', lambda: rebuild_rollup(engine))
        exact = _step(f'verify_rollup() over {start:%Y-%m}', lambda: verify_rollup(engine, start, end) == [])
        print(f'  rollup equals the raw table, group by group, both levels: {exact}')
        identical = identical and exact
        met = identical and all(target is None or ms <= target for _, _, _, ms, _, target in results)
        print(f'\n  targets (<= 5 ms largest org, <= 100 ms all orgs, identical answers): {"MET" if met else "MISSED"}')
        tracker.close()
        return met
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA {schema} CASCADE')
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(prog='python -m benchmarks.scale', description=(__doc__ or '').splitlines()[0])
    parser.add_argument('--rows', type=int, default=ROWS, help=f'rows to generate (default {ROWS:,})')
    parser.add_argument(
        '--now',
        type=datetime.fromisoformat,
        default=NOW,
        help=f'the pinned "now", ISO 8601 (default {NOW.isoformat()}); its month is "the current month"',
    )
    parser.add_argument('--no-writes', action='store_true', help='skip the write-cost measurement')
    args = parser.parse_args()
    now: datetime = args.now if args.now.tzinfo else args.now.replace(tzinfo=UTC)
    run(args.rows, now, writes=not args.no_writes)


if __name__ == '__main__':
    main()
