"""Every binary names its build with --version: the agent, the operator and the user's command."""

from __future__ import annotations

import subprocess
import sys

import pytest

from meshaccel.contract.version import VERSION


@pytest.mark.parametrize(
    ("module", "program"),
    [
        ("meshaccel.agent.main", "meshaccel-agent"),
        ("meshaccel.operator.main", "meshaccel-operator"),
        ("meshaccel.cli.main", "meshaccel"),
    ],
)
def test_version_flag_prints_the_build_and_exits(module: str, program: str) -> None:
    done = subprocess.run(
        [sys.executable, "-P", "-m", module, "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{program} {VERSION}"
