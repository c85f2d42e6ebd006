"""Reconciling a Trial: the Job of each of its runs, its phase while a run goes, its
verdict once the runs are judged.

A run's report is recorded in PostgreSQL once (a run row can leave `running` one time),
then the trial steps judge it: another run (a new Job) or the verdict, recorded once,
then published on the Trial's status. A restart between any two of these publishes what
is recorded; it never runs or decides anything twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from skylab import engine
from skylab.api.models import Decision, TrialPhase, TrialSpec
from skylab.controller.campaigns import (
    CampaignController,
    owner_reference,
    timestamp,
)
from skylab.controller.context import CampaignContext
from skylab.controller.events import post
from skylab.controller.kubeapi import KubeApi, Manifest
from skylab.controller.reports import (
    PHASE_OF_STATUS,
    JobState,
    job_state,
    reporting_pod,
    trial_ending,
)
from skylab.controller.sources import CampaignSetupError
from skylab.executors.base import run_name, trial_name
from skylab.executors.kubernetes import RUN_LABEL, TRIAL_LABEL, trial_job
from skylab.store.db import RunRecord, TrialRecord
from skylab.trial_steps import Pruner, TrialSteps
from skylab_trainer.progress import Progress, parse_progress
from skylab_trainer.report import RunReport, RunStatus

_REASON_OF_STATUS = {
    "success": "Completed",
    "crash": "Crashed",
    "timeout": "TimedOut",
    "killed": "Killed",
    "pruned": "Pruned",
}
Clock = Callable[[], datetime]


def decided(trial: Manifest) -> bool:
    """Whether the Trial shows its verdict."""
    return bool((trial.get("status") or {}).get("decision"))


def run_pods(trial: str, run: int) -> str:
    """The label selector of a run's pods."""
    return f"{TRIAL_LABEL}={trial},{RUN_LABEL}={run}"


