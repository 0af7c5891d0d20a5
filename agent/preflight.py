"""The host report: every prerequisite of the datapath as a named check with what was found
and the fix, run once at start-up and by ``meshaccel-agent check``; and that report as the
kubelet's termination message when start-up stops on it (docs/agent.md, "Checks")."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from meshaccel.agent import config, libbpf, mounts, prerequisites
from meshaccel.agent.config import LoadedSettings
from meshaccel.agent.datapath import CGROUP_HOOKS, OBJECT_FILES, PinLayout, default_objects_dir
from meshaccel.agent.libbpf import introspect
from meshaccel.agent.prerequisites import DatapathError, ObjectProgram, PrerequisiteError

log = logging.getLogger(__name__)

Level = Literal["error", "warning"]
#: The kubelet reads at most this much of a termination message.
TERMINATION_MESSAGE_LIMIT = 4096


@dataclass(frozen=True)
class Check:
    """One prerequisite: ``ok`` or not, what was found, what to do. A failed ``error`` check
    stops start-up; a failed ``warning`` check is logged and start-up goes on."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    level: Level = "error"
    extra: dict[str, Any] = field(default_factory=dict)
    error: Exception | None = field(default=None, compare=False, repr=False)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ok": self.ok,
            "detail": self.detail,
            "fix": self.fix,
            "level": self.level,
            **self.extra,
        }


@dataclass(frozen=True)
class HostReport:
    """Every check, in the order they ran, and what start-up takes from them."""

    node: str
    checks: tuple[Check, ...]
    cgroup2_mount: Path | None = None
    attach_cgroup: Path | None = None

    @property
    def ok(self) -> bool:
        """No error-level check failed (warnings do not count)."""
        return not self.failures

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and c.level == "error"]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and c.level == "warning"]

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def raise_for_failure(self) -> None:
        """Raise the first failed error-level check's exception (start-up stops on it)."""
        if not self.failures:
            return
        first = self.failures[0]
        if first.error is not None:
            raise first.error
        raise DatapathError(f"{first.detail}: {first.fix}" if first.fix else first.detail)

    def as_json(self) -> dict[str, Any]:
        return {"node": self.node, "ok": self.ok, "checks": [c.as_json() for c in self.checks]}


def _run(name: str, check: Callable[[], str | None], level: Level = "error") -> Check:
    """One check: its returned line, or the failure it raised."""
    try:
        detail = check()
    except PrerequisiteError as err:
        return Check(name, False, err.detail, err.fix, level, error=err)
    except libbpf.BpfError as err:  # a probe the kernel refused (privileges, seccomp)
        return Check(name, False, str(err).split("\n", 1)[0], "", level, error=err)
    return Check(name, True, detail or "", level=level)


def _not_checked(name: str, because: str, level: Level = "error") -> Check:
    return Check(name, False, f"not checked: {because}", level=level)


def check_host(
    *,
    node: str,
    sk_msg: bool,
    attach_cgroup: Path | None,
    pin_root: Path,
    instance: str,
    objects_dir: Path | None = None,
    mount_bpffs: bool = True,
) -> HostReport:
    """Every prerequisite of loading (or adopting) the datapath for these settings.

    ``attach_cgroup`` None: the cgroup2 mount. ``mount_bpffs``: mount bpffs at /sys/fs/bpf if
    it is missing (start-up does; ``meshaccel-agent check`` only looks). The checks are
    looked up in :mod:`.prerequisites` when they run, so that a test may switch the
    privileges and kernel features off to watch the kernel refuse instead.
    """
    checks: list[Check] = [
        _run("capabilities", lambda: prerequisites.check_privileges(sk_msg=sk_msg)),
        _run("btf", prerequisites.check_btf),
        _run("kernel_features", prerequisites.check_kernel_features),
    ]
    cgroup2 = _run("cgroup2", lambda: f"mounted at {prerequisites.cgroup2_root()}")
    checks.append(cgroup2)
    mount = prerequisites.cgroup2_root() if cgroup2.ok else None
    attach = attach_cgroup or mount
    if attach is not None:
        attach_check = _run("attach_cgroup", lambda: prerequisites.check_cgroup(attach))
    else:
        attach_check = _not_checked("attach_cgroup", "no cgroup2 mount")
    checks.append(attach_check)
    checks.append(_run("bpffs", lambda: prerequisites.check_bpffs(pin_root, mount=mount_bpffs)))
    paths = [(objects_dir or default_objects_dir()) / name for name in OBJECT_FILES]
    programs: list[ObjectProgram] = []

    def objects() -> str:
        found = prerequisites.check_objects(paths)
        programs.extend(prerequisites.object_programs(paths))
        return f"{found}, {len(programs)} programs"

    checks.append(_run("objects", objects))
    if programs:
        checks.append(_run("helpers", lambda: prerequisites.check_helpers(programs)))
    else:
        checks.append(_not_checked("helpers", "the objects could not be read"))
    if attach is not None and attach_check.ok and programs:
        checks.append(conflicting_programs(attach, PinLayout(pin_root / instance), programs))
    else:
        checks.append(
            _not_checked(
                "conflicting_programs", "needs the attach cgroup and the objects", "warning"
            )
        )
    return HostReport(node, tuple(checks), cgroup2_mount=mount, attach_cgroup=attach)


