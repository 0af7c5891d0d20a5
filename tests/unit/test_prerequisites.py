"""Each missing host requirement is reported with its cause and its fix.

These tests replace the probes' answers (the kernel here has everything), never the loader;
tests/agent/test_commands.py runs the same checks against this machine's kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from meshaccel.agent import libbpf, mounts, preflight, prerequisites
from meshaccel.agent.libbpf import introspect
from meshaccel.agent.prerequisites import (
    KernelFeatureError,
    NoBtfError,
    NoCgroup2Error,
    NotPrivilegedError,
    ObjectProgram,
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


def test_a_failure_carries_its_cause_and_its_fix_apart(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What `meshaccel-agent check` shows as "detail" and "fix", and start-up as one line."""
    monkeypatch.setattr(prerequisites, "VMLINUX_BTF", tmp_path / "vmlinux")
    with pytest.raises(NoBtfError) as error:
        prerequisites.check_btf()
    assert error.value.detail.startswith(f"{tmp_path / 'vmlinux'} is missing")
    assert error.value.fix.endswith("rebuild with CONFIG_DEBUG_INFO_BTF=y")
    assert str(error.value) == f"{error.value.detail}: {error.value.fix}"
    (tmp_path / "vmlinux").touch()
    assert prerequisites.check_btf() == f"{tmp_path / 'vmlinux'} present"


SOCK_OPS = ObjectProgram(
    "sockops.bpf.o",
    "track_sockets",
    libbpf.ProgType.SOCK_OPS,
    libbpf.AttachType.CGROUP_SOCK_OPS,
    frozenset({1, 137}),
)
HELPER_NAMES = {1: "bpf_map_lookup_elem", 137: "bpf_skc_to_tcp_sock"}


@dataclass(frozen=True)
class HelperCase:
    reason: str
    offered: bool | None  # the probe's answer for helper 137; None: the probe is refused
    perfmon: bool
    refused: bool  # the check fails
    said: str


HELPER_CASES = [
    HelperCase("every helper offered", True, True, False, "2 helper calls of 1 programs"),
    HelperCase(
        "refused with CAP_PERFMON held: the kernel lacks it",
        False,
        True,
        True,
        "track_sockets (sock_ops): bpf_skc_to_tcp_sock",
    ),
    HelperCase(
        "refused without CAP_PERFMON: it may be the privilege, named but not failed",
        False,
        False,
        False,
        "may not probe without more privilege: track_sockets (sock_ops): bpf_skc_to_tcp_sock",
    ),
    HelperCase(
        "no probe may load (no CAP_BPF): named but not failed, the privileges check says why",
        None,
        True,
        False,
        "may not probe without more privilege: track_sockets (sock_ops): bpf_skc_to_tcp_sock "
        "(probe helper #137",
    ),
]


@pytest.mark.parametrize("case", HELPER_CASES, ids=[c.reason for c in HELPER_CASES])
def test_helpers_missing_from_the_kernel_fail_the_check(
    monkeypatch: pytest.MonkeyPatch, case: HelperCase
) -> None:
    def probe(prog_type: libbpf.ProgType, attach_type: libbpf.AttachType, helper: int) -> bool:
        assert (prog_type, attach_type) == (SOCK_OPS.prog_type, SOCK_OPS.attach_type)
        if helper != 137:
            return True
        if case.offered is None:
            raise libbpf.BpfError(
                f"probe helper #{helper} for SOCK_OPS programs: [errno 1]", errno=1, func="x"
            )
        return case.offered

    monkeypatch.setattr(introspect, "probe_helper", probe)
    monkeypatch.setattr(prerequisites, "helper_names", lambda: HELPER_NAMES)
    held = {prerequisites.CAP_PERFMON} if case.perfmon else set()
    monkeypatch.setattr(prerequisites, "has_capability", lambda cap: cap in held)
    if case.refused:
        with pytest.raises(KernelFeatureError) as error:
            prerequisites.check_helpers([SOCK_OPS])
        assert case.said in error.value.detail, case.reason
        assert "5.15 or newer" in error.value.fix
    else:
        assert case.said in prerequisites.check_helpers([SOCK_OPS]), case.reason


def test_checks_that_cannot_run_say_so_and_the_first_failure_stops_start_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(prerequisites, "effective_capabilities", lambda: 0)
    monkeypatch.setattr(libbpf, "probe_prog_type", lambda prog_type: True)
    monkeypatch.setattr(libbpf, "probe_map_type", lambda map_type: True)
    monkeypatch.setattr(mounts, "find_cgroup2_mount", lambda: None)
    report = preflight.check_host(
        node="n",
        sk_msg=True,
        attach_cgroup=None,
        pin_root=tmp_path / "pins",
        instance="x",
        objects_dir=tmp_path,
        mount_bpffs=False,
    )
    checks = {c.name: c for c in report.checks}
    assert not report.ok
    assert [c.name for c in report.failures] == [
        "capabilities",
        "cgroup2",
        "attach_cgroup",
        "bpffs",
        "objects",
        "helpers",
    ]
    assert checks["kernel_features"].ok and checks["btf"].ok == prerequisites.VMLINUX_BTF.exists()
    assert checks["attach_cgroup"].detail == "not checked: no cgroup2 mount"
    assert checks["helpers"].detail == "not checked: the objects could not be read"
    assert report.warnings == [checks["conflicting_programs"]]
    assert checks["conflicting_programs"].detail.startswith("not checked")
    with pytest.raises(NotPrivilegedError, match="missing CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON"):
        report.raise_for_failure()
    assert report.as_json()["checks"][0] == {
        "name": "capabilities",
        "ok": False,
        "detail": checks["capabilities"].detail,
        "fix": checks["capabilities"].fix,
        "level": "error",
    }
