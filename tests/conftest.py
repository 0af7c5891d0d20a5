"""Shared pytest setup: the netlab fixtures (when present) and the `kernel` marker's checks."""

from __future__ import annotations

import importlib.util

import pytest

from tests.requirements import require_kernel


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


pytest_plugins = [name for name in ("tests.netlab.fixtures",) if _module_exists(name)]


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") is not None:
        require_kernel()
