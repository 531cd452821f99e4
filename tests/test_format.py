"""The shared formats: money for people and machines, abbreviated counts, shortened labels, natural order."""

from __future__ import annotations

from decimal import Decimal

import pytest

from pai_usage._format import (
    abbreviate_count,
    exact_usd,
    fit_label,
    format_usd,
    natural_key,
    render_table,
    visible,
)
from pai_usage.table import COST_SCALE


@pytest.mark.parametrize(
    ('value', 'shown'),
    [
        (Decimal(0), '$0.0000'),
        (Decimal('0.00005'), '$0.0000'),  # half-even: to the even neighbour
        (Decimal('0.00015'), '$0.0002'),
        (Decimal('0.002523'), '$0.0025'),
        (Decimal('1234.56789'), '$1,234.5679'),
        (Decimal('1E+3'), '$1,000.0000'),  # never in exponent notation
        (Decimal('-0.5'), '-$0.5000'),
    ],
)
def test_format_usd(value: Decimal, shown: str):
    assert format_usd(value) == shown


@pytest.mark.parametrize(
    ('value', 'shown'),
    [(Decimal('0.06'), '0.060000000000'), (Decimal('1E-12'), '0.000000000001'), (Decimal(7), '7.000000000000')],
)
def test_exact_usd_has_the_ledger_places(value: Decimal, shown: str):
    assert exact_usd(value) == shown
    assert len(shown.partition('.')[2]) == COST_SCALE
    assert Decimal(shown) == value


@pytest.mark.parametrize(
    ('value', 'shown'),
    [
        (0, '0'),
        (99_999, '99,999'),
        (100_000, '100k'),
        (230_400, '230k'),
        (1_234_567, '1.23M'),
        (4_500_000_000, '4.5B'),
        (999_999, '1M'),
        (999_999_999_999_999, '1,000T'),
    ],
)
def test_abbreviate_count(value: int, shown: str):
    assert abbreviate_count(value) == shown
    assert len(shown) <= 6 or value >= 10**15


@pytest.mark.parametrize(
    ('text', 'width', 'shown'),
    [
        ('gpt-4o', 10, 'gpt-4o'),
        ('gemini-2.5-flash-image-preview', 12, 'gemini…eview'),
        ('abcdef', 3, 'a…f'),
        ('abcdef', 1, '…'),
    ],
)
def test_fit_label(text: str, width: int, shown: str):
    assert fit_label(text, width) == shown
    assert len(shown) == min(len(text), width)


def test_natural_key():
    labels = ['u10', None, 'u2', 'U1', 'u1b', 'org-2-x', 'org-10', 'u1', '2026-06-03', '2026-06-01']
    assert sorted(labels, key=natural_key) == [
        '2026-06-01', '2026-06-03', 'org-2-x', 'org-10', 'U1', 'u1', 'u1b', 'u2', 'u10', None,
    ]  # fmt: skip


def test_render_table_fits_and_aligns():
    rows = [['a-very-long-organization-name', 'm', '$1.0000'], ['b', 'another-long-model-name', '$12,345.0000']]
    lines = render_table(
        ['org', 'model', 'cost'], rows, ['left', 'left', 'right'], max_width=30, shrinkable=[True, True, False]
    )
    assert max(map(len, lines)) <= 30
    assert len({line.rindex('.') for line in lines[2:]}) == 1  # money is never cut, and right-aligned
    assert lines[2].endswith('$1.0000') and lines[3].endswith('$12,345.0000')


@pytest.mark.parametrize(
    ('text', 'shown'),
    [
        ('acme', 'acme'),
        ('é ü 東京', 'é ü 東京'),
        ('esc\x1b[2J\x1b[31mRED', 'esc\\x1b[2J\\x1b[31mRED'),
        ('nl\nfake-total', 'nl\\nfake-total'),
        ('tab\there', 'tab\\there'),
        ('bel\x07', 'bel\\x07'),
        ('bidi\u202eevil', 'bidi\\u202eevil'),
    ],
)
def test_visible_escapes_what_a_terminal_would_act_on(text: str, shown: str):
    assert visible(text) == shown
    assert visible(text).isprintable()


def test_a_label_cannot_move_the_cursor_or_forge_a_line():
    rows = [['esc\x1b[2J\x1b[31mRED', '1'], ['nl\nTotal: $0', '2']]
    lines = render_table(['org', 'n'], rows, ['left', 'right'], max_width=14, shrinkable=[True, False])
    assert len(lines) == 4  # header, rule, one line per row
    assert all(line.isprintable() for line in lines)
    assert len({len(line) for line in lines[2:]}) == 1  # still aligned: widths count the escapes
