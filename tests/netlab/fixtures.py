"""pytest plugin: the real-kernel netlab fixtures (tests/conftest.py lists it in pytest_plugins).

- netlab_requirements (session): skip, or fail when CI=true, unless root, the tools, cgroup2 and
  Envoy are there; removes leftovers of earlier runs that were killed.
- netlab_node (module): a Node with pods a, b, c, each with Istio iptables (9090 excluded both
  ways), an Envoy sidecar (uid 1337) and echo servers on 8080 and 9090. Its teardown errors if
  anything (netns, cgroup, process, temp dir) is left behind. Parametrised indirectly with a
  MeshModeName (``@pytest.mark.parametrize("netlab_node", [...], indirect=True)``), the pods are
  that mesh's (tests/netlab/meshes.py); ``EVERY_MESH`` does it for all three.
- netlab_factory (function): make_node(specs, subnet=...) -> an entered Node, torn down (and
  checked for leftovers) after the test.
- family (function): the address family a scenario runs on, "ipv4" unless the test is
  parametrised with ``BOTH_FAMILIES`` (or its own ``family`` values), which fixtures asking
  for ``family`` (the datapath's ``path``) then see too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest

from meshaccel.contract.modes import MESH_MODES, MeshModeName

from .families import FAMILIES, Family
from .leftovers import find_leftovers, remove_stale_leftovers
from .mesh import DEFAULT_MESH_PODS, MeshPodSpec, mesh_node, mesh_pods
from .meshes import LAB_MESHES
from .requirements import require_netlab
from .topology import DEFAULT_SUBNET, Node

NodeFactory = Callable[..., Node]

#: Run a test once per mesh, each on a node of that mesh's pods (ids: istio, linkerd, kuma).
EVERY_MESH = pytest.mark.parametrize(
    "netlab_node", list(MESH_MODES), indirect=True, ids=[str(m) for m in MESH_MODES]
)
#: An Istio-only scenario in a module with EVERY_MESH ones: it shares their Istio node.
ISTIO_ONLY = pytest.mark.parametrize(
    "netlab_node", [MeshModeName.ISTIO], indirect=True, ids=[str(MeshModeName.ISTIO)]
)


#: Run a test once per address family (ids: ipv4, ipv6); the pods are dual-stack either way.
#: Combine with EVERY_MESH / ISTIO_ONLY as separate decorators, never in one parametrize with
#: netlab_node: pytest groups tests on one module node by that parameter's index, so a
#: different list of meshes would build the same mesh's node again.
BOTH_FAMILIES = pytest.mark.parametrize("family", FAMILIES)


@pytest.fixture
def family() -> Family:
    """IPv4 unless the test is parametrised over ``family`` (BOTH_FAMILIES)."""
    return "ipv4"


@pytest.fixture(scope="session")
def netlab_requirements() -> None:
    require_netlab()
    remove_stale_leftovers()


def _assert_nothing_left(token: str) -> None:
    leftovers = find_leftovers(token)
    if leftovers:
        pytest.fail("netlab teardown left: " + "; ".join(leftovers), pytrace=False)


@pytest.fixture(scope="module")
def netlab_node(request: pytest.FixtureRequest, netlab_requirements: None) -> Iterator[Node]:
    mesh = MeshModeName(getattr(request, "param", MeshModeName.ISTIO))
    node = mesh_node(mesh_pods(LAB_MESHES[mesh]))
    with node:
        yield node
    _assert_nothing_left(node.token)


@pytest.fixture
def netlab_factory(netlab_requirements: None) -> Iterator[NodeFactory]:
    tokens: list[str] = []
    with ExitStack() as stack:

        def make_node(
            specs: tuple[MeshPodSpec, ...] = DEFAULT_MESH_PODS, *, subnet: str = DEFAULT_SUBNET
        ) -> Node:
            node = mesh_node(specs, subnet=subnet)
            tokens.append(node.token)
            return stack.enter_context(node)

        yield make_node
    for token in tokens:
        _assert_nothing_left(token)
