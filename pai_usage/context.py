"""The ambient usage context: who is spending, and in which agent run.

The PydanticAI capability sets it for the duration of a run, so that sub-agents and direct API calls
made inside the run's tools (e.g. `GeminiService`) inherit the run's attribution and link to it.
Applications can set it themselves around any block of code with `usage_context(...)`.

Context variables follow `await`, `asyncio.create_task` and `asyncio.to_thread`, but not
`loop.run_in_executor` or `ThreadPoolExecutor.submit`: wrap the function with `run_in_thread` (or
`with_current_context`) so that calls made in the worker thread keep the run's attribution.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator
from contextlib import contextmanager
from contextvars import ContextVar, copy_context
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from ._log import RateLimitedLog
from .record import normalize_label

if TYPE_CHECKING:
    from .tracker import UsageTracker

__all__ = ('UsageContext', 'current_usage_context', 'run_in_thread', 'usage_context', 'with_current_context')

_P = ParamSpec('_P')
_R = TypeVar('_R')
_log = RateLimitedLog()


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageContext:
    """Attribution that applies to every usage event recorded inside it."""

    organization_id: str | None = None
    """Organization billed for events in this context."""
    user_id: str | None = None
    """User who caused events in this context."""
    run_id: str | None = None
    """The agent run in progress, if any: direct calls made inside it are linked to it."""
    agent_name: str | None = None
    """Name of the agent whose run is in progress."""
    tracker: UsageTracker | None = None
    """Tracker to record to, when the caller names none."""
    metadata: dict[str, Any] | None = None
    """Extra metadata merged into each event recorded in this context."""


_current: ContextVar[UsageContext | None] = ContextVar('pai_usage_context', default=None)


def current_usage_context() -> UsageContext | None:
    """The innermost active `UsageContext`, or None."""
    return _current.get()


def attribution_fields(deps: object, *, strict: bool = True) -> dict[str, Any]:
    """The `UsageContext` fields a deps object names: its `organization_id` and `user_id` (and `tracker`).

    With `strict`, raises `TypeError` for an object with neither attribute: a mistake to report where it is
    made, not in the middle of a later API call.
    """
    if strict and not (has_attribute(deps, 'organization_id') or has_attribute(deps, 'user_id')):
        raise TypeError(
            f'expected a UsageContext or deps with `organization_id` / `user_id` (e.g. UsageDeps), got {deps!r}'
        )
    fields: dict[str, Any] = {
        'organization_id': payer_label(read_attribute(deps, 'organization_id')),
        'user_id': payer_label(read_attribute(deps, 'user_id')),
    }
    if (tracker := read_attribute(deps, 'tracker')) is not None:
        fields['tracker'] = tracker
    return fields


def read_attribute(deps: object, name: str, on_error: Callable[[], object] | None = None) -> Any:
    """`deps.name`, or None if it is missing or reading it fails (an ORM's lazy attribute, a raising property).

    A failure is logged (rate-limited) and passed to `on_error` (to count it), never raised: attribution must
    not break the product's call.
    """
    try:
        return getattr(deps, name, None)
    except Exception as exc:
        if on_error is not None:
            on_error()
        _log.error(f'deps:{name}', 'pai-usage: reading deps.%s failed, recorded as NULL: %r', name, exc, exc_info=True)
        return None


def has_attribute(deps: object, name: str) -> bool:
    """Whether `deps` has `name`; True for an attribute that exists but fails to read (`read_attribute` logs it)."""
    try:
        return hasattr(deps, name)
    except Exception:
        return True


def payer_label(value: object) -> str | None:
    """An id as attribution reads it off deps: None and `''` name no one, so the enclosing context's id applies.

    Anything else is the id, as text (`42` is `'42'`, as the ledger stores it).
    """
    return None if value is None or value == '' else str(value)


def inherited_payer(
    outer: UsageContext, organization_id: str | None, user_id: str | None
) -> tuple[str | None, str | None]:
    """The organization and user of a block inside `outer` that names only some of them.

    A missing field is inherited, except the user of another organization: a block (or a run's deps) that
    names organization B keeps no user of organization A.
    """
    if organization_id is None:
        return outer.organization_id, user_id or outer.user_id
    # Compared as the ledger stores them: `' acme'` and `'acme'` are one organization there.
    if user_id is None and normalize_label(organization_id) == normalize_label(outer.organization_id):
        return organization_id, outer.user_id
    return organization_id, user_id


@contextmanager
def usage_context(context: object | None = None, /, **fields: Any) -> Generator[UsageContext]:
    """Make a usage context current for the duration of the block.

    `context` is a `UsageContext`, or deps with `organization_id` / `user_id` (e.g. `UsageDeps`), which set
    those fields. Fields not given are inherited from the enclosing context, so a nested block can add a user
    to an organization set further out, and a block inside an agent run stays linked to the run.
    """
    outer = _current.get()
    if context is not None and not isinstance(context, UsageContext):
        fields = {**attribution_fields(context), **fields}
        context = None
    if context is None:
        if outer is not None:
            organization_id, user_id = inherited_payer(outer, fields.get('organization_id'), fields.get('user_id'))
            fields = {**fields, 'organization_id': organization_id, 'user_id': user_id}
        context = replace(outer, **fields) if outer is not None else UsageContext(**fields)
    elif fields:
        context = replace(context, **fields)
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def with_current_context(func: Callable[_P, _R], /) -> Callable[_P, _R]:
    """Wrap `func` to run, in whichever thread calls it, in a copy of the context current *now*.

    The usage context (organization, user, run id) set by the calling run thus reaches a worker thread:
    `pool.map(with_current_context(fn), items)`. Each call gets its own copy, so concurrent calls are fine.
    """
    context = copy_context()

    @functools.wraps(func)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        # `Context.run` refuses a context already entered in another thread: run each call in its own copy.
        return context.copy().run(func, *args, **kwargs)

    return wrapper


def run_in_thread(func: Callable[_P, _R], /, *args: _P.args, **kwargs: _P.kwargs) -> Callable[[], _R]:
    """A zero-argument callable running `func(*args, **kwargs)` in a copy of the current context.

    For executors, which drop context variables (unlike `asyncio.to_thread`):

    ```python
    await loop.run_in_executor(None, pai_usage.run_in_thread(service.analyze_text, text))
    pool.submit(pai_usage.run_in_thread(service.generate_image, prompt))
    ```
    """
    bound = with_current_context(func)
    return functools.partial(bound, *args, **kwargs)
