"""Strategies propose the next trial; build one by the name a campaign gives."""

from __future__ import annotations

from collections.abc import Callable

from skylab.config import CONFIG_FILE, ExperimentConfig
from skylab.errors import UserError
from skylab.strategies.base import Strategy
from skylab.strategies.sweep import SweepStrategy, validate_sweep


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


_BUILDERS: dict[str, Callable[[ExperimentConfig], Strategy]] = {"sweep": _build_sweep}
STRATEGIES: tuple[str, ...] = tuple(_BUILDERS)


def build_strategy(name: str, config: ExperimentConfig) -> Strategy:
    """The strategy NAME, set up and checked against CONFIG before any trial starts."""
    builder = _BUILDERS.get(name)
    if builder is None:
        raise UserError(f"unknown strategy {name!r} (known: {', '.join(STRATEGIES)})")
    return builder(config)
