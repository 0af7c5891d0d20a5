"""Only the sockets meshaccel tracks pay for sockops callbacks.

A sidecar's inbound listener asks for state callbacks (its close is counted, docs/datapath.md),
and the sockets it accepts inherit the listener's flags. They must drop them: a connection
accepted there costs the sockops program exactly as many runs as one accepted by a listener
meshaccel does not count. Run counts come from the kernel's own statistics (bpf_stats).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from meshaccel.agent.datapath import DEFAULT_FEATURES, Datapath, PinLayout
from meshaccel.contract.modes import ISTIO
from tests.bench.bpfstats import bpf_stats_enabled, program_ids, read_program_stats
from tests.datapath.conftest import istio_pod
from tests.netlab import ECHO_PORT, Node
from tests.netlab.netns import run_in_netns

pytestmark = pytest.mark.kernel

CONNECTIONS = 3
SOCKOPS = "track_sockets"
# The echo server listens on 15006 as two sockets, 0.0.0.0 and [::] (IPV6_V6ONLY): one per
# family, both counted.
INBOUND_LISTENERS = 2


def test_sockets_accepted_by_a_counted_listener_pay_no_state_callbacks(
    mesh: Node, datapath_factory: Callable[..., Datapath], tmp_path_factory: pytest.TempPathFactory
) -> None:
    datapath = datapath_factory(DEFAULT_FEATURES)
    server = mesh.add_pod("listening")
    datapath.put_pod(istio_pod(server))  # in the set before it listens: its 15006 is counted
    server.start_echo_server(ISTIO.inbound_port)
    server.start_echo_server(ECHO_PORT)
    client = mesh.add_pod("outsider")  # in no set, no interception: plain TCP both ways
    ids = program_ids(PinLayout(datapath.pins.root))

    def sockops_runs(port: int) -> int:
        before = read_program_stats(ids)[SOCKOPS].run_cnt
        for _ in range(CONNECTIONS):
            result = client.echo_client(str(server.ip), port, nbytes=4096)
            assert result.ok, result.raw
        return read_program_stats(ids)[SOCKOPS].run_cnt - before

    with bpf_stats_enabled() as enabled:
        assert enabled, "kernel.bpf_stats_enabled is missing"
        listening = run_in_netns(
            server.netns, ["ss", "-Hltn", "sport", "=", f":{ISTIO.inbound_port}"]
        ).splitlines()
        assert len(listening) == INBOUND_LISTENERS, f"the echo server's 15006: {listening}"
        counted_listeners = datapath.inbound_listeners(server.cgroup_id)
        assert counted_listeners == INBOUND_LISTENERS, f"15006 must be counted: {listening}"
        counted = sockops_runs(ISTIO.inbound_port)
        uncounted = sockops_runs(ECHO_PORT)
    assert uncounted > 0, "the statistics must see the program run"
    assert counted == uncounted, f"{counted} runs on the counted listener, {uncounted} elsewhere"
