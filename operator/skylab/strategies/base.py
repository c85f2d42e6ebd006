"""What every strategy shares: the context it reads and the proposal it returns.

Strategies propose. They never run code, never touch git and never decide keep or
revert; the engine and the driver do that.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from skylab.config import ExperimentConfig


@dataclass(frozen=True)
class FileEdit:
    """The new full content of one editable file."""

    path: str
    content: str


@dataclass(frozen=True)
class Usage:
    """What a proposal cost (LLM strategies); zero for the others."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cache_read_tokens=self.cache_read_tokens + other.cache_read_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
            cost_usd=self.cost_usd + other.cost_usd,
        )

    @property
    def total_tokens(self) -> int:
        return (
            self.input_tokens
            + self.output_tokens
            + self.cache_read_tokens
            + self.cache_write_tokens
        )


@dataclass(frozen=True)
class Proposal:
    description: str
    edits: tuple[FileEdit, ...]
    rationale: str = ""
    # Structured settings the proposal tried (a sweep point); stored with the trial.
    params: Mapping[str, Any] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True)
class Skipped:
    """A proposal that produced no change worth training; recorded, never run."""

    description: str
    reason: str
    rationale: str = ""
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True)
class Exhausted:
    """The strategy has nothing more to propose, and why."""

    message: str


class StrategyFailed(Exception):
    """The strategy cannot go on (e.g. the API key was refused): the campaign fails."""


class StrategyUnavailable(StrategyFailed):
    """A service the strategy needs is down after bounded retries; trying later may work."""


@dataclass(frozen=True)
class PastTrial:
    """A trial as strategies see it: a running one has no status beyond 'running' yet."""

    number: int
    status: str  # running | success | crash | timeout | killed | skipped
    kept: bool | None
    metric: float | None
    description: str
    params: Mapping[str, Any]
    strategy: str
    diff: str = ""
    log_tail: str = ""
    usage: Usage = field(default_factory=Usage)

    @property
    def outcome(self) -> str:
        """kept or reverted for a success, else the status (crash, skipped, ...)."""
        if self.status == "success":
            return "kept" if self.kept else "reverted"
        return self.status


@dataclass(frozen=True)
class ProposalContext:
    experiment: ExperimentConfig
    parent_commit: str
    # Reads a file of the parent commit by its path relative to the experiment root.
    read_file: Callable[[str], str]
    history: Sequence[PastTrial]
    best: PastTrial | None


class Strategy(Protocol):
    name: str
    # True when a proposal waits on a service (a model: seconds to minutes); the operator
    # then asks for it without holding the campaign's lock.
    remote: bool

    def check_access(self) -> None:
        """Raise StrategyFailed when a service the strategy needs refuses it (a bad key)."""
        ...

    def propose(self, context: ProposalContext) -> Proposal | Skipped | Exhausted:
        """The next change to try; Skipped when this attempt found none; Exhausted at the end.

        Raises StrategyFailed when the campaign cannot go on.
        """
        ...
