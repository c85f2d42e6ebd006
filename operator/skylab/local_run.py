"""`skylab run`: the research loop on one machine.

propose -> commit -> train (local executor) -> measure -> keep or revert, one trial
after another, with every decision taken by `skylab.engine` and every trial
recorded in PostgreSQL before the next one starts.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from skylab import engine
from skylab.config import ExperimentConfig
from skylab.console import Console
from skylab.errors import UserError
from skylab.executors.base import TrialInterrupted, TrialLaunch
from skylab.executors.local import LocalExecutor
from skylab.experiments import baseline_files
from skylab.home import Home
from skylab.store import open_database
from skylab.store.db import CampaignRecord, CampaignState, Store, TrialRecord
from skylab.strategies import build_strategy
from skylab.strategies.base import (
    Exhausted,
    Proposal,
    ProposalContext,
    Skipped,
    Strategy,
    StrategyFailed,
)
from skylab.workspace import Workspace
from skylab_trainer.progress import Progress, parse_progress
from skylab_trainer.report import RunReport, RunStatus

# Stop reasons that mean the campaign did not end well.
_FAILURE_STOPS = {
    engine.StopReason.CONSECUTIVE_FAILURES,
    engine.StopReason.BASELINE_FAILED,
    engine.StopReason.STRATEGY_FAILED,
}
# Progress rows are written in batches, at most this often.
_PROGRESS_FLUSH_SECONDS = 2.0


@dataclass(frozen=True)
class RunRequest:
    experiment: ExperimentConfig
    strategy: str | None
    tag: str | None
    resume: bool
    max_trials: int | None
    budget_seconds: float | None
    home: Home
    database_url: str | None


class CampaignInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped the campaign; it can be resumed."""


def run(request: RunRequest, console: Console) -> CampaignRecord:
    """Run (or resume) a campaign until the engine says stop."""
    config = request.experiment
    # Everything a user can get wrong is checked before anything starts; a resumed
    # campaign's strategy is known once its record is read.
    strategy = None if request.resume else _strategy(request.strategy or "sweep", config)
    data_dir = request.home.data_dir(config.name)
    with request.home.exclusive():
        if not (data_dir / config.prepare.ready_marker).exists():
            profile = f" --profile {config.profile}" if config.profile else ""
            raise UserError(
                f"no prepared data for {config.name} in {data_dir}: "
                f"run `skylab prepare {config.name}{profile}` first"
            )
        with (
            open_database(request.database_url, request.home.postgres_dir) as url,
            Store.connect(url) as store,
        ):
            if strategy is None:
                campaign = _resumed_campaign(store, request)
                strategy = _strategy(campaign.strategy, config)
            else:
                campaign = _new_campaign(store, request, strategy.name)
            loop = _Loop(store, campaign, config, strategy, request, data_dir, console)
            return loop.run()


def _strategy(name: str, config: ExperimentConfig) -> Strategy:
    strategy = build_strategy(name, config)
    try:
        strategy.check_access()
    except StrategyFailed as exc:
        raise UserError(f"strategy {name}: {exc}") from None
    return strategy


def _resumed_campaign(store: Store, request: RunRequest) -> CampaignRecord:
    config = request.experiment
    campaign = (
        store.get_campaign(request.tag) if request.tag else store.latest_campaign(config.name)
    )
    if campaign is None:
        which = f"campaign {request.tag!r}" if request.tag else f"a campaign of {config.name}"
        raise UserError(f"--resume: found no {which} to resume")
    if campaign.experiment != config.name:
        raise UserError(
            f"--resume: campaign {campaign.name!r} ran experiment {campaign.experiment!r}, "
            f"not {config.name!r}"
        )
    if campaign.profile != config.profile:
        raise UserError(
            f"--profile: campaign {campaign.name!r} was started with profile "
            f"{campaign.profile!r}; resume it with the same profile"
        )
    if request.strategy is not None and request.strategy != campaign.strategy:
        raise UserError(
            f"--strategy: campaign {campaign.name!r} runs strategy {campaign.strategy!r}; "
            "resume it without --strategy"
        )
    return campaign


