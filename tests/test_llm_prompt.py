"""The prompt: what it holds, that it stays bounded, and the guardrails' findings."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.toy_experiment import TRAIN_PY, write_toy_experiment

from skylab.config import load_experiment
from skylab.errors import UserError
from skylab.strategies.base import PastTrial, ProposalContext, Usage
from skylab.strategies.llm import prompt
from skylab.strategies.llm.guardrails import change_signature, diff_signature, problem
from skylab.strategies.llm.pricing import Price, TurnTokens, price_of
from skylab.strategies.llm.settings import llm_settings

FILES = {"train.py": TRAIN_PY}


def _trial(number: int, status: str = "success", **fields: object) -> PastTrial:
    values: dict[str, object] = {
        "number": number,
        "status": status,
        "kept": status == "success" and number % 2 == 1,
        "metric": 1.0 + number / 1000 if status == "success" else None,
        "description": f"change number {number} " + "x" * 300,
        "params": {},
        "strategy": "llm",
    }
    values.update(fields)
    return PastTrial(**values)  # type: ignore[arg-type]


def _context(tmp_path: Path, history: list[PastTrial]) -> ProposalContext:
    config = load_experiment(
        write_toy_experiment(tmp_path / "toy", "[strategy.sweep.parameters.LR]\nvalues = [0.2]")
    )
    return ProposalContext(
        experiment=config,
        parent_commit="a" * 40,
        read_file=lambda name: (config.root / name).read_text(),
        history=history,
        best=history[0] if history else None,
    )


def test_the_memory_holds_goal_best_table_crash_and_files(tmp_path: Path) -> None:
    history = [
        _trial(1, strategy="baseline"),
        _trial(2, "crash", log_tail="Traceback\nRuntimeError: boom"),
        _trial(3, "skipped"),
    ]
    text = prompt.memory(_context(tmp_path, history), history_trials=20, files=FILES)
    assert "Minimize val_bpb" in text
    assert "Best so far: val_bpb = 1.001000 (trial #1" in text
    assert "| 2 | - | crash |" in text and "| 3 | - | skipped |" in text
    assert "RuntimeError: boom" in text
    assert TRAIN_PY.strip() in text
    # Descriptions are cut to one short line.
    assert "x" * 200 not in text


def test_the_prompt_stays_bounded_as_the_history_grows(tmp_path: Path) -> None:
    def size(trials: int) -> int:
        history = [
            _trial(n, "crash" if n % 7 == 0 else "success", log_tail="E" * 10_000)
            for n in range(1, trials + 1)
        ]
        return len(prompt.memory(_context(tmp_path, history), history_trials=20, files=FILES))

    at_20, at_200, at_2000 = size(20), size(200), size(2000)
    # Only the digits of trial numbers and of "the last 20 of N" grow.
    assert at_200 - at_20 < 100
    assert at_2000 - at_200 < 100
    assert at_20 < 3 * len(TRAIN_PY) + 20 * 200 + prompt.MAX_CRASH_LOG_CHARS + 2000


def test_the_static_prefix_is_cached_for_an_hour(tmp_path: Path) -> None:
    config = _context(tmp_path, []).experiment
    blocks = prompt.system(config, "Rules of the game.")
    assert blocks[-1]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    assert blocks[-1]["text"] == "Rules of the game."
    assert "train.py" in blocks[0]["text"] and "prepare.py" in blocks[0]["text"]


ORIGINAL = {"train.py": "LR = 0.1\nDEPTH = 2\n"}
GIT_DIFF = """\
diff --git a/train.py b/train.py
index 1111111..2222222 100644
--- a/train.py
+++ b/train.py
@@ -1,2 +1,2 @@
-LR = 0.1
+LR = 0.2
 DEPTH = 2
"""


def test_guardrails_find_no_change_syntax_errors_and_duplicates() -> None:
    assert "no change" in (problem({}, ORIGINAL, []) or "")
    broken = problem({"train.py": "LR = (\n"}, ORIGINAL, [])
    assert broken is not None and "does not compile" in broken and "line 1" in broken
    changed = {"train.py": "LR = 0.2\nDEPTH = 2\n"}
    assert change_signature(changed, ORIGINAL) == diff_signature(GIT_DIFF)
    earlier = _trial(4, "success", kept=False, diff=GIT_DIFF)
    duplicate = problem(changed, ORIGINAL, [earlier])
    assert duplicate is not None and "trial #4 (reverted" in duplicate
    assert problem({"train.py": "LR = 0.3\nDEPTH = 2\n"}, ORIGINAL, [earlier]) is None


def test_prices_and_settings() -> None:
    price = price_of("claude-sonnet-4-5-20250929", None, None)
    assert price == Price(3.0, 15.0)
    assert price_of("claude-opus-4-5", None, None) == Price(5.0, 25.0)
    assert price_of("claude-opus-4-1-20250805", None, None) == Price(15.0, 75.0)
    assert price_of("my-model", 1.0, 2.0) == Price(1.0, 2.0)
    with pytest.raises(UserError, match="no known price for 'my-model'"):
        price_of("my-model", None, None)
    usage = TurnTokens(1_000_000, 100_000, 1_000_000, 0, 1_000_000).usage(price)
    # 3 input + 1.5 output + 0.3 cache reads + 6 one-hour cache writes
    assert usage.cost_usd == pytest.approx(10.8)
    assert usage == Usage(1_000_000, 100_000, 1_000_000, 1_000_000, usage.cost_usd)
    with pytest.raises(UserError, match=r"^strategy\.llm\.max_turns: "):
        llm_settings({"max_turns": 0})
    with pytest.raises(UserError, match=r"^strategy\.llm\.modle: unknown field"):
        llm_settings({"modle": "x"})
    assert llm_settings({"model": "a"}, {"model": "b"}).model == "b"
