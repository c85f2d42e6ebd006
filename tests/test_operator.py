"""The real operator (kopf handlers, PostgreSQL, workspaces) against the Kubernetes emulator.

The tests play the Job controller and the kubelet (tests/kubelet.py): they run each Job
the operator creates to an outcome they choose, and check what the operator makes of it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from threading import Event
from typing import Any

import kmock
import kopf
import pytest
from kopf._core.intents.stoppers import DaemonStopper

from emulator import KubeEmulator
from kubelet import (  # noqa: F401  # the settings fixture registers under its own name
    CAMPAIGNS,
    JOBS,
    NAMESPACE,
    SERVICES,
    SLOW,
    TRIALS,
    Outcome,
    active_jobs,
    condition,
    kubelet,
    phase_is,
    rows,
    running_operator,
    schedule_job,
    settings_fixture,
    start_job,
    status,
    success,
    sweep_campaign,
)
from operator_harness import (  # noqa: F401  # fixtures register under their own names
    OperatorThread,
    create,
    eventually,
    kmock_options_fixture,
    kube_fixture,
    names,
    operator_rbac_fixture,
    patch_status,
    stored,
)
from skylab.controller.kubeapi import KubeApi, load_client
from skylab.controller.main import Health, build_operator
from skylab.controller.settings import OperatorSettings
from skylab.executors.kubernetes import CompileCache
from skylab.store import Store

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(900)]


async def test_a_sweep_campaign_runs_to_succeeded_keeping_what_improves(
    kube: KubeEmulator, settings: OperatorSettings, database_url: str
) -> None:
    metrics = {1: 1.0, 2: 0.9, 3: 0.95, 4: 0.85}
    async with (
        running_operator(kube, settings),
        kubelet(kube, lambda n: success(metrics[n])),
    ):
        await create(kube, CAMPAIGNS, sweep_campaign("sweep", budget={"maxTrials": 4}))
        await eventually(lambda: phase_is(kube, "sweep", "Succeeded"), timeout=SLOW)

    trials = names(kube, TRIALS, NAMESPACE)
    assert trials == [f"sweep-{n:04d}" for n in (1, 2, 3, 4)]
    decisions = [status(kube, TRIALS, t).get("decision") for t in trials]
    assert decisions == ["Kept", "Kept", "Reverted", "Kept"]
    assert [status(kube, TRIALS, t)["metric"] for t in trials] == [1.0, 0.9, 0.95, 0.85]
    assert names(kube, JOBS, NAMESPACE) == trials
    assert rows(database_url, "sweep") == [
        (1, "success", True, 1.0),
        (2, "success", True, 0.9),
        (3, "success", False, 0.95),
        (4, "success", True, 0.85),
    ]
    final = status(kube, CAMPAIGNS, "sweep")
    assert final["counts"] == {"total": 4, "running": 0, "succeeded": 4, "failed": 0, "kept": 3}
    assert final["best"]["trial"] == "sweep-0004" and final["best"]["value"] == 0.85
    assert final["baseline"]["value"] == 1.0
    complete = condition(kube, "sweep", "Complete")
    assert (complete["status"], complete["reason"]) == ("True", "MaxTrials")
    # A Trial is written through its status only: no finalizer, no kopf bookkeeping (each
    # would be one more write, and one more event to handle, for every trial).
    trial_writes = [
        request
        for request in kube
        if request.resource == kube.resource(TRIALS)
        and request.method in (kmock.method.PATCH, kmock.method.PUT)
    ]
    assert trial_writes and all(request.subresource == "status" for request in trial_writes)
    assert all(not stored(kube, TRIALS, NAMESPACE, t)["metadata"].get("finalizers") for t in trials)


def job(kube: KubeEmulator, name: str) -> dict[str, Any]:
    body = stored(kube, JOBS, NAMESPACE, name)
    assert body is not None, f"no Job {name}"
    return body


async def test_parallelism_keeps_exactly_that_many_jobs_running(
    kube: KubeEmulator, settings: OperatorSettings, database_url: str
) -> None:
    release: set[int] = set()

    def script(number: int) -> Outcome | None:
        if number == 1 or number in release:
            return success(1.0 - number / 100)
        return None  # stays running

    campaign = sweep_campaign("par", parallelism=3, budget={"maxTrials": 6})
    async with running_operator(kube, settings) as (operator, _), kubelet(kube, script):
        await create(kube, CAMPAIGNS, campaign)
        await eventually(lambda: len(active_jobs(kube)) == 3, timeout=SLOW)
        assert sorted(names(kube, JOBS, NAMESPACE)) == [f"par-{n:04d}" for n in (1, 2, 3, 4)]
        assert status(kube, CAMPAIGNS, "par")["counts"]["running"] == 3
        release.add(3)  # one finishes: exactly one more starts
        await eventually(lambda: len(names(kube, JOBS, NAMESPACE)) == 5, timeout=SLOW)
        await eventually(lambda: len(active_jobs(kube)) == 3, timeout=SLOW)
        assert status(kube, TRIALS, "par-0003")["decision"] == "Kept"
        # the running trials' progress, read from their pods' logs, is in PostgreSQL
        with Store.connect(database_url) as store:
            record = store.get_campaign(f"{NAMESPACE}/par")
            assert record is not None
            running = store.get_trial(record.id, 2)
            assert running is not None

            def progress_recorded() -> bool:
                return [p.step for p in store.progress(running.id)] == [1, 2]

            await eventually(progress_recorded, timeout=SLOW)

        # the gauges follow the Trials' status, which follows the Jobs
        def gauges() -> str:
            return operator.metrics.render().decode()

        await eventually(lambda: 'skylab_trials{phase="Running"} 3.0' in gauges(), timeout=SLOW)
        assert 'skylab_campaigns{phase="Running"} 1.0' in gauges()


async def test_a_multi_gpu_trial_runs_torchrun_with_gpu_requests_and_the_compile_cache(
    kube: KubeEmulator, settings: OperatorSettings
) -> None:
    campaign = sweep_campaign("gpus", trialTemplate={"gpusPerNode": 4})
    cache = CompileCache(host_path="/var/cache/skylab/compile")
    async with running_operator(kube, dataclasses.replace(settings, compile_cache=cache)):
        await create(kube, CAMPAIGNS, campaign)
        await eventually(lambda: stored(kube, JOBS, NAMESPACE, "gpus-0001"), timeout=SLOW)
    spec = job(kube, "gpus-0001")["spec"]
    container = spec["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SKYLAB_COMMAND"] == "torchrun --standalone --nproc_per_node=4 train.py"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert env["SKYLAB_REPO_URL"] == "http://skylab.skylab.svc:8080/git/default/gpus.git"
    trial = stored(kube, TRIALS, NAMESPACE, "gpus-0001")
    assert trial is not None and env["SKYLAB_COMMIT"] == trial["spec"]["commit"]
    assert (spec["backoffLimit"], spec["template"]["spec"]["restartPolicy"]) == (0, "Never")
    owner = job(kube, "gpus-0001")["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"]) == ("Trial", trial["metadata"]["uid"])
    # The operator's compile cache setting reaches the pod.
    pod = spec["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if "hostPath" in v]
    assert volume["hostPath"]["path"] == cache.host_path
    assert [c["command"][0] for c in pod["initContainers"]] == ["chown"]


async def test_a_two_node_trial_gets_an_indexed_job_and_a_headless_service(
    kube: KubeEmulator, settings: OperatorSettings
) -> None:
    campaign = sweep_campaign("nodes", trialTemplate={"gpusPerNode": 8, "nodes": 2})
    async with running_operator(kube, settings):
        await create(kube, CAMPAIGNS, campaign)
        await eventually(lambda: stored(kube, JOBS, NAMESPACE, "nodes-0001"), timeout=SLOW)
    spec = job(kube, "nodes-0001")["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 2, 2)
    service = stored(kube, SERVICES, NAMESPACE, "nodes-0001")
    assert service is not None and service["spec"]["clusterIP"] == "None"
    env = {e["name"]: e for e in spec["template"]["spec"]["containers"][0]["env"]}
    assert env["PET_NNODES"]["value"] == "2"
    assert env["PET_NPROC_PER_NODE"]["value"] == "8"
    assert env["PET_MASTER_ADDR"]["value"] == "nodes-0001-0.nodes-0001.default.svc"
    rank = env["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert "job-completion-index" in rank
    assert env["SKYLAB_COMMAND"]["value"] == "torchrun train.py"


async def set_suspend(kube: KubeEmulator, name: str, suspend: bool) -> None:
    """What Kueue does to a Job: unsuspend it to admit it, suspend it again to evict it."""
    path = f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs/{name}"
    headers = {"Content-Type": "application/merge-patch+json"}
    async with kube.patch(path, json={"spec": {"suspend": suspend}}, headers=headers) as response:
        assert response.status == 200


def trial_phase(kube: KubeEmulator, name: str) -> str | None:
    return status(kube, TRIALS, name).get("phase")


async def test_a_kueue_trial_waits_queued_and_an_eviction_is_not_a_failure(
    kube: KubeEmulator, settings: OperatorSettings, database_url: str
) -> None:
    evicted = Event()

    def script(number: int) -> Outcome | None:
        if number == 2 and not evicted.is_set():
            return None  # runs until evicted and admitted again
        return success(1.0 - number / 10)

    campaign = sweep_campaign("kq", budget={"maxTrials": 2}, trialTemplate={"queueName": "gpus"})
    async with running_operator(kube, settings), kubelet(kube, script):
        await create(kube, CAMPAIGNS, campaign)
        await eventually(lambda: trial_phase(kube, "kq-0001") == "Queued", timeout=SLOW)
        held = job(kube, "kq-0001")
        assert held["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpus"
        assert held["spec"]["suspend"] is True
        await set_suspend(kube, "kq-0001", False)
        await eventually(lambda: stored(kube, JOBS, NAMESPACE, "kq-0002"), timeout=SLOW)
        assert status(kube, TRIALS, "kq-0001")["decision"] == "Kept"

        await set_suspend(kube, "kq-0002", False)
        await eventually(lambda: trial_phase(kube, "kq-0002") == "Running", timeout=SLOW)
        await set_suspend(kube, "kq-0002", True)  # evicted: the pod goes, the Job waits
        await patch_status(kube, JOBS, NAMESPACE, "kq-0002", {"active": 0, "ready": 0})
        await eventually(lambda: trial_phase(kube, "kq-0002") == "Queued", timeout=SLOW)
        evicted.set()
        await set_suspend(kube, "kq-0002", False)
        await eventually(lambda: phase_is(kube, "kq", "Succeeded"), timeout=SLOW)
    assert rows(database_url, "kq") == [(1, "success", True, 0.9), (2, "success", True, 0.8)]
    assert names(kube, JOBS, NAMESPACE) == ["kq-0001", "kq-0002"]


async def test_a_trial_whose_pod_is_still_pending_is_not_running(
    kube: KubeEmulator, settings: OperatorSettings
) -> None:
    async with running_operator(kube, settings):
        await create(kube, CAMPAIGNS, sweep_campaign("pend", budget={"maxTrials": 1}))
        await eventually(lambda: stored(kube, JOBS, NAMESPACE, "pend-0001"), timeout=SLOW)
        # As the Job controller reports a pod that waits for its image: active, not ready.
        await schedule_job(kube, "pend-0001")
        await asyncio.sleep(2)  # the Job's event has been handled by now
        assert trial_phase(kube, "pend-0001") == "Pending"
        assert "startTime" not in status(kube, TRIALS, "pend-0001")
        await start_job(kube, "pend-0001")
        await eventually(lambda: trial_phase(kube, "pend-0001") == "Running", timeout=SLOW)
        assert status(kube, TRIALS, "pend-0001")["startTime"]


async def test_health_endpoints_answer_once_kopf_runs_and_postgresql_answers(
    kube: KubeEmulator, settings: OperatorSettings
) -> None:
    operator = await asyncio.to_thread(build_operator, KubeApi(load_client()), settings)
    health = Health(operator.database, settings.database_down_seconds)
    routes = health.routes(operator.metrics)
    assert routes["/healthz"]()[0] == 503 and routes["/readyz"]()[0] == 503  # not started
    kopf.on.startup(registry=operator.registry)(health.started)
    thread = OperatorThread(operator.registry)
    thread.start()
    try:
        await thread.wait_for_watches(kube, [CAMPAIGNS, TRIALS, JOBS])
        live = await asyncio.to_thread(routes["/healthz"])
        ready = await asyncio.to_thread(routes["/readyz"])
        assert (live[0], live[2]) == (200, b"ok\n")
        assert (ready[0], ready[2]) == (200, b"ok\n")
        assert b"skylab_handler_errors" in routes["/metrics"]()[2]
    finally:
        await thread.stop(timeout=120)
    # the loop is gone: liveness fails, and the kubelet would restart the pod
    assert routes["/healthz"]()[0] == 503
    operator.close()


async def test_the_progress_daemon_ends_when_cancelled_with_its_stopper_unset(
    kube: KubeEmulator, settings: OperatorSettings
) -> None:
    # kopf stops a daemon spawned while the operator exits by cancelling its task alone:
    # the daemon has to end then, or the operator never exits.
    operator = await asyncio.to_thread(build_operator, KubeApi(load_client()), settings)
    spawning = operator.registry._spawning.get_all_handlers()
    (daemon,) = [h for h in spawning if str(h.id).endswith("campaign_progress")]
    assert inspect.iscoroutinefunction(daemon.fn), "a sync daemon cannot be cancelled"
    stopper = DaemonStopper()
    task = asyncio.create_task(
        daemon.fn(namespace=NAMESPACE, name="absent", stopped=stopper.async_waiter)
    )
    await asyncio.sleep(settings.progress_seconds * 3)  # a few reads of an absent campaign
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=30)
    operator.close()
