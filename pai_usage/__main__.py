"""`python -m pai_usage`: the `pai-usage` command line."""

from __future__ import annotations

from ._cli import cli

if __name__ == '__main__':
    cli()
