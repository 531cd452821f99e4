"""A loopback TCP proxy in front of PostgreSQL that a test can cut, stall and restore.

Never stop the machine's shared server to fake an outage: point the tracker at this proxy instead.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

__all__ = ('PgProxy', 'pg_proxy', 'via_proxy')


@dataclass(eq=False)
class PgProxy:
    """Forwards `127.0.0.1:<port>` to `upstream`. `cut()` drops every connection and refuses new ones
    (until `restore()`); `stall()` keeps connections open but stops forwarding bytes."""

    upstream: tuple[str, int]
    port: int = 0
    _listener: socket.socket = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _conns: set[socket.socket] = field(default_factory=set[socket.socket], init=False)
    _flowing: threading.Event = field(default_factory=threading.Event, init=False)
    _stalled: set[socket.socket] = field(default_factory=set[socket.socket], init=False)
    _cut: bool = field(default=False, init=False)
    _closed: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self._listener = socket.create_server(('127.0.0.1', self.port))
        self.port = self._listener.getsockname()[1]
        self._flowing.set()
        threading.Thread(target=self._accept, name='pgproxy-accept', daemon=True).start()

    def cut(self) -> None:
        """Drop every open connection and refuse (close at once) new ones."""
        with self._lock:
            self._cut = True
            conns, self._conns = self._conns, set()
        for conn in conns:
            _kill(conn)

    def stall(self) -> None:
        """Stop forwarding bytes, leaving connections open (a hung network or server)."""
        self._flowing.clear()

    def stall_existing(self) -> None:
        """Stop forwarding bytes on the connections open now (a NAT or firewall that silently dropped them),
        while new connections flow normally."""
        with self._lock:
            self._stalled.update(self._conns)

    def connections(self) -> int:
        """Client connections open through the proxy now."""
        with self._lock:
            return len(self._conns) // 2

    def restore(self) -> None:
        """Accept and forward again."""
        with self._lock:
            self._cut = False
            self._stalled.clear()
        self._flowing.set()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._flowing.set()
        _kill(self._listener)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refuse = self._cut
            if refuse:
                _kill(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                _kill(client)
                continue
            with self._lock:
                self._conns.update((client, server))
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), name='pgproxy-pump', daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self._flowing.wait()
                while self._is_stalled(src):
                    time.sleep(0.01)
                with self._lock:
                    alive = src in self._conns
                if not alive:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)
                self._stalled.discard(src)
                self._stalled.discard(dst)
            _kill(src)
            _kill(dst)

    def _is_stalled(self, sock: socket.socket) -> bool:
        with self._lock:
            return sock in self._stalled and sock in self._conns and not self._closed


def _kill(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def via_proxy(url: str, proxy: PgProxy, *, host: str = '127.0.0.1') -> str:
    """`url` with its host and port replaced by the proxy's (spelled `host`, e.g. `localhost`)."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition('@')[0]
    netloc = f'{userinfo}@{host}:{proxy.port}' if userinfo else f'{host}:{proxy.port}'
    return urlunsplit(parts._replace(netloc=netloc))


@contextmanager
def pg_proxy(url: str) -> Iterator[PgProxy]:
    """A proxy in front of the server `url` names, closed afterwards."""
    parts = urlsplit(url)
    proxy = PgProxy((parts.hostname or '127.0.0.1', parts.port or 5432))
    try:
        yield proxy
    finally:
        proxy.close()
