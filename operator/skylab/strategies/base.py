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


@dataclass(frozen=True)
class Proposal:
    description: str
    edits: tuple[FileEdit, ...]
    rationale: str = ""
    # Structured settings the proposal tried (a sweep point); stored with the trial.
    params: Mapping[str, Any] = field(default_factory=dict)
    usage: Usage = field(default_factory=Usage)


@dataclass(frozen=True)
class PastTrial:
    """A finished trial as strategies see it."""

    number: int
    status: str  # success | crash | timeout | killed
    kept: bool | None
    metric: float | None
    description: str
    params: Mapping[str, Any]
    strategy: str


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

    def propose(self, context: ProposalContext) -> Proposal | None:
        """The next change to try, or None when the strategy has nothing left."""
        ...
