"""Text formatting shared by every human- and machine-readable output: money, counts, labels and tables.

One money format everywhere: people read `$1,234.5678` (`format_usd`: fixed places, so decimal points align in
a right-aligned column) in the summary table, the daily chart and the budgets table; machines read the exact
ledger value with its 12 fixed places (`exact_usd`) in JSON, CSV and exports, the same on every backend.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Literal

from .table import COST_SCALE

__all__ = (
    'USD_PLACES',
    'abbreviate_count',
    'exact_usd',
    'fit_label',
    'format_usd',
    'natural_key',
    'render_table',
    'visible',
)

USD_PLACES = 4
"""Decimal places of money shown to people: sub-cent costs stay visible, and points align."""
_SHOWN_QUANTUM = Decimal(1).scaleb(-USD_PLACES)
_EXACT_QUANTUM = Decimal(1).scaleb(-COST_SCALE)
_ELLIPSIS = '…'
_DIGITS = re.compile(r'(\d+)')


def format_usd(value: Decimal) -> str:
    """Money for people: `$1,234.5678`, always `USD_PLACES` places (rounded half-even), `-$0.5000` below zero."""
    shown = value.quantize(_SHOWN_QUANTUM, rounding=ROUND_HALF_EVEN)
    sign = '-' if shown < 0 else ''
    return f'{sign}${abs(shown):,.{USD_PLACES}f}'


def exact_usd(value: Decimal) -> str:
    """Money for machines: the exact ledger value with its 12 fixed places, never in exponent notation."""
    return format(value.quantize(_EXACT_QUANTUM, rounding=ROUND_HALF_EVEN), 'f')


def abbreviate_count(value: int) -> str:
    """`99,999` as is, then three significant digits and a suffix: `230k`, `1.23M`, `4.5B` (at most 6 characters)."""
    if abs(value) < 100_000:
        return f'{value:,}'
    scales = ((10**3, 'k'), (10**6, 'M'), (10**9, 'B'), (10**12, 'T'))
    index = max(i for i, (scale, _) in enumerate(scales) if abs(value) >= scale)
    scaled = value / scales[index][0]
    if abs(scaled) >= 999.5 and index + 1 < len(scales):  # 999,999 rounds to 1000k: that is 1M
        index += 1
        scaled = value / scales[index][0]
    text = f'{scaled:.3g}' if abs(scaled) < 999.5 else f'{scaled:,.0f}'
    return f'{text}{scales[index][1]}'


def visible(text: str) -> str:
    r"""`text` safe for a terminal: what does not print as its escape (`\x1b`, `\n`, `\u202e`).

    A label then never moves the cursor, recolours the screen or forges a line of the table.
    """
    if text.isprintable():
        return text
    return ''.join(c if c.isprintable() else c.encode('unicode_escape').decode('ascii') for c in text)


def fit_label(text: str, width: int) -> str:
    """`text` cut to `width` characters with `…` in the middle, so both ends (a model's family and version) stay."""
    if len(text) <= width:
        return text
    if width <= 1:
        return _ELLIPSIS[:width]
    head = width // 2
    tail = width - 1 - head
    return f'{text[:head]}{_ELLIPSIS}{text[len(text) - tail :] if tail else ""}'


def natural_key(text: str | None) -> tuple[int, tuple[str | int, ...]]:
    """A sort key that orders `u2` before `u10` (digit runs compare as numbers) and None last."""
    if text is None:
        return (1, ())
    # `re.split` with a group alternates text and digit runs, so equal positions always hold equal types.
    return (0, tuple(int(part) if i % 2 else part.casefold() for i, part in enumerate(_DIGITS.split(text))))


Align = Literal['left', 'right']


def render_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    aligns: Sequence[Align],
    *,
    max_width: int | None = None,
    shrinkable: Sequence[bool] | None = None,
    gap: int = 2,
) -> list[str]:
    """Lines of a table: header, rule, rows. Right-aligned cells line up on their last character.

    With `max_width`, the `shrinkable` columns (labels) give up width, the widest first, down to 3 characters,
    and their cells are cut with `fit_label`; a table that still does not fit is cut at `max_width`.
    """
    count = len(headers)
    rows = [[visible(cell) for cell in row] for row in rows]  # escapes first: widths count what is shown
    shrink = list(shrinkable) if shrinkable is not None else [False] * count
    widths = [max([len(headers[i]), *(len(row[i]) for row in rows)]) for i in range(count)]
    if max_width is not None:
        minimum = 3
        while sum(widths) + gap * (count - 1) > max_width:
            candidates = [i for i in range(count) if shrink[i] and widths[i] > minimum]
            if not candidates:
                break
            widest = max(candidates, key=lambda i: widths[i])
            widths[widest] -= 1

    def render(cells: Sequence[str]) -> str:
        parts = [
            fit_label(cell, width).rjust(width) if align == 'right' else fit_label(cell, width).ljust(width)
            for cell, width, align in zip(cells, widths, aligns, strict=True)
        ]
        return (' ' * gap).join(parts).rstrip()

    lines = [render(headers), (' ' * gap).join('-' * width for width in widths), *(render(row) for row in rows)]
    if max_width is not None:
        lines = [line if len(line) <= max_width else line[: max_width - 1] + _ELLIPSIS for line in lines]
    return lines
