"""Fault tests (issue 9): poison records mixed into batches of good ones, while healthy and while spilling.

A billing row is never rejected for its labels or metadata: NUL bytes are removed, long labels shortened by
`normalize_label`, bad metadata replaced by a marker, and the tokens and cost are kept. Only truly invalid
records (negative tokens, a timestamp outside the calendar, a NaN cost) are rejected, and neither kind may cost
a good record, block a later spill file, or stop a later outage's records from replaying after a restart.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices
import pytest
import sqlalchemy as sa
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

from pai_usage.capability import TrackUsage
from pai_usage.record import normalize_label
from pai_usage.table import TOKEN_USAGE
from tests._faults import (
    COST,
    FAST,
    assert_exactly_once,
    billing,
    open_tracker,
    table_ids,
    track_all,
    wait_for_rows,
)
from tests._pgproxy import PgProxy, pg_proxy, via_proxy
from tests.conftest import PG_SERVER_URL

pytestmark = pytest.mark.postgres


def _cycle() -> dict[str, Any]:
    value: dict[str, Any] = {'a': 1}
    value['self'] = value
    return value


def _deep(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(levels):
        value = {'a': value}
    return value


class _Opaque:
    def __repr__(self) -> str:
        return '<opaque>'


KEPT: list[tuple[str, dict[str, Any]]] = [
    ('metadata with a cycle', {'metadata': _cycle()}),
    ('metadata with a tuple key', {'metadata': {(1, 2): 'x'}}),
    ('metadata with a huge int', {'metadata': {'n': 10**400}}),
    ('metadata with an int past the str limit', {'metadata': {'n': 10**5000}}),
    (
        'metadata of non-JSON objects',
        {'metadata': {'o': _Opaque(), 'when': datetime(2026, 1, 1, tzinfo=UTC), 'd': Decimal('1.5'), 's': {1}}},
    ),
    ('metadata with bytes', {'metadata': {'b': b'\xff\x00'}}),
    ('metadata nested 5000 deep', {'metadata': _deep(5000)}),
    ('metadata of 100 kB', {'metadata': {'blob': 'x' * 100_000}}),
    ('metadata that is not a dict', {'metadata': ['a', 'list']}),
    ('NUL in user_id', {'user_id': 'us\x00er-1'}),
    ('NUL in organization_id', {'organization_id': 'org\x00-1'}),
    ('NUL in model', {'model': 'gpt-4o\x00'}),
    ('NUL in a metadata key', {'metadata': {'ke\x00y': 'v'}}),
    ('NUL in metadata values', {'metadata': {'key': 'v\x00al', 'nested': ['a\x00', {'b': 'c\x00'}]}}),
    ('user_id of 300 characters', {'user_id': 'u' * 300}),
    ('organization_id of 1000 characters', {'organization_id': 'o' * 999 + '\x00!'}),
    ('model of 256 characters', {'model': 'm' * 256}),
    ('whitespace-only user_id', {'user_id': ' \t '}),
    # Lone surrogates (bytes decoded with `surrogateescape`, JSON such as "\udcff"): PostgreSQL refuses them.
    ('lone surrogate in user_id', {'user_id': 'us\udcffer'}),
    ('lone surrogates in metadata', {'metadata': {'k\udcff': 'v\ud800', 'ok': '\U0001f600'}}),
    ('NUL and a lone surrogate in details keys', {'details': {'k\x00': 1, 'x\udcff': 2}}),
]
"""Bad labels or metadata on a good billing row: the row is stored with its tokens and cost."""

CLEANED: dict[str, dict[str, Any]] = {
    'NUL in a metadata key': {'key': 'v'},
    'NUL in metadata values': {'key': 'val', 'nested': ['a', {'b': 'c'}]},
    'lone surrogates in metadata': {'k\ufffd': 'v\ufffd', 'ok': '\U0001f600'},
}
"""Metadata whose only fault is NUL bytes: stored as given, without them."""

REJECTED: list[tuple[str, dict[str, Any]]] = [
    ('negative tokens', {'input_tokens': -1}),
    ('a NaN cost', {'cost_usd': float('nan')}),
    ('created_at past year 9999 in UTC', {'created_at': datetime.max.replace(tzinfo=timezone(timedelta(hours=-14)))}),
    ('created_at before year 1 in UTC', {'created_at': datetime.min.replace(tzinfo=timezone(timedelta(hours=14)))}),
]
"""Truly invalid records: rejected (counted, kept aside), never stored."""

EITHER: list[tuple[str, dict[str, Any]]] = [
    ('created_at at datetime.max, +14:00', {'created_at': datetime.max.replace(tzinfo=timezone(timedelta(hours=14)))}),
    ('created_at at datetime.max, UTC', {'created_at': datetime.max.replace(tzinfo=UTC)}),
]
"""Valid in Python and in PostgreSQL but at the edge of the calendar (a month after them overflows): stored or
rejected as invalid, never harming the records around them."""


def _batch(rng: random.Random, start: int) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """300 good records with every poison case shuffled in."""
    kinds: dict[str, list[dict[str, Any]]] = {'good': [billing(start + i) for i in range(300)]}
    kinds['kept'] = [billing(start, **fields) for _, fields in KEPT]
    kinds['rejected'] = [billing(start, **fields) for _, fields in REJECTED]
    kinds['either'] = [billing(start, **fields) for _, fields in EITHER]
    records = [r for rs in kinds.values() for r in rs]
    rng.shuffle(records)
    return records, kinds


def _stored_rows(url: str, ids: list[object]) -> dict[str, dict[str, Any]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            query = sa.select(TOKEN_USAGE).where(TOKEN_USAGE.c.id.in_(ids))
            return {str(row['id']): dict(row) for row in conn.execute(query).mappings()}
    finally:
        engine.dispose()


def _assert_kept_as_billing(url: str, kept: list[dict[str, Any]]) -> None:
    rows = _stored_rows(url, [r['id'] for r in kept])
    wrong: list[str] = []
    for (name, fields), record in zip(KEPT * (len(kept) // len(KEPT)), kept, strict=True):
        row = rows.get(str(record['id']))
        if row is None:
            wrong.append(f'{name}: not stored')
            continue
        got = (row['input_tokens'], row['output_tokens'], row['cost_usd'])
        if got != (record['input_tokens'], record['output_tokens'], COST):
            wrong.append(f'{name}: tokens/cost {got}')
        for label in ('user_id', 'organization_id', 'model'):
            if label in fields and row[label] != normalize_label(fields[label]):
                wrong.append(f'{name}: {label} stored as {row[label]!r}')
        metadata = row['metadata']
        bad = not isinstance(metadata, dict) or '\\u0000' in json.dumps(metadata)
        # Bad metadata becomes a JSON-safe rendition or a marker saying why, never silently nothing.
        if bad or ('metadata' in fields and not metadata) or metadata != CLEANED.get(name, metadata):
            wrong.append(f'{name}: metadata stored as {str(metadata)[:80]!r}')
    assert not wrong, wrong


@pytest.fixture
def proxy() -> Iterator[PgProxy]:
    with pg_proxy(PG_SERVER_URL) as p:
        yield p


@pytest.mark.parametrize('phase', ['healthy', 'spilling', 'overflowing', 'late'])
def test_poison_never_costs_a_good_record(pg_schema_url: str, proxy: PgProxy, tmp_path: Path, phase: str) -> None:
    """Two batches of good and poison records, then a later outage of good records only, replayed after a restart.

    The poison is tracked while the database answers (`healthy`) or while it is cut (`spilling`, then replayed
    by a new tracker), into a queue so small that `track()` spills it itself (`overflowing`), or after `close()`
    (`late`, into the late spill file). Either way the later outage's records must replay: poison never blocks
    later files.
    """
    rng = random.Random(phase)
    url = via_proxy(pg_schema_url, proxy)
    spill = tmp_path / 'spill'
    warmup = [billing(i) for i in range(50)]
    (batch1, kinds1), (batch2, kinds2) = _batch(rng, 0), _batch(rng, 1000)
    later = [billing(i) for i in range(500)]
    kinds = {k: kinds1[k] + kinds2[k] for k in kinds1}

    small = {'max_queue': 20} if phase == 'overflowing' else {}
    with open_tracker(url, spill_dir=spill, **FAST, **small) as tracker:
        raised = track_all(tracker, warmup)
        assert tracker.flush(timeout=30)
        if phase in ('spilling', 'overflowing'):
            proxy.cut()
        elif phase == 'late':
            assert tracker.close(timeout=30)
        raised += track_all(tracker, batch1 + batch2)
        if phase == 'healthy':
            assert tracker.flush(timeout=30), 'flush() returned False with the database up'
            invalid = tracker.stats().invalid
            assert len(kinds['rejected']) <= invalid <= len(kinds['rejected']) + len(kinds['either']), (
                f'stats().invalid is {invalid} for {len(kinds["rejected"])} invalid records'
            )
            assert tracker.stats().spilled == 0, 'records went to disk while the database answered'
            assert tracker.close(timeout=30)
        else:
            if phase != 'late':
                assert not tracker.flush(timeout=1), 'flush() returned True while the database was down'
            assert not tracker.close(timeout=2), 'close() returned True while records were only on disk'
            proxy.restore()
            with open_tracker(url, spill_dir=spill, **FAST) as replayer:
                poisoned = [r['id'] for r in kinds['good'] + kinds['kept']]
                wait_for_rows(pg_schema_url, poisoned, what='the replay of the poisoned spill')
                assert replayer.flush(timeout=30)
    # A later outage, of good records only, in the next tracker on this spill directory.
    with open_tracker(url, spill_dir=spill, **FAST) as current:
        proxy.cut()
        raised += track_all(current, later)
        assert not current.close(timeout=2), 'close() returned True while the database was down'
    proxy.restore()
    with open_tracker(url, spill_dir=spill, **FAST) as restarted:
        expected = {str(r['id']) for r in warmup + kinds['good'] + kinds['kept'] + later}
        wait_for_rows(pg_schema_url, expected, what="the later outage's replay")
        assert restarted.close(timeout=30)

    assert raised == []
    assert_exactly_once(pg_schema_url, expected, may_have=[r['id'] for r in kinds['either']])
    _assert_kept_as_billing(pg_schema_url, kinds['kept'])


def _answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(
        parts=[TextPart('done')], provider_name='openai', usage=RequestUsage(input_tokens=1200, output_tokens=80)
    )


@pytest.mark.parametrize(
    'metadata',
    [
        pytest.param({'client': _Opaque()}, id='object'),
        pytest.param(_cycle(), id='cycle'),
        pytest.param({(1, 2): 'tuple key'}, id='tuple-key'),
        pytest.param({'ke\x00y': 'va\x00lue'}, id='nul'),
    ],
)
def test_capability_metadata_that_is_not_json_keeps_the_cost(
    pg_schema_url: str, tmp_path: Path, metadata: dict[Any, Any]
) -> None:
    """`TrackUsage(metadata=...)` that JSON cannot encode: the agent's requests are still billed, at their price."""
    with open_tracker(pg_schema_url, spill_dir=tmp_path / 'spill', **FAST) as tracker:
        agent = Agent(
            FunctionModel(_answer, model_name='gpt-4o'), capabilities=[TrackUsage(tracker, metadata=metadata)]
        )
        asyncio.run(agent.run('hello'))  # not run_sync: that leaves its event loop open
        assert tracker.flush(timeout=30)
        with tracker.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(sa.select(TOKEN_USAGE)).mappings()]
    requests = [r for r in rows if r['input_tokens'] or r['output_tokens']]
    expected = genai_prices.calc_price(
        RequestUsage(input_tokens=1200, output_tokens=80), 'gpt-4o', provider_id='openai'
    )
    assert [(r['input_tokens'], r['output_tokens'], r['cost_usd']) for r in requests] == [
        (1200, 80, expected.total_price)
    ]
    assert all(isinstance(r['metadata'], dict) and '\\u0000' not in json.dumps(r['metadata']) for r in rows)
    assert table_ids(pg_schema_url).most_common(1)[0][1] == 1
