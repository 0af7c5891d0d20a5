"""Resyncs: noticing Kopf's re-lists, listing the cluster, the periodic backstop (a stopped clock).

The end-to-end case, a pod deleted while the operator's watch was down, is in
``test_operator.py``; ``test_runtime.py`` runs the periodic resync through to an agent's set.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from kubernetes.aio import client as k8s

from meshaccel.operator.kube import api_client
from meshaccel.operator.picture import ClusterPicture
from meshaccel.operator.resync import Listing, RelistDetector, Resyncer, list_cluster
from tests.operator.conftest import KubeClient, api_path
from tests.operator.objects import OPERATOR_NAMESPACE, pod
from tests.waiting import StoppedClock, wait_for

INTERVAL = 300.0


@pytest.mark.parametrize(
    ("events", "reports", "reason"),
    [
        ([(False, False)] * 3, [False] * 3, "the first listing: every object is new"),
        (
            [(False, False), (True, True), (False, True), (False, True), (False, False)],
            [False, False, True, False, False],
            "listed again: reported once, at the first object known already",
        ),
        (
            [(False, True), (False, True), (True, True), (False, True)],
            [True, False, False, True],
            "a typed event ends the listing: the next one is reported again",
        ),
    ],
)
def test_a_relist_is_seen_at_its_first_known_object(
    events: list[tuple[bool, bool]], reports: list[bool], reason: str
) -> None:
    detector = RelistDetector()
    seen = [detector.saw("pods", typed=typed, known=known) for typed, known in events]
    assert seen == reports, reason
    assert not detector.saw("nodes", typed=False, known=False), "kinds are apart"


@dataclass
class FakeLister:
    listing: Listing
    calls: int = 0
    failing: bool = False

    async def __call__(self) -> Listing:
        self.calls += 1
        if self.failing:
            raise RuntimeError("the API is away")
        return self.listing


@pytest.fixture
def picture() -> ClusterPicture:
    picture = ClusterPicture(OPERATOR_NAMESPACE)
    picture.namespace_changed("shop", {})
    for name in ("web", "api"):
        picture.pod_changed(pod(name, "shop", uid=f"uid-{name}", ip=None, phase="Pending"))
    return picture


@pytest.fixture
async def resyncer(
    picture: ClusterPicture,
) -> AsyncIterator[tuple[Resyncer, FakeLister, StoppedClock]]:
    clock = StoppedClock()
    lister = FakeLister(Listing(frozenset({"uid-api"}), frozenset({"shop"}), frozenset()))
    leading = [True]
    resyncer = Resyncer(picture, lister, interval=INTERVAL, active=lambda: leading[0], clock=clock)
    task = asyncio.get_running_loop().create_task(resyncer.run())
    yield resyncer, lister, clock
    task.cancel()


async def test_the_periodic_resync_comes_when_the_clock_says(
    picture: ClusterPicture, resyncer: tuple[Resyncer, FakeLister, StoppedClock]
) -> None:
    syncer, lister, clock = resyncer
    assert syncer.next_due == clock.now + INTERVAL and syncer.passes == 0

    clock.now = syncer.next_due
    syncer.wake()
    await wait_for(lambda: syncer.passes == 1, what="the periodic resync")

    assert set(picture.pods) == {"uid-api"} and lister.calls == 1
    assert syncer.last is not None and syncer.last.pods == ("shop/web",)
    assert syncer.next_due == clock.now + INTERVAL  # the next one, an interval later


async def test_a_requested_resync_runs_at_once_and_a_failed_one_changes_nothing(
    picture: ClusterPicture, resyncer: tuple[Resyncer, FakeLister, StoppedClock]
) -> None:
    syncer, lister, clock = resyncer
    lister.failing = True
    syncer.request("pods listed again")
    await wait_for(lambda: lister.calls == 1, what="the failed resync")
    await wait_for(lambda: syncer.next_due == clock.now + INTERVAL, what="rescheduled")
    assert set(picture.pods) == {"uid-web", "uid-api"} and syncer.passes == 0

    lister.failing = False
    syncer.request("pods listed again")
    await wait_for(lambda: syncer.passes == 1, what="the requested resync")
    assert set(picture.pods) == {"uid-api"}


async def test_list_cluster_lists_pods_namespaces_nodes_and_accelerations(
    kubeconfig: object, kube: KubeClient
) -> None:
    await kube.create_namespace("shop")
    await kube.create_node("node-1", labels={"pool": "a"})
    created = await kube.create_pod("shop", "web")
    resource = await kube.create(
        api_path("meshaccel.io/v1alpha1", "meshaccelerations"),
        {
            "apiVersion": "meshaccel.io/v1alpha1",
            "kind": "MeshAcceleration",
            "metadata": {"name": "default"},
            "spec": {"namespaceSelector": {}, "agent": {"nodeSelector": {"pool": "a"}}},
        },
    )
    api: k8s.ApiClient = await api_client()
    try:
        listing = await list_cluster(api)
    finally:
        await api.close()  # type: ignore[no-untyped-call]
    assert listing.pods == {created["metadata"]["uid"]}
    assert {"shop", "default", "kube-system"} <= listing.namespaces
    assert listing.nodes == {"node-1"}
    assert listing.labels is not None and listing.labels["node-1"]["pool"] == "a"
    assert listing.accelerations is not None
    [listed] = listing.accelerations
    meta = resource["metadata"]
    assert (listed.name, listed.uid, listed.created) == (
        "default",
        meta["uid"],
        meta["creationTimestamp"],
    )
    assert listed.spec is not None and listed.spec.agent.nodeSelector == {"pool": "a"}
