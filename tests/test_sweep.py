"""The sweep strategy, built from a real experiment.toml through the config layer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from skylab.config import ExperimentConfig, load_experiment
from skylab.constants import read_constants
from skylab.errors import UserError
from skylab.strategies import STRATEGIES, build_strategy
from skylab.strategies.base import Exhausted, PastTrial, Proposal, ProposalContext
from skylab.strategies.sweep import RANDOM_DRAWS, SweepStrategy

EXPERIMENT = """
[experiment]
name = "tiny"

[search]
editable_files = ["train.py"]
metric = "val_bpb"
direction = "minimize"
metric_pattern = 'val_bpb: ([0-9.]+)'

[execution]
command = "python train.py"
time_budget_seconds = 60
"""

TRAIN = """\"\"\"A tiny training script.\"\"\"

DEPTH = 8  # layers
MATRIX_LR = 0.04
DROPOUT = 0.1
ACTIVATION = "relu"


def main() -> None:
    print("val_bpb: 1.0", DEPTH, MATRIX_LR, DROPOUT, ACTIVATION)
"""


def make_config(tmp_path: Path, sweep: str, train: str = TRAIN) -> ExperimentConfig:
    (tmp_path / "train.py").write_text(train)
    (tmp_path / "experiment.toml").write_text(EXPERIMENT + sweep)
    return load_experiment(tmp_path)


def sweep_table(parameters: str, settings: str = "") -> str:
    return f"[strategy.sweep]\n{settings}\n[strategy.sweep.parameters]\n{parameters}\n"


def past(
    number: int, params: dict[str, Any], status: str = "success", strategy: str = "sweep"
) -> PastTrial:
    return PastTrial(
        number=number,
        status=status,
        kept=False,
        metric=1.0,
        description="",
        params=params,
        strategy=strategy,
    )


def context(
    config: ExperimentConfig, history: Sequence[PastTrial] = (), source: str | None = None
) -> ProposalContext:
    def read_file(path: str) -> str:
        return source if source is not None else (config.root / path).read_text()

    return ProposalContext(
        experiment=config, parent_commit="0" * 40, read_file=read_file, history=history, best=None
    )


def propose_all(config: ExperimentConfig, history: Sequence[PastTrial] = ()) -> list[Proposal]:
    """Proposals until the sweep is done, each recorded as a finished, reverted trial."""
    strategy = build_strategy("sweep", config)
    trials = list(history)
    proposals: list[Proposal] = []
    while isinstance(proposal := strategy.propose(context(config, trials)), Proposal):
        proposals.append(proposal)
        trials.append(past(len(trials) + 1, dict(proposal.params)))
        assert len(proposals) <= RANDOM_DRAWS, "the sweep never ends"
    return proposals


def swept(tmp_path: Path, name: str, parameter: str) -> list[Any]:
    """The values a grid over one parameter proposes, in order."""
    config = make_config(tmp_path, sweep_table(f"{name} = {parameter}"))
    return [proposal.params[name] for proposal in propose_all(config)]


GRID = sweep_table('DEPTH = { values = [4, 8, 12] }\nACTIVATION = { values = ["relu", "gelu"] }')


def test_grid_proposes_every_changing_point_in_order_then_stops(tmp_path: Path) -> None:
    config = make_config(tmp_path, GRID)

    proposals = propose_all(config)

    # (8, "relu") is the file as it is: a no-op, skipped.
    assert [p.description for p in proposals] == [
        "DEPTH=4",
        "DEPTH=4, ACTIVATION='gelu'",
        "ACTIVATION='gelu'",
        "DEPTH=12",
        "DEPTH=12, ACTIVATION='gelu'",
    ]
    assert [p.params for p in proposals] == [
        {"DEPTH": 4, "ACTIVATION": "relu"},
        {"DEPTH": 4, "ACTIVATION": "gelu"},
        {"DEPTH": 8, "ACTIVATION": "gelu"},
        {"DEPTH": 12, "ACTIVATION": "relu"},
        {"DEPTH": 12, "ACTIVATION": "gelu"},
    ]
    assert [p.rationale for p in proposals][:2] == [
        "sweep grid point 1 of 6",
        "sweep grid point 2 of 6",
    ]


def test_proposal_edits_only_the_swept_values(tmp_path: Path) -> None:
    config = make_config(tmp_path, GRID)

    proposal = build_strategy("sweep", config).propose(context(config))

    assert isinstance(proposal, Proposal)
    assert len(proposal.edits) == 1
    assert proposal.edits[0].path == "train.py"
    assert proposal.edits[0].content == TRAIN.replace("DEPTH = 8  #", "DEPTH = 4  #")


def test_points_are_judged_against_the_parent_commit(tmp_path: Path) -> None:
    config = make_config(tmp_path, sweep_table("DEPTH = { values = [4, 8] }"))
    parent = TRAIN.replace("DEPTH = 8", "DEPTH = 4")  # a kept trial set DEPTH = 4

    proposal = build_strategy("sweep", config).propose(context(config, source=parent))

    assert isinstance(proposal, Proposal)
    assert proposal.params == {"DEPTH": 8}
    assert read_constants(proposal.edits[0].content)["DEPTH"] == 8


def test_no_point_that_changes_the_file_means_nothing_to_propose(tmp_path: Path) -> None:
    config = make_config(tmp_path, sweep_table("DEPTH = { values = [8] }"))

    assert build_strategy("sweep", config).propose(context(config)) == Exhausted(
        "the sweep has tried every point of its grid"
    )


def test_finished_trials_are_skipped_and_killed_ones_retried(tmp_path: Path) -> None:
    config = make_config(tmp_path, GRID)
    strategy = build_strategy("sweep", config)
    first = {"DEPTH": 4, "ACTIVATION": "relu"}

    def next_params(*history: PastTrial) -> Any:
        proposal = strategy.propose(context(config, history))
        assert isinstance(proposal, Proposal)
        return proposal.params

    assert next_params(past(1, first, status="crash")) == {"DEPTH": 4, "ACTIVATION": "gelu"}
    assert next_params(past(1, first, status="killed")) == first
    # The same settings tried by another strategy are not a sweep point done.
    assert next_params(past(1, first, strategy="llm")) == first


@pytest.mark.parametrize(
    ("parameter", "expected"),
    [
        ("{ range = [0.01, 0.04], steps = 4 }", [0.01, 0.02, 0.03]),  # 0.04: the file's
        ("{ range = [1e-4, 1e-1], steps = 4, log = true }", [0.0001, 0.001, 0.01, 0.1]),
        ("{ range = [0.01, 0.1], steps = 3, log = true }", [0.01, 0.03162, 0.1]),
        ("{ range = [1, 3], type = 'int' }", [1.0, 2.0, 3.0]),  # a float constant stays float
    ],
)
def test_float_ranges(tmp_path: Path, parameter: str, expected: list[float]) -> None:
    values = swept(tmp_path, "MATRIX_LR", parameter)

    assert values == expected
    assert all(type(value) is float for value in values)


def test_integral_bounds_give_floats_for_a_float_constant(tmp_path: Path) -> None:
    assert swept(tmp_path, "DROPOUT", "{ range = [0, 1] }") == [0.0, 0.5, 1.0]


@pytest.mark.parametrize(
    ("parameter", "expected"),
    [
        ("{ range = [2, 6] }", [2, 4, 6]),  # default_steps = 3
        ("{ range = [1, 3], steps = 5 }", [1, 2, 3]),  # 1, 1.5, 2, 2.5, 3 rounded, de-duplicated
        ("{ range = [1, 16], steps = 5, log = true }", [1, 2, 4, 16]),  # 8 is the file's
        ("{ range = [1.5, 4.5], steps = 4 }", [2, 3, 4]),  # inside the bounds
    ],
)
def test_int_ranges(tmp_path: Path, parameter: str, expected: list[int]) -> None:
    values = swept(tmp_path, "DEPTH", parameter)

    assert values == expected
    assert all(type(value) is int for value in values)


def test_default_steps_comes_from_the_settings(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, sweep_table("DEPTH = { range = [2, 5] }", settings="default_steps = 4")
    )

    assert [p.params["DEPTH"] for p in propose_all(config)] == [2, 3, 4, 5]


RANDOM = sweep_table(
    "MATRIX_LR = { range = [1e-4, 1e-1], log = true }\n"
    "DEPTH = { range = [2, 6] }\n"
    'ACTIVATION = { values = ["relu", "gelu", "silu"] }',
    settings='mode = "random"\nseed = 7',
)


def test_random_points_are_drawn_from_the_space(tmp_path: Path) -> None:
    config = make_config(tmp_path, RANDOM)
    strategy = build_strategy("sweep", config)
    history: list[PastTrial] = []
    rationales: list[str] = []
    for number in range(1, 41):
        proposal = strategy.propose(context(config, history))
        assert isinstance(proposal, Proposal)
        history.append(past(number, dict(proposal.params)))
        rationales.append(proposal.rationale)

    lrs = [trial.params["MATRIX_LR"] for trial in history]
    depths = [trial.params["DEPTH"] for trial in history]
    assert all(1e-4 <= lr <= 1e-1 and float(f"{lr:.4g}") == lr for lr in lrs)
    assert any(lr < 1e-3 for lr in lrs)  # log-uniform: small values are common
    assert all(type(depth) is int for depth in depths)
    assert set(depths) == {2, 3, 4, 5, 6}
    assert {trial.params["ACTIVATION"] for trial in history} == {"relu", "gelu", "silu"}
    assert rationales[-1] == "sweep random point: draw 1 of at most 200 (seed 7 + 39)"


def test_random_is_reproducible_from_seed_plus_history_length(tmp_path: Path) -> None:
    config = make_config(tmp_path, RANDOM)
    baseline = [past(1, {}, strategy="baseline")]

    def proposal(seed: int, history: Sequence[PastTrial]) -> Any:
        settings = config.strategy.sweep
        assert settings is not None
        strategy = SweepStrategy(settings.model_copy(update={"seed": seed}))
        result = strategy.propose(context(config, history))
        assert isinstance(result, Proposal)
        return result.params

    # A resumed campaign with the same history proposes the same point...
    assert proposal(7, baseline) == proposal(7, baseline)
    # ...because the generator is seeded with seed + trials so far.
    assert proposal(7, baseline) == proposal(8, [])
    points = [proposal(7, baseline * count) for count in range(6)]
    assert len({repr(point) for point in points}) > 1


def test_random_stops_when_every_draw_is_tried_or_a_no_op(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        sweep_table("DEPTH = { values = [4, 8] }", settings='mode = "random"'),
    )

    assert [p.params for p in propose_all(config)] == [{"DEPTH": 4}]


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        (
            "NOPE = { values = [1] }",
            "strategy.sweep: train.py: NOPE is not a module-level constant",
        ),
        (
            'DEPTH = { values = [4, "deep"] }',
            r"strategy.sweep: train.py: DEPTH holds an int \(8\), so 'deep' \(a string\)",
        ),
        (
            "DEPTH = { range = [2, 6], type = 'float' }",
            r"DEPTH holds an int \(8\), so 2.0 \(a float\) does not fit",
        ),
        (
            "ACTIVATION = { range = [1, 2] }",
            r"ACTIVATION holds a string \('relu'\), so 1.0 \(a float\) does not fit",
        ),
        (
            "MATRIX_LR = { values = [true] }",
            r"MATRIX_LR holds a float \(0.04\), so True \(a bool\) does not fit",
        ),
        (
            "DEPTH = { range = [0.2, 0.8], type = 'int' }",
            "strategy.sweep: train.py: DEPTH: the int range holds no integer",
        ),
    ],
)
def test_build_validates_the_sweep_against_the_file(
    tmp_path: Path, parameters: str, message: str
) -> None:
    config = make_config(tmp_path, sweep_table(parameters))

    with pytest.raises(UserError, match=message) as caught:
        build_strategy("sweep", config)
    assert str(caught.value).startswith(f"{tmp_path / 'experiment.toml'}: ")
    assert "\n" not in str(caught.value)


def test_validation_sees_duplicate_assignments(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, sweep_table("DEPTH = { values = [4] }"), train=TRAIN + "DEPTH = 2\n"
    )

    with pytest.raises(UserError, match="DEPTH is assigned more than once at module level"):
        build_strategy("sweep", config)


def test_validation_applies_in_random_mode_too(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        sweep_table("DEPTH = { range = [0.2, 0.8], type = 'int' }", settings='mode = "random"'),
    )

    with pytest.raises(UserError, match="DEPTH: the int range holds no integer"):
        build_strategy("sweep", config)


def test_an_empty_values_list_is_refused_by_the_config(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"strategy.sweep.parameters.DEPTH.values: .*at least 1"):
        make_config(tmp_path, sweep_table("DEPTH = { values = [] }"))


def test_build_strategy_needs_a_sweep_table(tmp_path: Path) -> None:
    config = make_config(tmp_path, "")

    with pytest.raises(UserError, match=r"^strategy 'sweep' needs a \[strategy.sweep\] table"):
        build_strategy("sweep", config)


def test_build_strategy_refuses_unknown_names(tmp_path: Path) -> None:
    config = make_config(tmp_path, GRID)

    with pytest.raises(UserError, match=r"^unknown strategy 'annealing' \(known: sweep, llm\)$"):
        build_strategy("annealing", config)


def test_build_strategy_gives_a_sweep(tmp_path: Path) -> None:
    strategy = build_strategy("sweep", make_config(tmp_path, GRID))

    assert STRATEGIES == ("sweep", "llm")
    assert isinstance(strategy, SweepStrategy)
    assert strategy.name == "sweep"
