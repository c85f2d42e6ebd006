"""How fast the operator moves a campaign on: from a Job's completion to the next Job.

Runs the real operator (kopf handlers, PostgreSQL, git workspaces) against the Kubernetes
emulator of the tests, with N sweep campaigns of the toy experiment at once. The emulator
and a stand-in kubelet run in a process of their own, as an API server and the nodes
would: they never take the operator's interpreter. The kubelet runs each Job the moment
it appears, with the writes a cluster makes (the pod scheduled, running and terminated
with the trainer's report; the Job active, ready and complete), so every second measured
between a Job's end and the next Job is the operator's: reading the report, recording
it, deciding, committing the next trial, creating its Trial and its Job.

    .venv/bin/python bench/operator_reaction.py --campaigns 4 --trials 6 [--job-seconds S]

With --job-seconds 0 (the default) Jobs end at once: every campaign always waits on the
operator, so this measures it saturated (a reaction then takes about the number of
campaigns divided by the throughput). With S > 0 each Job runs S seconds first, and the
reaction is measured below saturation.

Prints the reaction time (Job completed -> the campaign's next Job created) as p50, p95
and max, the trials the operator handled per second, and the CPU seconds per trial that
the operator's process and the cluster's process used.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from kmock import Server  # noqa: E402

from emulator import KubeEmulator  # noqa: E402
from kubelet import (  # noqa: E402
    CAMPAIGNS,
    JOBS,
    NAMESPACE,
    PODS,
    TRIALS,
    operator_settings,
    phase_is,
    success,
    sweep_campaign,
)
from operator_harness import (  # noqa: E402
    OperatorThread,
    create,
    declare_resources,
    open_watches,
    patch_status,
    point_clients_at,
)
from skylab.controller.kubeapi import KubeApi, load_client  # noqa: E402
from skylab.controller.main import build_operator  # noqa: E402
from skylab.store.embedded import embedded_postgres  # noqa: E402
from toy_experiment import write_toy_experiment  # noqa: E402

# Enough sweep points for any --trials up to 21.
POINTS = ", ".join(f"{0.05 * n:.2f}" for n in range(1, 21))
GRID = f"[strategy.sweep.parameters.LR]\nvalues = [{POINTS}]\n"
STARTED_AT = "2026-01-01T00:00:00Z"


@dataclass(frozen=True)
class Outcome:
    """What the cluster saw: when each Job appeared and ended, and how long it all took."""

    seen: dict[str, float]
    ended: dict[str, float]
    elapsed: float
    cpu_seconds: float


class InstantKubelet:
    """Runs every Job the moment it is created, noting when it saw and ended each."""

    def __init__(self, kube: KubeEmulator, job_seconds: float) -> None:
        self.kube = kube
        self.job_seconds = job_seconds
        self.created: asyncio.Queue[str] = asyncio.Queue()
        self.seen: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        self._running: set[asyncio.Task[None]] = set()

    def notice(self, resource_name: str, name: str) -> None:
        """The emulator stored a new object (called on its loop, without awaiting)."""
        if resource_name == JOBS:
            self.seen[name] = time.monotonic()
            self.created.put_nowait(name)

    async def run(self) -> None:
        while True:
            job = await self.created.get()
            task = asyncio.create_task(self._run_job(job))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run_job(self, job: str) -> None:
        pod = f"{job}-pod"
        body = await create(
            self.kube,
            PODS,
            {
                "metadata": {
                    "name": pod,
                    "labels": self._pod_labels(job),
                    "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
                },
                "spec": {"containers": [{"name": "trainer", "image": "trainer"}]},
            },
        )
        assert body["metadata"]["name"] == pod
        await self._set(pod, job, "Pending", {"waiting": {"reason": "ContainerCreating"}}, 0)
        await self._set(pod, job, "Running", {"running": {"startedAt": STARTED_AT}}, 1)
        await asyncio.sleep(self.job_seconds)
        number = int(job.rsplit("-", 1)[1])
        report = success(1.0 - number / 100).report
        assert report is not None
        terminated = {"exitCode": 0, "reason": "Completed", "message": report.to_json()}
        state = {"phase": "Succeeded", "containerStatuses": [_trainer({"terminated": terminated})]}
        await patch_status(self.kube, PODS, NAMESPACE, pod, state)
        done = {"type": "Complete", "status": "True", "reason": ""}
        job_status = {"active": 0, "ready": 0, "succeeded": 1, "conditions": [done]}
        await patch_status(self.kube, JOBS, NAMESPACE, job, job_status)
        self.ended[job] = time.monotonic()

    def _pod_labels(self, job: str) -> dict[str, str]:
        stored = self.kube.objects[self.kube.resource(JOBS), NAMESPACE, job].raw
        labels: dict[str, str] = stored["spec"]["template"]["metadata"]["labels"]
        return {**labels, "job-name": job}

    async def _set(self, pod: str, job: str, phase: str, state: dict[str, Any], ready: int) -> None:
        pod_status = {"phase": phase, "containerStatuses": [_trainer(state)]}
        await patch_status(self.kube, PODS, NAMESPACE, pod, pod_status)
        await patch_status(self.kube, JOBS, NAMESPACE, job, {"active": 1, "ready": ready})


def _trainer(state: dict[str, Any]) -> dict[str, Any]:
    return {"name": "trainer", "state": state}


class NoticingEmulator(KubeEmulator):
    """The emulator, telling the kubelet of each object it creates."""

    kubelet: InstantKubelet | None = None

    def _create(self, request: Any) -> Any:
        body = super()._create(request)
        if self.kubelet is not None and request.resource == self.resource(JOBS):
            self.kubelet.notice(JOBS, body["metadata"]["name"])
        return body


def cluster(campaigns: int, trials: int, job_seconds: float, pipe: Connection) -> None:
    """The cluster's process: the API server and the kubelet, until told to stop."""
    asyncio.run(_serve(campaigns, trials, job_seconds, pipe))


