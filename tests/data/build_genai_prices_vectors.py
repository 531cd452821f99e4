"""Rebuild `genai_prices_vectors.json` from a checkout of github.com/pydantic/genai-prices (not run in CI).

Usage: `python tests/data/build_genai_prices_vectors.py GIT_DIR` where `GIT_DIR` is the repository's git
directory. Takes its usage dataset (`tests/dataset/usages.json`: usages extracted from real responses, with
every provider id genai-prices tried) and the literal `calc_price(Usage(...), ...)` calls of its Python tests.
Only inputs are kept: the expected price is what the installed genai-prices computes when our tests run.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

_PACKAGE_TESTS = (
    'tests/test_price_calc.py',
    'tests/test_tiered_pricing.py',
    'tests/test_price_regressions.py',
    'tests/test_units.py',
    'tests/test_usage.py',
    'tests/test_custom_prices.py',
)


def _show(git_dir: str, path: str) -> str:
    return subprocess.run(
        ['git', '--git-dir', git_dir, 'show', f'HEAD:{path}'], check=True, capture_output=True, text=True
    ).stdout


def _dataset(git_dir: str) -> list[dict[str, Any]]:
    grouped: dict[tuple[str, str], list[str]] = {}
    for entry in json.loads(_show(git_dir, 'tests/dataset/usages.json')):
        model = entry.get('model')
        if not model:
            continue
        for extracted in entry['extracted']:
            key = (model, json.dumps(extracted['usage'], sort_keys=True))
            providers = grouped.setdefault(key, [])
            for extractor in extracted['extractors']:
                if extractor['provider_id'] not in providers:
                    providers.append(extractor['provider_id'])
    return [
        {'model': model, 'usage': json.loads(usage), 'providers': sorted(providers), 'from': 'dataset'}
        for (model, usage), providers in sorted(grouped.items())
    ]


def _literal(node: ast.expr, names: dict[str, Any]) -> Any:
    if isinstance(node, ast.Name):
        return names[node.id]
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'datetime':
        parts = [_literal(a, names) for a in node.args] + [0] * 5
        return '{:04d}-{:02d}-{:02d}T{:02d}:{:02d}:00+00:00'.format(*parts[:5])
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ('Decimal', 'str'):
        return str(_literal(node.args[0], names))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mult | ast.Sub):
        left, right = _literal(node.left, names), _literal(node.right, names)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Mult):
            return left * right
        return left - right
    return ast.literal_eval(node)


def _param_rows(func: ast.FunctionDef) -> list[dict[str, Any]]:
    """One binding of names per `pytest.mark.parametrize` row (the product over several decorators)."""
    rows: list[dict[str, Any]] = [{}]
    for decorator in func.decorator_list:
        if not (isinstance(decorator, ast.Call) and getattr(decorator.func, 'attr', None) == 'parametrize'):
            continue
        try:
            argnames = ast.literal_eval(decorator.args[0])
            names = [n.strip() for n in argnames.split(',')] if isinstance(argnames, str) else list(argnames)
            values_node = decorator.args[1]
            assert isinstance(values_node, ast.List | ast.Tuple)
            values: list[dict[str, Any]] = []
            for item in values_node.elts:
                if isinstance(item, ast.Call) and getattr(item.func, 'attr', None) == 'param':
                    item = ast.Tuple(elts=item.args) if len(names) > 1 else item.args[0]
                parts = item.elts if len(names) > 1 and isinstance(item, ast.Tuple) else [item]
                values.append({n: _literal(v, {}) for n, v in zip(names, parts, strict=True)})
        except (AssertionError, ValueError, TypeError, SyntaxError, IndexError, KeyError):
            return []
        rows = [{**row, **value} for row in rows for value in values]
    return rows


def _package_calls(git_dir: str) -> list[dict[str, Any]]:
    vectors: list[dict[str, Any]] = []
    for path in _PACKAGE_TESTS:
        tree = ast.parse(_show(git_dir, path))
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef):
                continue
            for binding in _param_rows(func):
                vectors.extend(_calls_in(func, binding, path))
    return vectors


def _calls_in(func: ast.FunctionDef, binding: dict[str, Any], path: str) -> list[dict[str, Any]]:
    names = dict(binding)
    usages: dict[str, ast.Call] = {}
    vectors: list[dict[str, Any]] = []
    for node in ast.walk(func):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value
            if isinstance(value, ast.Call) and getattr(value.func, 'id', None) == 'Usage':
                usages[node.targets[0].id] = value
    for node in ast.walk(func):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'calc_price'):
            continue
        try:
            usage_node = node.args[0]
            if isinstance(usage_node, ast.Name):
                usage_node = usages[usage_node.id]
            assert isinstance(usage_node, ast.Call) and getattr(usage_node.func, 'id', None) == 'Usage'
            assert not usage_node.args
            usage = {kw.arg: _literal(kw.value, names) for kw in usage_node.keywords}
            kwargs = {kw.arg: _literal(kw.value, names) for kw in node.keywords}
            model_ref = _literal(node.args[1], names) if len(node.args) > 1 else kwargs.pop('model_ref')
        except (AssertionError, ValueError, KeyError, TypeError, SyntaxError, IndexError):
            continue  # not a literal call (a loop variable, a fixture, a custom model): nothing to vendor
        if not isinstance(model_ref, str) or not all(isinstance(v, int | float) for v in usage.values()):
            continue
        provider = kwargs.get('provider_id')
        vector: dict[str, Any] = {'model': model_ref, 'usage': usage, 'providers': [provider], 'from': path}
        if 'genai_request_timestamp' in kwargs:
            vector['timestamp'] = kwargs['genai_request_timestamp']
        if 'price_context' in kwargs:
            vector['price_context'] = kwargs['price_context']
        vectors.append(vector)
    return vectors


def main(git_dir: str) -> None:
    vectors = _package_calls(git_dir) + _dataset(git_dir)
    out = Path(__file__).with_name('genai_prices_vectors.json')
    out.write_text(json.dumps(vectors, separators=(',', ':'), sort_keys=True) + '\n')
    print(f'{len(vectors)} vectors, {sum(len(v["providers"]) for v in vectors)} cases, {out.stat().st_size} bytes')


if __name__ == '__main__':
    main(sys.argv[1])
