"""The steps of a trial, shared by both drivers: `skylab run` and the operator.

Each driver waits in its own way (a process, or watch events) and runs a trial where it
can (a subprocess, or a Job), but what it does at each step is here: build a proposal's
context, start a trial, start its next run (with its seed), record a run, judge the
trial, record the verdict and move the campaign's branch, and say when to prune a run.
Every step reads the campaign afresh from the store and writes each fact once, so a
driver that dies between two steps repeats nothing and loses nothing when it comes back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from skylab import engine
from skylab.config import ExperimentConfig
from skylab.executors.base import TrialLaunch, trial_name
from skylab.store.db import (
    CampaignRecord,
    CampaignState,
    RunNotRunningError,
    RunRecord,
    Store,
    TrialNotRunningError,
    TrialRecord,
)
from skylab.strategies.base import Proposal, ProposalContext, Skipped
from skylab.workspace import Workspace
from skylab_trainer.progress import Progress
from skylab_trainer.report import RunReport

SEED_VARIABLE = "SKYLAB_SEED"


def objective_of(config: ExperimentConfig) -> engine.Objective:
    search, max_vram = config.search, config.constraints.max_vram_gb
    return engine.Objective(
        direction=search.direction,
        min_improvement=search.min_improvement,
        max_vram_mb=max_vram * 1024 if max_vram else None,
    )


def end_state(stop: engine.Stop) -> CampaignState:
    """How a campaign that stops for STOP's reason is recorded."""
    return "failed" if stop.reason in engine.FAILURE_ENDS else "succeeded"


@dataclass(frozen=True)
class Settled:
    """A trial judged: decided (TRIAL is its final record) or needing another run.

    DECIDED_NOW: this call recorded the verdict (not an earlier one, nor another driver).
    """

    judgement: engine.Judgement
    trial: TrialRecord
    decided_now: bool = False


