"""The spill directory: per-process files, claiming for replay, torn lines, full disks, shared directories."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import pai_usage._spill as spill_module
from pai_usage import UsageTracker
from pai_usage._spill import STALE_TMP_SECONDS, SpillDir, default_spill_dir, encode
from pai_usage.tracker import Durability
from tests._faults import wait_until
from tests.test_writer import FAST, event, rows

ROOT = Path(__file__).resolve().parent.parent


def lines_of(n: int) -> list[bytes]:
    return [encode(event(i)) for i in range(n)]


def test_live_owner_file_is_not_claimed(tmp_path: Path) -> None:
    owner, replayer = SpillDir(tmp_path), SpillDir(tmp_path)
    owner.append(lines_of(3))
    assert replayer.pending()
    assert list(replayer.claim()) == [], 'a file whose writer is alive is never read'
    owner.rotate()
    (claimed,) = replayer.claim()
    assert claimed.path.name.startswith('replay-')
    assert [r['input_tokens'] for r in claimed.records() if isinstance(r, dict)] == [100, 101, 102]
    claimed.done()
    assert not replayer.pending()
    assert list(tmp_path.iterdir()) == []


def test_two_replayers_never_share_a_file(tmp_path: Path) -> None:
    writer, first, second = SpillDir(tmp_path), SpillDir(tmp_path), SpillDir(tmp_path)
    writer.append(lines_of(2))
    writer.close()
    (claimed,) = first.claim()
    assert list(second.claim()) == []
    claimed.release()  # e.g. the database failed mid-replay: the file stays for later
    (again,) = second.claim()
    assert len(list(again.records())) == 2
    again.done()


def test_failed_append_leaves_no_torn_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spill = SpillDir(tmp_path)
    spill.append(lines_of(2))
    real_write_all = spill_module._write_all  # pyright: ignore[reportPrivateUsage]

    def disk_full(fd: int, data: bytes) -> None:
        real_write_all(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, 'No space left on device')

    monkeypatch.setattr(spill_module, '_write_all', disk_full)
    with pytest.raises(OSError, match='No space left'):
        spill.append(lines_of(5))
    monkeypatch.setattr(spill_module, '_write_all', real_write_all)
    spill.append(lines_of(1))
    spill.close()
    (claimed,) = SpillDir(tmp_path).claim()
    assert [len(r) for r in claimed.records() if isinstance(r, dict)] == [7, 7, 7]
    claimed.done()


def _disk_full(fd: int, data: bytes) -> None:
    raise OSError(errno.ENOSPC, 'No space left on device')


@pytest.mark.parametrize('durability', ['journal', 'memory'])
@pytest.mark.parametrize('back_first', ['database', 'disk'])
@pytest.mark.parametrize('knobs', [pytest.param(FAST, id='fast'), pytest.param({}, id='defaults')])
def test_disk_full_and_database_down_hold_the_batch_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: Durability, back_first: str, knobs: dict[str, Any]
) -> None:
    """The database is unreachable and the disk refuses the spill: the writer holds what it took, and retries.

    Nothing is lost while the queue has room (memory durability included): whichever comes back first, the
    database or the disk, takes the records. `flush()` says False meanwhile.
    """
    db_dir = tmp_path / 'db'  # does not exist yet: SQLite cannot open the database
    monkeypatch.setattr(spill_module, '_write_all', _disk_full)
    url = f'sqlite:///{db_dir}/usage.db'
    tracker = UsageTracker(url, spill_dir=tmp_path / 'spill', durability=durability, handle_sigterm=False, **knobs)
    for i in range(50):
        tracker.track(event(i))
    for _ in range(2):  # a batch the disk refused, again and again: still held
        assert tracker.flush(1) is False, 'records are neither written nor spilled: flush() says so'
        stats = tracker.stats()
        assert (stats.dropped, stats.journal_only, stats.spilled, stats.pending) == (0, 0, 0, 50)
    if back_first == 'database':
        db_dir.mkdir()
        assert tracker.flush(30), 'the held batch is written once the database is back, the disk still full'
        expected = 50
    else:
        monkeypatch.undo()  # space is freed: the held batch goes to the spill file
        wait_until(lambda: tracker.stats().spilled == 50, what='the held batch, spilled once the disk has room')
        for i in range(50, 70):
            tracker.track(event(i))
        assert tracker.flush(30) is False, 'the database is still down: the records are only on disk'
        db_dir.mkdir()
        expected = 70
    assert tracker.close(30)
    tracker.engine.dispose()
    stats = tracker.stats()
    assert (stats.dropped, stats.journal_only, stats.pending) == (0, 0, 0)
    assert rows(url) == (expected, expected)


@pytest.mark.parametrize(
    ('durability', 'kept_by'), [('journal', 'journal_only'), ('memory', 'dropped')], ids=['journal', 'memory']
)
def test_disk_full_overflow_counts_what_is_lost_then_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: Durability, kept_by: str
) -> None:
    """Past `max_queue`, `track()` spills itself; a full disk refuses it: never silently lost.

    The journal's segments hold blocks reserved when they were made: what the spill cannot take stays there,
    unsettled, and the next start replays it. Without the journal those records are lost, and counted.
    """
    db_dir = tmp_path / 'db'
    monkeypatch.setattr(spill_module, '_write_all', _disk_full)
    url = f'sqlite:///{db_dir}/usage.db'
    tracker = UsageTracker(url, spill_dir=tmp_path / 'spill', durability=durability, max_queue=5, **FAST)
    for i in range(50):
        tracker.track(event(i))
    assert tracker.flush(1) is False
    stats = tracker.stats()
    refused = getattr(stats, kept_by)
    assert 0 < refused < 50, stats  # the queue holds 5 and the writer one batch: the rest overflowed
    assert (stats.dropped + stats.journal_only, stats.pending) == (refused, 50 - refused)
    monkeypatch.undo()  # space is freed
    for i in range(50, 70):
        tracker.track(event(i))
    wait_until(lambda: tracker.stats().spilled == 70 - refused, what='the held batch and the new records, spilled')
    db_dir.mkdir()  # the database is back
    assert tracker.close(10) is False, 'records were lost, or only the journal holds them'
    tracker.engine.dispose()
    with UsageTracker(url, spill_dir=tmp_path / 'spill') as again:
        assert again.flush(30)
    again.engine.dispose()
    kept = 70 - (refused if durability == 'memory' else 0)
    assert rows(url) == (kept, kept)


def test_torn_line_and_duplicates_on_replay(database_url: str, tmp_path: Path) -> None:
    """A crash mid-append leaves a torn last line; a crash mid-replay leaves rows already inserted. Both are fine."""
    events = [event(i) for i in range(5)]
    with UsageTracker(database_url, spill_dir=tmp_path) as tracker:
        for e in events[:2]:
            tracker.track(e)
        assert tracker.flush(30)
        spill_dir = tracker.spill_dir
    tracker.engine.dispose()
    assert spill_dir is not None
    spill_dir.mkdir(parents=True, exist_ok=True)
    torn = encode(event(99))[:40]
    (spill_dir / f'spill-otherhost-1-{uuid.uuid4().hex[:8]}.jsonl').write_bytes(
        b''.join(encode(e) for e in events) + torn
    )
    with UsageTracker(database_url, spill_dir=tmp_path) as tracker:
        assert tracker.flush(30)
        stats = tracker.stats()
    tracker.engine.dispose()
    assert rows(database_url) == (5, 5)
    assert (stats.replayed, stats.invalid, stats.pending) == (5, 1, 0)
    assert not list(spill_dir.glob('spill-*.jsonl')) and not list(spill_dir.glob('replay-*.jsonl'))
    (rejected,) = spill_dir.glob('rejected-*.jsonl')
    assert json.loads(rejected.read_text())['error'] == 'torn line in a spill file'


SPILL_SCRIPT = """
import sys, uuid
from pai_usage import UsageTracker
tracker = UsageTracker(sys.argv[1], spill_dir=sys.argv[2], flush_interval=0.01, spill_after=0, retry_interval=0.01,
                       max_retry_interval=0.05, max_queue=500)
