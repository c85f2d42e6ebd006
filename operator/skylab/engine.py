"""The engine decides: pure functions from a campaign's history to what happens next.

No I/O here. The local loop and the Kubernetes operator both feed it the trials they
have recorded (each with its runs) and act on its answers, so the two drivers cannot
disagree.

A trial is one change; a run is one execution of it. Decisions are noise-aware by
default: the baseline runs several times with distinct seeds, the run-to-run spread
(sigma) is pooled over every trial with repeated runs, and a trial is kept only when its
mean beats the best's mean by more than the noise explains. A clearly worse first run is
reverted at once; a promising one is confirmed, and run again while its mean stays
between "within the noise" and "clear", up to max_runs. The best kept trial is measured
again alongside (up to best_runs), so every comparison is against a well-measured mean
that is no longer the lucky draw that got it kept. `noise = "off"` keeps the single-run
greedy rule.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

Status = str  # running | success | crash | timeout | killed | skipped | pruned
FAILED: frozenset[str] = frozenset({"crash", "timeout"})
# A skipped proposal spent no GPU time but made no progress either: it breaks no streak.
UNPRODUCTIVE: frozenset[str] = FAILED | {"skipped"}
# A run stopped from outside (Ctrl-C, a restart): it says nothing of the change, and the
# trial goes on with another run.
INTERRUPTED = "killed"


class EndReason(StrEnum):
    BUDGET_SPENT = "budget_spent"
    MAX_TRIALS = "max_trials"
    CONSECUTIVE_FAILURES = "consecutive_failures"
    STRATEGY_EXHAUSTED = "strategy_exhausted"
    BASELINE_FAILED = "baseline_failed"
    STRATEGY_FAILED = "strategy_failed"


# Ends that mean the campaign did not end well.
FAILURE_ENDS = frozenset(
    {EndReason.CONSECUTIVE_FAILURES, EndReason.BASELINE_FAILED, EndReason.STRATEGY_FAILED}
)


@dataclass(frozen=True)
class Objective:
    direction: Literal["minimize", "maximize"]
    min_improvement: float = 0.0
    max_vram_mb: float | None = None

    def gain(self, value: float, reference: float) -> float:
        """How much better VALUE is than REFERENCE (negative: worse)."""
        return reference - value if self.direction == "minimize" else value - reference

    def improves(self, value: float, best: float) -> bool:
        """True when VALUE beats BEST by more than min_improvement."""
        return self.gain(value, best) > self.min_improvement


# A confirmed trial whose gain is less than this many standard errors above
# min_improvement is reverted: more runs would seldom make it clear.
FUTILITY_SE = 1.0
# The best kept trial is measured with (up to best_runs) this many times the runs of the
# trial it is compared with: its mean is shared by every comparison, so its runs are
# worth more than a candidate's (the control of a many-to-one comparison gets more).
BEST_RUNS_PER_RUN = 2


@dataclass(frozen=True)
class NoisePolicy:
    """How many runs decide a trial, and how sure a keep must be ([decision])."""

    aware: bool = True
    baseline_runs: int = 3
    # The runs after a promising first run before a trial may be kept.
    confirm_runs: int = 2
    # The most runs a trial gets while it is neither clearly kept nor clearly not.
    max_runs: int = 12
    # The most runs the best kept trial is measured with (baseline_runs: never again).
    best_runs: int = 24
    # Standard errors a keep must clear. At 2, one confirmation in about 40 of a change
    # that is truly no better is kept, and a campaign looks at dozens (research_efficiency).
    z: float = 2.75
    # The least run-to-run spread assumed: a few identical draws do not make noise vanish.
    sigma_floor: float = 0.001
    # Early stopping is opt-in: mid-run training loss is a rough guide to the end (a
    # learning-rate change can trail until the warmdown and then win), and a run pruned
    # wrongly is a gain lost without a trace, where a run not pruned only costs time.
    prune: bool = False
    # The share of the training budget a run gets before it may be pruned.
    prune_grace: float = 0.3
    # How far behind the best a run must be to be pruned, in baseline spreads: the
    # ranking of training losses mid-run is a rough guide (a learning-rate change can
    # trail until the warmdown and then win), so only a run far behind is stopped.
    prune_margin: float = 3.0

    @property
    def runs_of_baseline(self) -> int:
        return self.baseline_runs if self.aware else 1

    @property
    def runs_of_candidate(self) -> int:
        """The fewest runs a trial is kept on."""
        return 1 + self.confirm_runs if self.aware else 1

    def best_needs_run(self, best: TrialView, trial: TrialView) -> bool:
        """True when BEST should run once more before TRIAL's next run."""
        if not self.aware or trial.is_baseline:
            return False
        wanted = min(self.best_runs, BEST_RUNS_PER_RUN * len(trial.counted_runs))
        return len(best.counted_runs) < wanted


