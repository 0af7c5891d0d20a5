"""The push channel against fake agents (real aiohttp servers speaking the agent's contract).

Small windows and backoffs keep these fast; every wait polls for the state it expects (its
timeout only turns a hang into a failure). Nothing here reads the wall clock: where a test
checks a window, a backoff or a latency, the pusher runs on a :class:`StoppedClock` that the
test moves; where the point is that nothing is sent, the node's state says so (no PUT due, none
in flight). Speed figures come from the operator benchmark (docs/operator-benchmark.md).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from meshaccel.contract.api import PodOptions, PodSpec
from meshaccel.contract.tls import AGENT_SERVER_NAME, bundle_fingerprint
from meshaccel.operator.credentials import AgentTLS, issue
from meshaccel.operator.metrics import PushMetrics
from meshaccel.operator.pusher import NodeState, Pusher
from tests.operator.fake_agent import FakeAgent, FakeAgentFleet
from tests.pki import make_pki
from tests.waiting import StoppedClock, wait_for

PKI = make_pki()
AGENT_TLS = PKI.agent_tls()  # the agents' Secret
OPERATOR = PKI.client_context()  # the operator's client certificate, the CA, the agents' name
NODE = "node-a"
WINDOW = 0.02
BACKOFF = 0.02
BACKOFF_MAX = 0.1
EPOCH = 3  # this replica's term, unless a test gives another
ROUNDING = 1e-9  # a time read back from a clock sum (1000.02 + 0.04 - 1000.02) is not exact


def pod(index: int, **changes: Any) -> PodSpec:
    fields: dict[str, Any] = {
        "uid": f"uid-{index}",
        "namespace": "default",
        "name": f"pod-{index}",
        "ip": IPv4Address("198.18.0.10") + index,
    }
    return PodSpec.model_validate(fields | changes)


def pods(*indexes: int) -> list[PodSpec]:
    return [pod(i) for i in indexes]


def idle(state: NodeState) -> bool:
    """Nothing will be sent to the node until something changes: no PUT due, none in flight."""
    return state.next_push is None and not state.pushing


@dataclass
class Harness:
    pusher: Pusher
    registry: CollectorRegistry
    applied: list[tuple[str, int, float]] = field(default_factory=list)

    def node(self, name: str = NODE) -> NodeState:
        return self.pusher.nodes()[name]

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, {"acceleration": "mesh", **labels})

    async def in_sync(self, name: str = NODE) -> NodeState:
        await wait_for(lambda: self.node(name).in_sync, what=f"{name} in sync")
        return self.node(name)


MakeHarness = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        yield client


@pytest.fixture
async def make_harness(session: aiohttp.ClientSession) -> AsyncIterator[MakeHarness]:
    made: list[Pusher] = []

    async def make(**options: Any) -> Harness:
        registry = CollectorRegistry()
        applied: list[tuple[str, int, float]] = []
        settings: dict[str, Any] = {
            "tls": lambda: OPERATOR,
            "session": session,
            "epoch": EPOCH,
            "window": WINDOW,
            "request_timeout": 10.0,  # only a hang guard: a slow reply must not become a retry
            "backoff_initial": BACKOFF,
            "backoff_max": BACKOFF_MAX,
            "probe_interval": 3600.0,  # no probes, unless a test asks for them
            "on_applied": lambda *args: applied.append(args),
            "metrics": PushMetrics(registry),
        }
        pusher = Pusher("mesh", **(settings | options))
        made.append(pusher)
        return Harness(pusher, registry, applied)

    yield make
    for pusher in made:
        await pusher.close()


@pytest.fixture
async def harness(make_harness: MakeHarness) -> Harness:
    return await make_harness()


@pytest.fixture
async def agent() -> AsyncIterator[FakeAgent]:
    async with FakeAgent(tls=AGENT_TLS, host="127.0.0.1", name=NODE) as fake:
        yield fake


def generations(agent: FakeAgent) -> list[int]:
    return [a.pod_set.generation for a in agent.accepted]


# -- batching and generations --------------------------------------------------------------------


async def test_a_burst_of_changes_is_one_put_with_the_newest_set(
    harness: Harness, agent: FakeAgent
) -> None:
    harness.pusher.set_endpoint(NODE, agent.url)
    for last in range(10):
        harness.pusher.set_pods(NODE, pods(*range(last + 1)))

    state = await harness.in_sync()

    assert len(agent.puts()) == 1
    assert agent.last_set is not None and agent.last_set.pods == pods(*range(10))
    assert state.desired_generation == state.applied_generation == 1
    assert (state.pods_applied, state.pods_desired, state.attempts) == (10, 10, 0)

    # The same set in another order is no change: nothing is sent.
    harness.pusher.set_pods(NODE, list(reversed(pods(*range(10)))))
    assert idle(harness.node()), harness.node()
    assert len(agent.puts()) == 1


async def test_every_new_set_gets_a_higher_generation(harness: Harness, agent: FakeAgent) -> None:
    harness.pusher.set_endpoint(NODE, agent.url)
    for indexes in ([0], [0, 1], [1]):
        harness.pusher.set_pods(NODE, pods(*indexes))
        await harness.in_sync()

    assert generations(agent) == [1, 2, 3]
    assert [g for _, g, _ in harness.applied] == [1, 2, 3]
    assert harness.sample("meshaccel_operator_applied_generation", node=NODE) == 3


@pytest.mark.parametrize(
    ("preset", "statuses", "expected", "reason"),
    [
        ((0, 41, [7]), [200], (EPOCH, 1), "an operator that predates epochs got to 41: epoch 0"),
        ((EPOCH - 1, 41, [7]), [200], (EPOCH, 1), "the previous term got to 41: a new count"),
        ((EPOCH, 41, [7]), [409, 200], (EPOCH, 42), "this term, made again, got to 41"),
        ((EPOCH, 5, [0, 1]), [409, 200], (EPOCH, 6), "this term had the same set at 5"),
        ((EPOCH, 1, [7]), [409, 200], (EPOCH, 2), "this term applied 1 with another set"),
    ],
)
async def test_a_term_counts_its_own_generations(
    harness: Harness,
    agent: FakeAgent,
    preset: tuple[int, int, list[int]],
    statuses: list[int],
    expected: tuple[int, int],
    reason: str,
) -> None:
    """Agents order sets by (epoch, generation): a term's first set beats every earlier term's
    at generation 1; only a set of this very term makes the pusher go above it."""
    epoch, generation, preset_pods = preset
    agent.preset(generation, pods(*preset_pods), epoch=epoch)
    harness.pusher.set_endpoint(NODE, agent.url)
    harness.pusher.set_pods(NODE, pods(0, 1))

    state = await harness.in_sync()

    assert [r.status for r in agent.puts()] == statuses, reason
    assert (state.applied_epoch, state.applied_generation) == expected, reason
    assert state.desired_generation == expected[1], reason
    assert (agent.applied_epoch, agent.applied_generation) == expected, reason
    assert set(agent.pods) == {"uid-0", "uid-1"}, reason
    jumps = harness.sample("meshaccel_operator_push_failures_total", reason="stale_generation")
    assert jumps == (1 if len(statuses) > 1 else None), reason
    # The next change goes on from there.
    harness.pusher.set_pods(NODE, pods(0))
    assert (await harness.in_sync()).applied_generation == expected[1] + 1, reason


# -- failures ------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [503, 500, 507])
async def test_server_errors_are_retried_with_backoff(
    make_harness: MakeHarness, agent: FakeAgent, status: int
) -> None:
    clock = StoppedClock()
    harness = await make_harness(clock=clock)
    agent.fail_next(4, status)
    harness.pusher.set_endpoint(NODE, agent.url)
    harness.pusher.set_pods(NODE, pods(0))
    assert harness.node().next_push == clock.now + WINDOW

    def failed(count: int) -> bool:
        return harness.node().attempts == count

    delays = []
    for count in range(1, 5):
        due = harness.node().next_push
        assert due is not None
        clock.now = due  # time for the next PUT
        await wait_for(functools.partial(failed, count), what=f"failure {count}")
        state = harness.node()
        assert state.next_push is not None and len(agent.puts()) == count
        delays.append(state.next_push - clock.now)
    # Each delay is jittered into the upper half of BACKOFF * 2**n, capped at BACKOFF_MAX.
    for n, delay in enumerate(delays):
        ceiling = min(BACKOFF_MAX, BACKOFF * 2**n)
        assert ceiling * 0.5 - ROUNDING <= delay <= ceiling + ROUNDING, delays
    clock.now += BACKOFF_MAX
    state = await harness.in_sync()

    assert [r.status for r in agent.puts()] == [status] * 4 + [200]
    assert generations(agent) == [1]  # a retry of the same set keeps its generation
    assert state.attempts == 0 and state.last_error is None
    failures = harness.sample("meshaccel_operator_push_failures_total", reason=f"http_{status}")
    assert failures == 4


async def test_an_agent_that_refuses_connections_is_retried_until_it_listens(
    harness: Harness, agent: FakeAgent
) -> None:
    await agent.stop_listening()
    harness.pusher.set_endpoint(NODE, agent.url)
    harness.pusher.set_pods(NODE, pods(0, 1))

    await wait_for(lambda: harness.node().attempts >= 3, what="three failed attempts")
    state = harness.node()
    assert not state.in_sync and state.behind_since is not None
    assert state.last_error is not None and "Connect" in state.last_error, state.last_error
    assert agent.accepted == []

    await agent.start_listening()
    state = await harness.in_sync()
    assert generations(agent) == [1] and state.attempts == 0
    assert (harness.sample("meshaccel_operator_push_failures_total", reason="connect") or 0) >= 3


async def test_a_timeout_is_retried_with_the_same_generation(
    make_harness: MakeHarness, agent: FakeAgent
) -> None:
    harness = await make_harness(request_timeout=0.1)
    agent.delay = 0.25
    harness.pusher.set_endpoint(NODE, agent.url)
    harness.pusher.set_pods(NODE, pods(0))

    await wait_for(lambda: harness.node().attempts >= 1, what="a timeout")
    assert "no reply" in (harness.node().last_error or "")
    agent.delay = 0

    await harness.in_sync()
    # The agent applied the timed-out PUT too: the retry was the same set at the same
    # generation, which it takes as a no-op.
    assert set(generations(agent)) == {1}
    assert agent.accepted[-1].noop == (len(agent.accepted) > 1)


@pytest.mark.parametrize(
    ("setup", "status", "reason"),
    [
        ({"identity": "urn:meshaccel:someone-else"}, 403, "a certificate of the CA, not ours"),
        ({"max_pods": 2}, 422, "more pods than the agent holds"),
        ({"standalone": True}, 409, "a standalone agent (409 without a generation)"),
    ],
)
async def test_a_refused_set_is_recorded_and_sent_again_only_when_it_changes(
    make_harness: MakeHarness, setup: dict[str, Any], status: int, reason: str
) -> None:
    identity = setup.get("identity")
    client = OPERATOR if identity is None else PKI.client_context(PKI.issue_client(identity))
    harness = await make_harness(tls=lambda: client)
    async with FakeAgent(
        tls=AGENT_TLS,
        max_pods=setup.get("max_pods", 1024),
        standalone=setup.get("standalone", False),
    ) as agent:
        harness.pusher.set_endpoint(NODE, agent.url)
        harness.pusher.set_pods(NODE, pods(0, 1, 2))

        await wait_for(lambda: harness.node().last_error is not None, what=reason)

        state = harness.node()
        assert idle(state), (reason, state)  # no retry due: not sent again
        assert [r.status for r in agent.puts()] == [status], reason
        assert state.last_error is not None and state.last_error.startswith(f"HTTP {status}")
        assert not state.in_sync and state.behind_since is not None, reason
        assert harness.sample("meshaccel_operator_push_failures_total", reason=f"http_{status}")

        harness.pusher.set_pods(NODE, pods(0, 1))  # a changed set is tried again
        await wait_for(lambda: len(agent.puts()) == 2, what="the changed set")
        if status == 422:
            assert (await harness.in_sync()).last_error is None


async def test_an_invalid_set_is_refused_by_set_pods(harness: Harness) -> None:
    with pytest.raises(ValidationError, match="appears twice"):
        harness.pusher.set_pods(NODE, [pod(0), pod(1, ip="198.18.0.10")])


# -- agent restarts, endpoints ---------------------------------------------------------------------


async def test_an_agent_restart_seen_by_the_probe_gets_the_full_set_again(
    make_harness: MakeHarness, agent: FakeAgent
) -> None:
    harness = await make_harness(probe_interval=0.05)
    harness.pusher.set_endpoint(NODE, agent.url)
    harness.pusher.set_pods(NODE, pods(0, 1, 2))
    first = await harness.in_sync()
    assert first.boot_id == agent.boot_id

    await agent.restart()
    assert agent.applied_generation is None and agent.pods == {}
    await wait_for(lambda: agent.applied_generation == 1, what="the set sent again")

    state = await harness.in_sync()
    assert state.boot_id == agent.boot_id != first.boot_id
    assert agent.last_set is not None and agent.last_set.pods == pods(0, 1, 2)
    assert generations(agent) == [1, 1]  # a fresh agent takes the generation it had
    assert [g for _, g, _ in harness.applied] == [1, 1]
    assert any(r.path == "/v1/health" for r in agent.requests)


async def test_an_agent_back_after_downtime_is_brought_up_to_date(
    make_harness: MakeHarness, agent: FakeAgent
) -> None:
    harness = await make_harness(probe_interval=0.05)
    harness.pusher.set_endpoint(NODE, agent.url)
    harness.pusher.set_pods(NODE, pods(0))
    await harness.in_sync()

    await agent.stop_listening()
    await agent.restart()  # a fresh process, not listening yet
    harness.pusher.set_pods(NODE, pods(0, 1))  # a change while the agent is away
    await wait_for(lambda: harness.node().attempts >= 1, what="a push that found no agent")
    await agent.start_listening()

    state = await harness.in_sync()
    assert state.boot_id == agent.boot_id
    assert set(agent.pods) == {"uid-0", "uid-1"}


async def test_a_new_endpoint_gets_the_set_and_a_dropped_node_nothing(
    harness: Harness, agent: FakeAgent
) -> None:
    harness.pusher.set_endpoint(NODE, agent.url)
    harness.pusher.set_pods(NODE, pods(0))
    await harness.in_sync()

    async with FakeAgent(tls=AGENT_TLS, host="127.0.0.2") as moved:
        harness.pusher.set_endpoint(NODE, moved.url)  # the agent's pod came back elsewhere
        state = await harness.in_sync()
        assert state.url == moved.url and state.boot_id == moved.boot_id
        assert moved.last_set is not None and moved.last_set.pods == pods(0)

        harness.pusher.set_endpoint(NODE, None)
        harness.pusher.set_pods(NODE, pods(0, 1))
        state = harness.node()
        assert state.url is None and not state.in_sync
        assert state.next_push is None  # nowhere to send it
        assert len(moved.puts()) == 1

        harness.pusher.drop_node(NODE)
        assert NODE not in harness.pusher.nodes()
        assert harness.sample("meshaccel_operator_applied_generation", node=NODE) is None
        assert harness.sample("meshaccel_operator_nodes_behind") == 0


# -- state and metrics ---------------------------------------------------------------------------


async def test_nodes_reports_sync_and_behind(make_harness: MakeHarness, agent: FakeAgent) -> None:
    clock = StoppedClock()
    harness = await make_harness(clock=clock)
    harness.pusher.set_pods(NODE, pods(0, 1))  # no endpoint yet: behind

    state = harness.node()
    assert (state.url, state.in_sync, state.desired_generation) == (None, False, None)
    assert state.behind_since == clock.now
    assert harness.sample("meshaccel_operator_nodes_behind") == 1

    clock.now += 5
    harness.pusher.set_endpoint(NODE, agent.url)
    clock.now += WINDOW
    state = await harness.in_sync()
    assert state.behind_since is None and state.pods_applied == 2
    assert state.boot_id == agent.boot_id and state.url == agent.url
    assert harness.sample("meshaccel_operator_nodes_behind") == 0

    await agent.stop_listening()
    clock.now += 5
    harness.pusher.set_pods(NODE, pods(0))
    state = harness.node()
    assert not state.in_sync and state.behind_since == clock.now
    assert state.applied_generation == 1  # what the agent has, still
    assert harness.sample("meshaccel_operator_nodes_behind") == 1

    await agent.start_listening()
    clock.now += WINDOW
    await harness.in_sync()
    assert harness.sample("meshaccel_operator_nodes_behind") == 0
    assert (harness.sample("meshaccel_operator_push_duration_seconds_count") or 0) >= 2


async def test_on_applied_gets_the_latency_from_the_change(
    make_harness: MakeHarness, agent: FakeAgent
) -> None:
    clock = StoppedClock()
    harness = await make_harness(clock=clock)
    harness.pusher.set_endpoint(NODE, agent.url)
    clock.now += 7  # an endpoint long known: the latency runs from the change
    harness.pusher.set_pods(NODE, pods(0))
    assert harness.node().next_push == clock.now + WINDOW  # the window
    clock.now += 0.25  # past the window: the PUT goes out, and is answered at this time
    await harness.in_sync()

    [(node, generation, seconds)] = harness.applied
    assert (node, generation) == (NODE, 1)
    assert seconds == pytest.approx(0.25)
    assert harness.sample("meshaccel_operator_change_applied_seconds_count") == 1


async def test_close_removes_the_metrics(harness: Harness, agent: FakeAgent) -> None:
    harness.pusher.set_endpoint(NODE, agent.url)
    harness.pusher.set_pods(NODE, pods(0))
    await harness.in_sync()
    assert harness.sample("meshaccel_operator_applied_generation", node=NODE) == 1

    await harness.pusher.close()

    assert harness.sample("meshaccel_operator_applied_generation", node=NODE) is None
    assert harness.sample("meshaccel_operator_nodes_behind") is None


# -- uninstall -----------------------------------------------------------------------------------


async def test_uninstall_reaches_every_agent_and_stops_pushing(harness: Harness) -> None:
    async with (
        FakeAgent(tls=AGENT_TLS, host="127.0.0.1") as a,
        FakeAgent(tls=AGENT_TLS, host="127.0.0.2") as b,
        FakeAgent(tls=AGENT_TLS, host="127.0.0.3") as gone,
    ):
        for name, agent in (("a", a), ("b", b), ("gone", gone)):
            harness.pusher.set_endpoint(name, agent.url)
            harness.pusher.set_pods(name, pods(0))
        harness.pusher.set_pods("no-agent", pods(1))
        for name in ("a", "b", "gone"):
            await harness.in_sync(name)
        await gone.stop_listening()

        result = await harness.pusher.uninstall(timeout=1.0)

        assert set(result) == {"a", "b", "gone"}  # no endpoint, nothing to uninstall
        assert result["a"] is None and result["b"] is None
        assert result["gone"] is not None and "Connect" in result["gone"]
        assert a.uninstalled and b.uninstalled and not gone.uninstalled

        # Pushing has stopped: a change goes nowhere.
        harness.pusher.set_pods("a", pods(0, 1))
        assert idle(harness.node("a")), harness.node("a")
        assert len(a.puts()) == 1

        # A repeat reaches the agent that was away; the others answer "already".
        await gone.start_listening()
        again = await harness.pusher.uninstall(timeout=1.0)
        assert again == {"a": None, "b": None, "gone": None}
        assert gone.uninstalled and a.uninstalls == 2


async def test_uninstall_reports_refusals(make_harness: MakeHarness) -> None:
    other = PKI.client_context(PKI.issue_client("urn:meshaccel:someone-else"))
    harness = await make_harness(tls=lambda: other)
    async with FakeAgent(tls=AGENT_TLS) as agent:
        harness.pusher.set_endpoint(NODE, agent.url)
        result = await harness.pusher.uninstall(timeout=1.0)
    assert (result[NODE] or "").startswith("HTTP 403"), result
    assert not agent.uninstalled


# -- scale ---------------------------------------------------------------------------------------


@pytest.fixture
async def fleet() -> AsyncIterator[FakeAgentFleet]:
    async with FakeAgentFleet(500, tls=AGENT_TLS) as agents:
        yield agents


def node_pods(node: int, count: int = 20) -> Iterator[PodSpec]:
    for i in range(count):
        index = node * count + i
        yield PodSpec(
            uid=f"uid-{index}",
            namespace="default",
            name=f"pod-{index}",
            ip=IPv4Address("198.18.0.0") + 10 + index,
        )


async def test_500_nodes_of_20_pods(make_harness: MakeHarness, fleet: FakeAgentFleet) -> None:
    """Every node gets its set in one PUT, and a change costs a PUT to its node only. (How fast:
    the operator benchmark measures the same path at this scale, docs/operator-benchmark.md.)"""
    harness = await make_harness(window=0.1)
    for i, agent in enumerate(fleet):
        harness.pusher.set_endpoint(agent.name, agent.url)
        harness.pusher.set_pods(agent.name, list(node_pods(i)))

    def all_in_sync() -> bool:
        return all(s.in_sync for s in harness.pusher.nodes().values())

    await wait_for(all_in_sync, timeout=120, what="500 nodes in sync")
    assert all(len(agent.puts()) == 1 and len(agent.pods) == 20 for agent in fleet)
    assert [g for _, g, _ in harness.applied] == [1] * 500

    # One pod changes on ten nodes: ten PUTs, nothing else.
    harness.applied.clear()
    changed = {i: fleet.agents[i] for i in range(0, len(fleet), 50)}
    for i, agent in changed.items():
        harness.pusher.set_pods(agent.name, [*node_pods(i, 19), pod(100_000 + i)])
    await wait_for(lambda: len(harness.applied) == len(changed), what="ten confirmations")
    assert all(idle(state) for state in harness.pusher.nodes().values())
    assert sum(len(agent.puts()) for agent in fleet) == 500 + len(changed)
    assert sorted(node for node, _, _ in harness.applied) == [a.name for a in changed.values()]
    for i, agent in changed.items():
        assert len(agent.pods) == 20 and f"uid-{100_000 + i}" in agent.pods, agent.name


async def test_the_sync_calls_refuse_a_worker_thread(harness: Harness) -> None:
    """Kopf runs plain ``def`` handlers in threads: the pusher is not thread-safe, so say so."""
    with pytest.raises(RuntimeError, match="no running event loop"):
        await asyncio.to_thread(harness.pusher.set_pods, NODE, pods(0))
    assert NODE not in harness.pusher.nodes()


# -- two writers -------------------------------------------------------------------------------


async def test_a_stale_writer_stops_and_its_set_never_wins(
    make_harness: MakeHarness, agent: FakeAgent
) -> None:
    """Issue 12: a replica whose term ended kept pushing and, on the 409, jumped past the
    agent's generation: its stale set won, while the leader reported in_sync."""
    leader = await make_harness(epoch=EPOCH + 1)
    superseded: list[int] = []
    stale = await make_harness(epoch=EPOCH, on_superseded=superseded.append)
    leader.pusher.set_endpoint(NODE, agent.url)
    leader.pusher.set_pods(NODE, pods(0, 1))
    await leader.in_sync()

    stale.pusher.set_endpoint(NODE, agent.url)
    stale.pusher.set_pods(NODE, pods(7))
    await wait_for(lambda: stale.node().superseded_by is not None, what="the refusal")

    assert set(agent.pods) == {"uid-0", "uid-1"}
    assert (agent.applied_epoch, agent.applied_generation) == (EPOCH + 1, 1)
    assert [r.status for r in agent.puts()] == [200, 409]  # one try, no jump
    assert superseded == [EPOCH + 1]
    state = stale.node()
    assert state.superseded_by == EPOCH + 1 and not state.in_sync and idle(state), state
    assert state.last_error is not None and "another writer leads" in state.last_error
    assert stale.sample("meshaccel_operator_push_failures_total", reason="superseded") == 1
    # A change does not send it again: the node waits for a new epoch.
    stale.pusher.set_pods(NODE, pods(7, 8))
    assert idle(stale.node()) and len(agent.puts()) == 2
    assert leader.node().in_sync


