"""A throwaway PostgreSQL cluster that a test may crash, stop and start: never the machine's shared server.

`initdb` into a temporary directory and `pg_ctl` on a free loopback port, both as the `postgres` user (the
server refuses to run as root). Everything is stopped by the postmaster's own pid and removed at the end.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

__all__ = ('PgCluster', 'pg_cluster')

_USER = 'postgres'


def _as_postgres(*argv: str) -> list[str]:
    """`argv` run as the `postgres` user when we are root (as on CI machines), else as ourselves."""
    if os.geteuid() != 0:
        return list(argv)
    if shutil.which('runuser'):
        return ['runuser', '-u', _USER, '--', *argv]
    return ['su', _USER, '-c', ' '.join(argv)]  # pragma: no cover - paths here contain no spaces


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@dataclass(eq=False)
class PgCluster:
    """One private cluster in `root`, listening on `127.0.0.1:port` with trust auth for `postgres`.

    Copies made by `with_new_database()` share the server: stopping one stops them all.
    """

    root: Path
    """The temporary directory that holds the data directory and the server log."""
    port: int
    """The loopback port the server listens on."""
    database: str = 'postgres'
    """The database `url` names."""

    @property
    def data(self) -> Path:
        return self.root / 'data'

    @property
    def url(self) -> str:
        """A SQLAlchemy URL for the `postgres` database of this cluster."""
        return f'postgresql+psycopg://postgres@127.0.0.1:{self.port}/{self.database}'

    def with_new_database(self) -> PgCluster:
        """The same cluster, its `url` naming a database created just now (so tests sharing it never meet)."""
        name = f'pai_test_{uuid.uuid4().hex[:12]}'
        engine = sa.create_engine(self.url, isolation_level='AUTOCOMMIT')
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE {name}')
        finally:
            engine.dispose()
        return dataclasses.replace(self, database=name)

    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        try:
            return int((self.data / 'postmaster.pid').read_text().split('\n', 1)[0])
        except (OSError, ValueError):
            return None

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        subprocess.run(
            _as_postgres(
                'pg_ctl',
                '-D',
                str(self.data),
                '-l',
                str(self.root / 'server.log'),
                '-w',
                '-t',
                '60',
                '-o',
                f'-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} -c fsync=off',
                'start',
            ),
            check=True,
            capture_output=True,
        )

    def crash(self) -> None:
        """Kill the server as a crash or an OOM kill would (SIGQUIT: immediate shutdown, no checkpoint)."""
        self._signal(signal.SIGQUIT)

    def stop(self) -> None:
        """Fast shutdown: active connections are terminated."""
        self._signal(signal.SIGINT)

    def _signal(self, signum: int) -> None:
        pid = self.pid()
        if pid is None:
            return
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:  # pragma: no cover - a server that ignores SIGQUIT
            os.kill(pid, signal.SIGKILL)
        # An immediate shutdown leaves the pid file behind; `pg_ctl start` checks whether that pid is alive.
        (self.data / 'postmaster.pid').unlink(missing_ok=True)


@contextmanager
def pg_cluster() -> Iterator[PgCluster]:
    """A fresh, running cluster; stopped (by its pid) and deleted afterwards."""
    # Not pytest's tmp_path: its parents are private to root, and the server runs as `postgres`.
    root = Path(tempfile.mkdtemp(prefix='pai-pgcluster-'))
    if os.geteuid() == 0:
        shutil.chown(root, _USER)
    cluster = PgCluster(root, _free_port())
    try:
        subprocess.run(
            _as_postgres('initdb', '-D', str(cluster.data), '-A', 'trust', '-U', _USER, '-E', 'UTF8', '--no-sync'),
            check=True,
            capture_output=True,
        )
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
