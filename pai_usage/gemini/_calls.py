"""The SDK's own HTTP calls inside one tracked call, for the calls its response does not account for.

With automatic function calling, `generate_content` calls the model, runs the Python functions it asked for,
and calls it again, up to `maximum_remote_calls` times; the response it returns carries only the last call's
`usage_metadata`. Google bills every call. So the tracked methods watch the SDK's per-call method
(`_generate_content`, the one that sends a request) on the client they use, and record each call it made.
The watch is a pass-through outside a tracked call: other code sharing the client is not affected.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Generator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from google.genai import types

from .._locks import ForkSafeLock
from .._log import RateLimitedLog

__all__ = ('SdkCall', 'sdk_calls')

_log = RateLimitedLog()
_METHOD = '_generate_content'
_MARK = '_pai_usage_watched'
_lock = ForkSafeLock()


@dataclass(frozen=True, slots=True)
class SdkCall:
    """One request the SDK sent, and its response."""

    response: types.GenerateContentResponse
    duration_ms: int


_current: ContextVar[list[SdkCall] | None] = ContextVar('pai_usage_gemini_calls', default=None)


def _note(response: object, started: float) -> None:
    calls = _current.get()
    if calls is not None and isinstance(response, types.GenerateContentResponse):
        calls.append(SdkCall(response, max(round((time.perf_counter() - started) * 1000), 0)))


def _watch(models: object) -> bool:
    """Install the pass-through on `models` (`client.models` or `client.aio.models`) once; False if it can't."""
    if getattr(models, _MARK, False):
        return True
    with _lock:
        if getattr(models, _MARK, False):
            return True
        method: Any = getattr(models, _METHOD, None)
        if method is None:
            _log.warning(
                'gemini:sdk-calls',
                'pai-usage: this google-genai has no %s: calls made by automatic function calling may be missed',
                _METHOD,
            )
            return False
        if inspect.iscoroutinefunction(method):

            @functools.wraps(method)
            async def watched_async(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                response = await method(*args, **kwargs)
                _note(response, started)
                return response

            wrapper: Any = watched_async
        else:

            @functools.wraps(method)
            def watched(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                response = method(*args, **kwargs)
                _note(response, started)
                return response

            wrapper = watched
        try:
            setattr(models, _METHOD, wrapper)
            setattr(models, _MARK, True)
        except (AttributeError, TypeError):  # an object that takes no attributes: the final response only
            return False
    return True


@contextmanager
def sdk_calls(models: object) -> Generator[list[SdkCall] | None]:
    """The calls the SDK sends through `models` inside the block, in order; None if they can't be watched."""
    if not _watch(models):
        yield None
        return
    calls: list[SdkCall] = []
    token = _current.set(calls)
    try:
        yield calls
    finally:
        _current.reset(token)