@pytest.mark.parametrize(
    ("written", "outcome", "reason"),
    [
        ((EPOCH, 9), "resent", "a set of this epoch it did not confirm: sent again, above it"),
        ((EPOCH - 1, 9), "resent", "an older epoch's set (an agent cannot take it, but say so)"),
        ((EPOCH + 1, 1), "superseded", "a later term's set: another writer leads"),
    ],
)
async def test_the_probe_compares_the_applied_epoch_and_generation(
    make_harness: MakeHarness,
    agent: FakeAgent,
    written: tuple[int, int],
    outcome: str,
    reason: str,
) -> None:
    """The agent's process stays the same (its boot id does not tell): what it applied does."""
    superseded: list[int] = []
    harness = await make_harness(probe_interval=0.05, on_superseded=superseded.append)
    harness.pusher.set_endpoint(NODE, agent.url)
    harness.pusher.set_pods(NODE, pods(0, 1))
    await harness.in_sync()

    epoch, generation = written
    agent.preset(generation, pods(7), epoch=epoch)  # another writer's set, same process

    if outcome == "resent":
        state = await harness.in_sync()
        await wait_for(lambda: set(agent.pods) == {"uid-0", "uid-1"}, what=reason)
        assert agent.applied_epoch == EPOCH, reason
        assert agent.applied_generation == (generation + 1 if epoch == EPOCH else 2), reason
        assert state.superseded_by is None and superseded == [], reason
    else:
        await wait_for(lambda: harness.node().superseded_by == epoch, what=reason)
        assert set(agent.pods) == {"uid-7"} and superseded == [epoch], reason
        assert not harness.node().in_sync, reason


