"""Campaign and Trial, group skylab.dev version v1alpha1: the single source of truth.

The CRDs in crds/ are generated from these models (`skylab crds`); field names are the
Kubernetes camelCase ones. Cross-field rules the API server can check are CEL rules
(`x-kubernetes-validations`); the operator re-checks them when it reads a spec.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from skylab.config import LOG_RANGE_POSITIVE, RANGE_ORDER, range_problem
from skylab.constants import ConstantValue

GROUP = "skylab.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(s|m|h|d))+$"
_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS_LABEL = rf"^{_LABEL}$"
# A DNS subdomain (RFC 1123), as most Kubernetes object names are: dot-separated labels.
DNS_SUBDOMAIN = rf"^{_LABEL}(\.{_LABEL})*$"


def _rules(*rules: tuple[str, str]) -> dict[str, Any]:
    """json_schema_extra holding CEL rules: (expression, message) pairs."""
    return {"x-kubernetes-validations": [{"rule": r, "message": m} for r, m in rules]}


class ApiModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


# ---------------------------------------------------------------------------
# Campaign spec
# ---------------------------------------------------------------------------


class SecretKeyRef(ApiModel):
    """A key of a Secret in the Campaign's namespace."""

    name: str = Field(min_length=1, description="Secret name")
    key: str = Field(min_length=1, description="key inside the Secret")


class GitSource(ApiModel):
    """An experiment directory in a git repository."""

    url: str = Field(min_length=1, description="clone URL (https:// or ssh)")
    ref: str = Field(default="main", min_length=1, description="branch, tag or commit")
    path: str = Field(default=".", description="experiment directory inside the repository")
    credentials_secret: str | None = Field(
        default=None,
        description="Secret with username/password (or token) for an https URL",
    )


class ExperimentSource(ApiModel):
    """Where the experiment comes from, plus overrides of its experiment.toml."""

    model_config = ConfigDict(
        json_schema_extra=_rules(
            ("has(self.bundled) != has(self.git)", "set exactly one of bundled and git")
        )
    )

    bundled: str | None = Field(
        default=None, pattern=DNS_LABEL, description="name of an experiment in the image"
    )
    git: GitSource | None = None
    profile: str | None = Field(default=None, description="a [profiles.NAME] of experiment.toml")
    editable_files: list[str] | None = Field(default=None, min_length=1)
    frozen_files: list[str] | None = None
    command: str | None = Field(default=None, min_length=1, description="replaces [execution]")

    @model_validator(mode="after")
    def _one_source(self) -> ExperimentSource:
        if (self.bundled is None) == (self.git is None):
            raise ValueError("set exactly one of bundled and git")
        return self


class MetricSpec(ApiModel):
    name: str = Field(min_length=1, description="e.g. val_bpb")
    direction: Literal["minimize", "maximize"]
    pattern: str = Field(min_length=1, description="regex with one group, matched per line")


class SweepParameterSpec(ApiModel):
    """One module-level constant: a values list, or a numeric range."""

    # Exactly one of the two is a oneOf of required fields, not a CEL rule: the items of
    # `values` have no type (any scalar), and the API server's CEL compiler leaves fields
    # without a type out of `self`, so a rule naming `values` does not compile.
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [{"required": ["values"]}, {"required": ["range"]}],
            **_rules(
                (
                    "!has(self.range) || !has(self.log) || !self.log || self.range[0] > 0.0",
                    LOG_RANGE_POSITIVE,
                )
            ),
        }
    )

    values: list[ConstantValue] | None = Field(default=None, min_length=1)
    range: list[float] | None = Field(
        default=None,
        min_length=2,
        max_length=2,
        description="[low, high]",
        json_schema_extra=_rules(("self[0] < self[1]", RANGE_ORDER)),
    )
    steps: int | None = Field(default=None, ge=2)
    log: bool = False
    type: Literal["int", "float"] | None = None

    @model_validator(mode="after")
    def _values_or_range(self) -> SweepParameterSpec:
        if (self.values is None) == (self.range is None):
            raise ValueError("set exactly one of values and range")
        problem = None if self.range is None else range_problem(self.range, self.log)
        if problem is not None:
            raise ValueError(f"range: {problem}")
        return self


