"""The parts of a cluster the emulator lacks, played by the tests: the Job controller and
the kubelet. They run a trial's Job by writing what those controllers would write: the
pod, its terminated container with the trainer's report as termination message, and
the Job's status and conditions."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from emulator import KubeEmulator
from operator_harness import OperatorThread, create, names, patch_status, stored
from skylab.controller.kubeapi import KubeApi, load_client
from skylab.controller.main import Operator, build_operator
from skylab.controller.settings import OperatorSettings
from skylab.store import Store
from skylab_trainer.report import RunReport, RunStatus
from toy_experiment import write_toy_experiment

GROUP_VERSION = "skylab.dev/v1alpha1"
CAMPAIGNS, TRIALS = f"{GROUP_VERSION}/campaigns", f"{GROUP_VERSION}/trials"
JOBS, PODS, SERVICES = "batch/v1/jobs", "v1/pods", "v1/services"
NAMESPACE = "default"
_pod_ids = itertools.count(1)
# What a running trainer container has printed: train.py's progress lines.
PROGRESS_LOG = (
    "step 00001 | loss 9.012345 | lrm 1.00 | dt 320ms | tok/s 1,638,400 | mfu 39.7%"
    " | done 0.3% | left 299s | epoch 1\n"
    "step 00002 | loss 8.501234 | lrm 1.00 | dt 318ms | tok/s 1,648,700 | mfu 39.9%"
    " | done 0.6% | left 298s | epoch 1\n"
)


@dataclass(frozen=True)
class Outcome:
    """How a trial's Job ends."""

    report: RunReport | None  # None: the container wrote no termination message
    job_condition: str = "Complete"  # or Failed
    job_reason: str = ""  # e.g. DeadlineExceeded
    exit_code: int = 0
    container_reason: str = "Completed"  # e.g. OOMKilled, Error
    raw_message: str | None = None  # a termination message that is not a report
    pod_status: dict[str, Any] = field(default_factory=dict)  # e.g. the reason Evicted


def success(metric: float, vram_mb: float = 1000.0) -> Outcome:
    metrics = {"val_bpb": metric, "peak_vram_mb": vram_mb, "training_seconds": 1.0}
    report = RunReport(RunStatus.SUCCESS, "val_bpb", metric, metrics, exit_code=0)
    return Outcome(report)


def crash(message: str = "RuntimeError: boom") -> Outcome:
    report = RunReport(RunStatus.CRASH, "val_bpb", exit_code=1, message=message)
    return Outcome(report, "Failed", "BackoffLimitExceeded", 1, "Error")


def oom_killed() -> Outcome:
    return Outcome(None, "Failed", "BackoffLimitExceeded", 137, "OOMKilled")


def evicted() -> Outcome:
    """The kubelet evicted the pod (node pressure): no report."""
    pod = {"reason": "Evicted", "message": "The node was low on resource: memory."}
    return Outcome(None, "Failed", "BackoffLimitExceeded", 137, "Error", pod_status=pod)


def preempted() -> Outcome:
    """The scheduler preempted the pod for a higher-priority one: no report."""
    condition = {
        "type": "DisruptionTarget",
        "status": "True",
        "reason": "PreemptionByScheduler",
        "message": "Preempted in order to admit critical pod",
    }
    return Outcome(
        None, "Failed", "BackoffLimitExceeded", 143, "Error", pod_status={"conditions": [condition]}
    )


def deadline_exceeded() -> Outcome:
    return Outcome(None, "Failed", "DeadlineExceeded", 137, "Error")


def raw_report(message: str) -> Outcome:
    return Outcome(None, "Failed", "BackoffLimitExceeded", 1, "Error", raw_message=message)


async def schedule_job(kube: KubeEmulator, name: str) -> str:
    """The Job's pod exists and waits to start (its image pulling, say), as the Job
    controller then reports it: active, not ready. Returns the pod's name."""
    pod = f"{name}-{next(_pod_ids):05d}"
    job = stored(kube, JOBS, NAMESPACE, name) or {}
    labels = ((job.get("spec") or {}).get("template") or {}).get("metadata", {}).get("labels")
    await create(
        kube,
        PODS,
        {
            "metadata": {
                "name": pod,
                "labels": {**(labels or {"skylab.dev/trial": name}), "job-name": name},
                "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
            },
            "spec": {"containers": [{"name": "trainer", "image": "trainer"}]},
        },
    )
    await _pod_and_job(kube, pod, name, "Pending", {"waiting": {"reason": "ContainerCreating"}})
    return pod


async def _pod_and_job(
    kube: KubeEmulator, pod: str, job: str, phase: str, state: dict[str, Any]
) -> None:
    """The pod's phase and trainer container state, then the Job's counts as the Job
    controller derives them: active either way, ready once the container runs."""
    containers = [{"name": "trainer", "state": state}]
    await patch_status(
        kube, PODS, NAMESPACE, pod, {"phase": phase, "containerStatuses": containers}
    )
    ready = 1 if phase == "Running" else 0
    await patch_status(kube, JOBS, NAMESPACE, job, {"active": 1, "ready": ready})


