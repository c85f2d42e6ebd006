"""The engine's decisions, table-driven, in both directions."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from skylab.engine import (
    CampaignLimits,
    CurvePoint,
    EndReason,
    NextRun,
    NoisePolicy,
    Objective,
    Propose,
    RunAgain,
    RunView,
    Spread,
    StartBaseline,
    Stop,
    TrialView,
    Verdict,
    best_kept,
    judge,
    next_action,
    plan,
    pooled_sigma,
    prune_reason,
)

MIN = Objective("minimize")
MAX = Objective("maximize")


OFF = NoisePolicy(aware=False)
SIGMA = Spread(0.01)  # a sigma taken as known: z is not widened
AWARE = NoisePolicy(prune=True)  # the defaults, pruning on


def _run(status: str, metric: float | None = None, vram: float | None = None) -> RunView:
    return RunView(1, status, metric, vram)


def _judged(trial_runs: list[RunView], best: float | None, **trial: object) -> TrialView:
    runs = tuple(replace(run, number=i) for i, run in enumerate(trial_runs, start=1))
    return TrialView(trial.get("number", 2), "running", best is None, "c", runs=runs)  # type: ignore[arg-type]


def _best(*values: float) -> TrialView:
    runs = tuple(RunView(i, "success", v) for i, v in enumerate(values, start=1))
    return TrialView(1, "success", True, "c1", sum(values) / len(values), True, runs)


# The single-run rule (noise = "off"): the old greedy decision, both directions.
@pytest.mark.parametrize(
    ("objective", "run", "best", "kept"),
    [
        # minimize: lower is better
        (MIN, _run("success", 0.99), 1.00, True),
        (MIN, _run("success", 1.00), 1.00, False),  # a tie is not an improvement
        (MIN, _run("success", 1.01), 1.00, False),
        # maximize: higher is better
        (MAX, _run("success", 0.51), 0.50, True),
        (MAX, _run("success", 0.50), 0.50, False),
        (MAX, _run("success", 0.49), 0.50, False),
        # min_improvement is a margin the new value must clear
        (Objective("minimize", 0.01), _run("success", 0.995), 1.00, False),
        (Objective("minimize", 0.01), _run("success", 0.989), 1.00, True),
        (Objective("maximize", 0.01), _run("success", 0.505), 0.50, False),
        (Objective("maximize", 0.01), _run("success", 0.511), 0.50, True),
        # failures are never kept, even with a great metric
        (MIN, _run("crash", 0.10), 1.00, False),
        (MIN, _run("timeout", 0.10), 1.00, False),
        (MIN, _run("pruned"), 1.00, False),
        (MIN, _run("crash"), None, False),
        # no metric, or a non-finite one
        (MIN, _run("success"), 1.00, False),
        (MIN, _run("success", math.nan), 1.00, False),
        (MIN, _run("success", -math.inf), 1.00, False),
        # the baseline is kept whatever its value, if it succeeded
        (MIN, _run("success", 5.0), None, True),
        (MAX, _run("success", 0.0), None, True),
        # a VRAM cap reverts an otherwise better trial
        (Objective("minimize", max_vram_mb=1000), _run("success", 0.5, 2000.0), 1.0, False),
        (Objective("minimize", max_vram_mb=1000), _run("success", 0.5, 900.0), 1.0, True),
    ],
)
def test_the_single_run_rule(
    objective: Objective, run: RunView, best: float | None, kept: bool
) -> None:
    verdict = judge(
        objective, OFF, _judged([run], best), None if best is None else _best(best), SIGMA
    )
    assert isinstance(verdict, Verdict)
    assert verdict.kept is kept
    assert verdict.reason
    assert verdict.status == run.status


def test_a_failed_run_is_the_trials_status() -> None:
    verdict = judge(
        MIN, AWARE, _judged([_run("success", 0.9), _run("timeout")], 1.0), _best(1.0), 0.01
    )
    assert verdict == Verdict(False, "run 2 timeout: never kept", "timeout")


def test_an_interrupted_run_is_run_again_and_not_counted() -> None:
    trial = _judged([_run("success", 0.9), _run("killed")], 1.0)
    assert isinstance(judge(MIN, AWARE, trial, _best(1.0, 1.0, 1.0), SIGMA), RunAgain)
    assert trial.counted_runs == trial.runs[:1]


@pytest.mark.parametrize(
    ("values", "judged"),
    [
        ([1.0], RunAgain),
        ([1.0, 1.01], RunAgain),
        ([1.0, 1.01, 0.99], Verdict),
    ],
)
def test_the_baseline_runs_baseline_runs_times(values: list[float], judged: type) -> None:
    trial = _judged([_run("success", v) for v in values], None)
    result = judge(MIN, AWARE, trial, None, SIGMA)
    assert isinstance(result, judged)
    if isinstance(result, Verdict):
        assert result.kept and "1.000000 ± 0.010000 (n=3)" in result.reason


# Noise-aware: sigma 0.01, the best's mean 1.0 over 3 runs, z = 2; at n = 3 against 3 the
# standard error is 0.01 * sqrt(2/3) = 0.008165: keep iff the gain is above 0.01633, revert
# iff it is below one standard error, run again in between.
Z2 = NoisePolicy(z=2.0)


@pytest.mark.parametrize(
    ("objective", "values", "best", "expected"),
    [
        # a first run that does not beat the best's mean is reverted at once, both ways
        (MIN, [1.001], (1.0, 1.0, 1.0), False),
        (MIN, [1.0], (1.0, 1.0, 1.0), False),
        (MAX, [0.999], (1.0, 1.0, 1.0), False),
        # a better first run is confirmed before anything is decided
        (MIN, [0.999], (1.0, 1.0, 1.0), RunAgain),
        (MIN, [0.95], (1.0, 1.0, 1.0), RunAgain),  # even a large gain: never one draw
        (MAX, [1.05], (1.0, 1.0, 1.0), RunAgain),
        (MIN, [0.95, 0.95], (1.0, 1.0, 1.0), RunAgain),  # nor two
        (MIN, [0.99, 1.0], (1.0, 1.0, 1.0), RunAgain),
        # n = 3: clear, within the noise, or unclear (run again)
        (MIN, [0.98, 0.985, 0.985], (1.0, 1.0, 1.0), True),  # gain 0.01667
        (MIN, [0.99, 0.98, 0.99], (1.0, 1.0, 1.0), RunAgain),  # gain 0.01333: unclear
        (MIN, [0.995, 0.99, 0.995], (1.0, 1.0, 1.0), False),  # gain 0.00667: within one se
        (MAX, [1.02, 1.015, 1.015], (1.0, 1.0, 1.0), True),
        (MAX, [1.01, 1.02, 1.01], (1.0, 1.0, 1.0), RunAgain),
        (MAX, [1.005, 1.01, 1.005], (1.0, 1.0, 1.0), False),
        # n = 5 against 3: the margin narrows to 2 * 0.01 * sqrt(1/5 + 1/3) = 0.01461
        (MIN, [0.99, 0.98, 0.99, 0.985, 0.98], (1.0, 1.0, 1.0), True),  # gain 0.015
        # the best is a mean, not its luckiest draw
        (MIN, [0.975, 0.975, 0.975], (0.95, 1.025, 1.025), True),
        # min_improvement is a second floor, and the first-run screen
        (Objective("minimize", 0.03), [0.98, 0.975, 0.975], (1.0, 1.0, 1.0), False),
        (Objective("minimize", 0.03), [0.96, 0.965, 0.965], (1.0, 1.0, 1.0), True),
        (Objective("minimize", 0.03), [0.975], (1.0, 1.0, 1.0), False),
    ],
)
def test_the_noise_aware_rule(
    objective: Objective, values: list[float], best: tuple[float, ...], expected: object
) -> None:
    trial = _judged([_run("success", v) for v in values], 1.0)
    result = judge(objective, Z2, trial, _best(*best), SIGMA)
    if expected is RunAgain:
        assert isinstance(result, RunAgain), result
        return
    assert isinstance(result, Verdict) and result.kept is expected, result
    if len(values) >= 3:
        assert "sigma=0.010000" in result.reason and f"(n={len(values)})" in result.reason


def test_an_unclear_trial_runs_until_max_runs_then_is_reverted() -> None:
    best = _best(1.0, 1.0, 1.0)
    values = [0.99, 0.98, 0.99]  # gain 0.01333, between one se and the margin
    policy = NoisePolicy(z=2.0, max_runs=4)
    assert isinstance(
        judge(MIN, policy, _judged([_run("success", v) for v in values], 1.0), best, SIGMA),
        RunAgain,
    )
    four = _judged([_run("success", v) for v in [*values, 0.99]], 1.0)  # 0.0125 < 0.01528
    result = judge(MIN, policy, four, best, SIGMA)
    assert isinstance(result, Verdict) and not result.kept
    assert "still unclear after 4 runs" in result.reason


def test_a_spent_budget_decides_on_the_runs_there_are() -> None:
    best = _best(1.0, 1.0, 1.0)
    unclear = _judged([_run("success", v) for v in (0.99, 0.98, 0.99)], 1.0)
    result = judge(MIN, Z2, unclear, best, SIGMA, budget_spent=True)
    assert isinstance(result, Verdict) and not result.kept
    assert "the budget is spent" in result.reason
    promising = _judged([_run("success", 0.95)], 1.0)
    result = judge(MIN, Z2, promising, best, SIGMA, budget_spent=True)
    assert isinstance(result, Verdict) and not result.kept
    assert "after 1 of the 3 runs a keep needs" in result.reason
    clear = _judged([_run("success", v) for v in (0.98, 0.985, 0.985)], 1.0)
    assert judge(MIN, Z2, clear, best, SIGMA, budget_spent=True).kept  # type: ignore[union-attr]


@pytest.mark.parametrize(("z", "kept"), [(1.0, True), (2.0, False), (3.0, False)])
def test_z_sets_how_sure_a_keep_must_be(z: float, kept: bool) -> None:
    trial = _judged([_run("success", v) for v in (0.99, 0.985, 0.99)], 1.0)  # gain 0.01167
    result = judge(MIN, NoisePolicy(z=z, max_runs=3), trial, _best(1.0, 1.0, 1.0), SIGMA)
    assert isinstance(result, Verdict) and result.kept is kept


def test_no_confirmation_runs_decide_on_one_run_with_the_noise_margin() -> None:
    policy = NoisePolicy(confirm_runs=0, max_runs=1, z=2.0)
    best = _best(1.0, 1.0, 1.0)
    # 2 * 0.01 * sqrt(1 + 1/3) = 0.02309
    keep = judge(MIN, policy, _judged([_run("success", 0.97)], 1.0), best, SIGMA)
    revert = judge(MIN, policy, _judged([_run("success", 0.98)], 1.0), best, SIGMA)
    assert isinstance(keep, Verdict) and keep.kept
    assert isinstance(revert, Verdict) and not revert.kept


@pytest.mark.parametrize(
    ("groups", "floor", "sigma"),
    [
        ([[1.0, 1.02], [0.5, 0.52, 0.54]], 0.0, math.sqrt((0.0002 + 0.0008) / 3)),
        ([[1.0], [2.0]], 0.005, 0.005),  # no repeated runs: the floor
        ([[1.0, 1.0, 1.0]], 0.001, 0.001),  # identical draws: the floor
    ],
)
def test_sigma_is_pooled_over_repeated_runs_with_a_floor(
    groups: list[list[float]], floor: float, sigma: float
) -> None:
    trials = [
        TrialView(
            i,
            "success",
            i == 1,
            f"c{i}",
            runs=tuple(RunView(j, "success", v) for j, v in enumerate(g, 1)),
        )
        for i, g in enumerate(groups, start=1)
    ]
    assert pooled_sigma(trials, floor).sigma == pytest.approx(sigma)


@pytest.mark.parametrize(
    ("freedom", "margin"),
    [(0, 2.0), (2, 4.02), (4, 2.81), (20, 2.13), (1000, 2.0)],  # Student's t at 97.7%
)
def test_few_degrees_of_freedom_widen_the_margin_as_t_does(freedom: int, margin: float) -> None:
    assert Spread(0.01, freedom).margin(2.0) == pytest.approx(margin, abs=0.01)


def test_an_underestimated_sigma_early_on_keeps_nothing_noise_explains() -> None:
    # The baseline's 3 runs (2 df) happened to agree: with z = 2 taken as known, a gain
    # of 2.4 sigma-hat would be kept; as t with 3 df (baseline and candidate), it is not.
    trial = _judged([_run("success", v) for v in (0.996, 0.996, 0.996)], 1.0)
    best = _best(1.0, 1.0, 1.0)
    policy = NoisePolicy(z=2.0, max_runs=3)
    assert judge(MIN, policy, trial, best, Spread(0.002)).kept  # type: ignore[union-attr]
    result = judge(MIN, policy, trial, best, Spread(0.002, 3))
    assert isinstance(result, Verdict) and not result.kept
    assert "as t with 3 df" in result.reason


def _curve(*losses: float) -> list[CurvePoint]:
    return [CurvePoint(0.1 * (i + 1), loss) for i, loss in enumerate(losses)]


BEST_CURVES = [_curve(5.0, 4.0, 3.5, 3.2, 3.0), _curve(5.2, 4.2, 3.7, 3.4, 3.2)]  # mean 3.1 at 50%
BASELINE_CURVES = [_curve(5.5, 4.5, 3.9, 3.6, 3.4), _curve(5.3, 4.3, 3.8, 3.5, 3.3)]  # spread 0.1
ONE_SPREAD = NoisePolicy(prune=True, prune_margin=1.0)


@pytest.mark.parametrize(("loss", "pruned"), [(3.39, False), (3.41, True)])
def test_by_default_a_run_is_pruned_only_three_spreads_behind(loss: float, pruned: bool) -> None:
    curve = _curve(5.0, 4.0, 3.7, loss + 0.005, loss)  # at 50%: the best's 3.1 + 3 x 0.1
    assert (prune_reason(AWARE, curve, BEST_CURVES, BASELINE_CURVES) is not None) is pruned


@pytest.mark.parametrize(
    ("curve", "pruned"),
    [
        (_curve(9.0, 9.0), False),  # within the grace share (30%): never pruned
        (_curve(5.0, 4.0, 3.6, 3.3, 3.19), False),  # within the best's spread
        (_curve(5.0, 4.0, 3.6, 3.3, 3.21), True),  # above the best by more than the spread
        # behind by 0.4 at 50%, but it was 0.6 at 40%: at that pace it catches up
        (_curve(8.0, 6.0, 4.6, 3.9, 3.5), False),
        # behind by 0.4 and closing only 0.05 a tenth: it would still be behind at the end
        (_curve(8.0, 6.0, 4.6, 3.75, 3.5), True),
        (_curve(5.0, 4.0, 3.69), False),  # at 30%: the best's 3.6 plus the spread 0.1
        (_curve(5.0, 4.0, 3.71), True),
    ],
)
def test_a_run_whose_loss_trails_the_best_by_more_than_the_baseline_spread_is_pruned(
    curve: list[CurvePoint], pruned: bool
) -> None:
    reason = prune_reason(ONE_SPREAD, curve, BEST_CURVES, BASELINE_CURVES)
    assert (reason is not None) is pruned, reason
    if reason is not None:
        assert "of the budget" in reason


def test_no_pruning_when_off_or_without_a_baseline_spread() -> None:
    late = _curve(9.0, 9.0, 9.0, 9.0, 9.0)
    assert prune_reason(AWARE, late, BEST_CURVES, BASELINE_CURVES) is not None
    assert prune_reason(NoisePolicy(), late, BEST_CURVES, BASELINE_CURVES) is None  # opt-in
    assert prune_reason(OFF, late, BEST_CURVES, BASELINE_CURVES) is None
    assert prune_reason(AWARE, late, BEST_CURVES, BASELINE_CURVES[:1]) is None


def _kept(number: int, metric: float, parent: str | None, runs: int = 3) -> TrialView:
    values = tuple(RunView(i, "success", metric) for i in range(1, runs + 1))
    return TrialView(number, "success", parent is None, f"c{number}", metric, True, values, parent)


def _trial(
    number: int,
    status: str,
    metric: float | None = None,
    kept: bool | None = None,
    baseline: bool = False,
) -> TrialView:
    # A running trial has a run going, unless a test says otherwise.
    runs = (RunView(1, "running"),) if status == "running" else ()
    return TrialView(number, status, baseline, f"c{number}", metric, kept, runs)


def test_baseline_first() -> None:
    assert next_action([], CampaignLimits(), MIN, 0.0) == StartBaseline(number=1)


def test_baseline_is_redone_after_it_was_killed() -> None:
    trials = [_trial(1, "killed", baseline=True, kept=False)]
    assert next_action(trials, CampaignLimits(), MIN, 0.0) == StartBaseline(number=2)


def test_failed_baseline_stops_the_campaign() -> None:
    trials = [_trial(1, "crash", baseline=True, kept=False)]
    action = next_action(trials, CampaignLimits(), MIN, 0.0)
    assert isinstance(action, Stop)
    assert action.reason is EndReason.BASELINE_FAILED
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
    action = next_action(trials, CampaignLimits(), objective, 0.0)
    assert action == Propose(parent_commit=parent, number=len(trials) + 1)
    best = best_kept(trials, objective)
    assert best is not None and best.commit == parent


def _baseline_then(*statuses: str) -> list[TrialView]:
    trials = [_kept(1, 1.0, None)]  # its 3 runs done
    for i, status in enumerate(statuses, start=2):
        trials.append(_trial(i, status, 1.1 if status == "success" else None, False))
    return trials


@pytest.mark.parametrize(
    ("trials", "limits", "elapsed", "exhausted", "reason"),
    [
        (
            _baseline_then("success", "success"),
            CampaignLimits(max_trials=3),
            0.0,
            None,
            EndReason.MAX_TRIALS,
        ),
        (_baseline_then(), CampaignLimits(budget_seconds=60), 60.0, None, EndReason.BUDGET_SPENT),
        (
            _baseline_then("crash", "timeout", "crash"),
            CampaignLimits(max_consecutive_failures=3),
            0.0,
            None,
            EndReason.CONSECUTIVE_FAILURES,
        ),
        (
            # A skipped proposal makes no progress: it extends a failure streak.
            _baseline_then("crash", "skipped", "skipped"),
            CampaignLimits(max_consecutive_failures=3),
            0.0,
            None,
            EndReason.CONSECUTIVE_FAILURES,
        ),
        (_baseline_then(), CampaignLimits(), 0.0, "nothing left", EndReason.STRATEGY_EXHAUSTED),
    ],
)
def test_stop_reasons(
    trials: list[TrialView],
    limits: CampaignLimits,
    elapsed: float,
    exhausted: str | None,
    reason: EndReason,
) -> None:
    action = next_action(trials, limits, MIN, elapsed, exhausted)
    assert isinstance(action, Stop)
    assert action.reason is reason
    assert action.message
    if exhausted is not None:
        assert action.message == exhausted


def test_a_success_ends_a_streak_of_skipped_proposals() -> None:
    trials = _baseline_then("skipped", "skipped", "success", "skipped")
    action = next_action(trials, CampaignLimits(max_consecutive_failures=2), MIN, 0.0)
    assert isinstance(action, Propose)


@pytest.mark.parametrize(
    ("trials", "limits", "elapsed"),
    [
        # killed trials were interrupted: they count toward neither limit
        (_baseline_then("success", "killed"), CampaignLimits(max_trials=3), 0.0),
        # a success breaks a failure streak
        (
            _baseline_then("crash", "crash", "success", "crash"),
            CampaignLimits(max_consecutive_failures=3),
            0.0,
        ),
        (_baseline_then("crash", "crash"), CampaignLimits(max_consecutive_failures=3), 0.0),
        (_baseline_then(), CampaignLimits(budget_seconds=60), 59.9),
    ],
)
def test_goes_on_below_the_limits(
    trials: list[TrialView], limits: CampaignLimits, elapsed: float
) -> None:
    action = next_action(trials, limits, MIN, elapsed)
    assert isinstance(action, Propose)
    assert action.number == trials[-1].number + 1
    assert action.parent_commit == "c1"


# Several trials at once (the operator's parallelism)


def test_plan_fills_the_free_slots_from_the_best_kept_trial() -> None:
    trials = [*_baseline_then("success"), _trial(3, "running")]
    actions = plan(trials, CampaignLimits(), MIN, 0.0, parallelism=3)
    assert actions == [Propose("c1", 4), Propose("c1", 5)]


def test_plan_runs_the_baseline_alone() -> None:
    assert plan([], CampaignLimits(), MIN, 0.0, parallelism=4) == [StartBaseline(1)]
    running = [_trial(1, "running", baseline=True)]
    assert plan(running, CampaignLimits(), MIN, 0.0, parallelism=4) == []


def test_plan_counts_running_trials_toward_max_trials() -> None:
    trials = [*_baseline_then("success"), _trial(3, "running")]
    assert plan(trials, CampaignLimits(max_trials=4), MIN, 0.0, parallelism=3) == [Propose("c1", 4)]
    # the limit is reached: wait for the running trial, then stop
    assert plan(trials, CampaignLimits(max_trials=3), MIN, 0.0, parallelism=3) == []
    done = [*_baseline_then("success", "success")]
    stop = plan(done, CampaignLimits(max_trials=3), MIN, 0.0, parallelism=3)
    assert isinstance(stop, Stop) and stop.reason is EndReason.MAX_TRIALS


@pytest.mark.parametrize(
    ("limits", "elapsed", "exhausted"),
    [
        (CampaignLimits(budget_seconds=60), 61.0, None),
        (CampaignLimits(max_consecutive_failures=2), 0.0, None),
        (CampaignLimits(), 0.0, "nothing left"),
    ],
)
def test_plan_waits_for_running_trials_before_it_stops(
    limits: CampaignLimits, elapsed: float, exhausted: str | None
) -> None:
    trials = [*_baseline_then("crash", "crash"), _trial(4, "running")]
    assert plan(trials, limits, MIN, elapsed, parallelism=2, strategy_exhausted=exhausted) == []
    finished = [*trials[:-1], _trial(4, "crash")]
    stop = plan(finished, limits, MIN, elapsed, parallelism=2, strategy_exhausted=exhausted)
    assert isinstance(stop, Stop)


def _between_runs(number: int, baseline: bool = False) -> TrialView:
    return TrialView(number, "running", baseline, f"c{number}", runs=(RunView(1, "success", 1.0),))


def test_an_undecided_trial_with_no_run_going_gets_its_next_run_first() -> None:
    trials = [*_baseline_then("success"), _between_runs(3)]
    assert plan(trials, CampaignLimits(), MIN, 0.0, parallelism=2) == [NextRun(3), Propose("c1", 4)]
    assert next_action(trials, CampaignLimits(), MIN, 0.0) == NextRun(3)


def test_the_baseline_between_its_runs_runs_alone() -> None:
    assert plan([_between_runs(1, baseline=True)], CampaignLimits(), MIN, 0.0, parallelism=4) == [
        NextRun(1)
    ]


def test_a_campaign_at_its_limits_still_finishes_its_undecided_trials() -> None:
    trials = [*_baseline_then("success"), _between_runs(3)]
    assert plan(trials, CampaignLimits(max_trials=3), MIN, 0.0) == [NextRun(3)]
    assert plan(trials, CampaignLimits(budget_seconds=1), MIN, 5.0) == [NextRun(3)]


# The best kept trial, and measuring it again


def test_the_best_is_the_kept_trial_no_kept_trial_stands_on() -> None:
    # Trial 2 beat the baseline, then measured again its mean rose above the baseline's:
    # it is still the best (it was kept against the baseline), never the baseline again.
    trials = [_kept(1, 1.0, None), _kept(2, 1.01, "c1", runs=8)]
    best = best_kept(trials, MIN)
    assert best is not None and best.number == 2
    # Two kept side by side on the same parent (parallel trials): the better mean.
    trials = [_kept(1, 1.0, None), _kept(2, 0.98, "c1"), _kept(3, 0.97, "c1")]
    assert best_kept(trials, MIN) == trials[2]
    assert best_kept(trials, MAX) == trials[1]


def _candidate(number: int, runs: int, going: bool = False) -> TrialView:
    done = tuple(RunView(i, "success", 0.99) for i in range(1, runs + 1))
    extra = (RunView(runs + 1, "running"),) if going else ()
    return TrialView(number, "running", False, f"c{number}", runs=done + extra, parent="c1")


@pytest.mark.parametrize(
    ("best_runs", "candidate_runs", "policy", "expected"),
    [
        (3, 1, NoisePolicy(), NextRun(2)),  # before run 2 the best needs 2 runs: it has 3
        (3, 2, NoisePolicy(), NextRun(1)),  # before run 3 it needs 4
        (4, 2, NoisePolicy(), NextRun(2)),
        (5, 3, NoisePolicy(), NextRun(1)),
        (24, 12, NoisePolicy(), NextRun(2)),  # best_runs caps it
        (6, 5, NoisePolicy(best_runs=6), NextRun(2)),
        (3, 0, NoisePolicy(), NextRun(2)),  # a trial's first run never waits
        (3, 2, NoisePolicy(aware=False), NextRun(2)),
    ],
)
def test_the_best_is_measured_again_before_a_trial_s_next_run(
    best_runs: int, candidate_runs: int, policy: NoisePolicy, expected: NextRun
) -> None:
    trials = [_kept(1, 1.0, None, runs=best_runs), _candidate(2, candidate_runs)]
    assert next_action(trials, CampaignLimits(), MIN, 0.0, policy=policy) == expected


def test_trials_waiting_for_the_best_share_one_run_of_it() -> None:
    trials = [_kept(1, 1.0, None), _candidate(2, 2), _candidate(3, 2)]
    assert plan(trials, CampaignLimits(), MIN, 0.0, parallelism=2) == [NextRun(1)]
    going = replace(trials[0], runs=(*trials[0].runs, RunView(4, "running")))
    assert plan([going, *trials[1:]], CampaignLimits(), MIN, 0.0, parallelism=2) == []
