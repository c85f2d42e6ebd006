"""Reconciling a Campaign: set it up, repair its records, start trials, publish its status.

Level-triggered: every call reads the Campaign, its Trials and its PostgreSQL rows
afresh and acts on what it finds, so it can be repeated at any time (an event, a
timer, a restart) without doing anything twice. Trial names are deterministic
(<campaign>-NNNN) and creating one that exists returns the existing one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

from skylab import engine
from skylab.activity import ActivityClock
from skylab.api.models import (
    API_VERSION,
    CampaignPhase,
    Condition,
    TrialCounts,
    TrialResult,
    TrialSpec,
)
from skylab.controller.context import (
    CampaignContext,
    CampaignOpener,
    KeyedLocks,
    database_name,
)
from skylab.controller.events import post
from skylab.controller.kubeapi import KubeApi, Manifest
from skylab.controller.metrics import Metrics
from skylab.controller.sources import CampaignSetupError
from skylab.executors.base import trial_name
from skylab.executors.kubernetes import CAMPAIGN_LABEL, TRIAL_LABEL
from skylab.store import Store
from skylab.store.db import CampaignState, TrialRecord
from skylab.strategies.base import (
    Exhausted,
    Proposal,
    Skipped,
    StrategyFailed,
    Usage,
)
from skylab.trial_steps import TrialSteps
from skylab_trainer.report import RunReport, RunStatus

# The proposal behind a Trial (sweep point, rationale, LLM usage), kept on the Trial
# so that a restart between creating it and recording it loses nothing.
PROPOSAL_ANNOTATION = "skylab.dev/proposal"
MAX_RATIONALE_CHARS = 4000
TERMINAL = (CampaignPhase.SUCCEEDED, CampaignPhase.FAILED)
Clock = Callable[[], datetime]
_RECORD_STATUS: dict[CampaignPhase, CampaignState] = {
    CampaignPhase.RUNNING: "running",
    CampaignPhase.SUSPENDED: "stopped",
    CampaignPhase.SUCCEEDED: "succeeded",
    CampaignPhase.FAILED: "failed",
}


def timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str | None) -> datetime | None:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) if text else None


def owner_reference(body: Manifest) -> Manifest:
    meta = body["metadata"]
    return {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


class CampaignController:
    def __init__(
        self,
        api: KubeApi,
        opener: CampaignOpener,
        locks: KeyedLocks,
        metrics: Metrics,
        activity: ActivityClock,
        clock: Clock = lambda: datetime.now(UTC),
    ) -> None:
        self.api = api
        self.opener = opener
        self.locks = locks
        self.metrics = metrics
        self.activity = activity
        self.clock = clock
        # The campaigns whose strategy is proposing (outside their lock): one at a time.
        self._proposing: set[tuple[str, str]] = set()

    def reconcile(self, namespace: str, name: str) -> None:
        with self.locks.hold(namespace, name):
            body = self.api.get_campaign(namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return
            status = body.get("status") or {}
            done = status.get("phase") in TERMINAL
            if done and status.get("observedGeneration") == body["metadata"].get("generation"):
                return
            try:
                context = self.opener.open(body)
            except CampaignSetupError as exc:
                self._fail_setup(body, exc)
                return
            self._repair(context, self.opener.database.get())
            self.advance(body, context)

    def delete(self, namespace: str, name: str, uid: str) -> None:
        """The Campaign is being deleted: its record says so and frees the name."""
        with self.locks.hold(namespace, name):
            store = self.opener.database.get()
            record = store.get_campaign(database_name(namespace, name))
            if record is not None and record.config.get("uid") == uid:
                store.mark_running_trials_killed(record.id, "the Campaign was deleted")
                store.set_campaign_status(record.id, "stopped", "the Campaign was deleted")
                store.rename_campaign(record.id, f"{record.name}@{uid[:8]}")
            self.opener.remove_workspace(namespace, name)
            self.metrics.forget("Campaign", namespace, name)

    def ensure_row(self, context: CampaignContext, store: Store, trial: Manifest) -> TrialRecord:
        """The PostgreSQL row of TRIAL, written from the Trial itself when missing."""
        spec = TrialSpec.model_validate(trial["spec"])
        row = store.get_trial(context.record.id, spec.number)
        if row is not None:
            return row
        annotations = trial["metadata"].get("annotations") or {}
        proposal: dict[str, Any] = json.loads(annotations.get(PROPOSAL_ANNOTATION) or "{}")
        parent = spec.parent_commit
        return store.start_trial(
            context.record.id,
            spec.number,
            is_baseline=parent is None,
            commit=spec.commit,
            parent_commit=parent,
            strategy=spec.strategy,
            description=spec.description,
            rationale=proposal.get("rationale", ""),
            diff="" if parent is None else context.workspace.diff(parent, spec.commit),
            params=proposal.get("params") or {},
            usage=Usage(**(proposal.get("usage") or {})),
        )

    def advance(self, body: Manifest, context: CampaignContext) -> None:
        """Start the trials the Campaign BODY (opened as CONTEXT) is due, and publish its
        status, with its lock held. Its records are repaired by its own reconcile only:
        a trial's verdict needs no repair of the others' rows first."""
        store = self.opener.database.get()
        started = parse_timestamp((body.get("status") or {}).get("startTime")) or self.clock()
        outcome: engine.Stop | None = None
        rows = store.trials(context.record.id)
        if not context.spec.suspend:
            outcome = self._start_trials(body, context, store, rows, self.elapsed(context))
        # The budget runs while the Campaign is driven: not suspended, not finished.
        if context.spec.suspend or outcome is not None:
            self.activity.stop(context.record.id)
        else:
            self.activity.start(context.record.id)
        self._publish(body, context, store, rows, started, outcome)

    def elapsed(self, context: CampaignContext) -> float:
        """Seconds of the Campaign's budget spent: the time it was driven."""
        return self.activity.elapsed(context.record.id)

    def _repair(self, context: CampaignContext, store: Store) -> None:
        """Rows for Trials that have none; a running row whose Trial is gone is killed."""
        trials = [
            trial
            for trial in self.api.list_trials(context.namespace, context.name, CAMPAIGN_LABEL)
            if any(
                ref.get("uid") == context.uid
                for ref in trial["metadata"].get("ownerReferences") or []
            )
        ]
        rows = store.trials(context.record.id)
        recorded = {row.number for row in rows}
        for trial in trials:
            if TrialSpec.model_validate(trial["spec"]).number not in recorded:
                self.ensure_row(context, store, trial)
        names = {trial["metadata"]["name"] for trial in trials}
        steps = TrialSteps(store, context.record, context.config, context.workspace)
        for row in rows:
            if row.status == "running" and trial_name(context.name, row.number) not in names:
                message = "the Trial was deleted before it finished"
                for run in row.runs:
                    if run.status == "running":
                        report = RunReport(
                            RunStatus.KILLED, context.config.search.metric, message=message
                        )
                        steps.record_run(row, run.number, report)
                steps.finish(row, engine.Verdict(False, f"killed: {message}", "killed"))

    # The steps of one reconcile

    def _start_trials(
        self,
        body: Manifest,
        context: CampaignContext,
        store: Store,
        rows: list[TrialRecord],
        elapsed: float,
    ) -> engine.Stop | None:
        """Start trials until the engine says wait (None) or stop. ROWS, the campaign's
        trials as read just before, gets each trial started (or skipped) here."""
        exhausted: str | None = None
        while True:
            actions = self._plan(context, rows, elapsed, exhausted)
            if isinstance(actions, engine.Stop):
                return actions
            # A trial's next run is its own reconcile's: the Trial's handlers start its Job.
            starts = [a for a in actions if not isinstance(a, engine.NextRun)]
            if not starts:
                return None
            action = starts[0]
            if isinstance(action, engine.StartBaseline):
                baseline = context.record.config["baseline_commit"]
                context.workspace.mark_baseline(action.number, baseline)
                proposal = Proposal(description="baseline", edits=())
                rows.append(
                    self._create_trial(
                        body, context, store, action.number, baseline, None, proposal
                    )
                )
                continue
            if context.key in self._proposing:
                return None  # the thread whose proposal is in flight starts the trial
            steps = TrialSteps(store, context.record, context.config, context.workspace)
            try:
                found = self._propose(context, steps, rows, action)
            except StrategyFailed as exc:
                return engine.Stop(engine.EndReason.STRATEGY_FAILED, str(exc))
            if context.strategy.remote:
                # The campaign went on while the model was asked: what it did meanwhile
                # is read again, and the proposal used only if its trial is still due. A
                # Campaign edited meanwhile is left to the resync: its own reconcile
                # found this proposal in flight.
                rows[:] = store.trials(context.record.id)
                if self._campaign_changed(body, context):
                    return None
                if not self._still_due(context, rows, action):
                    continue
            if isinstance(found, Exhausted):
                exhausted = found.message
                continue
            if isinstance(found, Skipped):
                rows.append(steps.skip(action, context.strategy.name, found))
                name = trial_name(context.name, action.number)
                post(body, "ProposalSkipped", f"{name}: {found.reason}", warning=True)
                continue
            commit = context.workspace.commit_trial(
                action.number, action.parent_commit, found.edits, found.description
            )
            parent = action.parent_commit
            rows.append(
                self._create_trial(body, context, store, action.number, commit, parent, found)
            )

    def _propose(
        self,
        context: CampaignContext,
        steps: TrialSteps,
        rows: list[TrialRecord],
        action: engine.Propose,
    ) -> Proposal | Skipped | Exhausted:
        """The strategy's proposal for ACTION; a remote one is made without the campaign's
        lock: a model takes tens of seconds, and the campaign's runs are recorded
        meanwhile. A proposal in flight when the operator dies left nothing behind: it is
        made again. A StrategyUnavailable goes up: kopf retries the reconcile later."""
        proposing = steps.proposal_context(rows, action)
        if not context.strategy.remote:
            return context.strategy.propose(proposing)
        self._proposing.add(context.key)
        try:
            with self.locks.released(context.namespace, context.name):
                return context.strategy.propose(proposing)
        finally:
            self._proposing.discard(context.key)

    @staticmethod
    def _plan(
        context: CampaignContext,
        rows: list[TrialRecord],
        elapsed: float,
        exhausted: str | None = None,
    ) -> engine.Stop | list[engine.Start]:
        return engine.plan(
            [row.view() for row in rows],
            context.limits,
            context.objective,
            elapsed,
            policy=context.config.decision.policy(),
            parallelism=context.spec.parallelism,
            strategy_exhausted=exhausted,
        )

    def _still_due(
        self, context: CampaignContext, rows: list[TrialRecord], action: engine.Propose
    ) -> bool:
        """Whether the campaign, its trials now ROWS, still wants a new trial of ACTION's
        number."""
        actions = self._plan(context, rows, self.elapsed(context))
        if isinstance(actions, engine.Stop):
            return False
        return any(
            isinstance(due, engine.Propose) and due.number == action.number for due in actions
        )

    def _campaign_changed(self, body: Manifest, context: CampaignContext) -> bool:
        """True when the Campaign BODY is gone, being deleted, suspended or edited since."""
        now = self.api.get_campaign(context.namespace, context.name)
        if now is None or now["metadata"].get("deletionTimestamp"):
            return True
        suspended = bool((now.get("spec") or {}).get("suspend"))
        edited = now["metadata"].get("generation") != body["metadata"].get("generation")
        return suspended or edited or now["metadata"].get("uid") != context.uid

    def _create_trial(
        self,
        campaign: Manifest,
        context: CampaignContext,
        store: Store,
        number: int,
        commit: str,
        parent: str | None,
        proposal: Proposal,
    ) -> TrialRecord:
        name = trial_name(context.name, number)
        recorded = {
            "params": dict(proposal.params),
            "rationale": proposal.rationale[:MAX_RATIONALE_CHARS],
            "usage": asdict(proposal.usage),
        }
        spec = TrialSpec(
            campaign=context.name,
            number=number,
            commit=commit,
            parent_commit=parent,
            description=proposal.description,
            strategy="baseline" if parent is None else context.strategy.name,
        )
        manifest: Manifest = {
            "apiVersion": API_VERSION,
            "kind": "Trial",
            "metadata": {
                "name": name,
                "namespace": context.namespace,
                "labels": {CAMPAIGN_LABEL: context.name, TRIAL_LABEL: name},
                "annotations": {PROPOSAL_ANNOTATION: json.dumps(recorded, sort_keys=True)},
                "ownerReferences": [owner_reference(campaign)],
            },
            "spec": spec.model_dump(by_alias=True, exclude_none=True),
        }
        trial = self.api.create(manifest)
        row = self.ensure_row(context, store, trial)
        post(campaign, "TrialCreated", f"{name}: {proposal.description}")
        return row

    # Status

    def _publish(
        self,
        body: Manifest,
        context: CampaignContext,
        store: Store,
        rows: list[TrialRecord],
        started: datetime,
        outcome: engine.Stop | None,
    ) -> None:
        old = body.get("status") or {}
        if context.spec.suspend:
            phase = CampaignPhase.SUSPENDED
        elif outcome is None:
            phase = CampaignPhase.RUNNING
        elif outcome.reason in engine.FAILURE_ENDS:
            phase = CampaignPhase.FAILED
        else:
            phase = CampaignPhase.SUCCEEDED
        record_status = _RECORD_STATUS[phase]
        stop_reason = (
            outcome.message if outcome else ("suspended" if context.spec.suspend else None)
        )
        if (context.record.status, context.record.stop_reason) != (record_status, stop_reason):
            written = store.set_campaign_status(context.record.id, record_status, stop_reason)
            self.opener.recorded(context.namespace, context.name, written)

        reason, message = _phase_reason(phase, outcome, rows)
        wall_clock = context.limits.budget_seconds
        status: dict[str, Any] = {
            "phase": str(phase),
            "conditions": _conditions(old, phase, reason, message, body, self.clock()),
            "counts": _counts(rows).model_dump(by_alias=True),
            "baseline": _result(context, next((r for r in rows if r.is_baseline and r.kept), None)),
            "best": _result(context, _best(context, rows)),
            "startTime": timestamp(started),
            "deadline": timestamp(started + timedelta(seconds=wall_clock)) if wall_clock else None,
            "completionTime": (
                old.get("completionTime") or timestamp(self.clock()) if phase in TERMINAL else None
            ),
            "observedGeneration": body["metadata"].get("generation"),
        }
        if any(old.get(key) != value for key, value in status.items()):
            self.api.patch_campaign_status(context.namespace, context.name, status)
        self.metrics.set_phase("Campaign", context.namespace, context.name, str(phase))
        if old.get("phase") != str(phase):
            post(body, str(phase), message, warning=phase is CampaignPhase.FAILED)

    def _fail_setup(self, body: Manifest, error: CampaignSetupError) -> None:
        meta = body["metadata"]
        old = body.get("status") or {}
        phase = CampaignPhase.FAILED
        now = self.clock()
        status = {
            "phase": str(phase),
            "conditions": _conditions(old, phase, error.reason, error.message, body, now),
            "completionTime": old.get("completionTime") or timestamp(now),
            "observedGeneration": meta.get("generation"),
        }
        self.api.patch_campaign_status(meta["namespace"], meta["name"], status)
        self.metrics.set_phase("Campaign", meta["namespace"], meta["name"], str(phase))
        if old.get("phase") != str(phase):
            post(body, error.reason, error.message, warning=True)