def _new_campaign(store: Store, request: RunRequest, strategy: str) -> CampaignRecord:
    config = request.experiment
    name = request.tag or f"{config.name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    if store.get_campaign(name) is not None:
        raise UserError(f"--tag: campaign {name!r} already exists (use --resume or another tag)")
    workspace_dir = request.home.workspace(name)
    # A workspace without a campaign row is left from a start that died half way.
    shutil.rmtree(workspace_dir, ignore_errors=True)
    _, baseline = Workspace.create(workspace_dir, name, baseline_files(config))
    settings: dict[str, Any] = {
        "experiment_root": str(config.root),
        "baseline_commit": baseline,
        "metric": config.search.metric,
        "direction": config.search.direction,
        "max_trials": request.max_trials,
        "budget_seconds": request.budget_seconds,
    }
    return store.create_campaign(
        name=name,
        experiment=config.name,
        strategy=strategy,
        profile=config.profile,
        branch=f"skylab/{name}",
        config=settings,
    )


class _Loop:
    def __init__(
        self,
        store: Store,
        campaign: CampaignRecord,
        config: ExperimentConfig,
        strategy: Strategy,
        request: RunRequest,
        data_dir: Path,
        console: Console,
    ) -> None:
        self.store = store
        self.campaign = campaign
        self.config = config
        self.strategy = strategy
        self.console = console
        self.data_dir = data_dir
        self.workspace = Workspace(request.home.workspace(campaign.name), campaign.name)
        self.executor = LocalExecutor(request.home.runs_dir(campaign.name))
        settings = campaign.config
        self.baseline_commit: str = settings["baseline_commit"]
        self.limits = engine.Limits(
            max_trials=request.max_trials or settings.get("max_trials"),
            budget_seconds=request.budget_seconds or settings.get("budget_seconds"),
            max_consecutive_failures=config.constraints.max_consecutive_failures,
        )
        max_vram = config.constraints.max_vram_gb
        self.objective = engine.Objective(
            direction=config.search.direction,
            min_improvement=config.search.min_improvement,
            max_vram_mb=max_vram * 1024 if max_vram else None,
        )

    def run(self) -> CampaignRecord:
        interrupted = self.store.mark_running_trials_killed(
            self.campaign.id, "skylab stopped while the trial ran"
        )
        if interrupted:
            self.console.say(f"recorded {len(interrupted)} interrupted trial(s) as killed")
        self.store.set_campaign_status(self.campaign.id, "running")
        self._reconcile_branch()
        self.console.say(
            f"campaign {self.campaign.name}: branch {self.workspace.branch} "
            f"in {self.workspace.git_dir}"
        )
        exhausted: str | None = None
        try:
            while True:
                trials = self.store.trials(self.campaign.id)
                action = engine.next_action(
                    [t.view() for t in trials],
                    self.limits,
                    self.objective,
                    _elapsed(trials),
                    exhausted,
                )
                if isinstance(action, engine.Stop):
                    return self._stop(action)
                if isinstance(action, engine.StartBaseline):
                    proposal = Proposal(description="baseline", edits=())
                    self._run_trial(action.number, self.baseline_commit, None, proposal)
                    continue
                try:
                    found = self.strategy.propose(self._context(action, trials))
                except StrategyFailed as exc:
                    message = f"{exc}; continue with `skylab run --resume`"
                    return self._stop(engine.Stop(engine.StopReason.STRATEGY_FAILED, message))
                if isinstance(found, Exhausted):
                    exhausted = found.message
                elif isinstance(found, Skipped):
                    self._skip(action, found)
                else:
                    commit = self.workspace.commit_trial(
                        action.number, action.parent_commit, found.edits, found.description
                    )
                    self._run_trial(action.number, commit, action.parent_commit, found)
        except KeyboardInterrupt as exc:
            self.store.set_campaign_status(self.campaign.id, "interrupted", "interrupted")
            raise CampaignInterrupted(self.campaign.name) from exc

    def _skip(self, action: engine.Propose, skipped: Skipped) -> None:
        self.store.record_skipped(
            self.campaign.id,
            action.number,
            parent_commit=action.parent_commit,
            strategy=self.strategy.name,
            skipped=skipped,
        )
        self.console.say(f"{self.campaign.name}-{action.number:04d} skipped: {skipped.reason}")

    def _run_trial(self, number: int, commit: str, parent: str | None, proposal: Proposal) -> None:
        baseline = parent is None
        if baseline:
            self.workspace.mark_baseline(number, commit)
        trial = self.store.start_trial(
            campaign_id=self.campaign.id,
            number=number,
            is_baseline=baseline,
            commit=commit,
            parent_commit=parent,
            strategy="baseline" if baseline else self.strategy.name,
            description=proposal.description,
            rationale=proposal.rationale,
            diff="" if parent is None else self.workspace.diff(parent, commit),
            params=dict(proposal.params),
            usage=proposal.usage,
        )
        label = f"{self.campaign.name}-{number:04d}"
        self.console.say(f"{label} started: {proposal.description} ({commit[:7]})")
        recorder = _ProgressRecorder(self.store, trial.id, self.console, label)
        try:
            report = self.executor.run(self._launch(label, commit), recorder.on_line)
        except TrialInterrupted as stop:
            recorder.flush()
            self.store.finish_trial(trial.id, stop.report, kept=False, decision_reason="killed")
            self.console.say(f"{label} killed: the campaign can go on with --resume")
            raise KeyboardInterrupt from stop
        recorder.flush()
        self._decide(trial, report)

    def _decide(self, trial: TrialRecord, report: RunReport) -> None:
        best = engine.best_kept(
            [t.view() for t in self.store.trials(self.campaign.id)], self.objective
        )
        outcome = engine.Outcome(str(report.status), report.metric, report.peak_vram_mb)
        decision = engine.decide(
            self.objective, outcome, best.metric if best else None, trial.is_baseline
        )
        self.store.finish_trial(
            trial.id, report, kept=decision.kept, decision_reason=decision.reason
        )
        if decision.kept:
            self.workspace.advance(trial.commit)
        verdict = "kept" if decision.kept else "reverted"
        value = f"{report.metric:.6f}" if report.metric is not None else "-"
        detail = f": {report.message}" if report.status != RunStatus.SUCCESS else ""
        self.console.say(
            f"{self.campaign.name}-{trial.number:04d} {report.status} "
            f"{self.config.search.metric}={value} -> {verdict} ({decision.reason}){detail}"
        )

    def _launch(self, name: str, commit: str) -> TrialLaunch:
        env = {**self.config.execution.env, "SKYLAB_DATA_DIR": str(self.data_dir)}
        # `python` in the experiment's command must be this interpreter.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
        return TrialLaunch(
            name=name,
            repo=str(self.workspace.git_dir),
            commit=commit,
            command=self.config.execution.command,
            time_budget_seconds=self.config.execution.time_budget_seconds,
            max_wall_time_seconds=self.config.max_trial_wall_time,
            metric_name=self.config.search.metric,
            metric_pattern=self.config.search.metric_pattern,
            env=env,
        )

    def _context(self, action: engine.Propose, trials: list[TrialRecord]) -> ProposalContext:
        past = [t.past() for t in trials if t.status != "running"]
        best = engine.best_kept([t.view() for t in trials], self.objective)
        best_past = next((p for p in past if best and p.number == best.number), None)
        return ProposalContext(
            experiment=self.config,
            parent_commit=action.parent_commit,
            read_file=lambda path: self.workspace.read_file(action.parent_commit, path),
            history=past,
            best=best_past,
        )

    def _reconcile_branch(self) -> None:
        """The branch follows the database: repair it if skylab died between the two."""
        best = engine.best_kept(
            [t.view() for t in self.store.trials(self.campaign.id)], self.objective
        )
        self.workspace.advance(best.commit if best else self.baseline_commit)

    def _stop(self, stop: engine.Stop) -> CampaignRecord:
        status: CampaignState = "failed" if stop.reason in _FAILURE_STOPS else "succeeded"
        self.store.set_campaign_status(self.campaign.id, status, stop.message)
        self.console.say(f"campaign {self.campaign.name} {status}: {stop.message}")
        campaign = self.store.get_campaign(self.campaign.name)
        assert campaign is not None
        return campaign


class _ProgressRecorder:
    """Turns the trainer's output into the live line and batched progress rows."""

    def __init__(self, store: Store, trial_id: int, console: Console, label: str) -> None:
        self.store = store
        self.trial_id = trial_id
        self.console = console
        self.label = label
        self.pending: list[Progress] = []
        self.last_flush = time.monotonic()

    def on_line(self, line: str) -> None:
        progress = parse_progress(line)
        if progress is None:
            return
        self.console.progress(self.label, progress)
        self.pending.append(progress)
        if time.monotonic() - self.last_flush >= _PROGRESS_FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.store.add_progress(self.trial_id, self.pending)
            self.pending = []
        self.last_flush = time.monotonic()


def _elapsed(trials: list[TrialRecord]) -> float:
    """Seconds the campaign has spent on trials, across every resume."""
    now = datetime.now(UTC)
    return sum(((t.finished_at or now) - t.created_at).total_seconds() for t in trials)
