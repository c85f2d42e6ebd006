"""The real `skylab operator`, in a process of its own, through faults: SIGKILLed at
random moments, and an API server that answers 500s and 409s for a while. Every campaign
must end as the same campaign does with no fault at all: the same trials, runs, seeds,
metrics, decisions and Jobs, none lost and none run twice.

The moments and the faults are drawn from a seed, printed with any failure; set
SKYLAB_FAULT_SEED to replay one. PostgreSQL outages and evicted runs have tests of their
own (test_operator_outages.py, test_operator_failures.py).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from emulator import KubeEmulator
from faults import ApiFaults
from kubelet import (
    CAMPAIGNS,
    GRID,
    JOBS,
    NAMESPACE,
    SLOW,
    TRIALS,
    Outcome,
    kubelet,
    operator_settings,
    phase_is,
    rows,
    status,
    success,
    sweep_campaign,
)
from operator_harness import (  # noqa: F401  # fixtures register under their own names
    create,
    eventually,
    kmock_options_fixture,
    kube_fixture,
    kubeconfig_fixture,
    names,
)
from operator_process import operator_process
from skylab.controller.settings import OperatorSettings
from skylab.store import Store
from toy_experiment import write_toy_experiment

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(900)]

DECISION = """
[decision]
noise = "aware"
baseline_runs = 3
confirm_runs = 2
first_seed = 7
"""
# Each trial's true value: gains far above the runs' spread, so that the decisions, and
# with them every run the campaign asks for, are fixed. 2, 4 and 6 are kept.
VALUES = {1: 1.00, 2: 0.95, 3: 0.97, 4: 0.90, 5: 0.93, 6: 0.85}
SPREAD = 0.004
# How long each run trains: kills and faults land while runs go, not only between them.
RUN_SECONDS = 0.6
STORMS = ("storm-a", "storm-b")
KILLS = 6


def fault_seed() -> int:
    return int(os.environ.get("SKYLAB_FAULT_SEED") or random.SystemRandom().randrange(10**6))


@pytest.fixture(name="settings")
def aware_settings(tmp_path: Path, database_url: str) -> OperatorSettings:
    experiments = tmp_path / "experiments"
    write_toy_experiment(experiments / "toy", GRID, decision=DECISION)
    return operator_settings(tmp_path, database_url, experiments)


def timed_runs() -> Callable[[int, int], Outcome | None]:
    """The kubelet's script: each run trains RUN_SECONDS, then reports its trial's value,
    off by a fixed amount for each run number. (The kubelet asks by trial and run number:
    the campaigns' Jobs of one number share a clock, reset as one of them ends.)"""
    started: dict[tuple[int, int], float] = {}

    def script(number: int, run: int) -> Outcome | None:
        began = started.setdefault((number, run), time.monotonic())
        if time.monotonic() - began < RUN_SECONDS:
            return None
        del started[number, run]
        return success(VALUES[number] + SPREAD * (run % 3 - 1))

    return script


def campaign(name: str) -> dict[str, Any]:
    return sweep_campaign(name, budget={"maxTrials": len(VALUES)})


def outcome(kube: KubeEmulator, database_url: str, name: str) -> dict[str, Any]:
    """What campaign NAME did, in terms that do not name it."""
    prefix = f"{name}-"
    with Store.connect(database_url) as store:
        record = store.get_campaign(f"{NAMESPACE}/{name}")
        assert record is not None
        runs = {
            t.number: [(r.number, r.seed, r.status, r.metric) for r in t.runs]
            for t in store.trials(record.id)
        }
    trials = [t for t in names(kube, TRIALS, NAMESPACE) if t.startswith(prefix)]
    verdicts = {
        t.removeprefix(prefix): tuple(status(kube, TRIALS, t).get(k) for k in ("decision", "runs"))
        for t in trials
    }
    jobs = sorted(
        j.removeprefix(prefix) for j in names(kube, JOBS, NAMESPACE) if j.startswith(prefix)
    )
    return {
        "phase": status(kube, CAMPAIGNS, name).get("phase"),
        "rows": rows(database_url, name),
        "runs": runs,
        "verdicts": verdicts,
        "jobs": jobs,
    }


def done(kube: KubeEmulator, *campaigns: str) -> bool:
    return all(phase_is(kube, name, "Succeeded") for name in campaigns)


async def run_calm(
    kube: KubeEmulator, settings: OperatorSettings, kubeconfig: Path, log: Path
) -> dict[str, Any]:
    """The campaign with no fault: what every stormy one must match."""
    with operator_process("calm", settings, kubeconfig, log):
        await create(kube, CAMPAIGNS, campaign("calm"))
        await eventually(lambda: done(kube, "calm"), timeout=SLOW)
    calm = outcome(kube, settings.database_url, "calm")
    assert calm["verdicts"]["0006"] == ("Kept", 3), calm  # the script decides as intended
    return calm


async def test_an_operator_sigkilled_at_random_moments_loses_and_repeats_nothing(
    kube: KubeEmulator, kubeconfig: Path, settings: OperatorSettings, tmp_path: Path
) -> None:
    seed = fault_seed()
    moments = random.Random(seed)
    log = tmp_path / "operator.log"
    async with kubelet(kube, run_script=timed_runs()):
        calm = await run_calm(kube, settings, kubeconfig, log)
        for name in STORMS:
            await create(kube, CAMPAIGNS, campaign(name))
        kills = 0
        while kills < KILLS and not done(kube, *STORMS):
            with operator_process(f"operator-{kills}", settings, kubeconfig, log) as process:
                await asyncio.sleep(moments.uniform(1.0, 4.0))
                process.send_signal(signal.SIGKILL)
                process.wait(30)
            kills += 1
        with operator_process("last", settings, kubeconfig, log):
            await eventually(lambda: done(kube, *STORMS), timeout=SLOW)

    context = f"seed {seed}; log {log}"
    assert kills == KILLS, context  # every kill hit campaigns at work
    for name in STORMS:
        assert outcome(kube, settings.database_url, name) == calm, f"{name}, {context}"


async def test_an_api_server_answering_500_and_409_for_a_while_loses_and_repeats_nothing(
    kube: KubeEmulator, kubeconfig: Path, settings: OperatorSettings, tmp_path: Path
) -> None:
    seed = fault_seed()
    faults = ApiFaults(seed, rate=0.25)
    kube.faults = faults
    log = tmp_path / "operator.log"
    async with kubelet(kube, run_script=timed_runs()):
        calm = await run_calm(kube, settings, kubeconfig, log)
        with operator_process("operator", settings, kubeconfig, log) as process:
            faults.active = True
            for name in STORMS:
                await create(kube, CAMPAIGNS, campaign(name))
            await asyncio.sleep(10)
            faults.active = False
            jobs = len(names(kube, JOBS, NAMESPACE))
            calmed = time.monotonic()
            await eventually(
                lambda: len(names(kube, JOBS, NAMESPACE)) > jobs or done(kube, *STORMS),
                timeout=SLOW,
            )
            recovered = time.monotonic() - calmed
            await eventually(lambda: done(kube, *STORMS), timeout=SLOW)
            assert process.poll() is None, log.read_text()[-3000:]  # rode it out

    context = f"seed {seed}; injected {dict(faults.injected)}; log {log}"
    assert set(faults.injected) == {"500", "500 after the write", "409"}, context
    assert recovered <= 10, context
    for name in STORMS:
        assert outcome(kube, settings.database_url, name) == calm, f"{name}, {context}"
