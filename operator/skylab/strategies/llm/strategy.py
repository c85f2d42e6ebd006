"""The LLM strategy: Claude edits the experiment through the Anthropic Messages API.

One proposal is a tool-use conversation on a scratch copy of the parent commit: the
model views and edits files with the text editor tool until it ends its turn (or the
turn cap is reached), then the guardrails check the result. The campaign's spend is
the sum of the usage recorded with its trials, so a resumed campaign or a restarted
operator keeps counting from where it was.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anthropic
from anthropic.types import Message, ToolUseBlock

from skylab.strategies.base import (
    Exhausted,
    FileEdit,
    Proposal,
    ProposalContext,
    Skipped,
    StrategyFailed,
    StrategyUnavailable,
    Usage,
)
from skylab.strategies.llm import prompt
from skylab.strategies.llm.editor import TOOL_NAME, Scratch, ToolResult
from skylab.strategies.llm.guardrails import problem
from skylab.strategies.llm.pricing import Price, TurnTokens
from skylab.strategies.llm.settings import INVALID_KEY, LLMSettings

MAX_DESCRIPTION_CHARS = 200
T = TypeVar("T")
TRUNCATED = (
    "Your reply was cut off at the output token limit before this call was complete, so "
    "nothing was changed. Make the edit in smaller pieces."
)


class LLMStrategy:
    name: str = "llm"
    remote: bool = True

    def __init__(self, settings: LLMSettings, api_key: str, price: Price, program: str) -> None:
        self.settings = settings
        self.price = price
        self.program = program
        # The key lives in the client only: it is never logged, stored or shown.
        self.client = anthropic.Anthropic(
            api_key=api_key,
            base_url=settings.base_url,
            max_retries=settings.max_retries,
            timeout=settings.timeout_seconds,
        )

    def check_access(self) -> None:
        """StrategyFailed unless the key is accepted and the model exists: before any trial."""
        self._call(lambda: self.client.models.retrieve(self.settings.model))

    def propose(self, context: ProposalContext) -> Proposal | Skipped | Exhausted:
        spent = sum((t.usage for t in context.history), Usage())
        over = self.over_budget(spent)
        if over is not None:
            return Exhausted(over)
        with tempfile.TemporaryDirectory(prefix="skylab-proposal-") as scratch_dir:
            config = context.experiment
            scratch = Scratch(
                Path(scratch_dir),
                config.search.editable_files,
                config.search.frozen_files,
                context.read_file,
            )
            return _Conversation(self, context, scratch, spent).run()

    def over_budget(self, spent: Usage) -> str | None:
        """Why SPENT is past the campaign's LLM budget, or None."""
        budget_usd, budget_tokens = self.settings.budget_usd, self.settings.budget_tokens
        if budget_usd is not None and spent.cost_usd >= budget_usd:
            return f"the LLM budget of ${budget_usd:.2f} is spent (${spent.cost_usd:.4f} used)"
        if budget_tokens is not None and spent.total_tokens >= budget_tokens:
            return f"the LLM budget of {budget_tokens} tokens is spent ({spent.total_tokens} used)"
        return None

    def request(self, messages: list[dict[str, Any]], system: list[dict[str, Any]]) -> Message:
        """One model turn of a conversation."""
        settings = self.settings
        extra: dict[str, Any] = {}
        if settings.temperature is not None:
            extra["temperature"] = settings.temperature
        return self._call(
            lambda: self.client.messages.create(
                model=settings.model,
                max_tokens=settings.max_output_tokens,
                system=system,  # type: ignore[arg-type]
                tools=prompt.tools(),  # type: ignore[arg-type]
                messages=_with_breakpoint(messages),  # type: ignore[arg-type]
                **extra,
            )
        )

    def _call(self, request: Callable[[], T]) -> T:
        """REQUEST(), with the API's failures turned into the strategy's errors."""
        try:
            return request()
        except (anthropic.AuthenticationError, anthropic.PermissionDeniedError) as exc:
            raise StrategyFailed(f"{INVALID_KEY} (HTTP {exc.status_code})") from None
        except anthropic.NotFoundError:
            raise StrategyFailed(
                f"strategy.llm.model: the Anthropic API has no model {self.settings.model!r}"
            ) from None
        except anthropic.APIStatusError as exc:
            if exc.status_code in (408, 409, 429) or exc.status_code >= 500:
                raise StrategyUnavailable(
                    f"the Anthropic API answered HTTP {exc.status_code} "
                    f"after {self.settings.max_retries} retries: {_message(exc)}"
                ) from None
            raise StrategyFailed(
                f"the Anthropic API refused the request (HTTP {exc.status_code}): {_message(exc)}"
            ) from None
        except anthropic.APIConnectionError as exc:
            raise StrategyUnavailable(
                f"the Anthropic API could not be reached after {self.settings.max_retries} "
                f"retries: {type(exc).__name__}"
            ) from None