for i in range(2000):
    tracker.track(id=uuid.uuid4(), provider='openai', model='gpt-4o', input_tokens=i, cost_usd='0.01')
assert tracker.close(0.5) is False  # truthful: the records are on disk, not in the database
s = tracker.stats()
assert s.spilled == 2000 and s.dropped == 0 and s.pending == 0, s
"""


def test_processes_share_a_spill_dir(tmp_path: Path) -> None:
    """Three processes spill into one directory at once (database down); one tracker replays them all, once."""
    db_dir = tmp_path / 'db'
    url = f'sqlite:///{db_dir}/usage.db'
    env = {**os.environ, 'PYTHONPATH': str(ROOT)}
    procs = [
        subprocess.Popen([sys.executable, '-c', textwrap.dedent(SPILL_SCRIPT), url, str(tmp_path)], env=env)
        for _ in range(3)
    ]
    assert [p.wait(60) for p in procs] == [0, 0, 0]
    db_dir.mkdir()
    with UsageTracker(url, spill_dir=tmp_path) as tracker:
        assert tracker.flush(30)
        assert tracker.stats().replayed == 6000
    tracker.engine.dispose()
    assert rows(url) == (6000, 6000)


def test_default_spill_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Never the working directory: a per-user state directory, or beside the SQLite file."""
    monkeypatch.delenv('PAI_USAGE_SPILL_DIR', raising=False)
    monkeypatch.setenv('XDG_STATE_HOME', str(tmp_path / 'state'))
    assert default_spill_dir() == tmp_path / 'state' / 'pai-usage' / 'spill'
    monkeypatch.delenv('XDG_STATE_HOME')
    assert default_spill_dir() == Path.home() / '.local' / 'state' / 'pai-usage' / 'spill'
    assert default_spill_dir(tmp_path / 'usage.db') == tmp_path / 'usage.db.pai-usage-spill'
    monkeypatch.chdir(tmp_path)
    relative = UsageTracker('sqlite:///usage.db', handle_sigterm=False)
    try:
        assert relative.spill_dir is not None
        assert relative.spill_dir.parent == tmp_path / 'usage.db.pai-usage-spill'
    finally:
        relative.close()
    monkeypatch.setenv('PAI_USAGE_SPILL_DIR', str(tmp_path))
    assert default_spill_dir() == tmp_path
    a = UsageTracker(f'sqlite:///{tmp_path}/a.db')
    b = UsageTracker(f'sqlite:///{tmp_path}/b.db')
    try:
        # One sub-directory per database: a shared spill directory never replays into the wrong database.
        assert a.spill_dir is not None and b.spill_dir is not None
        assert a.spill_dir.parent == b.spill_dir.parent == tmp_path
        assert a.spill_dir != b.spill_dir
    finally:
        a.close()
        b.close()


