"""The agent says which build it is: on its command line, in its metrics and its start-up log."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from meshaccel.contract.version import VERSION
from tests.agent.conftest import MakeClient


def test_the_version_is_the_source_trees() -> None:
    """What the agent reports is pyproject.toml's version (not a stale install's)."""
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == VERSION


def test_version_flag_prints_it_and_exits() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "meshaccel.agent.main", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"meshaccel-agent {VERSION}"


async def test_build_info_metric_names_the_version(make_client: MakeClient) -> None:
    client = await make_client()
    text = await (await client.get("/metrics")).text()
    (family,) = [
        f for f in text_string_to_metric_families(text) if f.name == "meshaccel_build_info"
    ]
    (sample,) = family.samples
    assert sample.value == 1
    assert sample.labels["component"] == "agent"
    assert sample.labels["version"] == VERSION
