"""What an executor is asked to run: one trial, described by the trial contract."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from skylab_trainer.report import RunReport


def trial_name(campaign: str, number: int) -> str:
    """A trial's name: its campaign's, then its number."""
    return f"{campaign}-{number:04d}"


def run_name(trial: str, run: int) -> str:
    """A run's name (its Job's, its folder's): the trial's for the first, then -r2, -r3..."""
    return trial if run == 1 else f"{trial}-r{run}"


@dataclass(frozen=True)
class TrialLaunch:
    """One run of a trial."""

    trial: str  # deterministic: <campaign>-<NNNN>
    repo: str  # URL or path the trainer fetches the commit from
    commit: str
    command: str
    time_budget_seconds: float
    max_wall_time_seconds: float
    metric_name: str
    metric_pattern: str
    env: Mapping[str, str] = field(default_factory=dict)
    run: int = 1

    @property
    def name(self) -> str:
        return run_name(self.trial, self.run)


class StopRun(Exception):  # a request, not an error
    """Raised by a line callback: stop this run now (it is being pruned)."""


class TrialInterrupted(Exception):
    """The trial was stopped from outside (Ctrl-C, SIGTERM); REPORT says so."""

    def __init__(self, report: RunReport) -> None:
        super().__init__(report.message or "trial interrupted")
        self.report = report
