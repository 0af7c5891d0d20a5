"""The CLI runs wherever kubectl does: importing it loads no agent (kernel) module and no Kopf."""

from __future__ import annotations

import json
import subprocess
import sys

# Imports every module of meshaccel.cli in a fresh interpreter (-P: not from the repository
# root, where operator/ would shadow the stdlib) and prints what got loaded.
_PROBE = """
import importlib, json, pkgutil, sys
root = importlib.import_module(sys.argv[1])
for module in pkgutil.walk_packages(root.__path__, sys.argv[1] + "."):
    importlib.import_module(module.name)
print(json.dumps(sorted(sys.modules)))
"""


def loaded_by(package: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-P", "-c", _PROBE, package], capture_output=True, text=True, check=True
    )
    loaded: list[str] = json.loads(result.stdout)
    return loaded


def test_importing_the_cli_loads_no_agent_module():
    loaded = loaded_by("meshaccel.cli")
    assert "meshaccel.cli.main" in loaded  # the probe did import the CLI
    assert "meshaccel.operator.selection" in loaded  # and the operator's pure selection
    assert [name for name in loaded if name.startswith("meshaccel.agent")] == []
    assert "kopf" not in loaded


def test_the_probe_sees_an_agent_module_when_one_is_imported():
    # The check above can fail: the agent's datapath does load the binding.
    assert "meshaccel.agent.libbpf.native" in loaded_by("meshaccel.agent")
