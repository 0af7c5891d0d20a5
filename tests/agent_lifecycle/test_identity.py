"""Pod identity: kubelet's cgroup layouts, built as real cgroups, resolved to their ids.

Each case makes the directories of one kubelet layout under a test cgroup of our own in the
cgroup2 mount (mkdir there creates real cgroups, whose inode number is the cgroup id the
datapath sees) and checks what CgroupResolver finds. Everything is removed afterwards.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshaccel.agent.identity import (
    CgroupDriver,
    CgroupResolver,
    QosClass,
    kubelet_pod_cgroup,
)
from meshaccel.agent.reconcile import UnresolvedPodError
from meshaccel.contract.api import PodSpec
from tests.netlab.cgroups import TEST_CGROUP_PREFIX, TestCgroup, cgroup_id
from tests.requirements import require_cgroup2, require_root

pytestmark = pytest.mark.kernel

UID = "6f1c2d3e-aaaa-4bbb-8ccc-0123456789ab"
_numbers = itertools.count(900)


@pytest.fixture
def hierarchy() -> Iterator[TestCgroup]:
    """An empty test cgroup `<cgroup2>/meshaccel-test-<pid>-9xx`, removed with its children."""
    require_root()
    require_cgroup2()
    cgroup = TestCgroup(f"{TEST_CGROUP_PREFIX}{os.getpid()}-{next(_numbers)}")
    with cgroup:
        yield cgroup


def pod(uid: str = UID, cgroup: str | None = None) -> PodSpec:
    return PodSpec.model_validate(
        {"uid": uid, "namespace": "shop", "name": "cart", "ip": "198.18.0.10", "cgroup": cgroup}
    )


@dataclass(frozen=True)
class LayoutCase:
    driver: CgroupDriver
    qos: QosClass
    path: str  # what kubelet creates, relative to its cgroup root
    reason: str

    def __str__(self) -> str:
        return f"{self.driver}-{self.qos}"


UID_ = UID.replace("-", "_")
LAYOUTS = [
    LayoutCase(
        CgroupDriver.SYSTEMD,
        QosClass.GUARANTEED,
        f"kubepods.slice/kubepods-pod{UID_}.slice",
        "systemd, Guaranteed: directly under kubepods.slice, dashes of the UID escaped",
    ),
    LayoutCase(
        CgroupDriver.SYSTEMD,
        QosClass.BURSTABLE,
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice",
        "systemd, Burstable: under the burstable slice",
    ),
    LayoutCase(
        CgroupDriver.SYSTEMD,
        QosClass.BESTEFFORT,
        f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice",
        "systemd, BestEffort: under the besteffort slice",
    ),
    LayoutCase(
        CgroupDriver.CGROUPFS,
        QosClass.GUARANTEED,
        f"kubepods/pod{UID}",
        "cgroupfs, Guaranteed: directly under kubepods, UID as is",
    ),
    LayoutCase(
        CgroupDriver.CGROUPFS,
        QosClass.BURSTABLE,
        f"kubepods/burstable/pod{UID}",
        "cgroupfs, Burstable",
    ),
    LayoutCase(
        CgroupDriver.CGROUPFS,
        QosClass.BESTEFFORT,
        f"kubepods/besteffort/pod{UID}",
        "cgroupfs, BestEffort",
    ),
]


def test_layouts_are_kubelets() -> None:
    for case in LAYOUTS:
        assert str(kubelet_pod_cgroup(UID, case.driver, case.qos)) == case.path, case.reason


@pytest.mark.parametrize("case", LAYOUTS, ids=str)
def test_resolves_every_driver_and_qos_class(hierarchy: TestCgroup, case: LayoutCase) -> None:
    directory = hierarchy.child(case.path)
    # A container cgroup below the pod, as kubelet makes: the pod level is still the answer.
    hierarchy.child(f"{case.path}/cri-containerd-0123.scope")
    expected = cgroup_id(directory)
    for driver in (case.driver, CgroupDriver.AUTO):
        resolver = CgroupResolver(hierarchy.path, driver)
        assert resolver.resolve(pod()) == expected, f"{case.reason} (driver {driver})"
        assert resolver.locate(pod()) == directory, case.reason
    other = CgroupDriver.CGROUPFS if case.driver is CgroupDriver.SYSTEMD else CgroupDriver.SYSTEMD
    with pytest.raises(UnresolvedPodError) as refused:
        CgroupResolver(hierarchy.path, other).resolve(pod())
    assert f"cgroup driver {other}" in refused.value.reason, case.reason


def test_unresolved_reason_says_what_was_looked_for(hierarchy: TestCgroup) -> None:
    hierarchy.child("kubepods.slice/kubepods-burstable.slice")
    with pytest.raises(UnresolvedPodError) as refused:
        CgroupResolver(hierarchy.path, "auto").resolve(pod())
    reason = refused.value.reason
    assert f"no cgroup for pod uid {UID} under {hierarchy.path}" in reason
    assert "(cgroup driver auto)" in reason
    for case in LAYOUTS:  # every place, both drivers
        assert case.path in reason, case.reason


def test_two_layouts_at_once_are_not_guessed(hierarchy: TestCgroup) -> None:
    hierarchy.child(f"kubepods/burstable/pod{UID}")
    hierarchy.child(f"kubepods/besteffort/pod{UID}")
    with pytest.raises(UnresolvedPodError) as refused:
        CgroupResolver(hierarchy.path, "cgroupfs").resolve(pod())
    assert "more than one cgroup" in refused.value.reason


def test_uid_of_another_pod_is_not_taken(hierarchy: TestCgroup) -> None:
    hierarchy.child(f"kubepods/burstable/pod{UID}")
    with pytest.raises(UnresolvedPodError):
        CgroupResolver(hierarchy.path, "auto").resolve(pod(uid=UID.replace("a", "b")))


@dataclass(frozen=True)
class ExplicitCase:
    cgroup: str
    expected: str | None  # directory relative to the root, or None: refused
    refusal: str  # a piece of the reason when refused
    reason: str


EXPLICIT = [
    ExplicitCase("pods/a", "pods/a", "", "a relative path below the root"),
    ExplicitCase("/pods/a", "pods/a", "", "a leading slash, as /proc/<pid>/cgroup writes it"),
    ExplicitCase("pods/./a", "pods/a", "", "'.' components are harmless"),
    ExplicitCase("pods/../pods/a", None, "'..' is not allowed", "'..' anywhere is refused"),
    ExplicitCase("../escape", None, "'..' is not allowed", "'..' above the root is refused"),
    ExplicitCase("/", None, "the root cgroup is not a pod", "the root itself is not a pod"),
    ExplicitCase("pods/missing", None, "does not exist", "a cgroup that is not there"),
    ExplicitCase("pods/a/cgroup.procs", None, "not a cgroup v2 directory", "a file, not a cgroup"),
]


@pytest.mark.parametrize("case", EXPLICIT, ids=lambda c: c.cgroup)
def test_explicit_cgroup(hierarchy: TestCgroup, case: ExplicitCase) -> None:
    hierarchy.child("pods/a")
    resolver = CgroupResolver(hierarchy.path, "auto")
    if case.expected is not None:
        assert resolver.resolve(pod(cgroup=case.cgroup)) == cgroup_id(
            hierarchy.path / case.expected
        ), case.reason
        return
    with pytest.raises(UnresolvedPodError) as refused:
        resolver.resolve(pod(cgroup=case.cgroup))
    assert case.refusal in refused.value.reason, case.reason


def test_explicit_cgroup_ignored_in_kubernetes_mode(hierarchy: TestCgroup) -> None:
    """A Kubernetes agent finds pods by UID; a `cgroup` in the set does not redirect it."""
    by_uid = hierarchy.child(f"kubepods/pod{UID}")
    hierarchy.child("elsewhere")
    resolver = CgroupResolver(hierarchy.path, "auto", explicit_cgroups=False)
    assert resolver.resolve(pod(cgroup="elsewhere")) == cgroup_id(by_uid)


def test_symlink_out_of_the_root_is_refused(hierarchy: TestCgroup, tmp_path: Path) -> None:
    """cgroupfs has no symlinks, but a resolver root elsewhere might: never leave the root."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(hierarchy.path)
    with pytest.raises(UnresolvedPodError) as refused:
        CgroupResolver(root, "auto").resolve(pod(cgroup="link"))
    assert "leads out of the cgroup filesystem" in refused.value.reason