class TrialController:
    def __init__(self, api: KubeApi, campaigns: CampaignController) -> None:
        self.api = api
        self.campaigns = campaigns
        self.opener = campaigns.opener
        self.metrics = campaigns.metrics
        self.clock: Clock = campaigns.clock
        # The state of each Job (by uid) when this controller last acted on it.
        self._acted: dict[str, JobState] = {}

    def acted_on(self, job_uid: str, state: JobState) -> bool:
        """True when the Job was last acted on in STATE: an event showing it again (its
        status changed, not its state) leaves nothing to do."""
        return self._acted.get(job_uid) == state

    def forget_job(self, job_uid: str) -> None:
        self._acted.pop(job_uid, None)

    def sync(self, namespace: str, name: str, campaign: str) -> None:
        """Bring the Trial NAME of CAMPAIGN up to date with its run's Job; act when it ended."""
        with self.campaigns.locks.hold(namespace, campaign):
            opened = self._open(namespace, campaign)
            trial = self.api.get_trial(namespace, name)
            if opened is None or trial is None:
                return
            if decided(trial):
                self._sync_decided(*opened, trial)
            else:
                self._sync(*opened, trial)

    def resync(self, namespace: str, campaign: str) -> None:
        """Sync each Trial of CAMPAIGN without a verdict, and its best (the one decided
        trial that still runs, measured again): missed events and writes that failed."""
        body = self.api.get_campaign(namespace, campaign)
        best = (((body or {}).get("status") or {}).get("best") or {}).get("trial")
        for trial in self.api.known_trials(namespace, campaign):
            name = trial["metadata"]["name"]
            if not decided(trial) or name == best:
                self.sync(namespace, name, campaign)

    def running(self, namespace: str, campaign: str) -> list[tuple[str, str]]:
        """CAMPAIGN's Trials whose Job runs: each Trial's name and its Job's."""
        running = []
        for trial in self.api.known_trials(namespace, campaign):
            status = trial.get("status") or {}
            if status.get("phase") == str(TrialPhase.RUNNING) and status.get("jobName"):
                running.append((trial["metadata"]["name"], status["jobName"]))
        return running

    def steps(self, context: CampaignContext) -> TrialSteps:
        return TrialSteps(
            self.opener.database.get(), context.record, context.config, context.workspace
        )

    def progress_source(self, namespace: str, name: str) -> ProgressSource | None:
        """Where a running trial's progress is: its row, its run going, that run's pod."""
        trial = self.api.get_trial(namespace, name)
        if trial is None:
            return None
        spec = TrialSpec.model_validate(trial["spec"])
        opened = self._open(namespace, spec.campaign)
        if opened is None:
            return None
        steps = self.steps(opened[1])
        row = steps.store.get_trial(opened[1].record.id, spec.number)
        run = None if row is None else _going(row)
        if row is None or run is None:
            return None
        pod = reporting_pod(self.api.list_pods(namespace, run_pods(name, run.number)))
        if pod is None:
            return None
        pruner = steps.pruner(row)
        return ProgressSource(spec.campaign, name, row, run.number, pod["metadata"]["name"], pruner)

    def record_progress(self, namespace: str, source: ProgressSource, since: int | None) -> None:
        """Store the progress lines of the run's pod log (of the last SINCE seconds); stop
        the run when it cannot catch up with the best."""
        log = self.api.pod_log(namespace, source.pod, since)
        items = [p for p in map(parse_progress, log.splitlines()) if p is not None]
        self.opener.database.get().add_progress(source.trial.id, source.run, items)
        if not items or not source.pruner.best_curves:
            return
        # Reads overlap: the same step seen again replaces what was read of it.
        source.seen.update((item.step, item) for item in items)
        reason = source.pruner.check([source.seen[step] for step in sorted(source.seen)])
        if reason is not None:
            self._prune(namespace, source, reason)

    def _prune(self, namespace: str, source: ProgressSource, reason: str) -> None:
        with self.campaigns.locks.hold(namespace, source.campaign):
            opened = self._open(namespace, source.campaign)
            if opened is None:
                return
            report = RunReport(RunStatus.KILLED, opened[1].config.search.metric, message=reason)
            # Recorded first: once the Job is gone, its run is pruned, not killed.
            self.steps(opened[1]).record_run(source.trial, source.run, report, pruned=reason)
            self.api.delete_job(namespace, run_name(source.trial_name, source.run))
            trial = self.api.get_trial(namespace, source.trial_name)
            if trial is not None:
                post(trial, "Pruned", f"run {source.run}: {reason}", warning=True)

    def _open(self, namespace: str, campaign: str) -> tuple[Manifest, CampaignContext] | None:
        body = self.api.get_campaign(namespace, campaign)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        try:
            return body, self.opener.open(body)
        except CampaignSetupError:
            return None  # the Campaign's own reconcile reports it

    def _sync(
        self,
        campaign: Manifest,
        context: CampaignContext,
        trial: Manifest,
        ended: Mapping[str, Any] | None = None,
    ) -> None:
        """ENDED: what the Trial shows of the run that has just ended, written with the
        next change of its status (its verdict, or its next run's Job)."""
        steps = self.steps(context)
        row = self.campaigns.ensure_row(context, steps.store, trial)
        if row.status != "running":  # decided before a restart: publish, never redecide
            self._publish(context, trial, row, ended=ended)
            self.campaigns.advance(campaign, context)
            return
        run = _going(row)
        if run is None and not row.view().counted_runs:  # none counted yet: run it
            run = steps.start_run(row)
        elif run is None:  # every run so far has ended: judge them
            spent = context.limits.budget_spent(self.campaigns.elapsed(context))
            settled = steps.settle(row.number, budget_spent=spent)
            if isinstance(settled.judgement, engine.Verdict):
                if settled.decided_now:
                    self._observe(settled.trial)
                self._publish(context, trial, settled.trial, ended=ended)
                self.campaigns.advance(campaign, context)
                return
            best = steps.best([t for t in steps.trials() if t.status != "running"])
            if best is not None and steps.policy.best_needs_run(best.view(), settled.trial.view()):
                if ended:
                    self.api.patch_trial_status(context.namespace, trial["metadata"]["name"], ended)
                self._remeasure(campaign, context, steps, best)
                return
            run = steps.start_run(settled.trial)
        now = self._follow(campaign, context, steps, trial, row, run, ended)
        if now is not None:
            self._sync(campaign, context, trial, now)  # judge it: another run, or done

    def _sync_decided(self, campaign: Manifest, context: CampaignContext, trial: Manifest) -> None:
        """A decided Trial's Job changed: follow the run of it going, if it is the best
        measured again, and let the trials waiting for that run go on."""
        steps = self.steps(context)
        number = TrialSpec.model_validate(trial["spec"]).number
        row = steps.store.get_trial(context.record.id, number)
        if row is None:
            return
        run = _going(row)
        if run is None:
            # Every run is recorded. If the writes after the last one failed (the Trial
            # does not show it yet), they are made again.
            shown = trial.get("status") or {}
            if any(shown.get(key) != value for key, value in _runs_status(row).items()):
                self._wake(campaign, context, steps, row.number)
            return
        if self._follow(campaign, context, steps, trial, row, run) is not None:
            self._wake(campaign, context, steps, row.number)

    def _remeasure(
        self, campaign: Manifest, context: CampaignContext, steps: TrialSteps, best: TrialRecord
    ) -> None:
        """Run the best kept trial once more before the trials waiting for it go on."""
        name = trial_name(context.name, best.number)
        body = self.api.get_trial(context.namespace, name)
        if body is None:
            return  # deleted: the campaign's reconcile records it
        run = steps.start_run(best)
        if self._follow(campaign, context, steps, body, best, run) is not None:
            self._wake(campaign, context, steps, best.number)

    def _wake(
        self, campaign: Manifest, context: CampaignContext, steps: TrialSteps, measured: int
    ) -> None:
        """Trial MEASURED (the best) ran once more: its Trial shows its new mean, and the
        trials waiting for that run are judged against it and go on."""
        for row in steps.trials():
            name = trial_name(context.name, row.number)
            if row.number == measured:
                self.api.patch_trial_status(context.namespace, name, _runs_status(row))
            elif row.status == "running" and _going(row) is None:
                body = self.api.get_trial(context.namespace, name)
                if body is not None:
                    self._sync(campaign, context, body)

    def _follow(
        self,
        campaign: Manifest,
        context: CampaignContext,
        steps: TrialSteps,
        trial: Manifest,
        row: TrialRecord,
        run: RunRecord,
        ended: Mapping[str, Any] | None = None,
    ) -> dict[str, Any] | None:
        """Bring RUN of ROW up to date with its Job: create it (its status showing ENDED
        too), show its phase, or record how it ended. When the run has just been recorded
        as ended: what the Trial shows of it, written already for a decided trial and left
        to the caller's next write otherwise."""
        name = trial["metadata"]["name"]
        status = trial.get("status") or {}
        decided = row.status != "running"
        job_name = run_name(name, run.number)
        job = self.api.get_job(context.namespace, job_name)
        if job is None:
            if status.get("jobName") != job_name:
                self._create_job(context, steps, trial, row, run, ended)
                return None
            report = RunReport(
                RunStatus.KILLED,
                context.config.search.metric,
                message="its Job was deleted before it finished",
            )
            steps.record_run(row, run.number, report)
            if decided:  # the best measured again: that run is lost, not the trial
                post(trial, "JobDeleted", f"Job {job_name} was deleted before it finished")
                return {}
            verdict = engine.Verdict(False, "killed: its Job was deleted", "killed")
            final = steps.finish(row, verdict)
            self._observe(final)
            self._publish(context, trial, final, "JobDeleted")
            self.campaigns.advance(campaign, context)
            return None
        state = job_state(job)
        if state.finished:
            pods = self.api.list_pods(context.namespace, run_pods(name, run.number))
            ending = trial_ending(state, pods, context.config.search.metric)
            report = ending.report
            lost = _preemptions(row)
            if ending.disrupted and lost < context.spec.trial_template.max_preemptions:
                # The cluster took the pod away: the run says nothing of the trial, and
                # the trial goes on with another run (its next attempt), not a failure.
                message = f"{PREEMPTED} {report.message}"
                report = RunReport(RunStatus.KILLED, report.metric_name, message=message)
                post(
                    trial,
                    "Preempted",
                    f"run {run.number} ({ending.reason}): {ending.report.message}; "
                    f"attempt {lost + 2} starts",
                    warning=True,
                )
            recorded = steps.record_run(row, run.number, report)
            again = recorded.status == "killed" and recorded.message.startswith(PREEMPTED)
            shown: dict[str, Any] = {"preemptions": lost + again}
            if decided:
                self.api.patch_trial_status(context.namespace, name, shown)
            else:
                shown["reason"] = ending.reason
            self._acted[job["metadata"]["uid"]] = state
            return shown
        if not decided and state.phase != status.get("phase"):
            patch: dict[str, object] = {"phase": str(state.phase)}
            if state.phase is TrialPhase.RUNNING and not status.get("startTime"):
                patch["startTime"] = timestamp(self.clock())
            self.api.patch_trial_status(context.namespace, name, patch)
            self.metrics.set_phase("Trial", context.namespace, name, str(state.phase))
            post(trial, str(state.phase), f"Job {job_name} is {state.phase}")
        self._acted[job["metadata"]["uid"]] = state
        return None

    def _create_job(
        self,
        context: CampaignContext,
        steps: TrialSteps,
        trial: Manifest,
        row: TrialRecord,
        run: RunRecord,
        ended: Mapping[str, Any] | None = None,
    ) -> None:
        name = trial["metadata"]["name"]
        launch = steps.launch(row, run, context.repo_url, {})
        template = context.spec.trial_template
        manifests = trial_job(
            launch,
            template,
            namespace=context.namespace,
            campaign=context.name,
            owner=owner_reference(trial),
            compile_cache=self.opener.settings.compile_cache,
            pull_allowance_seconds=self.opener.settings.pull_allowance_seconds,
        )
        if manifests.service is not None:
            self.api.create(manifests.service)
        created = self.api.create(manifests.job)
        self._acted[created["metadata"]["uid"]] = job_state(created)
        which = f" (run {run.number}, seed {run.seed})" if run.number > 1 else ""
        if row.status != "running":  # the best kept trial, measured again: still kept
            self.api.patch_trial_status(context.namespace, name, {"jobName": launch.name})
            post(trial, "JobCreated", f"Job {launch.name} created{which}: measured again")
            return
        phase = TrialPhase.QUEUED if template.queue_name else TrialPhase.PENDING
        status = {**(ended or {}), "phase": str(phase), "jobName": launch.name, **_runs_status(row)}
        self.api.patch_trial_status(context.namespace, name, status)
        self.metrics.set_phase("Trial", context.namespace, name, str(phase))
        post(trial, "JobCreated", f"Job {launch.name} created{which}")

    def _observe(self, row: TrialRecord) -> None:
        """A decided trial's time, from its creation to its verdict, into the histogram."""
        duration = (row.finished_at or self.clock()) - row.created_at
        self.metrics.trial_duration.labels(row.status).observe(duration.total_seconds())

    def _publish(
        self,
        context: CampaignContext,
        trial: Manifest,
        row: TrialRecord,
        reason: str = "",
        ended: Mapping[str, Any] | None = None,
    ) -> None:
        """The verdict on the Trial's status (with ENDED, its last run's, if not yet shown)."""
        phase = PHASE_OF_STATUS[row.status]
        decision = Decision.KEPT if row.kept else Decision.REVERTED
        old = {**(trial.get("status") or {}), **(ended or {})}
        status = {
            "phase": str(phase),
            "metrics": row.metrics,
            "decision": str(decision),
            "completionTime": timestamp(row.finished_at or self.clock()),
            "reason": reason or old.get("reason") or _REASON_OF_STATUS[row.status],
            "message": _why(row),
            **_runs_status(row),
        }
        name = trial["metadata"]["name"]
        self.api.patch_trial_status(context.namespace, name, status)
        self.metrics.set_phase("Trial", context.namespace, name, str(phase))
        value = "-" if row.metric is None else f"{row.metric:.6f}"
        spread = f" ± {row.metric_sd:.6f} (n={row.run_count})" if row.run_count > 1 else ""
        metric = context.config.search.metric
        text = f"{row.status}, {metric}={value}{spread}: {decision} ({_why(row)})"
        post(
            trial,
            str(decision),
            text,
            warning=row.status not in ("success", "pruned"),
            status=row.status,
            metric=row.metric,
            metric_sd=row.metric_sd,
            runs=row.run_count,
            decision=str(decision),
        )


