"""pai-usage: the usage-and-cost ledger for PydanticAI applications and direct Gemini calls."""

from __future__ import annotations

from importlib import import_module

# Not `typing.TYPE_CHECKING`: importing `typing` would cost `import pai_usage` (and `--help`) time for nothing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from ._warnings import (
        MissingAttributionWarning,
        PaiUsageWarning,
        UnknownFieldWarning,
        UnpricedModelWarning,
        set_strict,
    )
    from .budgets import Budget, BudgetExceeded, EnforceBudgets
    from .capability import TrackUsage
    from .context import UsageContext, current_usage_context, run_in_thread, usage_context, with_current_context
    from .deps import HasUsageAttribution, UsageDeps
    from .pricing import Priced, PriceTable, TokenPrice, UnitPrice, price_fields, set_price_table
    from .record import UsageRecord
    from .reprice import RepriceGroup, RepriceResult
    from .summary import SummaryRow, UsageSummary, UsageTotals
    from .table import TokenUsage, metadata
    from .tracker import Durability, TrackerStats, UsageTracker, configure, get_tracker
    from .usage import TokenCounts

    __version__: str

__all__ = (
    'Budget',
    'BudgetExceeded',
    'Durability',
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
    'run_in_thread',
    'set_price_table',
    'set_strict',
    'usage_context',
    'with_current_context',
)

# Every public name is loaded on first use: the table, the tracker and pricing import SQLAlchemy, SQLModel and
# genai-prices (~0.5 s), the capabilities pydantic-ai's agent machinery. `import pai_usage` (and so the CLI's
# `--help`) stays fast; `from pai_usage import UsageTracker` imports what that name needs, once.
_LAZY = {
    'Durability': '.tracker',
    'Budget': '.budgets',
    'BudgetExceeded': '.budgets',
    'EnforceBudgets': '.budgets',
    'HasUsageAttribution': '.deps',
    'MissingAttributionWarning': '._warnings',
    'PaiUsageWarning': '._warnings',
    'PriceTable': '.pricing',
    'Priced': '.pricing',
    'RepriceGroup': '.reprice',
    'RepriceResult': '.reprice',
    'SummaryRow': '.summary',
    'TokenCounts': '.usage',
    'TokenPrice': '.pricing',
    'TokenUsage': '.table',
    'TrackUsage': '.capability',
    'TrackerStats': '.tracker',
    'UnitPrice': '.pricing',
    'UnknownFieldWarning': '._warnings',
    'UnpricedModelWarning': '._warnings',
    'UsageContext': '.context',
    'UsageDeps': '.deps',
    'UsageRecord': '.record',
    'UsageSummary': '.summary',
    'UsageTotals': '.summary',
    'UsageTracker': '.tracker',
    'configure': '.tracker',
    'current_usage_context': '.context',
    'get_tracker': '.tracker',
    'metadata': '.table',
    'price_fields': '.pricing',
    'run_in_thread': '.context',
    'set_price_table': '.pricing',
    'set_strict': '._warnings',
    'usage_context': '.context',
    'with_current_context': '.context',
}


def __getattr__(name: str) -> Any:
    if name == '__version__':
        from importlib.metadata import version

        value: Any = version('pai-usage')
    else:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
        value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
