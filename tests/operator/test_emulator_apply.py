"""The emulator's field ownership: managedFields on every write, and server-side apply
(``fieldmanager.py``), as kube-apiserver answers them; each test fails on plain kmock."""

from __future__ import annotations

from typing import Any

import pytest

from tests.operator.conftest import KubeClient, api_path
from tests.operator.emulator import APPLY_PATCH, ApiServerEmulator, JsonObj

CM = api_path("v1", "configmaps", "default")
DS = api_path("apps/v1", "daemonsets", "default")


def owners(obj: JsonObj) -> dict[tuple[str, str], JsonObj]:
    """(manager, operation) -> fieldsV1."""
    return {
        (entry["manager"], entry["operation"]): entry["fieldsV1"]
        for entry in obj["metadata"].get("managedFields", [])
    }


def configmap(name: str, labels: dict[str, str] | None = None, **data: str) -> JsonObj:
    meta: JsonObj = {"name": name}
    if labels is not None:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


async def apply(
    kube: KubeClient, path: str, body: JsonObj, manager: str = "op", *, force: bool = False
) -> tuple[int, Any]:
    params = {"fieldManager": manager, **({"force": "true"} if force else {})}
    return await kube.request("PATCH", path, body, content_type=APPLY_PATCH, params=params)


async def merge(kube: KubeClient, path: str, patch: JsonObj, manager: str) -> JsonObj:
    status, result = await kube.request(
        "PATCH",
        path,
        patch,
        content_type="application/merge-patch+json",
        params={"fieldManager": manager},
    )
    assert status == 200, result
    assert isinstance(result, dict)
    return result


def daemonset(containers: list[JsonObj], **pod: Any) -> JsonObj:
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "agents"},
        "spec": {
            "selector": {"matchLabels": {"app": "agents"}},
            "template": {
                "metadata": {"labels": {"app": "agents"}},
                "spec": {"containers": containers, **pod},
            },
        },
    }


# --- Update: every write records its manager --------------------------------------------------


async def test_writes_record_who_set_what(kube: KubeClient):
    status, created = await kube.request(
        "POST", CM, configmap("w", {"app": "x"}, a="1"), params={"fieldManager": "creator"}
    )
    assert status == 201
    assert owners(created) == {
        ("creator", "Update"): {"f:data": {"f:a": {}}, "f:metadata": {"f:labels": {"f:app": {}}}}
    }
    path = CM + "/w"
    edited = await merge(kube, path, {"data": {"a": "2", "b": "3"}}, "kubectl-edit")
    assert owners(edited) == {
        ("creator", "Update"): {"f:metadata": {"f:labels": {"f:app": {}}}},  # "a" changed hands
        ("kubectl-edit", "Update"): {"f:data": {"f:a": {}, "f:b": {}}},
    }
    # No fieldManager: the User-Agent's product (aiohttp's "Python/3.x aiohttp/..." here).
    await kube.merge(path, {"metadata": {"labels": {"app": None}}})
    same = await kube.merge(path, {"data": {"b": "3"}})  # a no-op: nobody gains anything
    assert owners(same) == {("kubectl-edit", "Update"): {"f:data": {"f:a": {}, "f:b": {}}}}
    assert (
        same["metadata"]["resourceVersion"] == (await kube.get(path))["metadata"]["resourceVersion"]
    )


async def test_status_is_owned_through_the_subresource(kube: KubeClient):
    status, _ = await apply(kube, DS + "/agents", daemonset([{"name": "a", "image": "i"}]))
    assert status == 201
    path = DS + "/agents/status"
    reported = await kube.request(
        "PATCH",
        path,
        {
            "status": {
                "numberReady": 1,
                "currentNumberScheduled": 1,
                "desiredNumberScheduled": 1,
                "numberMisscheduled": 0,
            }
        },
        content_type="application/merge-patch+json",
        params={"fieldManager": "kube-controller-manager"},
    )
    assert reported[0] == 200
    entries = {e["manager"]: e for e in reported[1]["metadata"]["managedFields"]}
    assert entries["kube-controller-manager"]["subresource"] == "status"
    assert set(entries["kube-controller-manager"]["fieldsV1"]) == {"f:status"}
    assert "f:status" not in entries["op"]["fieldsV1"]


