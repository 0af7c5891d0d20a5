"""The operator's CA (operator/credentials.py): made once, shared by replicas, rotated.

The rotation's steps are a pure function (:func:`next_step`), tested case by case; the
:class:`Credentials` around it run against in-memory Secret and ConfigMap stores with the API
server's compare-and-swap; the last test rotates end to end with real certificates: a pusher
keeps a fake agent (real TLS, the agent's server context) in sync while the test plays kubelet,
handing the agent its Secret as the operator writes it, and a scraper that trusts only the
ConfigMap :data:`CA_CONFIGMAP` verifies the agent all along (docs/security.md, "Monitoring").
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import logging
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store
from kubernetes.aio import client as k8s
from kubernetes.aio import config as k8s_config

from meshaccel.contract.api import PodSpec
from meshaccel.contract.tls import (
    AGENT_SERVER_NAME,
    OPERATOR_IDENTITY,
    bundle_fingerprint,
    client_context,
    server_context_pem,
)
from meshaccel.operator.credentials import (
    CA_CONFIGMAP,
    CA_CONFIGMAP_KEY,
    CA_SECRET,
    CA_VALIDITY,
    CLIENT_RENEW_AFTER,
    ROTATE_ANNOTATION,
    SERVER_RENEW_AFTER,
    SWITCH_DEADLINE,
    TLS_CERT,
    Authority,
    CAState,
    ConfigMapStore,
    Credentials,
    CredentialsError,
    Issued,
    KubeConfigMaps,
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
from tests.operator.memory_objects import MemoryObjects
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


def test_the_issued_certificates_pass_a_strict_rfc5280_verifier() -> None:
    """Prometheus (Go), the agents and the operator (OpenSSL) accept what the CA issues; so
    must a verifier that holds to RFC 5280 (cryptography's), which refuses, among others, a
    critical subjectAltName beside a non-empty subject."""
    policy = PolicyBuilder().store(Store([A.cert])).time(NOW)
    server = policy.build_server_verifier(x509.DNSName(AGENT_SERVER_NAME))
    assert server.verify(issue_server(A, NOW).cert, [])[-1] == A.cert
    client = policy.build_client_verifier().verify(issue_client(A, NOW).cert, [])
    assert client.subjects == [x509.UniformResourceIdentifier(OPERATOR_IDENTITY)]
    with pytest.raises(x509.verification.VerificationError):
        server.verify(issue_server(B, NOW).cert, [])


# -- Credentials over a store ----------------------------------------------------------------------


@dataclass
class Clocks:
    now: dt.datetime = NOW
    monotonic: float = 1000.0

    def wall(self) -> dt.datetime:
        return self.now

    def mono(self) -> float:
        return self.monotonic


def credentials(
    store: SecretStore, clocks: Clocks | None = None, configmaps: ConfigMapStore | None = None
) -> Credentials:
    clocks = clocks or Clocks()
    return Credentials(
        store,
        NAMESPACE,
        configmaps or MemoryObjects(),
        clock=clocks.wall,
        monotonic=clocks.mono,
    )


async def test_the_ca_is_made_once_and_shared() -> None:
    store = MemoryObjects()
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
class LateSecrets(MemoryObjects):
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
    store = MemoryObjects()
    theirs = await credentials(store).load()
    late = LateSecrets(objects=store.objects)
    assert (await credentials(late).load()).active == theirs.active


async def test_the_client_certificate_lives_in_memory_and_is_renewed() -> None:
    store, clocks = MemoryObjects(), Clocks()
    creds = credentials(store, clocks)
    await creds.load()
    first = creds.client_context()
    clocks.now += CLIENT_RENEW_AFTER - dt.timedelta(minutes=1)
    assert creds.client_context() is first
    clocks.now += dt.timedelta(minutes=2)
    assert creds.client_context() is not first
    assert store.writes == 1  # the CA only: the client certificate is never stored


async def test_the_agents_certificate_is_kept_until_due() -> None:
    store, clocks = MemoryObjects(), Clocks()
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
    store = MemoryObjects()
    creds = credentials(store)
    await creds.load()
    foreign = issue_server(new_authority(NOW), NOW)
    store.objects[AGENT_SECRET] = {
        "metadata": {"name": AGENT_SECRET},
        "data": {TLS_CERT: _b64(foreign.cert_pem), "tls.key": _b64(foreign.key_pem)},
    }
    assert (await creds.agent_tls("mesh", AGENT_SECRET)).cert_pem != foreign.cert_pem


async def test_tend_reads_every_interval_and_only_a_writer_writes() -> None:
    store, clocks = MemoryObjects(), Clocks()
    creds = credentials(store, clocks)
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


# -- the ConfigMap of CA certificates --------------------------------------------------------------


def published(configmaps: MemoryObjects) -> dict[str, str]:
    """The ConfigMap's data, after checking that it holds no key of any kind."""
    found = configmaps.objects[CA_CONFIGMAP]
    data: dict[str, str] = found["data"]
    assert not any("PRIVATE KEY" in value for value in data.values()), "a key in a ConfigMap"
    return data


def chains(leaf: Issued, ca_pem: str) -> bool:
    """A TLS handshake in memory (OpenSSL, the agents' server context presenting ``leaf``) by a
    client that trusts ``ca_pem`` alone and names the agent: True if the client accepts."""
    server = server_context_pem(leaf.cert_pem, leaf.key_pem, ca_pem).wrap_bio(
        server_in := ssl.MemoryBIO(), server_out := ssl.MemoryBIO(), server_side=True
    )
    client = ssl.create_default_context(cadata=ca_pem).wrap_bio(
        client_in := ssl.MemoryBIO(),
        client_out := ssl.MemoryBIO(),
        server_hostname=AGENT_SERVER_NAME,
    )
    for _ in range(4):
        try:
            client.do_handshake()
            return True
        except ssl.SSLCertVerificationError:
            return False
        except ssl.SSLWantReadError:
            server_in.write(client_out.read())
        with contextlib.suppress(ssl.SSLWantReadError):
            server.do_handshake()
        client_in.write(server_out.read())
    raise AssertionError("the handshake did not finish")


async def test_the_writer_makes_the_configmap_of_ca_certificates_at_once() -> None:
    store, configmaps, clocks = MemoryObjects(), MemoryObjects(), Clocks()
    follower = credentials(store, clocks, configmaps)
    await follower.load()
    await follower.tend(dict, writing=False)
    clocks.monotonic += follower.check_interval
    await follower.tend(dict, writing=False)  # read the Secret, wrote nothing
    assert configmaps.objects == {}

    leader = credentials(store, clocks, configmaps)
    state = await leader.load()
    await leader.tend(dict, writing=True)  # its first call as the writer, within the interval
    made = configmaps.objects[CA_CONFIGMAP]
    assert made["metadata"]["namespace"] == NAMESPACE
    assert made["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "meshaccel-operator"
    assert "ownerReferences" not in made["metadata"]  # like the CA Secret: uninstall leaves it
    assert published(configmaps) == {CA_CONFIGMAP_KEY: state.trusted_pem}
    assert state.trusted_pem == state.active.pem

    writes = configmaps.writes
    for _ in range(3):  # checked again, right already: read, not written
        clocks.monotonic += leader.check_interval
        await leader.tend(dict, writing=True)
    assert configmaps.writes == writes == 1


async def test_the_configmap_holds_the_trusted_cas_through_a_rotation() -> None:
    store, configmaps, clocks = MemoryObjects(), MemoryObjects(), Clocks()
    creds = credentials(store, clocks, configmaps)
    old = (await creds.load()).active
    await creds.tend(dict, writing=True)
    before = issue_server(old, NOW)  # what the agents serve before the rotation
    seen: dict[str, str] = {"stable": published(configmaps)[CA_CONFIGMAP_KEY]}

    store.annotate(CA_SECRET, ROTATE_ANNOTATION, "now")
    for phase in ("introducing", "retiring", "stable"):
        clocks.monotonic += creds.check_interval
        await creds.tend(dict, writing=True)  # no agent reports: every step goes ahead
        assert creds.state is not None and creds.state.phase == phase
        assert published(configmaps) == {CA_CONFIGMAP_KEY: creds.state.trusted_pem}, phase
        seen[phase] = creds.state.trusted_pem
    new = (await creds.load()).active
    after = issue_server(new, NOW)  # what the agents serve from the switch on

    # The new CA is in the ConfigMap before any agent has a certificate of it, and the old
    # one stays until it is dropped: each agent verifies against the ConfigMap of the step
    # before the one that changed its certificate.
    assert chains(before, seen["introducing"]) and chains(after, seen["introducing"])
    assert chains(before, seen["retiring"]) and chains(after, seen["retiring"])
    assert not chains(before, seen["stable"]) and chains(after, seen["stable"])
    assert configmaps.writes == 4  # made, then one write per step


async def test_the_configmap_is_set_back_by_the_writer_alone() -> None:
    store, configmaps, clocks = MemoryObjects(), MemoryObjects(), Clocks()
    leader = credentials(store, clocks, configmaps)
    state = await leader.load()
    await leader.tend(dict, writing=True)
    made = configmaps.objects[CA_CONFIGMAP]
    made["data"] = {CA_CONFIGMAP_KEY: B.pem, "extra.crt": A.pem}  # a person's edit
    made["metadata"]["resourceVersion"] = str(next(configmaps.versions))

    follower = credentials(store, clocks, configmaps)
    await follower.load()
    clocks.monotonic += leader.check_interval
    await follower.tend(dict, writing=False)
    assert configmaps.objects[CA_CONFIGMAP]["data"]["extra.crt"] == A.pem  # left alone
    await leader.tend(dict, writing=True)
    assert published(configmaps) == {CA_CONFIGMAP_KEY: state.trusted_pem}  # nothing else

    # Another replica, or a person, changed the Secret: the ConfigMap follows at the next check.
    secret = store.objects[CA_SECRET]
    await store.patch(CA_SECRET, secret["metadata"]["resourceVersion"], {"data": CAState(B).data()})
    clocks.monotonic += leader.check_interval
    await leader.tend(dict, writing=True)
    assert published(configmaps) == {CA_CONFIGMAP_KEY: B.pem}


@dataclass
class BrokenConfigMaps(MemoryObjects):
    """Refuses ``failures`` calls (the API server down, the RBAC rule missing), then works."""

    failures: int = 0

    async def read(self, name: str) -> dict[str, Any] | None:
        if self.failures > 0:
            self.failures -= 1
            raise CredentialsError(f"GET ConfigMap {name}: HTTP 403: forbidden")
        return await super().read(name)


async def test_a_configmap_failure_is_logged_and_retried_at_the_next_check(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, configmaps, clocks = MemoryObjects(), BrokenConfigMaps(failures=1), Clocks()
    creds = credentials(store, clocks, configmaps)
    state = await creds.load()
    with caplog.at_level(logging.WARNING, logger="meshaccel.operator.credentials"):
        await creds.tend(dict, writing=True)  # does not raise
    (failed,) = [r for r in caplog.records if getattr(r, "event", None) == "ca_failed"]
    assert getattr(failed, "configmap", None) == CA_CONFIGMAP and "403" in failed.getMessage()
    assert configmaps.objects == {}

    await creds.tend(dict, writing=True)  # within the interval: the next check retries
    assert configmaps.objects == {}
    clocks.monotonic += creds.check_interval
    await creds.tend(dict, writing=True)
    assert published(configmaps) == {CA_CONFIGMAP_KEY: state.trusted_pem}


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


async def scraped(agent: FakeAgent, ca_pem: str) -> bool:
    """A TLS connection as Prometheus makes it with the chart's default tlsConfig: no client
    certificate, the agent verified against ``ca_pem`` under its fixed name. False if refused."""
    context = ssl.create_default_context(cadata=ca_pem)
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    try:
        _, writer = await asyncio.open_connection(
            agent.host, agent.port, ssl=context, server_hostname=AGENT_SERVER_NAME
        )
    except ssl.SSLCertVerificationError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def test_a_rotation_end_to_end_restarts_nothing(session: aiohttp.ClientSession) -> None:
    store, configmaps = MemoryObjects(), MemoryObjects()
    creds = Credentials(store, NAMESPACE, configmaps, check_interval=0)
    await creds.load()
    pusher = Pusher(
        "mesh", tls=creds.client_context, session=session, epoch=1, window=0, probe_interval=0.02
    )

    def reports() -> dict[str, str | None]:
        return {n: s.trust_bundle for n, s in pusher.nodes().items() if s.probe_error is None}

    async def step(expected_phase: str) -> None:
        await creds.tend(reports, writing=True)
        assert creds.state is not None and creds.state.phase == expected_phase
        await verified()

    async def verified() -> None:
        """Prometheus, with the ConfigMap as the operator keeps it, accepts the agent."""
        assert creds.state is not None
        assert published(configmaps) == {CA_CONFIGMAP_KEY: creds.state.trusted_pem}
        assert await scraped(agent, published(configmaps)[CA_CONFIGMAP_KEY])

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
            await creds.tend(reports, writing=True)
            await verified()
            assert not await scraped(agent, B.pem)  # another CA's certificates: refused

            store.annotate(CA_SECRET, ROTATE_ANNOTATION, "now")
            await step("introducing")  # the new CA joins the agents' bundle
            assert creds.state.next is not None
            new = creds.state.next
            await agent.use_tls(await creds.agent_tls("mesh", AGENT_SECRET))  # kubelet
            await verified()
            await heard(old, new)
            await pushed(0, 1)

            await step("retiring")  # the new CA in force: our certificate and the agents'
            await pushed(0, 1, 2)  # before kubelet updates the agent: it trusts both
            rotated = await creds.agent_tls("mesh", AGENT_SECRET)
            assert new.issued(x509.load_pem_x509_certificate(rotated.cert_pem.encode()))
            await agent.use_tls(rotated)  # kubelet
            await verified()
            await heard(new)
            await pushed(0, 1, 2, 3)

            await step("stable")  # the old CA is gone from everything
            assert creds.state.active == new and creds.state.trusted_pem == new.pem
            assert not await scraped(agent, old.pem)  # the old CA's ConfigMap: refused now
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
async def api(kubeconfig: Any, kube: KubeClient) -> AsyncIterator[k8s.ApiClient]:
    await kube.create_namespace(NAMESPACE)
    configuration = k8s.Configuration()
    await k8s_config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    async with k8s.ApiClient(configuration) as client:
        yield client


@pytest.fixture
def secrets(api: k8s.ApiClient) -> KubeSecrets:
    return KubeSecrets(api, NAMESPACE)


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


async def test_the_ca_configmap_through_the_api(api: k8s.ApiClient) -> None:
    """The writer makes the ConfigMap, and sets it back after an edit, as a real API server
    takes it (its schema, the compare-and-swap of the merge patch)."""
    secrets, configmaps, clocks = (
        KubeSecrets(api, NAMESPACE),
        KubeConfigMaps(api, NAMESPACE),
        Clocks(),
    )
    creds = credentials(secrets, clocks, configmaps)
    state = await creds.load()
    await creds.tend(dict, writing=True)
    made = await configmaps.read(CA_CONFIGMAP)
    assert made is not None and made["data"] == {CA_CONFIGMAP_KEY: state.trusted_pem}
    assert made["metadata"]["labels"]["app.kubernetes.io/name"] == "meshaccel"
    with pytest.raises(SecretConflict):
        await configmaps.create({"metadata": {"name": CA_CONFIGMAP, "namespace": NAMESPACE}})

    version = made["metadata"]["resourceVersion"]
    edited = await configmaps.patch(CA_CONFIGMAP, version, {"data": {"other": "x"}})
    with pytest.raises(SecretConflict):  # the version read is stale now
        await configmaps.patch(CA_CONFIGMAP, version, {"data": {"other": None}})
    clocks.monotonic += creds.check_interval
    await creds.tend(dict, writing=True)
    back = await configmaps.read(CA_CONFIGMAP)
    assert back is not None and back["data"] == {CA_CONFIGMAP_KEY: state.trusted_pem}
    assert back["metadata"]["resourceVersion"] != edited["metadata"]["resourceVersion"]
    clocks.monotonic += creds.check_interval
    await creds.tend(dict, writing=True)  # right already: not written
    again = await configmaps.read(CA_CONFIGMAP)
    assert (
        again is not None
        and again["metadata"]["resourceVersion"] == back["metadata"]["resourceVersion"]
    )
