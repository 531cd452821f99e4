"""Pricing cost per row: `genai_prices.calc_price` against ours (compiled prices), and the writer priced vs self-priced.

    python -m benchmarks pricing

Rows are genai-prices' own test vectors (`tests/data/genai_prices_vectors.json`) that it prices, so the mix of
models, providers and usage keys is its own. Prints microseconds per row and ratios; nothing asserts.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import genai_prices

from pai_usage import PriceTable, UsageTracker
from pai_usage.pricing import price_fields
from pai_usage.usage import TokenCounts

VECTORS = Path(__file__).resolve().parent.parent / 'tests' / 'data' / 'genai_prices_vectors.json'
WHEN = datetime(2026, 11, 15, tzinfo=UTC)
WRITER_ROWS = 20_000


def _priced_cases() -> list[tuple[str, str, dict[str, int]]]:
    cases: list[tuple[str, str, dict[str, int]]] = []
    for entry in json.loads(VECTORS.read_text()):
        if entry.get('price_context') or not all(type(v) is int for v in entry['usage'].values()):
            continue
        for provider in entry['providers']:
            if provider is None:
                continue
            try:
                genai_prices.calc_price(genai_prices.Usage(**entry['usage']), entry['model'], provider_id=provider)
            except (LookupError, ValueError):
                continue
            cases.append((entry['model'], provider, entry['usage']))
    return cases


def _per_row(fn: Any, items: list[Any], repeat: int = 3) -> float:
    best = float('inf')
    for _ in range(repeat):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return best / len(items) * 1e6


def _writer_rate(fields: list[dict[str, Any]]) -> float:
    with tempfile.TemporaryDirectory() as tmp, UsageTracker(f'sqlite:///{tmp}/bench.db') as tracker:
        tracker.track(**fields[0])  # migrate and warm up outside the timing
        assert tracker.flush(60)
        start = time.perf_counter()
        for item in fields:
            tracker.track(**item)
        assert tracker.flush(120)
        elapsed = time.perf_counter() - start
    return len(fields) / elapsed


def main() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        cases = _priced_cases()
    table = PriceTable()
    rows = [
        {'provider': p, 'model': m, 'created_at': WHEN, **TokenCounts.from_price_values(u).as_columns()}
        for m, p, u in cases
    ]
    usages = [(m, p, genai_prices.Usage(**u)) for m, p, u in cases]

    def reference(case: tuple[str, str, Any]) -> Decimal:
        return genai_prices.calc_price(case[2], case[0], provider_id=case[1], genai_request_timestamp=WHEN).total_price

    ours = _per_row(lambda r: price_fields(r, table), rows)
    theirs = _per_row(reference, usages)
    mismatches = sum(price_fields(r, table).cost_usd != reference(c) for r, c in zip(rows, usages, strict=True))
    print(f'{len(rows)} priced genai-prices vectors, {mismatches} mismatches')
    print(f'  genai_prices.calc_price : {theirs:8.1f} us/row')
    print(f'  pai_usage price_fields  : {ours:8.1f} us/row   ({theirs / ours:.1f}x faster)')

    base = [{k: v for k, v in r.items() if k != 'created_at'} for r in rows]
    self_priced = [base[i % len(base)] for i in range(WRITER_ROWS)]
    already = [{**item, 'cost_usd': Decimal('0.0031')} for item in self_priced]
    priced_rate = _writer_rate(already)
    self_rate = _writer_rate(self_priced)
    print(f'writer into SQLite, {WRITER_ROWS} rows each (same run):')
    print(f'  already priced : {priced_rate:9,.0f} rows/s')
    print(f'  self-priced    : {self_rate:9,.0f} rows/s   ({self_rate / priced_rate:.2f}x of priced; target >= 0.8)')


if __name__ == '__main__':
    main()
