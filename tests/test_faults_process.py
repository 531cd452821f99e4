"""Fault tests (issue 9): processes killed with SIGKILL, records tracked after `close()`, and a dead writer.

A record that `track()` accepted must survive its process: a child tracks 50k records, reporting after each
`track()` returned how many it has tracked (in a shared memory page, which survives the kill), and is killed
mid-stream; a new tracker then replays, and every accepted record is in the table exactly once.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pai_usage import UsageTracker
from pai_usage._spill import TARGET_FILE, TARGET_HINT_FILE
from tests._faults import (
    FAST,
    assert_exactly_once,
    billing,
    open_tracker,
    spawn,
    table_ids,
    track_all,
    wait_for_rows,
    wait_until,
)
from tests._pgproxy import PgProxy, pg_proxy, via_proxy
from tests.conftest import PG_SERVER_URL

pytestmark = pytest.mark.postgres

KILLED_CHILD = """
import mmap, os, struct, sys, time, uuid
from pai_usage import UsageTracker

url, spill_dir, counter, prefix = sys.argv[1:]
base = int(prefix, 16) << 64
fd = os.open(counter, os.O_RDWR)
accepted = mmap.mmap(fd, 8)
tracker = UsageTracker(url, spill_dir=spill_dir)
for i in range(50_000):
    tracker.track(id=uuid.UUID(int=base | i), provider='openai', model='gpt-4o', organization_id='org-killed',
                  input_tokens=100, output_tokens=10, cost_usd='0.00035')
    accepted[:8] = struct.pack('<q', i + 1)  # after track() returned: this record was accepted
    if i % 100 == 99:
        time.sleep(0.005)  # a steady stream, so that the kill lands in the middle of it
tracker.close()
"""


@pytest.fixture
def proxy() -> Iterator[PgProxy]:
    with pg_proxy(PG_SERVER_URL) as p:
        yield p


def _counter(path: Path) -> int:
    with path.open('rb') as f:
        return struct.unpack('<q', f.read(8))[0]


@pytest.mark.parametrize('database', ['up', 'down'])
def test_sigkill_mid_stream_loses_nothing_accepted(
    pg_schema_url: str, proxy: PgProxy, tmp_path: Path, database: str
) -> None:
    """SIGKILL after 15k of 50k records (the database up, or cut since the 5,000th); a new tracker replays."""
    url = via_proxy(pg_schema_url, proxy)
    spill = tmp_path / 'spill'
    counter = tmp_path / 'accepted'
    counter.write_bytes(bytes(8))
    prefix = uuid.uuid4().hex[:16]
    child = spawn(KILLED_CHILD, url, str(spill), str(counter), prefix, log=tmp_path / 'child.log')
    try:
        if database == 'down':
            wait_until(lambda: _counter(counter) >= 5_000, timeout=60, what='5k records tracked')
            proxy.cut()
        wait_until(lambda: _counter(counter) >= 15_000, timeout=60, what='15k records tracked')
    finally:
        child.kill()
        child.wait(10)
    accepted = _counter(counter)
    log = (tmp_path / 'child.log').read_text()
    assert 0 < accepted < 50_000, f'the kill did not land mid-stream ({accepted} tracked): {log[-2000:]}'

    proxy.restore()
    base = int(prefix, 16) << 64
    expected = [uuid.UUID(int=base | i) for i in range(accepted)]
    # The record after the last one counted may have been accepted too: its track() returned before the kill.
    maybe = [uuid.UUID(int=base | accepted)]
    with open_tracker(url, spill_dir=spill) as replayer:
        wait_for_rows(pg_schema_url, expected, what='the replay of the killed process')
        assert replayer.close(timeout=30)
    assert_exactly_once(pg_schema_url, expected, may_have=maybe)


LATE_CHILD = """
import sys, uuid
from pai_usage import UsageTracker

url, spill_dir, ids = sys.argv[1:]
tracker = UsageTracker(url, spill_dir=spill_dir, flush_interval=0.01)
records = [uuid.uuid4() for _ in range(1100)]
with open(ids, 'w') as f:
    f.write('\\n'.join(map(str, records)))
for i in records[:100]:
    tracker.track(id=i, provider='openai', model='gpt-4o', input_tokens=100, output_tokens=10, cost_usd='0.00035')
assert tracker.close(30), 'close() with the database up'
for i in records[100:]:  # a thread still running at exit: these come after close()
    tracker.track(id=i, provider='openai', model='gpt-4o', input_tokens=100, output_tokens=10, cost_usd='0.00035')
print('done', flush=True)
"""


def _files(root: Path) -> set[Path]:
    """The files that hold records (not the notes of what a directory is for: `target.json`, `target-hint.json`)."""
    if not root.exists():
        return set()
    return {p for p in root.rglob('*') if p.is_file() and p.name not in (TARGET_FILE, TARGET_HINT_FILE)}


def test_track_after_close_uses_one_file_and_replays(pg_schema_url: str, tmp_path: Path) -> None:
    """1,000 records tracked after `close()` go into at most a couple of files, and replay at the next start."""
    spill = tmp_path / 'spill'
    ids = tmp_path / 'ids'
    child = spawn(LATE_CHILD, pg_schema_url, str(spill), str(ids), log=tmp_path / 'child.log')
    assert child.wait(60) == 0, (tmp_path / 'child.log').read_text()[-2000:]
    assert 'done' in (tmp_path / 'child.log').read_text()
    expected = ids.read_text().split()
    stored = len(table_ids(pg_schema_url))
    late_files = _files(spill)
    assert len(late_files) <= 2, f'{len(late_files)} files for 1,000 late records'
    assert late_files or stored == 1100, f'{1100 - stored} late records are neither in the table nor on disk'

    with open_tracker(pg_schema_url, spill_dir=spill, **FAST) as replayer:
        wait_for_rows(pg_schema_url, expected, what='the replay of the late records')
        assert replayer.close(timeout=30)
    assert_exactly_once(pg_schema_url, expected)


def _exit_the_writer(record: object) -> None:
    # A listener that calls sys.exit(): SystemExit ends a thread silently (threading.excepthook ignores it).
    raise SystemExit(3)


@pytest.mark.filterwarnings('ignore::pytest.PytestUnhandledThreadExceptionWarning')
def test_a_dead_writer_is_reported(pg_schema_url: str, tmp_path: Path) -> None:
    """A listener ends the writer thread with SystemExit. Either the writer's guard survives it (all lands), or
    `stats()` says the writer is dead and `flush()`/`close()` say False; a next tracker replays everything."""
    spill = tmp_path / 'spill'
    records = [billing(i) for i in range(300)]
    tracker = UsageTracker(pg_schema_url, spill_dir=spill, listeners=[_exit_the_writer], **FAST)
    try:
        raised = track_all(tracker, records[:100])
        tracker.flush(timeout=5)  # the writer dies once these are written, before or after it answers this
        raised += track_all(tracker, records[100:])
        flushed = tracker.flush(timeout=5)
        alive = tracker.stats().writer_alive
        everything_in = len(table_ids(pg_schema_url)) == 300
        closed = tracker.close(timeout=5)
    finally:
        tracker.close(timeout=1)
        tracker.engine.dispose()
    assert raised == []
    assert (flushed, closed) == (alive, alive), 'flush()/close() must agree with stats().writer_alive'
    assert everything_in == alive

    with open_tracker(pg_schema_url, spill_dir=spill, **FAST) as replayer:
        wait_for_rows(pg_schema_url, [r['id'] for r in records], what='the replay after the writer died')
        assert replayer.close(timeout=30)
    assert_exactly_once(pg_schema_url, [r['id'] for r in records])
