"""Scenario 5: every getsockopt other than meshaccel's SO_ORIGINAL_DST answers as without it."""

from __future__ import annotations

import pytest

from meshaccel.agent.layout import Counter
from tests.datapath.conftest import MeshPath
from tests.netlab import SIDECAR_IDENTITY, RunAs
from tests.netlab.app_handles import run_getsockopt_probe_here

pytestmark = pytest.mark.kernel


@pytest.mark.parametrize("identity", [None, SIDECAR_IDENTITY], ids=["app", "sidecar"])
def test_getsockopt_in_an_accelerated_pod_matches_the_kernel(
    path: MeshPath, identity: RunAs | None
) -> None:
    a = path.pod("a")
    # The same battery (SO_*, TCP_*, IP_*, SO_ORIGINAL_DST on connections nobody steered,
    # 8192-byte buffers, too-small buffers, SO_PEERGROUPS answering 4800 bytes) twice in pod
    # a's netns: once in its cgroup, under the programs, once outside any of them.
    in_pod = a.getsockopt_probe(run_as=identity)
    without_programs = run_getsockopt_probe_here(run_as=identity, netns=a.netns)

    assert in_pod == without_programs
    assert in_pod["unix/SO_PEERGROUPS/buf16384"]["len"] > 4096
    assert path.counters()[Counter.COUNTER_ORIGINAL_DST_ANSWERED] == 0