class TrialSteps:
    """The steps for one campaign, on one store connection."""

    def __init__(
        self,
        store: Store,
        campaign: CampaignRecord,
        config: ExperimentConfig,
        workspace: Workspace,
    ) -> None:
        self.store = store
        self.campaign = campaign
        self.config = config
        self.workspace = workspace
        self.objective = objective_of(config)
        self.policy = config.decision.policy()

    @property
    def baseline_commit(self) -> str:
        commit: str = self.campaign.config["baseline_commit"]
        return commit

    def trials(self) -> list[TrialRecord]:
        return self.store.trials(self.campaign.id)

    def best(self, trials: Sequence[TrialRecord]) -> TrialRecord | None:
        best = engine.best_kept([t.view() for t in trials], self.objective)
        return next((t for t in trials if best is not None and t.number == best.number), None)

    # Proposals and trials

    def proposal_context(
        self, trials: Sequence[TrialRecord], action: engine.Propose
    ) -> ProposalContext:
        # Running trials are part of the history: parallel proposals must differ.
        past = [trial.past() for trial in trials]
        best = self.best([t for t in trials if t.status != "running"])
        parent = action.parent_commit
        return ProposalContext(
            experiment=self.config,
            parent_commit=parent,
            read_file=lambda path: self.workspace.read_file(parent, path),
            history=past,
            best=next((p for p in past if best is not None and p.number == best.number), None),
        )

    def start_trial(
        self,
        number: int,
        commit: str,
        parent: str | None,
        proposal: Proposal,
        strategy: str,
    ) -> TrialRecord:
        """Record trial NUMBER (the baseline when PARENT is None); it has no run yet."""
        if parent is None:
            self.workspace.mark_baseline(number, commit)
        return self.store.start_trial(
            self.campaign.id,
            number,
            is_baseline=parent is None,
            commit=commit,
            parent_commit=parent,
            strategy="baseline" if parent is None else strategy,
            description=proposal.description,
            rationale=proposal.rationale,
            diff="" if parent is None else self.workspace.diff(parent, commit),
            params=dict(proposal.params),
            usage=proposal.usage,
        )

    def skip(self, action: engine.Propose, strategy: str, skipped: Skipped) -> TrialRecord:
        """A proposal given up before it ran: recorded, never run."""
        return self.store.record_skipped(
            self.campaign.id,
            action.number,
            parent_commit=action.parent_commit,
            strategy=strategy,
            skipped=skipped,
        )

    # Runs

    def start_run(self, trial: TrialRecord) -> RunRecord:
        """Record the trial's next run as started, with the seed of its place."""
        going = next((run for run in trial.runs if run.status == "running"), None)
        if going is not None:
            return going
        counted = sum(1 for run in trial.runs if run.view().counted)
        number = max((run.number for run in trial.runs), default=0) + 1
        return self.store.start_run(trial.id, number, self.config.decision.seed(counted + 1))

    def launch(
        self, trial: TrialRecord, run: RunRecord, repo: str, env: Mapping[str, str]
    ) -> TrialLaunch:
        """What an executor runs for RUN: the trial contract, the run's seed in its env."""
        config = self.config
        seeded = {**config.execution.env, **env}
        if run.seed is not None:
            seeded[SEED_VARIABLE] = str(run.seed)
        return TrialLaunch(
            # The operator's records are NAMESPACE/NAME; its trials are named after NAME.
            trial=trial_name(self.campaign.name.rsplit("/", 1)[-1], trial.number),
            run=run.number,
            repo=repo,
            commit=trial.commit,
            command=config.execution.command,
            time_budget_seconds=config.execution.time_budget_seconds,
            max_wall_time_seconds=config.max_trial_wall_time,
            metric_name=config.search.metric,
            metric_pattern=config.search.metric_pattern,
            env=seeded,
        )

    def record_run(
        self, trial: TrialRecord, number: int, report: RunReport, pruned: str | None = None
    ) -> RunRecord:
        """Record run NUMBER's report, once: a second call returns what the first recorded."""
        try:
            return self.store.finish_run(trial.id, number, report, pruned=pruned)
        except RunNotRunningError:
            recorded = self.store.get_trial(self.campaign.id, trial.number)
            run = recorded.run(number) if recorded is not None else None
            assert run is not None
            return run

    # Verdicts

    def settle(self, number: int, *, budget_spent: bool = False) -> Settled:
        """Judge trial NUMBER (none of its runs going): record a verdict, or ask for a run.

        BUDGET_SPENT: the campaign starts nothing more, so the trial is decided on the runs
        it has. A trial decided before (the best kept one, measured again) keeps its verdict.
        """
        trials = self.trials()
        trial = next(t for t in trials if t.number == number)
        if trial.status != "running":
            return Settled(
                engine.Verdict(bool(trial.kept), trial.decision_reason, trial.status), trial
            )
        decided = [t for t in trials if t.status != "running"]
        best = None if trial.is_baseline else self.best(decided)
        views = [t.view() for t in trials]
        sigma = engine.pooled_sigma(views, self.policy.sigma_floor)
        judgement = engine.judge(
            self.objective,
            self.policy,
            trial.view(),
            None if best is None else best.view(),
            sigma,
            budget_spent=budget_spent,
        )
        if isinstance(judgement, engine.RunAgain):
            return Settled(judgement, trial)
        return Settled(judgement, *self._record(trial, judgement, trials))

    def finish(self, trial: TrialRecord, verdict: engine.Verdict) -> TrialRecord:
        """Record VERDICT once and move the branch to the best kept trial."""
        return self._record(trial, verdict)[0]

    def _record(
        self,
        trial: TrialRecord,
        verdict: engine.Verdict,
        trials: Sequence[TrialRecord] | None = None,
    ) -> tuple[TrialRecord, bool]:
        """Record VERDICT; TRIALS, the campaign's as read just before, saves reading them
        again to find the best. True: this call recorded it."""
        try:
            trial = self.store.finish_trial(trial.id, verdict, self.config.search.metric)
            now = True
        except TrialNotRunningError:
            recorded = self.store.get_trial(self.campaign.id, trial.number)
            assert recorded is not None
            trial, now = recorded, False
        after = None if trials is None else [trial if t.id == trial.id else t for t in trials]
        self.advance_branch(after)
        return trial, now

    def advance_branch(self, trials: Sequence[TrialRecord] | None = None) -> None:
        """The branch follows the database: its head is the best kept trial's commit."""
        best = self.best(self.trials() if trials is None else trials)
        self.workspace.advance(best.commit if best else self.baseline_commit)

    # Early stopping

    def pruner(self, trial: TrialRecord) -> Pruner:
        """What tells when the run of TRIAL that starts now should stop early.

        Only a trial's first run is ever pruned: confirmation runs are asked for because
        the first was promising, and stopping one would throw away what is paid for. The
        baseline is never pruned.
        """
        confirming = any(run.view().counted for run in trial.runs)
        if trial.is_baseline or confirming or not (self.policy.aware and self.policy.prune):
            return Pruner(self.policy, [], [])
        trials = self.trials()
        baseline = next((t for t in trials if t.is_baseline and t.kept), None)
        best = self.best([t for t in trials if t.status != "running"])
        return Pruner(self.policy, self._curves(best), self._curves(baseline))

    def _curves(self, trial: TrialRecord | None) -> list[list[engine.CurvePoint]]:
        if trial is None:
            return []
        curves = [
            curve(self.store.progress(trial.id, run.number))
            for run in trial.runs
            if run.status == "success"
        ]
        return [points for points in curves if points]


def curve(progress: Sequence[Progress]) -> list[engine.CurvePoint]:
    """A run's training loss by the share of its budget spent."""
    return [
        engine.CurvePoint(item.percent_done / 100, item.loss)
        for item in progress
        if item.percent_done is not None and item.loss is not None
    ]


class Pruner:
    """Follows one run's progress and says when it cannot catch up with the best."""

    def __init__(
        self,
        policy: engine.NoisePolicy,
        best_curves: list[list[engine.CurvePoint]],
        baseline_curves: list[list[engine.CurvePoint]],
    ) -> None:
        self.policy = policy
        self.best_curves = best_curves
        self.baseline_curves = baseline_curves

    def check(self, progress: Sequence[Progress]) -> str | None:
        """Why the run whose progress so far is PROGRESS should stop, or None."""
        if not self.best_curves:
            return None
        return engine.prune_reason(
            self.policy, curve(progress), self.best_curves, self.baseline_curves
        )
