"""`skylab operator`: wire the controllers, the HTTP endpoints and kopf together."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import kopf

from skylab import __version__
from skylab.activity import ActivityClock
from skylab.controller.campaigns import CampaignController
from skylab.controller.context import CampaignOpener, Database, KeyedLocks
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
_PING_TIMEOUT_SECONDS = 2.0


@dataclass
class Operator:
    """The operator's parts; `registry` is what kopf runs."""

    registry: kopf.OperatorRegistry
    campaigns: CampaignController
    trials: TrialController
    metrics: Metrics
    database: Database

    def close(self) -> None:
        """End the campaigns' activity stretches now, then close the database."""
        self.campaigns.activity.close()
        self.database.close()


def build_operator(api: KubeApi, settings: OperatorSettings) -> Operator:
    database = Database(
        settings.database_url,
        connections=settings.database_connections,
        timeout=settings.database_timeout_seconds,
    )
    metrics = Metrics()
    opener = CampaignOpener(api, database, settings)
    activity = ActivityClock(lambda: database.get()).run()  # looked up at each call
    campaigns = CampaignController(api, opener, KeyedLocks(), metrics, activity)
    trials = TrialController(api, campaigns)
    registry = kopf.OperatorRegistry()
    register(registry, campaigns, trials, metrics, settings)
    return Operator(registry, campaigns, trials, metrics, database)


class Health:
    """Liveness: kopf's event loop answers, and PostgreSQL has not been unreachable for
    longer than DOWN_SECONDS. Readiness: kopf started and PostgreSQL answers now."""

    def __init__(
        self, database: Database, down_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.database = database
        self.down_seconds = down_seconds
        self.clock = clock
        self.loop: asyncio.AbstractEventLoop | None = None
        self._answered = clock()  # when PostgreSQL last answered (or we started)

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
        problem = self._database_problem()
        down = self.clock() - self._answered
        if problem is not None and down > self.down_seconds:
            message = f"database unreachable for {down:.0f} s: {problem}\n"
            return 503, _TEXT, message.encode()
        return 200, _TEXT, b"ok\n"

    def _ready(self) -> tuple[int, str, bytes]:
        if self.loop is None:
            return 503, _TEXT, b"starting\n"
        problem = self._database_problem()
        if problem is not None:
            return 503, _TEXT, f"database not answering: {problem}\n".encode()
        return 200, _TEXT, b"ok\n"

    def _database_problem(self) -> str | None:
        """None when PostgreSQL answers now; else what went wrong."""
        try:
            self.database.get().ping(timeout=_PING_TIMEOUT_SECONDS)
        except Exception as exc:
            return repr(exc)
        self._answered = self.clock()
        return None


def run_operator(
    settings: OperatorSettings, namespaces: Sequence[str], peering: str | None
) -> None:
    """Run until SIGTERM: kopf in this thread, the HTTP endpoints in another."""
    operator = build_operator(KubeApi(load_client()), settings)
    operator.database.get()  # fail fast on a bad database URL, and migrate the schema
    health = Health(operator.database, settings.database_down_seconds)
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
        operator.close()
