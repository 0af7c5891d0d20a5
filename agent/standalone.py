"""Standalone mode: the node's pod set comes from a YAML file, watched for changes.

The file has the shape of ``PUT /v1/pods`` (:class:`~meshaccel.contract.api.PodSet`),
each pod with the ``cgroup`` that identifies it (relative to the cgroup2 root)::

    generation: 7            # optional: without it, each new version gets the next number
    pods:
      - uid: 2f0c8a6e-0001
        namespace: default
        name: a
        ip: 198.18.0.10
        cgroup: kubepods/besteffort/pod2f0c8a6e-0001
        options: {excluded_outbound_ports: [9090], sk_msg_to_app: true}

The watcher polls the file's identity (device, inode, size, mtime, ctime) every
``interval`` seconds, a single ``stat`` that costs nothing and sees edits in place as well as
atomic replacements (rename over it, a ConfigMap's symlink swap). A changed file is read,
validated with the API's own models and applied through the reconciler. A file that does not
parse or validate is logged with the field at fault and skipped: the set applied before stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml
from pydantic import ValidationError

from meshaccel.contract.api import ApplyResult, PodSet

log = logging.getLogger(__name__)

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class PodSetApplier(Protocol):
    """What the watcher needs of the reconciler."""

    @property
    def applied_generation(self) -> int | None: ...

    def apply(self, pod_set: PodSet) -> ApplyResult: ...


class PodsFileError(Exception):
    """The file cannot become a pod set; ``field`` names what is at fault."""

    def __init__(self, message: str, *, field: str = "", pod: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.pod = pod


def _field_path(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _pod_label(document: dict[str, Any], loc: tuple[int | str, ...]) -> str:
    """``namespace/name`` of the pod an error points into, when the file says it."""
    if len(loc) >= 2 and loc[0] == "pods" and isinstance(loc[1], int):
        pods = document.get("pods")
        if isinstance(pods, list) and 0 <= loc[1] < len(pods) and isinstance(pods[loc[1]], dict):
            pod = pods[loc[1]]
            return f"{pod.get('namespace', '?')}/{pod.get('name', '?')}"
    return ""


def parse_pod_set(text: str, default_generation: int) -> tuple[PodSet, bool]:
    """The pod set in ``text`` and whether the file gave its own generation.

    Raises :class:`PodsFileError` naming the line or field at fault.
    """
    try:
        document = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise PodsFileError(f"not valid YAML: {problem}", field=where) from err
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise PodsFileError("must be a mapping with 'pods' (and optionally 'generation')")
    has_generation = "generation" in document
    if not has_generation:
        document = {**document, "generation": default_generation}
    try:
        return PodSet.model_validate(document), has_generation
    except ValidationError as err:
        first = err.errors()[0]
        loc = tuple(first["loc"])
        message = str(first["msg"]).removeprefix("Value error, ")
        extra = len(err.errors()) - 1
        if extra:
            message += f" (and {extra} more error{'s' if extra > 1 else ''})"
        raise PodsFileError(
            message, field=_field_path(loc) or "(the set)", pod=_pod_label(document, loc)
        ) from None


@dataclass(frozen=True)
class _FileIdentity:
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, path: Path) -> _FileIdentity | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class PodsFileWatcher:
    """Applies every new version of the pods file through the reconciler.

    :meth:`poll` does one check (blocking: the caller runs it off the event loop);
    :meth:`run` polls until stopped.
    """

    def __init__(self, path: Path, reconciler: PodSetApplier, *, interval: float = 1.0) -> None:
        self.path = path
        self.interval = interval
        self._reconciler = reconciler
        self._seen: _FileIdentity | None = None
        self._seen_missing = False
        self._digest: bytes | None = None  # of the content last handled (applied or refused)
        self._counter = 0
        self.applied: int = 0  # versions applied
        self.last_result: ApplyResult | None = None
        self.last_error: str | None = None

    def _next_generation(self) -> int:
        applied = self._reconciler.applied_generation
        return max(self._counter + 1, (applied if applied is not None else 0) + 1)

    def poll(self) -> bool:
        """Check the file once; apply it if it changed. True if a new set was applied."""
        identity = _FileIdentity.of(self.path)
        if identity is None:
            if not self._seen_missing:
                self._seen_missing = True
                log.warning(
                    "pods file does not exist (yet): the applied set stays",
                    extra={"file": str(self.path)},
                )
            self._seen = None
            return False
        self._seen_missing = False
        if identity == self._seen:
            return False
        self._seen = identity
        try:
            data = self.path.read_bytes()
        except OSError as err:
            self._refuse(f"cannot read it: {err.strerror}", field="", pod="")
            return False
        digest = hashlib.sha256(data).digest()
        if digest == self._digest:
            return False  # touched or rewritten with the same content
        self._digest = digest
        return self._load_and_apply(data)

    def _load_and_apply(self, data: bytes) -> bool:
        try:
            pod_set, own_generation = parse_pod_set(
                data.decode("utf-8", errors="strict"), self._next_generation()
            )
        except UnicodeDecodeError:
            self._refuse("not UTF-8 text", field="", pod="")
            return False
        except PodsFileError as err:
            self._refuse(err.message, field=err.field, pod=err.pod)
            return False
        try:
            result = self._reconciler.apply(pod_set)
        except Exception as err:  # the reconciler refuses whole sets: nothing changed
            self._refuse(
                f"{type(err).__name__}: {err}",
                field="generation" if "generation" in str(err).lower() else "",
                pod="",
                generation=pod_set.generation,
            )
            return False
        if not own_generation:
            self._counter = pod_set.generation
        self.applied += 1
        self.last_result = result
        self.last_error = None
        log.info(
            "pods file applied",
            extra={
                "file": str(self.path),
                "generation": result.applied_generation,
                "pods": len(pod_set.pods),
                "added": result.added,
                "updated": result.updated,
                "removed": result.removed,
                "unresolved": len(result.unresolved),
                "duration_ms": round(result.duration_ms, 3),
            },
        )
        return True

    def _refuse(self, why: str, *, field: str, pod: str, generation: int | None = None) -> None:
        self.last_error = f"{field}: {why}" if field else why
        extra: dict[str, Any] = {"file": str(self.path), "field": field, "reason": why}
        if pod:
            extra["pod"] = pod
        if generation is not None:
            extra["generation"] = generation
        log.error("pods file refused: the applied set stays", extra=extra)

    async def run(self, stop: asyncio.Event) -> None:
        """Poll every ``interval`` seconds until ``stop`` is set."""
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.poll)
            except Exception:  # never let one bad poll end the watch
                log.exception("pods file check failed", extra={"file": str(self.path)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.interval)