# -- leading ------------------------------------------------------------------------------------


async def test_a_pusher_that_does_not_lead_sends_nothing(
    make_harness: MakeHarness, agent: FakeAgent
) -> None:
    harness = await make_harness(epoch=None, probe_interval=0.05)
    harness.pusher.set_endpoint(NODE, agent.url)
    harness.pusher.set_pods(NODE, pods(0))
    state = harness.node()
    assert idle(state) and state.epoch is None and not state.in_sync, state

    harness.pusher.lead(EPOCH)
    state = await harness.in_sync()
    assert [(a.pod_set.epoch, a.pod_set.generation) for a in agent.accepted] == [(EPOCH, 1)]

    harness.pusher.lead(None)  # paused: the node's task ends, no PUT and no probe
    requests = len(agent.requests)
    harness.pusher.set_pods(NODE, pods(0, 1))
    await agent.restart()  # not even a restart is noticed
    state = harness.node()
    assert idle(state) and state.epoch is None and not state.in_sync, state
    assert len(agent.requests) == requests

    harness.pusher.lead(EPOCH + 1)  # leading again: the set goes out in the new term
    await harness.in_sync()
    assert agent.applied_epoch == EPOCH + 1 and set(agent.pods) == {"uid-0", "uid-1"}


async def test_a_new_epoch_sends_every_set_again_from_generation_1(
    harness: Harness, fleet_of_3: list[FakeAgent]
) -> None:
    for agent in fleet_of_3:
        harness.pusher.set_endpoint(agent.name, agent.url)
        harness.pusher.set_pods(agent.name, pods(0))
        harness.pusher.set_pods(agent.name, pods(0, 1))  # (one PUT: the window)
        await harness.in_sync(agent.name)
        harness.pusher.set_pods(agent.name, pods(0, 1, 2))
        await harness.in_sync(agent.name)
        assert (agent.applied_epoch, agent.applied_generation) == (EPOCH, 2)

    harness.pusher.lead(EPOCH + 2)

    for agent in fleet_of_3:
        state = await harness.in_sync(agent.name)
        assert (state.epoch, state.applied_epoch, state.applied_generation) == (EPOCH + 2,) * 2 + (
            1,
        )
        assert (agent.applied_epoch, agent.applied_generation) == (EPOCH + 2, 1)
        assert agent.accepted[-1].pod_set.pods == pods(0, 1, 2)


