"""The operator's CA (operator/credentials.py): made once, shared by replicas, rotated.

The rotation's steps are a pure function (:func:`next_step`), tested case by case; the
:class:`Credentials` around it run against an in-memory Secret store with the API server's
compare-and-swap; the last test rotates end to end with real certificates: a pusher keeps a
fake agent (real TLS) in sync while the test plays kubelet, handing the agent its Secret as the
operator writes it.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import itertools
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from kubernetes.aio import client as k8s
from kubernetes.aio import config as k8s_config

from meshaccel.contract.api import PodSpec
from meshaccel.contract.tls import bundle_fingerprint, client_context
from meshaccel.operator.credentials import (
    CA_SECRET,
    CA_VALIDITY,
    CLIENT_RENEW_AFTER,
    ROTATE_ANNOTATION,
    SERVER_RENEW_AFTER,
    SWITCH_DEADLINE,
    TLS_CERT,
    Authority,
    CAState,
    Credentials,
    KubeSecrets,
    SecretConflict,
    SecretStore,
    issue_client,
    issue_server,
    new_authority,
    next_step,
    utc_now,
)
from meshaccel.operator.pusher import Pusher
from tests.operator.conftest import KubeClient
from tests.operator.fake_agent import FakeAgent
from tests.waiting import wait_for

NOW = utc_now()
A, B = new_authority(NOW), new_authority(NOW)
NAMESPACE = "meshaccel-system"
AGENT_SECRET = "meshaccel-agent-tls-mesh"


# -- the steps ------------------------------------------------------------------------------------


def fingerprint(*cas: Authority) -> str:
    return bundle_fingerprint("".join(ca.pem for ca in cas))


@dataclass(frozen=True)
class StepCase:
    reason: str
    state: CAState
    at: dt.timedelta  # after NOW
    reports: dict[str, str | None]
    phase: str | None  # the phase written, None: no write


STEP_CASES = [
    StepCase("a young CA: nothing to do", CAState(A), dt.timedelta(days=30), {}, None),
    StepCase(
        "2/3 through its life: a new CA joins",
        CAState(A),
        CA_VALIDITY * 2 / 3 + dt.timedelta(hours=1),
        {},
        "introducing",
    ),
    StepCase(
        "asked for by the annotation",
        CAState(A, rotate_requested=True),
        dt.timedelta(days=1),
        {},
        "introducing",
    ),
    StepCase(
        "an agent still trusts the old bundle: wait",
        CAState(A, next=B),
        dt.timedelta(days=1),
        {"mesh/a": fingerprint(A, B), "mesh/b": fingerprint(A)},
        None,
    ),
    StepCase(
        "an agent not heard since its endpoint changed: wait",
        CAState(A, next=B),
        dt.timedelta(days=1),
        {"mesh/a": None},
        None,
    ),
    StepCase(
        "every agent reached trusts both: the new CA in force",
        CAState(A, next=B),
        dt.timedelta(days=1),
        {"mesh/a": fingerprint(A, B), "other/a": fingerprint(B, A)},
        "retiring",
    ),
    StepCase(
        "no agent at all: nothing to wait for",
        CAState(A, next=B),
        dt.timedelta(days=1),
        {},
        "retiring",
    ),
    StepCase(
        "the old CA nearly ends: the switch goes ahead unconfirmed",
        CAState(A, next=B),
        CA_VALIDITY - SWITCH_DEADLINE + dt.timedelta(hours=1),
        {"mesh/a": fingerprint(A)},
        "retiring",
    ),
    StepCase(
        "an agent still has the old certificate: keep trusting the retired CA",
        CAState(B, retired=A.cert),
        dt.timedelta(days=1),
        {"mesh/a": fingerprint(A, B)},
        None,
    ),
    StepCase(
        "every agent uses the new CA alone: the retired one goes",
        CAState(B, retired=A.cert),
        dt.timedelta(days=1),
        {"mesh/a": fingerprint(B)},
        "stable",
    ),
    StepCase(
        "the CA in force expired (an operator down for a year): a new one at once",
        CAState(A),
        CA_VALIDITY + dt.timedelta(days=1),
        {},
        "stable",
    ),
]


@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: c.reason)
def test_next_step(case: StepCase) -> None:
    step = next_step(case.state, NOW + case.at, case.reports)
    if case.phase is None:
        assert step is None, case.reason
        return
    assert step is not None, case.reason
    wanted, why = step
    assert wanted.phase == case.phase and why, case.reason
    if case.phase == "introducing":
        assert wanted.active == case.state.active and wanted.next not in (None, A, B)
    if case.phase == "retiring":
        assert wanted.active == case.state.next and wanted.retired == case.state.active.cert
        assert wanted.bundle_pem == B.pem and wanted.trusted_pem == B.pem + A.pem
    if case.phase == "stable" and case.state.retired is not None:
        assert wanted.active == case.state.active and wanted.trusted_pem == B.pem


def test_the_secret_round_trips() -> None:
    state = CAState(A, next=B, version="7")
    secret = {
        "metadata": {"resourceVersion": "7", "annotations": {ROTATE_ANNOTATION: "now"}},
        "data": {k: v for k, v in state.data().items() if v is not None},
    }
    read = CAState.from_secret(secret)
    assert (read.active, read.next, read.retired) == (A, B, None)
    assert read.rotate_requested and read.version == "7"


# -- Credentials over a store ----------------------------------------------------------------------


@dataclass
class MemorySecrets:
    """Secrets as the API server keeps them: resourceVersions, 409 on a stale patch."""

    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    writes: int = 0

    async def read(self, name: str) -> dict[str, Any] | None:
        found = self.objects.get(name)
        return copy.deepcopy(found) if found is not None else None

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        name = obj["metadata"]["name"]
        if name in self.objects:
            raise SecretConflict(f"{name} exists")
        return self._store(name, copy.deepcopy(dict(obj)))

    async def patch(self, name: str, version: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        current = self.objects[name]
        if current["metadata"]["resourceVersion"] != version:
            raise SecretConflict(f"{name} moved on")
        merged = copy.deepcopy(current)
        for key, value in patch.get("data", {}).items():
            if value is None:
                merged["data"].pop(key, None)
            else:
                merged["data"][key] = value
        for key, value in patch.get("metadata", {}).get("annotations", {}).items():
            annotations = merged["metadata"].setdefault("annotations", {})
            if value is None:
                annotations.pop(key, None)
            else:
                annotations[key] = value
        return self._store(name, merged)

    def _store(self, name: str, obj: dict[str, Any]) -> dict[str, Any]:
        obj["metadata"]["resourceVersion"] = str(next(self.versions))
        self.objects[name] = obj
        self.writes += 1
        return copy.deepcopy(obj)

    def annotate(self, name: str, key: str, value: str) -> None:
        obj = self.objects[name]
        obj["metadata"].setdefault("annotations", {})[key] = value
        obj["metadata"]["resourceVersion"] = str(next(self.versions))


@dataclass
class Clocks:
    now: dt.datetime = NOW
    monotonic: float = 1000.0

    def wall(self) -> dt.datetime:
        return self.now

    def mono(self) -> float:
        return self.monotonic


def credentials(store: SecretStore, clocks: Clocks | None = None) -> Credentials:
    clocks = clocks or Clocks()
    return Credentials(store, NAMESPACE, clock=clocks.wall, monotonic=clocks.mono)


async def test_the_ca_is_made_once_and_shared() -> None:
    store = MemorySecrets()
    first = await credentials(store).load()
    second = await credentials(store).load()  # another replica, or a restart
    assert first.active == second.active and store.writes == 1
    secret = store.objects[CA_SECRET]
    assert secret["metadata"]["namespace"] == NAMESPACE and set(secret["data"]) == {
        "ca.crt",
        "ca.key",
    }
    basic = first.active.cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca and basic.value.path_length == 0


@dataclass
class LateSecrets(MemorySecrets):
    """Saw no CA, then lost the race to make it: another replica's create came first."""

    looked: bool = False

    async def read(self, name: str) -> dict[str, Any] | None:
        if not self.looked:
            self.looked = True
            return None
        return await super().read(name)

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        raise SecretConflict("exists")