DEFAULT_POLICY = NoisePolicy()


@dataclass(frozen=True)
class CampaignLimits:
    max_trials: int | None = None
    budget_seconds: float | None = None
    max_consecutive_failures: int = 5

    def budget_spent(self, elapsed_seconds: float) -> bool:
        return self.budget_seconds is not None and elapsed_seconds >= self.budget_seconds


@dataclass(frozen=True)
class RunView:
    """What the engine needs to know of one run of a trial."""

    number: int
    status: Status
    metric: float | None = None
    peak_vram_mb: float | None = None

    @property
    def counted(self) -> bool:
        """A run that ended on its own: interrupted ones are run again."""
        return self.status not in ("running", INTERRUPTED)


@dataclass(frozen=True)
class TrialView:
    """What the engine needs to know of one recorded trial; METRIC is its runs' mean."""

    number: int
    status: Status
    is_baseline: bool
    commit: str
    metric: float | None = None
    kept: bool | None = None
    runs: tuple[RunView, ...] = ()
    parent: str | None = None  # the commit it changed (None: the baseline)

    @property
    def run_in_flight(self) -> bool:
        return any(run.status == "running" for run in self.runs)

    @property
    def counted_runs(self) -> tuple[RunView, ...]:
        return tuple(run for run in self.runs if run.counted)

    def values(self) -> list[float]:
        """The metrics of its successful runs."""
        return [
            run.metric
            for run in self.runs
            if run.status == "success" and run.metric is not None and math.isfinite(run.metric)
        ]


@dataclass(frozen=True)
class Stats:
    mean: float
    sd: float  # 0 for a single run
    n: int


def stats(values: Sequence[float]) -> Stats | None:
    """Mean, sample standard deviation and count of VALUES; None when there are none."""
    if not values:
        return None
    n = len(values)
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return Stats(mean, sd, n)


@dataclass(frozen=True)
class Spread:
    """The campaign's run-to-run spread: its estimate and the degrees of freedom behind it."""

    sigma: float
    freedom: int = 0

    def margin(self, z: float) -> float:
        """Z standard errors, widened as Student's t is for an estimated sigma: with the
        few repeated runs of an early campaign, sigma is often well below the truth."""
        if self.freedom == 0:
            return z  # the floor alone: nothing was estimated
        f = self.freedom
        # Cornish-Fisher expansion of the t quantile at the normal quantile Z.
        return z + (z**3 + z) / (4 * f) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * f**2)


def pooled_sigma(trials: Sequence[TrialView], floor: float) -> Spread:
    """The run-to-run spread of the campaign: the pooled standard deviation of every trial
    with two or more successful runs, never below FLOOR."""
    squares, freedom = 0.0, 0
    for trial in trials:
        values = trial.values()
        if len(values) >= 2:
            mean = math.fsum(values) / len(values)
            squares += math.fsum((v - mean) ** 2 for v in values)
            freedom += len(values) - 1
    estimate = math.sqrt(squares / freedom) if freedom else 0.0
    if estimate <= floor:
        return Spread(floor)
    return Spread(estimate, freedom)


@dataclass(frozen=True)
class RunAgain:
    """The trial needs another run before it can be decided."""

    reason: str


@dataclass(frozen=True)
class Verdict:
    """The trial is decided: kept or not, why (with the numbers), and its final status."""

    kept: bool
    reason: str
    status: Status


Judgement = RunAgain | Verdict


