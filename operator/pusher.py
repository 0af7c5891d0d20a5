"""The push channel: each node's complete desired pod set, sent to that node's agent.

One :class:`Pusher` per MeshAcceleration, one task per node. Handlers give it each node's
endpoint and set (:meth:`Pusher.set_endpoint`, :meth:`Pusher.set_pods`: synchronous, cheap, on
the event loop's thread only); it batches changes within a window, sends ``PUT /v1/pods`` with
its replica's epoch (:meth:`Pusher.lead`; ``None`` stops every write) and a generation, retries
with backoff, probes ``GET /v1/health``, and shows what every agent confirmed
(:meth:`Pusher.nodes`). docs/operator.md, "Pushing", has the rules: epochs and generations,
409s, other writers, restarts, unresolved pods and versions.

Windows, backoffs, probes and latencies are read from ``clock``; the waits run on the event
loop's timers, so a clock that stands still only postpones what is due. Mutual TLS only: each
request takes the context ``tls()`` returns then and checks the server's name,
:data:`~meshaccel.contract.tls.AGENT_SERVER_NAME`; bodies are built and parsed with the
contract's models, so both ends check the same contract.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import ssl
import time
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

import aiohttp
from pydantic import ValidationError

from meshaccel.contract.api import (
    VERSION_HEADER,
    ApplyResult,
    ErrorReply,
    HealthReply,
    PodOptions,
    PodSet,
    PodSpec,
    UninstallReply,
    UnresolvedPod,
)
from meshaccel.contract.tls import AGENT_SERVER_NAME
from meshaccel.contract.version import VERSION
from meshaccel.operator.metrics import PushMetrics, default_metrics

log = logging.getLogger(__name__)

OnApplied = Callable[[str, int, float], None]
OnSuperseded = Callable[[int], None]
ClientTLS = Callable[[], ssl.SSLContext]

# Statuses worth retrying unchanged: the agent (or something before it) is busy or broken now.
_RETRYABLE_4XX = frozenset({408, 429})
# Immediate re-sends after a generation refusal before backing off: one is normal after an
# operator restart; more in a row mean another writer keeps raising the agent's generation.
_STALE_RETRIES_AT_ONCE = 3
_REPLY_EXCERPT = 300  # characters of a non-contract error body kept in last_error
_by_uid = attrgetter("uid")


@dataclass(frozen=True)
class NodeState:
    """A node as the pusher sees it (a snapshot: :meth:`Pusher.nodes`)."""

    node: str
    url: str | None  # the agent's base URL; None: no agent known
    desired_generation: int | None  # given to the newest set sent in this epoch (None: none)
    applied_generation: int | None  # the agent's, as last heard (from any operator)
    in_sync: bool  # the agent confirmed the newest set given to set_pods
    pods_applied: int | None  # pods of the confirmed set the agent programmed
    last_error: str | None  # why the newest set is not applied (cleared on success)
    behind_since: float | None  # the pusher's clock since when not in sync; None when in sync
    boot_id: str | None  # the agent process's, as last heard
    attempts: int  # PUTs of the current set that failed (0 after a success)
    pods_desired: int | None = None  # pods in the newest set (None: set_pods not called yet)
    unresolved: int = 0  # pods of the confirmed set the agent could not find yet
    unresolved_pods: tuple[UnresolvedPod, ...] = ()  # those pods, and why
    unresolved_since: float | None = None  # the pusher's clock since when some are unresolved
    agent_version: str | None = None  # the agent's, from its replies (None: not said)
    probe_error: str | None = None  # the last /v1/health probe failed, and why
    # When the next PUT goes out (the pusher's clock: a window or a backoff ends); None: nothing
    # to send. With no PUT in flight either (pushing), the node is idle until something changes.
    next_push: float | None = None
    pushing: bool = False  # a PUT is in flight
    epoch: int | None = None  # this replica's, which its sets carry; None: not leading
    applied_epoch: int | None = None  # the epoch of the agent's applied set, as last heard
    superseded_by: int | None = None  # an agent's higher epoch: another writer leads
    trust_bundle: str | None = None  # the agent's CA bundle fingerprint, as last probed
    # The agent predates IPv6 (it refused an IPv6 address): its sets carry IPv4 addresses only,
    # and the pods with none (IPv6-only) are held back, each with the reason.
    ipv4_only: bool = False
    held_back: tuple[UnresolvedPod, ...] = ()


class _Unreachable(Exception):
    """No HTTP reply: ``reason`` is a metrics label (connect, tls, timeout)."""

    def __init__(self, reason: str, text: str) -> None:
        super().__init__(text)
        self.reason = reason
        self.text = text


@dataclass(eq=False)
class _AgentChannel:
    """The push channel to one node's agent: what was sent, what it confirmed, its health; only
    touched on the event loop's thread."""

    name: str
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    url: str | None = None
    pods_url: str = ""
    health_url: str = ""
    uninstall_url: str = ""
    # The newest set (sorted by uid, so a reordered list is no change) and its version, which
    # counts changes. Versions are ours; generations are the agent's protocol.
    desired: tuple[PodSpec, ...] | None = None
    version: int = 0
    confirmed: int | None = None  # version the agent confirmed; None: nothing (since a restart)
    generation: int = 0  # the last generation given to a set, in this epoch
    generation_version: int | None = None  # the version it was given to
    agent_generation: int | None = None
    agent_epoch: int | None = None
    superseded: int | None = None  # the higher epoch an agent answered with
    legacy: bool = False  # the agent predates epochs (refused the field)
    ipv4_only: bool = False  # the agent predates IPv6 (refused an IPv6 address or ips)
    held_back: tuple[UnresolvedPod, ...] = ()  # pods of the set it was last sent without
    boot_id: str | None = None
    pods_applied: int | None = None
    unresolved: tuple[UnresolvedPod, ...] = ()
    unresolved_since: float | None = None
    agent_version: str | None = None
    last_error: str | None = None
    last_failure: str | None = None  # reason of the last failed PUT
    probe_error: str | None = None
    trust_bundle: str | None = None
    blocked: int | None = None  # version refused for good (a 4xx): sent again only when changed
    attempts: int = 0
    retries: int = 0  # consecutive retryable failures: the backoff's exponent
    stale_retries: int = 0
    send_due: float | None = None  # when the next PUT goes out (None: nothing to send)
    pushing: bool = False  # a PUT is in flight
    not_before: float = 0.0  # the backoff: no PUT before this
    probe_due: float = math.inf
    pending_since: float | None = None  # oldest change not yet in a PUT
    inflight_since: float | None = None  # oldest change the PUT in flight carries
    behind_since: float | None = None

    @property
    def in_sync(self) -> bool:
        return self.desired is not None and self.confirmed == self.version

    def state(self, epoch: int | None) -> NodeState:
        return NodeState(
            node=self.name,
            url=self.url,
            desired_generation=self.generation or None,
            applied_generation=self.agent_generation,
            in_sync=self.in_sync,
            pods_applied=self.pods_applied,
            last_error=self.last_error,
            behind_since=self.behind_since,
            boot_id=self.boot_id,
            attempts=self.attempts,
            pods_desired=None if self.desired is None else len(self.desired),
            unresolved=len(self.unresolved),
            unresolved_pods=self.unresolved,
            unresolved_since=self.unresolved_since,
            agent_version=self.agent_version,
            probe_error=self.probe_error,
            next_push=self.send_due,
            pushing=self.pushing,
            epoch=epoch,
            applied_epoch=self.agent_epoch,
            superseded_by=self.superseded,
            trust_bundle=self.trust_bundle,
            ipv4_only=self.ipv4_only,
            held_back=self.held_back,
        )


