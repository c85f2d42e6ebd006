"""End to end: `skylab prepare` and `skylab run` of the real gpt-pretrain at its cpu profile."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from tests.toy_experiment import skylab

from skylab.store import Store

# Minutes of real training on a small machine: more than the default per-test timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[1]


def test_a_sweep_of_the_real_experiment(tmp_path: Path, database_url: str) -> None:
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
        # each candidate is kept iff it beats the best value before it
        best = baseline.metric
        for trial in trials[1:]:
            assert trial.metric is not None
            assert trial.kept == (trial.metric < best), trial
            best = min(best, trial.metric) if trial.kept else best
            assert "+MATRIX_LR = " in trial.diff
        assert store.progress(baseline.id), "no progress series recorded"
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
