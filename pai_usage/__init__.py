"""pai-usage: the usage-and-cost ledger for PydanticAI applications and direct Gemini calls."""

from __future__ import annotations

from importlib.metadata import version as _metadata_version

from .capability import TrackUsage
from .context import UsageContext, current_usage_context, usage_context
from .deps import HasUsageAttribution, UsageDeps
from .pricing import PriceTable, TokenPrice, UnitPrice, set_price_table
from .record import UsageRecord
from .summary import SummaryRow, UsageSummary, UsageTotals
from .table import TokenUsage
from .tracker import TrackerStats, UsageTracker, configure, get_tracker
from .usage import TokenCounts

__version__ = _metadata_version('pai-usage')
__all__ = (
    'HasUsageAttribution',
    'PriceTable',
    'SummaryRow',
    'TokenCounts',
    'TokenPrice',
    'TokenUsage',
    'TrackUsage',
    'TrackerStats',
    'UnitPrice',
    'UsageContext',
    'UsageDeps',
    'UsageRecord',
    'UsageSummary',
    'UsageTotals',
    'UsageTracker',
    '__version__',
    'configure',
    'current_usage_context',
    'get_tracker',
    'set_price_table',
    'usage_context',
)
