"""`skylab operator`: wire the controllers, the HTTP endpoints and kopf together."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import kopf

from skylab import __version__
from skylab.controller.campaigns import CampaignController
from skylab.controller.context import CampaignOpener, KeyedLocks, ThreadStores
from skylab.controller.events import LOGGER
from skylab.controller.handlers import register
from skylab.controller.kubeapi import KubeApi, load_client
from skylab.controller.metrics import Metrics
from skylab.controller.settings import OperatorSettings
from skylab.controller.trials import TrialController
from skylab.gitserve import GitServer, Route
from skylab.store.url import database_address

_TEXT = "text/plain; charset=utf-8"
_LIVENESS_TIMEOUT_SECONDS = 5.0


@dataclass
class Operator:
    """The operator's parts; `registry` is what kopf runs."""

    registry: kopf.OperatorRegistry
    campaigns: CampaignController
    trials: TrialController
    metrics: Metrics
    stores: ThreadStores


def build_operator(api: KubeApi, settings: OperatorSettings) -> Operator:
    stores = ThreadStores(settings.database_url)
    metrics = Metrics()
    opener = CampaignOpener(api, stores, settings)
    campaigns = CampaignController(api, opener, KeyedLocks(), metrics)
    trials = TrialController(api, campaigns)
    registry = kopf.OperatorRegistry()
    register(registry, campaigns, trials, metrics, settings)
    return Operator(registry, campaigns, trials, metrics, stores)


class Health:
    """Liveness: kopf's event loop answers. Readiness: kopf started and PostgreSQL answers."""

    def __init__(self, stores: ThreadStores) -> None:
        self.stores = stores
        self.loop: asyncio.AbstractEventLoop | None = None

    async def started(self, **_: Any) -> None:
        # async: kopf runs a sync handler in a worker thread, which has no running loop.
        self.loop = asyncio.get_running_loop()

    def routes(self, metrics: Metrics) -> dict[str, Route]:
        return {
            "/healthz": self._live,
            "/readyz": self._ready,
            "/metrics": lambda: (200, "text/plain; version=0.0.4", metrics.render()),
        }

    def _live(self) -> tuple[int, str, bytes]:
        loop = self.loop
        if loop is None:
            return 503, _TEXT, b"starting\n"
        if loop.is_closed():  # checked first: a probe never scheduled warns "never awaited"
            return 503, _TEXT, b"event loop closed\n"
        try:
            asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result(
                _LIVENESS_TIMEOUT_SECONDS
            )
        except Exception as exc:  # a stuck or closed loop: let the kubelet restart us
            return 503, _TEXT, f"event loop not answering: {exc!r}\n".encode()
        return 200, _TEXT, b"ok\n"

    def _ready(self) -> tuple[int, str, bytes]:
        if self.loop is None:
            return 503, _TEXT, b"starting\n"
        try:
            self.stores.get().ping()
        except Exception as exc:
            return 503, _TEXT, f"database not answering: {exc!r}\n".encode()
        return 200, _TEXT, b"ok\n"


def run_operator(
    settings: OperatorSettings, namespaces: Sequence[str], peering: str | None
) -> None:
    """Run until SIGTERM: kopf in this thread, the HTTP endpoints in another."""
    operator = build_operator(KubeApi(load_client()), settings)
    operator.stores.get()  # fail fast on a bad database URL, and migrate the schema
    health = Health(operator.stores)
    kopf.on.startup(registry=operator.registry)(health.started)
    settings.workspace_root.mkdir(parents=True, exist_ok=True)
    LOGGER.info(
        "skylab operator %s: watching %s; git, probes and metrics on port %d; database %s",
        __version__,
        ", ".join(namespaces) or "all namespaces",
        settings.http_port,
        database_address(settings.database_url),
    )
    server = GitServer(
        settings.workspace_root, port=settings.http_port, routes=health.routes(operator.metrics)
    ).start()
    try:
        kopf.run(
            registry=operator.registry,
            clusterwide=not namespaces,
            namespaces=list(namespaces),
            standalone=peering is None,
            peering_name=peering,
        )
    finally:
        server.stop()
        operator.stores.close()