async def _serve(campaigns: int, trials: int, job_seconds: float, pipe: Connection) -> None:
    async with NoticingEmulator() as kube, Server(kube):
        declare_resources(kube)
        await create(kube, "v1/namespaces", {"metadata": {"name": NAMESPACE}}, namespace=None)
        kubelet = InstantKubelet(kube, job_seconds)
        kube.kubelet = kubelet
        player = asyncio.create_task(kubelet.run())
        pipe.send(str(kube.url).rstrip("/"))
        wanted = {kube.resource(name) for name in (CAMPAIGNS, TRIALS, JOBS)}
        while not wanted <= open_watches(kube):
            await asyncio.sleep(0.05)
        pipe.send("watching")  # the operator has started: its start-up is not measured
        cpu_before = _cpu_seconds()
        started = time.monotonic()
        for index in range(campaigns):
            body = sweep_campaign(f"bench{index}", budget={"maxTrials": trials})
            await create(kube, CAMPAIGNS, body)
        while not all(phase_is(kube, f"bench{index}", "Succeeded") for index in range(campaigns)):
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
        pipe.send(Outcome(kubelet.seen, kubelet.ended, elapsed, _cpu_seconds() - cpu_before))
        await asyncio.to_thread(pipe.recv)  # the operator has stopped
        player.cancel()