async def test_two_replicas_making_it_at_once_share_the_first() -> None:
    store = MemorySecrets()
    theirs = await credentials(store).load()
    late = LateSecrets(objects=store.objects)
    assert (await credentials(late).load()).active == theirs.active


async def test_the_client_certificate_lives_in_memory_and_is_renewed() -> None:
    store, clocks = MemorySecrets(), Clocks()
    creds = credentials(store, clocks)
    await creds.load()
    first = creds.client_context()
    clocks.now += CLIENT_RENEW_AFTER - dt.timedelta(minutes=1)
    assert creds.client_context() is first
    clocks.now += dt.timedelta(minutes=2)
    assert creds.client_context() is not first
    assert store.writes == 1  # the CA only: the client certificate is never stored


async def test_the_agents_certificate_is_kept_until_due() -> None:
    store, clocks = MemorySecrets(), Clocks()
    creds = credentials(store, clocks)
    state = await creds.load()
    first = await creds.agent_tls("mesh", AGENT_SECRET)
    assert first.bundle_pem == state.active.pem
    store.objects[AGENT_SECRET] = {
        "metadata": {"name": AGENT_SECRET},
        "data": {TLS_CERT: _b64(first.cert_pem), "tls.key": _b64(first.key_pem)},
    }
    restarted = credentials(store, clocks)  # a restart: read back from the agents' Secret
    await restarted.load()
    assert (await restarted.agent_tls("mesh", AGENT_SECRET)).cert_pem == first.cert_pem

    clocks.now += SERVER_RENEW_AFTER + dt.timedelta(hours=1)
    assert (await restarted.agent_tls("mesh", AGENT_SECRET)).cert_pem != first.cert_pem


