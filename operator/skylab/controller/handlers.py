"""The kopf handlers: which events reach which controller call.

Handlers are synchronous (kopf runs them in its thread pool): they call the
Kubernetes API and PostgreSQL with blocking clients and may run a strategy.
Every handler is counted in the error metric when it raises; kopf retries it.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import random
from collections.abc import Callable, Mapping
from typing import Any

import kopf

from skylab.api.models import GROUP, VERSION
from skylab.controller.campaigns import TERMINAL, CampaignController
from skylab.controller.events import LOGGER
from skylab.controller.kubeapi import KubeApi
from skylab.controller.metrics import Metrics
from skylab.controller.reports import job_state
from skylab.controller.settings import OperatorSettings
from skylab.controller.trials import CampaignProgress, TrialController, decided
from skylab.executors.kubernetes import CAMPAIGN_LABEL, TRIAL_LABEL

ANNOTATION_PREFIX = GROUP
FINISHED = tuple(str(phase) for phase in TERMINAL)
CAMPAIGNS = (GROUP, VERSION, "campaigns")
TRIALS = (GROUP, VERSION, "trials")
JOBS = ("batch", "v1", "jobs")
# How often a failed sync of a Trial or Job event is tried in all before the Campaign's
# timer takes over.
SYNC_ATTEMPTS = 20
Handler = Callable[..., Any]


def configure(settings: kopf.OperatorSettings, ours: OperatorSettings) -> None:
    """kopf's own bookkeeping in annotations of our group, none in status; peering that
    hands the campaigns over within seconds of the active replica's death."""
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
    # Replicas of one priority would all pause: each takes a random one unless told (the
    # highest runs, the others stand by). A replica that dies without a word is presumed
    # gone when its record is LIFETIME seconds old, and a standby takes over.
    settings.peering.priority = (
        ours.peering_priority
        if ours.peering_priority is not None
        else random.SystemRandom().randint(1, 2**31 - 1)
    )
    settings.peering.lifetime = ours.peering_lifetime_seconds


def register(
    registry: kopf.OperatorRegistry,
    campaigns: CampaignController,
    trials: TrialController,
    metrics: Metrics,
    settings: OperatorSettings,
) -> None:
    ours = settings  # the startup handler's own `settings` (kopf's) hides this name
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
        configure(settings, ours)

    # Every Campaign and Trial event kopf receives is kept: the controllers read them from
    # memory. Async, so run on the event loop at once, before the handlers of the event.
    @kopf.on.event(*CAMPAIGNS, registry=registry)
    async def campaign_seen(event: Mapping[str, Any], **_: Any) -> None:
        _observe(campaigns.api, CAMPAIGNS, event)

    def campaign_changed(namespace: str | None, name: str, **_: Any) -> None:
        campaigns.reconcile(_namespaced(namespace), name)

    reconcile_campaign = counted("campaign", campaign_changed)
    kopf.on.resume(*CAMPAIGNS, registry=registry, backoff=retry)(reconcile_campaign)
    kopf.on.create(*CAMPAIGNS, registry=registry, backoff=retry)(reconcile_campaign)
    kopf.on.update(*CAMPAIGNS, field="spec", registry=registry, backoff=retry)(reconcile_campaign)

    # One timer per Campaign, not per Trial: kopf puts a finalizer on every object that
    # has a timer or a daemon, two more writes for each trial.
    def campaign_resync(namespace: str | None, name: str, **_: Any) -> None:
        campaigns.reconcile(_namespaced(namespace), name)
        trials.resync(_namespaced(namespace), name)

    kopf.timer(*CAMPAIGNS, interval=settings.resync_seconds, backoff=retry, registry=registry)(
        counted("campaign-resync", campaign_resync)
    )

    @kopf.on.delete(*CAMPAIGNS, registry=registry, backoff=retry)
    def campaign_deleted(namespace: str | None, name: str, uid: str, **_: Any) -> None:
        delete = counted("campaign-delete", campaigns.delete)
        delete(namespace=_namespaced(namespace), name=name, uid=uid)

    # Async, so that cancelling it ends it at the next await: kopf stops a daemon spawned
    # while the operator exits by cancellation alone, and a thread looping on `stopped`
    # would keep the operator from exiting. The blocking reads run in worker threads.
    @kopf.daemon(
        *CAMPAIGNS, registry=registry, when=_not_finished, backoff=retry, cancellation_timeout=5
    )
    async def campaign_progress(
        namespace: str | None, name: str, stopped: kopf.DaemonStopped, **_: Any
    ) -> None:
        interval = settings.progress_seconds
        follower = CampaignProgress(trials, _namespaced(namespace), name, interval)
        read = counted("trial-progress", follower.read)
        while not stopped:
            await asyncio.to_thread(read)
            # Not stopped.wait(interval): under Python 3.11 its wait_for can raise
            # TimeoutError when cancelled as the timeout expires, failing kopf's exit.
            await asyncio.sleep(interval)

    # A Trial is synced when it appears: created, or listed when the operator starts (kopf
    # gives no type then). Its later changes are the operator's own status writes.
    @kopf.on.event(*TRIALS, registry=registry)
    async def trial_seen(event: Mapping[str, Any], **_: Any) -> None:
        _observe(campaigns.api, TRIALS, event)
        body = event["object"]
        if event.get("type") in (None, "ADDED") and not decided(body):
            where = {
                "namespace": _namespaced(body["metadata"].get("namespace")),
                "name": body["metadata"]["name"],
                "campaign": body["spec"]["campaign"],
            }
            await _retrying(counted("trial", trials.sync), where, retry)

    # A Job event is synced unless it shows the state the Job was last acted on in (its
    # pods scheduled, say, or the Job just created).
    @kopf.on.event(
        *JOBS,
        labels={TRIAL_LABEL: kopf.PRESENT, CAMPAIGN_LABEL: kopf.PRESENT},
        registry=registry,
    )
    async def job_event(
        type: str | None, body: kopf.Body, uid: str, labels: Mapping[str, str], **_: Any
    ) -> None:
        raw = copy.deepcopy(dict(body))
        campaigns.api.observe(JOBS[2], type, raw)
        if type == "DELETED":
            trials.forget_job(uid)
        elif trials.acted_on(uid, job_state(raw)):
            return
        where = {
            "namespace": _namespaced(body.metadata.namespace),
            "name": labels[TRIAL_LABEL],
            "campaign": labels[CAMPAIGN_LABEL],
        }
        await _retrying(counted("job", trials.sync), where, retry)


async def _retrying(sync: Handler, where: Mapping[str, str], retry: float) -> None:
    """kopf never retries an event handler: a sync that fails (the database or the API
    server away) is retried here, every RETRY seconds for a while, then left to the
    Campaign's timer."""
    for attempt in range(1, SYNC_ATTEMPTS + 1):
        try:
            await asyncio.to_thread(sync, **where)
            return
        except Exception as exc:
            if attempt == SYNC_ATTEMPTS:
                raise
            LOGGER.warning(
                "sync of trial %s failed (%s); retrying in %g s", where["name"], exc, retry
            )
            await asyncio.sleep(retry)


def _observe(api: KubeApi, resource: tuple[str, str, str], event: Mapping[str, Any]) -> None:
    api.observe(resource[2], event.get("type"), copy.deepcopy(event["object"]))


def _not_finished(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") not in FINISHED


def _namespaced(namespace: str | None) -> str:
    if namespace is None:  # the CRDs are namespaced: kopf always passes one
        raise kopf.PermanentError("a namespaced resource without a namespace")
    return namespace
