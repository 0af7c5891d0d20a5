"""The host's mounts, from /proc/self/mountinfo: where cgroup2 is, whether a path is on bpffs.

Never hard-code /sys/fs/cgroup: hybrid hosts mount cgroup2 at /sys/fs/cgroup/unified.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from pathlib import Path
from typing import NamedTuple


class MountInfo(NamedTuple):
    """One line of /proc/<pid>/mountinfo (proc(5)), mount point and fstype first."""

    mount_point: Path
    fstype: str
    source: str
    root: str
    mount_id: int
    parent_id: int
    super_options: str


_MOUNTINFO = Path("/proc/self/mountinfo")
_MOUNTINFO_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(text: str) -> str:
    # The kernel writes space, tab, newline and backslash as \ooo (octal).
    return _MOUNTINFO_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), text)


def parse_mountinfo(text: str) -> list[MountInfo]:
    """Parse mountinfo text; malformed lines are skipped."""
    mounts: list[MountInfo] = []
    for line in text.splitlines():
        parts = line.split(" ")
        try:
            sep = parts.index("-", 6)  # the optional fields end with a lone "-"
            mounts.append(
                MountInfo(
                    mount_point=Path(_unescape(parts[4])),
                    fstype=parts[sep + 1],
                    source=_unescape(parts[sep + 2]),
                    root=_unescape(parts[3]),
                    mount_id=int(parts[0]),
                    parent_id=int(parts[1]),
                    super_options=parts[sep + 3] if len(parts) > sep + 3 else "",
                )
            )
        except (ValueError, IndexError):
            continue
    return mounts


def _read_mounts(mountinfo: Path) -> list[MountInfo]:
    return parse_mountinfo(mountinfo.read_text(errors="surrogateescape"))


def find_cgroup2_mount(mountinfo: Path = _MOUNTINFO) -> Path | None:
    """Mount point of cgroup v2 (``/sys/fs/cgroup``, or ``.../unified`` on hybrid hosts)."""
    found = [m for m in _read_mounts(mountinfo) if m.fstype == "cgroup2"]
    # Prefer a mount of the hierarchy's root over bind mounts of a subtree.
    best = next((m for m in found if m.root == "/"), found[0] if found else None)
    return best.mount_point if best is not None else None


def mount_of(path: Path | str, mountinfo: Path = _MOUNTINFO) -> MountInfo | None:
    """The mount holding ``path`` (``[0]`` mount point, ``[1]`` fstype), or None."""
    target = Path(os.path.abspath(path))
    best: MountInfo | None = None
    for m in _read_mounts(mountinfo):
        covers = target == m.mount_point or m.mount_point in target.parents
        # Longest prefix wins; at the same point a later line is mounted on top.
        if covers and (best is None or len(m.mount_point.parts) >= len(best.mount_point.parts)):
            best = m
    return best


def ensure_bpffs(path: Path | str = "/sys/fs/bpf", mountinfo: Path = _MOUNTINFO) -> bool:
    """Make ``path`` a directory on bpffs, mounting bpffs there if needed; True if mounted.

    Raises OSError (a plain syscall failure, not libbpf's) when mkdir or mount fails.
    """
    target = Path(path)
    mount = mount_of(target, mountinfo)
    if mount is not None and mount.fstype == "bpf":
        target.mkdir(parents=True, exist_ok=True)
        return False
    target.mkdir(parents=True, exist_ok=True)
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc_mount = libc.mount
    libc_mount.restype = ctypes.c_int
    libc_mount.argtypes = (
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_char_p,
    )
    if int(libc_mount(b"bpf", os.fsencode(target), b"bpf", 0, b"mode=0700")) != 0:
        err = ctypes.get_errno()
        fix = {
            errno.EPERM: "run as root (CAP_SYS_ADMIN), or give the agent a hostPath /sys/fs/bpf",
            errno.ENODEV: "use a kernel with CONFIG_BPF_SYSCALL",
        }.get(err, "mount -t bpf bpf " + str(target))
        raise OSError(err, f"mount bpffs at {target}: {os.strerror(err)}; fix: {fix}", str(target))
    return True
