"""The operator when PostgreSQL goes away in the middle of campaigns and comes back (it
goes on by itself, within seconds, and nothing is lost or run twice), and when the
operator itself is down for a minute (the budget does not run meanwhile).

PostgreSQL is reached through a proxy that drops every connection and refuses new
ones for the outage (tests/db_outage.py). The operator runs with its default retry,
database timeout and probe settings; the tests play the Job controller and the kubelet.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import pytest

from db_outage import database_proxy
from emulator import KubeEmulator
from kubelet import (  # noqa: F401  # the settings fixture registers under its own name
    CAMPAIGNS,
    GRID,
    JOBS,
    NAMESPACE,
    SLOW,
    TRIALS,
    Outcome,
    condition,
    kubelet,
    mortal,
    operator_settings,
    phase_is,
    rows,
    running_operator,
    settings_fixture,
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
)
from skylab.controller.main import Health
from skylab.controller.settings import OperatorSettings
from skylab.store import Store
from toy_experiment import write_toy_experiment

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(900)]

TRIALS_PER_CAMPAIGN = 6
# What the operator may take, after PostgreSQL is back, to create the next Job.
RECOVERY_SECONDS = 10.0


def defaults(settings: OperatorSettings) -> OperatorSettings:
    """The test settings, with the operator's own retry and database timeouts."""
    default = OperatorSettings(
        database_url="", workspace_root=Path(), git_url="", experiment_dirs=()
    )
    return dataclasses.replace(
        settings,
        retry_seconds=default.retry_seconds,
        database_timeout_seconds=default.database_timeout_seconds,
    )


@pytest.mark.parametrize("outage", [2.0, 30.0], ids=["2s", "30s"])
async def test_campaigns_go_on_by_themselves_after_postgresql_was_away(
    kube: KubeEmulator, tmp_path: Path, database_url: str, outage: float
) -> None:
    experiments = tmp_path / "experiments"
    write_toy_experiment(experiments / "toy", GRID)
    with database_proxy(database_url) as proxy:
        settings = defaults(operator_settings(tmp_path, proxy.url, experiments))
        budget = {"maxTrials": TRIALS_PER_CAMPAIGN}
        names_ = ("one", "two")
        async with (
            running_operator(kube, settings) as (operator, _),
            kubelet(kube, lambda number: success(1.0 - number / 100)),
        ):
            health = Health(operator.database, down_seconds=outage / 2)
            await health.started()
            routes = health.routes(operator.metrics)
            for name in names_:
                await create(kube, CAMPAIGNS, sweep_campaign(name, budget=budget))
            # In the middle of both: each has a trial whose Job ends while the database
            # is away, so its verdict and the next trial wait for it.
            await eventually(
                lambda: {"one-0003", "two-0003"} <= set(names(kube, JOBS, NAMESPACE)),
                timeout=SLOW,
            )
            proxy.cut()
            await asyncio.sleep(outage / 2 + 1)
            ready, live = (
                await asyncio.to_thread(routes["/readyz"]),
                await asyncio.to_thread(routes["/healthz"]),
            )
            assert ready[0] == 503 and b"database not answering" in ready[2]
            assert live[0] == 503 and b"database unreachable for" in live[2]
            jobs_before = set(names(kube, JOBS, NAMESPACE))
            await asyncio.sleep(outage / 2 - 1)
            proxy.restore()
            back = time.monotonic()
            await eventually(lambda: set(names(kube, JOBS, NAMESPACE)) - jobs_before, timeout=SLOW)
            recovered = time.monotonic() - back
            for name in names_:
                await eventually(lambda n=name: phase_is(kube, n, "Succeeded"), timeout=SLOW)
            ready = await asyncio.to_thread(routes["/readyz"])
            assert ready[0] == 200 and (await asyncio.to_thread(routes["/healthz"]))[0] == 200
    assert recovered <= RECOVERY_SECONDS, f"the next Job came {recovered:.1f} s after"
    for name in names_:
        expected = [f"{name}-{n:04d}" for n in range(1, TRIALS_PER_CAMPAIGN + 1)]
        assert sorted(j for j in names(kube, JOBS, NAMESPACE) if j.startswith(name)) == expected
        recorded = rows(database_url, name)
        assert [number for number, *_ in recorded] == list(range(1, TRIALS_PER_CAMPAIGN + 1))
        assert all(state == "success" for _, state, _, _ in recorded)
        trials = [status(kube, TRIALS, job) for job in expected]
        assert all(t.get("decision") and t.get("runs") == 1 for t in trials)


async def test_time_while_the_operator_was_down_spends_no_budget(
    kube: KubeEmulator, settings: OperatorSettings, database_url: str
) -> None:
    released = asyncio.Event()

    def script(number: int) -> Outcome | None:
        if number == 2 and not released.is_set():
            return None  # trial 2 trains until the operator is gone
        return success(1.0 - number / 100)

    # 45 s of budget: with the minute of downtime spent, it would end at once on restart.
    campaign = sweep_campaign("down", budget={"maxTrials": 4, "wallClock": "45s"})
    started = time.monotonic()
    async with kubelet(kube, script):
        async with running_operator(kube, settings) as (operator, thread):
            dead = mortal(operator, thread)
            await create(kube, CAMPAIGNS, campaign)
            await eventually(
                lambda: status(kube, TRIALS, "down-0002").get("phase") == "Running", timeout=SLOW
            )
            dead.set()
        up = time.monotonic() - started
        await asyncio.sleep(60)
        released.set()  # its Job ends while no operator runs
        with Store.connect(database_url) as store:
            record = store.get_campaign(f"{NAMESPACE}/down")
            assert record is not None
            assert store.active_seconds(record.id) <= up + 1  # nothing of the minute
        async with running_operator(kube, settings):
            await eventually(lambda: phase_is(kube, "down", "Succeeded"), timeout=SLOW)
    complete = condition(kube, "down", "Complete")
    assert (complete["status"], complete["reason"]) == ("True", "MaxTrials"), complete
    assert [status(kube, TRIALS, f"down-{n:04d}").get("decision") for n in range(1, 5)] == [
        "Kept",
        "Kept",
        "Kept",
        "Kept",
    ]
    with Store.connect(database_url) as store:
        spent = store.active_seconds(record.id)
    assert spent < time.monotonic() - started - 55, spent