def judge(
    objective: Objective,
    policy: NoisePolicy,
    trial: TrialView,
    best: TrialView | None,
    spread: Spread,
    *,
    budget_spent: bool = False,
) -> Judgement:
    """What a trial whose runs have all ended needs: another run, or its verdict.

    BEST is the best kept trial (None for the baseline), SPREAD the campaign's pooled
    run-to-run spread. BUDGET_SPENT: the campaign may start nothing more, so a trial not
    yet clearly kept is decided on the runs it has.
    """
    runs = trial.counted_runs
    if not runs:
        return RunAgain("no run has ended yet")
    last = runs[-1]
    if last.status != "success":
        what = "pruned" if last.status == "pruned" else last.status
        return Verdict(False, f"run {last.number} {what}: never kept", last.status)
    if last.metric is None or not math.isfinite(last.metric):
        return Verdict(False, f"run {last.number} gave no finite metric", "success")
    vram = max((run.peak_vram_mb or 0.0) for run in runs)
    cap = objective.max_vram_mb
    if cap is not None and vram > cap:
        return Verdict(False, f"peak VRAM {vram:.0f} MB over the {cap:.0f} MB cap", "success")
    measured = stats(trial.values())
    assert measured is not None  # the last run succeeded with a finite metric
    if trial.is_baseline or best is None or best.metric is None:
        if measured.n < policy.runs_of_baseline:
            return RunAgain(f"baseline run {measured.n + 1} of {policy.runs_of_baseline}")
        return Verdict(True, f"baseline: {_summary(measured)}", "success")
    reference = stats(best.values()) or Stats(best.metric, 0.0, 1)
    gain = objective.gain(measured.mean, reference.mean)
    if not policy.aware:
        if objective.improves(measured.mean, reference.mean):
            return Verdict(True, f"improved {reference.mean:.6f} -> {measured.mean:.6f}", "success")
        margin = f" by more than {objective.min_improvement:g}" if objective.min_improvement else ""
        return Verdict(
            False, f"{measured.mean:.6f} does not beat {reference.mean:.6f}{margin}", "success"
        )
    if measured.n == 1 and gain <= objective.min_improvement:
        return Verdict(
            False,
            f"first run {measured.mean:.6f} does not beat the best's mean "
            f"{reference.mean:.6f} (n={reference.n}){_floor(objective)}: "
            "reverted without confirmation",
            "success",
        )
    if measured.n < policy.runs_of_candidate:
        if budget_spent:
            return Verdict(
                False,
                f"the budget is spent after {measured.n} of the "
                f"{policy.runs_of_candidate} runs a keep needs",
                "success",
            )
        if measured.n == 1:
            return RunAgain(
                f"promising ({gain:+.6f}): confirmation run 2 of {policy.runs_of_candidate}"
            )
        return RunAgain(f"confirmation run {measured.n + 1} of {policy.runs_of_candidate}")
    z = spread.margin(policy.z)
    error = spread.sigma * math.sqrt(1 / measured.n + 1 / reference.n)
    noise = z * error
    needed = max(noise, objective.min_improvement)
    numbers = (
        f"{_summary(measured)} against the best's {_summary(reference)}: gain {gain:+.6f}, "
        f"needs more than {needed:.6f} (z={policy.z:g}"
        f"{f' as t with {spread.freedom} df: {z:.2f}' if spread.freedom else ''}, "
        f"sigma={spread.sigma:.6f}{', min_improvement' if needed > noise else ''})"
    )
    if gain > noise and gain > objective.min_improvement:
        return Verdict(True, f"kept: {numbers}", "success")
    futile = gain - objective.min_improvement < FUTILITY_SE * error
    if futile or measured.n >= policy.max_runs or budget_spent:
        why = (
            "within one standard error"
            if futile
            else "the budget is spent"
            if budget_spent and measured.n < policy.max_runs
            else f"still unclear after {policy.max_runs} runs"
        )
        return Verdict(False, f"not kept ({why}): {numbers}", "success")
    return RunAgain(
        f"unclear ({gain:+.6f}, needs more than {needed:.6f}): "
        f"run {measured.n + 1} of at most {policy.max_runs}"
    )


def _summary(measured: Stats) -> str:
    if measured.n == 1:
        return f"{measured.mean:.6f} (n=1)"
    return f"{measured.mean:.6f} ± {measured.sd:.6f} (n={measured.n})"


def _floor(objective: Objective) -> str:
    return f" by more than {objective.min_improvement:g}" if objective.min_improvement else ""


