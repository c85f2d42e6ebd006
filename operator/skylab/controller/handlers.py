"""The kopf handlers: which events reach which controller call.

Handlers are synchronous (kopf runs them in its thread pool): they call the
Kubernetes API and PostgreSQL with blocking clients and may run a strategy.
Every handler is counted in the error metric when it raises; kopf retries it.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping
from typing import Any

import kopf

from skylab.api.models import GROUP, VERSION
from skylab.controller.campaigns import CampaignController
from skylab.controller.events import LOGGER
from skylab.controller.metrics import Metrics
from skylab.controller.settings import OperatorSettings
from skylab.controller.trials import ProgressFollower, TrialController
from skylab.executors.kubernetes import CAMPAIGN_LABEL, TRIAL_LABEL

ANNOTATION_PREFIX = GROUP
CAMPAIGNS = (GROUP, VERSION, "campaigns")
TRIALS = (GROUP, VERSION, "trials")
# How often a failed Job event is tried in all before the Trial's timer takes over.
JOB_EVENT_ATTEMPTS = 20
Handler = Callable[..., Any]


def configure(settings: kopf.OperatorSettings) -> None:
    """kopf's own bookkeeping in annotations of our group, none in status."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    # The chart installs the CRDs before the operator starts, so kopf needs no watch on
    # CustomResourceDefinitions or Namespaces: its role grants neither.
    settings.scanning.disabled = True


def register(
    registry: kopf.OperatorRegistry,
    campaigns: CampaignController,
    trials: TrialController,
    metrics: Metrics,
    settings: OperatorSettings,
) -> None:
    retry = settings.retry_seconds

    def counted(name: str, handler: Handler) -> Handler:
        @functools.wraps(handler)
        def wrapper(**kwargs: Any) -> Any:
            try:
                return handler(**kwargs)
            except Exception:
                metrics.handler_errors.labels(name).inc()
                raise

        return wrapper

    kopf.on.login(registry=registry)(kopf.login_via_client)

    @kopf.on.startup(registry=registry)
    def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings)

    def campaign_changed(namespace: str | None, name: str, **_: Any) -> None:
        campaigns.reconcile(_namespaced(namespace), name)

    reconcile_campaign = counted("campaign", campaign_changed)
    kopf.on.resume(*CAMPAIGNS, registry=registry, backoff=retry)(reconcile_campaign)
    kopf.on.create(*CAMPAIGNS, registry=registry, backoff=retry)(reconcile_campaign)
    kopf.on.update(*CAMPAIGNS, field="spec", registry=registry, backoff=retry)(reconcile_campaign)
    kopf.timer(*CAMPAIGNS, interval=settings.resync_seconds, backoff=retry, registry=registry)(
        reconcile_campaign
    )

    @kopf.on.delete(*CAMPAIGNS, registry=registry, backoff=retry)
    def campaign_deleted(namespace: str | None, name: str, uid: str, **_: Any) -> None:
        delete = counted("campaign-delete", campaigns.delete)
        delete(namespace=_namespaced(namespace), name=name, uid=uid)

    def trial_changed(namespace: str | None, name: str, spec: kopf.Spec, **_: Any) -> None:
        trials.sync(_namespaced(namespace), name, spec["campaign"])

    sync_trial = counted("trial", trial_changed)
    kopf.on.resume(*TRIALS, registry=registry, backoff=retry)(sync_trial)
    kopf.on.create(*TRIALS, registry=registry, backoff=retry)(sync_trial)
    kopf.timer(
        *TRIALS, interval=settings.resync_seconds, backoff=retry, registry=registry, when=_undecided
    )(sync_trial)

    # Async, so that cancelling it ends it at the next await: kopf stops a daemon spawned
    # while the operator exits by cancellation alone, and a thread looping on `stopped`
    # would keep the operator from exiting. The blocking reads run in worker threads.
    @kopf.daemon(*TRIALS, registry=registry, when=_running, backoff=retry, cancellation_timeout=5)
    async def trial_progress(
        namespace: str | None, name: str, stopped: kopf.DaemonStopped, **_: Any
    ) -> None:
        interval = settings.progress_seconds
        follower = ProgressFollower(trials, _namespaced(namespace), name, interval)
        read = counted("trial-progress", follower.read)
        while not stopped:
            await asyncio.to_thread(read)
            await stopped.wait(interval)

    # kopf never retries an event handler: a Job event that fails (the database or the
    # API server away) is retried here, every RETRY seconds for a while, then left to the
    # Trial's timer.
    @kopf.on.event(
        "batch",
        "v1",
        "jobs",
        labels={TRIAL_LABEL: kopf.PRESENT, CAMPAIGN_LABEL: kopf.PRESENT},
        registry=registry,
    )
    async def job_event(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
        sync = counted("job", trials.sync)
        where = {
            "namespace": _namespaced(namespace),
            "name": labels[TRIAL_LABEL],
            "campaign": labels[CAMPAIGN_LABEL],
        }
        for attempt in range(1, JOB_EVENT_ATTEMPTS + 1):
            try:
                await asyncio.to_thread(sync, **where)
                return
            except Exception as exc:
                if attempt == JOB_EVENT_ATTEMPTS:
                    raise
                LOGGER.warning(
                    "job event of trial %s failed (%s); retrying in %g s", where["name"], exc, retry
                )
                await asyncio.sleep(retry)


def _undecided(status: kopf.Status, **_: Any) -> bool:
    return not status.get("decision")


def _running(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") == "Running"


def _namespaced(namespace: str | None) -> str:
    if namespace is None:  # the CRDs are namespaced: kopf always passes one
        raise kopf.PermanentError("a namespaced resource without a namespace")
    return namespace