async def test_an_agent_that_predates_epochs_gets_sets_without_one(
    make_harness: MakeHarness,
) -> None:
    """During an upgrade a new operator meets old agents, whose strict model refuses the
    field: they get their sets as before (unfenced) until they restart as new agents."""
    harness = await make_harness(probe_interval=0.05)
    async with FakeAgent(tls=AGENT_TLS, epochs=False) as agent:
        harness.pusher.set_endpoint(NODE, agent.url)
        harness.pusher.set_pods(NODE, pods(0))
        await harness.in_sync()
        assert [r.status for r in agent.puts()] == [422, 200]
        assert agent.applied_epoch == 0 and agent.last_set is not None

        agent.epochs = True  # upgraded: a new process
        await agent.restart()
        await wait_for(lambda: agent.applied_epoch == EPOCH, what="a set with the epoch")
        assert set(agent.pods) == {"uid-0"}


def _dual_stack(index: int, **changes: Any) -> PodSpec:
    ipv4, ipv6 = IPv4Address("198.18.0.10") + index, IPv6Address("fd00:198:18::10") + index
    return pod(index, ip=ipv4, ips=(ipv4, ipv6), **changes)


async def test_an_agent_that_predates_ipv6_gets_its_ipv4_pods_and_the_rest_is_held_back(
    make_harness: MakeHarness,
) -> None:
    """During an upgrade a new operator meets old agents, whose IPv4-only models refuse an IPv6
    address: they get what the operator before IPv6 sent (dual-stack pods by their IPv4 address
    and ranges), IPv6-only pods are held back with the reason, until they restart as new ones."""
    harness = await make_harness(probe_interval=0.05)
    ranges = PodOptions(
        excluded_outbound_cidrs=frozenset({IPv4Network("10.8.0.0/16"), IPv6Network("fd00:8::/64")}),
        included_outbound_cidrs=frozenset({IPv4Network("10.0.0.0/8"), IPv6Network("fd00::/8")}),
    )
    wanted = [pod(0), _dual_stack(1, options=ranges), pod(2, ip=IPv6Address("fd00:198:18::12"))]
    async with FakeAgent(tls=AGENT_TLS, ipv6=False) as agent:
        harness.pusher.set_endpoint(NODE, agent.url)
        harness.pusher.set_pods(NODE, wanted)
        state = await harness.in_sync()
        assert [r.status for r in agent.puts()] == [422, 200]
        assert set(agent.pods) == {"uid-0", "uid-1"}
        assert agent.pods["uid-0"] == wanted[0], "an IPv4-only pod goes as it is"
        dual = agent.pods["uid-1"]
        assert (dual.ip, dual.ips) == (IPv4Address("198.18.0.11"), ())
        assert dual.options.excluded_outbound_cidrs == {IPv4Network("10.8.0.0/16")}
        assert dual.options.included_outbound_cidrs == frozenset({IPv4Network("10.0.0.0/8")})
        assert state.ipv4_only and state.pods_applied == 2 and state.pods_desired == 3
        [held] = state.held_back
        assert (held.uid, held.name) == ("uid-2", "pod-2")
        assert "predates IPv6" in held.reason and NODE in held.reason

        agent.ipv6 = True  # upgraded: a new process
        await agent.restart()
        await wait_for(lambda: set(agent.pods) == {"uid-0", "uid-1", "uid-2"}, what="every pod")
        assert agent.pods["uid-1"] == wanted[1], "the dual-stack pod with both families"
        await wait_for(lambda: not harness.node().held_back, what="nothing held back")
        assert not harness.node().ipv4_only


