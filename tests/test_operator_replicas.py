"""Two replicas of the real `skylab operator`, in processes of their own, peered through
kopf: the active one is SIGKILLed mid-trial and the standby finishes the campaign."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from chart import declare_chart_kinds
from emulator import KubeEmulator
from kubelet import (  # noqa: F401  # the settings fixture registers under its own name
    CAMPAIGNS,
    JOBS,
    NAMESPACE,
    SLOW,
    TRIALS,
    kubelet,
    phase_is,
    rows,
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
    kubeconfig_fixture,
    names,
    stored,
)
from operator_process import operator_process
from skylab.controller.settings import OperatorSettings
from skylab.store import Store

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(600)]
PEERINGS = "kopf.dev/v1/clusterkopfpeerings"
PEERING = "skylab"


def replica(
    name: str, priority: int, settings: OperatorSettings, kubeconfig: Path, logs: Path
) -> AbstractContextManager[subprocess.Popen[bytes]]:
    """A replica of the chart's peering, NAME at PRIORITY, logging to LOGS/NAME.log."""
    return operator_process(
        name, settings, kubeconfig, logs / f"{name}.log", peering=PEERING, priority=priority
    )


def peers(kube: KubeEmulator) -> dict[str, dict[str, object]]:
    """The replicas in the peering object, as kopf records them (by identity)."""
    body = stored(kube, PEERINGS, None, PEERING) or {}
    return dict(body.get("status") or {})


def runs(database_url: str, campaign: str) -> list[tuple[int, int]]:
    """Every run recorded: (trial number, run number)."""
    with Store.connect(database_url) as store:
        record = store.get_campaign(f"{NAMESPACE}/{campaign}")
        assert record is not None
        return [(t.number, r.number) for t in store.trials(record.id) for r in t.runs]


async def test_the_standby_takes_over_when_the_active_replica_is_killed_mid_trial(
    kube: KubeEmulator, kubeconfig: Path, settings: OperatorSettings, tmp_path: Path
) -> None:
    declare_chart_kinds(kube)  # the peering object's kind among them
    await create(kube, PEERINGS, {"metadata": {"name": PEERING}}, namespace=None)
    killed = asyncio.Event()

    def script(number: int) -> object:
        if number == 2 and not killed.is_set():
            return None  # trial 2 trains until the active replica is gone
        return success(1.0 - number / 10)

    with (
        replica("active", 200, settings, kubeconfig, tmp_path) as active,
        replica("standby", 100, settings, kubeconfig, tmp_path) as standby,
    ):
        await eventually(lambda: set(peers(kube)) == {"active", "standby"}, timeout=SLOW)
        async with kubelet(kube, script):  # type: ignore[arg-type]
            await create(kube, CAMPAIGNS, sweep_campaign("handover", budget={"maxTrials": 4}))
            await eventually(
                lambda: status(kube, TRIALS, "handover-0002").get("phase") == "Running",
                timeout=SLOW,
            )
            active.send_signal(signal.SIGKILL)
            active.wait(30)
            killed.set()  # trial 2's Job ends now, with no replica active to see it
            died = time.monotonic()
            await eventually(lambda: "handover-0003" in names(kube, JOBS, NAMESPACE), timeout=SLOW)
            taken_over = time.monotonic() - died
            await eventually(lambda: phase_is(kube, "handover", "Succeeded"), timeout=SLOW)
        assert standby.poll() is None, (tmp_path / "standby.log").read_text()[-3000:]

    # The standby took over within the peering record's lifetime and a margin.
    assert taken_over <= 15, taken_over
    trials = [f"handover-{n:04d}" for n in (1, 2, 3, 4)]
    assert names(kube, TRIALS, NAMESPACE) == trials  # no trial lost, none made twice
    assert names(kube, JOBS, NAMESPACE) == trials  # one Job each: none run twice
    assert runs(settings.database_url, "handover") == [(1, 1), (2, 1), (3, 1), (4, 1)]
    assert [row[:3] for row in rows(settings.database_url, "handover")] == [
        (n, "success", True) for n in (1, 2, 3, 4)
    ]
    assert [status(kube, TRIALS, t)["decision"] for t in trials] == ["Kept"] * 4