def job_pods(kube: KubeEmulator, name: str) -> list[str]:
    """The pods start_job made for Job NAME (named NAME-NNNNN)."""
    return [p for p in names(kube, PODS, NAMESPACE) if re.fullmatch(rf"{name}-\d{{5}}", p)]


def trial_and_run(job: str) -> tuple[int, int]:
    """The trial number and run number a trial Job's name gives (x-0003-r2: 3, 2)."""
    found = re.search(r"-(\d{4})(?:-r(\d+))?$", job)
    assert found is not None, job
    return int(found[1]), int(found[2] or 1)


async def start_job(kube: KubeEmulator, name: str, log: str = "") -> None:
    """The Job's pod is scheduled and running (LOG: what its container printed so far)."""
    pods = job_pods(kube, name)
    pod = pods[-1] if pods else await schedule_job(kube, name)
    kube.pod_logs[(NAMESPACE, pod)] = log
    await _pod_and_job(
        kube, pod, name, "Running", {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
    )


async def end_job(kube: KubeEmulator, name: str, outcome: Outcome) -> None:
    """The pod's container ends as OUTCOME says, then the Job controller marks the Job."""
    if not job_pods(kube, name):
        await start_job(kube, name)
    pods = job_pods(kube, name)
    message = outcome.raw_message
    if outcome.report is not None:
        message = outcome.report.to_json()
    terminated: dict[str, Any] = {"exitCode": outcome.exit_code, "reason": outcome.container_reason}
    if message is not None:
        terminated["message"] = message
    phase = "Succeeded" if outcome.exit_code == 0 else "Failed"
    await patch_status(
        kube,
        PODS,
        NAMESPACE,
        pods[-1],
        {
            "phase": phase,
            "containerStatuses": [{"name": "trainer", "state": {"terminated": terminated}}],
            **outcome.pod_status,
        },
    )
    condition = {"type": outcome.job_condition, "status": "True", "reason": outcome.job_reason}
    counts = {"succeeded": 1} if outcome.job_condition == "Complete" else {"failed": 1}
    await patch_status(
        kube, JOBS, NAMESPACE, name, {"active": 0, "ready": 0, "conditions": [condition], **counts}
    )


def progress_log(losses: list[float]) -> str:
    """A training log, its loss at each tenth of the budget."""
    lines = [
        f"step {i:05d} | loss {loss:.6f} | done {100 * i / len(losses):.1f}% | left 1s"
        for i, loss in enumerate(losses, start=1)
    ]
    return "\n".join(lines) + "\n"


GOOD = progress_log([4.0 - 0.2 * i for i in range(10)])
SLIGHTLY_DIFFERENT = progress_log([4.02 - 0.2 * i for i in range(10)])
# Far above the others from 30% of the budget on: a run to prune.
HOPELESS = progress_log([4.0 - 0.05 * i for i in range(10)])


class LossCurves:
    """The logs runs print, and whether the operator has stored each run's curve yet."""

    def __init__(self, database_url: str, campaign: str) -> None:
        self.store = Store.connect(database_url)
        self.campaign = campaign

    def logs(self, by_trial: dict[int, list[str]]) -> dict[str, str]:
        """Job name -> log, from each trial's logs in run order."""
        return {
            f"{self.campaign}-{number:04d}" + ("" if run == 1 else f"-r{run}"): log
            for number, texts in by_trial.items()
            for run, log in enumerate(texts, start=1)
        }

    def followed(self, number: int, run: int) -> bool:
        record = self.store.get_campaign(f"{NAMESPACE}/{self.campaign}")
        trial = None if record is None else self.store.get_trial(record.id, number)
        return trial is not None and len(self.store.progress(trial.id, run)) == 10

    def close(self) -> None:
        self.store.close()


@dataclass
class Kubelet:
    """Runs every new Job of the emulator to the outcome SCRIPT gives for its trial number
    (RUN_SCRIPT, when given: for its trial and run numbers)."""

    kube: KubeEmulator
    script: Callable[[int], Outcome | None]  # None: start that Job and leave it running
    run_script: Callable[[int, int], Outcome | None] | None = None
    # What a Job's container prints, by Job name (PROGRESS_LOG for the others).
    logs: dict[str, str] = field(default_factory=dict)
    started: set[str] = field(default_factory=set)
    ended: set[str] = field(default_factory=set)

    async def run(self) -> None:
        while True:
            for job in names(self.kube, JOBS, NAMESPACE):
                body = stored(self.kube, JOBS, NAMESPACE, job)
                if job in self.ended or body is None or body["spec"].get("suspend"):
                    continue
                if job not in self.started:
                    self.started.add(job)
                    await start_job(self.kube, job, log=self.logs.get(job, PROGRESS_LOG))
                number, run = trial_and_run(job)
                if self.run_script is not None:
                    outcome = self.run_script(number, run)
                else:
                    outcome = self.script(number)
                if outcome is not None:
                    self.ended.add(job)
                    await end_job(self.kube, job, outcome)
            await asyncio.sleep(0.05)


@asynccontextmanager
async def kubelet(
    kube: KubeEmulator,
    script: Callable[[int], Outcome | None] = lambda number: None,
    run_script: Callable[[int, int], Outcome | None] | None = None,
) -> AsyncIterator[Kubelet]:
    player = Kubelet(kube, script, run_script)
    task = asyncio.create_task(player.run())
    try:
        yield player
    finally:
        if task.done():  # it only ends by failing: say why
            task.result()
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


# Seconds to wait for a whole campaign: generous, the emulator shares two slow cores.
SLOW = float(os.environ.get("SKYLAB_TEST_SLOW", 300))
GRID = """
[strategy.sweep.parameters.LR]
values = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
"""


@pytest.fixture(name="settings")
def settings_fixture(tmp_path: Path, database_url: str) -> OperatorSettings:
    """The operator's settings for a test: the toy experiment bundled, a fresh database."""
    experiments = tmp_path / "experiments"
    write_toy_experiment(experiments / "toy", GRID)
    return operator_settings(tmp_path, database_url, experiments)


def status(kube: KubeEmulator, resource: str, name: str) -> dict[str, Any]:
    body = stored(kube, resource, NAMESPACE, name)
    return (body or {}).get("status") or {}


def phase_is(kube: KubeEmulator, name: str, phase: str) -> bool:
    return status(kube, CAMPAIGNS, name).get("phase") == phase


def condition(kube: KubeEmulator, campaign: str, kind: str) -> dict[str, Any]:
    """The Campaign's condition of type KIND."""
    return next(c for c in status(kube, CAMPAIGNS, campaign)["conditions"] if c["type"] == kind)


def active_jobs(kube: KubeEmulator) -> list[str]:
    return [j for j in names(kube, JOBS, NAMESPACE) if status(kube, JOBS, j).get("active")]


def rows(database_url: str, campaign: str) -> list[tuple[int, str, bool | None, float | None]]:
    """The campaign's trials in PostgreSQL: (number, status, kept, metric)."""
    with Store.connect(database_url) as store:
        record = store.get_campaign(f"{NAMESPACE}/{campaign}")
        assert record is not None
        return [(t.number, t.status, t.kept, t.metric) for t in store.trials(record.id)]


def operator_settings(tmp_path: Path, database_url: str, experiments: Path) -> OperatorSettings:
    return OperatorSettings(
        database_url=database_url,
        workspace_root=tmp_path / "workspaces",
        git_url="http://skylab.skylab.svc:8080/git",
        experiment_dirs=(experiments,),
        resync_seconds=5.0,
        progress_seconds=1.0,
        retry_seconds=0.3,
    )


@asynccontextmanager
async def running_operator(
    kube: KubeEmulator, settings: OperatorSettings, peering: str | None = None
) -> AsyncIterator[tuple[Operator, OperatorThread]]:
    """The real operator (`skylab operator`'s handlers) in a kopf thread of its own."""
    operator = await asyncio.to_thread(build_operator, KubeApi(load_client()), settings)
    thread = OperatorThread(operator.registry, peering=peering)
    thread.start()
    try:
        await thread.wait_for_watches(kube, [CAMPAIGNS, TRIALS, JOBS])
        yield operator, thread
    finally:
        # kopf waits for the handlers in flight: on a loaded machine that takes a while.
        await thread.stop(timeout=120)
        operator.close()


def sweep_campaign(name: str, **spec: Any) -> dict[str, Any]:
    """A Campaign of the toy experiment (bundled), one GPU per trial unless SPEC says."""
    template = {"image": "skylab-trainer:test", "gpusPerNode": 1}
    template |= spec.pop("trialTemplate", {})
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "Campaign",
        "metadata": {"name": name},
        "spec": {
            "experiment": {"bundled": "toy"},
            "strategy": {"type": "sweep"},
            "trialTemplate": template,
            **spec,
        },
    }


