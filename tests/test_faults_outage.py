"""Fault tests (issue 9): outages, a server that stays down, and stalled connections, with the default knobs.

Against the real PostgreSQL, through the loopback proxy (`tests/_pgproxy.py`) or a throwaway cluster
(`tests/_pgcluster.py`); the shared server is never stopped. Each scenario ends with 0 lost, 0 duplicated, 0
exceptions in the caller, and `flush()`/`close()` returning True only when the table holds everything.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests._faults import (
    Producer,
    assert_exactly_once,
    billing,
    open_tracker,
    table_ids,
    track_all,
    wait_for_rows,
    wait_until,
)
from tests._pgcluster import PgCluster, pg_cluster
from tests._pgproxy import PgProxy, pg_proxy, via_proxy
from tests.conftest import PG_SERVER_URL, require_postgres

pytestmark = pytest.mark.postgres


@pytest.fixture
def proxy() -> Iterator[PgProxy]:
    with pg_proxy(PG_SERVER_URL) as p:
        yield p


def test_outages_mid_stream_with_default_knobs(pg_schema_url: str, proxy: PgProxy, tmp_path: Path) -> None:
    """Ten outages of 1-5 s under a steady producer; after each, `flush()` is True only once all is in the table.

    `flush(timeout=60)` is called just after the database is back, and (every other outage) also while it is
    still down, the database coming back while it waits: that one may answer False, never True too early.
    The defect this guards against shows up in one outage out of several: the writer stays in "spilling" mode
    after the database is back, and `flush()` returns True while records are still only on disk.
    """
    rng = random.Random(9)
    outages = [(rng.uniform(0.3, 1.0), rng.uniform(1.0, 5.0)) for _ in range(10)]
    results: list[tuple[int, str, bool, int, int]] = []
    with open_tracker(via_proxy(pg_schema_url, proxy), spill_dir=tmp_path / 'spill') as tracker:
        producer = Producer(tracker)
        producer.start()
        try:
            wait_until(lambda: len(table_ids(pg_schema_url)) > 0, what='the first batch')
            for n, (up, down) in enumerate(outages):
                time.sleep(up)
                proxy.cut()
                back = threading.Timer(down, proxy.restore)
                if during := n % 2 == 1:
                    back.start()
                else:
                    time.sleep(down)
                    proxy.restore()
                tracked = producer.ids[: producer.accepted()]
                flushed = tracker.flush(timeout=60)
                if during:
                    back.join()
                    missing = len(set(tracked) - table_ids(pg_schema_url).keys())
                    if flushed and missing:
                        results.append((n, 'during', flushed, len(tracked), missing))
                    # A flush that found the database down may give up early (False is the truth then); once
                    # it is back, the next flush must wait for the replay.
                    tracked = producer.ids[: producer.accepted()]
                    flushed = tracker.flush(timeout=60)
                missing = len(set(tracked) - table_ids(pg_schema_url).keys())
                results.append((n, 'after', flushed, len(tracked), missing))
        finally:
            producer.stop()
        closed = tracker.close(timeout=60)
        stats = tracker.stats()
    lies = [r for r in results if not r[2] or r[4]]
    assert not lies, f'(outage, flush called, flush() answered, tracked before it, not in the table): {lies}'
    assert producer.raised == []
    assert closed, 'close() returned False with the database up'
    assert_exactly_once(pg_schema_url, producer.ids)
    assert (stats.dropped, stats.pending) == (0, 0)


@pytest.fixture(scope='module')
def _shared_cluster() -> Iterator[PgCluster]:
    require_postgres()  # the same binaries; under CI=true a missing server fails instead of skipping
    with pg_cluster() as c:
        yield c


@pytest.fixture
def cluster(_shared_cluster: PgCluster) -> PgCluster:
    """The module's throwaway cluster, running, with a fresh database for this test as its `url`."""
    if _shared_cluster.pid() is None:
        _shared_cluster.start()  # a previous test failed while the server was down
    return _shared_cluster.with_new_database()


