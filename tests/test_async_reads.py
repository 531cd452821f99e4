"""`aget_usage_summary` / `aget_current_month_usage`: the same answers, read off the event loop's thread."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import event

from pai_usage import UsageTracker

pytestmark = pytest.mark.anyio

NOW = datetime(2026, 4, 10, 12, tzinfo=UTC)
APRIL = (datetime(2026, 4, 1, tzinfo=UTC), datetime(2026, 5, 1, tzinfo=UTC))


async def test_async_reads_match_the_sync_ones_off_the_loop(tracker: UsageTracker):
    for org, cost in [('acme', '1.5'), ('acme', '2'), ('globex', '7')]:
        tracker.track(organization_id=org, provider='openai', model='gpt-4o', cost_usd=Decimal(cost), created_at=NOW)
    assert await tracker.aflush()

    threads: list[int] = []

    def _note_thread(*_: Any) -> None:
        threads.append(threading.get_ident())

    event.listen(tracker.engine, 'before_cursor_execute', _note_thread)
    try:
        summary = await tracker.aget_usage_summary(*APRIL, organization_id='acme', group_by=('model',))
        month = await tracker.aget_current_month_usage('acme', now=NOW)
    finally:
        event.remove(tracker.engine, 'before_cursor_execute', _note_thread)

    assert summary == tracker.get_usage_summary(*APRIL, organization_id='acme', group_by=('model',))
    assert summary.totals.cost_usd == Decimal('3.5') and summary.totals.events == 2
    assert month == tracker.get_current_month_usage('acme', now=NOW)
    assert threads and threading.get_ident() not in threads  # every query ran in a worker thread