class Killed(Exception):
    """The operator process is gone: nothing it would have done next happens."""


# Every KubeApi method the operator calls; a dead operator's calls all fail.
API_METHODS = (
    "get_campaign",
    "patch_campaign_status",
    "list_trials",
    "get_trial",
    "patch_trial_status",
    "create",
    "get_job",
    "list_pods",
    "pod_log",
    "delete_job",
    "read_secret_key",
)


class Death(threading.Event):
    """Set when the operator dies: its kopf thread is told to stop too."""

    def __init__(self, thread: OperatorThread) -> None:
        super().__init__()
        self.thread = thread

    def set(self) -> None:
        super().set()
        self.thread.stop_flag.set()


def mortal(operator: Operator, thread: OperatorThread) -> Death:
    """Once the returned event is set, every call OPERATOR makes fails, as if it had died."""
    dead = Death(thread)
    api = operator.campaigns.api

    def guard(method: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            if dead.is_set():
                raise Killed(method)
            return original(*args)

        return call

    for method in API_METHODS:
        setattr(api, method, guard(method, getattr(api, method)))
    get_store = operator.database.get

    def store() -> Store:
        if dead.is_set():
            raise Killed("database")
        return get_store()

    operator.database.get = store  # type: ignore[method-assign]
    return dead