def _cpu_seconds() -> float:
    """This process's CPU time and that of the children it has waited for (git's)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _database_cpu_seconds(data_dir: Path) -> float:
    """The CPU time so far of the PostgreSQL server under DATA_DIR: its postmaster and
    the backends (the operator's pooled connections live as long as the run)."""
    postmaster = psutil.Process(int((data_dir / "postmaster.pid").read_text().split()[0]))
    total = 0.0
    for process in [postmaster, *postmaster.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue  # a backend that ended meanwhile: its time is lost to both readings
        total += times.user + times.system
    return total


def measure(
    campaigns: int,
    trials: int,
    job_seconds: float,
    workdir: Path,
    database_url: str,
    database_dir: Path,
) -> None:
    experiments = workdir / "experiments"
    write_toy_experiment(experiments / "toy", GRID)
    # The tests' settings, but the chart's timers: a Campaign's resync every 60 s, the logs
    # of its running trials read every 10 s.
    settings = replace(
        operator_settings(workdir, database_url, experiments),
        resync_seconds=60,
        progress_seconds=10,
    )
    ours, theirs = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(
        target=cluster, args=(campaigns, trials, job_seconds, theirs), daemon=True
    )
    process.start()
    server: str = ours.recv()
    with pytest.MonkeyPatch.context() as patch:
        point_clients_at(server, workdir / "kubeconfig", patch)
        operator = build_operator(KubeApi(load_client()), settings)
        thread = OperatorThread(operator.registry)
        thread.start()
        ours.recv()  # kopf watches: the campaigns are created now
        cpu_before, database_before = _cpu_seconds(), _database_cpu_seconds(database_dir)
        outcome: Outcome = ours.recv()
        operator_cpu = _cpu_seconds() - cpu_before
        database_cpu = _database_cpu_seconds(database_dir) - database_before
        asyncio.run(thread.stop(timeout=120))
        operator.close()
    ours.send("stopped")
    process.join(30)
    report(outcome, campaigns, trials, operator_cpu, database_cpu)


def reactions(outcome: Outcome) -> list[float]:
    """Seconds from each Job's end to the creation of its campaign's next Job."""
    gaps = []
    for job, ended in outcome.ended.items():
        campaign, number = job.rsplit("-", 1)
        following = f"{campaign}-{int(number) + 1:04d}"
        if following in outcome.seen:
            gaps.append(outcome.seen[following] - ended)
    return gaps


def report(
    outcome: Outcome, campaigns: int, trials: int, operator_cpu: float, database_cpu: float
) -> None:
    gaps = sorted(reactions(outcome))
    handled = len(outcome.ended)
    print(f"campaigns {campaigns} x {trials} trials: {handled} Jobs run in {outcome.elapsed:.1f}s")
    if gaps:
        p95 = gaps[min(len(gaps) - 1, round(0.95 * (len(gaps) - 1)))]
        print(
            f"reaction (Job completed -> next Job created) over {len(gaps)} gaps: "
            f"p50 {statistics.median(gaps) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
            f"max {gaps[-1] * 1000:.0f} ms"
        )
    print(f"throughput: {handled / outcome.elapsed:.2f} trials/s")
    if handled:
        print(
            f"CPU per trial: operator {operator_cpu / handled * 1000:.0f} ms, "
            f"cluster (emulator and kubelet) {outcome.cpu_seconds / handled * 1000:.0f} ms, "
            f"PostgreSQL {database_cpu / handled * 1000:.0f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--campaigns", type=int, default=4, help="concurrent campaigns (4)")
    parser.add_argument("--trials", type=int, default=6, help="trials per campaign (6, max 21)")
    parser.add_argument(
        "--job-seconds",
        type=float,
        default=0.0,
        help="how long each Job runs (0: it ends at once, and the operator is saturated)",
    )
    args = parser.parse_args()
    if not 1 <= args.trials <= 21 or args.campaigns < 1 or args.job_seconds < 0:
        parser.error("--campaigns must be >= 1, --trials between 1 and 21 and --job-seconds >= 0")
    # Not under /tmp/pytest-*: the server runs as another user (see tests/conftest.py).
    with (
        tempfile.TemporaryDirectory(prefix="skylab-bench-") as tmp,
        embedded_postgres(Path(tmp) / "postgres") as url,
    ):
        measure(
            args.campaigns,
            args.trials,
            args.job_seconds,
            Path(tmp) / "work",
            url,
            Path(tmp) / "postgres" / "data",
        )


if __name__ == "__main__":
    main()
