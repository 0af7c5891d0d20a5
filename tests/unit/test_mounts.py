"""/proc/self/mountinfo parsing, the cgroup2 mount and bpffs (agent/mounts.py)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshaccel.agent import mounts
from tests.requirements import require, require_kernel

TEST_PREFIX = "meshaccel-test-mounts"


@dataclass(frozen=True)
class MountCase:
    line: str
    mount_point: str
    fstype: str
    reason: str


MOUNT_CASES = [
    MountCase(
        "41 23 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw",
        "/sys/fs/cgroup/unified",
        "cgroup2",
        "plain line without optional fields",
    ),
    MountCase(
        "43 23 0:40 / /sys/fs/bpf rw,relatime shared:7 master:1 - bpf bpf rw,mode=700",
        "/sys/fs/bpf",
        "bpf",
        "optional fields before the separator",
    ),
    MountCase(
        r"50 23 0:41 / /mnt/with\040space rw - tmpfs tmp\040fs rw",
        "/mnt/with space",
        "tmpfs",
        "octal escapes in the mount point",
    ),
]


@pytest.mark.parametrize("case", MOUNT_CASES, ids=lambda c: c.reason)
def test_parse_mountinfo(case: MountCase) -> None:
    (mount,) = mounts.parse_mountinfo(case.line + "\n")
    assert (str(mount.mount_point), mount.fstype) == (case.mount_point, case.fstype), case.reason


def test_parse_mountinfo_skips_malformed_lines() -> None:
    assert mounts.parse_mountinfo("garbage\n1 2 3\n\n") == []


def test_mount_lookups_on_a_hybrid_layout(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 0:20 / / rw - ext4 /dev/root rw\n"
        "23 22 0:21 / /sys rw - sysfs sysfs rw\n"
        "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
        "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
        "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
        "60 23 0:50 / /sys/fs/bpf rw - tmpfs tmpfs rw\n"
        "61 23 0:51 / /sys/fs/bpf rw - bpf bpf rw\n"
    )
    assert mounts.find_cgroup2_mount(mountinfo) == Path("/sys/fs/cgroup/unified")
    pins = mounts.mount_of("/sys/fs/bpf/meshaccel/maps", mountinfo)
    assert pins is not None and pins[0] == Path("/sys/fs/bpf") and pins[1] == "bpf"
    other = mounts.mount_of("/sys/kernel", mountinfo)
    assert other is not None and other.fstype == "sysfs"
    no_cg2 = tmp_path / "v1-only"
    no_cg2.write_text("32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n")
    assert mounts.find_cgroup2_mount(no_cg2) is None


def test_real_cgroup2_mount_is_found() -> None:
    cg2 = mounts.find_cgroup2_mount()
    require(cg2 is not None, "needs a cgroup v2 mount")
    assert cg2 is not None and (cg2 / "cgroup.procs").is_file()


@pytest.mark.kernel
def test_ensure_bpffs_mounts_once_and_reports_it(tmp_path: Path) -> None:
    require_kernel()
    target = tmp_path / f"{TEST_PREFIX}-bpffs"
    try:
        assert mounts.ensure_bpffs(target) is True
        mount = mounts.mount_of(target)
        assert mount is not None and mount.mount_point == target and mount.fstype == "bpf"
        assert mounts.ensure_bpffs(target) is False
        sub = target / "meshaccel"
        assert mounts.ensure_bpffs(sub) is False and sub.is_dir()
    finally:
        mount = mounts.mount_of(target)
        if mount is not None and mount.mount_point == target:
            subprocess.run(["umount", str(target)], check=True)