def best_kept(trials: Sequence[TrialView], objective: Objective) -> TrialView | None:
    """The best kept trial: the parent of the next proposal, the one the next is judged
    against.

    A kept trial that another kept trial was built on is behind it: that one beat it.
    Of those no kept trial stands on (one, unless trials ran in parallel), the best
    mean wins. The best's mean moves as it is measured again, so comparing it with the
    means of the trials it beat, measured less, would undo keeps by chance.
    """
    kept = [trial for trial in trials if trial.kept and trial.metric is not None]
    superseded = {trial.parent for trial in kept}
    best: TrialView | None = None
    for trial in kept:
        if trial.commit in superseded or trial.metric is None:
            continue
        if best is None or best.metric is None or objective.improves(trial.metric, best.metric):
            best = trial
    return best


# Early stopping: a run's loss curve against the best kept trial's.


@dataclass(frozen=True)
class CurvePoint:
    fraction: float  # of the training budget, 0..1
    loss: float


# How far back a run's gap to the best is compared with, to tell whether it is closing.
PRUNE_WINDOW = 0.1


def prune_reason(
    policy: NoisePolicy,
    curve: Sequence[CurvePoint],
    best_curves: Sequence[Sequence[CurvePoint]],
    baseline_curves: Sequence[Sequence[CurvePoint]],
) -> str | None:
    """Why a running run should be stopped now (None: let it run).

    Past the grace share of the budget, a run is stopped when its training loss is above
    the best kept trial's (the mean of its runs' curves) by more than prune_margin times
    the spread of the baseline runs' curves at the same share, and would still be if its
    gap went on
    closing at the pace of the last PRUNE_WINDOW of the budget: a change that only
    learns slower at first (a lower learning rate) catches up and is left to finish.
    """
    if not policy.prune or not policy.aware or not curve or len(baseline_curves) < 2:
        return None
    latest = curve[-1]
    earlier = latest.fraction - PRUNE_WINDOW
    if latest.fraction < policy.prune_grace or not math.isfinite(latest.loss):
        return None
    now = _gap(latest.fraction, latest.loss, best_curves, baseline_curves)
    before_loss = _at(curve, earlier)
    before = (
        None if before_loss is None else _gap(earlier, before_loss, best_curves, baseline_curves)
    )
    if now is None or before is None:
        return None
    gap, reference, spread = now
    allowed = policy.prune_margin * max(spread, policy.sigma_floor)
    closing = max(before[0] - gap, 0.0) / PRUNE_WINDOW  # per share of the budget
    projected = gap - closing * (1 - latest.fraction)
    if gap <= allowed or projected <= allowed:
        return None
    return (
        f"loss {latest.loss:.4f} at {latest.fraction:.0%} of the budget is above the best's "
        f"{reference:.4f} by more than {policy.prune_margin:g} baseline spreads "
        f"({allowed:.4f}), and at its pace would still be at the end ({projected:+.4f})"
    )


def _gap(
    fraction: float,
    loss: float,
    best_curves: Sequence[Sequence[CurvePoint]],
    baseline_curves: Sequence[Sequence[CurvePoint]],
) -> tuple[float, float, float] | None:
    """LOSS above the best's at FRACTION, the best's loss there and the baseline's spread."""
    known = [v for v in (_at(points, fraction) for points in best_curves) if v is not None]
    spreads = [v for v in (_at(points, fraction) for points in baseline_curves) if v is not None]
    if not known or len(spreads) < 2:
        return None
    reference = math.fsum(known) / len(known)
    return loss - reference, reference, max(max(spreads) - min(spreads), 0.0)


def _at(points: Sequence[CurvePoint], fraction: float) -> float | None:
    """The curve's loss at FRACTION, interpolated; None outside what it covers."""
    for before, after in itertools.pairwise(points):
        if before.fraction <= fraction <= after.fraction:
            if after.fraction == before.fraction:
                return after.loss
            share = (fraction - before.fraction) / (after.fraction - before.fraction)
            return before.loss + share * (after.loss - before.loss)
    if points and points[-1].fraction == fraction:
        return points[-1].loss
    return None


# What to do next, for the whole campaign.


@dataclass(frozen=True)
class StartBaseline:
    """Run the experiment as it is, to measure the reference value."""

    number: int


@dataclass(frozen=True)
class Propose:
    """Ask the strategy for a change on top of PARENT (the best kept commit)."""

    parent_commit: str
    number: int


@dataclass(frozen=True)
class NextRun:
    """Start trial NUMBER's next run: it has none going and is not decided, or it is the
    best kept trial and is measured again before an undecided trial's next run."""

    number: int