class SweepSpec(ApiModel):
    mode: Literal["grid", "random"] = "grid"
    seed: int = 0
    file: str = "train.py"
    default_steps: int = Field(default=3, ge=2)
    parameters: dict[str, SweepParameterSpec] = Field(min_length=1)


class LLMSpec(ApiModel):
    """Overrides of experiment.toml's [strategy.llm]; unset fields keep the experiment's."""

    model: str = Field(default="claude-sonnet-4-6", min_length=1)
    api_key_secret: SecretKeyRef = Field(description="the Anthropic API key")
    base_url: str | None = Field(default=None, description="another Messages API endpoint")
    max_turns: int = Field(default=20, ge=1, le=200, description="model requests per proposal")
    max_output_tokens: int = Field(default=8192, ge=256)
    temperature: float | None = Field(default=None, ge=0, le=1)
    budget_usd: float | None = Field(default=None, gt=0, description="the campaign's LLM spend")
    budget_tokens: int | None = Field(default=None, gt=0)
    history_trials: int = Field(default=20, ge=0, le=500, description="past trials shown")
    max_fix_rounds: int = Field(
        default=2, ge=0, le=10, description="chances to fix no change, a syntax error, a repeat"
    )
    max_retries: int = Field(default=4, ge=0, le=10, description="of 429, 529, 5xx, timeouts")
    input_usd_per_mtok: float | None = Field(
        default=None, ge=0, description="price of a model skylab does not know"
    )
    output_usd_per_mtok: float | None = Field(default=None, ge=0)

    def overrides(self) -> dict[str, Any]:
        """The fields the Campaign sets, as experiment.toml names them."""
        return self.model_dump(exclude_unset=True, exclude={"api_key_secret"})


class StrategySpec(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=_rules(
            ("self.type != 'llm' || has(self.llm)", "strategy llm needs strategy.llm"),
        )
    )

    type: Literal["sweep", "llm"]
    sweep: SweepSpec | None = Field(default=None, description="default: experiment.toml's")
    llm: LLMSpec | None = None

    @model_validator(mode="after")
    def _settings_for_llm(self) -> StrategySpec:
        if self.type == "llm" and self.llm is None:
            raise ValueError("strategy llm needs strategy.llm")
        return self


class DecisionSpec(ApiModel):
    """Overrides of experiment.toml's [decision]: how many runs decide a trial."""

    noise: Literal["aware", "off"] | None = Field(
        default=None, description="aware: runs, means and sigma; off: one run, greedy"
    )
    baseline_runs: int | None = Field(default=None, ge=1, le=20)
    confirm_runs: int | None = Field(default=None, ge=0, le=20)
    max_runs: int | None = Field(
        default=None, ge=1, le=100, description="most runs of an undecided trial"
    )
    best_runs: int | None = Field(
        default=None, ge=1, le=200, description="most runs of the best kept trial"
    )
    z: float | None = Field(default=None, gt=0, description="standard errors a keep must clear")
    sigma_floor: float | None = Field(default=None, ge=0)
    prune: bool | None = Field(default=None, description="stop runs that cannot catch up")
    prune_grace: float | None = Field(default=None, ge=0, le=1)
    prune_margin: float | None = Field(default=None, gt=0, description="in baseline spreads")


class BudgetSpec(ApiModel):
    wall_clock: str | None = Field(
        default=None, pattern=DURATION_PATTERN, description="e.g. 8h, 90m, 1h30m"
    )
    max_trials: int | None = Field(default=None, ge=1, description="baseline included")
    # No default here: unset, the experiment's max_consecutive_failures applies.
    max_failed_trials: int | None = Field(
        default=None,
        ge=1,
        description="consecutive failed trials (default: experiment.toml's"
        " max_consecutive_failures)",
    )


class ResourceRequests(ApiModel):
    cpu: str | None = Field(default=None, description="e.g. 8 or 8000m")
    memory: str | None = Field(default=None, description="e.g. 64Gi")


class Toleration(ApiModel):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class EnvVar(ApiModel):
    name: str = Field(min_length=1)
    value: str = ""


class DataVolume(ApiModel):
    """A PersistentVolumeClaim with the prepared data, mounted read-only."""

    claim_name: str = Field(min_length=1)
    mount_path: str = "/data"


