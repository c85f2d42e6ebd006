"""The operator's settings, from its environment (the Helm chart sets them)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from skylab.api.models import DNS_SUBDOMAIN
from skylab.errors import UserError
from skylab.executors.kubernetes import DEFAULT_PULL_ALLOWANCE_SECONDS, CompileCache
from skylab.experiments import search_path
from skylab.store.url import URL_VARIABLE

WORKSPACE_VARIABLE = "SKYLAB_WORKSPACE_ROOT"
GIT_URL_VARIABLE = "SKYLAB_GIT_URL"
EXPERIMENTS_VARIABLE = "SKYLAB_EXPERIMENTS_DIR"
HTTP_PORT_VARIABLE = "SKYLAB_HTTP_PORT"
RESYNC_VARIABLE = "SKYLAB_RESYNC_SECONDS"
PROGRESS_VARIABLE = "SKYLAB_PROGRESS_SECONDS"
RETRY_VARIABLE = "SKYLAB_RETRY_SECONDS"
DATABASE_DOWN_VARIABLE = "SKYLAB_DATABASE_DOWN_SECONDS"
PULL_ALLOWANCE_VARIABLE = "SKYLAB_PULL_ALLOWANCE_SECONDS"
# hostPath:/DIRECTORY, claim:NAME, or empty (an emptyDir: nothing kept between trials).
COMPILE_CACHE_VARIABLE = "SKYLAB_COMPILE_CACHE"
PEERING_PRIORITY_VARIABLE = "SKYLAB_PEERING_PRIORITY"


@dataclass(frozen=True)
class OperatorSettings:
    database_url: str
    # Campaign repositories and experiment snapshots: a volume that outlives the pod.
    workspace_root: Path
    # How trainer pods reach the operator's git endpoint, e.g.
    # http://skylab.skylab.svc:8080/git; a repository is <git_url>/<ns>/<campaign>.git.
    git_url: str
    # Folders holding the experiments a Campaign names with `bundled`.
    experiment_dirs: tuple[Path, ...]
    http_port: int = 8080
    # How often a Campaign and an undecided Trial are looked at without any event.
    resync_seconds: float = 60.0
    # How often a running trial's log is read for its progress.
    progress_seconds: float = 10.0
    # How long a handler that failed (API server or database unreachable) waits to retry:
    # short, so that campaigns go on within seconds of an outage's end.
    retry_seconds: float = 3.0
    # Connections to PostgreSQL, shared by the handler threads, and how long a call
    # waits for one while the server is away before it fails (and is retried).
    database_connections: int = 8
    database_timeout_seconds: float = 2.0
    # How long PostgreSQL may be unreachable before the liveness probe fails, so that
    # Kubernetes restarts an operator that cannot get back to it by itself.
    database_down_seconds: float = 120.0
    # What a Job's deadline allows beyond the trial's wall time for its pod to start
    # (pulling the trainer image on a cold node).
    pull_allowance_seconds: float = DEFAULT_PULL_ALLOWANCE_SECONDS
    # What trainer pods mount at /cache for torch.compile (see CompileCache).
    compile_cache: CompileCache = field(default_factory=CompileCache)
    # kopf peering between replicas: this one's priority (None: a random one; the
    # highest runs) and how old a silent replica's record may get before a standby
    # presumes it dead and takes over.
    peering_priority: int | None = None
    peering_lifetime_seconds: int = 10

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> OperatorSettings:
        def required(name: str) -> str:
            value = env.get(name, "").strip()
            if not value:
                raise UserError(f"{name}: required by `skylab operator` (it is not set)")
            return value

        def number(name: str, default: float) -> float:
            text = env.get(name, "").strip()
            try:
                value = float(text) if text else default
            except ValueError:
                raise UserError(f"{name}: expected a number of seconds, got {text!r}") from None
            if value <= 0:
                raise UserError(f"{name}: expected a positive number, got {text!r}")
            return value

        def priority(name: str) -> int | None:
            text = env.get(name, "").strip()
            if not text:
                return None
            if not re.fullmatch(r"[0-9]{1,9}", text):
                raise UserError(f"{name}: expected a whole number from 0, got {text!r}")
            return int(text)

        def compile_cache(name: str) -> CompileCache:
            text = env.get(name, "").strip()
            if not text:
                return CompileCache()
            kind, _, where = text.partition(":")
            if kind == "hostPath":
                path = PurePosixPath(where)
                if not path.is_absolute() or ".." in path.parts or len(path.parts) < 2:
                    raise UserError(
                        f"{name}: hostPath needs an absolute directory other than / and "
                        f"without '..', got {text!r}"
                    )
                return CompileCache(host_path=str(path))
            if kind == "claim":
                if len(where) > 253 or not re.fullmatch(DNS_SUBDOMAIN, where):
                    raise UserError(
                        f"{name}: claim needs a PersistentVolumeClaim name (lower-case "
                        f"letters, digits, '-' and '.'), got {text!r}"
                    )
                return CompileCache(claim_name=where)
            raise UserError(
                f"{name}: expected hostPath:/DIRECTORY, claim:NAME or nothing (no cache "
                f"kept between trials), got {text!r}"
            )

        folders = env.get(EXPERIMENTS_VARIABLE, "").strip()
        experiment_dirs = (
            tuple(Path(p) for p in folders.split(os.pathsep) if p)
            if folders
            else tuple(p for p in search_path() if p != Path.cwd() / "experiments")
        )
        return cls(
            database_url=required(URL_VARIABLE),
            workspace_root=Path(required(WORKSPACE_VARIABLE)),
            git_url=required(GIT_URL_VARIABLE).rstrip("/"),
            experiment_dirs=experiment_dirs,
            http_port=int(number(HTTP_PORT_VARIABLE, 8080)),
            resync_seconds=number(RESYNC_VARIABLE, 60.0),
            progress_seconds=number(PROGRESS_VARIABLE, 10.0),
            retry_seconds=number(RETRY_VARIABLE, 3.0),
            database_down_seconds=number(DATABASE_DOWN_VARIABLE, 120.0),
            pull_allowance_seconds=number(PULL_ALLOWANCE_VARIABLE, DEFAULT_PULL_ALLOWANCE_SECONDS),
            compile_cache=compile_cache(COMPILE_CACHE_VARIABLE),
            peering_priority=priority(PEERING_PRIORITY_VARIABLE),
        )
