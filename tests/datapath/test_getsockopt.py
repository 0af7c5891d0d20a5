"""Scenario 5: every getsockopt other than meshaccel's SO_ORIGINAL_DST answers as without it."""

from __future__ import annotations

import pytest

from meshaccel.agent.layout import Counter
from tests.datapath.conftest import MeshPath
from tests.netlab.app_handles import run_getsockopt_probe_here
from tests.netlab.fixtures import EVERY_MESH
from tests.netlab.meshes import LabMesh

pytestmark = [pytest.mark.kernel, EVERY_MESH]


@pytest.mark.parametrize("as_sidecar", [False, True], ids=["app", "sidecar"])
def test_getsockopt_in_an_accelerated_pod_matches_the_kernel(
    path: MeshPath, lab: LabMesh, as_sidecar: bool
) -> None:
    a = path.pod("a")
    identity = lab.proxy if as_sidecar else None
    # The same battery (SO_*, TCP_*, IP_*, SO_ORIGINAL_DST on connections nobody steered,
    # 8192-byte buffers, too-small buffers, SO_PEERGROUPS answering 4800 bytes) twice in pod
    # a's netns: once in its cgroup, under the programs, once outside any of them.
    in_pod = a.getsockopt_probe(run_as=identity)
    without_programs = run_getsockopt_probe_here(run_as=identity, netns=a.netns)

    assert in_pod == without_programs
    assert in_pod["unix/SO_PEERGROUPS/buf16384"]["len"] > 4096
    assert path.counters()[Counter.COUNTER_ORIGINAL_DST_ANSWERED] == 0