@pytest.mark.parametrize('outage', ['proxy cut', 'server crash', 'server shutdown'])
def test_database_stays_down_then_the_next_tracker_replays(
    outage: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The database goes away and stays away: `flush()`/`close()` say False; a later tracker replays all, once."""
    spill = tmp_path / 'spill'
    if outage == 'proxy cut':
        target = request.getfixturevalue('pg_schema_url')
        proxy: PgProxy = request.getfixturevalue('proxy')
        url = via_proxy(target, proxy)
        go_down, come_back = proxy.cut, proxy.restore
    else:
        cluster: PgCluster = request.getfixturevalue('cluster')
        target = url = cluster.url
        go_down = cluster.crash if outage == 'server crash' else cluster.stop
        come_back = cluster.start

    first = [billing(i) for i in range(2000)]
    later = [billing(i) for i in range(3000)]
    with open_tracker(url, spill_dir=spill) as tracker:
        raised = track_all(tracker, first)
        assert tracker.flush(timeout=30)
        go_down()
        raised += track_all(tracker, later)
        flushed = tracker.flush(timeout=1)
        closed = tracker.close(timeout=2)
    assert raised == []
    assert not flushed, 'flush() returned True while the database was down'
    assert not closed, 'close() returned True while the database was down'

    come_back()
    assert_exactly_once(target, [r['id'] for r in first], may_have=[r['id'] for r in later])
    expected = [r['id'] for r in first + later]
    with open_tracker(url, spill_dir=spill) as replayer:
        wait_for_rows(target, expected, what='the replay')
        assert replayer.close(timeout=30)
    assert_exactly_once(target, expected)


@pytest.mark.parametrize('stall', ['the open connection', 'every connection'])
def test_stalled_connection_does_not_hold_the_writer(
    pg_schema_url: str, proxy: PgProxy, tmp_path: Path, stall: str
) -> None:
    """A TCP connection that stops moving bytes (a NAT that forgot it, a hung middlebox) while the writer uses it.

    With only the open connection stalled, the writer must give up on it within its own timeouts and write
    through a new one, without the test ever restoring it. With everything stalled, `flush()` must say False
    until the network moves again; then everything lands.
    """
    first = [billing(i) for i in range(1000)]
    later = [billing(i) for i in range(2000)]
    with open_tracker(via_proxy(pg_schema_url, proxy), spill_dir=tmp_path / 'spill') as tracker:
        raised = track_all(tracker, first)
        assert tracker.flush(timeout=30)
        assert proxy.connections() >= 1, 'the writer keeps a pooled connection'
        if stall == 'the open connection':
            proxy.stall_existing()
            raised += track_all(tracker, later)
            wait_until(
                lambda: len(table_ids(pg_schema_url)) >= 3000, timeout=75, what='writes through a fresh connection'
            )
        else:
            proxy.stall()
            raised += track_all(tracker, later)
            assert not tracker.flush(timeout=3), 'flush() returned True while nothing could reach the database'
        proxy.restore()
        assert tracker.flush(timeout=60)
        assert tracker.close(timeout=30)
    assert raised == []
    assert_exactly_once(pg_schema_url, [r['id'] for r in first + later])


def test_cluster_helper_is_a_real_server(cluster: PgCluster) -> None:
    """The throwaway cluster answers, dies on `crash()` and comes back on `start()` (the helper itself)."""
    engine = sa.create_engine(cluster.url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text('SELECT 1')).scalar() == 1
        cluster.crash()
        assert cluster.pid() is None
        engine.dispose()  # the pooled connection died with the server
        with pytest.raises(sa.exc.OperationalError), engine.connect():
            pass
        cluster.start()
        with engine.connect() as conn:
            assert conn.execute(sa.text('SELECT 2')).scalar() == 2
    finally:
        engine.dispose()
