"""bench/research_efficiency.py: the synthetic truth, the driver around the engine, the table."""

from __future__ import annotations

import importlib.util
import itertools
import math
import random
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from skylab import engine

REPO = Path(__file__).resolve().parents[1]
NAMES = (
    "noise-aware (the default)",
    "noise-aware, pruning on",
    "noise-aware, z = 2",
    "noise off",
)


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "research_efficiency", REPO / "bench" / "research_efficiency.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def every_point(experiment: Any) -> Iterator[tuple[int, ...]]:
    return itertools.product(*(range(len(row)) for row in experiment.effects))


def small_experiment(bench: ModuleType) -> Any:
    """Two constants whose best values (1 and 2) each help by far more than the floor."""
    return bench.Experiment(
        effects=((0.0, -0.03, 0.05), (0.0, 0.02, -0.04)),
        slow_starts=((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    )


def test_a_points_true_value_is_one_plus_the_sum_of_its_effects(bench: ModuleType) -> None:
    experiment = bench.draw_experiment(random.Random("truth"))
    assert experiment.true_value(experiment.baseline) == 1.0
    values = {}
    for point in every_point(experiment):
        effects = [row[v] for row, v in zip(experiment.effects, point, strict=True)]
        values[point] = experiment.true_value(point)
        assert values[point] == pytest.approx(1.0 + sum(effects), abs=1e-12)
    assert len(values) == math.prod(bench.VALUE_COUNTS)
    assert experiment.optimum() == pytest.approx(min(values.values()), abs=1e-12)


def test_effects_fall_in_the_documented_kinds(bench: ModuleType) -> None:
    sigma = bench.REFERENCE_SIGMA
    kinds = [(low * sigma, high * sigma) for _, low, high in bench.EFFECT_KINDS]
    seen: set[int] = set()
    for seed in range(20):
        experiment = bench.draw_experiment(random.Random(seed))
        for row in experiment.effects:
            assert row[0] == 0.0
            for effect in row[1:]:
                kind = next(i for i, (low, high) in enumerate(kinds) if low <= effect <= high)
                seen.add(kind)
    assert seen == set(range(len(kinds)))


def test_neighbours_change_exactly_one_constant(bench: ModuleType) -> None:
    experiment = small_experiment(bench)
    neighbours = experiment.neighbours((1, 2))
    assert sorted(neighbours) == [(0, 2), (1, 0), (1, 1), (2, 2)]


@pytest.mark.parametrize("prune", [True, False])
def test_without_noise_noise_aware_keeps_only_gains_and_reaches_the_optimum(
    bench: ModuleType, prune: bool
) -> None:
    experiment = small_experiment(bench)
    config = bench.Config("aware", engine.NoisePolicy(prune=prune), 1000, trials=12)
    campaign = bench.run_campaign(experiment, config, 0.0, "no noise")
    assert campaign.false_keeps == 0
    assert campaign.false_prunes == 0
    assert campaign.true_keeps == 2
    assert campaign.final_value() == pytest.approx(experiment.optimum())
    assert campaign.regret() == pytest.approx(0.0, abs=1e-12)
    assert (campaign.pruned_trials > 0) is prune


def test_the_driver_runs_a_trial_again_exactly_when_judge_says_so(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers: list[engine.Judgement] = []
    real_judge = engine.judge

    def judge(*args: Any, **kwargs: Any) -> engine.Judgement:
        answers.append(real_judge(*args, **kwargs))
        return answers[-1]

    monkeypatch.setattr(bench.engine, "judge", judge)
    policy = engine.NoisePolicy(prune=True)
    config = bench.Config("aware", policy, 96)
    experiment = bench.draw_experiment(random.Random("driver"))
    campaign = bench.run_campaign(experiment, config, 0.015, "driver")

    baseline, *others = campaign.trials
    candidate_runs = sum(len(trial.runs) for trial in others)
    assert 96 <= campaign.budget_used < 97  # the budget, and the run that crossed it
    assert campaign.executions == sum(len(t.runs) for t in campaign.trials)
    # The best is measured again: the baseline has more runs than baseline_runs.
    assert policy.baseline_runs < len(baseline.runs) <= policy.best_runs
    # Each candidate run is judged once; a run of the best re-judges the trials waiting.
    verdicts = sum(isinstance(answer, engine.Verdict) for answer in answers)
    assert verdicts == len(campaign.trials)
    assert len(answers) >= candidate_runs + policy.baseline_runs
    assert all(trial.status != "running" for trial in campaign.trials)
    for trial in others:
        assert len(trial.runs) <= max(policy.max_runs, policy.best_runs)
        if trial.kept:
            assert policy.runs_of_candidate <= len(trial.runs)
            assert all(run.status == "success" for run in trial.runs)


def test_noise_off_runs_every_trial_once(bench: ModuleType) -> None:
    config = bench.Config("off", engine.NoisePolicy(aware=False), 20)
    # a budget of 20 whole runs: 20 trials of one run each
    experiment = bench.draw_experiment(random.Random("off"))
    campaign = bench.run_campaign(experiment, config, 0.015, "off")
    assert campaign.executions == len(campaign.trials) == 20
    assert campaign.budget_used == 20
    assert campaign.pruned_trials == 0


def test_a_clear_harm_is_pruned_at_the_grace_share_and_a_slow_start_is_not(
    bench: ModuleType,
) -> None:
    policy = engine.NoisePolicy(prune=True)
    # value 1: a clear harm; value 2: a gain that trains worse at first, then catches up
    experiment = bench.Experiment(effects=((0.0, 0.3, -0.03),), slow_starts=((0.0, 0.0, 0.5),))
    rng = random.Random(0)

    def run(point: tuple[int, ...], best: list[Any]) -> Any:
        return bench.simulate_run(experiment, point, 1, 0.0, rng, policy, best, best)

    baseline = [run((0,), []).curve for _ in range(2)]
    harmed = run((1,), baseline)
    assert harmed.run == engine.RunView(1, "pruned")
    assert harmed.fraction == pytest.approx(policy.prune_grace)
    assert len(harmed.curve) == round(policy.prune_grace * 20)
    slow = run((2,), baseline)
    assert slow.run == engine.RunView(1, "success", pytest.approx(0.97)), "its gap closes"
    assert slow.fraction == 1.0
    assert run((0,), baseline).run == engine.RunView(1, "success", 1.0)


def table_rows(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]


def test_the_cli_prints_four_rows_of_numbers(
    bench: ModuleType,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("OUT", str(tmp_path))
    assert bench.main(["--campaigns", "3", "--hours", "1"]) == 0  # 12 runs of 300 s
    printed = capsys.readouterr().out
    rows = table_rows(printed)
    assert [row[0] for row in rows] == list(NAMES)
    for row in rows:
        assert len(row) == len(bench.COLUMNS)
        for cell in row[1:]:
            assert re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", cell), cell
        assert 12 <= float(row[2]) < 14  # the same budget: executions until it is spent
    assert rows[3][1] == rows[3][2] == "12.0"  # noise off: one run per trial
    assert re.search(r"pruned runs left [0-9]+ execution-seconds per campaign", printed)
    assert (tmp_path / "research_efficiency.md").read_text() == printed


def test_the_same_seed_gives_the_same_table(
    bench: ModuleType, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OUT", raising=False)
    outputs = []
    for seed in ("5", "5", "6"):
        bench.main(["--campaigns", "2", "--hours", "1", "--seed", seed])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert table_rows(outputs[0]) != table_rows(outputs[2])