def check_settings(loaded: LoadedSettings, *, mount_bpffs: bool) -> HostReport:
    """:func:`check_host` for the agent's settings. An attach_cgroup or kubelet_cgroup_root
    outside the cgroup2 hierarchy is an invalid setting (SettingsError), as at start-up."""
    settings = loaded.settings
    mount = mounts.find_cgroup2_mount()
    if mount is not None:
        config.check_cgroup_settings(loaded, mount)
    return check_host(
        node=settings.node_name,
        sk_msg=settings.sk_msg_redirect,
        attach_cgroup=settings.attach_cgroup,
        pin_root=settings.pin_root,
        instance=settings.instance,
        objects_dir=settings.bpf_objects,
        mount_bpffs=mount_bpffs,
    )


# -- other owners' programs on the datapath's hooks ----------------------------------------------


@dataclass(frozen=True)
class ForeignProgram:
    """A program of another owner that runs on one of the datapath's cgroup hooks."""

    hook: str
    id: int
    name: str | None  # None: reading it needs CAP_SYS_ADMIN
    cgroup: str | None  # where it is attached: the attach cgroup or an ancestor

    def __str__(self) -> str:
        name = f" {self.name}" if self.name else ""
        where = f" attached at {self.cgroup}" if self.cgroup else ""
        return f"{self.hook}: program {self.id}{name}{where}"


def own_program_ids(pins: PinLayout) -> set[int]:
    """The programs of the datapath pinned at ``pins`` (none when nothing is pinned)."""
    found = set()
    for hook in CGROUP_HOOKS:
        path = pins.link(hook.link)
        if path.exists():
            with (
                contextlib.suppress(libbpf.BpfError, OSError),
                libbpf.Link.open_pinned(path) as link,
            ):
                found.add(link.info().prog_id)
    return found


def _ancestors(cgroup: Path, mount: Path) -> list[Path]:
    """``cgroup`` and each parent up to the cgroup2 mount, nearest first."""
    chain = [cgroup]
    while chain[-1].resolve() != mount.resolve() and chain[-1] != chain[-1].parent:
        chain.append(chain[-1].parent)
    return chain


def foreign_programs(
    attach_cgroup: Path, pins: PinLayout, programs: Sequence[ObjectProgram]
) -> list[ForeignProgram]:
    """Programs that run for ``attach_cgroup`` (its own and its ancestors', BPF_PROG_QUERY
    with BPF_F_QUERY_EFFECTIVE) on the attach types of the datapath's cgroup hooks, other
    than the datapath's own (pinned at ``pins``). Programs attached below ``attach_cgroup``
    are not looked for."""
    by_program = {(p.object_file, p.name): p.attach_type for p in programs}
    hooks = {
        hook.link: by_program[(hook.object_file, hook.program)]
        for hook in CGROUP_HOOKS
        if (hook.object_file, hook.program) in by_program
    }
    own = own_program_ids(pins)
    mount = prerequisites.cgroup2_root()
    chain = _ancestors(attach_cgroup, mount)
    found = []
    with contextlib.ExitStack() as stack:
        fds = {}
        for cgroup in chain:
            fds[cgroup] = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
            stack.callback(os.close, fds[cgroup])
        for hook, attach_type in hooks.items():
            running = introspect.query_cgroup_programs(fds[attach_cgroup], attach_type)
            others = [prog_id for prog_id in running if prog_id not in own]
            if not others:
                continue
            attached_at = {}
            for cgroup in reversed(chain):  # nearest wins: a program attached twice
                for prog_id in introspect.query_cgroup_programs(
                    fds[cgroup], attach_type, effective=False
                ):
                    attached_at[prog_id] = str(cgroup)
            for prog_id in others:
                found.append(
                    ForeignProgram(hook, prog_id, _program_name(prog_id), attached_at.get(prog_id))
                )
    return found


