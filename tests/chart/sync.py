"""charts/sync.py (not a package) loaded as a module."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from tests.chart.helm import ROOT


def load_sync() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "meshaccel_chart_sync", ROOT / "charts" / "sync.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
