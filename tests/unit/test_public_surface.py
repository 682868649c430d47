"""Every module of the two packages says what it offers: an `__all__`, sorted the way ruff's
RUF022 sorts it, that lists exactly the public names the module itself defines.

A package's `__init__` may add names it re-exports from its own modules; those are pinned in
`REEXPORTS`, so a new re-export is a decision, not an accident.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("gateway", "classifiers")
REEXPORTS = {
    "gateway.dispatch": {
        "SHED_CODES",
        "DispatchSettings",
        "Dispatched",
        "Dispatcher",
        "Sender",
        "TierRules",
    },
    "gateway.store": {
        "BreakerState",
        "CircuitBreaker",
        "EmbeddedStore",
        "RedisStore",
        "StoreCommandError",
        "StoreUnavailable",
    },
    "gateway.telemetry": {"RequestRecord", "Telemetry", "TelemetrySettings"},
}
# Importing these does the module's job (build the ASGI app from the environment): their
# surface is read from the source alone.
NOT_IMPORTED = {"gateway.asgi"}


def module_names() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def source_of(name: str) -> Path:
    path = ROOT.joinpath(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def bound_names(tree: ast.Module) -> set[str]:
    """Names the module's top level binds itself (not by import), in `if`/`try` too."""
    names: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node, ast.If):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                visit(node.orelse)
                visit(node.finalbody)
                for handler in node.handlers:
                    visit(handler.body)

    visit(tree.body)
    return names


def declared_all(tree: ast.Module) -> list[str] | None:
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            names = ast.literal_eval(value)
            assert isinstance(names, list | tuple)
            return list(names)
    return None


def defined_here(module: ModuleType) -> set[str]:
    """Functions and classes whose home is this module, however they came to be bound."""
    return {
        name
        for name, value in vars(module).items()
        if (inspect.isfunction(value) or inspect.isclass(value))
        and value.__module__ == module.__name__
    }


def ruf022_order(name: str) -> tuple[int, list[int | str]]:
    """SCREAMING_CASE, then CamelCase, then the rest; digits compare as numbers."""
    group = 0 if name.isupper() else 1 if name[:1].isupper() else 2
    return group, [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


MODULES = module_names()


def test_both_packages_are_covered() -> None:
    assert {"gateway.app", "gateway.telemetry", "classifiers.model"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_all_lists_exactly_the_public_names_defined_there(name: str) -> None:
    tree = ast.parse(source_of(name).read_text())
    declared = declared_all(tree)
    assert declared is not None, f"{name} has no __all__"
    assert declared == sorted(declared, key=ruf022_order), f"{name}: __all__ is not sorted"
    assert len(set(declared)) == len(declared), f"{name}: __all__ lists a name twice"
    public = {n for n in bound_names(tree) if not n.startswith("_")}
    if name not in NOT_IMPORTED:
        module = importlib.import_module(name)
        assert list(module.__all__) == declared
        public |= {n for n in defined_here(module) if not n.startswith("_")}
        missing = [n for n in declared if not hasattr(module, n)]
        assert not missing, f"{name}: __all__ names what the module does not have: {missing}"
    reexported = REEXPORTS.get(name, set())
    assert set(declared) == public | reexported
    from_own_modules = {
        alias.asname or alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom)
        and (node.level > 0 or (node.module or "").startswith(name + "."))
        for alias in node.names
    }
    assert reexported <= from_own_modules, f"{name} re-exports only from its own modules"
