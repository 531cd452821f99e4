"""Warnings for developer mistakes: loud in development, quiet in production.

A typo in a `track()` field, deps without attribution or a model without a price are mistakes in the
application's code, so they are reported with `warnings.warn` (categories below, re-exported from `pai_usage`),
once per kind and process, as pydantic-ai does for cost failures: test suites with `-W error` catch them, and
production logs see them once. Runtime faults (a database down, a record lost) stay in logging, `stats()` and
OTel, never here.

Opt-in strict mode (`set_strict(True)` or `PAI_USAGE_STRICT=1`) raises them as exceptions instead.

Mistakes found in the writer thread (an unpriced model) are held and reported on the caller's thread at its
next `track()`, `flush()` or `close()`, so that warning filters and strict mode apply where the developer is.
The capability's and the Gemini mixin's own records never report them: those calls never raise into a run.
"""

from __future__ import annotations

import os
import warnings
import weakref

from ._locks import ForkSafeLock

__all__ = (
    'MissingAttributionWarning',
    'PaiUsageWarning',
    'UnknownFieldWarning',
    'UnpricedModelWarning',
    'set_strict',
)

STRICT_ENV_VAR = 'PAI_USAGE_STRICT'
"""Set to `1` to raise pai-usage's warnings as errors."""


class PaiUsageWarning(UserWarning):
    """Base class of pai-usage's warnings: a mistake in the code that uses pai-usage."""


class UnknownFieldWarning(PaiUsageWarning):
    """`track()` was given a field that `UsageRecord` does not have (a typo?); its value was discarded."""


class MissingAttributionWarning(PaiUsageWarning):
    """An agent ran with deps that carry no `user_id` / `organization_id`: its usage is recorded unattributed."""


class UnpricedModelWarning(PaiUsageWarning):
    """A model (or unit) has no known price: its usage is recorded with `cost_usd = NULL`."""


_lock = ForkSafeLock()
_emitted: set[str] = set()
_pending: list[tuple[str, type[PaiUsageWarning]]] = []
_strict: bool | None = None
# Held weakly: a class defined per request or per test is freed, and a new one may reuse its id().
_types_warned: weakref.WeakKeyDictionary[type, set[str]] = weakref.WeakKeyDictionary()


def set_strict(strict: bool | None = True) -> None:
    """Raise pai-usage's warnings as exceptions (`True`), warn (`False`), or follow `$PAI_USAGE_STRICT` (`None`)."""
    global _strict
    _strict = strict


def is_strict() -> bool:
    """Whether strict mode is on."""
    if _strict is not None:
        return _strict
    return os.environ.get(STRICT_ENV_VAR, '').strip().lower() in ('1', 'true', 'yes')


def warn_once(key: str, message: str, category: type[PaiUsageWarning], *, stacklevel: int = 2) -> None:
    """Warn (or raise, in strict mode) unless a warning of this `key` was already given in this process."""
    with _lock:
        if key in _emitted:
            return
        _emitted.add(key)
    emit(message, category, stacklevel=stacklevel + 1)


def first_for_type(kind: str, owner: type) -> bool:
    """Whether this is the first `kind` of mistake reported for `owner` in this process (then it is remembered)."""
    with _lock:
        kinds = _types_warned.get(owner)
        if kinds is None:
            kinds = _types_warned[owner] = set()
        elif kind in kinds:
            return False
        kinds.add(kind)
    return True


def emit(message: str, category: type[PaiUsageWarning], *, stacklevel: int = 2) -> None:
    """Warn now (or raise, in strict mode), whatever was reported before: the caller decides it is the first."""
    if is_strict():
        raise category(message)
    warnings.warn(message, category, stacklevel=stacklevel + 1)


def warn_later(key: str, message: str, category: type[PaiUsageWarning]) -> None:
    """From a background thread: hold a warning for the caller's thread (see `emit_pending`)."""
    with _lock:
        if key in _emitted:
            return
        _emitted.add(key)
        _pending.append((message, category))


def has_pending() -> bool:
    """Whether warnings are waiting for `emit_pending` (a cheap check for the hot path)."""
    return bool(_pending)


def emit_pending(*, stacklevel: int = 2) -> None:
    """Report the warnings held by `warn_later`, on the calling thread."""
    with _lock:
        held = list(_pending)
        _pending.clear()
    for message, category in held:
        emit(message, category, stacklevel=stacklevel + 1)


def reset() -> None:
    """Forget which warnings were given, so that each is given again (used by `pai_usage.testing` per test)."""
    with _lock:
        _emitted.clear()
        _pending.clear()
        _types_warned.clear()
