"""Fault tests (issue 9): spilled records replay into their database whatever URL spelling the next tracker uses.

A tracker reaches the database as `127.0.0.1:P`, then the database goes away and it spills. The next tracker
names the same database as `localhost:P`, through another port (a second proxy to the same server), with an
extra harmless query parameter, or from another working directory with the default spill directory: every
spilled record must still reach the table, once.
"""

from __future__ import annotations

import logging
import signal
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import sqlalchemy as sa

from tests._faults import (
    FAST,
    assert_exactly_once,
    billing,
    open_tracker,
    spawn,
    table_ids,
    track_all,
    wait_for_rows,
)
from tests._pgproxy import pg_proxy, via_proxy
from tests.conftest import PG_SERVER_URL

pytestmark = pytest.mark.postgres


@pytest.mark.parametrize('spelling', ['localhost', 'another port', 'extra query parameter', 'another directory'])
def test_spill_replays_under_another_spelling(
    pg_schema_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spelling: str
) -> None:
    reached = [billing(i) for i in range(200)]
    spilled = [billing(i) for i in range(500)]
    options: dict[str, Any] = dict(FAST)
    if spelling == 'another directory':
        # The real default spill directory, with the per-user state directories inside this test's tmp_path.
        monkeypatch.delenv('PAI_USAGE_SPILL_DIR', raising=False)
        home = tmp_path / 'home'
        monkeypatch.setenv('HOME', str(home))
        for name, sub in (('XDG_STATE_HOME', 'state'), ('XDG_DATA_HOME', 'data'), ('XDG_CACHE_HOME', 'cache')):
            monkeypatch.setenv(name, str(home / sub))
        for d in ('a', 'b'):
            (tmp_path / d).mkdir()
        monkeypatch.chdir(tmp_path / 'a')
    else:
        options['spill_dir'] = tmp_path / 'spill'

    with pg_proxy(PG_SERVER_URL) as first, pg_proxy(PG_SERVER_URL) as second:
        url = via_proxy(pg_schema_url, first)
        with open_tracker(url, **options) as tracker:
            raised = track_all(tracker, reached)
            assert tracker.flush(timeout=30)
            first.cut()
            raised += track_all(tracker, spilled)
            assert not tracker.close(timeout=2), 'close() returned True while the database was down'
        assert raised == []
        assert len(table_ids(pg_schema_url)) == len(reached)

        if spelling == 'another port':
            next_url = via_proxy(pg_schema_url, second)  # the first proxy stays cut
        else:
            first.restore()
            next_url = {
                'localhost': via_proxy(pg_schema_url, first, host='localhost'),
                'extra query parameter': f'{url}&application_name=pai-usage-faults',
                'another directory': url,
            }[spelling]
        if spelling == 'another directory':
            monkeypatch.chdir(tmp_path / 'b')
        assert next_url != url or spelling == 'another directory'
        with open_tracker(next_url, **options) as replayer:
            wait_for_rows(pg_schema_url, [r['id'] for r in spilled], what=f'the replay under {spelling!r}')
            assert replayer.close(timeout=30)
    assert_exactly_once(pg_schema_url, [r['id'] for r in reached + spilled])
    if spelling == 'another directory':
        assert not any((tmp_path / 'a').iterdir()), 'the default spill directory is not the working directory'


