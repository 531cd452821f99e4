"""pai-usage: the usage-and-cost ledger for PydanticAI applications and direct Gemini calls."""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import version as _metadata_version
from typing import TYPE_CHECKING, Any

from ._warnings import (
    MissingAttributionWarning,
    PaiUsageWarning,
    UnknownFieldWarning,
    UnpricedModelWarning,
    set_strict,
)
from .context import UsageContext, current_usage_context, run_in_thread, usage_context, with_current_context
from .deps import HasUsageAttribution, UsageDeps
from .pricing import Priced, PriceTable, TokenPrice, UnitPrice, price_fields, set_price_table
from .record import UsageRecord
from .reprice import RepriceGroup, RepriceResult, reprice
from .summary import SummaryRow, UsageSummary, UsageTotals
from .table import TokenUsage, metadata
from .tracker import TrackerStats, UsageTracker, configure, get_tracker
from .usage import TokenCounts

if TYPE_CHECKING:
    from .budgets import Budget, BudgetExceeded, EnforceBudgets
    from .capability import TrackUsage

__version__ = _metadata_version('pai-usage')
__all__ = (
    'Budget',
    'BudgetExceeded',
    'EnforceBudgets',
    'HasUsageAttribution',
    'MissingAttributionWarning',
    'PaiUsageWarning',
    'PriceTable',
    'Priced',
    'RepriceGroup',
    'RepriceResult',
    'SummaryRow',
    'TokenCounts',
    'TokenPrice',
    'TokenUsage',
    'TrackUsage',
    'TrackerStats',
    'UnitPrice',
    'UnknownFieldWarning',
    'UnpricedModelWarning',
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
    'metadata',
    'price_fields',
    'reprice',
    'run_in_thread',
    'set_price_table',
    'set_strict',
    'usage_context',
    'with_current_context',
)

# The capabilities import pydantic-ai's agent machinery (~0.6 s): load them on first use, so that
# the CLI and code that only records or reads usage start fast.
_LAZY = {
    'TrackUsage': '.capability',
    'Budget': '.budgets',
    'BudgetExceeded': '.budgets',
    'EnforceBudgets': '.budgets',
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value
