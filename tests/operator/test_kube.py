"""The operator's writes (``kube.py``): server-side apply of the agents' objects through the
official client, against the emulator; and the merge patch the status writer sends."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from kubernetes.aio import client as k8s
from kubernetes.aio import config as k8s_config

from meshaccel.operator import rendering
from meshaccel.operator.config import AgentImage
from meshaccel.operator.credentials import AgentTLS
from meshaccel.operator.kube import (
    FIELD_MANAGER,
    LEGACY_ANNOTATION,
    LEGACY_MANAGER,
    Kube,
    legacy_migration,
    removals,
)
from meshaccel.operator.models import MeshAccelerationSpec
from tests.operator.conftest import KubeClient, api_path
from tests.operator.emulator import ApiServerEmulator, JsonObj
from tests.pki import make_pki

NAMESPACE = "meshaccel-system"
TLS = make_pki().agent_tls()
KEY = TLS.key_pem.strip().splitlines()[1]  # a line of the agents' private key
IMAGE = AgentImage("registry.example/mirror/meshaccel-agent:0.2.0")
PLURALS = {
    "ServiceAccount": ("v1", "serviceaccounts"),
    "Secret": ("v1", "secrets"),
    "ConfigMap": ("v1", "configmaps"),
    "DaemonSet": ("apps/v1", "daemonsets"),
}


@pytest.mark.parametrize(
    ("last", "new", "patch", "reason"),
    [
        ({"a": 1}, {"a": 2}, {"a": 2}, "a changed value is set"),
        ({"a": 1, "b": 2}, {"a": 1}, {"a": 1, "b": None}, "a dropped key is deleted"),
        (
            {"spec": {"nodeSelector": {"pool": "a", "zone": "z"}}},
            {"spec": {"nodeSelector": {"pool": "a"}}},
            {"spec": {"nodeSelector": {"pool": "a", "zone": None}}},
            "nested keys dropped are deleted, siblings kept",
        ),
        ({"l": [1, 2]}, {"l": [1]}, {"l": [1]}, "lists are replaced whole (RFC 7386)"),
        ({}, {"a": {"b": 1}}, {"a": {"b": 1}}, "no previous render: the object itself"),
        ({"a": {"b": 1}}, {"a": 3}, {"a": 3}, "a map replaced by a scalar"),
    ],
)
def test_removals(last: Any, new: Any, patch: Any, reason: str) -> None:
    assert removals(last, new) == patch, reason


# --- server-side apply against the emulator ------------------------------------------------------


@pytest.fixture
async def api(kubeconfig: Any) -> AsyncIterator[k8s.ApiClient]:
    configuration = k8s.Configuration()
    await k8s_config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    async with k8s.ApiClient(configuration) as api_client:
        yield api_client


@pytest.fixture
async def owner_uid(kube: KubeClient) -> str:
    """The MeshAcceleration the objects belong to (without it they would be collected)."""
    await kube.create_namespace(NAMESPACE)
    owner = await kube.create(
        api_path("meshaccel.io/v1alpha1", "meshaccelerations"),
        {"metadata": {"name": "default"}, "spec": {"namespaceSelector": {}}},
    )
    return str(owner["metadata"]["uid"])


def render(uid: str, tls: AgentTLS = TLS, **spec: Any) -> dict[str, JsonObj]:
    """The operator's objects for MeshAcceleration "default", by kind."""
    model = MeshAccelerationSpec.model_validate({"namespaceSelector": {}, **spec})
    objects = rendering.agent_objects(
        "default", uid, model, namespace=NAMESPACE, tls=tls, image=IMAGE
    )
    return {obj["kind"]: obj for obj in objects}


def path_of(obj: JsonObj) -> str:
    api_version, plural = PLURALS[obj["kind"]]
    return api_path(api_version, plural, NAMESPACE, obj["metadata"]["name"])