async def test_a_stored_certificate_of_another_ca_is_replaced() -> None:
    store = MemorySecrets()
    creds = credentials(store)
    await creds.load()
    foreign = issue_server(new_authority(NOW), NOW)
    store.objects[AGENT_SECRET] = {
        "metadata": {"name": AGENT_SECRET},
        "data": {TLS_CERT: _b64(foreign.cert_pem), "tls.key": _b64(foreign.key_pem)},
    }
    assert (await creds.agent_tls("mesh", AGENT_SECRET)).cert_pem != foreign.cert_pem


async def test_tend_reads_every_interval_and_only_a_writer_writes() -> None:
    store, clocks = MemorySecrets(), Clocks()
    creds = Credentials(store, NAMESPACE, clock=clocks.wall, monotonic=clocks.mono)
    await creds.load()
    store.annotate(CA_SECRET, ROTATE_ANNOTATION, "please")

    await creds.tend(dict, writing=True)  # within the interval: not even read
    assert creds.state is not None and creds.state.phase == "stable" and store.writes == 1
    clocks.monotonic += creds.check_interval
    await creds.tend(dict, writing=False)  # read, but this replica does not lead
    assert creds.state.rotate_requested and store.writes == 1
    clocks.monotonic += creds.check_interval
    await creds.tend(dict, writing=True)
    assert creds.state.phase == "introducing" and store.writes == 2
    assert ROTATE_ANNOTATION not in store.objects[CA_SECRET]["metadata"]["annotations"]


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- end to end ------------------------------------------------------------------------------------


