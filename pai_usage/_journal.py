"""The write-ahead journal: `track()` copies each record into a memory-mapped file before it is queued.

A record in a shared memory mapping is in the kernel's page cache as soon as the copy returns, so it survives
SIGKILL, an OOM kill or a crash of the interpreter (only a power loss or a lost disk can take it, before the
kernel writes the page back). The copy holds the GIL and makes no system call, which keeps `track()` cheap.

Each process appends to its own segment files, `journal-<host>-<pid>-<rand>-<n>.bin`, and holds an exclusive
`flock` on each while it is open. A segment is a 16-byte header, then records, each a 4-byte little-endian
length and a payload (`marshal` of the record's fields with UUIDs, datetimes and Decimals as strings, or a
JSON line when a value needs a fallback); a zero length ends the segment. The payload is copied before its
length, so a reader never sees a length whose bytes are not there yet.

The writer settles every journalled record (written, rejected, spilled or dropped) and deletes a segment when
it is full and all its records are settled. A segment whose process died (its lock is free) is replayed by
the next tracker on the same spill directory, like a spill file; inserts are idempotent on the record id, so
records that were already written are stored once.
"""

from __future__ import annotations

import errno
import fcntl
import json
import marshal
import mmap
import os
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeGuard, cast

__all__ = ('JOURNAL_PREFIX', 'Journal', 'Segment', 'read_segment')

JOURNAL_PREFIX = 'journal-'
"""File names of journal segments start with this."""
_MAGIC = b'PAIJRNL1'
_HEADER = 16
_LENGTH = struct.Struct('<I')
_pack_length = _LENGTH.pack_into
_MARSHAL, _JSON = b'm', b'j'
_PLAIN = (str, int, float, bool, type(None))
"""Types `marshal` takes as they are. `encode_payload` turns the others of `id`, `cost_usd` and `units` (UUID,
Decimal) into strings first (a `uuid.UUID` id into its 16 bytes)."""


def _as_text(value: object) -> object:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, uuid.UUID | Decimal):
        return str(value)
    return value


def _json_default(value: object) -> object:
    if isinstance(value, set | frozenset | tuple):
        return list(cast('Iterable[object]', value))
    converted = _as_text(value)
    return converted if converted is not value else repr(value)


_EXACT_SECONDS = 2.0**32
_RAW = 'as-given'
_WRAPPED = (float, tuple, list)
"""`created_at` types wrapped as `(_RAW, value)`: a bare float in a payload is our timestamp, in seconds; a
sequence could look like the wrapper (JSON payloads turn it into a list)."""


def _is_wrapped(value: object) -> TypeGuard[Sequence[object]]:
    """Whether a decoded `created_at` is `(_RAW, value)`, as `encode_payload` wraps one the caller gave."""
    if type(value) not in (tuple, list):
        return False
    items = cast('Sequence[object]', value)
    return len(items) == 2 and items[0] == _RAW


def _aware(value: datetime) -> bool:
    try:
        return value.utcoffset() is not None
    except Exception:  # a tzinfo that fails: the record keeps its datetime, and validation refuses it
        return False


_RETRY_SECONDS = 1.0
"""How long appends wait after a segment could not be created before trying again."""


def encode_payload(item: dict[str, Any]) -> bytes:
    """The journal payload of one record's fields; never raises for a dict of any values."""
    # Always a copy: `track()` sets `created_at`, so there is nearly always something to convert.
    converted = item.copy()
    created = converted.get('created_at')
    if type(created) is datetime:
        if created.tzinfo is UTC or _aware(created):
            # A float timestamp is much cheaper than `isoformat()`, and exact to the microsecond while doubles
            # are less than a microsecond apart: within 2**32 s of 1970 (1834 to 2106). Beyond, the exact text.
            stamp = created.timestamp()
            converted['created_at'] = stamp if -_EXACT_SECONDS < stamp < _EXACT_SECONDS else created.isoformat()
    elif type(created) in _WRAPPED:
        # A float the caller gave (milliseconds, say) is not one of our stamps: kept as given, marked so.
        converted['created_at'] = (_RAW, created)
    record_id = converted.get('id')
    if type(record_id) is uuid.UUID:
        # Its 16 bytes: `str()` of a UUID costs `track()` ten times more. `decode_payload` turns them back.
        converted['id'] = record_id.bytes
    # Unrolled: a loop over the names costs more than the conversions (mostly a Decimal cost or nothing).
    value = converted.get('cost_usd')
    if value is not None and type(value) not in _PLAIN:
        converted['cost_usd'] = _as_text(value)
    value = converted.get('units')
    if value is not None and type(value) not in _PLAIN:
        converted['units'] = _as_text(value)
    if type(record_id) not in _PLAIN and type(record_id) is not uuid.UUID:
        converted['id'] = _as_text(record_id)
    try:
        return _MARSHAL + marshal.dumps(converted)
    except ValueError:
        pass
    # e.g. metadata holding a datetime, a cycle or 5000 levels: made JSON-safe now, as validation would.
    from .record import safe_metadata  # the record module imports pydantic: only on this rare path

    converted = dict(converted)
    if 'metadata' in converted:
        converted['metadata'] = safe_metadata(converted['metadata'])
    try:
        return _MARSHAL + marshal.dumps(converted)
    except ValueError:
        pass
    if type(record_id) is uuid.UUID:
        converted['id'] = str(record_id)  # JSON has no bytes (`_json_default` would keep only their repr)
    return _JSON + json.dumps(converted, default=_json_default, skipkeys=True).encode()


