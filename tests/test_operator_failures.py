"""The operator when things go wrong: failing Jobs, limits, suspend, deletion, bad input,
and the operator itself killed between any two steps of a trial.

The tests play the Job controller and the kubelet (tests/kubelet.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from threading import Event
from typing import Any

import pytest

from emulator import KubeEmulator
from kubelet import (  # noqa: F401  # the settings fixture registers under its own name
    CAMPAIGNS,
    JOBS,
    NAMESPACE,
    SLOW,
    TRIALS,
    Killed,
    Outcome,
    active_jobs,
    condition,
    crash,
    deadline_exceeded,
    evicted,
    kubelet,
    mortal,
    oom_killed,
    phase_is,
    preempted,
    raw_report,
    rows,
    running_operator,
    settings_fixture,
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
    stored,
)
from skylab.controller.main import Operator
from skylab.controller.settings import OperatorSettings
from skylab.store import Store

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(900)]


async def test_crashed_oomkilled_and_timed_out_jobs_are_recorded_and_the_campaign_goes_on(
    kube: KubeEmulator, settings: OperatorSettings, database_url: str
) -> None:
    outcomes = {
        1: success(1.0),
        2: crash(),
        3: oom_killed(),
        4: deadline_exceeded(),
        5: raw_report('{"status": "success", "metric": '),  # truncated: malformed
        6: success(0.9),
    }
    campaign = sweep_campaign("fail", budget={"maxTrials": 6, "maxFailedTrials": 5})
    async with running_operator(kube, settings), kubelet(kube, outcomes.__getitem__):
        await create(kube, CAMPAIGNS, campaign)
        await eventually(lambda: phase_is(kube, "fail", "Succeeded"), timeout=SLOW)
    got = [
        (s["phase"], s["reason"], s["decision"])
        for s in (status(kube, TRIALS, f"fail-{n:04d}") for n in range(1, 7))
    ]
    assert got == [
        ("Succeeded", "Completed", "Kept"),
        ("Failed", "Crashed", "Reverted"),
        ("Failed", "OOMKilled", "Reverted"),
        ("TimedOut", "TimedOut", "Reverted"),
        ("Failed", "MalformedReport", "Reverted"),
        ("Succeeded", "Completed", "Kept"),
    ]
    assert "out of memory" in status(kube, TRIALS, "fail-0003")["message"]
    assert [r[1] for r in rows(database_url, "fail")] == [
        "success",
        "crash",
        "crash",
        "timeout",
        "crash",
        "success",
    ]


@pytest.mark.parametrize(
    ("budget", "failures"),
    [
        ({"maxFailedTrials": 3}, 3),  # the Campaign's word wins
        ({}, 2),  # unset: the experiment's max_consecutive_failures
    ],
    ids=["campaign", "experiment"],
)
async def test_max_failed_trials_stops_the_campaign(
    kube: KubeEmulator, settings: OperatorSettings, budget: dict[str, int], failures: int
) -> None:
    def script(number: int) -> Outcome:
        return success(1.0) if number == 1 else crash()

    campaign = sweep_campaign("stop", budget=budget)
    async with running_operator(kube, settings), kubelet(kube, script):
        await create(kube, CAMPAIGNS, campaign)
        await eventually(lambda: phase_is(kube, "stop", "Failed"), timeout=SLOW)
    assert names(kube, TRIALS, NAMESPACE) == [f"stop-{n:04d}" for n in range(1, failures + 2)]
    failed = condition(kube, "stop", "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "ConsecutiveFailures")
    assert f"limit {failures}" in failed["message"]


async def test_suspend_stops_new_trials_and_resume_goes_on(
    kube: KubeEmulator, settings: OperatorSettings
) -> None:
    campaign = sweep_campaign("pause", suspend=True, budget={"maxTrials": 2})
    async with running_operator(kube, settings), kubelet(kube, lambda n: success(1.0 - n / 10)):
        await create(kube, CAMPAIGNS, campaign)
        await eventually(lambda: phase_is(kube, "pause", "Suspended"), timeout=SLOW)
        assert names(kube, TRIALS, NAMESPACE) == []
        path = f"/apis/skylab.dev/v1alpha1/namespaces/{NAMESPACE}/campaigns/pause"
        patch = {"spec": {"suspend": False}}
        headers = {"Content-Type": "application/merge-patch+json"}
        async with kube.patch(path, json=patch, headers=headers) as response:
            assert response.status == 200
        await eventually(lambda: phase_is(kube, "pause", "Succeeded"), timeout=SLOW)
    assert names(kube, TRIALS, NAMESPACE) == ["pause-0001", "pause-0002"]


async def test_deleting_a_campaign_deletes_its_trials_and_jobs_and_marks_it(
    kube: KubeEmulator, settings: OperatorSettings, database_url: str
) -> None:
    def script(number: int) -> Outcome | None:
        return success(1.0) if number == 1 else None

    async with running_operator(kube, settings), kubelet(kube, script):
        await create(kube, CAMPAIGNS, sweep_campaign("gone", parallelism=2))
        await eventually(lambda: len(active_jobs(kube)) == 2, timeout=SLOW)
        uid = stored(kube, CAMPAIGNS, NAMESPACE, "gone")["metadata"]["uid"]  # type: ignore[index]
        path = f"/apis/skylab.dev/v1alpha1/namespaces/{NAMESPACE}/campaigns/gone"
        async with kube.delete(path) as response:
            assert response.status == 200
        await eventually(lambda: stored(kube, CAMPAIGNS, NAMESPACE, "gone") is None, timeout=SLOW)
        await eventually(lambda: not names(kube, TRIALS) and not names(kube, JOBS), timeout=SLOW)
    with Store.connect(database_url) as store:
        assert store.get_campaign(f"{NAMESPACE}/gone") is None  # the name is free again
        record = store.get_campaign(f"{NAMESPACE}/gone@{uid[:8]}")
        assert record is not None and record.status == "stopped"
        assert {t.status for t in store.trials(record.id)} == {"success", "killed"}
    assert not (settings.workspace_root / NAMESPACE / "gone.git").exists()


@pytest.mark.parametrize(
    ("experiment", "sweep", "reason", "words"),
    [
        ({"bundled": "nope"}, None, "ExperimentNotFound", "no bundled experiment 'nope'"),
        (
            {"git": {"url": "/nonexistent/repo.git", "ref": "main"}},
            None,
            "ExperimentUnavailable",
            "cannot fetch /nonexistent/repo.git@main",
        ),
        (
            {"bundled": "toy"},
            {"parameters": {"NOT_THERE": {"values": [1, 2]}}},
            "InvalidStrategy",
            "NOT_THERE",
        ),
    ],
)
async def test_what_the_schema_cannot_catch_fails_the_campaign_with_a_reason(
    kube: KubeEmulator,
    settings: OperatorSettings,
    database_url: str,
    experiment: dict[str, Any],
    sweep: dict[str, Any] | None,
    reason: str,
    words: str,
) -> None:
    campaign = sweep_campaign("bad")
    campaign["spec"]["experiment"] = experiment
    if sweep is not None:
        campaign["spec"]["strategy"]["sweep"] = sweep
    async with running_operator(kube, settings):
        await create(kube, CAMPAIGNS, campaign)
        await eventually(lambda: phase_is(kube, "bad", "Failed"), timeout=SLOW)
    failed = condition(kube, "bad", "Failed")
    assert failed["reason"] == reason
    assert words in failed["message"] and "\n" not in failed["message"]
    assert names(kube, TRIALS) == [] and names(kube, JOBS) == []
    with Store.connect(database_url) as store:
        assert store.get_campaign(f"{NAMESPACE}/bad") is None
    assert not (settings.workspace_root / NAMESPACE / "bad.git").exists()


async def test_a_range_the_api_server_let_in_fails_the_campaign_once_naming_the_field(
    kube: KubeEmulator, settings: OperatorSettings
) -> None:
    # A cluster without CEL (or a CRD older than the rule) lets [high, low] in.
    campaign = sweep_campaign("badrange")
    campaign["spec"]["strategy"]["sweep"] = {"parameters": {"LR": {"range": [0.5, 0.1]}}}
    async with running_operator(kube, settings) as (operator, _):
        await create(kube, CAMPAIGNS, campaign)
        await eventually(lambda: phase_is(kube, "badrange", "Failed"), timeout=SLOW)
        await asyncio.sleep(settings.resync_seconds + 1)  # the timer looks at it again
        errors = operator.metrics.render().decode()
    failed = condition(kube, "badrange", "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert failed["message"] == (
        "spec.strategy.sweep.parameters.LR: range: must be [low, high] with low < high"
    )
    events = [stored(kube, "v1/events", NAMESPACE, name) or {} for name in names(kube, "v1/events")]
    said = [e for e in events if e["involvedObject"]["name"] == "badrange"]
    assert [e["reason"] for e in said] == ["InvalidSpec"]  # once, and no retries
    assert "skylab_handler_errors_total{" not in errors
    assert names(kube, TRIALS) == [] and names(kube, JOBS) == []


async def test_a_missing_api_key_secret_fails_the_campaign(
    kube: KubeEmulator, settings: OperatorSettings
) -> None:
    campaign = sweep_campaign("nokey")
    campaign["spec"]["strategy"] = {
        "type": "llm",
        "llm": {"apiKeySecret": {"name": "anthropic", "key": "api-key"}},
    }
    async with running_operator(kube, settings):
        await create(kube, CAMPAIGNS, campaign)
        await eventually(lambda: phase_is(kube, "nokey", "Failed"), timeout=SLOW)
    failed = condition(kube, "nokey", "Failed")
    assert failed["reason"] == "SecretNotFound" and "'anthropic'" in failed["message"]


# Where a trial's life can be cut: (KubeApi method, whether it completes, which call).
BOUNDARIES: dict[str, tuple[str, bool, Callable[..., bool]]] = {
    "trial-created": ("create", True, lambda manifest: manifest["kind"] == "Trial"),
    "job-created": ("create", True, lambda manifest: manifest["kind"] == "Job"),
    "trial-running": (
        "patch_trial_status",
        True,
        lambda namespace, name, status: status.get("phase") == "Running",
    ),
    "outcome-recorded": (  # in PostgreSQL, not yet on the Trial
        "patch_trial_status",
        False,
        lambda namespace, name, status: "decision" in status,
    ),
    "trial-decided": (  # on the Trial, the next one not yet created
        "patch_trial_status",
        True,
        lambda namespace, name, status: "decision" in status,
    ),
}


@pytest.mark.parametrize("max_preemptions", [3, 1])
async def test_a_preempted_or_evicted_run_is_run_again_not_counted_as_a_failure(
    kube: KubeEmulator, settings: OperatorSettings, database_url: str, max_preemptions: int
) -> None:
    # Trial 2's first Job is preempted, its second evicted, its third succeeds.
    def by_run(number: int, run: int) -> Outcome:
        if number == 2 and run == 1:
            return preempted()
        if number == 2 and run == 2:
            return evicted()
        return success(1.0 - number / 100)

    template = {"maxPreemptions": max_preemptions}
    campaign = sweep_campaign("evict", budget={"maxTrials": 3}, trialTemplate=template)
    async with running_operator(kube, settings), kubelet(kube, run_script=by_run):
        await create(kube, CAMPAIGNS, campaign)
        await eventually(lambda: phase_is(kube, "evict", "Succeeded"), timeout=SLOW)
    second = status(kube, TRIALS, "evict-0002")
    with Store.connect(database_url) as store:
        record = store.get_campaign(f"{NAMESPACE}/evict")
        assert record is not None
        trial = store.get_trial(record.id, 2)
        assert trial is not None
    runs = [(run.number, run.status, run.seed) for run in trial.runs]
    events = [stored(kube, "v1/events", NAMESPACE, e) or {} for e in names(kube, "v1/events")]
    notices = [e["message"] for e in events if e.get("reason") == "Preempted"]
    if max_preemptions == 3:
        # Each lost run is run again with the same seed; the third attempt decides it.
        assert runs == [(1, "killed", 42), (2, "killed", 42), (3, "success", 42)]
        assert (second["decision"], second["runs"], second["preemptions"]) == ("Kept", 1, 2)
        assert "evict-0002-r3" in names(kube, JOBS, NAMESPACE)
        assert len(notices) == 2 and "PreemptionByScheduler" in notices[0]
        assert "attempt 3 starts" in notices[1]
    else:
        # One preemption is run again; the eviction after it is a failure.
        assert runs == [(1, "killed", 42), (2, "crash", 42)]
        assert (second["phase"], second["reason"], second["preemptions"]) == (
            "Failed",
            "Evicted",
            1,
        )
        assert len(notices) == 1
    assert rows(database_url, "evict")[2][1] == "success"  # the campaign went on


def kill_at(operator: Operator, thread: OperatorThread, boundary: str, trial: str) -> Event:
    """Make OPERATOR die at BOUNDARY of TRIAL: every later call it makes fails."""
    target, completes, matches = BOUNDARIES[boundary]
    dead = mortal(operator, thread)
    api = operator.campaigns.api
    original = getattr(api, target)

    def call(*args: Any) -> Any:
        hit = matches(*args) and trial in json.dumps(args)
        if hit and not completes:
            dead.set()
            raise Killed(target)
        result = original(*args)
        if hit:
            dead.set()
            raise Killed(target)
        return result

    setattr(api, target, call)
    return dead


@pytest.mark.parametrize("boundary", list(BOUNDARIES))
async def test_an_operator_killed_at_a_phase_boundary_loses_and_duplicates_nothing(
    kube: KubeEmulator, settings: OperatorSettings, database_url: str, boundary: str
) -> None:
    metrics = {1: 1.0, 2: 0.9, 3: 0.95}
    dead = Event()

    def script(number: int) -> Outcome | None:
        if number == 2 and boundary == "trial-running" and not dead.is_set():
            return None  # runs until the operator has seen it running
        return success(metrics[number])

    campaign = sweep_campaign("crash", budget={"maxTrials": 3})
    async with kubelet(kube, script):
        async with running_operator(kube, settings) as (operator, thread):
            dead = kill_at(operator, thread, boundary, "crash-0002")
            await create(kube, CAMPAIGNS, campaign)
            await eventually(dead.is_set, timeout=SLOW)
        async with running_operator(kube, settings):
            await eventually(lambda: phase_is(kube, "crash", "Succeeded"), timeout=SLOW)

    expected = [f"crash-{n:04d}" for n in (1, 2, 3)]
    assert names(kube, TRIALS, NAMESPACE) == expected
    assert names(kube, JOBS, NAMESPACE) == expected
    assert [status(kube, TRIALS, t)["decision"] for t in expected] == ["Kept", "Kept", "Reverted"]
    assert rows(database_url, "crash") == [
        (1, "success", True, 1.0),
        (2, "success", True, 0.9),
        (3, "success", False, 0.95),
    ]
    assert status(kube, CAMPAIGNS, "crash")["counts"]["total"] == 3
