"""``meshaccel-agent status|pods|check|version``: what the agent reports, inside its pod.

Each prints a table, or one JSON document with ``-o json`` (the ``meshaccel`` CLI runs them
through the Kubernetes exec API and parses stdout). ``status`` and ``pods`` ask the running
agent over its local socket (``local_socket``); ``check`` runs the start-up checks
(:mod:`.preflight`) without changing anything; ``version`` needs nothing. Exit codes: 0 fine,
1 a problem found (a check failed, the agent is not ready, a pod is unresolved, the agent
cannot be reached: then stdout is empty and stderr says why), 2 usage (:mod:`.config`).
"""

from __future__ import annotations

import http.client
import json
import platform
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from meshaccel.agent import libbpf, preflight
from meshaccel.agent.config import EXIT_INVALID_SETTINGS, LoadedSettings, SettingsError
from meshaccel.agent.libbpf import introspect
from meshaccel.contract.api import AppliedPod, PodsReply, StatusReply
from meshaccel.contract.version import VERSION

EXIT_OK = 0
EXIT_PROBLEM = 1
REQUEST_TIMEOUT_SECONDS = 10.0  # /v1/status reads the pins and the counters map


class AgentUnreachableError(Exception):
    """The running agent did not answer on its local socket: ``str()`` says why."""


# -- the local socket's client ------------------------------------------------------------------


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def get_local(path: Path | None, resource: str) -> Any:
    """GET ``resource`` from the agent's local socket at ``path``: the parsed JSON body."""
    if path is None:
        raise AgentUnreachableError("the agent's local socket is off (local_socket: none)")
    connection = _UnixConnection(path, REQUEST_TIMEOUT_SECONDS)
    try:
        connection.request("GET", resource)
        response = connection.getresponse()
        body = response.read()
    except OSError as err:
        raise AgentUnreachableError(
            f"no agent answers on {path} ({type(err).__name__}: {err}): is it running? Its log "
            "says why it serves no local socket"
        ) from err
    finally:
        connection.close()
    try:
        document = json.loads(body)
    except ValueError as err:
        raise AgentUnreachableError(f"GET {resource} on {path}: not JSON ({err})") from err
    if response.status != 200:
        said = document.get("error") if isinstance(document, dict) else document
        raise AgentUnreachableError(f"GET {resource} on {path}: {response.status} {said}")
    return document


# -- the documents -------------------------------------------------------------------------------


def version_document() -> dict[str, str]:
    """``version -o json``: this build, and what it runs on."""
    try:
        libbpf_version = introspect.libbpf_version()
    except libbpf.BpfError as err:  # no libbpf.so.1: the agent cannot run, but can say so
        libbpf_version = f"unavailable ({str(err).split(';', 1)[0]})"
    return {
        "version": VERSION,
        "python": platform.python_version(),
        "libbpf": libbpf_version,
        "kernel": platform.release(),
    }


# -- text ----------------------------------------------------------------------------------------


def table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> str:
    """Columns padded to their widest cell; the last column is not padded."""
    lines = [list(header)] if header else []
    lines += [list(row) for row in rows]
    if not lines:
        return ""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]) - 1)]
    return "\n".join(
        "  ".join(
            [*(cell.ljust(w) for cell, w in zip(line, widths, strict=False)), line[-1]]
        ).rstrip()
        for line in lines
    )


def version_text(document: dict[str, str]) -> str:
    return table([(key, value) for key, value in document.items()])


def check_text(report: preflight.HostReport) -> str:
    failed, warned = len(report.failures), len(report.warnings)
    verdict = "ok" if report.ok else f"FAILED ({failed} check{'s' * (failed != 1)} failed)"
    if warned:
        verdict += f", {warned} warning{'s' * (warned != 1)}"
    rows = []
    for check in report.checks:
        result = "ok" if check.ok else ("FAIL" if check.level == "error" else "warn")
        rows.append((check.name, result, check.detail))
        if not check.ok and check.fix:
            rows.append(("", "", f"fix: {check.fix}"))
    return f"node {report.node}: {verdict}\n" + table(rows, ("CHECK", "RESULT", "DETAIL"))


