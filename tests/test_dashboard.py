"""The Grafana dashboard queries only metrics that the agent and the operator really export.

Every panel's PromQL is parsed (promql-parser, a real PromQL grammar), every metric it selects is
collected, and each is looked up in the live ``/metrics`` of

* a real agent: ``meshaccel-agent run --mode=standalone`` with the real eBPF objects, attached
  to a cgroup of its own, pins under /sys/fs/bpf/meshaccel-test-<pid>, one pod programmed;
* the real operator process against the API emulator, with a MeshAcceleration, two nodes, fake
  agents taking its pushes, and pods accelerated and not.

A name resolves through its family's type as Prometheus stores it: a counter as ``_total``, a
histogram as ``_bucket``/``_sum``/``_count``, a gauge as itself. Every label a query groups,
matches or joins by, and every label a legend shows, must be on one of the query's metrics as
exported or be one the chart's monitors add to its target. Both processes are made to count
one failure each, so that every labelled family has a series to read its labels from. The same
live agent shows what Prometheus gets without a client certificate, and that the chart's
default TLS settings (the operator's ConfigMap of CA certificates, the agents' fixed name)
verify it (docs/security.md, "Monitoring").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import ssl
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from meshaccel.contract.tls import AGENT_SERVER_NAME
from meshaccel.operator import rendering
from meshaccel.operator.credentials import (
    CA_CONFIGMAP,
    CA_CONFIGMAP_KEY,
    CA_SECRET,
    CAState,
    Credentials,
)
from tests.agent_lifecycle.harness import (
    PKI,
    AgentProcess,
    free_port,
    standalone_argv,
    tls_args,
    unload_instance,
    write_yaml,
)
from tests.netlab.cgroups import TEST_CGROUP_PREFIX, TestCgroup, find_cgroup2_mount
from tests.operator.conftest import (
    CRDS,
    KubeClient,
    agent_tls,
    api_path,
    report_rollout,
    run_agent_pod,
)
from tests.operator.emulator import ApiServerEmulator
from tests.operator.fake_agent import NODES, FakeAgent, common_free_port
from tests.operator.memory_objects import MemoryObjects
from tests.pki import make_pki
from tests.requirements import require_kernel
from tests.waiting import wait_for, wait_until

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "charts" / "meshaccel" / "dashboards" / "meshaccel.json"
# Grafana's own variables, as it substitutes them before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "2m", "$__interval": "30s", "$__range": "1h"}
# Sample names of a family, by its type (the exposition formats' suffixes).
SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
    "unknown": ("",),
}
#: Labels a scrape adds to every series of a target: Prometheus (instance, job), the Prometheus
#: Operator's PodMonitors (namespace, pod, container, endpoint) and the chart's agents' monitor
#: relabelings (node, acceleration; tests/chart/test_monitoring.py holds the chart to them).
SCRAPE_LABELS = {"instance", "job", "namespace", "pod", "container", "endpoint"}
AGENT_TARGET_LABELS = {"node", "acceleration"}
#: The operator's per-resource gauges (issue 13, written beside this dashboard): named here so
#: that a failure says clearly when the operator does not export them (yet).
OPERATOR_RESOURCE_GAUGES = (
    "meshaccel_operator_resource_ready",
    "meshaccel_operator_pods_selected",
    "meshaccel_operator_pods_accelerated",
    "meshaccel_operator_pods_not_accelerated",
)


# -- the dashboard's queries -------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    panel: str
    ref: str
    expr: str
    legend: str

    def __str__(self) -> str:
        return f"panel {self.panel!r} query {self.ref}: {self.expr}"


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def queries(board: dict[str, Any]) -> list[Query]:
    return [
        Query(panel["title"], target["refId"], target["expr"], target.get("legendFormat", ""))
        for panel in panels(board)
        for target in panel.get("targets", [])
    ]


def parse(expr: str) -> promql_parser.Expr:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return promql_parser.parse(expr)


def selected_metrics(expr: str) -> set[str]:
    """Every metric name the expression selects (vector and range selectors)."""
    names: set[str] = set()

    def visit(node: promql_parser.Expr) -> None:
        selector = node.vector_selector if isinstance(node, promql_parser.MatrixSelector) else node
        if isinstance(selector, promql_parser.VectorSelector):
            assert selector.name, f"a selector without a metric name: {expr}"
            names.add(selector.name)

    promql_parser.walk(parse(expr), visit)
    return names


# -- what a process exports -----------------------------------------------------------------


@dataclass(frozen=True)
class Exposition:
    """What a scrape of one process stores: sample names, and the labels each name carries."""

    names: set[str]
    labels: dict[str, set[str]]  # by sample name; absent for a family with no sample yet

    @classmethod
    def parse(cls, text: str, target_labels: Iterable[str] = ()) -> Exposition:
        """Names by each family's declared type (a family declared without samples counts:
        Prometheus stores its series from the first sample on); labels as scraped, plus
        ``target_labels``, which the scrape adds."""
        names: set[str] = set()
        labels: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(text):
            names.update(family.name + suffix for suffix in SUFFIXES[family.type])
            for sample in family.samples:
                labels.setdefault(sample.name, set(target_labels)).update(sample.labels)
        return cls(names, labels)


def exported_names(text: str) -> set[str]:
    return Exposition.parse(text).names


def labels_used(expr: str) -> set[str]:
    """Labels the expression groups by, joins on, copies, or matches on."""
    used: set[str] = set()

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            used.update(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            if node.modifier.matching is not None:
                used.update(node.modifier.matching.labels)
            used.update(node.modifier.group_labels or ())
        elif isinstance(node, promql_parser.VectorSelector):
            used.update(m.name for m in node.matchers.matchers if m.name != "__name__")

    promql_parser.walk(parse(expr), visit)
    return used


def legend_labels(legend: str) -> set[str]:
    return set(re.findall(r"\{\{\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\}\}", legend))


# -- fast checks of the dashboard itself -----------------------------------------------------------


def test_every_query_parses_and_names_its_metrics() -> None:
    found = queries(dashboard())
    assert len(found) >= 20
    for query in found:
        names = selected_metrics(query.expr)
        assert names, f"{query} selects no metric"
        assert all(n.startswith(("meshaccel_", "process_")) for n in names), str(query)


def test_panels_read_the_chosen_data_source_and_have_their_own_ids() -> None:
    board = dashboard()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
        assert panel.get("description"), f"panel {panel['title']!r} says what it shows"
        assert all(t["datasource"] == panel["datasource"] for t in panel["targets"])


def test_names_resolve_through_their_family_type() -> None:
    """The resolver itself: suffixes count only on the type that has them."""
    text = (
        "# TYPE a_seconds histogram\n"
        'a_seconds_bucket{le="1.0"} 1\na_seconds_bucket{le="+Inf"} 1\n'
        "a_seconds_sum 0.5\na_seconds_count 1\n"
        "# TYPE b counter\nb_total 3\n"
        "# TYPE c gauge\nc 1\n"
        "# TYPE d counter\n"  # declared, no sample yet
    )
    names = exported_names(text)
    assert {"a_seconds_bucket", "a_seconds_sum", "a_seconds_count", "b_total", "c"} <= names
    assert "d_total" in names
    for absent in ("a_seconds", "b", "c_total", "c_bucket", "b_bucket", "d"):
        assert absent not in names, absent
    expr = (
        "histogram_quantile(0.9, sum by (le, hop) "
        '(rate(a_seconds_bucket{job="j"}[$__rate_interval]))) / on (instance) group_left (x) c'
    )
    assert selected_metrics(expr) == {"a_seconds_bucket", "c"}
    assert labels_used(expr) == {"le", "hop", "job", "instance", "x"}
    assert legend_labels("{{hop}} p99 {{ node }}") == {"hop", "node"}
    labels = Exposition.parse(text, {"instance"}).labels
    assert labels["a_seconds_bucket"] == {"le", "instance"}
    assert labels["b_total"] == {"instance"}
    assert "d_total" not in labels, "no sample, no labels to know"


# -- a live agent --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiveAgent:
    process: AgentProcess
    pod: dict[str, str]  # the pods-file entry it programmed


@pytest.fixture(scope="module")
def live_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveAgent]:
    require_kernel()
    workdir = tmp_path_factory.mktemp("agent")
    instance = f"dashboard-{os.getpid()}"
    with ExitStack() as stack:
        # LIFO: the agent stops, then its pins go, then the cgroup.
        cgroup = stack.enter_context(TestCgroup(f"{TEST_CGROUP_PREFIX}{os.getpid()}-dashboard"))
        stack.callback(unload_instance, instance)
        pod = {
            "uid": "0c9d7c61-5e2f-4c3b-9a51-6d1e2f3a4b5c",
            "namespace": "payments",
            "name": "ledger-7d9f8b6c5d-x2x9q",
            "ip": "198.18.7.77",
            "cgroup": str(cgroup.child("pod-ledger").relative_to(find_cgroup2_mount())),
        }
        pods_file = workdir / "pods.yaml"
        write_yaml(pods_file, {"generation": 1, "pods": [pod]})
        port = free_port()
        argv = [
            *standalone_argv(
                pods_file=pods_file,
                attach_cgroup=cgroup.path,
                instance=instance,
                tls=tls_args(workdir / "tls"),
                port=port,
                node_name="dashboard",
            ),
            "--log-format=json",
        ]
        agent = AgentProcess(argv, workdir=workdir, name="agent", port=port)
        stack.callback(agent.stop)
        agent.wait_ready()
        # Another set under the same generation is refused (generation_conflict): one apply
        # error, so that its family has a series, and the pod stays programmed.
        write_yaml(pods_file, {"generation": 1, "pods": []})
        status = wait_until(
            lambda: (s := agent.get("/v1/status"))["apply_errors"] and s,
            timeout=30,
            what="the refused set",
        )
        assert status["pods_accelerated"] == 1, status
        yield LiveAgent(agent, pod)


def scrape_agent(agent: AgentProcess) -> str:
    """GET /metrics as Prometheus does it: TLS, no client certificate."""
    status, text = agent.request("GET", "/metrics", context=PKI.anonymous_context())
    assert status == 200, f"{status}: {text}\n{agent.describe()}"
    assert isinstance(text, str)
    return text


def scrape_verified(
    agent: AgentProcess, ca_pem: str, server_name: str = AGENT_SERVER_NAME
) -> tuple[int, str]:
    """GET /metrics as Prometheus does it with the chart's default tlsConfig: no client
    certificate, the agent's chain verified against ``ca_pem`` and its name against
    ``server_name`` (not the address dialled). Raises ssl.SSLCertVerificationError if refused."""
    assert agent.port is not None
    context = ssl.create_default_context(cadata=ca_pem)
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    with (
        socket.create_connection(("127.0.0.1", agent.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        tls.sendall(
            f"GET /metrics HTTP/1.0\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode()
        )
        chunks = []
        while chunk := tls.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


@pytest.mark.kernel
async def test_the_operators_configmap_verifies_a_live_agent(live_agent: LiveAgent) -> None:
    """The chart's default scrape: the CA certificates the operator writes into its ConfigMap,
    and the name its server certificates carry, accept a real agent; another CA or another
    name is refused."""
    # The CA Secret holds the CA that issued the live agent's certificate (the test PKI, made
    # by the operator's own code); the operator, leading, writes the ConfigMap from it.
    secrets, configmaps = MemoryObjects(), MemoryObjects()
    data = {key: value for key, value in CAState(PKI.ca).data().items() if value is not None}
    secrets.objects[CA_SECRET] = {
        "metadata": {"name": CA_SECRET, "resourceVersion": "1"},
        "data": data,
    }
    creds = Credentials(secrets, NAMESPACE, configmaps)
    await creds.load()
    await creds.tend(dict, writing=True)
    ca_pem = configmaps.objects[CA_CONFIGMAP]["data"][CA_CONFIGMAP_KEY]
    assert "PRIVATE KEY" not in ca_pem

    agent = live_agent.process
    status, text = await asyncio.to_thread(scrape_verified, agent, ca_pem)
    assert status == 200, f"{status}: {text}\n{agent.describe()}"
    assert "meshaccel_build_info" in Exposition.parse(text).names
    with pytest.raises(ssl.SSLCertVerificationError):  # another installation's CA
        await asyncio.to_thread(scrape_verified, agent, make_pki().ca.pem)
    with pytest.raises(ssl.SSLCertVerificationError):  # the right CA, another name
        await asyncio.to_thread(scrape_verified, agent, ca_pem, "agent.example.internal")


# -- a live operator -----------------------------------------------------------------------------

NAMESPACE = "meshaccel-system"
ENABLED = {"meshaccel.io/accelerate": "enabled"}


def write_kubeconfig(path: Path, server: str) -> None:
    cluster = {"name": "emulator", "cluster": {"server": server}}
    user = {"name": "tester", "user": {"token": "emulator-token"}}
    context = {"name": "emulator", "context": {"cluster": "emulator", "user": "tester"}}
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [cluster],
                "users": [user],
                "contexts": [context],
                "current-context": "emulator",
            }
        )
    )


@contextlib.asynccontextmanager
async def operator_process(
    kubeconfig: Path, metrics_port: int, log: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``meshaccel-operator`` as the chart runs it, against the emulator; stopped by its PID."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHACCEL_")}
    env.pop("KUBERNETES_SERVICE_HOST", None)  # no in-cluster login
    env |= {
        "KUBECONFIG": str(kubeconfig),
        "MESHACCEL_AGENT_IMAGE": "registry.example/mirror/meshaccel-agent:0.2.0",
        "MESHACCEL_PUSH_WINDOW": "0.05",
        "MESHACCEL_PROBE_INTERVAL": "0.5",
        "MESHACCEL_BACKOFF_MAX": "0.5",
        "MESHACCEL_STATUS_INTERVAL": "0.3",
        "PYTHONUNBUFFERED": "1",
    }
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "meshaccel.operator.main",
            "--standalone",
            f"--namespace={NAMESPACE}",
            "--liveness=",
            f"--metrics-port={metrics_port}",
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
                await process.wait()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
        return body.decode()


async def scrape(url: str) -> str | None:
    """The text at ``url``, None while nothing answers there."""
    try:
        return await asyncio.to_thread(_get, url)
    except OSError:
        return None


def has_samples(text: str, name: str) -> bool:
    return any(
        sample.name == name and sample.value > 0
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    )


@pytest.fixture
async def operator_metrics(tmp_path: Path) -> str:
    """The live operator's /metrics once it has pushed to every node and written a status."""
    emulator = ApiServerEmulator()
    emulator.load_crds(CRDS)
    port = common_free_port()
    agents = {
        node: FakeAgent(tls=None, host=ip, port=port, name=node) for node, ip in NODES.items()
    }
    log = tmp_path / "operator.log"
    metrics_port = free_port()
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    async with emulator, kmock.Server(emulator), aiohttp.ClientSession() as session:
        kube = KubeClient(session, str(emulator.url))
        await kube.create_namespace(NAMESPACE)
        await kube.create_namespace("shop", ENABLED)
        for node in NODES:
            await kube.create_node(node)
        await kube.create_pod("shop", "web", node="node-1", pod_ip="198.18.1.10")
        await kube.create_pod("shop", "db", node="node-2", pod_ip="198.18.1.11")
        await kube.create_pod("shop", "batch", node="node-1", pod_ip="198.18.1.12", sidecar=False)
        write_kubeconfig(tmp_path / "kubeconfig", str(emulator.url).rstrip("/"))
        async with contextlib.AsyncExitStack() as stack:
            for agent in agents.values():
                await stack.enter_async_context(agent)
            # The first push to node-1 fails (then succeeds): push_failures gets its series.
            agents["node-1"].fail_next(1, 503)
            await stack.enter_async_context(
                operator_process(tmp_path / "kubeconfig", metrics_port, log)
            )
            await kube.create(
                api_path("meshaccel.io/v1alpha1", "meshaccelerations"),
                {
                    "apiVersion": "meshaccel.io/v1alpha1",
                    "kind": "MeshAcceleration",
                    "metadata": {"name": "default"},
                    "spec": {
                        "namespaceSelector": {"matchLabels": ENABLED},
                        "agent": {"port": port},
                    },
                },
            )
            # Play the DaemonSet controller and kubelet: an agent pod per node, TLS from its Secret.
            daemonset_path = api_path(
                "apps/v1", "daemonsets", NAMESPACE, rendering.daemonset_name("default")
            )

            async def daemonset() -> dict[str, Any] | None:
                status, body = await kube.request("GET", daemonset_path)
                return body if status == 200 else None

            created = await wait_for(daemonset, timeout=30, what=f"the DaemonSet\n{log}")
            tls = await agent_tls(kube, NAMESPACE, "default")
            for agent in agents.values():
                await agent.use_tls(tls)
            for node, ip in NODES.items():
                await run_agent_pod(kube, created, node, ip)
            await report_rollout(kube, created, len(NODES))

            await wait_for(
                lambda: all(a.last_set and a.last_set.pods for a in agents.values()),
                timeout=30,
                what="every agent's set",
            )

            async def in_sync() -> bool:
                body = await kube.get(
                    api_path("meshaccel.io/v1alpha1", "meshaccelerations", name="default")
                )
                return (body.get("status") or {}).get("nodesInSync") == len(NODES)

            await wait_for(in_sync, timeout=30, what=f"the resource's status (log: {log})")

            async def pushed() -> str:
                text = await scrape(url)
                pushes = "meshaccel_operator_push_duration_seconds_count"
                return text if text is not None and has_samples(text, pushes) else ""

            text = await wait_for(pushed, timeout=30, what=f"pushes in {url}")
        assert emulator.rejections == [], "the operator wrote something an API server refuses"
    return text


