"""What an executor is asked to run: one trial, described by the trial contract."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from skylab_trainer.report import RunReport


@dataclass(frozen=True)
class TrialLaunch:
    name: str  # deterministic: <campaign>-<NNNN>
    repo: str  # URL or path the trainer fetches the commit from
    commit: str
    command: str
    time_budget_seconds: float
    max_wall_time_seconds: float
    metric_name: str
    metric_pattern: str
    env: Mapping[str, str] = field(default_factory=dict)


class TrialInterrupted(Exception):
    """The trial was stopped from outside (Ctrl-C, SIGTERM); REPORT says so."""

    def __init__(self, report: RunReport) -> None:
        super().__init__(report.message or "trial interrupted")
        self.report = report