def test_records_for_another_database_under_the_same_url_are_never_replayed_into_this_one(tmp_path: Path) -> None:
    """The same URL first reached one database, spilled, then reached another (here: the role's default schema
    changed; a tunnel to another server is the same): the spilled records wait for their own database."""
    tag = uuid.uuid4().hex[:8]
    role, first_schema, second_schema = f'pai_role_{tag}', f'pai_first_{tag}', f'pai_second_{tag}'
    admin = sa.create_engine(PG_SERVER_URL)
    with admin.begin() as conn:
        # Superuser: the server's identity (`pg_control_system()`) is readable, as for the usual owner role.
        conn.exec_driver_sql(f'CREATE ROLE {role} LOGIN SUPERUSER')
        conn.exec_driver_sql(f'CREATE SCHEMA {first_schema}')
        conn.exec_driver_sql(f'CREATE SCHEMA {second_schema}')
        conn.exec_driver_sql(f'ALTER ROLE {role} SET search_path = {first_schema}')
    first_url, second_url = (
        f'{PG_SERVER_URL}?options={quote(f"-csearch_path={s}")}' for s in (first_schema, second_schema)
    )
    reached, spilled, later = ([billing(i) for i in range(n)] for n in (100, 300, 50))
    options: dict[str, Any] = {**FAST, 'spill_dir': tmp_path / 'spill'}
    try:
        with pg_proxy(PG_SERVER_URL) as proxy:
            url = via_proxy(PG_SERVER_URL.replace('postgres@', f'{role}@'), proxy)
            with open_tracker(url, **options) as tracker:
                assert track_all(tracker, reached) == [] and tracker.flush(timeout=30)
                proxy.cut()
                assert track_all(tracker, spilled) == []
                assert not tracker.close(timeout=2)
            with admin.begin() as conn:
                conn.exec_driver_sql(f'ALTER ROLE {role} SET search_path = {second_schema}')
            proxy.restore()
            for _ in range(2):  # a second start is no different
                with open_tracker(url, **options) as other:
                    assert track_all(other, later) == []
                    assert other.close(timeout=30), "this process's own records reach its database"
            assert set(table_ids(second_url)) == {str(r['id']) for r in later}
            assert_exactly_once(first_url, [r['id'] for r in reached])
            with admin.begin() as conn:
                conn.exec_driver_sql(f'ALTER ROLE {role} SET search_path = {first_schema}')
            with open_tracker(url, **options) as back:
                wait_for_rows(first_url, [r['id'] for r in spilled], what='the replay into their own database')
                assert back.close(timeout=30)
        assert_exactly_once(first_url, [r['id'] for r in reached + spilled])
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS {first_schema} CASCADE')
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS {second_schema} CASCADE')
            conn.exec_driver_sql(f'DROP ROLE IF EXISTS {role}')
        admin.dispose()


WRONG_PORT_CHILD = """
import os, signal, sys
from pai_usage import UsageTracker

url, spill_dir = sys.argv[1:]
tracker = UsageTracker(url, spill_dir=spill_dir)  # the default `spill_after`: the records stay in the journal
for i in range(300):
    tracker.track(provider='openai', model='gpt-4o', organization_id='org-stranded', input_tokens=i + 1)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_journal_for_the_same_database_under_a_key_that_never_connected_is_warned_about(
    pg_schema_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A process that never reached its database (a wrong port) leaves only journal segments, which name no
    server: the next tracker of a database of that name says they wait, and leaves them alone."""
    spill = tmp_path / 'spill'
    with pg_proxy(PG_SERVER_URL) as dead:
        dead.cut()
        wrong = via_proxy(pg_schema_url, dead)
        child = spawn(WRONG_PORT_CHILD, wrong, str(spill), log=tmp_path / 'child.log')
        assert child.wait(60) == -signal.SIGKILL, (tmp_path / 'child.log').read_text()[-2000:]
    assert [p.name for p in spill.rglob('journal-*.bin')], 'the child left no journal'
    caplog.set_level(logging.WARNING, logger='pai_usage')
    with open_tracker(pg_schema_url, spill_dir=spill) as tracker:
        assert tracker.flush(timeout=30)
        assert tracker.stats().replayed == 0  # not this key's: another server may hold a database of that name
    warned = [r.getMessage() for r in caplog.records if 'may be for this database' in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert str(next(spill.rglob('journal-*.bin')).parent) in warned[0]
    assert table_ids(pg_schema_url) == {}
