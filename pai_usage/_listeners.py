"""Adding a listener to a tracker that already exists."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .record import UsageRecord

if TYPE_CHECKING:
    from .tracker import UsageTracker

__all__ = ('add_listener',)


def add_listener(tracker: UsageTracker, listener: Callable[[UsageRecord], None]) -> None:
    """Call `listener` with each record `tracker` writes from now on."""
    public = getattr(tracker, 'add_listener', None)
    if callable(public):
        public(listener)
        return
    # Trackers that take listeners only at construction: swapping in a new tuple is atomic, so the
    # writer thread sees the old or the new listeners, never a half-built sequence.
    writer = tracker._writer  # pyright: ignore[reportPrivateUsage]
    writer.listeners = (*writer.listeners, listener)
