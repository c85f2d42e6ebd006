"""KubeEmulator behaves as the API server does where kopf and the kubernetes client rely on it,
and a kopf operator runs against it: through plain HTTP and through the sync client."""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

import kmock
import kopf
import pytest

# Imported at collection: building their pydantic models takes seconds, too long for a handler
# under an eventually() timeout.
from kubernetes.client import ApiException, BatchV1Api, CoreV1Api, CustomObjectsApi
from kubernetes.watch import Watch

from emulator import KubeEmulator
from operator_harness import (  # noqa: F401  # the fixtures register under their own names
    HANDLED,
    OperatorThread,
    create,
    eventually,
    kmock_options_fixture,
    kube_fixture,
    kubeconfig_fixture,
    names,
    new_registry,
    patch_status,
    stored,
    url,
)

pytestmark = pytest.mark.asyncio

GROUP, VERSION = "skylab.dev", "v1alpha1"
CAMPAIGNS, TRIALS = f"{GROUP}/{VERSION}/campaigns", f"{GROUP}/{VERSION}/trials"
JOBS, PODS = "batch/v1/jobs", "v1/pods"
MERGE = {"Content-Type": "application/merge-patch+json"}
JSON_PATCH = {"Content-Type": "application/json-patch+json"}
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def campaign(name: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Campaign",
        "metadata": {"name": name, "labels": labels},
        "spec": {"experiment": "toy"},
    }


