"""The ambient usage context: who is spending, and in which agent run.

The PydanticAI capability sets it for the duration of a run, so that sub-agents and direct API calls
made inside the run's tools (e.g. `GeminiService`) inherit the run's attribution and link to it.
Applications can set it themselves around any block of code with `usage_context(...)`.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .tracker import UsageTracker

__all__ = ('UsageContext', 'current_usage_context', 'usage_context')


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


@contextmanager
def usage_context(context: UsageContext | None = None, /, **fields: Any) -> Generator[UsageContext]:
    """Make a usage context current for the duration of the block.

    Fields not given are inherited from the enclosing context, so a nested block can add a user to an
    organization set further out.
    """
    outer = _current.get()
    if context is None:
        context = replace(outer, **fields) if outer is not None else UsageContext(**fields)
    elif fields:
        context = replace(context, **fields)
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)
