"""Noise-aware decisions in the operator: a Job per run, seeds, confirmation runs, a restart
in the middle of them, and a run pruned by its loss curve.

The tests play the Job controller and the kubelet (tests/kubelet.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from emulator import KubeEmulator
from kubelet import (
    CAMPAIGNS,
    GOOD,
    GRID,
    HOPELESS,
    JOBS,
    NAMESPACE,
    SLIGHTLY_DIFFERENT,
    SLOW,
    TRIALS,
    Killed,
    LossCurves,
    Outcome,
    kubelet,
    mortal,
    operator_settings,
    phase_is,
    running_operator,
    status,
    success,
    sweep_campaign,
)
from operator_harness import (  # noqa: F401  # fixtures register under their own names
    create,
    eventually,
    kmock_options_fixture,
    kube_fixture,
    names,
    operator_rbac_fixture,
    stored,
)
from skylab.controller.settings import OperatorSettings
from skylab.store import Store
from toy_experiment import write_toy_experiment

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(900)]

AWARE = """
[decision]
noise = "aware"
baseline_runs = 3
confirm_runs = 2
first_seed = 42
prune = true
"""
# Trial 1 (baseline) ~1.00; trial 2 does not beat it on its first run; trial 3 does, by
# far more than the noise, on all three. Before trial 3's third run the baseline, then
# the best, is measured a fourth time (twice the runs of the trial it is compared with).
METRICS = {
    (1, 1): 1.00,
    (1, 2): 1.01,
    (1, 3): 0.99,
    (1, 4): 1.00,
    (2, 1): 1.02,
    (3, 1): 0.95,
    (3, 2): 0.96,
    (3, 3): 0.94,
}


@pytest.fixture(name="settings")
def aware_settings(tmp_path: Path, database_url: str) -> OperatorSettings:
    experiments = tmp_path / "experiments"
    write_toy_experiment(experiments / "toy", GRID, decision=AWARE)
    return operator_settings(tmp_path, database_url, experiments)


def by_run(number: int, run: int) -> Outcome | None:
    return success(METRICS[number, run])


def runs(database_url: str, campaign: str) -> dict[int, list[tuple[int, int | None, str]]]:
    """Each trial's runs in PostgreSQL: (number, seed, status)."""
    with Store.connect(database_url) as store:
        record = store.get_campaign(f"{NAMESPACE}/{campaign}")
        assert record is not None
        return {
            t.number: [(r.number, r.seed, r.status) for r in t.runs]
            for t in store.trials(record.id)
        }


def seed_of(kube: KubeEmulator, job: str) -> str:
    body = stored(kube, JOBS, NAMESPACE, job)
    assert body is not None, job
    [container] = body["spec"]["template"]["spec"]["containers"]
    return next(e["value"] for e in container["env"] if e["name"] == "SKYLAB_SEED")


def expected_jobs(name: str) -> list[str]:
    return [
        f"{name}-0001",
        f"{name}-0001-r2",
        f"{name}-0001-r3",
        f"{name}-0001-r4",
        f"{name}-0002",
        f"{name}-0003",
        f"{name}-0003-r2",
        f"{name}-0003-r3",
    ]


def check_the_campaign(kube: KubeEmulator, database_url: str, name: str) -> None:
    assert sorted(names(kube, JOBS, NAMESPACE)) == sorted(expected_jobs(name))
    assert runs(database_url, name) == {
        1: [(1, 42, "success"), (2, 43, "success"), (3, 44, "success"), (4, 45, "success")],
        2: [(1, 42, "success")],
        3: [(1, 42, "success"), (2, 43, "success"), (3, 44, "success")],
    }
    baseline, reverted, kept = (status(kube, TRIALS, f"{name}-{n:04d}") for n in (1, 2, 3))
    assert (baseline["decision"], baseline["runs"]) == ("Kept", 4)
    assert baseline["metric"] == pytest.approx(1.0)
    assert baseline["metricSd"] == pytest.approx(0.00816497)
    assert (reverted["decision"], reverted["runs"], reverted["metric"]) == ("Reverted", 1, 1.02)
    assert "without confirmation" in reverted["message"]
    assert (kept["decision"], kept["runs"]) == ("Kept", 3)
    assert kept["metric"] == pytest.approx(0.95)
    assert "kept: 0.950000 ± 0.010000 (n=3) against the best's 1.000000" in kept["message"]
    assert "(n=4)" in kept["message"]
    best = status(kube, CAMPAIGNS, name)["best"]
    assert best["trial"] == f"{name}-0003" and best["value"] == pytest.approx(0.95)


