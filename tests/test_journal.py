"""The write-ahead journal: records copied into a memory-mapped file, settled, rolled, deleted and replayed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from pai_usage import UsageRecord, UsageTracker
from pai_usage._journal import Journal, decode_payload, encode_payload, read_segment
from pai_usage._spill import SpillDir
from tests.test_writer import event, rows


@pytest.mark.parametrize(
    'created_at',
    [
        datetime(2026, 3, 1, 12, 30, 15, 123457, tzinfo=timezone(timedelta(hours=2))),
        # Past 2**32 s from 1970, doubles are more than a microsecond apart: a float timestamp would move it.
        datetime(2243, 7, 1, 8, 0, 58, 209457, tzinfo=UTC),
        datetime(2999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1900, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
    ],
    ids=['2026', '2243', '2999', '1900'],
)
def test_payload_round_trips_through_validation(created_at: datetime) -> None:
    cycle: dict[str, Any] = {}
    cycle['self'] = cycle
    fields: dict[str, Any] = {
        'id': uuid.uuid4(),
        'created_at': created_at,
        'cost_usd': Decimal('0.000123456789'),
        'units': Decimal('1.5'),
        'provider': 'openai',
        'input_tokens': 7,
        'metadata': {'when': datetime(2026, 1, 1, tzinfo=UTC), 'c': cycle},
    }
    decoded = decode_payload(encode_payload(fields))
    record = UsageRecord.model_validate(decoded)
    assert (record.id, record.created_at, record.cost_usd, record.units) == (
        fields['id'],
        fields['created_at'],
        fields['cost_usd'],
        fields['units'],
    )
    assert record.metadata == {'when': '2026-01-01 00:00:00+00:00', 'c': {'self': '<cycle>'}}


class _NoOffset(tzinfo):
    """A tzinfo that gives no offset: naive, as Python sees it."""

    def utcoffset(self, dt: datetime | None) -> timedelta | None:
        return None


def _outcome(fields: dict[str, Any]) -> tuple[str, object]:
    try:
        return 'valid', UsageRecord.model_validate(fields).created_at
    except ValueError as exc:
        return 'invalid', type(exc).__name__


@pytest.mark.parametrize(
    'created_at',
    [
        1.7e12,  # milliseconds, as pydantic reads a large number
        1.7e9,
        1_700_000_000_000,
        '2026-01-01T00:00:00Z',
        ('as-given', 5.0),
        ['as-given', 5.0],
        (1, 2),
        datetime(2026, 1, 1),
        datetime(2026, 1, 1, tzinfo=_NoOffset()),
        datetime(2026, 1, 1, tzinfo=UTC),
    ],
    ids=repr,
)
@pytest.mark.parametrize('kind', [b'm', b'j'], ids=['marshal', 'json'])
def test_a_journalled_time_validates_as_the_one_given(created_at: object, kind: bytes) -> None:
    """Replay from the journal accepts and refuses exactly what the live path does."""
    fields: dict[str, Any] = {'provider': 'openai', 'created_at': created_at}
    if kind == b'j':
        fields['user_id'] = Fraction(1, 3)  # a value `marshal` refuses outside metadata: the JSON payload
    payload = encode_payload(fields)
    assert payload[:1] == kind or type(created_at) is datetime  # `marshal` has no datetime: a naive one is JSON
    assert _outcome(decode_payload(payload)) == _outcome(fields)


@pytest.mark.parametrize(
    ('user_id', 'kind'),
    [('u1', b'm'), (Fraction(1, 3), b'j')],  # a value `marshal` refuses outside metadata: the JSON payload
    ids=['marshal', 'json'],
)
def test_uuid_id_round_trips_in_either_payload(user_id: object, kind: bytes) -> None:
    record_id = uuid.uuid4()
    payload = encode_payload({'id': record_id, 'user_id': user_id})
    assert payload[:1] == kind
    # The JSON payload holds its text, which validation parses: the same id either way.
    assert uuid.UUID(str(decode_payload(payload)['id'])) == record_id


def test_segments_roll_settle_and_delete(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_bytes=4096)
    segments = [journal.append(event(i)) for i in range(100)]
    files = sorted(tmp_path.glob('journal-*.bin'))
    assert len(files) > 2, 'small segments roll'
    assert sum(1 for f in files for r in read_segment(f) if isinstance(r, dict)) == 100
    counts: dict[Any, int] = {}
    for seg in segments[:50]:
        counts[seg] = counts.get(seg, 0) + 1
    journal.settle(counts)
    left = sorted(tmp_path.glob('journal-*.bin'))
    assert 0 < len(left) < len(files), 'sealed segments whose records are all settled are deleted'
    assert journal.close() is False, 'unsettled records are kept for the next start'
    assert sum(1 for f in tmp_path.glob('journal-*.bin') for r in read_segment(f) if isinstance(r, dict)) >= 50


def test_close_deletes_settled_segments(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    seg = journal.append(event())
    journal.settle({seg: 1})
    assert journal.close() is True
    assert not list(tmp_path.glob('journal-*'))


def test_a_live_segment_is_never_claimed(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append(event())
    replayer = SpillDir(tmp_path)
    assert list(replayer.claim()) == [], 'its process holds the lock'
    journal.close()  # one record not settled: kept
    (claimed,) = replayer.claim()
    assert claimed.path.suffix == '.bin'
    assert [r['input_tokens'] for r in claimed.records() if isinstance(r, dict)] == [100]
    claimed.done()


def test_a_torn_record_ends_the_segment(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    for i in range(3):
        journal.append(event(i))
    (path,) = tmp_path.glob('journal-*.bin')
    data = path.read_bytes()
    journal.close()
    end = data.index(b'\x00' * 64, 16)
    torn = tmp_path / 'torn.bin'
    torn.write_bytes(data[: end - 10])  # the last record cut short
    got = list(read_segment(torn))
    assert [type(r) for r in got] == [dict, dict, ValueError]
    assert isinstance(list(read_segment(tmp_path / 'torn.bin'))[-1], ValueError)
    not_ours = tmp_path / 'other.bin'
    not_ours.write_bytes(b'hello')
    assert [type(r) for r in read_segment(not_ours)] == [ValueError]


@pytest.mark.parametrize(
    'poison',
    [
        pytest.param(None, id='clean'),
        # Times whose UTC date is beyond `datetime`: the journal stores them as timestamps, which must not end
        # the segment when read back (every record after them would be lost).
        pytest.param(datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5))), id='year-1-east-of-utc'),
        pytest.param(datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-14))), id='year-9999-west-of-utc'),
    ],
)
def test_journal_left_by_a_dead_tracker_is_replayed(database_url: str, tmp_path: Path, poison: datetime | None) -> None:
    """Records journalled but never written (the process died) reach the table at the next start, once."""
    probe = UsageTracker(database_url, spill_dir=tmp_path, handle_sigterm=False)
    assert probe.durability == 'journal'
    spill_dir = probe.spill_dir
    assert spill_dir is not None and probe.close()
    probe.engine.dispose()
    journal = Journal(spill_dir)
    for i in range(20):
        journal.append(event(i))
        if i == 5 and poison is not None:
            journal.append({**event(99), 'created_at': poison})
    journal.close()  # as the kernel does for a killed process: the lock goes, the file stays
    with UsageTracker(database_url, spill_dir=tmp_path) as again:
        again.track(event())
        assert again.flush()
        stats = again.stats()
    again.engine.dispose()
    assert (stats.replayed, stats.written, stats.invalid) == (20, 1, 0 if poison is None else 1)
    assert rows(database_url) == (21, 21)
    assert not list(spill_dir.glob('*.bin'))


FORKING_PARENT = """
import os, sys, time, uuid
from pai_usage import UsageTracker
tracker = UsageTracker(sys.argv[1], spill_dir=sys.argv[2], handle_sigterm=False)
for i in range(100):
    tracker.track(id=uuid.uuid4(), provider='openai', model='gpt-4o', input_tokens=i, cost_usd='0.01')
