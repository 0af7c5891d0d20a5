"""Each missing host requirement is reported with its cause and its fix.

These tests replace the probes' answers (the kernel here has everything), never the loader.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from meshaccel.agent import libbpf, mounts, prerequisites
from meshaccel.agent.prerequisites import (
    KernelFeatureError,
    NoBtfError,
    NoCgroup2Error,
    NotPrivilegedError,
)


def test_missing_btf_names_the_kernel_option(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(prerequisites, "VMLINUX_BTF", tmp_path / "vmlinux")
    with pytest.raises(NoBtfError, match="CONFIG_DEBUG_INFO_BTF=y"):
        prerequisites.check_btf()


def test_missing_cgroup2_says_how_to_mount_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mounts, "find_cgroup2_mount", lambda: None)
    with pytest.raises(NoCgroup2Error, match="mount -t cgroup2"):
        prerequisites.cgroup2_root()


def test_missing_kernel_features_are_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        libbpf, "probe_prog_type", lambda prog_type: prog_type != libbpf.ProgType.SK_MSG
    )
    monkeypatch.setattr(
        libbpf, "probe_map_type", lambda map_type: map_type != libbpf.MapType.SOCKHASH
    )
    with pytest.raises(KernelFeatureError) as error:
        prerequisites.check_kernel_features()
    assert "sk_msg (4.17)" in str(error.value)
    assert "SOCKHASH (4.18)" in str(error.value)
    assert "5.15 or newer" in str(error.value)


_BPF_NET_ADMIN = (1 << prerequisites.CAP_BPF) | (1 << prerequisites.CAP_NET_ADMIN)


@pytest.mark.parametrize(
    ("cap_eff", "sk_msg", "missing"),
    [
        pytest.param(0, False, "CAP_BPF, CAP_NET_ADMIN", id="no capabilities at all"),
        pytest.param(1 << prerequisites.CAP_SYS_ADMIN, True, None, id="CAP_SYS_ADMIN is enough"),
        pytest.param(_BPF_NET_ADMIN, False, None, id="CAP_BPF with CAP_NET_ADMIN, no sk_msg"),
        pytest.param(
            1 << prerequisites.CAP_BPF, False, "CAP_NET_ADMIN", id="CAP_BPF alone cannot attach"
        ),
        pytest.param(
            _BPF_NET_ADMIN,
            True,
            "CAP_PERFMON",
            id="sk_msg reads its socket's queue: CAP_PERFMON too",
        ),
        pytest.param(
            _BPF_NET_ADMIN | (1 << prerequisites.CAP_PERFMON),
            True,
            None,
            id="CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON for sk_msg",
        ),
    ],
)
def test_privileges_from_effective_capabilities(
    monkeypatch: pytest.MonkeyPatch, cap_eff: int, sk_msg: bool, missing: str | None
) -> None:
    monkeypatch.setattr(prerequisites, "effective_capabilities", lambda: cap_eff)
    if missing is None:
        prerequisites.check_privileges(sk_msg=sk_msg)
    else:
        with pytest.raises(NotPrivilegedError, match=f"missing {missing} "):
            prerequisites.check_privileges(sk_msg=sk_msg)


def test_effective_capabilities_parses_proc_status(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n")
    assert prerequisites.effective_capabilities(status) == 0x1FFFFFFFFFF


def test_a_directory_outside_cgroup2_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NoCgroup2Error, match="is not a cgroup v2 directory"):
        prerequisites.check_cgroup(tmp_path)
