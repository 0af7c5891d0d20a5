"""Each gap kmock 0.8 has, closed by ApiServerEmulator, proven by a test that would fail on
plain kmock (see emulator.py's docstring for what is still not emulated)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import kopf
import pytest

from tests.operator.conftest import CRDS, KubeClient, api_path, kopf_running
from tests.operator.emulator import ApiServerEmulator, JsonObj
from tests.operator.k8s_validation import validators_built
from tests.waiting import wait_for

CM = api_path("v1", "configmaps", "default")
PODS = api_path("v1", "pods", "default")
DS = api_path("apps/v1", "daemonsets", "default")
MA = api_path("meshaccel.io/v1alpha1", "meshaccelerations")

# A small CRD of our own: defaulting inside objects, arrays and maps; nullable; int-or-string;
# a free-form (preserve-unknown-fields) corner; an enum; an exclusive minimum.
WIDGET_CRD: JsonObj = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {
        "group": "example.com",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "properties": {
                                    "size": {
                                        "type": "integer",
                                        "minimum": 0,
                                        "exclusiveMinimum": True,
                                    },
                                    "color": {
                                        "type": "string",
                                        "enum": ["red", "blue"],
                                        "default": "red",
                                    },
                                    "limits": {
                                        "type": "object",
                                        "default": {},
                                        "additionalProperties": {
                                            "x-kubernetes-int-or-string": True
                                        },
                                    },
                                    "parts": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "properties": {
                                                "name": {"type": "string"},
                                                "count": {"type": "integer", "default": 1},
                                            },
                                        },
                                    },
                                    "note": {"type": "string", "nullable": True},
                                    "extra": {
                                        "type": "object",
                                        "x-kubernetes-preserve-unknown-fields": True,
                                    },
                                },
                            },
                            "status": {
                                "type": "object",
                                "x-kubernetes-preserve-unknown-fields": True,
                            },
                        },
                    }
                },
            }
        ],
    },
}
WIDGETS = api_path("example.com/v1", "widgets", "default")


def configmap(name: str, **data: str) -> JsonObj:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": dict(data)}


def daemonset(name: str, image: str = "ghcr.io/meshaccel/meshaccel-agent:0.1.0") -> JsonObj:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "agent", "image": image}]},
            },
        },
    }


class WatchStream:
    """A watch's events, one at a time. That an event was NOT sent shows in the next one: the
    tests make a later change and check that it comes next (no quiet period is waited out).
    The timeouts only turn a hang into a failure."""

    def __init__(self, response: Any) -> None:
        self.response = response

    async def next(self, timeout: float = 30.0) -> JsonObj:
        line = await asyncio.wait_for(self.response.content.readline(), timeout)
        assert line, "the watch stream ended"
        event: JsonObj = json.loads(line)
        return event

    async def end(self, timeout: float = 30.0) -> bytes:
        """The rest of the stream, once the server ends it."""
        return await asyncio.wait_for(self.response.content.read(), timeout)


@contextlib.asynccontextmanager
async def watching(kube: KubeClient, path: str, **params: str) -> AsyncIterator[WatchStream]:
    async with kube.session.get(
        kube.base_url + path, params={"watch": "true", **params}
    ) as response:
        assert response.status == 200
        yield WatchStream(response)


# --- metadata -------------------------------------------------------------------------------------


async def test_create_sets_server_metadata(kube: KubeClient):
    first = await kube.create(CM, configmap("one"))
    second = await kube.create(CM, configmap("two"))
    for obj in (first, second):
        meta = obj["metadata"]
        assert uuid.UUID(meta["uid"]).version == 4
        assert isinstance(meta["resourceVersion"], str) and meta["resourceVersion"].isdigit()
        assert meta["generation"] == 1
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["creationTimestamp"])
    assert first["metadata"]["uid"] != second["metadata"]["uid"]
    assert int(second["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    assert await kube.get(api_path("v1", "configmaps", "default", "one")) == first


async def test_generate_name(kube: KubeClient):
    body = {"metadata": {"generateName": "kopf-event-"}, "data": {}}
    names = {(await kube.create(CM, body))["metadata"]["name"] for _ in range(3)}
    assert len(names) == 3
    assert all(re.fullmatch(r"kopf-event-[a-z0-9]{5}", name) for name in names)
    status, payload = await kube.request("POST", CM, {"metadata": {}})
    assert (status, payload["reason"]) == (422, "Invalid")


async def test_create_conflict_and_client_metadata_ignored(kube: KubeClient):
    body = configmap("dup")
    body["metadata"] |= {"uid": "forged", "resourceVersion": "999", "generation": 7}
    created = await kube.create(CM, body)
    assert created["metadata"]["uid"] != "forged"
    assert created["metadata"]["generation"] == 1
    status, payload = await kube.request("POST", CM, configmap("dup"))
    assert (status, payload["reason"]) == (409, "AlreadyExists")


async def test_every_write_bumps_resource_version_but_noop_does_not(
    kube: KubeClient, emulator: ApiServerEmulator
):
    path = api_path("v1", "configmaps", "default", "rv")
    created = await kube.create(CM, configmap("rv", a="1"))
    patched = await kube.merge(path, {"data": {"a": "2"}})
    assert int(patched["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    assert patched["metadata"]["resourceVersion"] == str(emulator.resource_version)
    same = await kube.merge(path, {"data": {"a": "2"}})
    assert same["metadata"]["resourceVersion"] == patched["metadata"]["resourceVersion"]


async def test_generation_follows_spec_not_metadata_or_status(kube: KubeClient):
    await kube.create(DS, daemonset("agents"))
    path = api_path("apps/v1", "daemonsets", "default", "agents")
    labelled = await kube.merge(path, {"metadata": {"labels": {"x": "y"}}})
    assert labelled["metadata"]["generation"] == 1
    with_status = await kube.merge(
        path + "/status",
        {
            "status": {
                "numberReady": 1,
                "currentNumberScheduled": 1,
                "desiredNumberScheduled": 1,
                "numberMisscheduled": 0,
            }
        },
    )
    assert with_status["metadata"]["generation"] == 1
    changed = await kube.merge(path, {"spec": {"minReadySeconds": 5}})
    assert changed["metadata"]["generation"] == 2
    # data-only kinds count too: anything outside metadata and status.
    await kube.create(CM, configmap("gen", a="1"))
    cm = await kube.merge(api_path("v1", "configmaps", "default", "gen"), {"data": {"a": "2"}})
    assert cm["metadata"]["generation"] == 2


# --- patching -------------------------------------------------------------------------------------


async def test_merge_patch_follows_rfc7386(kube: KubeClient):
    await kube.create(
        CM,
        {
            "metadata": {"name": "m", "labels": {"a": "1", "b": "2"}, "annotations": {"keep": "1"}},
            "data": {"x": "1"},
        },
    )
    result = await kube.merge(
        api_path("v1", "configmaps", "default", "m"),
        {
            "metadata": {"labels": {"b": None, "c": "3"}, "annotations": None},
            "data": {"x": None, "y": "2"},
        },
    )
    assert result["metadata"]["labels"] == {"a": "1", "c": "3"}
    assert "annotations" not in result["metadata"]
    assert result["data"] == {"y": "2"}


async def test_json_patch_honours_test_ops(kube: KubeClient, emulator: ApiServerEmulator):
    created = await kube.create(CM, configmap("jp", a="1"))
    path = api_path("v1", "configmaps", "default", "jp")
    rv = created["metadata"]["resourceVersion"]
    ok = await kube.json_patch(
        path,
        [
            {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
            {"op": "add", "path": "/metadata/finalizers", "value": ["x/y"]},
        ],
    )
    assert ok["metadata"]["finalizers"] == ["x/y"]
    # The same test again: the resourceVersion moved on, so the whole patch is refused.
    status, payload = await kube.request(
        "PATCH",
        path,
        [
            {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
            {"op": "remove", "path": "/metadata/finalizers"},
        ],
        content_type="application/json-patch+json",
    )
    assert status == 422  # kube-apiserver's code, the one Kopf catches to retry
    assert payload["kind"] == "Status" and payload["reason"] == "Invalid"
    assert (await kube.get(path))["metadata"]["finalizers"] == ["x/y"]
    assert emulator.conflicts and emulator.rejections == []
    status, _ = await kube.request(
        "PATCH", path, {"op": "add"}, content_type="application/json-patch+json"
    )
    assert status == 400  # a JSON patch must be a list


async def test_strategic_merge_patch_is_a_plain_merge(kube: KubeClient):
    await kube.create(DS, daemonset("smp"))
    path = api_path("apps/v1", "daemonsets", "default", "smp")
    patch = {"spec": {"template": {"spec": {"containers": [{"name": "other", "image": "x:1"}]}}}}
    status, result = await kube.request(
        "PATCH", path, patch, content_type="application/strategic-merge-patch+json"
    )
    assert status == 200
    # A real server would merge by name (two containers); the emulator replaces the list.
    assert [c["name"] for c in result["spec"]["template"]["spec"]["containers"]] == ["other"]


async def test_put_and_patch_honour_resource_version(kube: KubeClient):
    created = await kube.create(CM, configmap("put", a="1"))
    path = api_path("v1", "configmaps", "default", "put")
    stale = created["metadata"]["resourceVersion"]
    await kube.merge(path, {"data": {"a": "2"}})
    body = {**created, "data": {"a": "3"}}
    status, payload = await kube.request("PUT", path, body)
    assert (status, payload["reason"]) == (409, "Conflict")
    status, _ = await kube.request(
        "PATCH",
        path,
        {"metadata": {"resourceVersion": stale}, "data": {"a": "4"}},
        content_type="application/merge-patch+json",
    )
    assert status == 409
    fresh = await kube.get(path)
    replaced = await kube.replace(path, {**fresh, "data": {"b": "5"}})
    assert replaced["data"] == {"b": "5"}  # PUT replaces, it does not merge
    del replaced["metadata"]["resourceVersion"]
    assert (await kube.replace(path, {**replaced, "data": {"c": "6"}}))["data"] == {"c": "6"}
    status, _ = await kube.request("PUT", path, {**replaced, "metadata": {"name": "other"}})
    assert status == 400


# --- status subresource ---------------------------------------------------------------------------


async def test_status_subresource_is_separate(kube: KubeClient):
    await kube.create_namespace("apps")
    pod = await kube.create_pod("apps", "web", phase="Pending")
    path = api_path("v1", "pods", "apps", "web")
    created = await kube.get(path)
    assert created["status"] == {"phase": "Pending"}  # status in the POST body was dropped
    main = await kube.merge(
        path, {"metadata": {"labels": {"a": "b"}}, "status": {"phase": "Failed"}}
    )
    assert main["status"]["phase"] == "Pending"
    assert main["metadata"]["labels"] == {"a": "b"}
    status = await kube.merge(
        path + "/status",
        {
            "metadata": {"labels": {"a": "c"}},
            "spec": {"nodeName": "elsewhere"},
            "status": {"phase": "Running"},
        },
    )
    assert status["status"]["phase"] == "Running"
    assert status["metadata"]["labels"] == {"a": "b"}
    assert status["spec"]["nodeName"] == pod["spec"]["nodeName"]


async def test_status_is_ordinary_without_a_subresource(kube: KubeClient):
    path = api_path("kopf.dev/v1", "clusterkopfpeerings")
    await kube.create(
        path,
        {
            "apiVersion": "kopf.dev/v1",
            "kind": "ClusterKopfPeering",
            "metadata": {"name": "default"},
            "status": {"a": {"b": 1}},
        },
    )
    patched = await kube.merge(path + "/default", {"status": {"c": {"d": 2}}})
    assert patched["status"] == {"a": {"b": 1}, "c": {"d": 2}}
    status, _ = await kube.request(
        "PATCH",
        path + "/default/status",
        {"status": {}},
        content_type="application/merge-patch+json",
    )
    assert status == 404


# --- selectors, lists, watches --------------------------------------------------------------------

LABELLED = {
    "p1": {"app": "web", "tier": "front"},
    "p2": {"app": "web", "tier": "back"},
    "p3": {"app": "db"},
    "p4": {},
}
LABEL_CASES = [
    ("app=web", {"p1", "p2"}, "equality"),
    ("app==web", {"p1", "p2"}, "double-equals equality"),
    ("app!=web", {"p3", "p4"}, "inequality includes pods without the label"),
    ("app in (db, web)", {"p1", "p2", "p3"}, "set membership"),
    ("tier notin (front)", {"p2", "p3", "p4"}, "notin includes pods without the label"),
    ("tier", {"p1", "p2"}, "existence"),
    ("!tier", {"p3", "p4"}, "non-existence"),
    ("app=web,tier=back", {"p2"}, "comma is AND"),
    ("app in (web),!tier", set(), "comma after a set"),
    ("", {"p1", "p2", "p3", "p4"}, "empty selects everything"),
]


@pytest.mark.parametrize(
    ("selector", "expected", "reason"), LABEL_CASES, ids=[case[2] for case in LABEL_CASES]
)
async def test_label_selectors(kube: KubeClient, selector: str, expected: set[str], reason: str):
    for name, labels in LABELLED.items():
        await kube.create(CM, {"metadata": {"name": name, "labels": labels}})
    result = await kube.get(CM, labelSelector=selector)
    assert {item["metadata"]["name"] for item in result["items"]} == expected, reason


async def test_bad_label_selector_is_a_400(kube: KubeClient):
    status, _ = await kube.request("GET", CM, params={"labelSelector": "a in b"})
    assert status == 400


async def test_field_selectors(kube: KubeClient):
    await kube.create_namespace("apps")
    await kube.create_pod("apps", "a", node="node-1", phase="Running")
    await kube.create_pod("apps", "b", node="node-2", phase="Running")
    await kube.create_pod("apps", "c", node="node-1", phase="Succeeded")
    all_pods = api_path("v1", "pods")

    async def names(selector: str) -> set[str]:
        return {
            p["metadata"]["name"]
            for p in (await kube.get(all_pods, fieldSelector=selector))["items"]
        }

    assert await names("spec.nodeName=node-1") == {"a", "c"}
    assert await names("spec.nodeName==node-1,status.phase!=Succeeded") == {"a"}
    assert await names("metadata.name=b") == {"b"}
    assert await names("metadata.namespace=default") == set()
    status, payload = await kube.request("GET", all_pods, params={"fieldSelector": "spec.bogus=x"})
    assert status == 400 and "not supported" in payload["message"]


async def test_lists_are_typed(kube: KubeClient, emulator: ApiServerEmulator):
    await kube.create(DS, daemonset("listed"))
    result = await kube.get(api_path("apps/v1", "daemonsets"))
    assert result["kind"] == "DaemonSetList" and result["apiVersion"] == "apps/v1"
    assert result["metadata"]["resourceVersion"] == str(emulator.resource_version)
    assert [item["metadata"]["name"] for item in result["items"]] == ["listed"]


async def test_watch_follows_selector_membership(kube: KubeClient):
    await kube.create(CM, {"metadata": {"name": "w", "labels": {"app": "other"}}})
    path = api_path("v1", "configmaps", "default", "w")
    async with watching(kube, CM, labelSelector="app=web") as stream:
        await kube.merge(path, {"metadata": {"labels": {"app": "web"}}})
        added = await stream.next()  # not the object as it was, outside the selector
        assert added["type"] == "ADDED" and added["object"]["metadata"]["labels"] == {"app": "web"}
        await kube.merge(path, {"data": {"k": "v"}})
        assert (await stream.next())["type"] == "MODIFIED"
        await kube.merge(path, {"metadata": {"labels": {"app": "gone"}}})
        left = await stream.next()
        assert left["type"] == "DELETED" and left["object"]["metadata"]["labels"] == {"app": "gone"}
        await kube.merge(path, {"data": {"k": "v2"}})
        await kube.create(CM, {"metadata": {"name": "w2", "labels": {"app": "web"}}})
        event = await stream.next()  # the non-matching change above was not sent
        assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "w2")


async def test_watch_resumes_from_a_resource_version(kube: KubeClient):
    await kube.create(CM, configmap("old"))
    listed = await kube.get(CM)
    await kube.create(CM, configmap("new"))
    async with watching(kube, CM, resourceVersion=listed["metadata"]["resourceVersion"]) as stream:
        event = await stream.next()
        assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "new")
        await kube.create(CM, configmap("later"))
        event = await stream.next()  # nothing from before the version came in between
        assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "later")
    async with watching(kube, CM) as stream:  # no version: the current state first
        names = {(await stream.next())["object"]["metadata"]["name"] for _ in range(3)}
        assert names == {"old", "new", "later"}


async def test_watch_honours_timeout_seconds(kube: KubeClient, emulator: ApiServerEmulator):
    await kube.create(CM, configmap("present"))
    async with watching(kube, CM, timeoutSeconds="1") as stream:
        event = await stream.next()  # a working watch: the current state first
        assert (event["type"], event["object"]["metadata"]["name"]) == ("ADDED", "present")
        assert await stream.end() == b""  # then the server ends the stream, cleanly
    assert emulator.watches_timed_out == [1.0]  # because its timeoutSeconds were up


async def test_cluster_scoped_resources(kube: KubeClient, emulator: ApiServerEmulator):
    namespaces = await kube.get(api_path("v1", "namespaces"))
    assert namespaces["kind"] == "NamespaceList"
    assert {"default", "kube-system"} <= {n["metadata"]["name"] for n in namespaces["items"]}
    await kube.create_namespace("mesh", labels={"istio-injection": "enabled"})
    got = await kube.get(api_path("v1", "namespaces", name="mesh"))
    assert got["status"]["phase"] == "Active" and "namespace" not in got["metadata"]
    selected = await kube.get(api_path("v1", "namespaces"), labelSelector="istio-injection")
    assert [n["metadata"]["name"] for n in selected["items"]] == ["mesh"]
    node = await kube.create_node("node-1")
    assert node["status"]["conditions"][0]["type"] == "Ready"
    ma = await kube.create(
        MA,
        {
            "apiVersion": "meshaccel.io/v1alpha1",
            "kind": "MeshAcceleration",
            "metadata": {"name": "default"},
            "spec": {"namespaceSelector": {}},
        },
    )
    assert "namespace" not in ma["metadata"]
    status, _ = await kube.request(
        "GET", api_path("meshaccel.io/v1alpha1", "meshaccelerations", "default")
    )
    assert status == 404  # a cluster-scoped resource has no namespaced URL
    status, payload = await kube.request(
        "POST", api_path("v1", "configmaps", "missing"), configmap("x")
    )
    assert status == 404 and "missing" in payload["message"]


# --- discovery ------------------------------------------------------------------------------------

DISCOVERABLE = [
    ("v1", "pods", True, True),
    ("v1", "namespaces", False, True),
    ("v1", "nodes", False, True),
    ("v1", "secrets", True, False),
    ("v1", "configmaps", True, False),
    ("v1", "serviceaccounts", True, False),
    ("v1", "events", True, False),
    ("apps/v1", "daemonsets", True, True),
    ("events.k8s.io/v1", "events", True, False),
    ("meshaccel.io/v1alpha1", "meshaccelerations", False, True),
    ("kopf.dev/v1", "clusterkopfpeerings", False, False),
]


async def test_discovery_serves_the_operators_resources(kube: KubeClient):
    groups = await kube.get("/apis")
    served = {v["groupVersion"] for g in groups["groups"] for v in g["versions"]}
    assert served >= {"apps/v1", "events.k8s.io/v1", "meshaccel.io/v1alpha1", "kopf.dev/v1"}
    assert (await kube.get("/api"))["versions"] == ["v1"]
    for group_version, plural, namespaced, has_status in DISCOVERABLE:
        listing = await kube.get("/api/v1" if group_version == "v1" else f"/apis/{group_version}")
        assert listing["groupVersion"] == group_version
        by_name = {r["name"]: r for r in listing["resources"]}
        assert by_name[plural]["namespaced"] is namespaced, plural
        assert {"list", "watch", "patch", "create"} <= set(by_name[plural]["verbs"])
        assert (f"{plural}/status" in by_name) is has_status, plural


# --- validation and defaulting --------------------------------------------------------------------


async def test_builtin_unknown_field_is_refused(kube: KubeClient, emulator: ApiServerEmulator):
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "bad"},
        "spec": {"containers": [{"name": "c", "image": "i", "imagePolicy": "x"}]},
    }
    status, payload = await kube.request("POST", PODS, body)
    assert status == 422
    assert payload["kind"] == "Status" and payload["reason"] == "Invalid"
    assert "spec.containers[0].imagePolicy" in payload["message"]
    assert payload["details"]["causes"][0]["field"] == "spec.containers[0].imagePolicy"
    assert emulator.find("v1/pods", "default", "bad") is None
    assert [(r.verb, r.resource, r.field) for r in emulator.rejections] == [
        ("create", "pods", "spec.containers[0].imagePolicy")
    ]


async def test_builtin_invalid_patch_leaves_object_unchanged(
    kube: KubeClient, emulator: ApiServerEmulator
):
    before = await kube.create(DS, daemonset("v"))
    path = api_path("apps/v1", "daemonsets", "default", "v")
    status, payload = await kube.request(
        "PATCH",
        path,
        {"spec": {"minReadySeconds": "soon"}},
        content_type="application/merge-patch+json",
    )
    assert status == 422 and "spec.minReadySeconds" in payload["message"]
    assert await kube.get(path) == before
    status, _ = await kube.request(
        "PATCH",
        path,
        {"metadata": {"labels": {"bad key!": "x"}}},
        content_type="application/merge-patch+json",
    )
    assert status == 422
    status, _ = await kube.request(
        "PATCH",
        path,
        {"metadata": {"labels": {"k": "x" * 64}}},
        content_type="application/merge-patch+json",
    )
    assert status == 422
    assert len(emulator.rejections) == 3
    assert await kube.get(path) == before


async def test_crd_defaulting_and_validation(kube: KubeClient, emulator: ApiServerEmulator):
    emulator.add_crd(WIDGET_CRD)

    def widget(name: str, **spec: Any) -> JsonObj:
        return {
            "apiVersion": "example.com/v1",
            "kind": "Widget",
            "metadata": {"name": name},
            "spec": spec,
        }

    created = await kube.create(
        WIDGETS,
        widget(
            "w",
            size=1,
            parts=[{"name": "a"}, {"name": "b", "count": 5}],
            limits={"cpu": "50m", "pods": 3},
            note=None,
            extra={"anything": {"goes": [1]}},
        ),
    )
    assert created["spec"]["color"] == "red"  # defaulted
    assert created["spec"]["limits"] == {"cpu": "50m", "pods": 3}  # int-or-string
    assert [p["count"] for p in created["spec"]["parts"]] == [1, 5]  # defaults inside items
    assert created["spec"]["note"] is None  # nullable keeps its null
    refused = [
        (widget("u", size=1, colour="red"), "spec.colour", "unknown field refused"),
        (widget("e", size=1, color="green"), "spec.color", "enum"),
        (widget("m", size=0), "spec.size", "exclusive minimum"),
        (widget("r"), "spec", "required field"),
        (widget("i", size=1, limits={"cpu": 1.5}), "spec.limits.cpu", "int-or-string"),
        (
            widget("n", size=1, parts=[{"name": "a", "extra": 1}]),
            "spec.parts[0].extra",
            "unknown field inside array items",
        ),
        (
            {**widget("meta", size=1), "metadata": {"name": "meta", "bogus": 1}},
            "metadata.bogus",
            "metadata is ObjectMeta",
        ),
    ]
    for body, field, reason in refused:
        status, payload = await kube.request("POST", WIDGETS, body)
        assert status == 422, reason
        assert field in payload["message"], (reason, payload["message"])
    assert [r.field for r in emulator.rejections] == [field for _, field, _ in refused]
    # Patches are validated too, on the result; the stored object stays as it was.
    path = WIDGETS + "/w"
    status, _ = await kube.request(
        "PATCH", path, {"spec": {"size": -1}}, content_type="application/merge-patch+json"
    )
    assert status == 422
    assert await kube.get(path) == created


async def test_meshacceleration_crd_from_the_repository(
    kube: KubeClient, emulator: ApiServerEmulator
):
    assert (CRDS / "meshaccel.io_meshaccelerations.yaml").is_file()
    assert emulator.spec_for("meshaccel.io/v1alpha1/meshaccelerations").crd is not None
    created = await kube.create(
        MA, {"metadata": {"name": "default"}, "spec": {"namespaceSelector": {}}}
    )
    assert created["spec"]["mode"] == "istio"
    assert created["spec"]["agent"]["port"] == 9474  # a default from the models
    status, payload = await kube.request(
        "POST", MA, {"metadata": {"name": "x"}, "spec": {"namespaceSelector": {}, "mode": "cilium"}}
    )
    assert status == 422 and "spec.mode" in payload["message"]
    status_path = MA + "/default/status"
    ok = await kube.merge(status_path, {"status": {"nodesDesired": 2}})
    assert ok["status"]["nodesDesired"] == 2
    status, _ = await kube.request(
        "PATCH",
        status_path,
        {"status": {"nodesDesired": "two"}},
        content_type="application/merge-patch+json",
    )
    assert status == 422


async def test_bulk_writes_are_validated_with_schemas_compiled_once(
    kube: KubeClient, emulator: ApiServerEmulator
):
    """What keeps validated writes cheap: the schemas are compiled once per kind, not per
    write. (How fast they are is a figure of the operator benchmark's populate phase.)"""
    await kube.create_namespace("bulk")
    await kube.create_pod("bulk", "first", pod_ip="198.18.2.200")  # compiles, unless done before
    compiled = validators_built()
    for i in range(100):
        await kube.create_pod("bulk", f"pod-{i}", pod_ip=f"198.18.2.{i}")
    invalid = {"metadata": {"name": "bad"}, "spec": {"containers": [{"name": "c", "image": 5}]}}
    status, payload = await kube.request("POST", api_path("v1", "pods", "bulk"), invalid)

    assert len(emulator.live("v1/pods", "bulk")) == 101
    assert status == 422 and "image" in payload["message"], payload  # the writes were checked
    assert validators_built() == compiled


# --- garbage collection ---------------------------------------------------------------------------


def owner_ref(owner: JsonObj) -> JsonObj:
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
    }