async def test_an_ipv4_only_set_reaches_an_agent_that_predates_ipv6_at_once(
    make_harness: MakeHarness,
) -> None:
    """Single-stack IPv4 pods are sent as before IPv6 (no ips): not a single refusal."""
    harness = await make_harness()
    async with FakeAgent(tls=AGENT_TLS, ipv6=False) as agent:
        harness.pusher.set_endpoint(NODE, agent.url)
        harness.pusher.set_pods(NODE, pods(0, 1))
        state = await harness.in_sync()
        assert [r.status for r in agent.puts()] == [200]
        assert not state.ipv4_only and state.held_back == ()
        assert b'"ips"' not in agent.puts()[0].body


@pytest.fixture
async def fleet_of_3() -> AsyncIterator[list[FakeAgent]]:
    async with FakeAgentFleet(3, tls=AGENT_TLS) as fleet:
        yield fleet.agents


# -- mutual TLS ------------------------------------------------------------------------------------

OTHER = make_pki()  # another installation's CA


def _wrong_name() -> AgentTLS:
    issued = issue(
        PKI.ca,
        common_name="meshaccel-agent",
        san=x509.DNSName("agent.elsewhere.example"),
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        now=PKI.now,
        validity=dt.timedelta(days=1),
    )
    return AgentTLS(issued.cert_pem, issued.key_pem, PKI.ca.pem)