class _Conversation:
    """One proposal: model turns, tool calls, guardrail rounds, until a result."""

    def __init__(
        self, strategy: LLMStrategy, context: ProposalContext, scratch: Scratch, spent: Usage
    ) -> None:
        self.strategy = strategy
        self.settings = strategy.settings
        self.context = context
        self.scratch = scratch
        self.spent = spent
        self.usage = Usage()
        self.system = prompt.system(context.experiment, strategy.program)
        # The scratch copy has read the parent's files already.
        first = prompt.memory(context, self.settings.history_trials, scratch.original)
        self.messages: list[dict[str, Any]] = [{"role": "user", "content": first}]
        self.fix_rounds = 0
        self.last_text = ""

    def run(self) -> Proposal | Skipped:
        for _ in range(self.settings.max_turns):
            over = self.strategy.over_budget(self.spent + self.usage)
            if over is not None:
                return self._settle(f"stopped mid-proposal: {over}")
            response = self.strategy.request(self.messages, self.system)
            self.usage += _tokens(response).usage(self.strategy.price)
            self.messages.append({"role": "assistant", "content": _blocks(response)})
            self.last_text = _text(response) or self.last_text
            calls = [block for block in response.content if block.type == "tool_use"]
            if calls:
                cut = response.stop_reason == "max_tokens"
                self.messages.append({"role": "user", "content": self._results(calls, cut)})
                continue
            if response.stop_reason == "max_tokens":
                self.messages.append({"role": "user", "content": TRUNCATED})
                continue
            if response.stop_reason == "refusal":
                return self._skip("the model declined to make a change")
            finding = problem(self.scratch.changed(), self.scratch.original, self.context.history)
            if finding is None:
                return self._proposal()
            if self.fix_rounds >= self.settings.max_fix_rounds:
                return self._skip(_first_sentence(finding))
            self.fix_rounds += 1
            self.messages.append({"role": "user", "content": finding})
        return self._settle(f"no usable change in {self.settings.max_turns} model turns")

    def _settle(self, why: str) -> Proposal | Skipped:
        """The conversation ends early: what the files hold now is the proposal, if it passes."""
        finding = problem(self.scratch.changed(), self.scratch.original, self.context.history)
        if finding is None:
            return self._proposal()
        return self._skip(f"{why}: {_first_sentence(finding)}")

    def _results(self, calls: list[ToolUseBlock], cut: bool) -> list[dict[str, Any]]:
        """The results of CALLS; CUT: the reply hit max_tokens inside the last one."""
        results = []
        for index, call in enumerate(calls):
            if cut and index == len(calls) - 1:
                result = ToolResult(TRUNCATED, is_error=True)
            elif call.name != TOOL_NAME:
                result = ToolResult(f"unknown tool {call.name!r}: use {TOOL_NAME}", True)
            elif not isinstance(call.input, dict):
                result = ToolResult("the tool input must be a JSON object", is_error=True)
            else:
                result = self.scratch.run(call.input)
            results.append(
                {
                    "type": "tool_result",
                    "tool_use_id": call.id,
                    "content": result.content,
                    "is_error": result.is_error,
                }
            )
        return results

    def _proposal(self) -> Proposal:
        changes = self.scratch.changed()
        description, rationale = _description(self.last_text, list(changes))
        return Proposal(
            description=description,
            edits=tuple(FileEdit(path, content) for path, content in changes.items()),
            rationale=rationale,
            params={"model": self.settings.model},
            usage=self.usage,
        )

    def _skip(self, reason: str) -> Skipped:
        description, rationale = _description(self.last_text, [])
        return Skipped(
            description=description, reason=reason, rationale=rationale, usage=self.usage
        )


def _with_breakpoint(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """MESSAGES with a 5-minute cache breakpoint on the last block: the turns of one
    proposal reread the conversation so far from the cache."""
    *head, last = messages
    content = last["content"]
    blocks = [{"type": "text", "text": content}] if isinstance(content, str) else list(content)
    blocks[-1] = {**blocks[-1], "cache_control": {"type": "ephemeral"}}
    return [*head, {**last, "content": blocks}]


def _blocks(response: Message) -> list[dict[str, Any]]:
    """The assistant's content as request parameters (text and tool_use blocks)."""
    blocks: list[dict[str, Any]] = []
    for block in response.content:
        if block.type == "text":
            blocks.append({"type": "text", "text": block.text})
        elif block.type == "tool_use":
            blocks.append(
                {"type": "tool_use", "id": block.id, "name": block.name, "input": block.input}
            )
    return blocks


def _text(response: Message) -> str:
    return "\n".join(block.text for block in response.content if block.type == "text").strip()


def _tokens(response: Message) -> TurnTokens:
    usage = response.usage
    written = usage.cache_creation_input_tokens or 0
    split = usage.cache_creation
    # Without the split, price every write at the 1-hour rate: an estimate errs high.
    five_minutes = split.ephemeral_5m_input_tokens if split is not None else 0
    return TurnTokens(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cache_read_input_tokens or 0,
        cache_write_5m_tokens=five_minutes,
        cache_write_1h_tokens=written - five_minutes,
    )


def _description(text: str, files: list[str]) -> tuple[str, str]:
    """The trial description (the CHANGE line) and the rationale (the whole final text)."""
    for line in text.splitlines():
        stripped = line.strip().lstrip("*#> ").strip()
        if stripped.upper().startswith("CHANGE:"):
            description = stripped[len("CHANGE:") :].strip()
            if description:
                return description[:MAX_DESCRIPTION_CHARS], text
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    fallback = first or (f"edited {', '.join(files)}" if files else "no change")
    return fallback[:MAX_DESCRIPTION_CHARS], text


def _first_sentence(text: str) -> str:
    return text.split(". ")[0].rstrip(".")


def _message(exc: anthropic.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
    return exc.message