# -- the check -----------------------------------------------------------------------------------


@pytest.mark.kernel
@pytest.mark.slow
async def test_every_dashboard_metric_is_exported_by_the_live_agent_or_operator(
    live_agent: LiveAgent, operator_metrics: str
) -> None:
    agent = Exposition.parse(scrape_agent(live_agent.process), SCRAPE_LABELS | AGENT_TARGET_LABELS)
    operator = Exposition.parse(operator_metrics, SCRAPE_LABELS)
    # Both processes export their own; the join the process panels use needs both.
    for exposition in (agent, operator):
        assert {"process_resident_memory_bytes", "process_cpu_seconds_total"} <= exposition.names
        assert "meshaccel_build_info" in exposition.names

    missing: dict[str, list[str]] = {}
    unlabelled: list[str] = []
    for query in queries(dashboard()):
        metrics = selected_metrics(query.expr)
        available: set[str] = set()
        for name in sorted(metrics):
            if name not in agent.names | operator.names:
                missing.setdefault(name, []).append(str(query))
            for exposition in (agent, operator):
                if name in exposition.names:
                    available |= exposition.labels.get(name, set())
        wanted = labels_used(query.expr) | legend_labels(query.legend)
        if wanted - available and metrics <= agent.names | operator.names:
            unlabelled.append(
                f"{query}: {sorted(wanted - available)} not among {sorted(available)}"
            )
    gauges = sorted(set(missing) & set(OPERATOR_RESOURCE_GAUGES))
    assert not missing, (
        "the dashboard queries metrics nobody exports:\n"
        + "\n".join(f"  {name}\n    " + "\n    ".join(where) for name, where in missing.items())
        + (
            f"\n(the operator's per-resource gauges {gauges} are not exported yet: "
            "operator/metrics.py)"
            if gauges
            else ""
        )
    )
    assert not unlabelled, "labels no series carries:\n" + "\n".join(unlabelled)


@pytest.mark.kernel
def test_prometheus_scrape_needs_no_identity_and_learns_no_pod(live_agent: LiveAgent) -> None:
    """docs/security.md: without a client certificate, /metrics only; and nothing of a pod."""
    agent = live_agent.process
    text = scrape_agent(agent)
    assert "meshaccel_agent_pods_accelerated 1.0" in text
    anonymous = PKI.anonymous_context()
    for path in ("/v1/status", "/v1/pods", "/v1/health"):
        status, _ = agent.request("GET", path, context=anonymous)
        assert status == 403, path
    for value in live_agent.pod.values():
        for fragment in {value, value.rsplit("/", 1)[-1]}:
            assert fragment not in text, f"/metrics names the pod: {fragment!r}"