# --- Apply --------------------------------------------------------------------------------------


async def test_apply_creates_and_owns_exactly_what_it_applied(
    kube: KubeClient, emulator: ApiServerEmulator
):
    body = daemonset(
        [
            {
                "name": "agent",
                "image": "x:1",
                "command": ["run"],
                "env": [{"name": "A", "value": "1"}],
                "ports": [{"containerPort": 9474, "protocol": "TCP"}],
            }
        ],
        nodeSelector={"kubernetes.io/os": "linux"},
    )
    status, created = await apply(kube, DS + "/agents", body)
    assert status == 201
    assert created["metadata"]["generation"] == 1 and emulator.rejections == []
    [entry] = created["metadata"]["managedFields"]
    assert (entry["manager"], entry["operation"], entry["apiVersion"]) == ("op", "Apply", "apps/v1")
    pod = entry["fieldsV1"]["f:spec"]["f:template"]["f:spec"]
    # Keyed lists own their items (".") by key; atomic lists and maps are owned whole.
    assert pod == {
        "f:containers": {
            'k:{"name":"agent"}': {
                ".": {},
                "f:command": {},
                "f:env": {'k:{"name":"A"}': {".": {}, "f:name": {}, "f:value": {}}},
                "f:image": {},
                "f:name": {},
                "f:ports": {
                    'k:{"containerPort":9474,"protocol":"TCP"}': {
                        ".": {},
                        "f:containerPort": {},
                        "f:protocol": {},
                    }
                },
            }
        },
        "f:nodeSelector": {},
    }
    again_status, again = await apply(kube, DS + "/agents", body)
    assert again_status == 200
    assert again == created  # nothing changed: no write, same resourceVersion


@pytest.mark.parametrize(
    ("params", "body", "code", "reason"),
    [
        ({}, configmap("r"), 422, "an apply names its field manager"),
        ({"fieldManager": "op"}, {"kind": "ConfigMap", "metadata": {}}, 400, "apiVersion needed"),
        ({"fieldManager": "op"}, configmap("other"), 400, "the name is the URL's"),
        (
            {"fieldManager": "op"},
            {**configmap("r"), "metadata": {"name": "r", "managedFields": [{}]}},
            400,
            "managedFields cannot be applied",
        ),
    ],
)
async def test_apply_refuses_bad_requests(
    kube: KubeClient, params: dict[str, str], body: JsonObj, code: int, reason: str
):
    status, payload = await kube.request(
        "PATCH", CM + "/r", body, content_type=APPLY_PATCH, params=params
    )
    assert status == code, (reason, payload)


async def test_force_is_for_apply_only(kube: KubeClient):
    await kube.create(CM, configmap("f", a="1"))
    status, _ = await kube.request(
        "PATCH",
        CM + "/f",
        {"data": {"a": "2"}},
        content_type="application/merge-patch+json",
        params={"force": "true"},
    )
    assert status == 422


async def test_yaml_apply_body(kube: KubeClient):
    text = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: y\ndata:\n  a: '1'\n"
    async with kube.session.patch(
        kube.base_url + CM + "/y",
        data=text,
        params={"fieldManager": "kubectl"},
        headers={"Content-Type": APPLY_PATCH},
    ) as response:
        assert response.status == 201
        assert (await response.json())["data"] == {"a": "1"}


async def test_apply_removes_what_it_stopped_applying_unless_someone_else_owns_it(
    kube: KubeClient,
):
    path = CM + "/p"
    await apply(kube, path, configmap("p", {"keep": "1", "drop": "1"}, a="1", b="2", shared="s"))
    await merge(kube, path, {"data": {"theirs": "t"}}, "kubectl-edit")
    await apply(kube, path, configmap("p", shared="s"), "other")  # the same value: co-owned
    status, result = await apply(kube, path, configmap("p", {"keep": "1"}, a="1"))
    assert status == 200
    assert result["metadata"]["labels"] == {"keep": "1"}
    # b: only "op" owned it; theirs: never op's; shared: "other" applied it as well.
    assert result["data"] == {"a": "1", "shared": "s", "theirs": "t"}
    assert owners(result)[("op", "Apply")] == {
        "f:data": {"f:a": {}},
        "f:metadata": {"f:labels": {"f:keep": {}}},
    }
    # Emptied maps go as the Go types' omitempty has them go.
    status, result = await apply(kube, path, configmap("p", a="1"))
    assert "labels" not in result["metadata"]


