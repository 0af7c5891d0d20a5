"""The cluster as the CLI reads it: the Kubernetes API, with the user's own credentials.

Everything ``meshaccel`` shows comes from here: the MeshAccelerations and their status, pods,
namespaces, nodes, the agents' DaemonSets, the operator's Deployment, and the agents' own
commands run through the pods' ``exec`` subresource (what ``kubectl exec`` does). No other
port, no agent credential. Objects come back as the API's JSON (camelCase dicts), the form the
operator's selection reads too.

A read the API refuses or cannot answer raises :class:`AccessError` whose message names the
verb, the object and the API's reason, so the command can say what the user may not do.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.config.incluster_config import InClusterConfigLoader
from kubernetes.stream import stream

from meshaccel.operator.models import GROUP, PLURAL, VERSION

JsonObj = dict[str, Any]

SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")  # in a pod
STDOUT_CHANNEL, STDERR_CHANNEL, ERROR_CHANNEL = 1, 2, 3
# What a failed websocket handshake's text carries of the API's Status (its message).
_HANDSHAKE_MESSAGE = re.compile(r'"message":\s*"((?:[^"\\]|\\.)*)"')
_HANDSHAKE_STATUS = re.compile(r"Handshake status (\d+ [^-]*)")


class AccessError(Exception):
    """The API refused a request, or could not be reached."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ExecResult:
    """A command run in a container. ``exit_code`` None: it did not run, ``error`` says why."""

    stdout: str
    stderr: str
    exit_code: int | None
    error: str = ""


@dataclass(frozen=True)
class Login:
    """Where the user's credentials point: an API client configuration and the default
    namespace (the kubeconfig context's, or the pod's own in-cluster)."""

    configuration: client.Configuration
    namespace: str
    source: str  # "kubeconfig <path>" or "in-cluster"


def login(
    kubeconfig: str | None = None,
    context: str | None = None,
    *,
    service_account: Path = SERVICE_ACCOUNT,
) -> Login:
    """The user's credentials: ``--kubeconfig`` (else $KUBECONFIG, else ~/.kube/config) and
    ``--context``, or, with none of those and inside a pod, the pod's service account."""
    configuration = client.Configuration()
    default_file = os.path.expanduser(config.kube_config.KUBE_CONFIG_DEFAULT_LOCATION)
    has_file = kubeconfig is not None or any(
        os.path.exists(path) for path in default_file.split(os.pathsep)
    )
    if not has_file and os.environ.get("KUBERNETES_SERVICE_HOST"):
        loader = InClusterConfigLoader(  # type: ignore[no-untyped-call]
            token_filename=str(service_account / "token"),
            cert_filename=str(service_account / "ca.crt"),
        )
        try:
            loader.load_and_set(configuration)  # type: ignore[no-untyped-call]
        except ConfigException as err:
            raise AccessError(f"cannot use the in-cluster service account: {err}") from None
        namespace_file = service_account / "namespace"
        namespace = "default"
        if namespace_file.exists():
            namespace = namespace_file.read_text(encoding="utf-8").strip() or namespace
        return Login(configuration, namespace, "in-cluster")
    where = kubeconfig or default_file
    try:
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig,
            context=context,
            client_configuration=configuration,
            persist_config=False,
        )
        contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    except (ConfigException, OSError) as err:
        raise AccessError(f"cannot use the kubeconfig {where}: {err}") from None
    chosen = next((c for c in contexts if c.get("name") == context), None) if context else active
    namespace = ((chosen or {}).get("context") or {}).get("namespace") or "default"
    return Login(configuration, namespace, f"kubeconfig {where}")


def _reason(body: bytes | str | None, otherwise: str) -> str:
    """The API's own message (its Status body), else ``otherwise``."""
    try:
        status = json.loads(body or "")
    except ValueError:
        status = None
    if isinstance(status, dict) and status.get("message"):
        return str(status["message"])
    return otherwise