def decode_payload(payload: bytes) -> dict[str, Any]:
    """The fields a payload holds; raises `ValueError` when it is not one of ours."""
    kind, body = payload[:1], payload[1:]
    try:
        value = marshal.loads(body) if kind == _MARSHAL else json.loads(body) if kind == _JSON else None
    except (EOFError, TypeError, ValueError) as exc:
        raise ValueError(f'corrupt journal record: {exc}') from None
    if not isinstance(value, dict):
        raise ValueError('corrupt journal record: not a mapping')
    fields = cast('dict[str, Any]', value)
    record_id = fields.get('id')
    if type(record_id) is bytes and len(record_id) == 16:
        fields['id'] = uuid.UUID(bytes=record_id)  # as `encode_payload` stored it (16 bytes mean this to pydantic too)
    created: object = fields.get('created_at')
    if _is_wrapped(created):
        fields['created_at'] = created[1]
    elif type(created) is float:
        try:
            fields['created_at'] = datetime.fromtimestamp(created, UTC)
        except (OverflowError, OSError, ValueError):
            # Beyond `datetime` in UTC (year 1 east of UTC): not a number, which validation would take for
            # milliseconds, but a text it rejects, for this record alone.
            fields['created_at'] = f'out of range: {created!r} s since 1970'
    return fields


@dataclass(eq=False)
class Segment:
    """One journal file of this process, mapped in memory."""

    path: Path
    """The file."""
    fd: int
    """The open descriptor that holds the file's lock."""
    mm: mmap.mmap
    """The shared mapping records are copied into."""
    pos: int = _HEADER
    """Where the next record goes."""
    appended: int = 0
    """Records copied in (under the journal's lock)."""
    settled: int = 0
    """Records the writer is done with (under the journal's lock)."""
    sealed: bool = False
    """Full: no record will be appended any more."""

    def done(self) -> bool:
        """Whether the segment is full and every record in it is settled."""
        return self.sealed and self.settled >= self.appended

    def close(self, *, delete: bool) -> None:
        """Unmap and close; with `delete`, remove the file first (while still holding its lock)."""
        if delete:
            self.path.unlink(missing_ok=True)
        try:
            self.mm.close()
        except BufferError:  # pragma: no cover - a reader still holds a view
            pass
        os.close(self.fd)


_MADV_POPULATE_WRITE = getattr(mmap, 'MADV_POPULATE_WRITE', 23)  # Linux 5.14+; Python 3.11 lacks the name


def _populate(mm: mmap.mmap) -> None:
    """Fault the whole mapping in now, once per segment.

    Otherwise every 4 KiB page's first write faults inside `track()` (measured: the p99 about doubled).
    """
    try:
        mm.madvise(_MADV_POPULATE_WRITE)
    except (OSError, ValueError, AttributeError):  # an older kernel or another OS: fault pages as they come
        pass


def read_segment(path: Path) -> Iterator[dict[str, Any] | ValueError]:
    """The records of a segment file, in order.

    A record whose payload cannot be decoded is yielded as its `ValueError` and reading goes on (its length is
    intact); a torn or missing length ends the segment.
    """
    with open(path, 'rb') as f:
        data = f.read()
    if data[: len(_MAGIC)] != _MAGIC:
        yield ValueError('not a journal segment')
        return
    pos = _HEADER
    while pos + _LENGTH.size <= len(data):
        (length,) = _LENGTH.unpack_from(data, pos)
        if length == 0:
            return
        start = pos + _LENGTH.size
        if start + length > len(data):
            yield ValueError('torn journal record')
            return
        try:
            yield decode_payload(data[start : start + length])
        except ValueError as exc:
            yield exc
        pos = start + length