class TrialTemplate(ApiModel):
    model_config = ConfigDict(
        json_schema_extra=_rules(
            (
                # An integer and a number: CEL compares them only once both are doubles.
                "!has(self.maxWallTimeSeconds) || !has(self.timeBudgetSeconds)"
                " || double(self.maxWallTimeSeconds) > self.timeBudgetSeconds",
                "maxWallTimeSeconds must be greater than timeBudgetSeconds",
            ),
        )
    )

    image: str = Field(min_length=1, description="the trainer image")
    time_budget_seconds: float | None = Field(default=None, gt=0, description="training seconds")
    max_wall_time_seconds: int | None = Field(default=None, gt=0, description="Job deadline")
    gpus_per_node: int = Field(default=1, ge=0, le=16)
    nodes: int = Field(default=1, ge=1, le=64)
    resources: ResourceRequests = ResourceRequests()
    node_selector: dict[str, str] = {}
    tolerations: list[Toleration] = []
    priority_class_name: str | None = None
    queue_name: str | None = Field(default=None, description="Kueue LocalQueue")
    max_preemptions: int = Field(
        default=3,
        ge=0,
        le=100,
        description="runs lost to preemption or eviction that are run again, per trial",
    )
    env: list[EnvVar] = []
    data_volume: DataVolume | None = None

    @model_validator(mode="after")
    def _deadline_after_budget(self) -> TrialTemplate:
        budget, deadline = self.time_budget_seconds, self.max_wall_time_seconds
        if budget is not None and deadline is not None and deadline <= budget:
            raise ValueError("maxWallTimeSeconds must be greater than timeBudgetSeconds")
        return self


class CampaignSpec(ApiModel):
    experiment: ExperimentSource
    metric: MetricSpec | None = Field(default=None, description="default: experiment.toml's")
    strategy: StrategySpec
    budget: BudgetSpec = BudgetSpec()
    decision: DecisionSpec | None = Field(default=None, description="default: experiment.toml's")
    parallelism: int = Field(default=1, ge=1, le=64, description="trials running at once")
    min_improvement: float | None = Field(default=None, ge=0)
    trial_template: TrialTemplate
    suspend: bool = Field(default=False, description="true: start no new trials")


# ---------------------------------------------------------------------------
# Campaign status
# ---------------------------------------------------------------------------


class CampaignPhase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class Condition(ApiModel):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str | None = None
    observed_generation: int | None = None


class TrialResult(ApiModel):
    trial: str
    commit: str
    value: float | None = None


class TrialCounts(ApiModel):
    total: int = 0
    running: int = 0
    succeeded: int = 0
    failed: int = 0
    kept: int = 0


class CampaignStatus(ApiModel):
    phase: CampaignPhase = CampaignPhase.PENDING
    conditions: list[Condition] = []
    baseline: TrialResult | None = None
    best: TrialResult | None = None
    counts: TrialCounts = TrialCounts()
    start_time: str | None = None
    deadline: str | None = None
    completion_time: str | None = None
    observed_generation: int | None = None


# ---------------------------------------------------------------------------
# Trial
# ---------------------------------------------------------------------------


class TrialSpec(ApiModel):
    campaign: str = Field(min_length=1)
    number: int = Field(ge=1)
    commit: str = Field(pattern=r"^[0-9a-f]{40}$")
    parent_commit: str | None = Field(default=None, pattern=r"^[0-9a-f]{40}$")
    description: str = ""
    strategy: str = Field(min_length=1)


class TrialPhase(StrEnum):
    PENDING = "Pending"
    QUEUED = "Queued"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    TIMED_OUT = "TimedOut"
    STOPPED = "Stopped"
    PRUNED = "Pruned"  # stopped early: its loss could not catch up with the best's


class Decision(StrEnum):
    KEPT = "Kept"
    REVERTED = "Reverted"


class TrialStatus(ApiModel):
    phase: TrialPhase = TrialPhase.PENDING
    runs: int = Field(default=0, description="runs that ended (interrupted ones are not counted)")
    preemptions: int = Field(
        default=0, description="runs preempted or evicted, and run again (attempts - 1)"
    )
    metric: float | None = Field(default=None, description="the mean over its successful runs")
    metric_sd: float | None = Field(default=None, description="their standard deviation")
    metrics: dict[str, float] = {}
    decision: Decision | None = None
    job_name: str | None = None
    start_time: str | None = None
    completion_time: str | None = None
    reason: str | None = None
    message: str | None = None