async def test_owner_references_are_garbage_collected(
    kube: KubeClient, emulator: ApiServerEmulator
):
    root = await kube.create(MA, {"metadata": {"name": "root"}, "spec": {"namespaceSelector": {}}})
    other = await kube.create(CM, configmap("other-owner"))
    ds_body = daemonset("child")
    ds_body["metadata"]["ownerReferences"] = [owner_ref(root)]
    child = await kube.create(DS, ds_body)
    await kube.create(
        CM, {"metadata": {"name": "grandchild", "ownerReferences": [owner_ref(child)]}}
    )
    await kube.create(
        CM,
        {"metadata": {"name": "shared", "ownerReferences": [owner_ref(child), owner_ref(other)]}},
    )
    async with watching(kube, CM, resourceVersion=str(emulator.resource_version)) as stream:
        await kube.delete(MA + "/root")
        event = await stream.next()
        assert (event["type"], event["object"]["metadata"]["name"]) == ("DELETED", "grandchild")
    assert emulator.find("apps/v1/daemonsets", "default", "child") is None
    assert emulator.find("v1/configmaps", "default", "grandchild") is None
    assert emulator.find("v1/configmaps", "default", "shared") is not None  # one owner remains


async def test_dependent_of_a_missing_owner_is_collected(
    kube: KubeClient, emulator: ApiServerEmulator
):
    ghost = {"apiVersion": "v1", "kind": "ConfigMap", "name": "ghost", "uid": str(uuid.uuid4())}
    created = await kube.create(CM, {"metadata": {"name": "stray", "ownerReferences": [ghost]}})
    assert created["metadata"]["name"] == "stray"  # the create succeeds, as on a real server
    assert emulator.find("v1/configmaps", "default", "stray") is None  # then the GC removes it


