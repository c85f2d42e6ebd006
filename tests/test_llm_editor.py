"""The text editor tool on a scratch copy: commands, and the paths it refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from skylab.strategies.llm.editor import Scratch

TRAIN = "LR = 0.1\nDEPTH = 2\n\nprint(LR)\n"
FILES = {"train.py": TRAIN, "prepare.py": "# frozen\n"}


@pytest.fixture
def scratch(tmp_path: Path) -> Scratch:
    root = tmp_path / "scratch"
    root.mkdir()
    return Scratch(root, ["train.py"], ["prepare.py"], FILES.__getitem__)


def ok(scratch: Scratch, **call: Any) -> str:
    result = scratch.run(call)
    assert not result.is_error, result.content
    return result.content


def refused(scratch: Scratch, **call: Any) -> str:
    result = scratch.run(call)
    assert result.is_error, result.content
    return result.content


def test_view_numbers_lines_and_honours_a_range(scratch: Scratch) -> None:
    assert ok(scratch, command="view", path="train.py").splitlines()[0] == "     1\tLR = 0.1"
    assert ok(scratch, command="view", path="train.py", view_range=[2, 2]) == "     2\tDEPTH = 2"
    assert ok(scratch, command="view", path="train.py", view_range=[3, -1]).count("\n") == 1
    assert "outside" in refused(scratch, command="view", path="train.py", view_range=[3, 9])
    assert ok(scratch, command="view", path=".").split() == ["prepare.py", "train.py"]


def test_str_replace_needs_exactly_one_match(scratch: Scratch) -> None:
    assert "no match" in refused(scratch, command="str_replace", path="train.py", old_str="LR=1")
    assert "2 times" in refused(scratch, command="str_replace", path="train.py", old_str="LR")
    ok(scratch, command="str_replace", path="train.py", old_str="LR = 0.1", new_str="LR = 0.2")
    assert scratch.changed() == {"train.py": TRAIN.replace("0.1", "0.2")}


def test_insert_and_create(scratch: Scratch) -> None:
    ok(scratch, command="insert", path="train.py", insert_line=0, new_str="import math")
    assert scratch.changed()["train.py"].startswith("import math\nLR = 0.1\n")
    ok(scratch, command="insert", path="train.py", insert_line=5, insert_text="print(1)\n")
    assert scratch.changed()["train.py"].endswith("print(LR)\nprint(1)\n")
    assert "insert_line" in refused(
        scratch, command="insert", path="train.py", insert_line=99, new_str="x"
    )
    ok(scratch, command="create", path="train.py", file_text="print('new')\n")
    assert scratch.changed() == {"train.py": "print('new')\n"}


def test_frozen_files_can_be_read_but_not_written(scratch: Scratch) -> None:
    assert "frozen" in ok(scratch, command="view", path="prepare.py")
    message = refused(scratch, command="str_replace", path="prepare.py", old_str="#", new_str="")
    assert "not an editable file" in message and "train.py" in message
    refused(scratch, command="create", path="prepare.py", file_text="")
    refused(scratch, command="create", path="new.py", file_text="")
    assert scratch.changed() == {}
    assert (scratch.root / "prepare.py").read_text() == "# frozen\n"


@pytest.mark.parametrize(
    "path", ["/etc/passwd", "../outside.py", "sub/../../outside.py", "", "notes.md"]
)
def test_paths_outside_the_experiment_are_refused(scratch: Scratch, path: str) -> None:
    refused(scratch, command="view", path=path)
    refused(scratch, command="create", path=path, file_text="x")


def test_a_symlink_leading_out_is_refused(scratch: Scratch, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    (scratch.root / "link").symlink_to(tmp_path)
    (scratch.root / "train_link.py").symlink_to(secret)
    assert "outside" in refused(scratch, command="view", path="link/secret.txt")
    assert "outside" in refused(scratch, command="create", path="train_link.py", file_text="x")
    assert secret.read_text() == "do not read"


@pytest.mark.parametrize(
    "call",
    [
        {"command": "undo_edit", "path": "train.py"},
        {"path": "train.py"},
        {"command": "str_replace", "path": "train.py"},
        {"command": "str_replace", "path": "train.py", "old_str": 3},
        {"command": "create", "path": "train.py"},
        {"command": "insert", "path": "train.py", "insert_line": "1", "new_str": "x"},
        {"command": "view", "path": ["train.py"]},
        {"command": "view", "path": "train.py", "view_range": "1-2"},
    ],
)
def test_malformed_calls_are_errors_not_crashes(scratch: Scratch, call: dict[str, Any]) -> None:
    refused(scratch, **call)
    assert scratch.changed() == {}
