"""Full resyncs: what the watches missed, found by listing.

Kopf watches namespaces, nodes and pods. When a watch comes back after an outage, or ends with
410 Gone (its resourceVersion was compacted away), Kopf lists the kind again and goes on; it
does not make DELETED events for the objects that went meanwhile: they are only missing from
the new list. The picture would keep such a pod for good, and its address may by then belong to
a pod that is not meshed. A resync lists the three kinds (:func:`list_cluster`: metadata only,
page by page) and drops from the picture what it knew when the listing began and the list no
longer has (:meth:`~.picture.ClusterPicture.begin_census`).

It lists the MeshAccelerations too, and the nodes' labels: the first resync gives the picture its
complete picture (every node and every resource, whatever order Kopf's handlers deliver them
in), and only then does it judge conflicts and hand out sets (it runs before any set is pushed).

:class:`Resyncer` runs them one at a time, while this replica leads:

* when its term starts, before its pushers write (Kopf does not feed the picture while peering
  pauses the replica);
* soon after a re-list is seen (:class:`RelistDetector`: Kopf marks the objects of a listing
  with no event type, and only a listing *again* brings objects the picture knows already);
* every ``interval`` seconds (``--resync-interval``, 300) as the backstop for a re-list that
  nothing gives away (no object known before came back in it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes.aio import client as k8s
from pydantic import ValidationError

from meshaccel.operator.models import GROUP, PLURAL, VERSION, MeshAccelerationSpec
from meshaccel.operator.picture import ClusterPicture, Dropped, ListedAcceleration

log = logging.getLogger("meshaccel.operator.resync")

PAGE = 500  # objects per list request: a page of pods is a few MB at most
# Ask for metadata only (a real API server answers PartialObjectMetadataList); a server that
# cannot answer so sends full objects, which read the same.
_METADATA_ONLY = (
    "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1, application/json"
)
EXAMPLES = 10  # names of dropped objects in a log line
ACCELERATIONS = f"/apis/{GROUP}/{VERSION}/{PLURAL}"


@dataclass(frozen=True)
class Listing:
    """What the API has now: pod uids, namespace names, node names; each node's labels and
    the MeshAccelerations when they were listed (None: not listed)."""

    pods: frozenset[str]
    namespaces: frozenset[str]
    nodes: frozenset[str]
    labels: Mapping[str, Mapping[str, str]] | None = None
    accelerations: tuple[ListedAcceleration, ...] | None = None


Lister = Callable[[], Awaitable[Listing]]


async def list_items(
    api: k8s.ApiClient, path: str, *, metadata_only: bool = True
) -> list[dict[str, Any]]:
    """Every object at ``path`` (``/api/v1/pods``), page by page; with ``metadata_only``
    (the default), as much of it as a PartialObjectMetadataList holds."""
    found: list[dict[str, Any]] = []
    token: str | None = None
    while True:
        query = [("limit", str(PAGE))] + ([("continue", token)] if token else [])
        params = await api.param_serialize(
            method="GET",
            resource_path=path,
            query_params=query,
            header_params={"Accept": _METADATA_ONLY if metadata_only else "application/json"},
            auth_settings=["BearerToken"],
        )
        response = await api.call_api(*params)
        data = await response.read()  # type: ignore[no-untyped-call]
        if response.status >= 400:
            text = data.decode(errors="replace")[:300]
            raise RuntimeError(f"GET {path}: HTTP {response.status}: {text}")
        page: dict[str, Any] = json.loads(data)
        found.extend(page.get("items") or ())
        token = (page.get("metadata") or {}).get("continue") or None
        if token is None:
            return found


async def list_keys(api: k8s.ApiClient, path: str, key: str) -> frozenset[str]:
    """``metadata[key]`` of every object at ``path``."""
    return frozenset(str(item["metadata"][key]) for item in await list_items(api, path))


def listed_acceleration(item: Mapping[str, Any]) -> ListedAcceleration:
    meta = item.get("metadata") or {}
    try:
        spec: MeshAccelerationSpec | None = MeshAccelerationSpec.model_validate(
            item.get("spec") or {}
        )
    except ValidationError:
        spec = None  # its handler refuses it too
    return ListedAcceleration(
        name=str(meta.get("name") or ""),
        uid=str(meta.get("uid") or ""),
        created=str(meta.get("creationTimestamp") or ""),
        spec=spec,
    )


async def list_cluster(api: k8s.ApiClient) -> Listing:
    """Pods (by uid), namespaces, nodes (by name, with their labels) and MeshAccelerations,
    cluster-wide."""
    pods, namespaces, nodes, accelerations = await asyncio.gather(
        list_keys(api, "/api/v1/pods", "uid"),
        list_keys(api, "/api/v1/namespaces", "name"),
        list_items(api, "/api/v1/nodes"),
        list_items(api, ACCELERATIONS, metadata_only=False),
    )
    labels = {
        str(node["metadata"]["name"]): dict(node["metadata"].get("labels") or {}) for node in nodes
    }
    return Listing(
        pods,
        namespaces,
        frozenset(labels),
        labels=labels,
        accelerations=tuple(listed_acceleration(item) for item in accelerations),
    )


class RelistDetector:
    """Tells when Kopf lists a kind again: an event with no type (Kopf's mark of a listed
    object) for an object the picture knows. Reports each listing once, at its first such
    object; the next typed event of the kind ends it."""

    def __init__(self) -> None:
        self._listing: set[str] = set()  # kinds in a re-list already reported

    def saw(self, kind: str, *, typed: bool, known: bool) -> bool:
        """An event of ``kind``; True when it shows that a re-list began."""
        if typed:
            self._listing.discard(kind)
            return False
        if not known or kind in self._listing:
            return False
        self._listing.add(kind)
        return True


class Resyncer:
    """Runs the picture's resyncs (see the module). ``active()`` says whether this replica
    leads (resyncs run only then); ``clock`` times the periodic one (:attr:`next_due`)."""

    def __init__(
        self,
        picture: ClusterPicture,
        lister: Lister,
        *,
        interval: float,
        active: Callable[[], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"the resync interval must be positive, not {interval}")
        self._picture = picture
        self._lister = lister
        self.interval = interval
        self._active = active
        self._clock = clock
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._requested: str | None = None  # why a resync is wanted soon
        self.next_due = clock() + interval
        self.passes = 0  # finished resyncs (tests wait on it)
        self.last: Dropped | None = None  # what the last one dropped

    def request(self, reason: str) -> None:
        """A resync soon (one at a time: a request while one runs or waits adds nothing)."""
        if self._requested is None:
            self._requested = reason
            self._wake.set()

    def wake(self) -> None:
        """Look at the clock again (it was moved, or this replica now leads)."""
        self._wake.set()

    async def resync(self, reason: str) -> Dropped:
        """List, and drop from the picture what the list no longer has. Raises if listing
        fails (the picture keeps everything)."""
        async with self._lock:
            self._requested = None  # this pass answers what was asked before it began
            census = self._picture.begin_census()
            try:
                listing = await self._lister()
            except BaseException:
                self._picture.abandon_census(census)
                raise
            dropped = self._picture.end_census(
                census,
                pods=listing.pods,
                namespaces=listing.namespaces,
                nodes=listing.nodes,
                labels=listing.labels,
                accelerations=listing.accelerations,
            )
            self.next_due = self._clock() + self.interval
            self.passes += 1
            self.last = dropped
        if dropped:
            log.warning(
                "resync: dropped what was deleted while unwatched",
                extra={
                    "event": "resync_dropped",
                    "reason": reason,
                    "pods": len(dropped.pods),
                    "namespaces": len(dropped.namespaces),
                    "nodes": len(dropped.nodes),
                    "accelerations": len(dropped.accelerations),
                    "examples": _examples(
                        dropped.pods, dropped.namespaces, dropped.nodes, dropped.accelerations
                    ),
                },
            )
        else:
            log.info("resync: nothing missed", extra={"event": "resync", "reason": reason})
        return dropped

    async def run(self) -> None:
        """The loop: a requested resync, or the periodic one, whenever this replica leads."""
        while True:
            self._wake.clear()
            now = self._clock()
            if self._active() and (self._requested is not None or now >= self.next_due):
                reason, self._requested = self._requested or "periodic", None
                try:
                    await self.resync(reason)
                except Exception as err:
                    log.warning(
                        "resync failed: the next one comes after the interval",
                        extra={"event": "resync_failed", "reason": reason, "error": str(err)},
                    )
                    self.next_due = self._clock() + self.interval
                continue
            wait = self.next_due - now if self._active() else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()


def _examples(*groups: Iterable[str]) -> list[str]:
    names = [name for group in groups for name in group]
    return names[:EXAMPLES]