async def test_another_managers_field_is_a_conflict_unless_forced(
    kube: KubeClient, emulator: ApiServerEmulator
):
    path = CM + "/c"
    await apply(kube, path, configmap("c", a="1", b="1"))
    edited = await merge(kube, path, {"data": {"a": "9", "b": "9"}}, "kubectl-edit")
    status, payload = await apply(kube, path, configmap("c", a="1", b="1"))
    assert (status, payload["reason"]) == (409, "Conflict")
    assert payload["message"].startswith("Apply failed with 2 conflicts: ")
    assert [cause["field"] for cause in payload["details"]["causes"]] == [".data.a", ".data.b"]
    assert {cause["message"] for cause in payload["details"]["causes"]} == {
        'conflict with "kubectl-edit" using v1'
    }
    assert await kube.get(path) == edited  # refused whole
    assert emulator.conflicts and emulator.rejections == []
    # Applying the other manager's values is no conflict: the fields become shared.
    status, shared = await apply(kube, path, configmap("c", a="9", b="9"))
    assert status == 200 and ("kubectl-edit", "Update") in owners(shared)
    status, forced = await apply(kube, path, configmap("c", a="1", b="1"), force=True)
    assert status == 200 and forced["data"] == {"a": "1", "b": "1"}
    assert owners(forced) == {("op", "Apply"): {"f:data": {"f:a": {}, "f:b": {}}}}


async def test_keyed_lists_merge_by_key_and_atomic_lists_are_replaced(kube: KubeClient):
    path = DS + "/agents"
    mine = {"name": "agent", "image": "x:1", "command": ["a"], "env": [{"name": "A", "value": "1"}]}
    await apply(kube, path, daemonset([mine]))
    live = await kube.get(path)
    containers = live["spec"]["template"]["spec"]["containers"]
    containers[0]["env"].append({"name": "DEBUG", "value": "1"})  # someone's extra variable
    containers.append({"name": "sidecar", "image": "y:1"})  # and container
    await merge(kube, path, {"spec": {"template": {"spec": {"containers": containers}}}}, "edit")
    mine = {**mine, "command": ["b"], "env": [{"name": "A", "value": "2"}]}
    status, result = await apply(kube, path, daemonset([mine]))
    assert status == 200
    agent, sidecar = result["spec"]["template"]["spec"]["containers"]
    assert agent["command"] == ["b"]
    assert agent["env"] == [{"name": "A", "value": "2"}, {"name": "DEBUG", "value": "1"}]
    assert sidecar == {"name": "sidecar", "image": "y:1"}
    # The item the other manager added stays its own after the apply took "A" back.
    edit = owners(result)[("edit", "Update")]["f:spec"]["f:template"]["f:spec"]["f:containers"]
    assert set(edit) == {'k:{"name":"agent"}', 'k:{"name":"sidecar"}'}
    assert set(edit['k:{"name":"agent"}']["f:env"]) == {'k:{"name":"DEBUG"}'}


async def test_managed_fields_can_be_handed_over_or_cleared(kube: KubeClient):
    path = CM + "/h"
    await kube.create(CM, configmap("h", a="1"))  # owned by "Python" (no fieldManager)
    handed = [
        {
            "manager": "op",
            "operation": "Apply",
            "apiVersion": "v1",
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:data": {"f:a": {}}},
        }
    ]
    result = await kube.json_patch(
        path, [{"op": "replace", "path": "/metadata/managedFields", "value": handed}]
    )
    assert owners(result) == {("op", "Apply"): {"f:data": {"f:a": {}}}}
    # op now owns "a": applying without it removes it.
    status, result = await apply(kube, path, configmap("h", b="2"))
    assert status == 200 and result["data"] == {"b": "2"}
    cleared = await kube.json_patch(
        path, [{"op": "replace", "path": "/metadata/managedFields", "value": [{}]}]
    )
    assert "managedFields" not in cleared["metadata"]
