"""The public surface: names, sorting, typing marker, and no framework imported by `import budgetary`."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import budgetary

REQUIRED = {
    "Budget", "Limits", "Usage", "BudgetExceeded", "UnknownAgent", "Allow", "SoftLimit", "Deny",
    "Skipped", "is_budget_skipped", "BudgetGuard",
}  # fmt: skip


def test_required_names_are_exported():
    assert REQUIRED <= set(budgetary.__all__)
    for name in budgetary.__all__:
        assert getattr(budgetary, name) is not None


def test_every_module_all_is_sorted_and_resolves():
    for info in pkgutil.walk_packages(budgetary.__path__, "budgetary."):
        if ".integrations." in info.name:
            continue  # adapters import their framework; they have their own tests
        module = importlib.import_module(info.name)
        names = getattr(module, "__all__", None)
        if info.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        assert names is not None, f"{info.name} has no __all__"
        assert list(names) == sorted(names), f"{info.name}.__all__ is not sorted"
        for name in names:
            assert hasattr(module, name), f"{info.name}.__all__ names missing {name}"


def test_errors_share_one_root():
    from budgetary.core import errors

    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.BudgetError)
    assert issubclass(budgetary.BudgetExceeded, RuntimeError)
    assert issubclass(budgetary.UnknownAgent, KeyError)


def test_package_is_typed():
    assert (Path(budgetary.__file__).parent / "py.typed").is_file()


def test_import_loads_no_framework_or_backend():
    code = (
        "import sys, budgetary; "
        "heavy = [m for m in ('langchain_core', 'langgraph', 'crewai', 'redis', 'tiktoken', 'genai_prices') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