def _phase_reason(
    phase: CampaignPhase, outcome: engine.Stop | None, rows: list[TrialRecord]
) -> tuple[str, str]:
    if outcome is not None:
        reason = "".join(part.capitalize() for part in outcome.reason.split("_"))
        return reason, outcome.message
    if phase is CampaignPhase.SUSPENDED:
        return "Suspended", "spec.suspend is true: no new trials start"
    running = sum(1 for row in rows if row.status == "running")
    return "TrialsRunning", f"{running} trial(s) running"


def _conditions(
    old: dict[str, Any],
    phase: CampaignPhase,
    reason: str,
    message: str,
    body: Manifest,
    now: datetime,
) -> list[dict[str, Any]]:
    """Running, Suspended, Complete and Failed, each True or False, with the reason."""
    truth = {
        "Running": phase is CampaignPhase.RUNNING,
        "Suspended": phase is CampaignPhase.SUSPENDED,
        "Complete": phase is CampaignPhase.SUCCEEDED,
        "Failed": phase is CampaignPhase.FAILED,
    }
    previous = {c.get("type"): c for c in old.get("conditions") or []}
    conditions = []
    for kind, is_true in truth.items():
        before = previous.get(kind) or {}
        changed = before.get("status") != ("True" if is_true else "False")
        condition = Condition(
            type=kind,
            status="True" if is_true else "False",
            reason=reason if is_true else f"Not{kind}",
            message=message if is_true else "",
            last_transition_time=timestamp(now) if changed else before.get("lastTransitionTime"),
            observed_generation=body["metadata"].get("generation"),
        )
        conditions.append(condition.model_dump(by_alias=True, exclude_none=True))
    return conditions


def _counts(rows: list[TrialRecord]) -> TrialCounts:
    return TrialCounts(
        total=len(rows),
        running=sum(1 for r in rows if r.status == "running"),
        succeeded=sum(1 for r in rows if r.status == "success"),
        failed=sum(1 for r in rows if r.status in engine.FAILED),
        kept=sum(1 for r in rows if r.kept),
    )


def _best(context: CampaignContext, rows: list[TrialRecord]) -> TrialRecord | None:
    best = engine.best_kept([row.view() for row in rows], context.objective)
    return next((r for r in rows if best is not None and r.number == best.number), None)


def _result(context: CampaignContext, row: TrialRecord | None) -> dict[str, Any] | None:
    if row is None:
        return None
    result = TrialResult(
        trial=trial_name(context.name, row.number), commit=row.commit, value=row.metric
    )
    return result.model_dump(by_alias=True)
