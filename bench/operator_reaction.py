"""How fast the operator moves a campaign on: from a Job's completion to the next Job.

Runs the real operator (kopf handlers, PostgreSQL, git workspaces) against the Kubernetes
emulator of the tests, with N sweep campaigns of the toy experiment at once. A stand-in
kubelet completes each Job as soon as it appears, so every second measured is the
operator's: reading the report, recording it, deciding, committing the next trial,
creating its Trial and its Job.

    .venv/bin/python bench/operator_reaction.py --campaigns 4 --trials 6

Prints the reaction time (Job completed -> the campaign's next Job created) as p50, p95
and max, and the trials the operator handled per second.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from kmock import Server  # noqa: E402

from emulator import KubeEmulator  # noqa: E402
from kubelet import (  # noqa: E402
    CAMPAIGNS,
    JOBS,
    NAMESPACE,
    end_job,
    operator_settings,
    phase_is,
    running_operator,
    success,
    sweep_campaign,
)
from operator_harness import (  # noqa: E402
    create,
    declare_resources,
    names,
    point_clients_at,
)
from skylab.store.embedded import embedded_postgres  # noqa: E402
from toy_experiment import write_toy_experiment  # noqa: E402

# Enough sweep points for any --trials up to 21.
POINTS = ", ".join(f"{0.05 * n:.2f}" for n in range(1, 21))
GRID = f"[strategy.sweep.parameters.LR]\nvalues = [{POINTS}]\n"


class InstantKubelet:
    """Completes every Job the moment it sees it, noting when it saw and ended each."""

    def __init__(self, kube: KubeEmulator) -> None:
        self.kube = kube
        self.seen: dict[str, float] = {}
        self.ended: dict[str, float] = {}

    async def run(self) -> None:
        while True:
            for job in names(self.kube, JOBS, NAMESPACE):
                if job in self.seen:
                    continue
                self.seen[job] = time.monotonic()
                number = int(job.rsplit("-", 1)[1])
                await end_job(self.kube, job, success(1.0 - number / 100))
                self.ended[job] = time.monotonic()
            await asyncio.sleep(0.01)

    def reactions(self) -> list[float]:
        """Seconds from each Job's end to the creation of its campaign's next Job."""
        gaps = []
        for job, ended in self.ended.items():
            campaign, number = job.rsplit("-", 1)
            following = f"{campaign}-{int(number) + 1:04d}"
            if following in self.seen:
                gaps.append(self.seen[following] - ended)
        return gaps


async def measure(campaigns: int, trials: int, workdir: Path, database_url: str) -> None:
    experiments = workdir / "experiments"
    write_toy_experiment(experiments / "toy", GRID)
    settings = operator_settings(workdir, database_url, experiments)
    async with KubeEmulator() as kube, Server(kube):
        declare_resources(kube)
        with pytest.MonkeyPatch.context() as patch:
            point_clients_at(str(kube.url).rstrip("/"), workdir / "kubeconfig", patch)
            await create(kube, "v1/namespaces", {"metadata": {"name": NAMESPACE}}, namespace=None)
            kubelet = InstantKubelet(kube)
            player = asyncio.create_task(kubelet.run())
            async with running_operator(kube, settings):
                started = time.monotonic()
                for index in range(campaigns):
                    body = sweep_campaign(f"bench{index}", budget={"maxTrials": trials})
                    await create(kube, CAMPAIGNS, body)
                while not all(
                    phase_is(kube, f"bench{index}", "Succeeded") for index in range(campaigns)
                ):
                    await asyncio.sleep(0.05)
                elapsed = time.monotonic() - started
            player.cancel()
    report(kubelet, campaigns, trials, elapsed)


def report(kubelet: InstantKubelet, campaigns: int, trials: int, elapsed: float) -> None:
    gaps = sorted(kubelet.reactions())
    handled = len(kubelet.ended)
    print(f"campaigns {campaigns} x {trials} trials: {handled} Jobs run in {elapsed:.1f}s")
    if gaps:
        p95 = gaps[min(len(gaps) - 1, round(0.95 * (len(gaps) - 1)))]
        print(
            f"reaction (Job completed -> next Job created) over {len(gaps)} gaps: "
            f"p50 {statistics.median(gaps) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms, "
            f"max {gaps[-1] * 1000:.0f} ms"
        )
    print(f"throughput: {handled / elapsed:.2f} trials/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--campaigns", type=int, default=4, help="concurrent campaigns (4)")
    parser.add_argument("--trials", type=int, default=6, help="trials per campaign (6, max 21)")
    args = parser.parse_args()
    if not 1 <= args.trials <= 21 or args.campaigns < 1:
        parser.error("--campaigns must be >= 1 and --trials between 1 and 21")
    # Not under /tmp/pytest-*: the server runs as another user (see tests/conftest.py).
    with (
        tempfile.TemporaryDirectory(prefix="skylab-bench-") as tmp,
        embedded_postgres(Path(tmp) / "postgres") as url,
    ):
        asyncio.run(measure(args.campaigns, args.trials, Path(tmp) / "work", url))


if __name__ == "__main__":
    main()
