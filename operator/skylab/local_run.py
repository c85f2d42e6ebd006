"""`skylab run`: the research loop on one machine.

propose -> commit -> train (local executor) -> measure -> keep or revert, one trial
after another, each trial run as many times as `skylab.engine` asks before it decides,
every step taken by `skylab.trial_steps` and every run recorded in PostgreSQL before
the next one starts.
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
from skylab.activity import ActivityClock
from skylab.config import ExperimentConfig
from skylab.console import Console
from skylab.errors import UserError
from skylab.executors.base import StopRun, TrialInterrupted, trial_name
from skylab.executors.local import LocalExecutor
from skylab.experiments import baseline_files
from skylab.home import Home
from skylab.store import open_database
from skylab.store.db import CampaignRecord, Store, TrialRecord
from skylab.strategies import build_strategy
from skylab.strategies.base import (
    Exhausted,
    Proposal,
    Skipped,
    Strategy,
    StrategyFailed,
)
from skylab.trial_steps import Pruner, Settled, TrialSteps, end_state
from skylab.workspace import Workspace
from skylab_trainer.progress import Progress, parse_progress
from skylab_trainer.report import RunReport

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
            Store.connect(url, connections=2) as store,  # the loop, and the budget clock
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
        self.steps = TrialSteps(store, campaign, config, self.workspace)
        self.executor = LocalExecutor(request.home.runs_dir(campaign.name))
        self.clock = ActivityClock(lambda: store)
        settings = campaign.config
        self.limits = engine.CampaignLimits(
            max_trials=request.max_trials or settings.get("max_trials"),
            budget_seconds=request.budget_seconds or settings.get("budget_seconds"),
            max_consecutive_failures=config.constraints.max_consecutive_failures,
        )

    def run(self) -> CampaignRecord:
        interrupted = self.store.mark_running_runs_killed(
            self.campaign.id, "skylab stopped while the run ran"
        )
        for trial, run in interrupted:
            self.console.say(f"{self._label(trial)} run {run} was interrupted: it runs again")
        self.store.set_campaign_status(self.campaign.id, "running")
        self.steps.advance_branch()  # repair it if skylab died between the two
        self.console.say(
            f"campaign {self.campaign.name}: branch {self.workspace.branch} "
            f"in {self.workspace.git_dir}"
        )
        exhausted: str | None = None
        self.clock.run().start(self.campaign.id)
        try:
            while True:
                trials = self.steps.trials()
                action = engine.next_action(
                    [t.view() for t in trials],
                    self.limits,
                    self.steps.objective,
                    self.clock.elapsed(self.campaign.id),
                    exhausted,
                    self.steps.policy,
                )
                if isinstance(action, engine.Stop):
                    return self._stop(action)
                if isinstance(action, engine.NextRun):
                    self._run(next(t for t in trials if t.number == action.number))
                elif isinstance(action, engine.StartBaseline):
                    proposal = Proposal(description="baseline", edits=())
                    self._start(action.number, self.steps.baseline_commit, None, proposal)
                else:
                    found = self._propose(action, trials)
                    if isinstance(found, engine.Stop):
                        return self._stop(found)
                    if isinstance(found, Exhausted):
                        exhausted = found.message
        except KeyboardInterrupt as exc:
            self.store.set_campaign_status(self.campaign.id, "interrupted", "interrupted")
            raise CampaignInterrupted(self.campaign.name) from exc
        finally:
            self.clock.stop(self.campaign.id)
            self.clock.close()

    def _propose(
        self, action: engine.Propose, trials: list[TrialRecord]
    ) -> Proposal | Skipped | Exhausted | engine.Stop:
        try:
            found = self.strategy.propose(self.steps.proposal_context(trials, action))
        except StrategyFailed as exc:
            message = f"{exc}; continue with `skylab run --resume`"
            return engine.Stop(engine.EndReason.STRATEGY_FAILED, message)
        if isinstance(found, Skipped):
            self.steps.skip(action, self.strategy.name, found)
            self.console.say(f"{self._label(action.number)} skipped: {found.reason}")
        elif isinstance(found, Proposal):
            commit = self.workspace.commit_trial(
                action.number, action.parent_commit, found.edits, found.description
            )
            self._start(action.number, commit, action.parent_commit, found)
        return found

    def _start(self, number: int, commit: str, parent: str | None, proposal: Proposal) -> None:
        self.steps.start_trial(number, commit, parent, proposal, self.strategy.name)
        self.console.say(f"{self._label(number)} started: {proposal.description} ({commit[:7]})")

    def _run(self, trial: TrialRecord) -> None:
        """One run of TRIAL, recorded, then the trial judged."""
        run = self.steps.start_run(trial)
        label = self._label(trial.number)
        if run.number > 1:
            self.console.say(f"{label} run {run.number}: seed {run.seed}")
        env = {"SKYLAB_DATA_DIR": str(self.data_dir)}
        # `python` in the experiment's command must be this interpreter.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
        launch = self.steps.launch(trial, run, str(self.workspace.git_dir), env)
        recorder = _ProgressRecorder(self.store, trial.id, run.number, self.console, label)
        recorder.pruner = self.steps.pruner(trial)
        try:
            report = self.executor.run(launch, recorder.on_line)
        except TrialInterrupted as stop:
            recorder.flush()
            self.steps.record_run(trial, run.number, stop.report)
            self.console.say(f"{label} run {run.number} killed: go on with --resume")
            raise KeyboardInterrupt from stop
        recorder.flush()
        recorded = self.steps.record_run(trial, run.number, report, pruned=recorder.pruned)
        if trial.status != "running":
            self._remeasured(trial, recorded.number)
            return
        self._settle(trial.number, run.number, report, recorder.pruned)

    def _remeasured(self, trial: TrialRecord, run: int) -> None:
        """The best kept trial ran once more: its mean, not its verdict, moved, and the
        trials waiting for that run are judged against the new mean."""
        trials = self.steps.trials()
        now = next(t for t in trials if t.number == trial.number)
        self.console.say(
            f"{self._label(trial.number)} run {run} (the best, measured again): "
            f"{self.config.search.metric}={_mean(now)}"
        )
        for waiting in trials:
            if waiting.status == "running" and waiting.view().counted_runs:
                settled = self._judge(waiting.number)
                if isinstance(settled.judgement, engine.Verdict):
                    self._say_verdict(settled.trial)

    def _judge(self, number: int) -> Settled:
        spent = self.limits.budget_spent(self.clock.elapsed(self.campaign.id))
        return self.steps.settle(number, budget_spent=spent)

    def _settle(self, number: int, run: int, report: RunReport, pruned: str | None) -> None:
        settled = self._judge(number)
        label = self._label(number)
        metric_name = self.config.search.metric
        if pruned is not None:
            self.console.say(f"{label} run {run} pruned: {pruned}")
        if isinstance(settled.judgement, engine.RunAgain):
            value = "-" if report.metric is None else f"{report.metric:.6f}"
            self.console.say(f"{label} run {run} {metric_name}={value}: {settled.judgement.reason}")
            return
        self._say_verdict(settled.trial)

    def _say_verdict(self, trial: TrialRecord) -> None:
        label = self._label(trial.number)
        metric_name = self.config.search.metric
        verdict = "kept" if trial.kept else "reverted"
        value = _mean(trial)
        detail = f": {trial.message}" if trial.status not in ("success", "pruned") else ""
        self.console.say(
            f"{label} {trial.status} {metric_name}={value} -> {verdict} "
            f"({trial.decision_reason}){detail}"
        )

    def _label(self, number: int) -> str:
        return trial_name(self.campaign.name, number)

    def _stop(self, stop: engine.Stop) -> CampaignRecord:
        status = end_state(stop)
        self.store.set_campaign_status(self.campaign.id, status, stop.message)
        self.console.say(f"campaign {self.campaign.name} {status}: {stop.message}")
        campaign = self.store.get_campaign(self.campaign.name)
        assert campaign is not None
        return campaign


def _mean(trial: TrialRecord) -> str:
    if trial.metric is None:
        return "-"
    if trial.run_count > 1 and trial.metric_sd is not None:
        return f"{trial.metric:.6f} ± {trial.metric_sd:.6f} (n={trial.run_count})"
    return f"{trial.metric:.6f}"


class _ProgressRecorder:
    """Turns the trainer's output into the live line, batched progress rows and, once the
    run cannot catch up with the best, a request to stop it."""

    def __init__(self, store: Store, trial_id: int, run: int, console: Console, label: str) -> None:
        self.store = store
        self.trial_id = trial_id
        self.run = run
        self.console = console
        self.label = label
        self.pending: list[Progress] = []
        self.seen: list[Progress] = []
        self.last_flush = time.monotonic()
        self.pruner: Pruner | None = None
        self.pruned: str | None = None

    def on_line(self, line: str) -> None:
        progress = parse_progress(line)
        if progress is None:
            return
        self.console.progress(self.label, progress)
        self.pending.append(progress)
        self.seen.append(progress)
        if time.monotonic() - self.last_flush >= _PROGRESS_FLUSH_SECONDS:
            self.flush()
        if self.pruner is not None and self.pruned is None:
            self.pruned = self.pruner.check(self.seen)
            if self.pruned is not None:
                raise StopRun(self.pruned)

    def flush(self) -> None:
        if self.pending:
            self.store.add_progress(self.trial_id, self.run, self.pending)
            self.pending = []
        self.last_flush = time.monotonic()