child = os.fork()
if child == 0:  # a long-lived worker that never tracks anything
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(60)
"""


def test_a_forked_child_does_not_hold_its_parents_journal(tmp_path: Path) -> None:
    """The parent is SIGKILLed while its records are only in its journal: they are replayed while the child lives."""
    db_dir = tmp_path / 'db'  # missing: the parent cannot write, so its records stay in its journal
    url = f'sqlite:///{db_dir}/usage.db'
    parent = subprocess.Popen(
        [sys.executable, '-c', FORKING_PARENT, url, str(tmp_path / 'spill')], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        parent.kill()
        parent.wait(10)  # not `communicate()`: the child holds the pipe open
        parent.stdout.close()
        db_dir.mkdir()
        with UsageTracker(url, spill_dir=tmp_path / 'spill') as again:
            assert again.flush(30)
        again.engine.dispose()
        assert _alive(child), 'the child still runs'
        assert rows(url) == (100, 100)
    finally:
        os.kill(child, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_journal_that_cannot_roll_retries_after_a_pause_not_on_every_record(tmp_path: Path) -> None:
    """A segment that cannot be created (here: the directory is a file) costs `track()` one failed attempt a
    second, not file system calls for every record; it journals again once the directory is back."""
    blocker = tmp_path / 'spill'
    blocker.write_text('a file where the directory should be')
    journal = Journal(blocker / 'db')
    with pytest.raises(OSError):
        journal.append(event(0))
    blocker.unlink()
    with pytest.raises(OSError, match='retrying shortly'):  # fixed meanwhile, but not tried again yet
        journal.append(event(1))
    time.sleep(1.1)
    journal.append(event(2))
    journal.close()
    assert [r['input_tokens'] for r in read_segment(next((blocker / 'db').glob('journal-*.bin')))] == [
        event(2)['input_tokens']
    ]