def annotation_values(value: Any) -> Iterator[str]:
    """Every annotation value anywhere in an object (the pod template's too)."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if key == "annotations" and isinstance(inner, dict):
                yield from (str(v) for v in inner.values())
            else:
                yield from annotation_values(inner)
    elif isinstance(value, list):
        for item in value:
            yield from annotation_values(item)


def owned_by(obj: JsonObj) -> dict[tuple[str, str], JsonObj]:
    return {
        (entry["manager"], entry["operation"]): entry["fieldsV1"]
        for entry in obj["metadata"].get("managedFields", [])
    }


def container(obj: JsonObj) -> JsonObj:
    found: JsonObj = obj["spec"]["template"]["spec"]["containers"][0]
    return found


async def edit(kube: KubeClient, obj: JsonObj, patch: JsonObj, manager: str) -> JsonObj:
    """Someone else's merge patch (kubectl edit/label, a controller, a mutating webhook)."""
    status, result = await kube.request(
        "PATCH",
        path_of(obj),
        patch,
        content_type="application/merge-patch+json",
        params={"fieldManager": manager},
    )
    assert status == 200, result
    assert isinstance(result, dict)
    return result


async def test_created_unchanged_updated(
    api: k8s.ApiClient, owner_uid: str, emulator: ApiServerEmulator
) -> None:
    kube = Kube(api)
    rendered = render(owner_uid)
    first = {kind: await kube.apply(obj) for kind, obj in rendered.items()}
    assert {kind: what for kind, (what, _) in first.items()} == dict.fromkeys(rendered, "created")
    version = emulator.resource_version
    again = {kind: await kube.apply(obj) for kind, obj in rendered.items()}
    assert {kind: what for kind, (what, _) in again.items()} == dict.fromkeys(rendered, "unchanged")
    assert emulator.resource_version == version, "an apply that changes nothing writes nothing"
    assert {kind: stored for kind, (_, stored) in again.items()} == {
        kind: stored for kind, (_, stored) in first.items()
    }
    # New TLS material: the Secret changes, nothing else (the agents reload it, no restart).
    renewed = render(owner_uid, make_pki().agent_tls())
    changed = {kind: (await kube.apply(obj))[0] for kind, obj in renewed.items()}
    assert changed == {
        "ServiceAccount": "unchanged",
        "Secret": "updated",
        "ConfigMap": "unchanged",
        "DaemonSet": "unchanged",
    }
    assert emulator.rejections == []


async def test_the_key_is_in_no_annotation(
    api: k8s.ApiClient, owner_uid: str, kube: KubeClient
) -> None:
    """Issue 12: the Secret's last-applied annotation held the agents' token in clear."""
    for obj in render(owner_uid).values():
        await Kube(api).apply(obj)
    secret = await kube.get(path_of(render(owner_uid)["Secret"]))
    assert base64.b64decode(secret["data"]["tls.key"]).decode() == TLS.key_pem
    encoded = secret["data"]["tls.key"]
    for obj in render(owner_uid).values():
        stored = await kube.get(path_of(obj))
        for value in annotation_values(stored):
            assert KEY not in value and encoded not in value, (obj["kind"], value)
        assert LEGACY_ANNOTATION not in (stored["metadata"].get("annotations") or {})
        # managedFields name the fields (f:tls.key), never their values.
        assert encoded not in json.dumps(stored["metadata"]["managedFields"])


async def test_other_managers_fields_survive_the_next_apply(
    api: k8s.ApiClient, owner_uid: str, kube: KubeClient
) -> None:
    """Before server-side apply, the next re-check reverted them (merge patch of the render)."""
    ops = Kube(api)
    rendered = render(owner_uid)
    for obj in rendered.values():
        await ops.apply(obj)
    restart = {"kubectl.kubernetes.io/restartedAt": "2025-01-01T00:00:00Z"}
    await edit(
        kube,
        rendered["DaemonSet"],
        {"spec": {"template": {"metadata": {"annotations": restart}}}},
        "kubectl-rollout",
    )
    await edit(kube, rendered["Secret"], {"metadata": {"labels": {"team": "a"}}}, "kubectl-label")
    webhook = {"policy.example/checked": "true"}
    await edit(kube, rendered["ServiceAccount"], {"metadata": {"annotations": webhook}}, "webhook")
    for obj in rendered.values():
        what, _ = await ops.apply(obj)
        assert what == "unchanged", obj["kind"]  # nothing of the operator's moved
    daemonset = await kube.get(path_of(rendered["DaemonSet"]))
    assert daemonset["spec"]["template"]["metadata"]["annotations"].items() >= restart.items()
    secret = await kube.get(path_of(rendered["Secret"]))
    assert secret["metadata"]["labels"]["team"] == "a"
    service_account = await kube.get(path_of(rendered["ServiceAccount"]))
    assert service_account["metadata"]["annotations"] == webhook