def _error_text(status: int, raw: bytes) -> tuple[str, ErrorReply | None]:
    """``HTTP <status>: <the agent's message>`` and the parsed ErrorReply, if it is one."""
    try:
        reply = ErrorReply.model_validate_json(raw)
    except ValidationError:
        excerpt = raw[:_REPLY_EXCERPT].decode("utf-8", "replace").strip()
        return f"HTTP {status}: {excerpt or '(empty body)'}", None
    return f"HTTP {status}: {reply.error}", reply


def _refuses_epochs(reply: ErrorReply | None) -> bool:
    """A 422 from an agent that predates epochs: its strict model refused the field."""
    return reply is not None and any(
        item.get("type") == "extra_forbidden" and item.get("loc") in (["epoch"], ("epoch",))
        for item in reply.detail or ()
    )


# What an agent that predates IPv6 says of a set with IPv6 in it: its IPv4-only models refuse
# an IPv6 ip or CIDR, and the ips field (unknown to it).
_IPV4_ONLY_ERRORS = frozenset({"ip_v4_address", "ip_v4_network"})


def _refuses_ipv6(reply: ErrorReply | None) -> bool:
    """A 422 from an agent that predates IPv6: its strict models refused what IPv6 added."""
    if reply is None:
        return False
    for item in reply.detail or ():
        loc = item.get("loc")
        if not isinstance(loc, list | tuple) or not loc or loc[0] != "pods":
            continue
        kind = item.get("type")
        if kind in _IPV4_ONLY_ERRORS or (kind == "extra_forbidden" and loc[-1] == "ips"):
            return True
    return False


