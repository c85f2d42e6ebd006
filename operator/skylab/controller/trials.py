"""Reconciling a Trial: its Job, its phase while it runs, its outcome once it ends.

The outcome is recorded in PostgreSQL first (with the keep-or-revert decision, once:
the row can only leave `running` one time), then published on the Trial's status.
A restart between the two publishes the recorded outcome; it never decides again.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

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
    Ending,
    job_state,
    reporting_pod,
    trial_ending,
)
from skylab.controller.sources import CampaignSetupError
from skylab.executors.base import TrialLaunch
from skylab.executors.kubernetes import TRIAL_LABEL, trial_job
from skylab.store import Store, TrialNotRunningError
from skylab.store.db import TrialRecord
from skylab_trainer.progress import parse_progress
from skylab_trainer.report import RunReport, RunStatus

_REASON_OF_STATUS = {
    "success": "Completed",
    "crash": "Crashed",
    "timeout": "TimedOut",
    "killed": "Killed",
}
Clock = Callable[[], datetime]


class TrialController:
    def __init__(self, api: KubeApi, campaigns: CampaignController) -> None:
        self.api = api
        self.campaigns = campaigns
        self.opener = campaigns.opener
        self.metrics = campaigns.metrics
        self.clock: Clock = campaigns.clock

    def sync(self, namespace: str, name: str, campaign: str) -> None:
        """Bring the Trial NAME of CAMPAIGN up to date with its Job; act when the Job ended."""
        with self.campaigns.locks.hold(namespace, campaign):
            opened = self._open(namespace, campaign)
            trial = self.api.get_trial(namespace, name)
            if opened is None or trial is None or (trial.get("status") or {}).get("decision"):
                return
            self._sync(*opened, trial)

    def progress_source(self, namespace: str, name: str) -> tuple[int, str] | None:
        """The trial's row id and the name of the pod whose log has its progress."""
        trial = self.api.get_trial(namespace, name)
        if trial is None:
            return None
        spec = TrialSpec.model_validate(trial["spec"])
        opened = self._open(namespace, spec.campaign)
        pod = reporting_pod(self.api.list_pods(namespace, f"{TRIAL_LABEL}={name}"))
        if opened is None or pod is None:
            return None
        row = self.opener.stores.get().get_trial(opened[1].record.id, spec.number)
        return None if row is None else (row.id, pod["metadata"]["name"])

    def record_progress(
        self, namespace: str, pod: str, trial_id: int, since_seconds: int | None
    ) -> None:
        """Store the progress lines of POD's log (of the last SINCE_SECONDS)."""
        log = self.api.pod_log(namespace, pod, since_seconds)
        items = [p for p in map(parse_progress, log.splitlines()) if p is not None]
        self.opener.stores.get().add_progress(trial_id, items)

    def _open(self, namespace: str, campaign: str) -> tuple[Manifest, CampaignContext] | None:
        body = self.api.get_campaign(namespace, campaign)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        try:
            return body, self.opener.open(body)
        except CampaignSetupError:
            return None  # the Campaign's own reconcile reports it

    def _sync(self, campaign: Manifest, context: CampaignContext, trial: Manifest) -> None:
        store = self.opener.stores.get()
        row = self.campaigns.ensure_row(context, store, trial)
        name = trial["metadata"]["name"]
        status = trial.get("status") or {}
        if row.status != "running":  # decided before a restart: publish, never redecide
            self._publish(context, trial, row, status.get("reason") or "")
            self.campaigns.advance(campaign, context)
            return
        job = self.api.get_job(context.namespace, name)
        if job is None:
            if status.get("jobName"):
                report = RunReport(
                    RunStatus.KILLED,
                    context.config.search.metric,
                    message="its Job was deleted before it finished",
                )
                self._finish(campaign, context, trial, row, Ending(report, "JobDeleted"))
            else:
                self._create_job(context, trial)
            return
        state = job_state(job)
        if state.finished:
            pods = self.api.list_pods(context.namespace, f"{TRIAL_LABEL}={name}")
            ending = trial_ending(state, pods, context.config.search.metric)
            self._finish(campaign, context, trial, row, ending)
        elif state.phase != status.get("phase"):
            patch: dict[str, object] = {"phase": str(state.phase)}
            if state.phase is TrialPhase.RUNNING and not status.get("startTime"):
                patch["startTime"] = timestamp(self.clock())
            self.api.patch_trial_status(context.namespace, name, patch)
            self.metrics.set_phase("Trial", context.namespace, name, str(state.phase))
            post(trial, str(state.phase), f"Job {name} is {state.phase}")

    def _create_job(self, context: CampaignContext, trial: Manifest) -> None:
        spec = TrialSpec.model_validate(trial["spec"])
        name = trial["metadata"]["name"]
        config = context.config
        launch = TrialLaunch(
            name=name,
            repo=context.repo_url,
            commit=spec.commit,
            command=config.execution.command,
            time_budget_seconds=config.execution.time_budget_seconds,
            max_wall_time_seconds=config.max_trial_wall_time,
            metric_name=config.search.metric,
            metric_pattern=config.search.metric_pattern,
            env=config.execution.env,
        )
        template = context.spec.trial_template
        manifests = trial_job(
            launch,
            template,
            namespace=context.namespace,
            campaign=context.name,
            owner=owner_reference(trial),
            compile_cache=self.opener.settings.compile_cache,
        )
        if manifests.service is not None:
            self.api.create(manifests.service)
        self.api.create(manifests.job)
        phase = TrialPhase.QUEUED if template.queue_name else TrialPhase.PENDING
        self.api.patch_trial_status(context.namespace, name, {"phase": str(phase), "jobName": name})
        self.metrics.set_phase("Trial", context.namespace, name, str(phase))
        post(trial, "JobCreated", f"Job {name} created")

    def _finish(
        self,
        campaign: Manifest,
        context: CampaignContext,
        trial: Manifest,
        row: TrialRecord,
        ending: Ending,
    ) -> None:
        store = self.opener.stores.get()
        report = ending.report
        best = engine.best_kept(
            [r.view() for r in store.trials(context.record.id)], context.objective
        )
        outcome = engine.Outcome(str(report.status), report.metric, report.peak_vram_mb)
        decision = engine.decide(
            context.objective, outcome, best.metric if best else None, row.is_baseline
        )
        try:
            row = store.finish_trial(
                row.id, report, kept=decision.kept, decision_reason=decision.reason
            )
            duration = (row.finished_at or self.clock()) - row.created_at
            self.metrics.trial_duration.labels(row.status).observe(duration.total_seconds())
        except TrialNotRunningError:
            recorded = store.get_trial(context.record.id, row.number)
            assert recorded is not None
            row = recorded
        self._advance_branch(context, store)
        self._publish(context, trial, row, ending.reason)
        self.campaigns.advance(campaign, context)

    def _advance_branch(self, context: CampaignContext, store: Store) -> None:
        best = engine.best_kept(
            [r.view() for r in store.trials(context.record.id)], context.objective
        )
        context.workspace.advance(best.commit if best else context.record.config["baseline_commit"])

    def _publish(
        self, context: CampaignContext, trial: Manifest, row: TrialRecord, reason: str
    ) -> None:
        phase = PHASE_OF_STATUS[RunStatus(row.status)]
        decision = Decision.KEPT if row.kept else Decision.REVERTED
        status = {
            "phase": str(phase),
            "metric": row.metric,
            "metrics": row.metrics,
            "decision": str(decision),
            "completionTime": timestamp(row.finished_at or self.clock()),
            "reason": reason or _REASON_OF_STATUS[row.status],
            "message": row.message or row.decision_reason,
        }
        name = trial["metadata"]["name"]
        self.api.patch_trial_status(context.namespace, name, status)
        self.metrics.set_phase("Trial", context.namespace, name, str(phase))
        value = "-" if row.metric is None else f"{row.metric:.6f}"
        metric = context.config.search.metric
        text = f"{row.status}, {metric}={value}: {decision} ({row.decision_reason})"
        if row.status != "success" and row.message:
            text += f": {row.message}"
        post(
            trial,
            str(decision),
            text,
            warning=row.status != "success",
            status=row.status,
            metric=row.metric,
            decision=str(decision),
        )


class ProgressFollower:
    """Reads a running trial's log into its progress rows, one read per call."""

    def __init__(self, trials: TrialController, namespace: str, name: str, interval: float):
        self.trials = trials
        self.namespace = namespace
        self.name = name
        self.interval = interval
        self._source: tuple[int, str] | None = None
        self._since: int | None = None  # the first read takes the whole log

    def read(self) -> None:
        self._source = self._source or self.trials.progress_source(self.namespace, self.name)
        if self._source is None:
            return
        trial_id, pod = self._source
        self.trials.record_progress(self.namespace, pod, trial_id, self._since)
        # Overlapping reads: progress rows upsert by step.
        self._since = int(self.interval * 3) + 1