def owned_by(owner: dict[str, Any]) -> list[dict[str, Any]]:
    meta = owner["metadata"]
    ref = {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": meta["name"]}
    return [{**ref, "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}]


def live(kube: KubeEmulator, resource: str, name: str) -> dict[str, Any]:
    obj = stored(kube, resource, "default", name)
    assert obj is not None, f"{resource} {name} does not exist"
    return obj


async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """The sync client, off the loop that serves the emulator (called on it, it deadlocks)."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def send(
    kube: KubeEmulator, method: str, path: str, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    async with kube.request(method, path, **kwargs) as response:
        return response.status, await response.json()


# Metadata on create and on every write.


async def test_create_fills_the_metadata_over_http(kube: KubeEmulator) -> None:
    status, body = await send(kube, "POST", url(CAMPAIGNS, "default"), json=campaign("c1"))
    assert status == 201
    meta = body["metadata"]
    assert UUID.fullmatch(meta["uid"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["creationTimestamp"])
    assert meta["namespace"] == "default"  # from the URL
    assert meta["generation"] == 1
    first = int(meta["resourceVersion"])

    patch = {"metadata": {"annotations": {"a": "b"}}}
    status, body = await send(
        kube, "PATCH", url(CAMPAIGNS, "default", "c1"), json=patch, headers=MERGE
    )
    assert status == 200
    assert int(body["metadata"]["resourceVersion"]) > first
    assert body["metadata"]["uid"] == meta["uid"]

    generated = {**campaign(""), "metadata": {"generateName": "c-"}}
    status, body = await send(kube, "POST", url(CAMPAIGNS, "default"), json=generated)
    assert status == 201
    assert re.fullmatch(r"c-[a-z0-9]{5}", body["metadata"]["name"])
    assert stored(kube, CAMPAIGNS, "default", body["metadata"]["name"]) is not None


async def test_create_fills_the_metadata_through_the_client(
    kube: KubeEmulator, kubeconfig: Path
) -> None:
    assert os.environ["KUBECONFIG"] == str(kubeconfig)  # what kopf's login reads too
    api = CustomObjectsApi()
    created = await call(
        api.create_namespaced_custom_object, GROUP, VERSION, "default", "campaigns", campaign("c1")
    )
    assert created is not None  # kubernetes 37 answers None unless the status is 201
    assert UUID.fullmatch(created["metadata"]["uid"])
    assert created["metadata"]["namespace"] == "default"

    core = CoreV1Api()
    pod = {
        "metadata": {"generateName": "p-"},
        "spec": {"containers": [{"name": "m", "image": "x"}]},
    }
    made = await call(core.create_namespaced_pod, "default", pod)
    assert made.metadata.name.startswith("p-") and len(made.metadata.name) == 7
    assert made.metadata.creation_timestamp is not None
    patched = await call(
        core.patch_namespaced_pod,
        made.metadata.name,
        "default",
        {"metadata": {"labels": {"a": "b"}}},
    )
    assert int(patched.metadata.resource_version) > int(made.metadata.resource_version)
    assert patched.metadata.labels == {"a": "b"}


# Conflicts and failed preconditions.


async def test_duplicate_create_is_409_already_exists(kube: KubeEmulator) -> None:
    await create(kube, CAMPAIGNS, campaign("c1"))
    status, body = await send(kube, "POST", url(CAMPAIGNS, "default"), json=campaign("c1"))
    assert status == 409
    assert body["kind"] == "Status" and body["reason"] == "AlreadyExists" and body["code"] == 409

    with pytest.raises(ApiException) as raised:
        await call(
            CustomObjectsApi().create_namespaced_custom_object,
            GROUP,
            VERSION,
            "default",
            "campaigns",
            campaign("c1"),
        )
    assert raised.value.status == 409
    assert json.loads(raised.value.body)["reason"] == "AlreadyExists"


async def test_stale_resource_version_is_409(kube: KubeEmulator) -> None:
    old = await create(kube, CAMPAIGNS, campaign("c1"))
    stale = old["metadata"]["resourceVersion"]
    await patch_status(kube, CAMPAIGNS, "default", "c1", {"phase": "Running"})  # a newer write

    patch = {"metadata": {"resourceVersion": stale, "labels": {"x": "y"}}}
    path = url(CAMPAIGNS, "default", "c1")
    status, body = await send(kube, "PATCH", path, json=patch, headers=MERGE)
    assert (status, body["reason"]) == (409, "Conflict")
    status, _ = await send(kube, "PUT", path, json={**old, "spec": {"experiment": "other"}})
    assert status == 409
    assert live(kube, CAMPAIGNS, "c1")["spec"] == {"experiment": "toy"}

    api = CustomObjectsApi()
    with pytest.raises(ApiException) as raised:
        await call(
            api.replace_namespaced_custom_object,
            GROUP,
            VERSION,
            "default",
            "campaigns",
            "c1",
            {**old, "spec": {"experiment": "other"}},
        )
    assert raised.value.status == 409
    fresh = await call(
        api.get_namespaced_custom_object, GROUP, VERSION, "default", "campaigns", "c1"
    )
    replaced = await call(
        api.replace_namespaced_custom_object,
        GROUP,
        VERSION,
        "default",
        "campaigns",
        "c1",
        {**fresh, "spec": {"experiment": "other"}},
    )
    assert replaced["spec"] == {"experiment": "other"}
    assert replaced["status"] == {"phase": "Running"}  # a PUT to the main resource keeps .status


async def test_failed_json_patch_test_is_422(kube: KubeEmulator) -> None:
    made = await create(kube, CAMPAIGNS, campaign("c1"))
    rv = made["metadata"]["resourceVersion"]
    path = url(CAMPAIGNS, "default", "c1")
    ops = [{"op": "add", "path": "/metadata/finalizers", "value": ["f"]}]
    status, body = await send(
        kube,
        "PATCH",
        path,
        headers=JSON_PATCH,
        json=[{"op": "test", "path": "/metadata/resourceVersion", "value": "999"}, *ops],
    )
    assert (status, body["reason"]) == (422, "Invalid")
    assert "finalizers" not in live(kube, CAMPAIGNS, "c1")["metadata"]
    status, body = await send(
        kube,
        "PATCH",
        path,
        headers=JSON_PATCH,
        json=[{"op": "test", "path": "/metadata/resourceVersion", "value": rv}, *ops],
    )
    assert status == 200 and body["metadata"]["finalizers"] == ["f"]

    with pytest.raises(ApiException) as raised:
        await call(
            CustomObjectsApi().patch_namespaced_custom_object,
            GROUP,
            VERSION,
            "default",
            "campaigns",
            "c1",
            [{"op": "test", "path": "/spec/experiment", "value": "no"}],
        )
    assert raised.value.status == 422


# The status subresource.


async def test_status_subresource_rules_over_http(kube: KubeEmulator) -> None:
    body = {**campaign("c1"), "status": {"phase": "Made-up"}}
    made = await create(kube, CAMPAIGNS, body)
    assert "status" not in made  # a create drops .status

    path = url(CAMPAIGNS, "default", "c1")
    both = {"spec": {"experiment": "new"}, "status": {"phase": "Running"}}
    status, main = await send(kube, "PATCH", path, json=both, headers=MERGE)
    assert status == 200
    assert main["spec"] == {"experiment": "new"} and "status" not in main
    assert main["metadata"]["generation"] == 2

    both = {"spec": {"experiment": "ignored"}, "status": {"phase": "Running"}}
    status, sub = await send(kube, "PATCH", f"{path}/status", json=both, headers=MERGE)
    assert status == 200
    assert sub["spec"] == {"experiment": "new"} and sub["status"] == {"phase": "Running"}
    assert sub["metadata"]["generation"] == 2  # status changes are not new generations

    # Without the subresource (secrets), a main-resource patch writes anything, /status is 404.
    await create(kube, "v1/secrets", {"metadata": {"name": "s"}, "status": {"x": 1}})
    status, _ = await send(
        kube, "PATCH", url("v1/secrets", "default", "s", "status"), json={}, headers=MERGE
    )
    assert status == 404


async def test_status_subresource_rules_through_the_client(kube: KubeEmulator) -> None:
    batch = BatchV1Api()
    job = {
        "metadata": {"name": "j1"},
        "spec": {"template": {"spec": {"containers": [{"name": "m", "image": "x"}]}}},
        "status": {"succeeded": 5},
    }
    made = await call(batch.create_namespaced_job, "default", job)
    assert made.status is None or made.status.succeeded is None

    await call(batch.patch_namespaced_job, "j1", "default", {"status": {"succeeded": 1}})
    assert "status" not in live(kube, JOBS, "j1")

    done = await call(
        batch.patch_namespaced_job_status, "j1", "default", {"status": {"succeeded": 1}}
    )
    assert done.status.succeeded == 1

    api = CustomObjectsApi()
    await call(
        api.create_namespaced_custom_object,
        GROUP,
        VERSION,
        "default",
        "trials",
        {"metadata": {"name": "t1"}, "spec": {"campaign": "c"}},
    )
    patched = await call(
        api.patch_namespaced_custom_object_status,
        GROUP,
        VERSION,
        "default",
        "trials",
        "t1",
        {"spec": {"campaign": "x"}, "status": {"phase": "Ok"}},
    )
    assert patched["spec"] == {"campaign": "c"} and patched["status"] == {"phase": "Ok"}


# Selectors.


async def test_selectors_on_list(kube: KubeEmulator) -> None:
    await create(kube, CAMPAIGNS, campaign("a", tier="gpu", team="x"))
    await create(kube, CAMPAIGNS, campaign("b", tier="cpu"))
    await create(kube, CAMPAIGNS, campaign("c"))
    await create(kube, "v1/namespaces", {"metadata": {"name": "other"}}, namespace=None)
    await create(kube, CAMPAIGNS, campaign("d", tier="gpu"), namespace="other")

    async def listed(namespace: str | None, **params: str) -> list[str]:
        status, body = await send(kube, "GET", url(CAMPAIGNS, namespace), params=params)
        assert status == 200, body
        return sorted(item["metadata"]["name"] for item in body["items"])

    assert await listed("default", labelSelector="tier=gpu") == ["a"]
    assert await listed(None, labelSelector="tier==gpu") == ["a", "d"]
    assert await listed("default", labelSelector="tier!=gpu") == ["b", "c"]
    assert await listed("default", labelSelector="tier") == ["a", "b"]
    assert await listed("default", labelSelector="!tier") == ["c"]
    assert await listed("default", labelSelector="tier=gpu,team=x") == ["a"]
    assert await listed("default", labelSelector="tier in (cpu, gpu),!team") == ["b"]
    assert await listed(None, fieldSelector="metadata.name=d") == ["d"]
    assert await listed(None, fieldSelector="metadata.namespace!=default") == ["d"]
    status, body = await send(kube, "GET", url(CAMPAIGNS), params={"labelSelector": "a=(b"})
    assert (status, body["reason"]) == (400, "BadRequest")

    api = CustomObjectsApi()
    found = await call(
        api.list_namespaced_custom_object,
        GROUP,
        VERSION,
        "default",
        "campaigns",
        label_selector="tier=gpu",
        field_selector="metadata.name=a",
    )
    assert [item["metadata"]["name"] for item in found["items"]] == ["a"]
    pods = await call(CoreV1Api().list_namespaced_pod, "default", label_selector="app=none")
    assert pods.items == []


async def read_events(
    kube: KubeEmulator, path: str, count: int, **params: str
) -> list[tuple[str, str]]:
    """The first `count` events of a watch, as (type, name)."""
    events: list[tuple[str, str]] = []
    async with kube.get(path, params={"watch": "true", **params}) as response:
        assert response.status == 200
        async for line in response.content:
            if line.strip():
                event = json.loads(line)
                events.append((event["type"], event["object"]["metadata"]["name"]))
                if len(events) == count:
                    break
    return events


async def test_selectors_on_watch_over_http(kube: KubeEmulator) -> None:
    await create(kube, CAMPAIGNS, campaign("a", tier="gpu"))
    await create(kube, CAMPAIGNS, campaign("b", tier="cpu"))
    watching = asyncio.create_task(
        read_events(kube, url(CAMPAIGNS, "default"), 4, labelSelector="tier=gpu")
    )
    await eventually(lambda: any(r.params.get("watch") for r in kube))
    await create(kube, CAMPAIGNS, campaign("c", tier="gpu"))
    await create(kube, CAMPAIGNS, campaign("d", tier="cpu"))
    relabel = {"metadata": {"labels": {"tier": "cpu"}}}
    await send(kube, "PATCH", url(CAMPAIGNS, "default", "a"), json=relabel, headers=MERGE)
    relabel = {"metadata": {"labels": {"tier": "gpu"}}}
    await send(kube, "PATCH", url(CAMPAIGNS, "default", "b"), json=relabel, headers=MERGE)
    events = await asyncio.wait_for(watching, 5)
    # Leaving and entering the selection are DELETED and ADDED, as for the API server.
    assert events == [("ADDED", "a"), ("ADDED", "c"), ("DELETED", "a"), ("ADDED", "b")]


async def test_a_watch_resumes_from_a_resource_version(kube: KubeEmulator) -> None:
    await create(kube, CAMPAIGNS, campaign("a"))
    _, listing = await send(kube, "GET", url(CAMPAIGNS))
    since = listing["metadata"]["resourceVersion"]
    # Written between the list and the watch: a watch from the list's version still sees them.
    await create(kube, CAMPAIGNS, campaign("b"))
    await send(kube, "DELETE", url(CAMPAIGNS, "default", "a"))
    events = await asyncio.wait_for(read_events(kube, url(CAMPAIGNS), 2, resourceVersion=since), 5)
    assert events == [("ADDED", "b"), ("DELETED", "a")]


async def test_a_watch_of_one_object(kube: KubeEmulator) -> None:
    await create(kube, CAMPAIGNS, campaign("a"))
    await create(kube, CAMPAIGNS, campaign("b"))
    watching = asyncio.create_task(read_events(kube, url(CAMPAIGNS, "default", "b"), 2))
    await eventually(lambda: any(r.params.get("watch") for r in kube))
    await send(kube, "DELETE", url(CAMPAIGNS, "default", "a"))
    await send(kube, "DELETE", url(CAMPAIGNS, "default", "b"))
    assert await asyncio.wait_for(watching, 10) == [("ADDED", "b"), ("DELETED", "b")]


async def test_a_starting_watch_loses_nothing(kube: KubeEmulator) -> None:
    # Written while the watch takes its snapshot: each shows up once, in it or after it.
    made = [f"c{i}" for i in range(30)]
    watching = asyncio.create_task(read_events(kube, url(CAMPAIGNS), len(made)))
    await asyncio.gather(*(create(kube, CAMPAIGNS, campaign(name)) for name in made))
    events = await asyncio.wait_for(watching, 10)
    assert sorted(name for _, name in events) == sorted(made)


async def test_selectors_on_watch_through_the_client(kube: KubeEmulator) -> None:
    api = CustomObjectsApi()

    def watch() -> list[tuple[str, str]]:
        events = []
        stream = Watch().stream(
            api.list_namespaced_custom_object,
            GROUP,
            VERSION,
            "default",
            "campaigns",
            label_selector="tier=gpu",
            timeout_seconds=10,
        )
        for event in stream:
            events.append((event["type"], event["object"]["metadata"]["name"]))
            if len(events) == 2:
                break
        return events

    await create(kube, CAMPAIGNS, campaign("a", tier="gpu"))
    watching = asyncio.create_task(asyncio.to_thread(watch))
    await eventually(lambda: any(r.params.get("watch") for r in kube))
    await create(kube, CAMPAIGNS, campaign("b", tier="cpu"))
    await create(kube, CAMPAIGNS, campaign("c", tier="gpu"))
    assert await asyncio.wait_for(watching, 5) == [("ADDED", "a"), ("ADDED", "c")]


# Deletion: garbage collection and finalizers.


async def make_chain(kube: KubeEmulator, name: str) -> tuple[dict[str, Any], ...]:
    """Campaign -> Trial -> Job, each owned by the one before."""
    owner = await create(kube, CAMPAIGNS, campaign(name))
    trial = {"metadata": {"name": f"{name}-t", "ownerReferences": owned_by(owner)}, "spec": {}}
    trial = await create(kube, TRIALS, trial)
    job = {"metadata": {"name": f"{name}-j", "ownerReferences": owned_by(trial)}, "spec": {}}
    return owner, trial, await create(kube, JOBS, job)


async def test_garbage_collection_cascades_over_http(kube: KubeEmulator) -> None:
    await make_chain(kube, "c1")
    _, other_trial, _ = await make_chain(kube, "c2")
    # A Job with two owners lives on while one of them does.
    two = [*owned_by(other_trial), *owned_by(await create(kube, CAMPAIGNS, campaign("c3")))]
    await create(kube, JOBS, {"metadata": {"name": "shared", "ownerReferences": two}})

    status, _ = await send(kube, "DELETE", url(CAMPAIGNS, "default", "c1"))
    assert status == 200
    assert names(kube, TRIALS) == ["c2-t"]
    assert sorted(names(kube, JOBS)) == ["c2-j", "shared"]

    await send(kube, "DELETE", url(CAMPAIGNS, "default", "c2"))
    assert names(kube, TRIALS) == [] and names(kube, JOBS) == ["shared"]
    await send(kube, "DELETE", url(CAMPAIGNS, "default", "c3"))
    assert names(kube, JOBS) == []


async def test_garbage_collection_cascades_through_the_client(kube: KubeEmulator) -> None:
    await make_chain(kube, "c1")
    await call(
        CustomObjectsApi().delete_namespaced_custom_object,
        GROUP,
        VERSION,
        "default",
        "campaigns",
        "c1",
    )
    assert names(kube, CAMPAIGNS) == names(kube, TRIALS) == names(kube, JOBS) == []
    with pytest.raises(ApiException) as raised:
        await call(BatchV1Api().read_namespaced_job, "c1-j", "default")
    assert raised.value.status == 404


async def test_finalizers_hold_the_deletion(kube: KubeEmulator) -> None:
    await make_chain(kube, "c1")
    finalizers = {"metadata": {"finalizers": ["skylab.dev/cleanup"]}}
    path = url(CAMPAIGNS, "default", "c1")
    await send(kube, "PATCH", path, json=finalizers, headers=MERGE)

    status, body = await send(kube, "DELETE", path)
    assert status == 200 and body["metadata"]["deletionTimestamp"]
    held = stored(kube, CAMPAIGNS, "default", "c1")
    assert held is not None and held["metadata"]["deletionTimestamp"]
    assert names(kube, TRIALS) == ["c1-t"]  # its dependents wait too

    api = CustomObjectsApi()
    await call(
        api.patch_namespaced_custom_object,
        GROUP,
        VERSION,
        "default",
        "campaigns",
        "c1",
        {"metadata": {"finalizers": []}},
    )
    assert names(kube, CAMPAIGNS) == names(kube, TRIALS) == names(kube, JOBS) == []
    status, _ = await send(kube, "GET", path)
    assert status == 404


RUNNING = {"phase": "Running", "containerStatuses": [{"name": "m", "state": {"running": {}}}]}


async def test_pod_logs(kube: KubeEmulator) -> None:
    pod = {"metadata": {"name": "p1"}, "spec": {"containers": [{"name": "m", "image": "x"}]}}
    await create(kube, PODS, pod)
    kube.pod_logs["default", "p1"] = "line1\nline2\n"
    async with kube.get(url(PODS, "default", "p1", "log")) as response:
        assert response.status == 400, "a container that has not started has no log yet"
    await patch_status(kube, PODS, "default", "p1", RUNNING)
    async with kube.get(url(PODS, "default", "p1", "log")) as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        assert await response.text() == "line1\nline2\n"
    async with kube.get(url(PODS, "default", "nope", "log")) as response:
        assert response.status == 404

    core = CoreV1Api()
    assert await call(core.read_namespaced_pod_log, "p1", "default") == "line1\nline2\n"
    assert await call(core.read_namespaced_pod_log, "p1", "default", tail_lines=1) == "line2\n"
    with pytest.raises(ApiException) as raised:
        await call(core.read_namespaced_pod_log, "nope", "default")
    assert raised.value.status == 404


async def test_a_log_error_for_a_client_accepting_only_text_is_406(kube: KubeEmulator) -> None:
    text_only = {"Accept": "text/plain"}
    async with kube.get(url(PODS, "default", "nope", "log"), headers=text_only) as response:
        assert response.status == 406
    pod = {"metadata": {"name": "p2"}, "spec": {"containers": [{"name": "m", "image": "x"}]}}
    await create(kube, PODS, pod)
    async with kube.get(url(PODS, "default", "p2", "log"), headers=text_only) as response:
        assert response.status == 406
    await patch_status(kube, PODS, "default", "p2", RUNNING)
    kube.pod_logs["default", "p2"] = "ok\n"
    async with kube.get(url(PODS, "default", "p2", "log"), headers=text_only) as response:
        assert response.status == 200 and await response.text() == "ok\n"


async def test_the_operator_reads_a_log_and_no_log_yet_without_error(
    kube: KubeEmulator, kubeconfig: Path
) -> None:
    from skylab.controller.kubeapi import KubeApi, load_client

    api = KubeApi(load_client())
    pod = {"metadata": {"name": "p3"}, "spec": {"containers": [{"name": "trainer", "image": "x"}]}}
    await create(kube, PODS, pod)
    assert await call(api.pod_log, "default", "p3") == ""  # waiting to start: 400
    assert await call(api.pod_log, "default", "gone") == ""  # no such pod: 404
    running = {
        "phase": "Running",
        "containerStatuses": [{"name": "trainer", "state": {"running": {}}}],
    }
    await patch_status(kube, PODS, "default", "p3", running)
    kube.pod_logs["default", "p3"] = "step 1\n"
    assert await call(api.pod_log, "default", "p3", 30) == "step 1\n"


# A real kopf operator.


def toy_operator() -> kopf.OperatorRegistry:
    """Campaign -> a Trial; Trial -> a Job and its status through /status. Sync handlers."""
    registry = new_registry()

    @kopf.on.create(GROUP, VERSION, "campaigns", id="make_trial", registry=registry)
    def make_trial(body: kopf.Body, name: str, namespace: str, **_: Any) -> dict[str, str]:
        trial = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Trial",
            "metadata": {"name": f"{name}-0"},
            "spec": {"campaign": name},
        }
        kopf.adopt(trial, owner=body)
        try:
            CustomObjectsApi().create_namespaced_custom_object(
                GROUP, VERSION, namespace, "trials", trial
            )
        except ApiException as exc:  # handlers must be idempotent: kopf may run them again
            if exc.status != 409:
                raise
        kopf.info(body, reason="TrialCreated", message=f"{name}-0")
        return {"trial": f"{name}-0"}

    @kopf.on.create(GROUP, VERSION, "trials", id="make_job", registry=registry)
    def make_job(body: kopf.Body, name: str, namespace: str, **_: Any) -> None:
        job = {
            "metadata": {"name": name},
            "spec": {
                "template": {
                    "spec": {"containers": [{"name": "m", "image": "x"}], "restartPolicy": "Never"}
                }
            },
        }
        kopf.adopt(job, owner=body)
        try:
            BatchV1Api().create_namespaced_job(namespace, job)
        except ApiException as exc:
            if exc.status != 409:
                raise
        status = {"status": {"phase": "Running", "job": name}}
        CustomObjectsApi().patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, "trials", name, status
        )

    @kopf.timer(GROUP, VERSION, "campaigns", id="tick", interval=3600, registry=registry)
    def tick(**_: Any) -> None:
        """Here for the finalizer kopf puts on the objects of a timer (or a daemon)."""

    return registry


KOPF_FINALIZER = "kopf.zalando.org/KopfFinalizerMarker"
WATCHED = [CAMPAIGNS, TRIALS]


async def test_an_operator_creates_and_garbage_is_collected(kube: KubeEmulator) -> None:
    async with OperatorThread(toy_operator()) as operator:
        await operator.wait_for_watches(kube, WATCHED)
        await create(kube, CAMPAIGNS, campaign("c1"))

        trial = await eventually(lambda: with_status(kube, TRIALS, "c1-0"))
        assert trial["status"] == {"phase": "Running", "job": "c1-0"}
        job = stored(kube, JOBS, "default", "c1-0")
        assert job is not None and job["metadata"]["ownerReferences"][0]["kind"] == "Trial"
        # kopf wrote the handler's result through /status, its event as a v1 Event, and a
        # finalizer for the timer (with a JSON patch testing the resourceVersion).
        owner = await eventually(lambda: with_status(kube, CAMPAIGNS, "c1"))
        assert trial["metadata"]["ownerReferences"][0]["uid"] == owner["metadata"]["uid"]
        assert owner["status"] == {"make_trial": {"trial": "c1-0"}}
        assert owner["metadata"]["finalizers"] == [KOPF_FINALIZER]
        assert [e["reason"] for e in events(kube)] == ["TrialCreated"]

        # kopf releases its finalizer, then the Trial and the Job go with the Campaign.
        await send(kube, "DELETE", url(CAMPAIGNS, "default", "c1"))
        await eventually(
            lambda: not (names(kube, CAMPAIGNS) or names(kube, TRIALS) or names(kube, JOBS))
        )


def with_status(kube: KubeEmulator, resource: str, name: str) -> dict[str, Any] | None:
    obj = stored(kube, resource, "default", name)
    return obj if obj is not None and "status" in obj else None


def events(kube: KubeEmulator) -> list[dict[str, Any]]:
    return [stored(kube, "v1/events", "default", name) or {} for name in names(kube, "v1/events")]


def handled(kube: KubeEmulator, resource: str, name: str) -> bool:
    obj = stored(kube, resource, "default", name)
    return obj is not None and HANDLED in obj["metadata"].get("annotations", {})


async def test_a_restarted_operator_duplicates_nothing(kube: KubeEmulator) -> None:
    async with OperatorThread(toy_operator()) as operator:
        await operator.wait_for_watches(kube, WATCHED)
        await create(kube, CAMPAIGNS, campaign("c1"))
        # A clean stop: once kopf has recorded both creations as handled.
        await eventually(lambda: handled(kube, CAMPAIGNS, "c1") and handled(kube, TRIALS, "c1-0"))
    await create(kube, CAMPAIGNS, campaign("c2"))  # while no operator runs

    async with OperatorThread(toy_operator()) as operator:
        await operator.wait_for_watches(kube, WATCHED)
        await eventually(lambda: handled(kube, CAMPAIGNS, "c2") and handled(kube, TRIALS, "c2-0"))
        await asyncio.sleep(1)  # time enough for a wrongly repeated handler to run
    assert names(kube, TRIALS) == ["c1-0", "c2-0"]
    assert names(kube, JOBS) == ["c1-0", "c2-0"]
    posts = [request.resource for request in kube if request.method == kmock.method.POST]
    assert posts.count(TRIALS) == posts.count(JOBS) == 2  # no handler ran twice