def status_text(status: StatusReply) -> str:
    ready = "yes" if status.not_ready is None else f"no: {status.not_ready}"
    how: str = status.startup or "?"
    if status.startup_reason:
        how += f" ({status.startup_reason})"
    attached = "attached" if status.attached else "NOT attached"
    if status.uninstalled:
        attached += " (uninstalled)"
    applied = "none yet"
    if status.applied_generation is not None:
        applied = f"generation {status.applied_generation}, epoch {status.applied_epoch}"
        if status.last_apply_time is not None:
            applied += f", at {status.last_apply_time.isoformat(timespec='seconds')}"
    pods = f"{status.pods_accelerated} accelerated, {len(status.unresolved)} unresolved"
    if status.pods_vanished:
        pods += f", {status.pods_vanished} removed since start (cgroup gone)"
    errors = str(status.apply_errors)
    if status.apply_errors_by_reason:
        errors += " (" + ", ".join(f"{k} {v}" for k, v in status.apply_errors_by_reason.items())
        errors += ")"
    rows = [
        ("version", status.version or "?"),
        ("ready", ready),
        ("datapath", f"{attached}, {how}"),
        ("attach cgroup", status.attach_cgroup or "?"),
        ("features", ", ".join(status.datapath_features or []) or "-"),
        ("pins", status.pin_root),
        ("applied set", applied),
        ("pods", pods),
        ("apply errors", errors),
        ("boot id", f"{status.boot_id}, started {status.started_at.isoformat(timespec='seconds')}"),
    ]
    programs = [
        (
            p.hook,
            "attached" if p.attached else "MISSING",
            "-" if p.program_id is None else str(p.program_id),
            "-" if p.link_id is None else str(p.link_id),
            p.pin,
        )
        for p in status.programs
    ]
    maps = [(m.name, str(m.entries), str(m.max_entries)) for m in status.maps]
    parts = [
        table(rows),
        table(programs, ("HOOK", "STATE", "PROGRAM", "LINK", "PIN")),
        table(maps, ("MAP", "ENTRIES", "CAPACITY")),
    ]
    if status.unresolved:
        parts.append(unresolved_text(status.unresolved))
    if status.counters:
        counters = [(name, str(n)) for name, n in sorted(status.counters.items()) if n]
        parts.append(table(counters, ("COUNTER", "VALUE")) if counters else "counters: all 0")
    return "\n\n".join(parts)


def unresolved_text(unresolved: Sequence[Any]) -> str:
    return table(
        [(f"{u.namespace}/{u.name}", u.uid, u.reason) for u in unresolved],
        ("UNRESOLVED POD", "UID", "REASON"),
    )


def short_lived_text(pod: AppliedPod) -> str:
    """The addresses whose application hops are left to TCP for now, if any."""
    short = [str(use.ip) for use in pod.app_connections if use.short_lived]
    return f"; short-lived app connections on {','.join(short)}" if short else ""


def pods_text(pods: PodsReply) -> str:
    generation = "none yet" if pods.applied_generation is None else pods.applied_generation
    rows = [
        (
            p.namespace,
            p.name,
            ",".join(map(str, p.addresses)),
            "accelerated",
            f"cgroup id {p.cgroup_id}" + short_lived_text(p),
        )
        for p in pods.pods
    ]
    rows += [(u.namespace, u.name, "-", "unresolved", u.reason) for u in pods.unresolved]
    head = f"applied set: generation {generation}; {len(pods.pods)} accelerated, "
    head += f"{len(pods.unresolved)} unresolved"
    if not rows:
        return head
    return head + "\n" + table(rows, ("NAMESPACE", "NAME", "IP", "STATE", "DETAIL"))


# -- the commands --------------------------------------------------------------------------------


def _emit(output: str, document: Any, text: Callable[[], str]) -> None:
    print(json.dumps(document, indent=2) if output == "json" else text())


def run_version(loaded: LoadedSettings) -> int:
    document = version_document()
    _emit(loaded.output, document, lambda: version_text(document))
    return EXIT_OK


def run_check(loaded: LoadedSettings) -> int:
    report = preflight.check_settings(loaded, mount_bpffs=False)
    _emit(loaded.output, report.as_json(), lambda: check_text(report))
    return EXIT_OK if report.ok else EXIT_PROBLEM


def run_status(loaded: LoadedSettings) -> int:
    document = get_local(loaded.settings.local_socket, "/v1/status")
    status = _parse(StatusReply, document, "/v1/status")
    _emit(loaded.output, document, lambda: status_text(status))
    return EXIT_OK if status.not_ready is None else EXIT_PROBLEM


def run_pods(loaded: LoadedSettings) -> int:
    document = get_local(loaded.settings.local_socket, "/v1/pods")
    pods = _parse(PodsReply, document, "/v1/pods")
    _emit(loaded.output, document, lambda: pods_text(pods))
    return EXIT_PROBLEM if pods.unresolved else EXIT_OK


_Reply = TypeVar("_Reply", StatusReply, PodsReply)


def _parse(model: type[_Reply], document: Any, resource: str) -> _Reply:
    try:
        return model.model_validate(document)
    except ValidationError as err:  # an agent of another release (the version says which)
        raise AgentUnreachableError(f"GET {resource}: not a {model.__name__}: {err}") from err


COMMANDS: dict[str, Callable[[LoadedSettings], int]] = {
    "version": run_version,
    "check": run_check,
    "status": run_status,
    "pods": run_pods,
}


def report(loaded: LoadedSettings) -> int:
    """Run the report ``loaded.command``; its exit code."""
    try:
        return COMMANDS[loaded.command](loaded)
    except AgentUnreachableError as err:
        print(f"meshaccel-agent {loaded.command}: {err}", file=sys.stderr)
        return EXIT_PROBLEM
    except SettingsError as err:  # attach_cgroup outside the cgroup2 hierarchy, as at start
        print(err, file=sys.stderr)
        return EXIT_INVALID_SETTINGS
