"""`skylab run --strategy llm` on the toy experiment, the real SDK talking to the fake API.

The CLI runs in-process: importing the SDK costs a process minutes on a small machine.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Imported at collection: the SDK takes minutes to import on a small machine, which
# must not count against a test's timeout.
import anthropic  # noqa: F401
import pytest
from tests.fake_anthropic import FakeAnthropic
from tests.scripted_model import Proposals, call, done, last_user_text, set_constant
from tests.toy_experiment import mark_prepared, write_toy_experiment

from skylab.cli import main
from skylab.store import Store

KEY = "sk-ant-local-run-0123456789"
SWEEP = "[strategy.sweep.parameters.LR]\nvalues = [0.2]"


@pytest.fixture
def server() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(api_key=KEY) as fake:
        yield fake


def _experiment(tmp_path: Path, server: FakeAnthropic, llm: str = "") -> Path:
    table = f'[strategy.llm]\nbase_url = "{server.url}"\nmax_retries = 1\nmax_fix_rounds = 1\n'
    root = write_toy_experiment(tmp_path / "toy", SWEEP, extra=table + llm)
    (root / "program.md").write_text("Lower val_bpb by changing LR.\n")
    return root


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> Ran:
    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    return Ran(code, out, err)


def _run(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    experiment: Path,
    url: str,
    *extra: str,
    key: str = KEY,
) -> Ran:
    home = tmp_path / "home"
    mark_prepared(home)
    monkeypatch.setenv("ANTHROPIC_API_KEY", key)
    args = ["run", str(experiment), "--strategy", "llm", "--home", str(home)]
    return _cli(capsys, *args, "--database-url", url, *extra)


def test_an_llm_campaign_keeps_reverts_and_skips(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    database_url: str,
    server: FakeAnthropic,
) -> None:
    server.script = Proposals(
        # 0.1 -> 0.25: val_bpb 1.04 -> 1.0025, kept
        [set_constant("LR", "0.25"), done("LR 0.1 -> 0.25")],
        # a syntax error the guardrail sends back, then 0.5: 1.04, reverted
        [
            call(command="str_replace", path="train.py", old_str="LR = 0.25", new_str="LR = (0.5"),
            done("LR 0.25 -> 0.5"),
            call(command="str_replace", path="train.py", old_str="LR = (0.5", new_str="LR = 0.5"),
            done("LR 0.25 -> 0.5, fixed"),
        ],
        # no change, twice: skipped without running
        [done("I would rather not change anything")],
    )
    experiment = _experiment(tmp_path, server)
    ran = _run(
        capsys, monkeypatch, tmp_path, experiment, database_url, "--tag", "llm", "--max-trials", "4"
    )
    assert ran.returncode == 0, ran.stderr
    assert "ran the maximum of 4 trials" in ran.stderr
    assert "llm-0004 skipped: You made no change to any editable file" in ran.stderr

    with Store.connect(database_url) as store:
        campaign = store.get_campaign("llm")
        assert campaign is not None and campaign.strategy == "llm"
        trials = store.trials(campaign.id)
    assert [(t.status, t.kept, t.description) for t in trials] == [
        ("success", True, "baseline"),
        ("success", True, "LR 0.1 -> 0.25"),
        ("success", False, "LR 0.25 -> 0.5, fixed"),
        ("skipped", False, "I would rather not change anything"),
    ]
    assert "+LR = 0.5  # the swept constant" in trials[2].diff
    assert trials[2].parent_commit == trials[1].commit
    assert trials[3].commit == trials[3].parent_commit == trials[1].commit
    for trial in trials[1:]:
        assert trial.usage.output_tokens > 0 and trial.usage.cost_usd > 0, trial
    assert trials[0].usage.total_tokens == 0
    # The syntax error went back to the model with the compiler's message.
    assert any(
        "train.py does not compile" in last_user_text(r.body) for r in server.messages_requests()
    )
    # The second proposal's prompt shows the first trial's outcome.
    second = [r.body for r in server.messages_requests() if len(r.body["messages"]) == 1][1]
    assert "| 2 | 1.002500 | kept | LR 0.1 -> 0.25 |" in second["messages"][0]["content"][0]["text"]

    shown = _cli(
        capsys,
        *("history", "--tag", "llm", "--home", str(tmp_path / "home")),
        *("--database-url", database_url),
    )
    assert shown.returncode == 0, shown.stderr
    header = shown.stdout.splitlines()[1]
    assert "tokens" in header and "llm_usd" in header
    assert "LLM: 3 proposals" in shown.stdout and "about $0.0" in shown.stdout
    assert KEY not in ran.stdout + ran.stderr + shown.stdout + shown.stderr
    with Store.connect(database_url) as store, store._transaction() as cursor:
        dump = str(cursor.execute("SELECT * FROM trials").fetchall())
        dump += str(cursor.execute("SELECT * FROM campaigns").fetchall())
    assert KEY not in dump


def test_the_campaign_stops_when_its_llm_budget_is_spent(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    database_url: str,
    server: FakeAnthropic,
) -> None:
    server.script = Proposals([set_constant("LR", "0.25"), done("LR 0.25")])
    experiment = _experiment(tmp_path, server, llm="budget_tokens = 100\n")
    ran = _run(capsys, monkeypatch, tmp_path, experiment, database_url, "--tag", "budget")
    assert ran.returncode == 0, ran.stderr
    assert "succeeded: the LLM budget of 100 tokens is spent" in ran.stderr
    with Store.connect(database_url) as store:
        campaign = store.get_campaign("budget")
        assert campaign is not None
        assert len(store.trials(campaign.id)) == 2  # the baseline and one proposal
    assert len([r for r in server.messages_requests() if len(r.body["messages"]) == 1]) == 1


@pytest.mark.parametrize("key", ["sk-wrong", ""])
def test_a_bad_key_stops_the_run_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    database_url: str,
    server: FakeAnthropic,
    key: str,
) -> None:
    experiment = _experiment(tmp_path, server)
    ran = _run(capsys, monkeypatch, tmp_path, experiment, database_url, "--tag", "nokey", key=key)
    assert ran.returncode == 2
    [line] = ran.stderr.strip().splitlines()
    assert "invalid or missing Anthropic API key" in line
    if key:
        assert "HTTP 401" in line and key not in line
    else:
        assert line.endswith("set ANTHROPIC_API_KEY")
    with Store.connect(database_url) as store:
        assert store.get_campaign("nokey") is None
    assert not (tmp_path / "home" / "workspaces" / "nokey.git").exists()


def test_a_resumed_llm_campaign_runs_its_interrupted_trial_again_without_a_new_proposal(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    database_url: str,
    server: FakeAnthropic,
) -> None:
    server.script = Proposals(
        [set_constant("LR", "0.25"), done("LR 0.1 -> 0.25")],
        [set_constant("LR", "0.2"), done("LR 0.25 -> 0.2")],
    )
    experiment = _experiment(tmp_path, server)
    monkeypatch.setenv("TOY_SLOW_LR", "0.25")  # trial 2 trains until it is interrupted
    interrupted = threading.Event()

    def interrupt_once_trial_2_trains() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with Store.connect(database_url) as store:
                campaign = store.get_campaign("resume")
                trial = None if campaign is None else store.get_trial(campaign.id, 2)
            if trial is not None and any(run.status == "running" for run in trial.runs):
                time.sleep(1.0)
                interrupted.set()
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
                return
            time.sleep(0.2)

    threading.Thread(target=interrupt_once_trial_2_trains, daemon=True).start()
    first = _run(capsys, monkeypatch, tmp_path, experiment, database_url, "--tag", "resume")
    assert interrupted.is_set() and first.returncode == 130, first.stderr
    proposals = [r for r in server.messages_requests() if len(r.body["messages"]) == 1]
    assert len(proposals) == 1

    monkeypatch.delenv("TOY_SLOW_LR")
    again = _run(
        capsys,
        monkeypatch,
        tmp_path,
        experiment,
        database_url,
        "--tag",
        "resume",
        "--resume",
        "--max-trials",
        "3",
    )
    assert again.returncode == 0, again.stderr
    # Trial 2 got a new run of its commit: the model was asked once more, for trial 3.
    proposals = [r for r in server.messages_requests() if len(r.body["messages"]) == 1]
    assert len(proposals) == 2
    assert "already tried" not in again.stderr
    with Store.connect(database_url) as store:
        campaign = store.get_campaign("resume")
        assert campaign is not None
        trials = store.trials(campaign.id)
    assert [(t.status, t.description) for t in trials] == [
        ("success", "baseline"),
        ("success", "LR 0.1 -> 0.25"),
        ("success", "LR 0.25 -> 0.2"),
    ]
    assert [run.status for run in trials[1].runs] == ["killed", "success"]