async def test_orphan_propagation_keeps_dependents(kube: KubeClient, emulator: ApiServerEmulator):
    owner = await kube.create(CM, configmap("owner"))
    await kube.create(CM, {"metadata": {"name": "dep", "ownerReferences": [owner_ref(owner)]}})
    await kube.delete(
        api_path("v1", "configmaps", "default", "owner"), {"propagationPolicy": "Orphan"}
    )
    dep = emulator.find("v1/configmaps", "default", "dep")
    assert dep is not None and "ownerReferences" not in dep["metadata"]


async def test_namespace_deletion_removes_its_content(
    kube: KubeClient, emulator: ApiServerEmulator
):
    await kube.create_namespace("doomed")
    await kube.create_pod("doomed", "p")
    await kube.create(
        api_path("v1", "configmaps", "doomed"),
        {"metadata": {"name": "held", "finalizers": ["test/hold"]}},
    )
    await kube.delete(api_path("v1", "namespaces", name="doomed"))
    assert emulator.live("v1/pods", "doomed") == []
    ns = emulator.find("v1/namespaces", None, "doomed")
    assert ns is not None and ns["status"]["phase"] == "Terminating"
    status, _ = await kube.request("POST", api_path("v1", "configmaps", "doomed"), configmap("n"))
    assert status == 403
    await kube.merge(
        api_path("v1", "configmaps", "doomed", "held"), {"metadata": {"finalizers": None}}
    )
    assert emulator.find("v1/namespaces", None, "doomed") is None


