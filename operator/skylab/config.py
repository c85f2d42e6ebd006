"""experiment.toml: what an experiment is, how to run it and how to search it.

The file follows this layout (every section but [experiment], [search] and
[execution] has defaults):

    [experiment]  name, description
    [search]      editable_files, frozen_files, metric, direction, metric_pattern,
                  min_improvement
    [execution]   command, time_budget_seconds, env
    [constraints] max_vram_gb, max_trial_wall_time, max_consecutive_failures
    [decision]    noise, baseline_runs, confirm_runs, z, sigma_floor, prune,
                  prune_grace, prune_margin, first_seed
    [prepare]     command, args, ready_marker
    [strategy.sweep] / [strategy.llm]
    [profiles.NAME]   overrides of any table above, plus
    [profiles.NAME.constants."FILE"]  constants rewritten in FILE when a campaign starts
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from skylab.constants import ConstantValue
from skylab.engine import NoisePolicy
from skylab.errors import UserError

CONFIG_FILE = "experiment.toml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExperimentSection(_Section):
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=40)
    description: str = ""


class SearchSection(_Section):
    editable_files: list[str] = Field(min_length=1)
    frozen_files: list[str] = []
    metric: str
    direction: Literal["minimize", "maximize"]
    metric_pattern: str
    min_improvement: float = Field(default=0.0, ge=0)

    @field_validator("metric_pattern")
    @classmethod
    def _one_group(cls, pattern: str) -> str:
        try:
            compiled = re.compile(pattern, re.MULTILINE)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from exc
        if compiled.groups != 1:
            raise ValueError("must have exactly one capture group for the metric value")
        return pattern


class ExecutionSection(_Section):
    command: str = Field(min_length=1)
    time_budget_seconds: float = Field(gt=0)
    env: dict[str, str] = {}


class ConstraintsSection(_Section):
    max_vram_gb: float | None = Field(default=None, gt=0)
    max_trial_wall_time: float | None = Field(default=None, gt=0)
    max_consecutive_failures: int = Field(default=5, ge=1)


class PrepareSection(_Section):
    command: str = "python prepare.py"
    args: list[str] = []
    # A file prepare writes last, under the data directory, once the data is usable.
    ready_marker: str = "READY"


# What a sweep range must be; the Campaign API states the same rules in its schema.
RANGE_ORDER = "must be [low, high] with low < high"
LOG_RANGE_POSITIVE = "a log range must have low > 0"


def range_problem(bounds: Sequence[float], log: bool) -> str | None:
    """Why BOUNDS (a sweep parameter's range, log-spaced if LOG) is unusable, if it is."""
    low, high = bounds
    if not low < high:
        return RANGE_ORDER
    if log and low <= 0:
        return LOG_RANGE_POSITIVE
    return None


class SweepParameter(_Section):
    """One constant to sweep: a list of values, or a numeric range."""

    values: list[ConstantValue] | None = Field(default=None, min_length=1)
    range: tuple[float, float] | None = None
    steps: int | None = Field(default=None, ge=2)
    log: bool = False
    type: Literal["int", "float"] | None = None

    @model_validator(mode="after")
    def _values_or_range(self) -> SweepParameter:
        if (self.values is None) == (self.range is None):
            raise ValueError("give either 'values' or 'range'")
        problem = None if self.range is None else range_problem(self.range, self.log)
        if problem is not None:
            raise ValueError(f"range: {problem}")
        return self


class SweepSettings(_Section):
    mode: Literal["grid", "random"] = "grid"
    seed: int = 0
    file: str = "train.py"
    # Steps used for a range in grid mode when the parameter gives none.
    default_steps: int = Field(default=3, ge=2)
    parameters: dict[str, SweepParameter] = Field(min_length=1)

    @field_validator("parameters")
    @classmethod
    def _constant_names(cls, parameters: dict[str, SweepParameter]) -> dict[str, SweepParameter]:
        for name in parameters:
            if not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
                raise ValueError(f"{name!r} is not an UPPER_CASE module-level constant name")
        return parameters


class DecisionSection(_Section):
    """How trials are decided: on several runs against the noise, or on one ("off")."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    noise: Literal["aware", "off"] = "aware"
    baseline_runs: int = Field(default=3, ge=1)
    confirm_runs: int = Field(default=2, ge=0)
    max_runs: int = Field(default=12, ge=1)
    best_runs: int = Field(default=24, ge=1)
    z: float = Field(default=2.75, gt=0)
    sigma_floor: float = Field(default=0.001, ge=0)
    prune: bool = False  # early stopping, opt-in: see NoisePolicy
    prune_grace: float = Field(default=0.3, ge=0, le=1)
    prune_margin: float = Field(default=3.0, gt=0)
    # Run k of every trial trains with seed first_seed + k - 1 (SKYLAB_SEED): trials are
    # compared on the same seeds.
    first_seed: int = Field(default=42, ge=0)

    @model_validator(mode="after")
    def _room_to_confirm(self) -> DecisionSection:
        if self.max_runs < 1 + self.confirm_runs:
            raise ValueError(
                f"max_runs must be at least 1 + confirm_runs ({1 + self.confirm_runs}),"
                f" got {self.max_runs}"
            )
        return self

    def policy(self) -> NoisePolicy:
        return NoisePolicy(
            aware=self.noise == "aware",
            baseline_runs=self.baseline_runs,
            confirm_runs=self.confirm_runs,
            max_runs=self.max_runs,
            best_runs=self.best_runs,
            z=self.z,
            sigma_floor=self.sigma_floor,
            prune=self.prune,
            prune_grace=self.prune_grace,
            prune_margin=self.prune_margin,
        )

    def seed(self, run_index: int) -> int:
        """The seed of a trial's RUN_INDEX-th counted run (1-based)."""
        return self.first_seed + run_index - 1


class StrategySection(_Section):
    sweep: SweepSettings | None = None
    # Settings of the LLM strategy; validated by that strategy.
    llm: dict[str, Any] | None = None


class ExperimentConfig(_Section):
    root: Path
    profile: str | None = None
    experiment: ExperimentSection
    search: SearchSection
    execution: ExecutionSection
    constraints: ConstraintsSection = ConstraintsSection()
    decision: DecisionSection = DecisionSection()
    prepare: PrepareSection = PrepareSection()
    strategy: StrategySection = StrategySection()
    # File -> constant -> value, applied to the baseline commit of every campaign.
    constants: dict[str, dict[str, ConstantValue]] = {}

    @property
    def name(self) -> str:
        return self.experiment.name

    @property
    def tracked_files(self) -> list[str]:
        return [*self.search.editable_files, *self.search.frozen_files]

    @property
    def max_trial_wall_time(self) -> float:
        """Wall-clock cap of one trial: the configured one, else budget x2 + 2 minutes."""
        configured = self.constraints.max_trial_wall_time
        return configured or self.execution.time_budget_seconds * 2 + 120


def load_experiment(root: Path, profile: str | None = None) -> ExperimentConfig:
    """Read ROOT/experiment.toml, apply PROFILE, validate; UserError on any problem."""
    path = root / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found (an experiment directory needs {CONFIG_FILE})")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{path}: invalid TOML: {exc}") from exc

    profiles = raw.pop("profiles", {})
    if profile is not None:
        if profile not in profiles:
            known = ", ".join(sorted(profiles)) or "none"
            raise UserError(f"{path}: unknown profile {profile!r} (profiles: {known})")
        raw = _deep_merge(raw, profiles[profile])
    try:
        config = ExperimentConfig.model_validate({**raw, "root": root, "profile": profile})
    except ValidationError as exc:
        raise UserError(f"{path}: {first_error(exc)}") from exc
    check_files(config, path)
    return config


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def first_error(exc: ValidationError, root: str = "") -> str:
    """The first of EXC's errors as one line: where (under ROOT), then what was expected."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in (root, *error["loc"]) if part != "") or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{where}: required field is missing"
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown field"
    return f"{where}: {message}"


def check_files(config: ExperimentConfig, path: Path) -> None:
    for name in config.tracked_files:
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise UserError(f"{path}: search: {name!r} must be a path inside the experiment")
        if not (config.root / relative).is_file():
            raise UserError(f"{path}: search: listed file {name!r} does not exist")
    overlap = set(config.search.editable_files) & set(config.search.frozen_files)
    if overlap:
        raise UserError(f"{path}: search: {sorted(overlap)} both editable and frozen")
    for name in config.constants:
        if name not in config.tracked_files:
            raise UserError(f"{path}: constants: {name!r} is not an editable or frozen file")
    sweep = config.strategy.sweep
    if sweep is not None and sweep.file not in config.search.editable_files:
        raise UserError(f"{path}: strategy.sweep.file: {sweep.file!r} is not an editable file")
