"""What the host must offer before the datapath can load, each failure with its fix."""

from __future__ import annotations

import os
from pathlib import Path

from meshaccel.agent import libbpf, mounts

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

# capability(7) numbers
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39


class DatapathError(Exception):
    """The datapath cannot be set up here; the message names the cause and the fix."""


class NotPrivilegedError(DatapathError):
    pass


class NoBtfError(DatapathError):
    pass


class KernelFeatureError(DatapathError):
    pass


class NoCgroup2Error(DatapathError):
    pass


class ObjectMissingError(DatapathError):
    pass


class BpffsNotMountedError(DatapathError):
    pass


def effective_capabilities(status: Path = Path("/proc/self/status")) -> int:
    for line in status.read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_privileges(*, sk_msg: bool) -> None:
    """The capabilities the kernel will ask for. With ``sk_msg``, the redirect program reads its
    own socket's receive queue (``bpf_skc_to_tcp_sock``), which the kernel offers only to
    loaders with CAP_PERFMON."""
    caps = effective_capabilities()

    def has(cap: int) -> bool:
        return bool(caps & (1 << cap))

    if has(CAP_SYS_ADMIN):
        return
    needed = {"CAP_BPF": CAP_BPF, "CAP_NET_ADMIN": CAP_NET_ADMIN}
    if sk_msg:
        needed["CAP_PERFMON"] = CAP_PERFMON
    missing = [name for name, cap in needed.items() if not has(cap)]
    if not missing:
        return
    hint = (
        " (CAP_PERFMON lets the sk_msg program read its socket's receive queue; without "
        "it, turn socket-to-socket delivery off)"
        if "CAP_PERFMON" in missing
        else ""
    )
    raise NotPrivilegedError(
        f"loading the datapath needs root, or {' and '.join(needed)}; missing "
        f"{', '.join(missing)} (uid {os.geteuid()}, CapEff {caps:#x}): run the agent as root "
        f"or grant those capabilities{hint}"
    )


def check_btf() -> None:
    if not VMLINUX_BTF.exists():
        raise NoBtfError(
            f"{VMLINUX_BTF} is missing: the kernel was built without CONFIG_DEBUG_INFO_BTF. "
            "meshaccel's CO-RE objects need kernel BTF: use a distribution kernel from 5.15 "
            "on, or rebuild with CONFIG_DEBUG_INFO_BTF=y"
        )


# Program types, map types and the helpers that decide whether each one is
# usable, with the kernel release that brought them in.
_PROGRAM_TYPES = {
    libbpf.ProgType.CGROUP_SOCK_ADDR: "cgroup/connect4 (4.17)",
    libbpf.ProgType.SOCK_OPS: "sockops (4.13)",
    libbpf.ProgType.SK_MSG: "sk_msg (4.17)",
    libbpf.ProgType.CGROUP_SOCKOPT: "cgroup/getsockopt (5.3)",
}
_MAP_TYPES = {
    libbpf.MapType.SOCKHASH: "SOCKHASH (4.18)",
    libbpf.MapType.LPM_TRIE: "LPM_TRIE (4.11)",
    libbpf.MapType.LRU_HASH: "LRU_HASH (4.10)",
    libbpf.MapType.PERCPU_ARRAY: "PERCPU_ARRAY (4.6)",
    libbpf.MapType.SK_STORAGE: "SK_STORAGE (5.2)",
}


def check_kernel_features() -> None:
    missing = [
        name for prog_type, name in _PROGRAM_TYPES.items() if not libbpf.probe_prog_type(prog_type)
    ]
    missing += [
        name for map_type, name in _MAP_TYPES.items() if not libbpf.probe_map_type(map_type)
    ]
    if missing:
        raise KernelFeatureError(
            f"this kernel lacks {', '.join(missing)}: meshaccel needs Linux 5.15 or newer "
            "with CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF and CONFIG_BPF_STREAM_PARSER"
        )


def cgroup2_root() -> Path:
    mount = mounts.find_cgroup2_mount()
    if mount is None:
        raise NoCgroup2Error(
            "no cgroup2 filesystem is mounted (see /proc/self/mountinfo): boot with "
            "systemd.unified_cgroup_hierarchy=1, or mount one: "
            "mount -t cgroup2 none /sys/fs/cgroup/unified"
        )
    return mount


def check_cgroup(path: Path) -> None:
    root = cgroup2_root()
    if not path.is_dir() or not (path / "cgroup.procs").exists():
        raise NoCgroup2Error(f"{path} is not a cgroup v2 directory (the cgroup2 mount is {root})")
    if not path.resolve().is_relative_to(root.resolve()):
        raise NoCgroup2Error(f"{path} is not under the cgroup2 mount {root}")


def check_objects(paths: list[Path]) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ObjectMissingError(
            f"eBPF object(s) not found: {', '.join(missing)}. Build them with `make -C bpf` "
            "(or reinstall the agent package, which ships them)"
        )


def check_bpffs(pin_root: Path) -> None:
    """Pins only survive the agent on a bpf filesystem; mount the default one if it is missing."""
    try:
        mounts.ensure_bpffs()
    except OSError as err:
        raise BpffsNotMountedError(
            f"bpffs is not mounted at /sys/fs/bpf and mounting it failed ({err}): "
            "mount -t bpf bpf /sys/fs/bpf (in Kubernetes, a hostPath volume of /sys/fs/bpf)"
        ) from err
    mount = mounts.mount_of(pin_root)
    if mount is None or mount[1] != "bpf":
        raise BpffsNotMountedError(
            f"{pin_root} is not on a bpf filesystem (it is on {mount}): pins there would not "
            "outlive the agent. Use a directory under /sys/fs/bpf"
        )
