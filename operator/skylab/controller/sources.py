"""A Campaign's experiment: fetched once into a snapshot, then read with the spec's overrides.

The snapshot (a plain copy of the experiment directory, taken when the campaign
starts) is what every later reconcile reads, so a git ref that moves or an image
that is upgraded never changes a running campaign's experiment.
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from skylab.api.models import CampaignSpec, ExperimentSource
from skylab.config import (
    CONFIG_FILE,
    ExperimentConfig,
    SweepSettings,
    check_files,
    first_error,
    load_experiment,
)
from skylab.controller.kubeapi import KubeApi
from skylab.errors import UserError
from skylab_trainer.fetch import FetchError, fetch_commit


class CampaignSetupError(Exception):
    """The Campaign cannot start: REASON (a condition reason) and a one-line message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def take_snapshot(
    source: ExperimentSource,
    dest: Path,
    *,
    api: KubeApi,
    namespace: str,
    experiment_dirs: tuple[Path, ...],
) -> None:
    """Copy the experiment SOURCE names into DEST (which must not exist)."""
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        if source.bundled is not None:
            _copy(_bundled(source.bundled, experiment_dirs), partial)
        else:
            _fetch_git(source, partial, api, namespace)
        partial.rename(dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def _bundled(name: str, experiment_dirs: tuple[Path, ...]) -> Path:
    for folder in experiment_dirs:
        if (folder / name / CONFIG_FILE).is_file():
            return folder / name
    known = sorted({p.parent.name for f in experiment_dirs for p in f.glob(f"*/{CONFIG_FILE}")})
    raise CampaignSetupError(
        "ExperimentNotFound",
        f"spec.experiment.bundled: no bundled experiment {name!r} "
        f"(bundled: {', '.join(known) or 'none'})",
    )


def _fetch_git(source: ExperimentSource, dest: Path, api: KubeApi, namespace: str) -> None:
    git = source.git
    assert git is not None
    settings: list[str] = []
    if git.credentials_secret:
        settings.append(f"http.extraHeader=Authorization: Basic {_basic_auth(git, api, namespace)}")
    checkout = dest.with_name(dest.name + ".checkout")
    shutil.rmtree(checkout, ignore_errors=True)
    try:
        fetch_commit(git.url, git.ref, checkout, git_config=settings)
        root = (checkout / git.path).resolve()
        if not root.is_relative_to(checkout.resolve()):
            raise CampaignSetupError(
                "InvalidSpec", f"spec.experiment.git.path: {git.path!r} leaves the repository"
            )
        if not (root / CONFIG_FILE).is_file():
            raise CampaignSetupError(
                "ExperimentNotFound",
                f"spec.experiment.git.path: no {CONFIG_FILE} in {git.path!r}"
                f" of {git.url}@{git.ref}",
            )
        _copy(root, dest)
    except FetchError as exc:
        raise CampaignSetupError(
            "ExperimentUnavailable", f"spec.experiment.git: cannot fetch {git.url}@{git.ref}: {exc}"
        ) from exc
    finally:
        shutil.rmtree(checkout, ignore_errors=True)


def _basic_auth(git: Any, api: KubeApi, namespace: str) -> str:
    secret = git.credentials_secret
    username = api.read_secret_key(namespace, secret, "username")
    password = api.read_secret_key(namespace, secret, "password") or api.read_secret_key(
        namespace, secret, "token"
    )
    if password is None:
        raise CampaignSetupError(
            "SecretNotFound",
            f"spec.experiment.git.credentialsSecret: Secret {secret!r} with a 'password' "
            f"or 'token' key not found in namespace {namespace}",
        )
    return base64.b64encode((username or b"git") + b":" + password).decode()


def _copy(source: Path, dest: Path) -> None:
    shutil.copytree(
        source, dest, symlinks=False, ignore=shutil.ignore_patterns(".git", "__pycache__")
    )


def experiment_config(snapshot: Path, spec: CampaignSpec) -> ExperimentConfig:
    """The snapshot's experiment.toml (profile applied) with the Campaign's overrides."""
    source = spec.experiment
    try:
        config = load_experiment(snapshot, source.profile)
    except UserError as exc:
        reason = "InvalidExperiment"
        if "unknown profile" in str(exc):
            reason = "InvalidSpec"
        raise CampaignSetupError(reason, str(exc).replace(str(snapshot), "experiment")) from exc
    data = config.model_dump()
    search, execution, constraints = data["search"], data["execution"], data["constraints"]
    if source.editable_files is not None:
        search["editable_files"] = source.editable_files
    if source.frozen_files is not None:
        search["frozen_files"] = source.frozen_files
    if source.command is not None:
        execution["command"] = source.command
    if spec.metric is not None:
        search |= {
            "metric": spec.metric.name,
            "direction": spec.metric.direction,
            "metric_pattern": spec.metric.pattern,
        }
    if spec.min_improvement is not None:
        search["min_improvement"] = spec.min_improvement
    template = spec.trial_template
    if template.time_budget_seconds is not None:
        execution["time_budget_seconds"] = template.time_budget_seconds
    if template.max_wall_time_seconds is not None:
        constraints["max_trial_wall_time"] = template.max_wall_time_seconds
    if spec.budget.max_failed_trials is not None:  # the Campaign's word wins when it has one
        constraints["max_consecutive_failures"] = spec.budget.max_failed_trials
    if spec.decision is not None:
        data["decision"] |= spec.decision.model_dump(exclude_none=True)
    if spec.strategy.sweep is not None:
        sweep = spec.strategy.sweep.model_dump(exclude_none=True)
        try:
            data["strategy"]["sweep"] = SweepSettings.model_validate(sweep).model_dump()
        except ValidationError as exc:
            raise CampaignSetupError(
                "InvalidSpec", first_error(exc, "spec.strategy.sweep")
            ) from exc
    try:
        merged = ExperimentConfig.model_validate(data)
        check_files(merged, Path("spec.experiment"))
    except ValidationError as exc:
        raise CampaignSetupError("InvalidSpec", f"spec: {first_error(exc)}") from exc
    except UserError as exc:
        raise CampaignSetupError("InvalidSpec", str(exc)) from exc
    return merged
