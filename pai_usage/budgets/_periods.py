"""Budget periods: calendar days, weeks and months in a time zone, and rolling windows."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, tzinfo
from functools import cache
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ('CalendarPeriod', 'Period', 'period_bounds', 'zone')

CalendarPeriod = Literal['day', 'week', 'month']
"""A calendar period a budget resets on (weeks start on Monday)."""
Period = CalendarPeriod | timedelta
"""A calendar period, or a rolling window of the given length."""


@cache
def zone(name: str) -> tzinfo:
    """The time zone named `name` (IANA, e.g. `Europe/Paris`; `UTC`); `ValueError` if unknown."""
    if name.upper() == 'UTC':
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f'unknown time zone {name!r}') from None


def _local_midnight(day: date, tz: tzinfo) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(UTC)


def period_bounds(period: Period, moment: datetime, timezone: str = 'UTC') -> tuple[datetime, datetime]:
    """The period containing `moment`, as UTC `[start, end)`.

    A calendar period starts at local midnight in `timezone` (on Monday for weeks, on the 1st for months)
    and ends where the next one starts, so its spend resets exactly there. A rolling window (a `timedelta`)
    is `[moment - window, moment)`.
    """
    if moment.tzinfo is None:
        raise ValueError('`moment` must be timezone-aware')
    if isinstance(period, timedelta):
        moment = moment.astimezone(UTC)
        return moment - period, moment
    tz = zone(timezone)
    today = moment.astimezone(tz).date()
    if period == 'day':
        first, following = today, today + timedelta(days=1)
    elif period == 'week':
        first = today - timedelta(days=today.weekday())
        following = first + timedelta(days=7)
    elif period == 'month':
        first = today.replace(day=1)
        following = date(first.year + first.month // 12, first.month % 12 + 1, 1)
    else:
        raise ValueError(f"`period` must be 'day', 'week', 'month' or a timedelta, not {period!r}")
    return _local_midnight(first, tz), _local_midnight(following, tz)