async def test_runs_are_jobs_with_their_seeds_and_a_keep_needs_its_confirmations(
    kube: KubeEmulator, settings: OperatorSettings, database_url: str
) -> None:
    campaign = sweep_campaign("noisy", budget={"maxTrials": 3})
    async with (
        running_operator(kube, settings) as (operator, _),
        kubelet(kube, run_script=by_run),
    ):
        await create(kube, CAMPAIGNS, campaign)
        await eventually(lambda: phase_is(kube, "noisy", "Succeeded"), timeout=SLOW)
        metrics = operator.metrics.render().decode()
    check_the_campaign(kube, database_url, "noisy")
    # Each trial's time, counted once, when its verdict is recorded.
    assert 'skylab_trial_duration_seconds_count{status="success"} 3.0' in metrics
    assert [seed_of(kube, f"noisy-0003{suffix}") for suffix in ("", "-r2", "-r3")] == [
        "42",
        "43",
        "44",
    ]


@pytest.mark.parametrize("completes", [True, False], ids=["after", "before"])
@pytest.mark.parametrize("job", ["0003-r2", "0001-r4"], ids=["confirmation", "best-again"])
async def test_an_operator_killed_creating_a_confirmation_run_loses_and_repeats_nothing(
    kube: KubeEmulator, settings: OperatorSettings, database_url: str, completes: bool, job: str
) -> None:
    """Killed as it creates trial 3's second run's Job, or the baseline's fourth (the best
    measured again), just before or just after: the restarted operator creates that Job
    once and runs no finished run again."""
    campaign = sweep_campaign("mid", budget={"maxTrials": 3})
    async with kubelet(kube, run_script=by_run):
        async with running_operator(kube, settings) as (operator, thread):
            dead = mortal(operator, thread)
            api = operator.campaigns.api
            create_object = api.create

            def create_and_die(manifest: dict[str, Any]) -> Any:
                hit = manifest["kind"] == "Job" and manifest["metadata"]["name"] == f"mid-{job}"
                if hit and not completes:
                    dead.set()
                    raise Killed("create")
                created = create_object(manifest)
                if hit:
                    dead.set()
                    raise Killed("create")
                return created

            api.create = create_and_die  # type: ignore[method-assign]
            await create(kube, CAMPAIGNS, campaign)
            await eventually(dead.is_set, timeout=SLOW)
        assert (f"mid-{job}" in names(kube, JOBS, NAMESPACE)) is completes
        async with running_operator(kube, settings):
            await eventually(lambda: phase_is(kube, "mid", "Succeeded"), timeout=SLOW)
    check_the_campaign(kube, database_url, "mid")


async def test_a_run_whose_loss_cannot_catch_up_is_pruned_and_its_job_deleted(
    kube: KubeEmulator, settings: OperatorSettings, database_url: str
) -> None:
    curves = LossCurves(database_url, "prune")

    def script(number: int, run: int) -> Outcome | None:
        if number == 2 or not curves.followed(number, run):
            return None  # it trains until its curve is read, or the operator stops it
        return success(METRICS[number, run])

    campaign = sweep_campaign("prune", budget={"maxTrials": 2})
    async with running_operator(kube, settings), kubelet(kube, run_script=script) as player:
        player.logs = curves.logs({1: [GOOD, SLIGHTLY_DIFFERENT, GOOD], 2: [HOPELESS]})
        await create(kube, CAMPAIGNS, campaign)
        await eventually(lambda: phase_is(kube, "prune", "Succeeded"), timeout=SLOW)
    curves.close()
    trial = status(kube, TRIALS, "prune-0002")
    assert (trial["phase"], trial["decision"]) == ("Pruned", "Reverted")
    assert "of the budget is above the best's" in trial["message"]
    job = kube.objects[kube.resource(JOBS), NAMESPACE, "prune-0002"]
    assert job.deleted, "the pruned run's Job is deleted"
    assert runs(database_url, "prune")[2] == [(1, 42, "pruned")]
    events = [stored(kube, "v1/events", NAMESPACE, e) or {} for e in names(kube, "v1/events")]
    assert any(e["reason"] == "Pruned" for e in events)