def _program_name(prog_id: int) -> str | None:
    try:
        return introspect.program_info_by_id(prog_id).name
    except libbpf.BpfError:
        return None  # EPERM without CAP_SYS_ADMIN; ENOENT if it went away meanwhile


def conflicting_programs(
    attach_cgroup: Path, pins: PinLayout, programs: Sequence[ObjectProgram]
) -> Check:
    """A warning-level check: other owners' programs on the datapath's hooks."""
    name = "conflicting_programs"
    try:
        found = foreign_programs(attach_cgroup, pins, programs)
    except (libbpf.BpfError, OSError) as err:
        return Check(
            name,
            False,
            f"could not list the programs attached to {attach_cgroup}: "
            + str(err).split("\n", 1)[0],
            "run the check with CAP_NET_ADMIN (the agent's own capabilities), or look with "
            f"`bpftool cgroup tree {attach_cgroup}` on the node",
            "warning",
        )
    hooks = ", ".join(sorted({hook.link for hook in CGROUP_HOOKS}))
    listed = [{"hook": f.hook, "id": f.id, "name": f.name, "cgroup": f.cgroup} for f in found]
    if not found:
        return Check(
            name,
            True,
            f"no other program runs on {hooks} for {attach_cgroup}",
            level="warning",
            extra={"programs": listed},
        )
    unnamed = [f.id for f in found if f.name is None]
    show = f"; `bpftool prog show id {unnamed[0]}` names it" if unnamed else ""
    return Check(
        name,
        False,
        f"{len(found)} program(s) of another owner run on the datapath's hooks for "
        f"{attach_cgroup}: " + "; ".join(map(str, found)),
        "they run for the same connections as meshaccel's (before or after them): make sure "
        "they do not redirect the same connects or take the same sockets, or remove them "
        f"(`bpftool cgroup tree {attach_cgroup}`{show}); meshaccel loads all the same",
        "warning",
        extra={"programs": listed},
    )


# -- the termination message ----------------------------------------------------------------------


def termination_message(report: HostReport, limit: int = TERMINATION_MESSAGE_LIMIT) -> str:
    """The report as compact JSON of at most ``limit`` bytes: every check while it fits, then
    the failed ones only, then their details cut short."""
    document = report.as_json()
    text = _compact(document)
    if len(text.encode()) <= limit:
        return text
    document["checks"] = [c.as_json() for c in report.checks if not c.ok]
    document["omitted"] = "checks that passed"
    text = _compact(document)
    width = 1024
    while len(text.encode()) > limit and width > 16:
        for check in document["checks"]:
            for key in ("detail", "fix"):
                if len(check[key]) > width:
                    check[key] = check[key][: width - 3] + "..."
            check.pop("programs", None)
        text = _compact(document)
        width //= 2
    if len(text.encode()) > limit:  # a pathological number of failures
        text = _compact({"node": report.node, "ok": report.ok, "checks": []})
    return text


def _compact(document: dict[str, Any]) -> str:
    return json.dumps(document, separators=(",", ":"))


def write_termination_message(report: HostReport, path: Path | None) -> bool:
    """Write the report where the kubelet reads it. Only into a file that exists (the kubelet
    makes it, ``terminationMessagePath``): outside Kubernetes nothing is written. True if
    written."""
    if path is None or not path.is_file():
        return False
    try:
        path.write_text(termination_message(report))
    except OSError as err:
        log.warning(
            "cannot write the termination message",
            extra={"path": str(path), "reason": f"{type(err).__name__}: {err}"},
        )
        return False
    return True
