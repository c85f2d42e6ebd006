"""Everything a handler needs to act for one Campaign, opened (and set up) on demand.

A campaign's durable state lives in three places: its custom resources, its row and
trial rows in PostgreSQL, and its workspace (a bare git repository plus the
experiment snapshot) on the operator's volume. Opening a campaign for the first time
creates the workspace and then the row; a row is only ever written after the
workspace is complete, so a restart in between redoes the set-up from scratch.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from skylab import engine
from skylab.api.models import CampaignSpec
from skylab.config import ExperimentConfig, first_error
from skylab.controller.kubeapi import KubeApi, Manifest
from skylab.controller.settings import OperatorSettings
from skylab.controller.sources import CampaignSetupError, experiment_config, take_snapshot
from skylab.durations import parse_duration
from skylab.errors import UserError
from skylab.experiments import baseline_files
from skylab.store import Store
from skylab.store.db import CampaignRecord
from skylab.strategies import StrategyOptions, build_strategy
from skylab.strategies.base import Strategy, StrategyFailed, StrategyUnavailable
from skylab.strategies.llm.settings import INVALID_KEY
from skylab.trial_steps import objective_of
from skylab.workspace import Workspace

# Trial names are <campaign>-NNNN and must stay valid label values (63 characters).
MAX_CAMPAIGN_NAME = 50


@dataclass(frozen=True)
class CampaignContext:
    namespace: str
    name: str
    uid: str
    spec: CampaignSpec
    config: ExperimentConfig
    strategy: Strategy
    workspace: Workspace
    record: CampaignRecord
    repo_url: str  # where trainer pods fetch trial commits

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    @property
    def objective(self) -> engine.Objective:
        return objective_of(self.config)

    @property
    def limits(self) -> engine.CampaignLimits:
        budget = self.spec.budget
        return engine.CampaignLimits(
            max_trials=budget.max_trials,
            budget_seconds=parse_duration(budget.wall_clock) if budget.wall_clock else None,
            max_consecutive_failures=self.config.constraints.max_consecutive_failures,
        )


def database_name(namespace: str, name: str) -> str:
    """A campaign's name in PostgreSQL: unique across namespaces."""
    return f"{namespace}/{name}"


class Database:
    """The operator's store: one pool of connections that every handler thread shares,
    connected (and the schema migrated) on first use."""

    def __init__(self, url: str, connections: int, timeout: float) -> None:
        self.url = url
        self.connections = connections
        self.timeout = timeout
        self._store: Store | None = None
        self._lock = threading.Lock()

    def get(self) -> Store:
        with self._lock:
            if self._store is None:
                self._store = Store.connect(
                    self.url, connections=self.connections, timeout=self.timeout
                )
            return self._store

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None


