"""Every public name is exported and documented, whoever adds it."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Any

import pytest

import pai_usage

EXPORTED = sorted(name for name in pai_usage.__all__ if name != '__version__')


def test_all_is_a_tuple_without_duplicates():
    assert isinstance(pai_usage.__all__, tuple)
    assert len(set(pai_usage.__all__)) == len(pai_usage.__all__)


@pytest.mark.parametrize('name', pai_usage.__all__)
def test_every_exported_name_exists(name: str):
    assert hasattr(pai_usage, name), f'`pai_usage.{name}` is in `__all__` but not defined'


def _documented_objects() -> list[tuple[str, Any]]:
    objects = [(name, getattr(pai_usage, name)) for name in EXPORTED if hasattr(pai_usage, name)]
    return [(name, obj) for name, obj in objects if inspect.isclass(obj) or inspect.isfunction(obj)]


@pytest.mark.parametrize(('name', 'obj'), _documented_objects(), ids=[n for n, _ in _documented_objects()])
def test_every_exported_class_and_function_has_a_docstring(name: str, obj: Any):
    assert inspect.getdoc(obj), f'`pai_usage.{name}` has no docstring'
    if inspect.isclass(obj):
        # A class inherits a docstring from its base: make sure this one wrote its own.
        assert obj.__doc__ and obj.__doc__.strip(), f'`pai_usage.{name}` only inherits its docstring'
        # `@dataclass` invents `Name(field: type, ...)` as the docstring of an undocumented class.
        assert not obj.__doc__.startswith(f'{obj.__name__}('), f'`pai_usage.{name}` has no docstring'
        for attr, member in vars(obj).items():
            if attr.startswith('_') or not (inspect.isfunction(member) or isinstance(member, property)):
                continue
            assert inspect.getdoc(member), f'`pai_usage.{name}.{attr}` has no docstring'


def _public_modules() -> list[str]:
    return sorted(
        info.name
        for info in pkgutil.walk_packages(pai_usage.__path__, 'pai_usage.')
        if not any(part.startswith('_') for part in info.name.split('.')[1:])
    )


@pytest.mark.parametrize('module_name', _public_modules())
def test_public_modules_declare_documented_all(module_name: str):
    module = importlib.import_module(module_name)
    assert module.__doc__, f'`{module_name}` has no module docstring'
    names = getattr(module, '__all__', None)
    assert isinstance(names, tuple), f'`{module_name}.__all__` should be a tuple'
    for name in names:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            doc = inspect.getdoc(obj) or ''
            assert doc, f'`{module_name}.{name}` has no docstring'
            assert not doc.startswith(f'{obj.__name__}('), f'`{module_name}.{name}` has no docstring'


def test_version():
    assert isinstance(pai_usage.__version__, str)
    assert pai_usage.__version__[0].isdigit()