class Cluster:
    """The reads the CLI makes, each one request (no caching: a command runs once)."""

    def __init__(self, login: Login, *, timeout: float = 30.0) -> None:
        self.login = login
        self.timeout = timeout
        self._api = client.ApiClient(login.configuration)

    def close(self) -> None:
        self._api.close()  # type: ignore[no-untyped-call]

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- reads -----------------------------------------------------------------------------

    def _get(self, what: str, path: str, query: Sequence[tuple[str, str]] = ()) -> JsonObj:
        request = self._api.param_serialize(
            "GET",
            path,
            query_params=list(query),
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        try:
            response = self._api.call_api(*request, _request_timeout=self.timeout)
            data: bytes = response.read() or b""  # type: ignore[no-untyped-call]
        except urllib3.exceptions.HTTPError as err:
            host = self.login.configuration.host
            raise AccessError(f"cannot reach the API server at {host} ({what}): {err}") from None
        if not 200 <= response.status <= 299:
            reason = _reason(data, f"{response.status} {response.reason}")
            raise AccessError(f"cannot {what}: {reason}", status=response.status)
        try:
            body = json.loads(data)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise AccessError(f"cannot {what}: the API's answer is not a JSON object")
        return body

    def _list(self, what: str, path: str, label_selector: str = "") -> list[JsonObj]:
        query = [("labelSelector", label_selector)] if label_selector else []
        items = self._get(what, path, query).get("items") or []
        return [item for item in items if isinstance(item, dict)]

    def _maybe(self, what: str, path: str) -> JsonObj | None:
        try:
            return self._get(what, path)
        except AccessError as err:
            if err.status == 404:
                return None
            raise

    def accelerations(self) -> list[JsonObj]:
        return self._list(f"list {PLURAL}.{GROUP}", f"/apis/{GROUP}/{VERSION}/{PLURAL}")

    def acceleration(self, name: str) -> JsonObj | None:
        return self._maybe(
            f"get {PLURAL}.{GROUP} {name}", f"/apis/{GROUP}/{VERSION}/{PLURAL}/{name}"
        )

    def namespace(self, name: str) -> JsonObj | None:
        return self._maybe(f"get namespace {name}", f"/api/v1/namespaces/{name}")

    def namespaces(self) -> list[JsonObj]:
        return self._list("list namespaces", "/api/v1/namespaces")

    def nodes(self) -> list[JsonObj]:
        return self._list("list nodes", "/api/v1/nodes")

    def pods(self, namespace: str | None, label_selector: str = "") -> list[JsonObj]:
        if namespace is None:
            return self._list("list pods in all namespaces", "/api/v1/pods", label_selector)
        return self._list(
            f"list pods in namespace {namespace}",
            f"/api/v1/namespaces/{namespace}/pods",
            label_selector,
        )

    def daemonset(self, namespace: str, name: str) -> JsonObj | None:
        return self._maybe(
            f"get daemonset {namespace}/{name}",
            f"/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}",
        )

    def deployments(self, namespace: str, label_selector: str) -> list[JsonObj]:
        return self._list(
            f"list deployments in namespace {namespace}",
            f"/apis/apps/v1/namespaces/{namespace}/deployments",
            label_selector,
        )

    # -- exec ------------------------------------------------------------------------------

    def exec(self, namespace: str, pod: str, container: str, command: Sequence[str]) -> ExecResult:
        """Run ``command`` in the container, as ``kubectl exec`` does: its stdout, stderr and
        exit code. Safe to call from several threads at once."""
        # stream() swaps call_api on the client it is handed: one client per call.
        with client.ApiClient(self.login.configuration) as api_client:
            core = client.CoreV1Api(api_client)
            try:
                socket = stream(
                    core.connect_get_namespaced_pod_exec,
                    pod,
                    namespace,
                    command=list(command),
                    container=container,
                    stdin=False,
                    stdout=True,
                    stderr=True,
                    tty=False,
                    _preload_content=False,
                    _request_timeout=self.timeout,
                )
            except ApiException as err:
                return ExecResult("", "", None, f"exec refused: {_handshake_reason(err)}")
            try:
                socket.run_forever(timeout=self.timeout)
                if socket.is_open():
                    return ExecResult(
                        str(socket.read_channel(STDOUT_CHANNEL)),
                        str(socket.read_channel(STDERR_CHANNEL)),
                        None,
                        f"no answer within {self.timeout:g} s",
                    )
                stdout = str(socket.read_channel(STDOUT_CHANNEL))
                stderr = str(socket.read_channel(STDERR_CHANNEL))
                code, error = exit_status(str(socket.read_channel(ERROR_CHANNEL)))
            finally:
                socket.close()
        return ExecResult(stdout, stderr, code, error)


def _handshake_reason(err: ApiException) -> str:
    """What a refused exec says: the API's message from the handshake's body, else its status."""
    text = str(err.reason or "")
    message = _HANDSHAKE_MESSAGE.search(text)
    if message:
        return json.loads(f'"{message[1]}"')  # type: ignore[no-any-return]
    status = _HANDSHAKE_STATUS.search(text)
    return status[1].strip() if status else (text.splitlines()[0] if text else "no reason given")


def exit_status(error_channel: str) -> tuple[int | None, str]:
    """The exit code and the failure, from the error channel's ``Status`` (v4 protocol)."""
    if not error_channel.strip():
        return None, "the exec ended without an exit status"
    try:
        status = json.loads(error_channel)
    except ValueError:
        return None, f"unreadable exit status: {error_channel[:200]}"
    if not isinstance(status, dict):
        return None, f"unreadable exit status: {error_channel[:200]}"
    if status.get("status") == "Success":
        return 0, ""
    causes = (status.get("details") or {}).get("causes") or []
    if status.get("reason") == "NonZeroExitCode":
        for cause in causes:
            if isinstance(cause, dict) and cause.get("reason") == "ExitCode":
                try:
                    return int(cause.get("message", "")), ""
                except ValueError:
                    break
    return None, str(status.get("message") or status.get("reason") or "the command failed")