# --- events ---------------------------------------------------------------------------------------


async def test_events_are_stored(kube: KubeClient, emulator: ApiServerEmulator):
    # Kopf's body: no apiVersion/kind, a generateName, offset timestamps.
    now = "2025-01-01T00:00:00.123456+00:00"
    await kube.create(
        api_path("v1", "events", "default"),
        {
            "metadata": {"namespace": "default", "generateName": "kopf-event-"},
            "action": "Action?",
            "type": "Normal",
            "reason": "Logging",
            "message": "hello",
            "reportingComponent": "kopf",
            "reportingInstance": "dev",
            "source": {"component": "kopf"},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "name": "cm",
                "namespace": "default",
                "uid": "u",
            },
            "firstTimestamp": now,
            "lastTimestamp": now,
            "eventTime": now,
        },
    )
    await kube.create(
        api_path("events.k8s.io/v1", "events", "default"),
        {
            "metadata": {"name": "ev2"},
            "eventTime": now,
            "reportingController": "meshaccel.io/op",
            "reportingInstance": "op-1",
            "action": "Reconcile",
            "reason": "Synced",
            "type": "Normal",
            "regarding": {"kind": "Node", "name": "node-1"},
            "note": "synced",
        },
    )
    [event] = emulator.events_for("cm", "default")
    assert (event["reason"], event["message"], event["kind"]) == ("Logging", "hello", "Event")
    assert [e["metadata"]["name"] for e in emulator.live("events.k8s.io/v1/events")] == ["ev2"]
    selected = await kube.get(api_path("v1", "events"), fieldSelector="involvedObject.name=cm")
    assert len(selected["items"]) == 1