async def test_an_owned_field_someone_changed_is_taken_back(
    api: k8s.ApiClient, owner_uid: str, kube: KubeClient
) -> None:
    ops = Kube(api)
    rendered = render(owner_uid)
    for obj in rendered.values():
        await ops.apply(obj)
    daemonset = rendered["DaemonSet"]
    edited = await kube.json_patch(
        path_of(daemonset) + "?fieldManager=kubectl-edit",
        [
            {
                "op": "replace",
                "path": "/spec/template/spec/containers/0/image",
                "value": "attacker.example/shell:1",
            }
        ],
    )
    assert container(edited)["image"] == "attacker.example/shell:1"
    config_map = rendered["ConfigMap"]
    await edit(kube, config_map, {"data": {rendering.CONFIG_KEY: "{}"}}, "kubectl-edit")

    what, stored = await ops.apply(daemonset)
    assert what == "updated"
    assert container(stored)["image"] == container(daemonset)["image"]
    managed = owned_by(stored)
    agent = "k:" + json.dumps({"name": rendering.CONTAINER_NAME}, separators=(",", ":"))
    ours = managed[FIELD_MANAGER, "Apply"]["f:spec"]["f:template"]["f:spec"]["f:containers"]
    assert "f:image" in ours[agent]
    assert ("kubectl-edit", "Update") not in managed  # its only field went back
    what, stored = await ops.apply(config_map)
    assert what == "updated" and stored["data"] == config_map["data"]


async def test_fields_no_longer_rendered_are_removed(
    api: k8s.ApiClient, owner_uid: str, kube: KubeClient
) -> None:
    ops = Kube(api)
    daemonset = render(owner_uid)["DaemonSet"]
    older = copy.deepcopy(daemonset)  # what an earlier render had on top of this one
    container(older)["env"].append({"name": "MESHACCEL_RETIRED", "value": "1"})
    older["metadata"]["labels"]["meshaccel.io/retired"] = "yes"
    await ops.apply(older)
    what, stored = await ops.apply(daemonset)
    assert what == "updated"
    assert "MESHACCEL_RETIRED" not in {e["name"] for e in container(stored)["env"]}
    assert "meshaccel.io/retired" not in stored["metadata"]["labels"]
    assert container(stored)["env"] == container(daemonset)["env"]


async def earlier_release_wrote(api: k8s.ApiClient, secret: JsonObj) -> None:
    """``secret`` as releases before server-side apply left it: created with the rendered
    object in the last-applied annotation, by the official client naming no fieldManager."""
    rendered = json.dumps(secret, sort_keys=True, separators=(",", ":"))
    meta = secret["metadata"]
    annotated = {**meta.get("annotations", {}), LEGACY_ANNOTATION: rendered}
    body = {**secret, "metadata": {**meta, "annotations": annotated}}
    core: Any = k8s.CoreV1Api(api)
    await core.create_namespaced_secret(NAMESPACE, body)