def _why(row: TrialRecord) -> str:
    """The verdict's reason and, for a trial that did not succeed, what its last run said."""
    if row.status == "success" or not row.message:
        return row.decision_reason
    return f"{row.decision_reason}: {row.message}"


# How a run lost to preemption or eviction is recorded (killed, so it runs again).
PREEMPTED = "preempted:"


def _preemptions(row: TrialRecord) -> int:
    """How many of the trial's runs the cluster took away and were run again."""
    return sum(
        1 for run in row.runs if run.status == "killed" and run.message.startswith(PREEMPTED)
    )


def _going(row: TrialRecord) -> RunRecord | None:
    return next((run for run in row.runs if run.status == "running"), None)


def _runs_status(row: TrialRecord) -> dict[str, Any]:
    """What the Trial shows of its runs: how many ended, their mean and spread so far."""
    values = row.view().values()
    measured = engine.stats(values)
    return {
        "runs": sum(1 for run in row.runs if run.view().counted),
        "preemptions": _preemptions(row),
        "metric": None if measured is None else measured.mean,
        "metricSd": None if measured is None or measured.n < 2 else measured.sd,
    }


@dataclass(frozen=True)
class ProgressSource:
    """A running trial's run whose log is followed, and what says when to prune it."""

    campaign: str
    trial_name: str
    trial: TrialRecord
    run: int
    pod: str
    pruner: Pruner
    seen: dict[int, Progress] = field(default_factory=dict)  # its progress so far, by step


