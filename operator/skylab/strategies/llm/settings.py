"""[strategy.llm] of experiment.toml, overridden by a Campaign's spec.strategy.llm."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from skylab.errors import UserError

DEFAULT_MODEL = "claude-sonnet-4-6"
INVALID_KEY = "invalid or missing Anthropic API key"


class LLMSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(default=DEFAULT_MODEL, min_length=1)
    # Model requests per proposal, tool turns and fix-up rounds together.
    max_turns: int = Field(default=20, ge=1, le=200)
    max_output_tokens: int = Field(default=8192, ge=256)
    temperature: float | None = Field(default=None, ge=0, le=1)
    # The campaign's spend on proposals; it stops once either is reached.
    budget_usd: float | None = Field(default=None, gt=0)
    budget_tokens: int | None = Field(default=None, gt=0)
    # Rows of the campaign's trial table shown in each prompt (most recent first).
    history_trials: int = Field(default=20, ge=0, le=500)
    # How often a proposal with no change, a file that does not compile or a
    # duplicate of an earlier trial goes back to the model before it is skipped.
    max_fix_rounds: int = Field(default=2, ge=0, le=10)
    base_url: str | None = None
    api_key_env: str = Field(default="ANTHROPIC_API_KEY", min_length=1)
    # Retries of 429, 529, 5xx and timeouts (the SDK's exponential backoff with jitter).
    max_retries: int = Field(default=4, ge=0, le=10)
    timeout_seconds: float = Field(default=600, gt=0)
    program: str = Field(default="program.md", description="the rules, in the experiment")
    # Prices for a model skylab has no price for, in USD per million tokens.
    input_usd_per_mtok: float | None = Field(default=None, ge=0)
    output_usd_per_mtok: float | None = Field(default=None, ge=0)


def llm_settings(
    table: Mapping[str, Any] | None, overrides: Mapping[str, Any] | None = None
) -> LLMSettings:
    """The settings from experiment.toml's TABLE with OVERRIDES on top; UserError if invalid."""
    merged = {**(table or {}), **(overrides or {})}
    try:
        return LLMSettings.model_validate(merged)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            raise UserError(f"strategy.llm.{where}: unknown field") from None
        raise UserError(f"strategy.llm.{where}: {error['msg']}") from None
