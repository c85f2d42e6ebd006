"""The sweep strategy: grid or random search over module-level constants of one file.

Each proposal rewrites the swept constants of `settings.file` to one point of the
search space. Which points are left is worked out from the trial history alone, so a
campaign that is stopped and resumed proposes the same points in the same order.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Iterator, Sequence

from skylab.config import SweepSettings
from skylab.constants import ConstantValue, ModuleConstants, Number, module_constants
from skylab.errors import UserError
from skylab.strategies.base import Exhausted, FileEdit, PastTrial, Proposal, ProposalContext

# Random mode gives up after this many draws in a row that were tried already or no-ops.
RANDOM_DRAWS = 200
# Values spaced or sampled over a float range keep this many significant digits, so
# descriptions read MATRIX_LR=0.0316 rather than MATRIX_LR=0.031622776601683794.
SIGNIFICANT_DIGITS = 4

Point = dict[str, ConstantValue]


class SweepStrategy:
    name: str = "sweep"
    remote: bool = False

    def __init__(self, settings: SweepSettings) -> None:
        self.settings = settings

    def check_access(self) -> None:
        """A sweep needs no service."""

    def propose(self, context: ProposalContext) -> Proposal | Exhausted:
        constants = module_constants(context.read_file(self.settings.file))
        space = _Space(self.settings, constants)
        tried = self._tried(context.history)
        current = constants.values
        for label, point in self._candidates(space, len(context.history)):
            changes = {name: value for name, value in point.items() if value != current[name]}
            if changes and point not in tried:
                return Proposal(
                    description=", ".join(f"{name}={value!r}" for name, value in changes.items()),
                    edits=(FileEdit(self.settings.file, constants.rewrite(changes)),),
                    rationale=f"sweep {label}",
                    params=point,
                )
        if self.settings.mode == "grid":
            return Exhausted("the sweep has tried every point of its grid")
        return Exhausted(f"the random sweep drew no untried point in {RANDOM_DRAWS} draws")

    def _tried(self, history: Sequence[PastTrial]) -> list[Point]:
        # A killed trial was interrupted before it measured anything: try it again.
        return [
            dict(trial.params)
            for trial in history
            if trial.strategy == self.name and trial.status not in ("killed", "skipped")
        ]

    def _candidates(self, space: _Space, past_trials: int) -> Iterator[tuple[str, Point]]:
        if self.settings.mode == "grid":
            return space.grid()
        # Seeded by the history's length: the same history draws the same points.
        seed = self.settings.seed + past_trials
        return space.draws(random.Random(seed), f"seed {self.settings.seed} + {past_trials}")


def validate_sweep(settings: SweepSettings, source: str) -> None:
    """UserError (naming the parameter and what was expected) unless SOURCE fits SETTINGS."""
    try:
        space = _Space(settings, module_constants(source))
        for name in settings.parameters:
            if not space.values(name):
                raise UserError(f"{name}: the int range holds no integer")
    except UserError as exc:
        raise UserError(f"strategy.sweep: {settings.file}: {exc}") from exc


class _Space:
    """The points a sweep can propose, typed like the constants of one version of the file."""

    def __init__(self, settings: SweepSettings, constants: ModuleConstants) -> None:
        self._parameters = settings.parameters
        self._default_steps = settings.default_steps
        self._constants = constants
        self._current = constants.values

    def values(self, name: str) -> list[ConstantValue]:
        """The values parameter NAME takes in grid mode, in order, without duplicates."""
        parameter = self._parameters[name]
        if parameter.values is not None:
            return self._typed(name, parameter.values)
        low, high = self._bounds(name)
        if low > high:
            return []
        steps = parameter.steps or self._default_steps
        integral = self._integral(name)
        spaced = (
            _between(low, high, step / (steps - 1), parameter.log, integral)
            for step in range(steps)
        )
        return self._typed(name, spaced)

    def grid(self) -> Iterator[tuple[str, Point]]:
        """Every point of the grid; the last parameter varies fastest."""
        axes = [self.values(name) for name in self._parameters]
        total = math.prod(len(axis) for axis in axes)
        for index, values in enumerate(itertools.product(*axes), start=1):
            yield f"grid point {index} of {total}", dict(zip(self._parameters, values, strict=True))

    def draws(self, rng: random.Random, seeded: str) -> Iterator[tuple[str, Point]]:
        """RANDOM_DRAWS points, each parameter drawn independently."""
        for draw in range(1, RANDOM_DRAWS + 1):
            point = {name: self._sample(name, rng) for name in self._parameters}
            yield f"random point: draw {draw} of at most {RANDOM_DRAWS} ({seeded})", point

    def _sample(self, name: str, rng: random.Random) -> ConstantValue:
        parameter = self._parameters[name]
        if parameter.range is None:
            return rng.choice(self.values(name))
        low, high = self._bounds(name)
        integral = self._integral(name)
        if integral and not parameter.log:
            # randint, not a rounded uniform draw: the two ends are as likely as the rest.
            value: Number = rng.randint(int(low), int(high))
        else:
            value = _between(low, high, rng.random(), parameter.log, integral)
        return self._constants.coerce(name, value)

    def _bounds(self, name: str) -> tuple[Number, Number]:
        parameter = self._parameters[name]
        assert parameter.range is not None
        low, high = parameter.range
        if self._integral(name):
            return math.ceil(low), math.floor(high)
        return low, high

    def _integral(self, name: str) -> bool:
        """Whether a range yields ints: as `type` says, else as the constant holds now.

        The file decides by default because TOML bounds arrive as floats: a range
        [0, 1] means 0.0 .. 1.0 for DROPOUT = 0.1 and 0, 1 for DEPTH = 8.
        """
        kind = self._parameters[name].type
        if kind is not None:
            return kind == "int"
        return type(self._current.get(name)) is int

    def _typed(self, name: str, values: Iterable[ConstantValue]) -> list[ConstantValue]:
        # dict.fromkeys drops duplicates and keeps the first occurrence's order.
        return list(dict.fromkeys(self._constants.coerce(name, value) for value in values))


def _between(low: Number, high: Number, at: float, log: bool, integral: bool) -> Number:
    """The point a fraction AT of the way from LOW to HIGH (on a log scale if LOG), rounded."""
    if log:
        value = math.exp(math.log(low) + at * (math.log(high) - math.log(low)))
    else:
        value = low + at * (high - low)
    if integral:
        return round(value)
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")