@pytest.mark.parametrize(
    ("agent_tls", "reason", "why"),
    [
        (OTHER.agent_tls(PKI.ca.pem), "tls", "the agent's certificate is another CA's"),
        (_wrong_name(), "tls", f"the agent's certificate is not for {AGENT_SERVER_NAME}"),
        (PKI.agent_tls(OTHER.ca.pem), "connect", "the agent does not accept our CA"),
        (None, "tls", "plain HTTP: no agent of ours"),
    ],
)
async def test_only_an_agent_of_this_ca_gets_a_set(
    harness: Harness, agent_tls: AgentTLS | None, reason: str, why: str
) -> None:
    async with FakeAgent(tls=agent_tls, name=NODE) as agent:
        harness.pusher.set_endpoint(NODE, agent.url)
        harness.pusher.set_pods(NODE, pods(0))
        await wait_for(lambda: harness.node().attempts >= 2, what=why)

        assert agent.requests == [] and agent.accepted == [], why  # no request got through
        assert (harness.sample("meshaccel_operator_push_failures_total", reason=reason) or 0) >= 2
        assert harness.node().url == f"https://127.0.0.1:{agent.port}", "TLS only, ever"

        await agent.use_tls(AGENT_TLS)  # the operator's Secret, mounted at last
        state = await harness.in_sync()
    assert state.last_error is None and generations(agent) == [1], why