# --- finalizers -----------------------------------------------------------------------------------


async def test_finalizers_block_deletion_until_removed(
    kube: KubeClient, emulator: ApiServerEmulator
):
    await kube.create(
        CM, {"metadata": {"name": "f", "finalizers": ["example.com/hold"]}, "data": {}}
    )
    path = api_path("v1", "configmaps", "default", "f")
    async with watching(kube, CM, resourceVersion=str(emulator.resource_version)) as stream:
        deleting = await kube.delete(path)
        assert deleting["metadata"]["deletionTimestamp"]
        assert deleting["metadata"]["generation"] == 2
        event = await stream.next()
        assert event["type"] == "MODIFIED" and event["object"]["metadata"]["deletionTimestamp"]
        assert (await kube.get(path))["metadata"]["deletionTimestamp"]
        status, _ = await kube.request(
            "PATCH",
            path,
            {"metadata": {"finalizers": ["a", "b"]}},
            content_type="application/merge-patch+json",
        )
        assert status == 422  # no new finalizers once the deletion started
        rv = (await kube.get(path))["metadata"]["resourceVersion"]
        await kube.json_patch(
            path,
            [
                {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
                {"op": "remove", "path": "/metadata/finalizers/0"},
            ],
        )
        assert (await stream.next())["type"] == "MODIFIED"
        assert (await stream.next())["type"] == "DELETED"
    status, _ = await kube.request("GET", path)
    assert status == 404


# --- real clients ---------------------------------------------------------------------------------


async def test_kubernetes_aio_client_against_the_emulator(
    kubeconfig: Any, emulator: ApiServerEmulator
):
    from kubernetes.aio import client, config
    from kubernetes.aio.client.exceptions import ApiException

    await config.load_kube_config()  # type: ignore[no-untyped-call]
    async with client.ApiClient() as api_client:
        apps: Any = client.AppsV1Api(api_client)  # dict bodies: the client accepts them
        created = await apps.create_namespaced_daemon_set("default", daemonset("aio"))
        assert created.metadata.uid and created.metadata.generation == 1
        read = await apps.read_namespaced_daemon_set("aio", "default")
        assert read.spec.template.spec.containers[0].name == "agent"
        patched = await apps.patch_namespaced_daemon_set(
            "aio",
            "default",
            {"spec": {"template": {"metadata": {"labels": {"app": "aio", "v": "2"}}}}},
            _content_type="application/merge-patch+json",
        )
        assert patched.metadata.generation == 2
        # Without _content_type, a dict body goes as a strategic merge patch (plain merge here).
        await apps.patch_namespaced_daemon_set(
            "aio", "default", {"metadata": {"labels": {"x": "1"}}}
        )
        last = list(emulator)[-1]  # kmock keeps every request it served
        assert last.headers["Content-Type"] == "application/strategic-merge-patch+json"
        with pytest.raises(ApiException) as caught:
            await apps.read_namespaced_daemon_set("missing", "default")
        assert caught.value.status == 404
    assert emulator.rejections == []


async def test_kopf_operator_against_the_emulator(
    kubeconfig: Any, kube: KubeClient, emulator: ApiServerEmulator
):
    emulator.add_crd(WIDGET_CRD)
    await kube.create(
        api_path("kopf.dev/v1", "clusterkopfpeerings"),
        {
            "apiVersion": "kopf.dev/v1",
            "kind": "ClusterKopfPeering",
            "metadata": {"name": "default"},
        },
    )
    registry = kopf.OperatorRegistry()
    deleted: list[str] = []

    # A fresh registry has no login handlers; this one reads the kubeconfig fixture's file.
    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> Any:
        return kopf.login_via_client(**kwargs)

    @kopf.on.create("example.com", "v1", "widgets", id="created", registry=registry)
    def created(name: str, spec: Any, logger: Any, **_: Any) -> JsonObj:
        logger.info("widget %s has size %s", name, spec["size"])
        ref: Any = {
            "metadata": {"name": name, "namespace": "default"},
            "apiVersion": "example.com/v1",
            "kind": "Widget",
        }
        kopf.info(ref, reason="Seen", message="widget seen")
        return {"seenSize": spec["size"]}  # stored by Kopf in status.created

    @kopf.on.delete("example.com", "v1", "widgets", id="removed", registry=registry)
    def removed(name: str, **_: Any) -> None:
        deleted.append(name)

    settings = kopf.OperatorSettings()
    settings.watching.server_timeout = 5
    settings.posting.level = 20  # INFO: kopf.info() events are posted

    async with kopf_running(
        "--peering=default",
        "--verbose",
        "-A",
        registry=registry,
        settings=settings,
        standalone=False,
    ) as runner:
        await kube.create(
            WIDGETS,
            {
                "apiVersion": "example.com/v1",
                "kind": "Widget",
                "metadata": {"name": "w1"},
                "spec": {"size": 3},
            },
        )
        path = WIDGETS + "/w1"

        async def handled() -> bool:
            obj = await kube.get(path)
            return bool(obj.get("status", {}).get("created") == {"seenSize": 3})

        await wait_for(handled, timeout=10)
        obj = await kube.get(path)
        assert obj["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]
        await wait_for(lambda: emulator.events_for("w1", "default"), timeout=5)
        await kube.delete(path)  # Kopf's finalizer: deletionTimestamp first, then the handler
        await wait_for(
            lambda: emulator.find("example.com/v1/widgets", "default", "w1") is None, timeout=10
        )
        peering = await kube.get(api_path("kopf.dev/v1", "clusterkopfpeerings") + "/default")
        assert peering.get("status"), "Kopf registered itself in the peering object"

    assert runner.exit_code == 0 and runner.exception is None
    assert deleted == ["w1"]
    assert {e["reason"] for e in emulator.events_for("w1", "default")} >= {"Seen"}
    assert emulator.rejections == []
    for marker in ("ERROR", "Traceback", "APIClientError", "Unprocessable"):
        assert marker not in runner.output, runner.output[-3000:]
    assert "Handler 'created' succeeded" in runner.output