def ipv4_view(pods: Sequence[PodSpec], node: str) -> tuple[list[PodSpec], list[UnresolvedPod]]:
    """``pods`` as an agent that predates IPv6 takes them, and those it cannot take.

    That agent programs IPv4 only, as the operator before IPv6 sent it: a dual-stack pod goes
    with its IPv4 address and its IPv4 ranges (its IPv6 connections keep the mesh's ip6tables
    path), an IPv6-only pod is held back (its traffic keeps the mesh's rules).
    """
    sent: list[PodSpec] = []
    held: list[UnresolvedPod] = []
    for pod in pods:
        ipv4 = pod.ipv4
        if ipv4 is None:
            held.append(
                UnresolvedPod(
                    uid=pod.uid,
                    namespace=pod.namespace,
                    name=pod.name,
                    reason=f"the agent on {node} predates IPv6 and this pod has no IPv4 address: "
                    "update the agents (the chart's agent.image)",
                )
            )
            continue
        if pod.ips or pod.ip != ipv4 or _has_ipv6_ranges(pod.options):
            options = pod.options
            included = options.included_outbound_cidrs
            pod = pod.model_copy(
                update={
                    "ip": ipv4,
                    "ips": (),
                    "options": options.model_copy(
                        update={
                            "excluded_outbound_cidrs": frozenset(
                                n for n in options.excluded_outbound_cidrs if n.version == 4
                            ),
                            "included_outbound_cidrs": None
                            if included is None
                            else frozenset(n for n in included if n.version == 4),
                        }
                    ),
                }
            )
        sent.append(pod)
    return sent, held


def _has_ipv6_ranges(options: PodOptions) -> bool:
    return any(
        n.version == 6
        for n in (*options.excluded_outbound_cidrs, *(options.included_outbound_cidrs or ()))
    )


def _https(url: str) -> str:
    """``url`` without a trailing slash, over https (agents serve nothing else)."""
    url = url.rstrip("/")
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise ValueError(f"not an http(s) URL: {url!r}")
    return f"https://{rest}"


def _earliest(*times: float | None) -> float | None:
    present = [t for t in times if t is not None]
    return min(present) if present else None