@dataclass(eq=False)
class Journal:
    """This process's journal segments in `path` (the tracker's spill directory)."""

    path: Path
    """The directory."""
    segment_bytes: int = 8 << 20
    """Size of one segment file (sparse until written)."""
    on_first_segment: Callable[[], object] | None = None
    """Called once, as this process creates its first segment (`SpillDir.write_hint`: segments have no header)."""
    lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    """Held to append, to roll to a new segment and to settle records."""
    _current: Segment | None = field(default=None, init=False)
    _sealed: list[Segment] = field(default_factory=list[Segment], init=False)
    _serial: int = field(default=0, init=False)
    _tag: str = field(default='', init=False)
    _retry_at: float = field(default=0.0, init=False)

    def append(self, item: dict[str, Any]) -> Segment:
        """Copy one record in; returns its segment. Raises `OSError` (e.g. disk full) when it cannot."""
        payload = encode_payload(item)
        size = _LENGTH.size + len(payload)
        with self.lock:
            seg = self._current
            if seg is None or seg.pos + size + _LENGTH.size > len(seg.mm):
                now = time.monotonic()
                if now < self._retry_at:
                    # A new segment failed less than a second ago (a full disk): not a file system call per
                    # `track()` until then; the records go on in memory.
                    raise OSError(errno.ENOSPC, 'the journal could not take a new segment; retrying shortly')
                try:
                    seg = self._roll(size)
                except OSError:
                    self._retry_at = now + _RETRY_SECONDS
                    raise
            pos = seg.pos
            mm = seg.mm
            # The payload first, then its length: a reader never sees a length without its bytes.
            mm[pos + 4 : pos + size] = payload
            _pack_length(mm, pos, size - 4)
            seg.pos = pos + size
            seg.appended += 1
        return seg

    def settle(self, counts: dict[Segment, int]) -> None:
        """The writer is done with `counts[seg]` more records of each segment: delete segments that are done."""
        finished: list[Segment] = []
        with self.lock:
            for seg, n in counts.items():
                seg.settled += n
                if seg.done() and seg in self._sealed:
                    self._sealed.remove(seg)
                    finished.append(seg)
        for seg in finished:
            try:
                seg.close(delete=True)
            except OSError:  # pragma: no cover - the file is gone already
                pass

    def close(self) -> bool:
        """Seal and close every segment, deleting those whose records are all settled.

        Returns whether all were deleted (False leaves records for the next start to replay).
        """
        with self.lock:
            segments = [*self._sealed, *([self._current] if self._current is not None else [])]
            self._sealed, self._current = [], None
        clean = True
        for seg in segments:
            seg.sealed = True
            done = seg.done()
            clean = clean and done
            try:
                seg.close(delete=done)
            except OSError:  # pragma: no cover
                clean = False
        return clean

    def own_names(self) -> set[str]:
        """File names of this process's open segments (never claimed for replay while we hold them)."""
        with self.lock:
            return {s.path.name for s in (*self._sealed, *([self._current] if self._current is not None else []))}

    def after_fork(self) -> None:
        """In a forked child: let go of the parent's segments without touching their files (the parent owns them).

        The child's copies of their descriptors are closed: while open they would share the parent's `flock`, and
        a SIGKILLed parent's segments could not be replayed until every child had exited.
        """
        for seg in (*self._sealed, *([self._current] if self._current is not None else [])):
            try:
                seg.close(delete=False)
            except OSError:  # pragma: no cover - already closed
                pass
        self.lock = threading.Lock()
        self._current = None
        self._sealed = []
        self._serial = 0
        self._tag = ''

    def _roll(self, size: int) -> Segment:
        old = self._current
        if old is not None:
            old.sealed = True
            try:
                # Full: its pages leave this process's RSS (they stay in the file and the page cache).
                old.mm.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError, AttributeError):  # pragma: no cover - another OS
                pass
            if old.done():
                old.close(delete=True)
            else:
                self._sealed.append(old)
        self._current = None
        if not self._tag:
            self._tag = f'{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}'
        self._serial += 1
        length = max(self.segment_bytes, _HEADER + 2 * size + 2 * _LENGTH.size)
        path = self.path / f'{JOURNAL_PREFIX}{self._tag}-{self._serial:06d}.bin'
        hidden = self.path / f'.{path.name}.tmp'
        self.path.mkdir(parents=True, exist_ok=True)
        if self._serial == 1 and self.on_first_segment is not None:
            self.on_first_segment()
        fd = os.open(hidden, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            # Locked before it is visible under its real name: no replayer can claim a live segment.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.posix_fallocate(fd, 0, length)  # blocks reserved now: a full disk fails here, not as SIGBUS later
            mm = mmap.mmap(fd, length)
            _populate(mm)
            mm[: len(_MAGIC)] = _MAGIC
            os.rename(hidden, path)
        except BaseException:
            os.close(fd)
            hidden.unlink(missing_ok=True)
            raise
        seg = self._current = Segment(path, fd, mm)
        return seg
