"""End to end: `skylab prepare` and `skylab run` of the real gpt-pretrain at its cpu profile,
with the sweep strategy and with the LLM strategy against the fake Messages API."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

# Imported at collection: the SDK takes minutes to import on a small machine, which
# must not count against a test's timeout.
import anthropic  # noqa: F401
import pytest
from tests.fake_anthropic import FakeAnthropic
from tests.scripted_model import Proposals, call, done, last_user_text, set_constant
from tests.toy_experiment import skylab

from skylab.cli import main
from skylab.store import Store, TrialRecord

# Minutes of real training on a small machine: more than the default per-test timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A skylab home with gpt-pretrain's cpu profile prepared, shared by the campaigns."""
    tmp_path = tmp_path_factory.mktemp("e2e")
    home = tmp_path / "home"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    # A small local corpus keeps tokenizer training short: the repository's own text.
    for source in [*REPO.glob("operator/skylab/**/*.py"), REPO / "README.md"]:
        (corpus / f"{source.stem}-{abs(hash(source))}.txt").write_text(source.read_text())
    prepared = skylab(
        "prepare",
        "gpt-pretrain",
        "--profile",
        "cpu",
        "--source",
        str(corpus),
        "--home",
        str(home),
        timeout=900,
    )
    assert prepared.returncode == 0, prepared.stderr + prepared.stdout
    return home


def check_noise_aware_decisions(trials: list[TrialRecord]) -> None:
    """Each candidate ran once and was reverted (its first run did not beat the best's
    mean), or ran three times and was decided on its mean, with the numbers said."""
    best = trials[0]
    for trial in trials[1:]:
        assert trial.metric is not None and best.metric is not None
        if trial.run_count == 1:
            assert not trial.kept and trial.metric >= best.metric, trial
            assert "reverted without confirmation" in trial.decision_reason
        else:
            assert trial.run_count == 3, trial
            assert trial.decision_reason.startswith("kept: " if trial.kept else "not kept")
            # the best's mean as it was then: it is measured again before confirmations
            assert "(n=3) against the best's " in trial.decision_reason
            assert "sigma=" in trial.decision_reason
        best = trial if trial.kept else best


def test_a_sweep_of_the_real_experiment(tmp_path: Path, home: Path, database_url: str) -> None:
    ran = skylab(
        "run",
        "gpt-pretrain",
        "--profile",
        "cpu",
        "--strategy",
        "sweep",
        "--max-trials",
        "2",
        "--tag",
        "e2e",
        "--home",
        str(home),
        "--database-url",
        database_url,
        timeout=1800,
    )
    assert ran.returncode == 0, ran.stderr
    assert "ran the maximum of 2 trials" in ran.stderr

    with Store.connect(database_url) as store:
        campaign = store.get_campaign("e2e")
        assert campaign is not None and campaign.status == "succeeded"
        trials = store.trials(campaign.id)
        assert [t.status for t in trials] == ["success"] * 2
        assert [t.description for t in trials] == ["baseline", "MATRIX_LR=0.01"]
        baseline = trials[0]
        assert baseline.kept and baseline.metric is not None and 0 < baseline.metric < 13
        # the baseline ran 3 times, seeded apart, then (before a confirmation) at most
        # once more, up to the cpu profile's best_runs; its mean and spread are the reference
        assert [(r.number, r.seed, r.status) for r in baseline.runs][:3] == [
            (1, 42, "success"),
            (2, 43, "success"),
            (3, 44, "success"),
        ]
        assert [(r.number, r.seed) for r in baseline.runs[3:]] in ([], [(4, 45)])
        assert baseline.metric_sd is not None and baseline.metric_sd > 0
        assert "(n=3) -> kept (baseline: " in ran.stderr
        check_noise_aware_decisions(trials)
        for trial in trials[1:]:
            assert "+MATRIX_LR = " in trial.diff
        assert store.progress(baseline.id, 3), "no progress series recorded"
        assert baseline.metrics["num_steps"] > 0

    export = tmp_path / "results.tsv"
    shown = skylab(
        "history",
        "gpt-pretrain",
        "--tag",
        "e2e",
        "--export",
        str(export),
        "--home",
        str(home),
        "--database-url",
        database_url,
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.count("success") == 2
    rows = list(csv.reader(export.open(), delimiter="\t"))
    assert rows[0] == ["commit", "val_bpb", "memory_gb", "status", "description"]
    assert [row[3] for row in rows[1:]] == ["keep" if t.kept else "discard" for t in trials]


KEY = "sk-ant-e2e-0123456789"


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAnthropic]:
    with FakeAnthropic(api_key=KEY) as fake:
        monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
        monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)
        yield fake


def test_an_llm_campaign_of_the_real_experiment(
    capsys: pytest.CaptureFixture[str], home: Path, database_url: str, server: FakeAnthropic
) -> None:
    broken = {"old_str": "WARMDOWN_RATIO = 0.5", "new_str": "WARMDOWN_RATIO = (0.3"}
    fixed = {"old_str": "WARMDOWN_RATIO = (0.3", "new_str": "WARMDOWN_RATIO = 0.3"}
    server.script = Proposals(
        [set_constant("MATRIX_LR", "0.02"), done("MATRIX_LR 0.04 -> 0.02")],
        [
            call(command="str_replace", path="train.py", **broken),
            done("WARMDOWN_RATIO 0.5 -> 0.3"),
            call(command="str_replace", path="train.py", **fixed),
            done("WARMDOWN_RATIO 0.5 -> 0.3"),
        ],
    )
    # In-process: the pytest worker has imported the SDK already.
    args = ["run", "gpt-pretrain", "--profile", "cpu", "--strategy", "llm", "--tag", "llm"]
    code = main([*args, "--max-trials", "3", "--home", str(home), "--database-url", database_url])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "ran the maximum of 3 trials" in err

    with Store.connect(database_url) as store:
        campaign = store.get_campaign("llm")
        assert campaign is not None and campaign.status == "succeeded"
        trials = store.trials(campaign.id)
    assert [t.status for t in trials] == ["success"] * 3
    assert [t.description for t in trials] == [
        "baseline",
        "MATRIX_LR 0.04 -> 0.02",
        "WARMDOWN_RATIO 0.5 -> 0.3",
    ]
    check_noise_aware_decisions(trials)
    for trial in trials[1:]:
        assert trial.usage.output_tokens > 0 and trial.usage.cost_usd > 0
    assert "+MATRIX_LR = 0.02" in trials[1].diff
    assert "+WARMDOWN_RATIO = 0.3" in trials[2].diff and "(0.3" not in trials[2].diff
    requests = [r.body for r in server.messages_requests()]
    assert any("train.py does not compile" in last_user_text(r) for r in requests)
    # The prompt each proposal starts from: printed for the record, bounded by design.
    firsts = [r for r in requests if len(r["messages"]) == 1]
    sizes = [len(json.dumps(r)) for r in firsts]
    print(f"first-request sizes per proposal (bytes): {sizes}")
    assert len(firsts) == 2 and all(size < 60_000 for size in sizes)