async def test_every_request_takes_the_client_certificate_in_force(
    make_harness: MakeHarness, agent: FakeAgent
) -> None:
    """The operator renews its certificate in memory: the next request presents the new one."""
    first, renewed = PKI.issue_client(), PKI.issue_client()
    contexts = {"now": PKI.client_context(first)}
    harness = await make_harness(tls=lambda: contexts["now"])
    harness.pusher.set_endpoint(NODE, agent.url)
    harness.pusher.set_pods(NODE, pods(0))
    await harness.in_sync()

    contexts["now"] = PKI.client_context(renewed)
    harness.pusher.set_pods(NODE, pods(0, 1))
    await harness.in_sync()

    serials = [int(r.client or "0", 16) for r in agent.puts(200)]
    assert serials == [c.cert.serial_number for c in (first, renewed)], serials


async def test_the_probe_reads_the_agents_trust_bundle(
    make_harness: MakeHarness, agent: FakeAgent
) -> None:
    harness = await make_harness(probe_interval=0.05)
    harness.pusher.set_endpoint(NODE, agent.url)
    expected = bundle_fingerprint(AGENT_TLS.bundle_pem)
    await wait_for(lambda: harness.node().trust_bundle == expected, what="the probe")

    rotating = PKI.agent_tls(PKI.ca.pem + OTHER.ca.pem)  # a new CA joins
    await agent.use_tls(rotating)
    joined = bundle_fingerprint(rotating.bundle_pem)
    assert joined != expected
    await wait_for(lambda: harness.node().trust_bundle == joined, what="the new bundle")


