"""The text editor tool, executed by skylab on a scratch copy of the parent commit.

The model asks for `view`, `str_replace`, `create` and `insert` on paths relative to
the experiment directory. Editable files can be written, frozen files only read, and
any other path (absolute, `..`, a symlink leading out, an unlisted file) is refused.
A refusal or a malformed call is returned to the model as an error result; nothing
outside the scratch directory is ever touched.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

TOOL_NAME = "str_replace_based_edit_tool"
TOOL_TYPE = "text_editor_20250728"
# A view is cut here so that one call cannot flood the conversation.
MAX_VIEW_CHARS = 60_000


class ToolError(Exception):
    """A call the tool refuses; its message goes back to the model as is_error."""


@dataclass(frozen=True)
class ToolResult:
    content: str
    is_error: bool = False


class Scratch:
    """The experiment's editable and frozen files at one commit, in a directory."""

    def __init__(
        self,
        root: Path,
        editable: Sequence[str],
        frozen: Sequence[str],
        read_file: Callable[[str], str],
    ) -> None:
        self.root = root
        self.editable = frozenset(editable)
        self.readable = self.editable | frozenset(frozen)
        self.original: dict[str, str] = {}
        for name in sorted(self.readable):
            content = read_file(name)
            self.original[name] = content
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content, encoding="utf-8")

    def run(self, tool_input: Mapping[str, Any]) -> ToolResult:
        """Execute one tool call; errors become error results."""
        try:
            return ToolResult(self._run(tool_input))
        except ToolError as exc:
            return ToolResult(str(exc), is_error=True)

    def changed(self) -> dict[str, str]:
        """Editable files whose content differs from the parent commit's."""
        changes = {}
        for name in sorted(self.editable):
            content = (self.root / name).read_text(encoding="utf-8")
            if content != self.original[name]:
                changes[name] = content
        return changes

    def _run(self, tool_input: Mapping[str, Any]) -> str:
        command = tool_input.get("command")
        if command == "view":
            return self._view(tool_input)
        if command == "str_replace":
            return self._str_replace(tool_input)
        if command == "create":
            return self._create(tool_input)
        if command == "insert":
            return self._insert(tool_input)
        raise ToolError(f"unsupported command {command!r}: use view, str_replace, create or insert")

    def _view(self, tool_input: Mapping[str, Any]) -> str:
        name = self._path(tool_input, write=False)
        if name == ".":
            return "\n".join(sorted(self.readable))
        lines = (self.root / name).read_text(encoding="utf-8").splitlines()
        first, last = 1, len(lines)
        view_range = tool_input.get("view_range")
        if view_range is not None:
            if (
                not isinstance(view_range, list)
                or len(view_range) != 2
                or not all(isinstance(n, int) for n in view_range)
            ):
                raise ToolError("view_range must be two integers [start, end] (end -1: to the end)")
            first, last = view_range[0], view_range[1] if view_range[1] != -1 else len(lines)
            if not 1 <= first <= max(last, 1) or last > len(lines):
                raise ToolError(f"view_range {view_range} is outside the file's 1..{len(lines)}")
        numbered = "\n".join(f"{n:6d}\t{lines[n - 1]}" for n in range(first, last + 1))
        if len(numbered) > MAX_VIEW_CHARS:
            return numbered[:MAX_VIEW_CHARS] + "\n[cut: view a smaller view_range]"
        return numbered

    def _str_replace(self, tool_input: Mapping[str, Any]) -> str:
        name = self._path(tool_input, write=True)
        old = _text(tool_input, "old_str")
        new = _text(tool_input, "new_str", default="")
        path = self.root / name
        content = path.read_text(encoding="utf-8")
        found = content.count(old) if old else 0
        if found == 0:
            raise ToolError(
                f"no match for old_str in {name}: view the file and copy the text exactly"
            )
        if found > 1:
            raise ToolError(f"old_str occurs {found} times in {name}: include more context")
        path.write_text(content.replace(old, new, 1), encoding="utf-8")
        return f"edited {name}"

    def _create(self, tool_input: Mapping[str, Any]) -> str:
        name = self._path(tool_input, write=True)
        (self.root / name).write_text(_text(tool_input, "file_text"), encoding="utf-8")
        return f"wrote {name}"

    def _insert(self, tool_input: Mapping[str, Any]) -> str:
        name = self._path(tool_input, write=True)
        after = tool_input.get("insert_line")
        key = "insert_text" if "insert_text" in tool_input else "new_str"
        text = _text(tool_input, key)
        path = self.root / name
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        if not isinstance(after, int) or isinstance(after, bool) or not 0 <= after <= len(lines):
            raise ToolError(f"insert_line must be an integer from 0 to {len(lines)}")
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += "\n"
        block = text if text.endswith("\n") else text + "\n"
        path.write_text("".join([*lines[:after], block, *lines[after:]]), encoding="utf-8")
        return f"inserted {block.count(chr(10))} line(s) after line {after} of {name}"

    def _path(self, tool_input: Mapping[str, Any], *, write: bool) -> str:
        """The checked, normalised name of the call's path."""
        raw = tool_input.get("path")
        if not isinstance(raw, str) or not raw.strip():
            raise ToolError("'path' (a string) is required")
        pure = PurePosixPath(raw)
        if pure.is_absolute() or ".." in pure.parts or "\\" in raw:
            raise ToolError(f"{raw}: give a path relative to the experiment, e.g. train.py")
        target = (self.root / pure).resolve()
        if not target.is_relative_to(self.root.resolve()):
            raise ToolError(f"{raw}: leads outside the experiment")
        name = target.relative_to(self.root.resolve()).as_posix()
        if name == "." and not write:
            return name
        if write and name not in self.editable:
            allowed = ", ".join(sorted(self.editable))
            raise ToolError(f"{raw}: not an editable file (you may edit: {allowed})")
        if name not in self.readable:
            raise ToolError(f"{raw}: not a file of this experiment (files: view '.')")
        return name


def _text(tool_input: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = tool_input.get(key, default)
    if not isinstance(value, str):
        raise ToolError(f"{key!r} (a string) is required for {tool_input.get('command')}")
    return value