class Pusher:
    """Pushes one MeshAcceleration's per-node sets to the agents; see the module docstring."""

    def __init__(
        self,
        acceleration: str,
        *,
        tls: ClientTLS,
        session: aiohttp.ClientSession,
        epoch: int | None,
        window: float = 0.1,
        request_timeout: float = 10.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        probe_interval: float = 15.0,
        on_applied: OnApplied | None = None,
        on_superseded: OnSuperseded | None = None,
        metrics: PushMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window < 0 or request_timeout <= 0 or probe_interval <= 0:
            raise ValueError("window must be >= 0, request_timeout and probe_interval > 0")
        if not 0 < backoff_initial <= backoff_max:
            raise ValueError("backoff needs 0 < backoff_initial <= backoff_max")
        self.acceleration = acceleration
        self._session = session
        self._window = window
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._probe_interval = probe_interval
        self._on_applied = on_applied
        self._on_superseded = on_superseded
        self._epoch = epoch
        self._metrics = metrics if metrics is not None else default_metrics()
        self._clock = clock
        self._tls = tls
        # Our version asks the agents for theirs (agents leave it out for older operators).
        self._probe_headers = {VERSION_HEADER: VERSION}
        self._put_headers = {"Content-Type": "application/json", **self._probe_headers}
        self._nodes: dict[str, _AgentChannel] = {}
        self._behind: set[str] = set()
        self._stopping: set[asyncio.Task[None]] = set()  # cancelled, not yet awaited
        self._random = random.Random()
        self._stopped = False  # after uninstall() or close(): nothing is pushed any more
        self._closed = False
        self._metrics.nodes_behind.labels(acceleration).set(0)

    # -- what the handlers call ------------------------------------------------------------

    @property
    def epoch(self) -> int | None:
        """The epoch the sets go out with; None: not leading, nothing is sent."""
        return self._epoch

    def lead(self, epoch: int | None) -> None:
        """Write with ``epoch`` (this replica's term) from now on, or stop writing (None).

        None ends every node's task (a PUT in flight is cancelled; no probe either) until an
        epoch comes back. A new epoch sends every node's set again at once, from generation 1.
        """
        if self._closed or epoch == self._epoch:
            return
        asyncio.get_running_loop()  # RuntimeError from a worker thread: see the module doc
        previous, self._epoch = self._epoch, epoch
        log.info(
            "not leading: nothing is sent" if epoch is None else "leading: sets carry the epoch",
            extra={
                "event": "push_epoch",
                "acceleration": self.acceleration,
                "epoch": epoch,
                "previous": previous,
            },
        )
        now = self._clock()
        for agent in self._nodes.values():
            if epoch is None:
                self._stop_task(agent)
                agent.send_due = None
                continue
            agent.generation, agent.generation_version = 0, None
            agent.confirmed = agent.superseded = agent.blocked = None
            agent.retries = agent.stale_retries = 0
            agent.not_before = 0.0
            if agent.url is not None and not self._stopped:
                if agent.desired is not None:
                    agent.pending_since = _earliest(agent.pending_since, now)
                    self._schedule(agent, now)
                agent.probe_due = now + self._random.uniform(0, self._probe_interval)
                self._start_task(agent)
            self._refresh(agent, now)

    def set_endpoint(self, node: str, url: str | None) -> None:
        """The agent of ``node`` listens at ``url`` (``https://10.0.0.5:9474``; ``http://`` is
        read as https: agents speak nothing else); None: no agent.

        Call it once the agent's pod has an IP and runs, not when it is Ready: the agent is
        ready only after its first set, which comes from here.
        """
        if self._closed:
            return
        asyncio.get_running_loop()  # RuntimeError from a worker thread: see the module doc
        agent = self._node(node)
        url = _https(url) if url else None
        if url == agent.url:
            return
        now = self._clock()
        agent.url = url
        # Another endpoint is another agent process, or one we must assume forgot everything.
        agent.confirmed = agent.boot_id = agent.probe_error = agent.blocked = agent.superseded = (
            None
        )
        agent.trust_bundle = agent.agent_version = agent.unresolved_since = None
        agent.unresolved = ()
        agent.agent_epoch = agent.agent_generation = None
        self._capabilities_unknown(agent)
        agent.held_back = ()
        agent.retries = agent.stale_retries = 0
        agent.not_before = 0.0
        if url is None:
            agent.send_due, agent.probe_due = None, math.inf
            self._stop_task(agent)
        else:
            agent.pods_url, agent.health_url = f"{url}/v1/pods", f"{url}/v1/health"
            agent.uninstall_url = f"{url}/v1/uninstall"
            agent.probe_due = now + self._random.uniform(0, self._probe_interval)
            if self._writing:
                if agent.desired is not None:
                    agent.pending_since = _earliest(agent.pending_since, now)
                    self._schedule(agent, now + self._window)
                self._start_task(agent)
        self._refresh(agent, now)

    def set_pods(self, node: str, pods: Sequence[PodSpec]) -> None:
        """``node``'s complete desired set. A set equal to the current one (in any order) is
        a no-op. Raises :class:`pydantic.ValidationError` for a set the agent would refuse
        whole (two pods with one uid or one IP): the caller must settle those."""
        if self._closed:
            return
        asyncio.get_running_loop()  # RuntimeError from a worker thread: see the module doc
        agent = self._node(node)
        desired = tuple(sorted(pods, key=_by_uid))
        if desired == agent.desired:
            return
        PodSet(generation=0, pods=list(desired))  # the agent's own checks, before anything
        now = self._clock()
        agent.desired = desired
        agent.version += 1
        agent.pending_since = _earliest(agent.pending_since, now)
        if agent.url is not None and self._writing:
            self._schedule(agent, now + self._window)
        self._refresh(agent, now)

    def drop_node(self, node: str) -> None:
        """Forget ``node`` (it left the cluster, or this acceleration's selector)."""
        agent = self._nodes.pop(node, None)
        if agent is None:
            return
        self._stop_task(agent)
        if node in self._behind:
            self._behind.discard(node)
            self._metrics.nodes_behind.labels(self.acceleration).set(len(self._behind))
        self._metrics.forget_node(self.acceleration, node)

    def nodes(self) -> Mapping[str, NodeState]:
        """Every node's state now (a read-only snapshot)."""
        epoch = self._epoch
        return types.MappingProxyType(
            {name: agent.state(epoch) for name, agent in self._nodes.items()}
        )

    async def uninstall(self, *, timeout: float) -> dict[str, str | None]:
        """Stop pushing; ``POST /v1/uninstall`` to every node with an endpoint, concurrently.

        node -> None (uninstalled, or it was already) or the error. Nodes without an endpoint
        are not in the result. May be called again (the agents answer a repeat with 200);
        endpoints set after the first call are included in the next. Each agent replies after
        its drain (its ``drain_seconds``, 2 s by default): give ``timeout`` more than that.
        """
        self._stopped = True
        await self._stop_all()
        targets = [agent for agent in self._nodes.values() if agent.url is not None]
        client_timeout = aiohttp.ClientTimeout(total=timeout)
        results = await asyncio.gather(
            *(self._uninstall_one(agent.uninstall_url, client_timeout) for agent in targets)
        )
        outcome = {agent.name: error for agent, error in zip(targets, results, strict=True)}
        failed = {name: error for name, error in outcome.items() if error is not None}
        log.info(
            "agents uninstalled",
            extra={
                "event": "uninstall",
                "acceleration": self.acceleration,
                "nodes": len(outcome),
                "failed": failed,
            },
        )
        return outcome

    async def close(self) -> None:
        """Stop every task and remove this acceleration's metrics. The session is the caller's."""
        self._stopped = self._closed = True
        await self._stop_all()
        self._metrics.forget(self.acceleration, list(self._nodes))

    # -- scheduling ------------------------------------------------------------------------

    @property
    def _writing(self) -> bool:
        return self._epoch is not None and not self._stopped

    def _node(self, name: str) -> _AgentChannel:
        agent = self._nodes.get(name)
        if agent is None:
            agent = self._nodes[name] = _AgentChannel(name)
        return agent

    def _schedule(self, agent: _AgentChannel, at: float) -> None:
        """A PUT at ``at`` (not before the backoff), unless one is due earlier already: a
        burst of changes rides on the first one's window. None while another writer leads
        the node's agent (only a new epoch ends that, even after the agent restarts)."""
        if agent.superseded is not None:
            return
        at = max(at, agent.not_before)
        if agent.send_due is None or at < agent.send_due:
            agent.send_due = at
            agent.wake.set()

    def _start_task(self, agent: _AgentChannel) -> None:
        if agent.task is None or agent.task.done():
            agent.task = asyncio.get_running_loop().create_task(
                self._run(agent), name=f"meshaccel-push-{self.acceleration}-{agent.name}"
            )

    def _stop_task(self, agent: _AgentChannel) -> None:
        if agent.task is not None:
            agent.task.cancel()
            self._stopping.add(agent.task)
            agent.task.add_done_callback(self._stopping.discard)
            agent.task = None

    async def _stop_all(self) -> None:
        for agent in self._nodes.values():
            self._stop_task(agent)
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)

    def _refresh(self, agent: _AgentChannel, now: float) -> None:
        """Keep ``behind_since`` and the nodes-behind gauge in step with the node."""
        behind = agent.desired is not None and not agent.in_sync
        if behind and agent.behind_since is None:
            agent.behind_since = now
        elif not behind:
            agent.behind_since = None
        if behind != (agent.name in self._behind):
            (self._behind.add if behind else self._behind.discard)(agent.name)
            self._metrics.nodes_behind.labels(self.acceleration).set(len(self._behind))

    def _jittered(self, seconds: float) -> float:
        return seconds * self._random.uniform(0.5, 1.0)

    # -- the node's task -------------------------------------------------------------------

    async def _run(self, agent: _AgentChannel) -> None:
        while True:
            now = self._clock()
            try:
                if agent.send_due is not None and agent.send_due <= now:
                    agent.send_due = None
                    if (
                        agent.desired is not None
                        and agent.blocked != agent.version
                        and agent.superseded is None
                        and self._epoch is not None
                    ):
                        agent.pushing = True
                        try:
                            await self._push(agent)
                        finally:
                            agent.pushing = False
                    continue
                if agent.probe_due <= now:
                    await self._probe(agent)
                    continue
            except Exception as err:  # a bug here must not end the node's pushes for good
                log.exception(
                    "push task error",
                    extra={
                        "event": "push_bug",
                        "acceleration": self.acceleration,
                        "node": agent.name,
                    },
                )
                agent.last_error = f"operator error: {type(err).__name__}: {err}"
                agent.send_due = self._clock() + self._backoff_max
                continue
            due = min(agent.send_due if agent.send_due is not None else math.inf, agent.probe_due)
            agent.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if due == math.inf else due - now):
                    await agent.wake.wait()

    async def _request(
        self,
        method: str,
        url: str,
        *,
        body: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> tuple[int, bytes]:
        try:
            async with self._session.request(
                method,
                url,
                data=body,
                headers=headers,
                timeout=timeout or self._timeout,
                ssl=self._tls(),
                server_hostname=AGENT_SERVER_NAME,
            ) as response:
                return response.status, await response.read()
        except TimeoutError as err:  # before ClientError: ServerTimeoutError is both
            total = (timeout or self._timeout).total
            raise _Unreachable("timeout", f"no reply from {url} within {total:g} s") from err
        except aiohttp.ClientSSLError as err:  # the agent's certificate was refused
            raise _Unreachable("tls", f"{url}: {type(err).__name__}: {err}") from err
        except (aiohttp.ClientError, OSError) as err:  # (also: the agent refused ours)
            raise _Unreachable("connect", f"{url}: {type(err).__name__}: {err}") from err

    async def _push(self, agent: _AgentChannel) -> None:
        assert agent.desired is not None and self._epoch is not None
        url, version, pods, epoch = agent.url, agent.version, agent.desired, self._epoch
        refresh = agent.confirmed == version  # the agent holds this set: asking for its unresolved
        sent_epoch = 0 if agent.legacy else epoch
        if version != agent.generation_version:  # a new set: a new generation, above all we know
            heard = agent.agent_generation if agent.agent_epoch == sent_epoch else None
            agent.generation = max(agent.generation, heard or 0) + 1
            agent.generation_version = version
        generation = agent.generation
        held_back: list[UnresolvedPod] = []
        sent: Sequence[PodSpec] = pods
        if agent.ipv4_only:
            sent, held_back = ipv4_view(pods, agent.name)
        # The pods were validated by set_pods; model_construct skips doing it again.
        pod_set = PodSet.model_construct(epoch=sent_epoch, generation=generation, pods=list(sent))
        # An agent that predates epochs refuses the field (its model forbids unknown ones).
        body = pod_set.model_dump_json(exclude={"epoch"} if agent.legacy else None)
        agent.inflight_since, agent.pending_since = agent.pending_since, None
        started = self._clock()
        try:
            status, raw = await self._request(
                "PUT", agent.pods_url, body=body, headers=self._put_headers
            )
        except _Unreachable as err:
            self._restore_pending(agent)
            if agent.url == url and self._epoch == epoch:
                self._retry_later(agent, err.reason, err.text)
            return
        except BaseException:  # cancelled: keep the change's time for whoever comes next
            self._restore_pending(agent)
            raise
        now = self._clock()
        self._metrics.push_duration.labels(self.acceleration).observe(now - started)
        if agent.url != url or self._epoch != epoch:  # another agent's reply, or another term's
            self._restore_pending(agent)
            return
        if status == 200:
            try:
                result = ApplyResult.model_validate_json(raw)
            except ValidationError as err:
                self._restore_pending(agent)
                self._retry_later(
                    agent, "bad_reply", f"HTTP 200 with an invalid ApplyResult: {err}"
                )
                return
            agent.held_back = tuple(held_back)
            self._applied(agent, version, generation, len(sent), result, now, refresh=refresh)
            return
        self._restore_pending(agent)
        text, reply = _error_text(status, raw)
        if status == 409 and reply is not None and reply.applied_epoch > sent_epoch:
            self._superseded(agent, reply.applied_epoch, text, now)
        elif status == 409 and reply is not None and reply.applied_generation is not None:
            self._jump_past(agent, reply.applied_generation, reply.applied_epoch, text, now)
        elif status == 422 and not agent.legacy and _refuses_epochs(reply):
            agent.legacy = True
            log.warning(
                "agent predates epochs: its sets go without one (not fenced) until it restarts",
                extra=self._extra(agent, event="agent_without_epochs"),
            )
            self._schedule(agent, now)
        elif status == 422 and not agent.ipv4_only and _refuses_ipv6(reply):
            agent.ipv4_only = True
            log.warning(
                "agent predates IPv6: its sets carry IPv4 addresses only, pods without one are "
                "held back, until it restarts",
                extra=self._extra(agent, event="agent_without_ipv6"),
            )
            self._schedule(agent, now)
        elif status >= 500 or status in _RETRYABLE_4XX or status < 400:
            self._retry_later(agent, f"http_{status}", text)
        else:
            self._refused(agent, version, status, text)

    @staticmethod
    def _capabilities_unknown(agent: _AgentChannel) -> None:
        """Another agent process, maybe one that knows epochs and IPv6: send as to a current
        one until it refuses. A set sent as its IPv4 part goes again whole, under a new
        generation (the same generation with another set would be refused)."""
        if agent.ipv4_only:
            agent.generation_version = None
        agent.legacy = agent.ipv4_only = False

    def _restore_pending(self, agent: _AgentChannel) -> None:
        agent.pending_since = _earliest(agent.inflight_since, agent.pending_since)
        agent.inflight_since = None

    def _applied(
        self,
        agent: _AgentChannel,
        version: int,
        generation: int,
        pods: int,
        result: ApplyResult,
        now: float,
        *,
        refresh: bool = False,
    ) -> None:
        since, agent.inflight_since = agent.inflight_since, None
        if agent.boot_id is not None and agent.boot_id != result.boot_id:
            log.info(
                "agent restarted (new boot id in its reply)",
                extra=self._extra(agent, event="agent_restarted", boot_id=result.boot_id),
            )
        if agent.attempts:
            log.info(
                "agent reached again: set applied",
                extra=self._extra(agent, event="push_recovered", generation=generation),
            )
        if (
            (agent.legacy or agent.ipv4_only)
            and agent.boot_id is not None
            and agent.boot_id != result.boot_id
        ):
            self._capabilities_unknown(agent)
            self._schedule(agent, now)
        agent.boot_id = result.boot_id
        agent.agent_generation = result.applied_generation
        agent.agent_epoch = result.applied_epoch
        agent.confirmed = version
        agent.pods_applied = pods - len(result.unresolved)
        agent.unresolved = tuple(result.unresolved)
        if not agent.unresolved:
            agent.unresolved_since = None
        elif agent.unresolved_since is None:
            agent.unresolved_since = now
        agent.agent_version = result.version
        agent.last_error = agent.last_failure = None
        agent.blocked = None
        agent.attempts = agent.retries = agent.stale_retries = 0
        agent.not_before = 0.0
        # We just heard from it: the next probe can wait a whole interval.
        agent.probe_due = now + self._probe_interval
        self._refresh(agent, now)
        if refresh:  # no change was confirmed: nothing to time
            return
        seconds = now - (since if since is not None else now)
        self._metrics.applied_generation.labels(self.acceleration, agent.name).set(generation)
        self._metrics.change_applied.labels(self.acceleration).observe(seconds)
        if self._on_applied is not None:
            try:
                self._on_applied(agent.name, generation, seconds)
            except Exception:
                log.exception("on_applied failed", extra=self._extra(agent, event="callback_error"))

    def _jump_past(
        self, agent: _AgentChannel, applied: int, applied_epoch: int, text: str, now: float
    ) -> None:
        """A 409 naming the agent's generation in our epoch: the same set again, above it."""
        agent.agent_generation = applied
        agent.agent_epoch = applied_epoch
        agent.generation = max(agent.generation, applied) + 1
        agent.stale_retries += 1
        agent.attempts += 1
        self._metrics.count_failure(self.acceleration, "stale_generation")
        log.info(
            "agent holds a newer generation: sending the set again above it",
            extra=self._extra(
                agent, event="generation_jump", applied=applied, next=agent.generation
            ),
        )
        if agent.stale_retries <= _STALE_RETRIES_AT_ONCE:
            self._schedule(agent, now)
        else:  # someone else keeps raising it (a second operator?): do not race them flat out
            self._retry_later(
                agent, "stale_generation", f"{text} ({agent.stale_retries} times in a row)"
            )

    def _superseded(self, agent: _AgentChannel, epoch: int, text: str, now: float) -> None:
        """An agent holds a set of a higher epoch: another writer leads. Leave the node alone."""
        first = agent.superseded is None
        agent.superseded = agent.agent_epoch = epoch
        agent.confirmed = agent.send_due = None
        agent.attempts += 1
        agent.last_failure = "superseded"
        agent.last_error = (
            f"another writer leads: the agent applied a set of epoch {epoch}, this replica "
            f"writes epoch {self._epoch}; nothing is sent until this replica leads again ({text})"
        )
        self._metrics.count_failure(self.acceleration, "superseded")
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "another writer leads: not pushing to this agent",
            extra=self._extra(
                agent, event="push_superseded", epoch=self._epoch, applied_epoch=epoch
            ),
        )
        self._refresh(agent, now)
        if self._on_superseded is not None:
            try:
                self._on_superseded(epoch)
            except Exception:
                log.exception(
                    "on_superseded failed", extra=self._extra(agent, event="callback_error")
                )

    def _retry_later(self, agent: _AgentChannel, reason: str, text: str) -> None:
        now = self._clock()
        agent.attempts += 1
        agent.retries += 1
        agent.last_error, agent.last_failure = text, reason
        delay = self._jittered(
            min(self._backoff_max, self._backoff_initial * 2 ** min(agent.retries - 1, 32))
        )
        # Overrides a PUT that set_pods scheduled meanwhile: the backoff holds for new sets too.
        agent.not_before = agent.send_due = now + delay
        if reason != "stale_generation":
            self._metrics.count_failure(self.acceleration, reason)
        log.log(
            logging.WARNING if agent.retries == 1 else logging.DEBUG,
            "push failed: retrying",
            extra=self._extra(
                agent, event="push_failed", reason=reason, error=text, retry_in=delay
            ),
        )
        self._refresh(agent, now)

    def _refused(self, agent: _AgentChannel, version: int, status: int, text: str) -> None:
        agent.attempts += 1
        agent.blocked = version
        agent.last_error, agent.last_failure = text, f"http_{status}"
        agent.retries = 0
        self._metrics.count_failure(self.acceleration, f"http_{status}")
        log.error(
            "agent refused the set: not sent again until it changes",
            extra=self._extra(agent, event="push_refused", status=status, error=text),
        )
        self._refresh(agent, self._clock())

    async def _probe(self, agent: _AgentChannel) -> None:
        url = agent.url
        agent.probe_due = self._clock() + self._probe_interval * self._random.uniform(0.9, 1.1)
        try:
            status, raw = await self._request("GET", agent.health_url, headers=self._probe_headers)
        except _Unreachable as err:
            self._probe_failed(agent, url, err.text)
            return
        if agent.url != url:
            return
        if status != 200:
            self._probe_failed(agent, url, _error_text(status, raw)[0])
            return
        try:
            health = HealthReply.model_validate_json(raw)
        except ValidationError as err:
            self._probe_failed(agent, url, f"HTTP 200 with an invalid HealthReply: {err}")
            return
        now = self._clock()
        agent.probe_error = None
        agent.trust_bundle = health.trust_bundle
        agent.agent_version = health.version
        boot_id, applied = health.boot_id, (health.applied_epoch, health.applied_generation)
        if agent.boot_id is not None and boot_id != agent.boot_id:
            log.info(
                "agent restarted: sending its full set again",
                extra=self._extra(agent, event="agent_restarted", boot_id=boot_id),
            )
            agent.confirmed = agent.agent_generation = agent.agent_epoch = agent.blocked = None
            self._capabilities_unknown(agent)
            self._resend(agent, now)
        elif (
            health.applied_generation is not None
            and self._epoch is not None
            and not agent.legacy
            and health.applied_epoch > self._epoch
        ):
            self._superseded(agent, health.applied_epoch, "seen by the health probe", now)
        elif (
            health.applied_generation is not None
            and agent.agent_generation is not None
            and applied != (agent.agent_epoch, agent.agent_generation)
            and agent.superseded is None
        ):
            log.warning(
                "agent holds another set than it confirmed: sending the set again",
                extra=self._extra(
                    agent,
                    event="agent_diverged",
                    applied_epoch=health.applied_epoch,
                    applied_generation=health.applied_generation,
                    heard_epoch=agent.agent_epoch,
                    heard_generation=agent.agent_generation,
                ),
            )
            agent.agent_epoch, agent.agent_generation = applied
            agent.confirmed = None
            agent.generation_version = None  # a new generation, above the agent's
            self._resend(agent, now)
        elif agent.last_failure in ("connect", "tls", "timeout") and agent.send_due is not None:
            agent.not_before = 0.0  # it answers again: no need to wait out the backoff
            self._schedule(agent, now)
        elif agent.unresolved and agent.in_sync and self._writing:
            # The agent resolves them by itself, and says so only in a reply to a set: the same
            # set again (the same generation: a no-op there) brings the list up to date.
            self._schedule(agent, now)
        agent.boot_id = boot_id

    def _resend(self, agent: _AgentChannel, now: float) -> None:
        """The agent does not hold our set (any more): send it again, at once."""
        agent.retries = agent.stale_retries = 0
        agent.not_before = 0.0
        if agent.desired is not None:
            agent.pending_since = _earliest(agent.pending_since, now)
            self._schedule(agent, now)
        self._refresh(agent, now)

    def _probe_failed(self, agent: _AgentChannel, url: str | None, text: str) -> None:
        if agent.url != url:
            return
        agent.probe_error = text
        self._metrics.probe_failures.labels(self.acceleration).inc()
        log.debug("health probe failed", extra=self._extra(agent, event="probe_failed", error=text))

    async def _uninstall_one(self, url: str, timeout: aiohttp.ClientTimeout) -> str | None:
        try:
            status, raw = await self._request("POST", url, timeout=timeout)
        except _Unreachable as err:
            return err.text
        if status != 200:
            return _error_text(status, raw)[0]
        try:
            UninstallReply.model_validate_json(raw)
        except ValidationError as err:
            return f"HTTP 200 with an invalid UninstallReply: {err}"
        return None

    def _extra(self, agent: _AgentChannel, **fields: object) -> dict[str, object]:
        return {"acceleration": self.acceleration, "node": agent.name, "url": agent.url, **fields}