class KeyedLocks:
    """A re-entrant lock per campaign: its decisions and new trials happen one at a time."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], threading.RLock] = {}
        self._guard = threading.Lock()

    @contextmanager
    def hold(self, namespace: str, name: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault((namespace, name), threading.RLock())
        with lock:
            yield

    @contextmanager
    def released(self, namespace: str, name: str) -> Iterator[None]:
        """Lets go of the campaign's lock, held by this thread, for a slow call that needs
        no lock (a model's proposal), and takes it back. Held more than once, it stays held."""
        lock = self._locks[(namespace, name)]
        lock.release()
        try:
            yield
        finally:
            lock.acquire()


class CampaignOpener:
    def __init__(self, api: KubeApi, database: Database, settings: OperatorSettings) -> None:
        self.api = api
        self.database = database
        self.settings = settings
        self._parsed: dict[tuple[str, int | None], tuple[ExperimentConfig, Strategy]] = {}
        # Each campaign's row as last read or written: the operator is its only writer.
        self._records: dict[tuple[str, str], CampaignRecord] = {}

    def repo_dir(self, namespace: str, name: str) -> Path:
        return self.settings.workspace_root / namespace / f"{name}.git"

    def snapshot_dir(self, namespace: str, name: str) -> Path:
        return self.settings.workspace_root / namespace / ".experiments" / name

    def open(self, body: Manifest) -> CampaignContext:
        """The context of the Campaign BODY, set up on first use; CampaignSetupError if not."""
        meta = body["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        if len(name) > MAX_CAMPAIGN_NAME:
            raise CampaignSetupError(
                "InvalidSpec",
                f"metadata.name: at most {MAX_CAMPAIGN_NAME} characters (trial names add 5)",
            )
        try:
            spec = CampaignSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:
            raise CampaignSetupError("InvalidSpec", first_error(exc, "spec")) from None
        record = self._records.get((namespace, name))
        if record is None or record.config.get("uid") != uid:
            record = self._record(namespace, name, uid, spec)
        key = (uid, meta.get("generation"))
        cached = self._parsed.get(key)
        if cached is None:
            snapshot = self.snapshot_dir(namespace, name)
            if not snapshot.is_dir():
                raise CampaignSetupError(
                    "WorkspaceLost", f"the campaign's workspace {snapshot.parent} is gone"
                )
            config = experiment_config(snapshot, spec)
            cached = (config, self._strategy(namespace, spec, config))
            # The experiment snapshot never changes and the spec only with the generation.
            self._parsed[key] = cached
        config, strategy = cached
        return CampaignContext(
            namespace=namespace,
            name=name,
            uid=uid,
            spec=spec,
            config=config,
            strategy=strategy,
            workspace=Workspace(self.repo_dir(namespace, name), name),
            record=record,
            repo_url=f"{self.settings.git_url}/{namespace}/{name}.git",
        )

    def recorded(self, namespace: str, name: str, record: CampaignRecord) -> None:
        """RECORD is the campaign's row as just written."""
        self._records[(namespace, name)] = record

    def _record(self, namespace: str, name: str, uid: str, spec: CampaignSpec) -> CampaignRecord:
        """The row of the Campaign of UID, set up first if it has none."""
        store = self.database.get()
        record = store.get_campaign(database_name(namespace, name))
        if record is not None and record.config.get("uid") != uid:
            # A deleted Campaign of the same name whose clean-up never ran.
            store.rename_campaign(record.id, f"{record.name}@{record.config.get('uid', '?')[:8]}")
            record = None
        if record is None:
            record = self._set_up(namespace, name, uid, spec)
        self._records[(namespace, name)] = record
        return record

    def remove_workspace(self, namespace: str, name: str) -> None:
        """Remove the campaign's repository and snapshot (its row is no longer ours)."""
        self._records.pop((namespace, name), None)
        shutil.rmtree(self.repo_dir(namespace, name), ignore_errors=True)
        shutil.rmtree(self.snapshot_dir(namespace, name), ignore_errors=True)

    def _set_up(self, namespace: str, name: str, uid: str, spec: CampaignSpec) -> CampaignRecord:
        """Snapshot the experiment, check it, create the repository, then the row."""
        self.remove_workspace(namespace, name)  # whatever a dead set-up left
        snapshot = self.snapshot_dir(namespace, name)
        take_snapshot(
            spec.experiment,
            snapshot,
            api=self.api,
            namespace=namespace,
            experiment_dirs=self.settings.experiment_dirs,
        )
        try:
            config = experiment_config(snapshot, spec)
            self._strategy(namespace, spec, config)
            _, baseline = Workspace.create(
                self.repo_dir(namespace, name), name, baseline_files(config)
            )
        except BaseException:
            self.remove_workspace(namespace, name)  # nothing is created for a bad Campaign
            raise
        return self.database.get().create_campaign(
            name=database_name(namespace, name),
            experiment=config.name,
            strategy=spec.strategy.type,
            profile=config.profile,
            branch=f"skylab/{name}",
            config={
                "uid": uid,
                "namespace": namespace,
                "baseline_commit": baseline,
                "metric": config.search.metric,
                "direction": config.search.direction,
            },
        )

    def _strategy(self, namespace: str, spec: CampaignSpec, config: ExperimentConfig) -> Strategy:
        """The Campaign's strategy, built and allowed in by the services it needs."""
        options = StrategyOptions()
        llm = spec.strategy.llm
        if llm is not None and spec.strategy.type == "llm":
            ref = llm.api_key_secret
            key = self.api.read_secret_key(namespace, ref.name, ref.key)
            if key is None:
                raise CampaignSetupError(
                    "SecretNotFound",
                    f"spec.strategy.llm.apiKeySecret: Secret {ref.name!r} with key {ref.key!r} "
                    f"not found in namespace {namespace}",
                )
            if not key.strip():
                raise CampaignSetupError(
                    "InvalidAPIKey",
                    f"spec.strategy.llm.apiKeySecret: key {ref.key!r} of Secret {ref.name!r} "
                    "is empty",
                )
            options = StrategyOptions(llm=llm.overrides(), api_key=key.decode().strip())
        try:
            strategy = build_strategy(spec.strategy.type, config, options)
            strategy.check_access()
        except UserError as exc:
            message = str(exc).replace(str(config.root), "experiment")
            raise CampaignSetupError("InvalidStrategy", message) from exc
        except StrategyUnavailable:
            raise  # kopf retries the handler later
        except StrategyFailed as exc:
            reason = "InvalidAPIKey" if INVALID_KEY in str(exc) else "InvalidStrategy"
            raise CampaignSetupError(reason, f"spec.strategy.llm: {exc}") from None
        return strategy
