"""The engine decides: pure functions from a campaign's history to what happens next.

No I/O here. The local loop and the Kubernetes operator both feed it the trials they
have recorded and act on its answers, so the two drivers cannot disagree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

Status = str  # running | success | crash | timeout | killed | skipped
FAILED: frozenset[str] = frozenset({"crash", "timeout"})
# A skipped proposal spent no GPU time but made no progress either: it breaks no streak.
UNPRODUCTIVE: frozenset[str] = FAILED | {"skipped"}


class StopReason(StrEnum):
    BUDGET_SPENT = "budget_spent"
    MAX_TRIALS = "max_trials"
    CONSECUTIVE_FAILURES = "consecutive_failures"
    STRATEGY_EXHAUSTED = "strategy_exhausted"
    BASELINE_FAILED = "baseline_failed"
    STRATEGY_FAILED = "strategy_failed"


@dataclass(frozen=True)
class Objective:
    direction: Literal["minimize", "maximize"]
    min_improvement: float = 0.0
    max_vram_mb: float | None = None

    def improves(self, value: float, best: float) -> bool:
        """True when VALUE beats BEST by more than min_improvement."""
        if self.direction == "minimize":
            return value < best - self.min_improvement
        return value > best + self.min_improvement


@dataclass(frozen=True)
class Limits:
    max_trials: int | None = None
    budget_seconds: float | None = None
    max_consecutive_failures: int = 5


@dataclass(frozen=True)
class TrialView:
    """What the engine needs to know of one recorded trial."""

    number: int
    status: Status
    is_baseline: bool
    commit: str
    metric: float | None = None
    kept: bool | None = None


@dataclass(frozen=True)
class Outcome:
    """A finished trial, before the decision."""

    status: Status
    metric: float | None
    peak_vram_mb: float | None = None


@dataclass(frozen=True)
class Decision:
    kept: bool
    reason: str


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
class Stop:
    reason: StopReason
    message: str


Action = StartBaseline | Propose | Stop


def decide(objective: Objective, outcome: Outcome, best: float | None, baseline: bool) -> Decision:
    """Keep or revert one finished trial."""
    if outcome.status != "success":
        return Decision(False, f"{outcome.status}: never kept")
    if outcome.metric is None or not math.isfinite(outcome.metric):
        return Decision(False, "no finite metric")
    vram = outcome.peak_vram_mb
    if objective.max_vram_mb is not None and vram is not None and vram > objective.max_vram_mb:
        return Decision(
            False, f"peak VRAM {vram:.0f} MB over the {objective.max_vram_mb:.0f} MB cap"
        )
    if baseline or best is None:
        return Decision(True, "baseline")
    if objective.improves(outcome.metric, best):
        return Decision(True, f"improved {best:.6f} -> {outcome.metric:.6f}")
    margin = f" by more than {objective.min_improvement:g}" if objective.min_improvement else ""
    return Decision(False, f"{outcome.metric:.6f} does not beat {best:.6f}{margin}")


def best_kept(trials: Sequence[TrialView], objective: Objective) -> TrialView | None:
    """The kept trial with the best metric: the parent of the next proposal."""
    best: TrialView | None = None
    for trial in trials:
        if not trial.kept or trial.metric is None:
            continue
        if best is None or best.metric is None or objective.improves(trial.metric, best.metric):
            best = trial
    return best


def next_action(
    trials: Sequence[TrialView],
    limits: Limits,
    objective: Objective,
    elapsed_seconds: float,
    strategy_exhausted: str | None = None,
) -> Action:
    """What to do next, one trial at a time, with no trial running."""
    actions = plan(
        trials, limits, objective, elapsed_seconds, strategy_exhausted=strategy_exhausted
    )
    if isinstance(actions, Stop):
        return actions
    if not actions:
        raise ValueError("next_action: a trial is still running")
    return actions[0]


def plan(
    trials: Sequence[TrialView],
    limits: Limits,
    objective: Objective,
    elapsed_seconds: float,
    *,
    parallelism: int = 1,
    strategy_exhausted: str | None = None,
) -> Stop | list[StartBaseline | Propose]:
    """The trials to start now (none: wait for a running one), or why the campaign ends.

    TRIALS is every trial recorded so far, running ones included. A campaign only
    stops once nothing runs: the running trials' outcomes are part of its result.
    STRATEGY_EXHAUSTED is the strategy's word on why it has nothing left, if so.
    """
    running = [t for t in trials if t.status == "running"]
    settled = [t for t in trials if t.status not in ("running", "killed")]
    number = max((t.number for t in trials), default=0) + 1

    def stop_or_wait(reason: StopReason, message: str) -> Stop | list[StartBaseline | Propose]:
        return [] if running else Stop(reason, message)

    if limits.max_trials is not None and len(settled) + len(running) >= limits.max_trials:
        return stop_or_wait(StopReason.MAX_TRIALS, f"ran the maximum of {limits.max_trials} trials")
    if limits.budget_seconds is not None and elapsed_seconds >= limits.budget_seconds:
        spent = _duration(limits.budget_seconds)
        return stop_or_wait(StopReason.BUDGET_SPENT, f"the wall-clock budget of {spent} is spent")

    # Every later trial is measured against the baseline: it runs alone, first.
    if any(t.is_baseline for t in running):
        return []
    baseline = next((t for t in settled if t.is_baseline), None)
    if baseline is None:
        return [] if running else [StartBaseline(number=number)]
    if baseline.status != "success" or not baseline.kept:
        return stop_or_wait(
            StopReason.BASELINE_FAILED,
            f"the baseline trial ended as {baseline.status}: fix the experiment and rerun",
        )

    streak = _failure_streak(settled)
    if streak >= limits.max_consecutive_failures:
        return stop_or_wait(
            StopReason.CONSECUTIVE_FAILURES,
            f"{streak} consecutive trials failed (limit {limits.max_consecutive_failures})",
        )
    if strategy_exhausted is not None:
        return stop_or_wait(StopReason.STRATEGY_EXHAUSTED, strategy_exhausted)

    slots = parallelism - len(running)
    if limits.max_trials is not None:
        slots = min(slots, limits.max_trials - len(settled) - len(running))
    parent = best_kept(settled, objective) or baseline
    return [Propose(parent_commit=parent.commit, number=number + i) for i in range(slots)]


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
