"""The engine's decisions, table-driven, in both directions."""

from __future__ import annotations

import math

import pytest

from skylab.engine import (
    Limits,
    Objective,
    Outcome,
    Propose,
    StartBaseline,
    Stop,
    StopReason,
    TrialView,
    best_kept,
    decide,
    next_action,
    plan,
)

MIN = Objective("minimize")
MAX = Objective("maximize")


@pytest.mark.parametrize(
    ("objective", "outcome", "best", "baseline", "kept"),
    [
        # minimize: lower is better
        (MIN, Outcome("success", 0.99), 1.00, False, True),
        (MIN, Outcome("success", 1.00), 1.00, False, False),  # a tie is not an improvement
        (MIN, Outcome("success", 1.01), 1.00, False, False),
        # maximize: higher is better
        (MAX, Outcome("success", 0.51), 0.50, False, True),
        (MAX, Outcome("success", 0.50), 0.50, False, False),
        (MAX, Outcome("success", 0.49), 0.50, False, False),
        # min_improvement is a margin the new value must clear
        (Objective("minimize", 0.01), Outcome("success", 0.995), 1.00, False, False),
        (Objective("minimize", 0.01), Outcome("success", 0.989), 1.00, False, True),
        (Objective("maximize", 0.01), Outcome("success", 0.505), 0.50, False, False),
        (Objective("maximize", 0.01), Outcome("success", 0.511), 0.50, False, True),
        # failures are never kept, even with a great metric
        (MIN, Outcome("crash", 0.10), 1.00, False, False),
        (MIN, Outcome("timeout", 0.10), 1.00, False, False),
        (MIN, Outcome("killed", 0.10), 1.00, False, False),
        (MIN, Outcome("crash", None), None, True, False),
        # no metric, or a non-finite one
        (MIN, Outcome("success", None), 1.00, False, False),
        (MIN, Outcome("success", math.nan), 1.00, False, False),
        (MIN, Outcome("success", -math.inf), 1.00, False, False),
        # the baseline is kept whatever its value, if it succeeded
        (MIN, Outcome("success", 5.0), None, True, True),
        (MAX, Outcome("success", 0.0), None, True, True),
        # a VRAM cap reverts an otherwise better trial
        (
            Objective("minimize", max_vram_mb=1000),
            Outcome("success", 0.5, 2000.0),
            1.0,
            False,
            False,
        ),
        (Objective("minimize", max_vram_mb=1000), Outcome("success", 0.5, 900.0), 1.0, False, True),
    ],
)
def test_decide(
    objective: Objective, outcome: Outcome, best: float | None, baseline: bool, kept: bool
) -> None:
    decision = decide(objective, outcome, best, baseline)
    assert decision.kept is kept
    assert decision.reason


def _trial(
    number: int,
    status: str,
    metric: float | None = None,
    kept: bool | None = None,
    baseline: bool = False,
) -> TrialView:
    return TrialView(number, status, baseline, f"c{number}", metric, kept)


def test_baseline_first() -> None:
    assert next_action([], Limits(), MIN, 0.0) == StartBaseline(number=1)


def test_baseline_is_redone_after_it_was_killed() -> None:
    trials = [_trial(1, "killed", baseline=True, kept=False)]
    assert next_action(trials, Limits(), MIN, 0.0) == StartBaseline(number=2)


def test_failed_baseline_stops_the_campaign() -> None:
    trials = [_trial(1, "crash", baseline=True, kept=False)]
    action = next_action(trials, Limits(), MIN, 0.0)
    assert isinstance(action, Stop)
    assert action.reason is StopReason.BASELINE_FAILED
    assert "crash" in action.message


@pytest.mark.parametrize(
    ("objective", "metrics", "kept", "parent"),
    [
        (MIN, [1.0, 0.9, 0.95], [True, True, False], "c2"),
        (MAX, [1.0, 0.9, 1.2], [True, False, True], "c3"),
        (MIN, [1.0, 1.1], [True, False], "c1"),
    ],
)
def test_proposals_branch_from_the_best_kept_trial(
    objective: Objective, metrics: list[float], kept: list[bool], parent: str
) -> None:
    trials = [
        _trial(i + 1, "success", m, k, baseline=i == 0)
        for i, (m, k) in enumerate(zip(metrics, kept, strict=True))
    ]
    action = next_action(trials, Limits(), objective, 0.0)
    assert action == Propose(parent_commit=parent, number=len(trials) + 1)
    best = best_kept(trials, objective)
    assert best is not None and best.commit == parent


def _baseline_then(*statuses: str) -> list[TrialView]:
    trials = [_trial(1, "success", 1.0, True, baseline=True)]
    for i, status in enumerate(statuses, start=2):
        trials.append(_trial(i, status, 1.1 if status == "success" else None, False))
    return trials