def pods(*indexes: int) -> list[PodSpec]:
    return [
        PodSpec.model_validate(
            {"uid": f"u{i}", "namespace": "default", "name": f"p{i}", "ip": f"198.18.0.{10 + i}"}
        )
        for i in indexes
    ]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def test_a_rotation_end_to_end_restarts_nothing(session: aiohttp.ClientSession) -> None:
    store = MemorySecrets()
    creds = Credentials(store, NAMESPACE, check_interval=0)
    await creds.load()
    pusher = Pusher(
        "mesh", tls=creds.client_context, session=session, epoch=1, window=0, probe_interval=0.02
    )

    def reports() -> dict[str, str | None]:
        return {n: s.trust_bundle for n, s in pusher.nodes().items() if s.probe_error is None}

    async def step(expected_phase: str) -> None:
        await creds.tend(reports, writing=True)
        assert creds.state is not None and creds.state.phase == expected_phase

    async def heard(*cas: Authority) -> None:
        wanted = bundle_fingerprint("".join(ca.pem for ca in cas))
        await wait_for(lambda: pusher.nodes()["node"].trust_bundle == wanted, what="the probe")

    async def pushed(*indexes: int) -> None:
        pusher.set_pods("node", pods(*indexes))
        await wait_for(lambda: pusher.nodes()["node"].in_sync, what=f"set {indexes}")

    try:
        async with FakeAgent(tls=await creds.agent_tls("mesh", AGENT_SECRET)) as agent:
            pusher.set_endpoint("node", agent.url)
            await pushed(0)
            assert creds.state is not None
            old = creds.state.active
            await heard(old)

            store.annotate(CA_SECRET, ROTATE_ANNOTATION, "now")
            await step("introducing")  # the new CA joins the agents' bundle
            assert creds.state.next is not None
            new = creds.state.next
            await agent.use_tls(await creds.agent_tls("mesh", AGENT_SECRET))  # kubelet
            await heard(old, new)
            await pushed(0, 1)

            await step("retiring")  # the new CA in force: our certificate and the agents'
            await pushed(0, 1, 2)  # before kubelet updates the agent: it trusts both
            rotated = await creds.agent_tls("mesh", AGENT_SECRET)
            assert new.issued(x509.load_pem_x509_certificate(rotated.cert_pem.encode()))
            await agent.use_tls(rotated)  # kubelet
            await heard(new)
            await pushed(0, 1, 2, 3)

            await step("stable")  # the old CA is gone from everything
            assert creds.state.active == new and creds.state.trusted_pem == new.pem
            await pushed(4)
            assert [a.pod_set.generation for a in agent.accepted] == [1, 2, 3, 4, 5]
            assert agent.boot_id == pusher.nodes()["node"].boot_id  # never restarted

            # What the old CA signed is worthless now: a client of it gets no answer.
            stale = _old_client(old, new)
            old_client = Pusher("old", tls=lambda: stale, session=session, epoch=2)
            try:
                old_client.set_endpoint("node", agent.url)
                old_client.set_pods("node", pods(9))
                await wait_for(lambda: old_client.nodes()["node"].attempts >= 1, what="refusal")
                assert not old_client.nodes()["node"].in_sync and agent.last_set is not None
                assert agent.last_set.pods == pods(4)
            finally:
                await old_client.close()
    finally:
        await pusher.close()


def _old_client(old: Authority, new: Authority) -> ssl.SSLContext:
    issued = issue_client(old, utc_now())
    return client_context(issued.cert_pem, issued.key_pem, new.pem)


# -- the CA Secret through the API (the emulator) --------------------------------------------------


@pytest.fixture
async def secrets(kubeconfig: Any, kube: KubeClient) -> AsyncIterator[KubeSecrets]:
    await kube.create_namespace(NAMESPACE)
    configuration = k8s.Configuration()
    await k8s_config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    async with k8s.ApiClient(configuration) as api:
        yield KubeSecrets(api, NAMESPACE)


async def test_the_ca_secret_through_the_api(secrets: KubeSecrets) -> None:
    """Create once, compare-and-swap after: what two replicas rely on, as a real API server
    answers it."""
    first = credentials(secrets)
    state = await first.load()
    assert (await credentials(secrets).load()).active == state.active  # read, not made again
    with pytest.raises(SecretConflict):
        await secrets.create({"metadata": {"name": CA_SECRET, "namespace": NAMESPACE}})

    stored = await secrets.read(CA_SECRET)
    assert stored is not None
    version = stored["metadata"]["resourceVersion"]
    wanted = CAState(state.active, next=B)
    moved = await secrets.patch(CA_SECRET, version, {"data": wanted.data()})
    assert CAState.from_secret(moved).next == B
    with pytest.raises(SecretConflict):  # the version read is stale now
        await secrets.patch(CA_SECRET, version, {"data": CAState(B).data()})
    back = await secrets.patch(
        CA_SECRET, moved["metadata"]["resourceVersion"], {"data": CAState(state.active).data()}
    )
    assert set(back["data"]) == {"ca.crt", "ca.key"}  # null removed next.*