def test_encode_round_trips_through_validation() -> None:
    from pai_usage import UsageRecord

    record = UsageRecord(provider='openai', model='gpt-4o', input_tokens=3, cost_usd='0.1', metadata={'k': [1, 2]})
    raw: dict[str, Any] = json.loads(encode(record.model_dump(mode='json')))
    assert UsageRecord.model_validate(raw) == record
    assert json.loads(encode({'when': record.created_at, 'tags': ('a',)})) == {
        'when': record.created_at.isoformat(),
        'tags': ['a'],
    }
    with pytest.raises(TypeError, match='object is not JSON-serializable'):
        encode({'x': object()})


def test_replay_failure_keeps_the_file(tmp_path: Path) -> None:
    """A replay that fails part-way (database gone again) keeps the file for the next attempt."""
    db_dir = tmp_path / 'db'
    url = f'sqlite:///{db_dir}/usage.db'
    # Made outside the tracker's spill root: a sibling of its directory would start its writer at once, and the
    # file moving between the two under the start-up scan could be missed by both of its checks.
    spill = SpillDir(tmp_path / 'staging')
    spill.append(lines_of(3))
    spill.close()
    engine = sa.create_engine(url)
    tracker = UsageTracker(engine, spill_dir=tmp_path / 'spill', **FAST)
    try:
        target = tracker.spill_dir
        assert target is not None
        assert tracker._writer._thread is None  # pyright: ignore[reportPrivateUsage]
        target.mkdir(parents=True)
        for f in (tmp_path / 'staging').iterdir():
            f.rename(target / f.name)
        tracker._writer.start_if_spilled()  # pyright: ignore[reportPrivateUsage]
        assert tracker.flush(30)  # nothing of this tracker's own is on disk
        # The replay runs on the writer's thread: flush() need not wait for a file another process left.
        wait_until(lambda: tracker.stats().failed_writes >= 1, timeout=10, what='a failed replay attempt')
        assert len([*target.glob('replay-*.jsonl'), *target.glob('spill-*.jsonl')]) == 1
    finally:
        tracker.close(1)
        engine.dispose()


def test_quarantined_file_never_blocks_the_others(tmp_path: Path) -> None:
    """A file set aside as poison is never claimed again, and the files after it still are."""
    for n in range(2):
        spill = SpillDir(tmp_path)
        spill.append(lines_of(n + 1))
        spill.close()
    replayer = SpillDir(tmp_path)
    first, second = replayer.claim()
    target = first.quarantine()
    assert target.name.startswith('quarantine-') and target.exists()
    second.done()
    assert not replayer.pending()
    assert list(replayer.claim()) == []
    assert [p.name.split('-')[0] for p in tmp_path.iterdir()] == ['quarantine']


def test_spill_files_name_their_target(tmp_path: Path) -> None:
    spill = SpillDir(tmp_path, target={'backend': 'postgresql', 'database': 'db'})
    spill.append(lines_of(1))
    spill.close()
    (path,) = tmp_path.glob('spill-*.jsonl')
    header = json.loads(path.read_bytes().splitlines()[0])
    assert header['target'] == {'backend': 'postgresql', 'database': 'db'}
    spill.write_target({'server': '1', 'database': 'db'})
    assert spill.read_target() == {'server': '1', 'database': 'db'}


def test_tidy_removes_files_a_killed_creator_left(tmp_path: Path) -> None:
    """A process killed while creating a file leaves a hidden `.tmp` (8 MB for a journal segment): tidied once
    it is old, never while it may still be in the making."""
    spill = SpillDir(tmp_path / 'db')
    spill.path.mkdir()
    old, fresh = spill.path / '.journal-h-1-0.bin.tmp', spill.path / '.spill-h-2.tmp'
    for tmp in (old, fresh):
        tmp.write_bytes(b'\0' * 1024)
    stale = time.time() - STALE_TMP_SECONDS - 1
    os.utime(old, (stale, stale))
    spill.tidy()
    assert sorted(p.name for p in spill.path.iterdir()) == [fresh.name]
    os.utime(fresh, (stale, stale))
    spill.tidy()
    assert not spill.path.exists()