# -- what the agents report: unresolved pods, versions ---------------------------------------------


async def test_unresolved_pods_are_reported_and_refreshed_until_found(
    make_harness: MakeHarness, agent: FakeAgent
) -> None:
    """The agent finds a pod's cgroup later by itself and says so only in a reply to a set:
    while some are unresolved, each probe is followed by the same set again (the same
    generation, a no-op for the agent), which is no new confirmation."""
    harness = await make_harness(probe_interval=0.05)
    agent.cannot_find("default/pod-1", reason="no cgroup for this pod uid yet")
    harness.pusher.set_endpoint(NODE, agent.url)
    harness.pusher.set_pods(NODE, pods(0, 1, 2))
    state = await harness.in_sync()
    assert [(p.name, p.reason) for p in state.unresolved_pods] == [
        ("pod-1", "no cgroup for this pod uid yet")
    ]
    assert (state.pods_applied, state.unresolved) == (2, 1)
    assert state.unresolved_since is not None

    await wait_for(lambda: len(agent.puts()) >= 2, what="the set again after a probe")
    assert harness.node().unresolved_pods, "still unresolved: the agent has not found it"
    agent.finds("default/pod-1")
    await wait_for(lambda: not harness.node().unresolved_pods, what="the refreshed list")
    state = harness.node()
    assert (state.pods_applied, state.unresolved_since, state.in_sync) == (3, None, True)
    assert set(generations(agent)) == {1} and all(a.noop for a in agent.accepted[1:])
    assert [g for _, g, _ in harness.applied] == [1], "a refresh confirms no change"
    assert harness.sample("meshaccel_operator_change_applied_seconds_count") == 1

    refreshes = len(agent.puts())
    await wait_for(
        lambda: harness.node().probe_error is None and len(agent.requests) > refreshes + 3
    )
    assert len(agent.puts()) == refreshes, "nothing unresolved: probes only"


async def test_the_agents_version_comes_from_its_replies(
    make_harness: MakeHarness, agent: FakeAgent
) -> None:
    harness = await make_harness(probe_interval=0.05)
    agent.version = None  # an agent that predates the field
    harness.pusher.set_endpoint(NODE, agent.url)
    harness.pusher.set_pods(NODE, pods(0))
    state = await harness.in_sync()
    assert state.agent_version is None and state.boot_id == agent.boot_id

    agent.version = "0.2.0-upgraded"
    await wait_for(lambda: harness.node().agent_version == "0.2.0-upgraded", what="the probe")

    async with FakeAgent(tls=AGENT_TLS, host="127.0.0.2", version="0.3.0") as moved:
        harness.pusher.set_endpoint(NODE, moved.url)
        assert harness.node().agent_version is None, "another agent: not heard from yet"
        await wait_for(lambda: harness.node().agent_version == "0.3.0", what="its reply")