def test_pod_outside_the_attach_cgroup_is_refused(hierarchy: TestCgroup) -> None:
    attach = hierarchy.child("attached")
    inside = hierarchy.child("attached/pod-a")
    hierarchy.child("elsewhere/pod-b")
    resolver = CgroupResolver(hierarchy.path, "auto", attach_cgroup=attach)
    assert resolver.resolve(pod(cgroup="attached/pod-a")) == cgroup_id(inside)
    with pytest.raises(UnresolvedPodError) as refused:
        resolver.resolve(pod(cgroup="elsewhere/pod-b"))
    assert "outside the attach cgroup" in refused.value.reason


def test_pod_deeper_than_the_datapath_looks_is_refused(hierarchy: TestCgroup) -> None:
    mount = require_cgroup2()
    level = len(hierarchy.path.relative_to(mount).parts)  # 1
    shallow = "/".join(f"l{i}" for i in range(8 - level))  # at level 8: still seen
    deep = shallow + "/l9"
    hierarchy.child(deep)
    resolver = CgroupResolver(hierarchy.path, "auto", cgroup2_mount=mount)
    assert resolver.resolve(pod(cgroup=shallow)) == cgroup_id(hierarchy.path / shallow)
    with pytest.raises(UnresolvedPodError) as refused:
        resolver.resolve(pod(cgroup=deep))
    assert "level 9" in refused.value.reason
