"""What became of a trial's Job: its phase while it runs, its report once it ends.

The trainer writes its JSON report to /dev/termination-log, so the report is the
trainer container's termination message in the Pod status. A pod that ended without
one (OOMKilled, evicted, node lost, deadline) still gives a report that says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from skylab.api.models import TrialPhase
from skylab.controller.kubeapi import Manifest
from skylab.executors.kubernetes import COMPLETION_INDEX_ANNOTATION, CONTAINER
from skylab_trainer.report import MAX_REPORT_BYTES, RunReport, RunStatus

# A decided trial's phase, by its status (a run's, or pruned).
PHASE_OF_STATUS: dict[str, TrialPhase] = {
    RunStatus.SUCCESS: TrialPhase.SUCCEEDED,
    RunStatus.CRASH: TrialPhase.FAILED,
    RunStatus.TIMEOUT: TrialPhase.TIMED_OUT,
    RunStatus.KILLED: TrialPhase.STOPPED,
    "pruned": TrialPhase.PRUNED,
}


@dataclass(frozen=True)
class JobState:
    phase: TrialPhase  # Pending, Queued or Running; Succeeded or Failed once it ended
    finished: bool
    reason: str = ""  # of the Job's Failed condition (DeadlineExceeded, ...)
    message: str = ""


# Endings that say nothing of the trial: the cluster took its pod away (preemption, a
# drained or lost node, eviction). Such a run is run again, up to maxPreemptions.
DISRUPTIONS = frozenset({"Evicted", "Preempted", "PodLost"})


@dataclass(frozen=True)
class Ending:
    report: RunReport
    reason: str  # the Trial status reason: Completed, Crashed, OOMKilled, Evicted, ...

    @property
    def disrupted(self) -> bool:
        return self.reason in DISRUPTIONS


def job_state(job: Manifest) -> JobState:
    status = job.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("status") != "True":
            continue
        kind = condition.get("type")
        if kind in ("Complete", "SuccessCriteriaMet"):
            return JobState(TrialPhase.SUCCEEDED, True)
        if kind in ("Failed", "FailureTarget"):
            return JobState(
                TrialPhase.FAILED,
                True,
                str(condition.get("reason") or ""),
                str(condition.get("message") or ""),
            )
    # Kueue holds a Job suspended until it admits it, and suspends it again to evict
    # it: either way the trial is waiting for its turn, not failing.
    if (job.get("spec") or {}).get("suspend"):
        return JobState(TrialPhase.QUEUED, False)
    # `active` counts pods that are still pending too; `ready` counts those whose
    # containers run (the trainer has no readiness probe). A server too old to report
    # `ready` leaves active as the only sign.
    running = status.get("ready", status.get("active")) or 0
    return JobState(TrialPhase.RUNNING if running > 0 else TrialPhase.PENDING, False)


def trial_ending(state: JobState, pods: list[Manifest], metric_name: str) -> Ending:
    """The report of a finished Job, from the pod that reports (completion index 0)."""
    pod = reporting_pod(pods)
    terminated = _terminated(pod) if pod is not None else None
    message = (terminated or {}).get("message") or ""
    if message.strip():
        return _parse(message, metric_name)

    def failed(reason: str, text: str, status: RunStatus = RunStatus.CRASH) -> Ending:
        code = (terminated or {}).get("exitCode")
        return Ending(RunReport(status, metric_name, exit_code=code, message=text), reason)

    if state.reason == "DeadlineExceeded":
        return failed(
            "TimedOut",
            "the Job's deadline (activeDeadlineSeconds) passed before the trainer reported",
            RunStatus.TIMEOUT,
        )
    if terminated is not None and terminated.get("reason") == "OOMKilled":
        return failed("OOMKilled", "the trainer container ran out of memory (OOMKilled)")
    pod_status: dict[str, Any] = (pod or {}).get("status") or {}
    if pod_status.get("reason") == "Evicted":
        detail = pod_status.get("message") or "the node evicted the pod"
        return failed("Evicted", f"the pod was evicted without a report: {detail}")
    disruption = _disruption(pod_status)
    if disruption is not None:
        return failed("Preempted", f"the pod was taken away without a report: {disruption}")
    if pod is None:
        detail = state.message or "its pod is gone (node lost or pod deleted)"
        return failed("PodLost", f"the Job ended without a report: {detail}")
    init = _failed_init(pod)
    if terminated is None and init is not None:
        return failed("NoReport", f"the trainer never started: {init}")
    code = (terminated or {}).get("exitCode")
    return failed("NoReport", f"the trainer exited (code {code}) without writing a report")


def _parse(message: str, metric_name: str) -> Ending:
    size = len(message.encode())
    if size > MAX_REPORT_BYTES:
        return _malformed(
            f"the report is {size} bytes, over the {MAX_REPORT_BYTES} limit", metric_name
        )
    try:
        report = RunReport.from_json(message)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return _malformed(
            f"the report is not a trial report ({type(exc).__name__}: {exc})", metric_name
        )
    if report.metric is not None and not isinstance(report.metric, (int, float)):
        return _malformed("the report's metric is not a number", metric_name)
    reason = {
        RunStatus.SUCCESS: "Completed",
        RunStatus.CRASH: "Crashed",
        RunStatus.TIMEOUT: "TimedOut",
        RunStatus.KILLED: "Killed",
    }[report.status]
    return Ending(report, reason)


def _malformed(why: str, metric_name: str) -> Ending:
    report = RunReport(RunStatus.CRASH, metric_name, message=f"malformed report: {why}")
    return Ending(report, "MalformedReport")


def reporting_pod(pods: list[Manifest]) -> Manifest | None:
    def rank(pod: Manifest) -> tuple[int, str]:
        annotations = pod["metadata"].get("annotations") or {}
        index = annotations.get(COMPLETION_INDEX_ANNOTATION, "0")
        return (
            int(index) if str(index).isdigit() else 0,
            pod["metadata"].get("creationTimestamp", ""),
        )

    # Rank 0 prints the summary; of its pods the latest is the one that counts.
    ordered = sorted(pods, key=rank)
    if not ordered:
        return None
    first_index = rank(ordered[0])[0]
    return [p for p in ordered if rank(p)[0] == first_index][-1]


def _disruption(pod_status: dict[str, Any]) -> str | None:
    """Why the cluster stopped the pod (its DisruptionTarget condition: preemption, a
    node drained or tainted, the eviction API), if it did."""
    for condition in pod_status.get("conditions") or []:
        if condition.get("type") == "DisruptionTarget" and condition.get("status") == "True":
            reason = condition.get("reason") or "DisruptionTarget"
            message = condition.get("message")
            return f"{reason}: {message}" if message else str(reason)
    return None


def _terminated(pod: Manifest) -> dict[str, Any] | None:
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        if container.get("name") == CONTAINER:
            state = (container.get("state") or {}).get("terminated")
            return dict(state) if state else None
    return None


def _failed_init(pod: Manifest) -> str | None:
    """What an init container that failed (the compile cache's) said, if one did."""
    for container in (pod.get("status") or {}).get("initContainerStatuses") or []:
        state = (container.get("state") or {}).get("terminated") or {}
        if state.get("exitCode", 0) != 0:
            detail = " ".join(str(state.get("message") or state.get("reason") or "").split())
            said = f": {detail}" if detail else ""
            return f"init container {container.get('name')} exited {state['exitCode']}{said}"
    return None
