"""Strategies propose the next trial; build one by the name a campaign gives."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from skylab.config import CONFIG_FILE, ExperimentConfig
from skylab.errors import UserError
from skylab.strategies.base import Strategy
from skylab.strategies.sweep import SweepStrategy, validate_sweep

STRATEGIES: tuple[str, ...] = ("sweep", "llm")


@dataclass(frozen=True)
class StrategyOptions:
    """What a driver adds to experiment.toml: a Campaign's LLM settings, the API key."""

    llm: Mapping[str, Any] = field(default_factory=dict)
    # None: read the environment variable the settings name (ANTHROPIC_API_KEY).
    api_key: str | None = None


def build_strategy(
    name: str, config: ExperimentConfig, options: StrategyOptions | None = None
) -> Strategy:
    """The strategy NAME, set up and checked against CONFIG before any trial starts."""
    if name == "sweep":
        return _build_sweep(config)
    if name == "llm":
        return _build_llm(config, options or StrategyOptions())
    raise UserError(f"unknown strategy {name!r} (known: {', '.join(STRATEGIES)})")


def _build_sweep(config: ExperimentConfig) -> Strategy:
    settings = config.strategy.sweep
    if settings is None:
        raise UserError(f"strategy 'sweep' needs a [strategy.sweep] table in {CONFIG_FILE}")
    source = (config.root / settings.file).read_text()
    try:
        validate_sweep(settings, source)
    except UserError as exc:
        raise UserError(f"{config.root / CONFIG_FILE}: {exc}") from exc
    return SweepStrategy(settings)


def _build_llm(config: ExperimentConfig, options: StrategyOptions) -> Strategy:
    # Imported here: the SDK is only needed by campaigns that use it.
    from skylab.strategies.llm.pricing import price_of
    from skylab.strategies.llm.settings import INVALID_KEY, llm_settings
    from skylab.strategies.llm.strategy import LLMStrategy

    settings = llm_settings(config.strategy.llm, options.llm)
    price = price_of(settings.model, settings.input_usd_per_mtok, settings.output_usd_per_mtok)
    api_key = options.api_key or os.environ.get(settings.api_key_env, "")
    if not api_key.strip():
        raise UserError(f"strategy llm: {INVALID_KEY}: set {settings.api_key_env}")
    program_path = config.root / settings.program
    program = program_path.read_text() if program_path.is_file() else ""
    return LLMStrategy(settings, api_key.strip(), price, program)
