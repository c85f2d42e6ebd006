"""A scripted model for the fake Messages API: each proposal is a list of turns.

A conversation starts with a request holding one message; its turn number is the
number of assistant messages the request carries. Turn T of proposal P answers with
plans[P][T](request); the last turn of a plan repeats if the strategy asks again.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

from tests.fake_anthropic import Reply, message, text, tool_use

Turn = Callable[[dict[str, Any]], Reply]
TOOL = "str_replace_based_edit_tool"


class Proposals:
    def __init__(self, *plans: list[Turn]) -> None:
        self.plans = list(plans)
        self.started = 0  # conversations begun
        self._lock = threading.Lock()

    def __call__(self, request: dict[str, Any]) -> Reply:
        turn = sum(1 for m in request["messages"] if m["role"] == "assistant")
        with self._lock:
            if turn == 0:
                self.started += 1
            plan = self.plans[min(self.started, len(self.plans)) - 1]
        return plan[min(turn, len(plan) - 1)](request)


def call(**tool_input: Any) -> Turn:
    """A turn that calls the editor tool once."""
    return lambda request: message(request, [tool_use(TOOL, dict(tool_input))], "tool_use")


def set_constant(name: str, value: str, file: str = "train.py") -> Turn:
    """A turn that rewrites constant NAME, as the file stands in the prompt, to VALUE."""

    def turn(request: dict[str, Any]) -> Reply:
        line = constant_line(first_message(request), name)
        new = re.sub(r"=\s*[^#\n]+?(\s*(#.*)?)$", f"= {value}\\1", line)
        edit = {"command": "str_replace", "path": file, "old_str": line, "new_str": new}
        return message(request, [tool_use(TOOL, edit)], "tool_use")

    return turn


def done(description: str) -> Turn:
    """The final turn: the CHANGE line and a rationale."""
    reply = f"CHANGE: {description}\n\nThis should move the metric the right way."
    return lambda request: message(request, [text(reply)], "end_turn")


def first_message(request: dict[str, Any]) -> str:
    content = request["messages"][0]["content"]
    if isinstance(content, str):
        return content
    return "".join(block.get("text", "") for block in content)


def constant_line(prompt: str, name: str) -> str:
    match = re.search(rf"^{name} = .*$", prompt, re.MULTILINE)
    assert match is not None, f"{name} not in the prompt"
    return match.group(0)


def tool_results(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The tool_result blocks of the request's last message."""
    content = request["messages"][-1]["content"]
    if isinstance(content, str):
        return []
    return [block for block in content if block.get("type") == "tool_result"]


def last_user_text(request: dict[str, Any]) -> str:
    content = request["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(block.get("text", "") for block in content if block.get("type") == "text")
