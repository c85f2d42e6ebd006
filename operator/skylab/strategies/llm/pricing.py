"""What a model's tokens cost, to estimate each proposal's price and keep a USD budget.

Anthropic's published list prices in USD per million tokens. Prompt-cache writes cost
1.25x the input price for the 5-minute TTL and 2x for the 1-hour TTL; cache reads
0.1x, except where a model's price says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from skylab.errors import UserError
from skylab.strategies.base import Usage

CACHE_WRITE_5M = 1.25
CACHE_WRITE_1H = 2.0


@dataclass(frozen=True)
class Price:
    input_per_mtok: float
    output_per_mtok: float
    cache_read: float = 0.1  # of the input price


# Model id prefixes, most specific first: ids carry dates and versions after these.
_PRICES: tuple[tuple[str, Price], ...] = (
    ("claude-fable-5-1", Price(10.0, 50.0, cache_read=0.025)),
    ("claude-mythos-5-1", Price(10.0, 50.0, cache_read=0.025)),
    ("claude-fable-5", Price(10.0, 50.0)),
    ("claude-mythos-5", Price(10.0, 50.0)),
    ("claude-opus-5", Price(5.0, 25.0)),
    ("claude-opus-4-8", Price(5.0, 25.0)),
    ("claude-opus-4-7", Price(5.0, 25.0)),
    ("claude-opus-4-6", Price(5.0, 25.0)),
    ("claude-opus-4-5", Price(5.0, 25.0)),
    ("claude-opus-4", Price(15.0, 75.0)),  # 4 and 4.1
    ("claude-3-opus", Price(15.0, 75.0)),
    ("claude-sonnet-4", Price(3.0, 15.0)),  # 4 to 4.6
    ("claude-3-7-sonnet", Price(3.0, 15.0)),
    ("claude-haiku-4-5", Price(1.0, 5.0)),
    ("claude-3-5-haiku", Price(0.8, 4.0)),
    ("claude-3-haiku", Price(0.25, 1.25)),
)


def price_of(model: str, input_per_mtok: float | None, output_per_mtok: float | None) -> Price:
    """The configured price if given, else the list price; UserError for an unknown model."""
    if input_per_mtok is not None and output_per_mtok is not None:
        return Price(input_per_mtok, output_per_mtok)
    for prefix, price in _PRICES:
        if model.startswith(prefix):
            return price
    raise UserError(
        f"strategy.llm.model: no known price for {model!r}: set input_usd_per_mtok and "
        "output_usd_per_mtok"
    )


@dataclass(frozen=True)
class TurnTokens:
    """One response's usage block."""

    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_5m_tokens: int
    cache_write_1h_tokens: int

    def usage(self, price: Price) -> Usage:
        per_input = price.input_per_mtok / 1e6
        cost = (
            self.input_tokens * per_input
            + self.output_tokens * price.output_per_mtok / 1e6
            + self.cache_read_tokens * per_input * price.cache_read
            + self.cache_write_5m_tokens * per_input * CACHE_WRITE_5M
            + self.cache_write_1h_tokens * per_input * CACHE_WRITE_1H
        )
        return Usage(
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cache_read_tokens=self.cache_read_tokens,
            cache_write_tokens=self.cache_write_5m_tokens + self.cache_write_1h_tokens,
            cost_usd=cost,
        )