async def test_an_earlier_releases_object_loses_its_last_applied_annotation(
    api: k8s.ApiClient, owner_uid: str, kube: KubeClient, emulator: ApiServerEmulator
) -> None:
    secret = render(owner_uid)["Secret"]
    older = copy.deepcopy(secret)
    older["metadata"]["labels"]["meshaccel.io/retired"] = "yes"  # rendered then, not now
    await earlier_release_wrote(api, older)
    legacy = await kube.get(path_of(older))
    annotation = legacy["metadata"]["annotations"][LEGACY_ANNOTATION]
    assert KEY in base64.b64decode(json.loads(annotation)["data"]["tls.key"]).decode()
    assert [(e["manager"], e["operation"]) for e in legacy["metadata"]["managedFields"]] == [
        (LEGACY_MANAGER, "Update")
    ]
    await edit(kube, secret, {"metadata": {"labels": {"team": "a"}}}, "kubectl-label")

    what, stored = await Kube(api).apply(secret)
    assert what == "updated"
    assert LEGACY_ANNOTATION not in (stored["metadata"].get("annotations") or {})
    assert list(annotation_values(stored)) == []
    labels = stored["metadata"]["labels"]
    assert "meshaccel.io/retired" not in labels, "the earlier render's fields were handed over"
    assert labels == {**secret["metadata"]["labels"], "team": "a"}
    assert set(owned_by(stored)) == {(FIELD_MANAGER, "Apply"), ("kubectl-label", "Update")}
    what, _ = await Kube(api).apply(secret)
    assert what == "unchanged"
    assert emulator.rejections == []


MIGRATION_CASES: list[tuple[JsonObj, JsonObj, JsonObj | None, str]] = [
    (
        {"metadata": {"name": "x", "labels": {"a": "1"}}, "data": {"k": "v"}},
        {"f:metadata": {"f:labels": {"f:a": {}}}, "f:data": {"f:k": {}}},
        None,
        "everything the annotation lists changes hands",
    ),
    (
        {"metadata": {"name": "x", "labels": {"a": "1"}}},
        {"f:metadata": {"f:labels": {"f:a": {}}}, "f:data": {"f:k": {}}},
        {"f:data": {"f:k": {}}},
        "a field the annotation does not list stays the legacy manager's",
    ),
    (
        {"spec": {"containers": [{"name": "c", "image": "i"}]}},
        {
            "f:spec": {
                "f:containers": {
                    'k:{"name":"c"}': {".": {}, "f:image": {}, "f:name": {}},
                    'k:{"name":"other"}': {".": {}, "f:name": {}},
                }
            }
        },
        {"f:spec": {"f:containers": {'k:{"name":"other"}': {".": {}, "f:name": {}}}}},
        "keyed items are matched by their keys",
    ),
]


@pytest.mark.parametrize(
    ("last", "legacy_fields", "left", "reason"),
    MIGRATION_CASES,
    ids=[case[3] for case in MIGRATION_CASES],
)
def test_legacy_migration_hands_over_what_the_annotation_lists(
    last: JsonObj, legacy_fields: JsonObj, left: JsonObj | None, reason: str
) -> None:
    live = {
        "apiVersion": "v1",
        "metadata": {
            "resourceVersion": "7",
            "annotations": {LEGACY_ANNOTATION: json.dumps(last), "other": "kept"},
            "managedFields": [
                {"manager": LEGACY_MANAGER, "operation": "Update", "fieldsV1": legacy_fields},
                {"manager": "kubectl-edit", "operation": "Update", "fieldsV1": {"f:x": {}}},
            ],
        },
    }
    ops = legacy_migration(live)
    assert ops[:2] == [
        {"op": "test", "path": "/metadata/resourceVersion", "value": "7"},
        {"op": "remove", "path": "/metadata/annotations/meshaccel.io~1last-applied"},
    ], reason
    [replace] = ops[2:]
    entries = {(e["manager"], e["operation"]): e["fieldsV1"] for e in replace["value"]}
    assert entries.get((LEGACY_MANAGER, "Update")) == left, reason
    assert entries["kubectl-edit", "Update"] == {"f:x": {}}, reason
    handed = entries[FIELD_MANAGER, "Apply"]
    assert handed and all(key in legacy_fields for key in handed), reason


def test_no_migration_without_the_annotation() -> None:
    assert legacy_migration({"metadata": {"annotations": {"a": "b"}, "resourceVersion": "1"}}) == []
