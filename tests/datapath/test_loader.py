"""The loader and the pod API against the real kernel: errors name their cause, failures undo."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import pytest

from meshaccel.agent import layout, libbpf
from meshaccel.agent.datapath import (
    OBJECT_FILES,
    AlreadyLoadedError,
    Datapath,
    MapFullError,
    ProgrammedPods,
    default_objects_dir,
    earlier_release,
)
from meshaccel.agent.layout import TrafficDirection
from meshaccel.agent.pods import AcceleratedPod, decode_u64, port_key, u64
from meshaccel.agent.prerequisites import (
    BpffsNotMountedError,
    NoCgroup2Error,
    ObjectMissingError,
)
from meshaccel.contract.modes import ISTIO, LINKERD
from meshaccel.contract.settings import Capacities
from tests.datapath.conftest import PIN_ROOT, load_datapath, unload_quietly
from tests.netlab import Node

pytestmark = pytest.mark.kernel

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "bpf"


@pytest.fixture
def datapath(mesh: Node) -> Datapath:
    return Datapath.adopt(instance=mesh.token, pin_root=PIN_ROOT)


@pytest.fixture(autouse=True)
def loaded(mesh: Node):
    load_datapath(mesh).close()
    yield
    unload_quietly(mesh)


def attached_programs(cgroup: Path) -> str:
    out = subprocess.run(
        ["bpftool", "cgroup", "show", str(cgroup)],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return "\n".join(line for line in out.splitlines() if line and not line.startswith("ID"))


def test_pods_read_back_exactly_as_written(datapath: Datapath) -> None:
    a = AcceleratedPod.in_mesh(
        ISTIO,
        1001,
        "198.18.1.1",
        excluded_outbound_ports=frozenset({5432}),
        excluded_inbound_ports=frozenset({9100}),
        excluded_outbound_cidrs=frozenset({IPv4Network("10.96.0.0/12")}),
        included_outbound_cidrs=frozenset({IPv4Network("198.18.0.0/15"), IPv4Network("0.0.0.0/0")}),
    )
    b = AcceleratedPod.in_mesh(LINKERD, 1002, "198.18.1.2")
    datapath.put_pod(a)
    datapath.put_pod(b)
    assert datapath.pods() == {1001: a, 1002: b}

    # An update that drops options leaves no stale entries behind.
    slimmer = AcceleratedPod.in_mesh(ISTIO, 1001, "198.18.1.3")
    datapath.put_pod(slimmer)
    assert datapath.pods() == {1001: slimmer, 1002: b}

    assert datapath.delete_pod(1001)
    assert not datapath.delete_pod(1001)
    assert datapath.pods() == {1002: b}


def pod_ips(datapath: Datapath) -> dict[IPv4Address | IPv6Address, int]:
    """The raw pod_ips map: address -> cgroup id."""
    with libbpf.Map.from_pin(datapath.pins.map("pod_ips")) as bpf_map:
        return {layout.address_of(k): decode_u64(v) for k, v in bpf_map.items()}


def test_pods_of_both_families_read_back_exactly_as_written(datapath: Datapath) -> None:
    dual = AcceleratedPod.in_mesh(
        ISTIO,
        7001,
        "198.18.7.1",
        ipv6="fd00:198:18::7:1",
        excluded_outbound_cidrs=frozenset({IPv4Network("10.96.0.0/12"), IPv6Network("fd00::/8")}),
        included_outbound_cidrs=frozenset({IPv4Network("0.0.0.0/0"), IPv6Network("::/0")}),
    )
    only6 = AcceleratedPod.in_mesh(LINKERD, 7002, "fd00:198:18::7:2")
    assert (dual.ip, dual.ipv6) == (IPv4Address("198.18.7.1"), IPv6Address("fd00:198:18::7:1"))
    assert (only6.ip, only6.ipv6) == (None, IPv6Address("fd00:198:18::7:2"))
    datapath.put_pod(dual)
    datapath.put_pod(only6)
    assert datapath.read_pods() == ProgrammedPods({7001: dual, 7002: only6}, orphans={})
    assert pod_ips(datapath) == {dual.ip: 7001, dual.ipv6: 7001, only6.ipv6: 7002}

    # Dropping a family releases its address; another pod's IPv6 address is refused.
    only4 = dataclasses.replace(dual, ipv6=None, excluded_outbound_cidrs=frozenset())
    datapath.put_pod(only4, previous=dual)
    assert pod_ips(datapath) == {dual.ip: 7001, only6.ipv6: 7002}
    with pytest.raises(ValueError, match=r"fd00:198:18::7:2 already belongs to the pod with"):
        datapath.put_pod(dataclasses.replace(only4, ipv6=only6.ipv6), previous=only4)
    assert datapath.read_pods() == ProgrammedPods({7001: only4, 7002: only6}, orphans={})
    assert datapath.delete_pod(7002, previous=only6)
    assert pod_ips(datapath) == {dual.ip: 7001}


def test_writes_given_what_is_programmed_read_nothing_back(
    datapath: Datapath, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = AcceleratedPod.in_mesh(
        ISTIO,
        4001,
        "198.18.4.1",
        excluded_outbound_ports=frozenset({5432}),
        excluded_outbound_cidrs=frozenset({IPv4Network("10.96.0.0/12")}),
    )
    moved = AcceleratedPod.in_mesh(
        ISTIO,
        4001,
        "198.18.4.2",
        excluded_inbound_ports=frozenset({9100}),
        included_outbound_cidrs=frozenset({IPv4Network("198.18.0.0/15")}),
    )
    b = AcceleratedPod.in_mesh(LINKERD, 4002, "198.18.4.3")

    def no_reading(cgroup_id: int) -> None:
        raise AssertionError(f"pod {cgroup_id} was read back")

    with monkeypatch.context() as patched:
        patched.setattr(datapath, "pod", no_reading)
        datapath.put_pod(a, previous=None)
        datapath.put_pod(b, previous=None)
        datapath.put_pod(moved, previous=a)
    assert datapath.read_pods() == ProgrammedPods({4001: moved, 4002: b}, orphans={})
    assert pod_ips(datapath) == {moved.ip: 4001, b.ip: 4002}

    with pytest.raises(ValueError, match="previous is the pod 4002, not 4001"):
        datapath.put_pod(moved, previous=b)
    with monkeypatch.context() as patched:
        patched.setattr(datapath, "pod", no_reading)
        assert datapath.delete_pod(4001, previous=moved)
        assert not datapath.delete_pod(4001, previous=None)
    assert datapath.read_pods() == ProgrammedPods({4002: b}, orphans={})  # nothing left of 4001


def test_two_pods_swap_addresses_with_take_ip(datapath: Datapath) -> None:
    a = AcceleratedPod.in_mesh(ISTIO, 5001, "198.18.5.1")
    b = AcceleratedPod.in_mesh(ISTIO, 5002, "198.18.5.2")
    datapath.put_pod(a)
    datapath.put_pod(b)
    a2, b2 = dataclasses.replace(a, ip=b.ip), dataclasses.replace(b, ip=a.ip)

    with pytest.raises(ValueError, match="already belongs to the pod with cgroup id 5002"):
        datapath.put_pod(a2, previous=a)
    datapath.put_pod(a2, previous=a, take_ip=True)
    datapath.put_pod(b2, previous=b, take_ip=True)  # leaves a2's claim on b's old address

    assert datapath.read_pods() == ProgrammedPods({5001: a2, 5002: b2}, orphans={})
    assert pod_ips(datapath) == {b.ip: 5001, a.ip: 5002}


def test_entries_of_no_pod_are_found_and_removed(datapath: Datapath) -> None:
    a = AcceleratedPod.in_mesh(ISTIO, 6001, "198.18.6.1", excluded_outbound_ports=frozenset({81}))
    datapath.put_pod(a)
    stray_port = port_key(6999, 9090, TrafficDirection.DIRECTION_OUTBOUND)
    with (
        libbpf.Map.from_pin(datapath.pins.map("pod_ports")) as ports,
        libbpf.Map.from_pin(datapath.pins.map("pod_ips")) as ips,
    ):
        ports.update(stray_port, b"\x01")
        ips.update(stray := key_of("198.18.6.2"), u64(6999))  # a pod that is not there
        ips.update(moved := key_of("198.18.6.3"), u64(6001))  # a's address before a move

    read = datapath.read_pods()
    assert read.pods == {6001: a} and datapath.pod(6001) == a
    assert read.orphans == {"pod_ports": {stray_port}, "pod_ips": {stray, moved}}
    assert datapath.remove_orphans(read.orphans) == 3
    assert datapath.read_pods() == ProgrammedPods({6001: a}, orphans={})


def key_of(address: str) -> bytes:
    return layout.address_bytes(IPv4Address(address))


def test_address_of_another_pod_is_refused_and_nothing_changes(datapath: Datapath) -> None:
    first = AcceleratedPod.in_mesh(ISTIO, 2001, "198.18.2.1")
    datapath.put_pod(first)
    with pytest.raises(
        ValueError, match=r"198\.18\.2\.1 already belongs to the pod with cgroup id 2001"
    ):
        datapath.put_pod(AcceleratedPod.in_mesh(ISTIO, 2002, "198.18.2.1"))
    assert datapath.pods() == {2001: first}


def test_full_map_is_refused_whole(mesh: Node) -> None:
    unload_quietly(mesh)
    # Room for one Istio pod's 13 excluded ports, not for two.
    with Datapath.load(
        mesh.cgroup.path,
        instance=mesh.token,
        pin_root=PIN_ROOT,
        capacities=Capacities(pods=4, pod_ports=20),
    ) as datapath:
        first = AcceleratedPod.in_mesh(ISTIO, 3001, "198.18.3.1")
        datapath.put_pod(first)
        with pytest.raises(MapFullError, match="map pod_ports is full \\(20 entries\\)"):
            datapath.put_pod(AcceleratedPod.in_mesh(ISTIO, 3002, "198.18.3.2"))
        assert datapath.pods() == {3001: first}  # and none of 3002's ports are left behind
        datapath.delete_pod(3001)
        second = AcceleratedPod.in_mesh(ISTIO, 3002, "198.18.3.2")
        datapath.put_pod(second)

        # An update given what is programmed: its new ports do not fit, and none stays.
        grown = AcceleratedPod.in_mesh(
            ISTIO, 3002, "198.18.3.3", excluded_outbound_ports=frozenset(range(1000, 1008))
        )
        with pytest.raises(MapFullError, match="map pod_ports is full"):
            datapath.put_pod(grown, previous=second)
        assert datapath.read_pods() == ProgrammedPods({3002: second}, orphans={})
        assert pod_ips(datapath) == {second.ip: 3002}


def test_second_load_is_refused(mesh: Node) -> None:
    with pytest.raises(AlreadyLoadedError, match="adopt it"):
        load_datapath(mesh)


def test_missing_object_names_the_fix(mesh: Node, tmp_path: Path) -> None:
    unload_quietly(mesh)
    with pytest.raises(ObjectMissingError, match="make -C bpf"):
        Datapath.load(
            mesh.cgroup.path, instance=mesh.token, pin_root=PIN_ROOT, objects_dir=tmp_path
        )


def test_not_a_cgroup_is_refused(mesh: Node, tmp_path: Path) -> None:
    unload_quietly(mesh)
    with pytest.raises(NoCgroup2Error, match="is not a cgroup v2 directory"):
        Datapath.load(tmp_path, instance=mesh.token, pin_root=PIN_ROOT)


def test_pins_outside_bpffs_are_refused(mesh: Node, tmp_path: Path) -> None:
    unload_quietly(mesh)
    with pytest.raises(BpffsNotMountedError, match="not on a bpf filesystem"):
        Datapath.load(mesh.cgroup.path, instance=mesh.token, pin_root=tmp_path)


def test_verifier_rejection_carries_the_log_and_undoes_everything(
    mesh: Node, tmp_path: Path
) -> None:
    unload_quietly(mesh)
    objects = tmp_path / "objects"
    shutil.copytree(default_objects_dir(), objects)
    subprocess.run(
        ["make", "-s", "-C", str(FIXTURES), f"OUT={tmp_path}"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    # The last object to load is broken: the first three have loaded and pinned their maps.
    shutil.copy(tmp_path / "bad.bpf.o", objects / OBJECT_FILES[-1])

    with pytest.raises(libbpf.VerifierError) as failure:
        Datapath.load(mesh.cgroup.path, instance=mesh.token, pin_root=PIN_ROOT, objects_dir=objects)

    assert "processed" in str(failure.value) or "invalid" in str(failure.value).lower()
    assert not (PIN_ROOT / mesh.token).exists()
    assert attached_programs(mesh.cgroup.path) == ""


def test_unprivileged_load_names_the_capabilities(mesh: Node) -> None:
    unload_quietly(mesh)
    script = (
        "from pathlib import Path\n"
        "from meshaccel.agent.datapath import Datapath\n"
        f"Datapath.load(Path({str(mesh.cgroup.path)!r}), instance='x', "
        f"pin_root=Path({str(PIN_ROOT)!r}))\n"
    )
    # Still uid 0, but with every capability dropped.
    result = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "NotPrivilegedError" in result.stderr
    assert "CAP_BPF and CAP_NET_ADMIN" in result.stderr


def test_an_earlier_releases_pins_are_told_apart(datapath: Datapath) -> None:
    """What the agent replaces on start (an upgrade), and what it does not: this release's own
    complete datapath, and a half-made one (no connect4 link: a loader that was stopped)."""
    pins = datapath.pins
    assert earlier_release(pins) is None

    hook, aside = pins.link("getpeername4"), pins.root / "getpeername4-aside"
    hook.rename(aside)  # bpffs renames pins: the link stays attached
    try:
        assert earlier_release(pins) == "no getpeername4 hook"  # connect4 is attached last
        connect4, connect4_aside = pins.link("connect4"), pins.root / "connect4-aside"
        connect4.rename(connect4_aside)
        try:
            assert earlier_release(pins) is None, "incomplete, not earlier: left to the agent"
        finally:
            connect4_aside.rename(connect4)
    finally:
        aside.rename(hook)
    assert earlier_release(pins) is None

    # A map this release added: the previous release's complete datapath has no pin for it.
    added, added_aside = pins.map("app_reuse"), pins.root / "app_reuse-aside"
    added.rename(added_aside)
    try:
        assert earlier_release(pins) == "no app_reuse map"
    finally:
        added_aside.rename(added)
    assert earlier_release(pins) is None

    # A map whose layout changed between releases, under its old name.
    handshakes = pins.map("handshakes")
    handshakes.unlink()
    with libbpf.Map.from_pin(pins.map("pod_ips")) as stand_in:
        stand_in.pin(handshakes)
    assert earlier_release(pins) == ("map handshakes is HASH 16:8, this release's is LRU_HASH 8:36")
