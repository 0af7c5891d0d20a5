"""What the host must offer before the datapath can load, each failure with its cause and fix.

Every ``check_*`` raises a :class:`PrerequisiteError` (``detail`` and ``fix``) when its
prerequisite is missing and otherwise returns a line saying what it found; :mod:`.preflight`
runs them all into one report (start-up and ``meshaccel-agent check``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from meshaccel.agent import libbpf, mounts
from meshaccel.agent.libbpf import introspect

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

# capability(7) numbers
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39


class DatapathError(Exception):
    """The datapath cannot be set up here; the message names the cause and the fix."""


class PrerequisiteError(DatapathError):
    """A host prerequisite is missing: ``detail`` says what was found, ``fix`` what to do."""

    def __init__(self, detail: str, fix: str) -> None:
        super().__init__(f"{detail}: {fix}")
        self.detail = detail
        self.fix = fix


class NotPrivilegedError(PrerequisiteError):
    pass


class NoBtfError(PrerequisiteError):
    pass


class KernelFeatureError(PrerequisiteError):
    pass


class NoCgroup2Error(PrerequisiteError):
    pass


class ObjectMissingError(PrerequisiteError):
    pass


class BpffsNotMountedError(PrerequisiteError):
    pass


def effective_capabilities(status: Path = Path("/proc/self/status")) -> int:
    for line in status.read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def has_capability(cap: int) -> bool:
    return bool(effective_capabilities() & (1 << cap))


def check_privileges(*, sk_msg: bool) -> str:
    """The capabilities the kernel will ask for. With ``sk_msg``, the redirect program reads its
    own socket's receive queue (``bpf_skc_to_tcp_sock``), which the kernel offers only to
    loaders with CAP_PERFMON."""
    caps = effective_capabilities()

    def has(cap: int) -> bool:
        return bool(caps & (1 << cap))

    if has(CAP_SYS_ADMIN):
        return f"CAP_SYS_ADMIN held (uid {os.geteuid()})"
    needed = {"CAP_BPF": CAP_BPF, "CAP_NET_ADMIN": CAP_NET_ADMIN}
    if sk_msg:
        needed["CAP_PERFMON"] = CAP_PERFMON
    missing = [name for name, cap in needed.items() if not has(cap)]
    if not missing:
        return f"{', '.join(needed)} held (uid {os.geteuid()})"
    hint = (
        " (CAP_PERFMON lets the sk_msg program read its socket's receive queue; without "
        "it, turn socket-to-socket delivery off)"
        if "CAP_PERFMON" in missing
        else ""
    )
    raise NotPrivilegedError(
        f"loading the datapath needs root, or {' and '.join(needed)}; missing "
        f"{', '.join(missing)} (uid {os.geteuid()}, CapEff {caps:#x})",
        f"run the agent as root or grant those capabilities{hint}",
    )


def check_btf() -> str:
    if not VMLINUX_BTF.exists():
        raise NoBtfError(
            f"{VMLINUX_BTF} is missing: the kernel was built without CONFIG_DEBUG_INFO_BTF, "
            "and meshaccel's CO-RE objects need kernel BTF",
            "use a distribution kernel from 5.15 on, or rebuild with CONFIG_DEBUG_INFO_BTF=y",
        )
    return f"{VMLINUX_BTF} present"


# Program types, map types and the helpers that decide whether each one is
# usable, with the kernel release that brought them in.
PROGRAM_TYPES = {
    libbpf.ProgType.CGROUP_SOCK_ADDR: "cgroup/connect4 (4.17)",
    libbpf.ProgType.SOCK_OPS: "sockops (4.13)",
    libbpf.ProgType.SK_MSG: "sk_msg (4.17)",
    libbpf.ProgType.CGROUP_SOCKOPT: "cgroup/getsockopt (5.3)",
}
MAP_TYPES = {
    libbpf.MapType.SOCKHASH: "SOCKHASH (4.18)",
    libbpf.MapType.LPM_TRIE: "LPM_TRIE (4.11)",
    libbpf.MapType.LRU_HASH: "LRU_HASH (4.10)",
    libbpf.MapType.PERCPU_ARRAY: "PERCPU_ARRAY (4.6)",
    libbpf.MapType.SK_STORAGE: "SK_STORAGE (5.2)",
}
_KERNEL_FIX = (
    "meshaccel needs Linux 5.15 or newer with CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF and "
    "CONFIG_BPF_STREAM_PARSER"
)


def probe_kernel_features() -> dict[str, bool]:
    """Each program and map type the datapath uses: can this kernel make it? (Needs the
    capabilities to load programs: without them every probe fails with BpfError.)"""
    found = {name: libbpf.probe_prog_type(t) for t, name in PROGRAM_TYPES.items()}
    found |= {name: libbpf.probe_map_type(t) for t, name in MAP_TYPES.items()}
    return found


@functools.cache
def kernel_features() -> dict[str, bool]:
    """What /v1/status reports of the kernel: each program and map type the datapath uses, and
    vmlinux BTF; probed once (the answers do not change)."""
    found = {f"program_{t.name.lower()}": libbpf.probe_prog_type(t) for t in PROGRAM_TYPES}
    found |= {f"map_{t.name.lower()}": libbpf.probe_map_type(t) for t in MAP_TYPES}
    found["btf_vmlinux"] = VMLINUX_BTF.exists()
    return found


def check_kernel_features() -> str:
    features = probe_kernel_features()
    missing = [name for name, present in features.items() if not present]
    if missing:
        raise KernelFeatureError(f"this kernel lacks {', '.join(missing)}", _KERNEL_FIX)
    return f"{len(PROGRAM_TYPES)} program types and {len(MAP_TYPES)} map types available"


@dataclass(frozen=True)
class ObjectProgram:
    """One program of the shipped objects, as the kernel will be asked to load it."""

    object_file: str
    name: str
    prog_type: libbpf.ProgType
    attach_type: libbpf.AttachType
    helpers: frozenset[int]


def object_programs(paths: Sequence[Path]) -> list[ObjectProgram]:
    """The programs of the objects at ``paths``: type, attach type and the helpers they call,
    read from the files (opened, not loaded)."""
    found = []
    for path in paths:
        with libbpf.BpfObject.open(path) as obj:
            for program in obj.programs:
                found.append(
                    ObjectProgram(
                        object_file=path.name,
                        name=program.name,
                        prog_type=program.prog_type,
                        attach_type=introspect.program_attach_type(program),
                        helpers=introspect.program_helpers(program),
                    )
                )
    return found


def helper_names() -> dict[int, str]:
    """``enum bpf_func_id`` of the running kernel (its BTF): id -> ``bpf_<name>``."""
    if not VMLINUX_BTF.exists():
        return {}
    with libbpf.Btf.parse(VMLINUX_BTF) as btf:
        values = btf.enum_values("bpf_func_id") or {}
    return {value: "bpf_" + name.removeprefix("BPF_FUNC_") for name, value in values.items()}


def check_helpers(programs: Sequence[ObjectProgram]) -> str:
    """Every helper each of ``programs`` (:func:`object_programs`) calls is one this kernel
    lets its program type call. Helpers are probed with this process's privileges: some are
    offered only to loaders with CAP_PERFMON, and nothing can be probed without CAP_BPF; what
    could not be told apart from a missing privilege is named in the result, not failed (the
    privileges check says what is missing)."""
    names = helper_names()
    perfmon = has_capability(CAP_PERFMON) or has_capability(CAP_SYS_ADMIN)
    refused: list[str] = []
    unprobed: list[str] = []
    count = 0
    for program in programs:
        for helper in sorted(program.helpers):
            count += 1
            label = f"{program.name} ({program.prog_type.name.lower()}): "
            label += names.get(helper, f"helper #{helper} (unknown to this kernel)")
            try:
                offered = introspect.probe_helper(program.prog_type, program.attach_type, helper)
            except libbpf.BpfError as err:
                unprobed.append(f"{label} ({_first_line(err)})")
                continue
            if offered:
                continue
            (refused if perfmon else unprobed).append(label)
    if refused:
        raise KernelFeatureError(
            f"this kernel does not let these programs call these helpers: {'; '.join(refused)}",
            _KERNEL_FIX,
        )
    detail = f"{count} helper calls of {len(programs)} programs offered by this kernel"
    if unprobed:
        detail += (
            f", except {len(unprobed)} that this process may not probe without more "
            f"privilege: {'; '.join(unprobed)}"
        )
    return detail


def _first_line(err: Exception) -> str:
    return str(err).split("\n", 1)[0]


def cgroup2_root() -> Path:
    mount = mounts.find_cgroup2_mount()
    if mount is None:
        raise NoCgroup2Error(
            "no cgroup2 filesystem is mounted (see /proc/self/mountinfo)",
            "boot with systemd.unified_cgroup_hierarchy=1, or mount one: "
            "mount -t cgroup2 none /sys/fs/cgroup/unified",
        )
    return mount


def check_cgroup(path: Path) -> str:
    root = cgroup2_root()
    if not path.is_dir() or not (path / "cgroup.procs").exists():
        raise NoCgroup2Error(
            f"{path} is not a cgroup v2 directory (the cgroup2 mount is {root})",
            "give a directory of the cgroup2 hierarchy as attach_cgroup (default: its root)",
        )
    if not path.resolve().is_relative_to(root.resolve()):
        raise NoCgroup2Error(
            f"{path} is not under the cgroup2 mount {root}",
            "give a directory of the cgroup2 hierarchy as attach_cgroup (default: its root)",
        )
    return f"{path} (cgroup id {os.stat(path).st_ino}) under the cgroup2 mount {root}"


def check_objects(paths: Sequence[Path]) -> str:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ObjectMissingError(
            f"eBPF object(s) not found: {', '.join(missing)}",
            "build them with `make -C bpf` (or reinstall the agent package, which ships them)",
        )
    return f"{len(paths)} objects in {', '.join(sorted({str(p.parent) for p in paths}))}"


def check_bpffs(pin_root: Path, *, mount: bool = True) -> str:
    """Pins only survive the agent on a bpf filesystem. With ``mount``, bpffs is mounted at
    /sys/fs/bpf if it is missing there (start-up); without, only looked for (a check)."""
    if mount:
        try:
            mounts.ensure_bpffs()
        except OSError as err:
            raise BpffsNotMountedError(
                f"bpffs is not mounted at /sys/fs/bpf and mounting it failed ({err})",
                "mount -t bpf bpf /sys/fs/bpf (in Kubernetes, a hostPath volume of /sys/fs/bpf)",
            ) from err
    found = mounts.mount_of(pin_root)
    if found is None or found[1] != "bpf":
        raise BpffsNotMountedError(
            f"{pin_root} is not on a bpf filesystem (it is on {found}): pins there would not "
            "outlive the agent",
            "use a directory under /sys/fs/bpf, and mount bpffs there: mount -t bpf bpf "
            "/sys/fs/bpf (in Kubernetes, a hostPath volume of /sys/fs/bpf)",
        )
    return f"{pin_root} is on the bpf filesystem mounted at {found[0]}"
