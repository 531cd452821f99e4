"""`UsageDeps`: agent dependencies that say who a run is billed to.

The `TrackUsage` capability reads `user_id` and `organization_id` from the run's deps. `UsageDeps` is
a ready-made dataclass to use or subclass, but any deps object with those two attributes works
(`HasUsageAttribution`). Deps without them are recorded with NULL attribution and a one-time warning.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .tracker import UsageTracker

__all__ = ('HasUsageAttribution', 'UsageDeps')


@runtime_checkable
class HasUsageAttribution(Protocol):
    """Any deps object with `user_id` and `organization_id` attributes can attribute a run."""

    @property
    def user_id(self) -> str | None:
        """The user who started the run."""
        ...

    @property
    def organization_id(self) -> str | None:
        """The organization billed for the run."""
        ...


@dataclass
class UsageDeps:
    """Deps carrying usage attribution; subclass it to add your own fields.

    ```python
    @dataclass
    class AdDeps(UsageDeps):
        brand_id: str = ''
    ```
    """

    _: KW_ONLY
    user_id: str | None = None
    """The user who started the run."""
    organization_id: str | None = None
    """The organization billed for the run."""
    tracker: UsageTracker | None = None
    """Tracker to record this run to; defaults to the capability's, then the ambient one, then `get_tracker()`."""