@dataclass(frozen=True)
class Stop:
    reason: EndReason
    message: str


Action = StartBaseline | Propose | NextRun | Stop
Start = StartBaseline | Propose | NextRun


def next_action(
    trials: Sequence[TrialView],
    limits: CampaignLimits,
    objective: Objective,
    elapsed_seconds: float,
    strategy_exhausted: str | None = None,
    policy: NoisePolicy = DEFAULT_POLICY,
) -> Action:
    """What to do next, one trial at a time, with no run going."""
    actions = plan(
        trials,
        limits,
        objective,
        elapsed_seconds,
        policy=policy,
        strategy_exhausted=strategy_exhausted,
    )
    if isinstance(actions, Stop):
        return actions
    if not actions:
        raise ValueError("next_action: a run is still going")
    return actions[0]


def plan(
    trials: Sequence[TrialView],
    limits: CampaignLimits,
    objective: Objective,
    elapsed_seconds: float,
    *,
    policy: NoisePolicy = DEFAULT_POLICY,
    parallelism: int = 1,
    strategy_exhausted: str | None = None,
) -> Stop | list[Start]:
    """The runs and trials to start now (none: wait for a run going), or why the campaign ends.

    TRIALS is every trial recorded so far, running ones included. An undecided trial is
    always carried on (NextRun, or first the best's, as POLICY asks) before anything new
    starts in its slot, and a campaign only stops once nothing runs: the running trials'
    outcomes are part of its result. STRATEGY_EXHAUSTED is the strategy's word on why it
    has nothing left, if so.
    """
    running = [t for t in trials if t.status == "running"]
    settled = [t for t in trials if t.status not in ("running", "killed")]
    best = best_kept(settled, objective)
    carried = _carried(running, best, policy)
    number = max((t.number for t in trials), default=0) + 1

    def stop_or_wait(reason: EndReason, message: str) -> Stop | list[Start]:
        return carried if running else Stop(reason, message)

    if limits.max_trials is not None and len(settled) + len(running) >= limits.max_trials:
        return stop_or_wait(EndReason.MAX_TRIALS, f"ran the maximum of {limits.max_trials} trials")
    if limits.budget_spent(elapsed_seconds):
        assert limits.budget_seconds is not None
        spent = _duration(limits.budget_seconds)
        return stop_or_wait(EndReason.BUDGET_SPENT, f"the wall-clock budget of {spent} is spent")

    # Every later trial is measured against the baseline: it runs alone, first.
    if any(t.is_baseline for t in running):
        return carried
    baseline = next((t for t in settled if t.is_baseline), None)
    if baseline is None:
        return carried if running else [StartBaseline(number=number)]
    if baseline.status != "success" or not baseline.kept:
        return stop_or_wait(
            EndReason.BASELINE_FAILED,
            f"the baseline trial ended as {baseline.status}: fix the experiment and rerun",
        )

    streak = _failure_streak(settled)
    if streak >= limits.max_consecutive_failures:
        return stop_or_wait(
            EndReason.CONSECUTIVE_FAILURES,
            f"{streak} consecutive trials failed (limit {limits.max_consecutive_failures})",
        )
    if strategy_exhausted is not None:
        return stop_or_wait(EndReason.STRATEGY_EXHAUSTED, strategy_exhausted)

    slots = parallelism - len(running)
    if limits.max_trials is not None:
        slots = min(slots, limits.max_trials - len(settled) - len(running))
    parent = best or baseline
    proposals = [Propose(parent_commit=parent.commit, number=number + i) for i in range(slots)]
    return [*carried, *proposals]


def _carried(
    running: Sequence[TrialView], best: TrialView | None, policy: NoisePolicy
) -> list[Start]:
    """The next run of each undecided trial with none going, or the best's run it waits for."""
    carried: list[Start] = []
    best_going = best is not None and best.run_in_flight
    for trial in running:
        if trial.run_in_flight:
            continue
        if best is not None and policy.best_needs_run(best, trial):
            if not best_going:
                carried.append(NextRun(best.number))
                best_going = True
            continue
        carried.append(NextRun(trial.number))
    return carried


def _failure_streak(settled: Sequence[TrialView]) -> int:
    streak = 0
    for trial in reversed(settled):
        if trial.status not in UNPRODUCTIVE:
            break
        streak += 1
    return streak


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"
