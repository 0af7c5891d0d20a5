"""The operator's side never loads the agent's kernel code: it shares only meshaccel.contract."""

from __future__ import annotations

import json
import subprocess
import sys

# Imports every module of the given packages in a fresh interpreter and prints what got loaded.
_PROBE = """
import importlib, json, pkgutil, sys
for package in sys.argv[1:]:
    root = importlib.import_module(package)
    for module in pkgutil.walk_packages(root.__path__, package + "."):
        importlib.import_module(module.name)
print(json.dumps(sorted(sys.modules)))
"""


def _loaded_by(*packages: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, *packages],
        capture_output=True,
        text=True,
        check=True,
    )
    loaded: list[str] = json.loads(result.stdout)
    return loaded


def test_the_operator_loads_no_agent_module() -> None:
    loaded = _loaded_by("meshaccel.operator")
    assert "meshaccel.operator.main" in loaded  # the probe did import the operator
    assert "meshaccel.contract.api" in loaded
    assert [name for name in loaded if name.startswith("meshaccel.agent")] == []


def test_the_contract_imports_neither_side() -> None:
    loaded = _loaded_by("meshaccel.contract")
    assert "meshaccel.contract.settings" in loaded
    leaked = [name for name in loaded if name.startswith(("meshaccel.agent", "meshaccel.operator"))]
    assert leaked == []
    assert "ctypes" not in loaded  # no binding, no struct layout: plain data only


def test_the_probe_sees_the_agent_when_it_is_imported() -> None:
    # The check above can fail: importing the agent's datapath does load the binding.
    loaded = _loaded_by("meshaccel.agent")
    assert "meshaccel.agent.libbpf.native" in loaded
