"""The LLM strategy with the real anthropic SDK against the fake Messages API."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Imported at collection: the SDK takes minutes to import on a small machine, which
# must not count against a test's timeout.
import anthropic  # noqa: F401
import pytest
from tests.fake_anthropic import FakeAnthropic, Reply, error, message, text, tool_use
from tests.scripted_model import (
    TOOL,
    Proposals,
    call,
    done,
    last_user_text,
    set_constant,
    tool_results,
)
from tests.toy_experiment import TRAIN_PY, write_toy_experiment

from skylab.config import load_experiment
from skylab.strategies import StrategyOptions, build_strategy
from skylab.strategies.base import (
    Exhausted,
    PastTrial,
    Proposal,
    ProposalContext,
    Skipped,
    Strategy,
    StrategyFailed,
    StrategyUnavailable,
    Usage,
)

KEY = "sk-ant-test-0123456789"


@pytest.fixture
def server() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(api_key=KEY) as fake:
        yield fake


def strategy(tmp_path: Path, server: FakeAnthropic, **llm: Any) -> tuple[Strategy, ProposalContext]:
    root = write_toy_experiment(tmp_path / "toy", "[strategy.sweep.parameters.LR]\nvalues = [0.2]")
    (root / "program.md").write_text("Lower val_bpb. Only LR matters.\n")
    config = load_experiment(root)
    settings = {"base_url": server.url, "max_retries": 1, **llm}
    built = build_strategy("llm", config, StrategyOptions(llm=settings, api_key=KEY))
    context = ProposalContext(
        experiment=config,
        parent_commit="a" * 40,
        read_file=lambda name: (root / name).read_text(),
        history=[],
        best=None,
    )
    return built, context


def proposal(result: object) -> Proposal:
    assert isinstance(result, Proposal), result
    return result


def test_a_tool_use_conversation_becomes_a_proposal(tmp_path: Path, server: FakeAnthropic) -> None:
    server.script = Proposals(
        [call(command="view", path="train.py"), set_constant("LR", "0.25"), done("LR 0.1 -> 0.25")]
    )
    built, context = strategy(tmp_path, server)
    found = proposal(built.propose(context))
    assert found.description == "LR 0.1 -> 0.25"
    assert "right way" in found.rationale
    [edit] = found.edits
    assert edit.path == "train.py" and edit.content == TRAIN_PY.replace("LR = 0.1", "LR = 0.25")

    requests = [r.body for r in server.messages_requests()]
    assert len(requests) == 3
    first = requests[0]
    assert first["tools"] == [{"type": "text_editor_20250728", "name": TOOL}]
    assert first["system"][-1]["cache_control"] == {"type": "ephemeral", "ttl": "1h"}
    assert "Only LR matters" in first["system"][-1]["text"]
    assert "LR = 0.1  # the swept constant" in first["messages"][0]["content"][0]["text"]
    # The view's result went back to the model, numbered.
    [viewed] = tool_results(requests[1])
    assert not viewed["is_error"] and "     6\tLR = 0.1" in viewed["content"]
    # Usage is the sum over the three turns, priced at Sonnet's list price.
    # Every prompt ends in a breakpoint: its tokens are cache writes and reads.
    assert found.usage.output_tokens > 0
    assert found.usage.cache_write_tokens > 0 and found.usage.cache_read_tokens > 0
    assert 0 < found.usage.cost_usd < 0.1
    # The key travels in its header, and nowhere else.
    for recorded in server.requests:
        sent = recorded.headers.get("x-api-key") or recorded.headers["authorization"]
        assert sent.removeprefix("Bearer ") == KEY
        assert KEY.encode() not in recorded.raw
    assert KEY not in repr(found)


def test_rate_limits_and_overload_are_retried(tmp_path: Path, server: FakeAnthropic) -> None:
    server.script = Proposals([set_constant("LR", "0.2"), done("LR 0.2")])
    server.queue(
        error(429, "rate_limit_error", "slow down", {"retry-after": "0"}),
        error(529, "overloaded_error", "Overloaded"),
    )
    built, context = strategy(tmp_path, server, max_retries=2)
    assert proposal(built.propose(context)).description == "LR 0.2"
    assert len(server.messages_requests()) == 4


def test_a_request_that_times_out_is_retried(tmp_path: Path, server: FakeAnthropic) -> None:
    server.script = Proposals([set_constant("LR", "0.2"), done("LR 0.2")])
    server.queue(Reply(body={}, delay=30))  # never answered in time
    built, context = strategy(tmp_path, server, timeout_seconds=2, max_retries=1)
    assert proposal(built.propose(context)).description == "LR 0.2"
    assert len(server.messages_requests()) == 3


def test_overload_past_the_retries_is_unavailable(tmp_path: Path, server: FakeAnthropic) -> None:
    server.queue(*[error(529, "overloaded_error", "Overloaded")] * 3)
    built, context = strategy(tmp_path, server, max_retries=1)
    with pytest.raises(StrategyUnavailable, match="HTTP 529 after 1 retries: Overloaded"):
        built.propose(context)
    assert len(server.messages_requests()) == 2


@pytest.mark.parametrize("forbidden", [False, True])
def test_a_refused_key_fails_before_any_proposal(
    tmp_path: Path, server: FakeAnthropic, forbidden: bool
) -> None:
    built, context = strategy(tmp_path, server)
    if forbidden:
        server.forbidden = True
    else:
        server.api_key = "sk-another-key"
    with pytest.raises(StrategyFailed, match="invalid or missing Anthropic API key") as failure:
        built.check_access()
    assert KEY not in str(failure.value)
    with pytest.raises(StrategyFailed, match="invalid or missing Anthropic API key"):
        built.propose(context)
    assert server.messages_requests() == server.messages_requests()[:1]


def test_an_unknown_model_is_named(tmp_path: Path, server: FakeAnthropic) -> None:
    built, _ = strategy(
        tmp_path, server, model="claude-sonnet-4-0", input_usd_per_mtok=3, output_usd_per_mtok=15
    )
    with pytest.raises(StrategyFailed, match="no model 'claude-sonnet-4-0'"):
        built.check_access()


def test_bad_tool_calls_get_error_results(tmp_path: Path, server: FakeAnthropic) -> None:
    bad_calls = [
        call(command="str_replace", path="train.py"),  # no old_str
        call(command="create", path="prepare.py", file_text="x = 1\n"),  # frozen
        call(command="view", path="../../etc/passwd"),  # escape
        call(command="create", path="/tmp/evil.py", file_text="x = 1\n"),  # absolute
        lambda r: message(r, [tool_use("bash", {"command": "ls"})], "tool_use"),
    ]
    server.script = Proposals([*bad_calls, set_constant("LR", "0.2"), done("LR 0.2")])
    built, context = strategy(tmp_path, server)
    found = proposal(built.propose(context))
    assert [edit.path for edit in found.edits] == ["train.py"]
    requests = [r.body for r in server.messages_requests()]
    errors = [tool_results(request)[0] for request in requests[1:6]]
    assert all(result["is_error"] for result in errors)
    assert "'old_str'" in errors[0]["content"]
    assert "not an editable file" in errors[1]["content"]
    assert "relative to the experiment" in errors[2]["content"]
    assert "relative to the experiment" in errors[3]["content"]
    assert "unknown tool 'bash'" in errors[4]["content"]
    assert not Path("/tmp/evil.py").exists()
    assert (context.experiment.root / "prepare.py").read_text().startswith("# frozen")


def test_a_syntax_error_goes_back_to_the_model(tmp_path: Path, server: FakeAnthropic) -> None:
    server.script = Proposals(
        [
            call(command="str_replace", path="train.py", old_str="LR = 0.1", new_str="LR = (0.2"),
            done("LR 0.2"),
            call(command="str_replace", path="train.py", old_str="LR = (0.2", new_str="LR = 0.2"),
            done("LR 0.2, fixed"),
        ]
    )
    built, context = strategy(tmp_path, server)
    found = proposal(built.propose(context))
    assert found.description == "LR 0.2, fixed"
    compile(found.edits[0].content, "train.py", "exec")
    feedback = last_user_text(server.messages_requests()[2].body)
    assert "train.py does not compile" in feedback and "line 6" in feedback


def test_no_change_is_asked_again_then_skipped(tmp_path: Path, server: FakeAnthropic) -> None:
    server.script = Proposals([done("nothing to do")])
    built, context = strategy(tmp_path, server, max_fix_rounds=2)
    skipped = built.propose(context)
    assert isinstance(skipped, Skipped), skipped
    assert skipped.reason == "You made no change to any editable file"
    assert skipped.description == "nothing to do"
    assert len(server.messages_requests()) == 3  # the first answer and two more chances
    assert skipped.usage.output_tokens > 0


def test_a_duplicate_of_an_earlier_trial_is_rejected(tmp_path: Path, server: FakeAnthropic) -> None:
    server.script = Proposals([set_constant("LR", "0.2"), done("LR 0.2")])
    built, context = strategy(tmp_path, server, max_fix_rounds=0)
    first = proposal(built.propose(context))
    diff = (
        "--- a/train.py\n+++ b/train.py\n@@ -5 +5 @@\n"
        "-LR = 0.1  # the swept constant\n+LR = 0.2  # the swept constant\n"
    )
    earlier = PastTrial(2, "success", False, 1.01, first.description, {}, "llm", diff=diff)
    again = built.propose(
        ProposalContext(
            context.experiment, context.parent_commit, context.read_file, [earlier], None
        )
    )
    assert isinstance(again, Skipped)
    assert again.reason == "This exact change was already tried as trial #2 (reverted: LR 0.2)"


def test_max_tokens_truncation_and_the_turn_cap(tmp_path: Path, server: FakeAnthropic) -> None:
    truncated = [
        lambda r: message(
            r, [tool_use(TOOL, {"command": "create", "path": "train.py"})], "max_tokens"
        ),
        lambda r: message(r, [text("Here is my long")], "max_tokens"),
        call(command="view", path="train.py"),
    ]
    server.script = Proposals(truncated)
    built, context = strategy(tmp_path, server, max_turns=4)
    skipped = built.propose(context)
    assert isinstance(skipped, Skipped)
    assert skipped.reason.startswith("no usable change in 4 model turns")
    requests = [r.body for r in server.messages_requests()]
    assert len(requests) == 4
    [cut] = tool_results(requests[1])
    assert cut["is_error"] and "output token limit" in cut["content"]
    assert "output token limit" in last_user_text(requests[2])


def test_the_budget_stops_the_strategy(tmp_path: Path, server: FakeAnthropic) -> None:
    built, context = strategy(tmp_path, server, budget_usd=0.5, budget_tokens=10_000)
    spent = PastTrial(2, "success", True, 1.0, "x", {}, "llm", usage=Usage(100, 100, 0, 0, 0.51))
    over = built.propose(
        ProposalContext(context.experiment, context.parent_commit, context.read_file, [spent], None)
    )
    assert over == Exhausted("the LLM budget of $0.50 is spent ($0.5100 used)")
    tokens = PastTrial(2, "success", True, 1.0, "x", {}, "llm", usage=Usage(9000, 1000))
    over = built.propose(
        ProposalContext(
            context.experiment, context.parent_commit, context.read_file, [tokens], None
        )
    )
    assert over == Exhausted("the LLM budget of 10000 tokens is spent (10000 used)")
    assert server.messages_requests() == []