@pytest.mark.parametrize(
    ("trials", "limits", "elapsed", "exhausted", "reason"),
    [
        (
            _baseline_then("success", "success"),
            Limits(max_trials=3),
            0.0,
            None,
            StopReason.MAX_TRIALS,
        ),
        (_baseline_then(), Limits(budget_seconds=60), 60.0, None, StopReason.BUDGET_SPENT),
        (
            _baseline_then("crash", "timeout", "crash"),
            Limits(max_consecutive_failures=3),
            0.0,
            None,
            StopReason.CONSECUTIVE_FAILURES,
        ),
        (
            # A skipped proposal makes no progress: it extends a failure streak.
            _baseline_then("crash", "skipped", "skipped"),
            Limits(max_consecutive_failures=3),
            0.0,
            None,
            StopReason.CONSECUTIVE_FAILURES,
        ),
        (_baseline_then(), Limits(), 0.0, "nothing left", StopReason.STRATEGY_EXHAUSTED),
    ],
)
def test_stop_reasons(
    trials: list[TrialView],
    limits: Limits,
    elapsed: float,
    exhausted: str | None,
    reason: StopReason,
) -> None:
    action = next_action(trials, limits, MIN, elapsed, exhausted)
    assert isinstance(action, Stop)
    assert action.reason is reason
    assert action.message
    if exhausted is not None:
        assert action.message == exhausted


def test_a_success_ends_a_streak_of_skipped_proposals() -> None:
    trials = _baseline_then("skipped", "skipped", "success", "skipped")
    action = next_action(trials, Limits(max_consecutive_failures=2), MIN, 0.0)
    assert isinstance(action, Propose)


@pytest.mark.parametrize(
    ("trials", "limits", "elapsed"),
    [
        # killed trials were interrupted: they count toward neither limit
        (_baseline_then("success", "killed"), Limits(max_trials=3), 0.0),
        # a success breaks a failure streak
        (
            _baseline_then("crash", "crash", "success", "crash"),
            Limits(max_consecutive_failures=3),
            0.0,
        ),
        (_baseline_then("crash", "crash"), Limits(max_consecutive_failures=3), 0.0),
        (_baseline_then(), Limits(budget_seconds=60), 59.9),
    ],
)
def test_goes_on_below_the_limits(trials: list[TrialView], limits: Limits, elapsed: float) -> None:
    action = next_action(trials, limits, MIN, elapsed)
    assert isinstance(action, Propose)
    assert action.number == trials[-1].number + 1
    assert action.parent_commit == "c1"


# Several trials at once (the operator's parallelism)


def test_plan_fills_the_free_slots_from_the_best_kept_trial() -> None:
    trials = [*_baseline_then("success"), _trial(3, "running")]
    actions = plan(trials, Limits(), MIN, 0.0, parallelism=3)
    assert actions == [Propose("c1", 4), Propose("c1", 5)]


def test_plan_runs_the_baseline_alone() -> None:
    assert plan([], Limits(), MIN, 0.0, parallelism=4) == [StartBaseline(1)]
    running = [_trial(1, "running", baseline=True)]
    assert plan(running, Limits(), MIN, 0.0, parallelism=4) == []


def test_plan_counts_running_trials_toward_max_trials() -> None:
    trials = [*_baseline_then("success"), _trial(3, "running")]
    assert plan(trials, Limits(max_trials=4), MIN, 0.0, parallelism=3) == [Propose("c1", 4)]
    # the limit is reached: wait for the running trial, then stop
    assert plan(trials, Limits(max_trials=3), MIN, 0.0, parallelism=3) == []
    done = [*_baseline_then("success", "success")]
    stop = plan(done, Limits(max_trials=3), MIN, 0.0, parallelism=3)
    assert isinstance(stop, Stop) and stop.reason is StopReason.MAX_TRIALS


@pytest.mark.parametrize(
    ("limits", "elapsed", "exhausted"),
    [
        (Limits(budget_seconds=60), 61.0, None),
        (Limits(max_consecutive_failures=2), 0.0, None),
        (Limits(), 0.0, "nothing left"),
    ],
)
def test_plan_waits_for_running_trials_before_it_stops(
    limits: Limits, elapsed: float, exhausted: str | None
) -> None:
    trials = [*_baseline_then("crash", "crash"), _trial(4, "running")]
    assert plan(trials, limits, MIN, elapsed, parallelism=2, strategy_exhausted=exhausted) == []
    finished = [*trials[:-1], _trial(4, "crash")]
    stop = plan(finished, limits, MIN, elapsed, parallelism=2, strategy_exhausted=exhausted)
    assert isinstance(stop, Stop)