class ProgressFollower:
    """Reads the log of a running trial's run into its progress rows, one read per call."""

    def __init__(self, trials: TrialController, namespace: str, name: str, interval: float):
        self.trials = trials
        self.namespace = namespace
        self.name = name
        self.interval = interval
        self._source: ProgressSource | None = None
        self._since: int | None = None  # the first read takes the whole log

    def read(self) -> None:
        self._source = self._source or self.trials.progress_source(self.namespace, self.name)
        if self._source is None:
            return
        self.trials.record_progress(self.namespace, self._source, self._since)
        # Overlapping reads: progress rows upsert by step.
        self._since = int(self.interval * 3) + 1


class CampaignProgress:
    """Follows the logs of a campaign's running trials, a ProgressFollower each, one read
    of each per call."""

    def __init__(self, trials: TrialController, namespace: str, campaign: str, interval: float):
        self.trials = trials
        self.namespace = namespace
        self.campaign = campaign
        self.interval = interval
        self._followers: dict[tuple[str, str], ProgressFollower] = {}

    def read(self) -> None:
        running = self.trials.running(self.namespace, self.campaign)
        # Followed by trial and Job: a trial's next run is its next Job, followed afresh.
        self._followers = {
            (name, job): self._followers.get((name, job))
            or ProgressFollower(self.trials, self.namespace, name, self.interval)
            for name, job in running
        }
        for follower in self._followers.values():
            follower.read()
