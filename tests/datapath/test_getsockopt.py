"""Scenario 5: every getsockopt other than meshaccel's SO_ORIGINAL_DST answers as without it,
on IPv4 sockets and on IPv6 ones (where IP6T_SO_ORIGINAL_DST on connections nobody steered, and
every SOL_IPV6 option, must be the kernel's own answers)."""

from __future__ import annotations

import pytest

from meshaccel.agent.layout import Counter
from tests.datapath.conftest import MeshPath
from tests.netlab.app_handles import run_getsockopt_probe_here
from tests.netlab.families import Family
from tests.netlab.fixtures import BOTH_FAMILIES, EVERY_MESH
from tests.netlab.meshes import LabMesh

pytestmark = [pytest.mark.kernel, EVERY_MESH, BOTH_FAMILIES]


@pytest.mark.parametrize("as_sidecar", [False, True], ids=["app", "sidecar"])
def test_getsockopt_in_an_accelerated_pod_matches_the_kernel(
    path: MeshPath, lab: LabMesh, as_sidecar: bool, family: Family
) -> None:
    a = path.pod("a")
    identity = lab.proxy if as_sidecar else None
    # The same battery (SO_*, TCP_*, IP_* or IPV6_*, SO_ORIGINAL_DST or IP6T_SO_ORIGINAL_DST
    # on connections nobody steered, 8192-byte buffers, too-small buffers, SO_PEERGROUPS
    # answering 4800 bytes) twice in pod a's netns: once in its cgroup, under the programs,
    # once outside any of them.
    in_pod = a.getsockopt_probe(run_as=identity, family=family)
    without_programs = run_getsockopt_probe_here(run_as=identity, netns=a.netns, family=family)

    assert in_pod == without_programs
    assert in_pod["unix/SO_PEERGROUPS/buf16384"]["len"] > 4096
    if family == "ipv6":
        assert any("IP6T_SO_ORIGINAL_DST" in case for case in in_pod), sorted(in_pod)
    assert path.counters()[Counter.COUNTER_ORIGINAL_DST_ANSWERED] == 0
