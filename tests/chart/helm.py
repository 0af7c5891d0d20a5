"""Running the real helm binaries (scripts/tools.sh puts them in .venv/bin) on the chart."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.requirements import require

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "meshaccel"
RELEASE = "meshaccel"
NAMESPACE = "meshaccel-system"
# The two major versions users run; both must lint and render the chart the same way.
HELMS = ("helm3", "helm4")

Doc = dict[str, Any]


def helm_path(name: str) -> str:
    """The helm binary ``name`` (on PATH or in .venv/bin); skip locally, fail in CI without it."""
    __tracebackhide__ = True
    path = shutil.which(name) or _in_venv(name)
    require(path is not None, f"needs {name} (install it with: bash scripts/tools.sh)")
    assert path is not None
    return path


def _in_venv(name: str) -> str | None:
    candidate = ROOT / ".venv" / "bin" / name
    return str(candidate) if os.access(candidate, os.X_OK) else None


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run(helm: str, *args: str, chart: Path = CHART) -> Result:
    """``helm ARGS`` with a private HOME (no repositories, no plugins, no cluster)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": "/nonexistent",
        "HELM_CACHE_HOME": "/tmp/meshaccel-helm/cache",
        "HELM_CONFIG_HOME": "/tmp/meshaccel-helm/config",
        "HELM_DATA_HOME": "/tmp/meshaccel-helm/data",
        "KUBECONFIG": "/dev/null",
    }
    proc = subprocess.run(
        [helm_path(helm), *[a.replace("{chart}", str(chart)) for a in args]],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def values_args(values: dict[str, Any] | None) -> list[str]:
    # JSON is YAML: one --set-json per top-level key keeps the call free of temporary files.
    return [f"--set-json={key}={json.dumps(value)}" for key, value in (values or {}).items()]


@functools.cache
def _template(helm: str, values_json: str, include_crds: bool) -> tuple[Doc, ...]:
    values = json.loads(values_json)
    args = ["template", RELEASE, "{chart}", "--namespace", NAMESPACE, *values_args(values)]
    if include_crds:
        args.append("--include-crds")
    result = run(helm, *args)
    assert result.returncode == 0, f"{helm} template failed:\n{result.output}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def template(helm: str, values: dict[str, Any] | None = None, *, crds: bool = False) -> list[Doc]:
    """The chart rendered by ``helm template`` with ``values`` (cached per arguments)."""
    return list(_template(helm, json.dumps(values or {}, sort_keys=True), crds))


def template_error(helm: str, values: dict[str, Any]) -> str:
    """``helm template`` that must fail: returns what helm said."""
    result = run(
        helm, "template", RELEASE, "{chart}", "--namespace", NAMESPACE, *values_args(values)
    )
    assert result.returncode != 0, f"{helm} template accepted {values}:\n{result.stdout}"
    return result.output


def find(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    matches = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, got {len(matches)}"
    return matches[0]
