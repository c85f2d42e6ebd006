"""The trial steps both drivers call, on a real PostgreSQL and a real campaign repository:
seeds by a run's place, reports recorded once, verdicts recorded once, the branch."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.toy_experiment import write_toy_experiment

from skylab import engine
from skylab.config import load_experiment
from skylab.experiments import baseline_files
from skylab.store import Store
from skylab.strategies.base import FileEdit, Proposal
from skylab.trial_steps import TrialSteps
from skylab.workspace import Workspace
from skylab_trainer.report import RunReport, RunStatus

GRID = """
[strategy.sweep.parameters.LR]
values = [0.2]
"""
AWARE = """
[decision]
baseline_runs = 2
confirm_runs = 1
first_seed = 7
"""


@pytest.fixture(name="steps")
def steps_fixture(tmp_path: Path, store: Store) -> TrialSteps:
    config = load_experiment(write_toy_experiment(tmp_path / "toy", GRID, decision=AWARE))
    workspace, baseline = Workspace.create(tmp_path / "c.git", "c", baseline_files(config))
    campaign = store.create_campaign(
        "c", "toy", "sweep", None, "skylab/c", {"baseline_commit": baseline}
    )
    return TrialSteps(store, campaign, config, workspace)


def ok(metric: float) -> RunReport:
    return RunReport(RunStatus.SUCCESS, "val_bpb", metric)


def test_runs_are_seeded_by_their_place_and_a_report_is_recorded_once(
    steps: TrialSteps,
) -> None:
    trial = steps.start_trial(1, steps.baseline_commit, None, Proposal("baseline", ()), "sweep")
    first = steps.start_run(trial)
    assert (first.number, first.seed) == (1, 7)
    assert steps.start_run(steps.store.get_trial(steps.campaign.id, 1)) == first  # going
    steps.record_run(trial, 1, ok(1.0))
    again = steps.record_run(trial, 1, RunReport(RunStatus.CRASH, "val_bpb"))
    assert (again.status, again.metric) == ("success", 1.0)  # the first report stands
    settled = steps.settle(1)
    assert isinstance(settled.judgement, engine.RunAgain)  # baseline_runs = 2

    second = steps.start_run(settled.trial)
    steps.record_run(settled.trial, second.number, RunReport(RunStatus.KILLED, "val_bpb"))
    replacement = steps.start_run(steps.trials()[0])
    assert (replacement.number, replacement.seed) == (3, 8)  # the killed run's place
    launch = steps.launch(steps.trials()[0], replacement, "repo", {"A": "1"})
    assert launch.name == "c-0001-r3" and launch.env["SKYLAB_SEED"] == "8"
    assert launch.env["A"] == "1"


def test_a_verdict_is_recorded_once_and_moves_the_branch(steps: TrialSteps) -> None:
    baseline = steps.start_trial(1, steps.baseline_commit, None, Proposal("baseline", ()), "sweep")
    for value in (1.0, 1.02):
        run = steps.start_run(steps.store.get_trial(steps.campaign.id, 1))  # type: ignore[arg-type]
        steps.record_run(baseline, run.number, ok(value))
    kept = steps.settle(1)
    assert isinstance(kept.judgement, engine.Verdict) and kept.trial.kept
    assert kept.trial.metric == pytest.approx(1.01) and kept.trial.run_count == 2

    edit = FileEdit("train.py", steps.workspace.read_file(steps.baseline_commit, "train.py"))
    commit = steps.workspace.commit_trial(
        2, steps.baseline_commit, (FileEdit(edit.path, edit.content + "\n"),), "LR=0.2"
    )
    candidate = steps.start_trial(2, commit, steps.baseline_commit, Proposal("LR=0.2", ()), "s")
    for value in (0.9, 0.91):
        current = steps.store.get_trial(steps.campaign.id, 2)
        assert current is not None
        run = steps.start_run(current)
        steps.record_run(candidate, run.number, ok(value))
        settled = steps.settle(2)
    assert isinstance(settled.judgement, engine.Verdict) and settled.judgement.kept
    assert steps.workspace.head() == commit
    # Settling a decided trial again records nothing new and says what was decided.
    assert steps.settle(2).trial == settled.trial
    assert steps.finish(settled.trial, engine.Verdict(False, "again", "crash")) == settled.trial
