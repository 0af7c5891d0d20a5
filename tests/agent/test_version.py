"""The agent says which build it is: on its command line, in its replies, its metrics and its
start-up log (``meshaccel-agent version``: test_commands.py)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from meshaccel.contract.api import VERSION_HEADER, ApplyResult, HealthReply, StatusReply
from meshaccel.contract.version import VERSION
from tests.agent.conftest import PKI, MakeClient, pod_set, pod_spec


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


async def test_every_reply_that_names_the_agent_names_its_version(
    make_client: MakeClient,
) -> None:
    """/healthz (open) names it; /v1/health (the operator's probe), /v1/status and a PUT's
    ApplyResult name it to a client that sends its own version (the operator does, and so
    reports each agent's version and warns on a skew); to one that does not, which may
    predate the field and refuse unknown ones, they leave it out."""
    client = await make_client()
    healthz = await (await client.get("/healthz", ssl=PKI.anonymous_context())).json()
    assert healthz == {"status": "ok", "version": VERSION}

    async def replies(headers: dict[str, str]) -> list[dict[str, Any]]:
        generation = next(_generations)
        body = pod_set(generation, pod_spec(0)).model_dump_json()
        put = await client.put(
            "/v1/pods", data=body, headers={"Content-Type": "application/json", **headers}
        )
        assert put.status == 200
        health = await client.get("/v1/health", headers=headers)
        status = await client.get("/v1/status", headers=headers)
        return [await put.json(), await health.json(), await status.json()]

    applied, health, status = await replies({VERSION_HEADER: "0.0.1"})
    assert ApplyResult.model_validate(applied).version == VERSION
    assert HealthReply.model_validate(health).version == VERSION
    assert StatusReply.model_validate(status).version == VERSION
    for reply in await replies({}):
        assert "version" not in reply


_generations = itertools.count(1)


def test_the_start_up_log_line_names_the_version(tmp_path: Path) -> None:
    """The first line an agent logs says which build it is, also when it cannot start."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshaccel.agent.main",
            "uninstall",
            f"--pin-root={tmp_path}",  # not bpffs: it stops at once, after the first line
            "--log-format=json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("MESHACCEL_")},
    )
    first = json.loads(done.stderr.splitlines()[0])
    assert first["msg"] == "meshaccel-agent starting"
    assert first["version"] == VERSION and first["command"] == "uninstall"
