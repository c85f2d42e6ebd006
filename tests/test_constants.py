"""Reading and rewriting module-level constants without disturbing the rest of a file."""

from __future__ import annotations

import pytest

from skylab.constants import ConstantValue, ModuleConstants, read_constants, rewrite_constants
from skylab.errors import UserError

SOURCE = '''"""A training script."""

import os

# Model size.
DEPTH = 8  # layers
MATRIX_LR = 0.04
WEIGHT_DECAY: float = 0.0  # annotated
ACTIVATION = "relu"
USE_BIAS = False
WARMUP = -100
TOTAL_BATCH_SIZE = 2**19
BUFFER = 8 * 1024
HEAD_DIM = (
    128
)
SCALE = 1 / 4


def train(depth: int = DEPTH) -> None:
    LOCAL = 3  # function scope: not a module constant
    print(depth, LOCAL, os.name)
'''


def test_reads_literal_constants() -> None:
    assert read_constants(SOURCE) == {
        "DEPTH": 8,
        "MATRIX_LR": 0.04,
        "WEIGHT_DECAY": 0.0,
        "ACTIVATION": "relu",
        "USE_BIAS": False,
        "WARMUP": -100,
        "TOTAL_BATCH_SIZE": 524288,
        "BUFFER": 8192,
        "HEAD_DIM": 128,
        "SCALE": 0.25,
    }


@pytest.mark.parametrize(
    "statement",
    [
        "lower_case = 1",
        "LR = BASE * 2",
        "SIZES = (1, 2)",
        "NOTHING = None",
        "DATA = b'x'",
        "A = B = 1",
        "WHAT = 1 / 0",
        "ROOT = (-8) ** 0.5",
        "HUGE = 10 ** 10 ** 10",
        "FLAG = not True",
        "SHIFT = 1 << 20",
        "INF = 1e999",
    ],
)
def test_skips_what_is_not_a_literal_constant(statement: str) -> None:
    assert read_constants(f"BASE = 1.0\n{statement}\n").keys() == {"BASE"}


@pytest.mark.parametrize(
    ("name", "value", "expected_line"),
    [
        ("DEPTH", 12, "DEPTH = 12  # layers"),
        ("MATRIX_LR", 0.02, "MATRIX_LR = 0.02"),
        ("WEIGHT_DECAY", 0.1, "WEIGHT_DECAY: float = 0.1  # annotated"),
        ("ACTIVATION", "gelu", "ACTIVATION = 'gelu'"),
        ("USE_BIAS", True, "USE_BIAS = True"),
        ("WARMUP", -5, "WARMUP = -5"),
        ("TOTAL_BATCH_SIZE", 2**18, "TOTAL_BATCH_SIZE = 262144"),
        ("MATRIX_LR", -0.5, "MATRIX_LR = -0.5"),
    ],
)
def test_rewrite_changes_only_the_value(
    name: str, value: ConstantValue, expected_line: str
) -> None:
    rewritten = rewrite_constants(SOURCE, {name: value})

    changed = [
        (old, new)
        for old, new in zip(SOURCE.splitlines(), rewritten.splitlines(), strict=True)
        if old != new
    ]
    assert len(changed) == 1
    assert changed[0][1] == expected_line
    assert read_constants(rewritten) == {**read_constants(SOURCE), name: value}


def test_rewrite_of_several_constants_keeps_everything_else_byte_for_byte() -> None:
    rewritten = rewrite_constants(SOURCE, {"SCALE": 0.5, "DEPTH": 4, "ACTIVATION": "silu"})

    expected = (
        SOURCE.replace("DEPTH = 8", "DEPTH = 4")
        .replace('ACTIVATION = "relu"', "ACTIVATION = 'silu'")
        .replace("SCALE = 1 / 4", "SCALE = 0.5")
    )
    assert rewritten == expected


def test_multi_line_value_is_replaced_whole() -> None:
    source = "X = 1\nBUFFER = (8 *\n          1024)  # bytes\nY = 2\n"

    rewritten = rewrite_constants(source, {"BUFFER": 4096})

    assert rewritten == "X = 1\nBUFFER = (4096)  # bytes\nY = 2\n"


def test_parenthesised_value_on_its_own_lines() -> None:
    rewritten = rewrite_constants(SOURCE, {"HEAD_DIM": 64})

    assert "HEAD_DIM = (\n    64\n)\n" in rewritten
    assert read_constants(rewritten)["HEAD_DIM"] == 64


def test_offsets_count_bytes_of_non_ascii_text_and_keep_line_endings() -> None:
    source = 'NAME = "héllo"; LR = 0.1  # très bien\r\nDEPTH = 2\r\n'

    rewritten = rewrite_constants(source, {"LR": 0.2, "NAME": "wörld", "DEPTH": 3})

    assert rewritten == "NAME = 'wörld'; LR = 0.2  # très bien\r\nDEPTH = 3\r\n"


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        (0.1 + 0.2, "0.30000000000000004"),  # a different float from 0.3: kept exact
        (0.04, "0.04"),
        (1e-05, "1e-05"),
        (3e-4, "0.0003"),
        (2, "2.0"),  # an int for a float constant keeps the decimal point
        (1e20, "1e+20"),
    ],
)
def test_float_literals_round_trip(value: float, literal: str) -> None:
    rewritten = rewrite_constants("LR = 0.5\n", {"LR": value})

    assert rewritten == f"LR = {literal}\n"
    assert read_constants(rewritten)["LR"] == value
    assert type(read_constants(rewritten)["LR"]) is float


def test_string_with_quotes_round_trips() -> None:
    value = 'it\'s "quoted"\n'

    rewritten = rewrite_constants(SOURCE, {"ACTIVATION": value})

    assert read_constants(rewritten)["ACTIVATION"] == value


def test_unknown_name_is_an_error_naming_it() -> None:
    with pytest.raises(UserError, match=r"^MISSING is not a module-level constant"):
        rewrite_constants(SOURCE, {"MISSING": 1})


@pytest.mark.parametrize("name", ["LOCAL", "BASE", "lower"])
def test_function_locals_and_computed_values_are_not_constants(name: str) -> None:
    source = "lower = 1\nBASE = lower * 2\ndef f():\n    LOCAL = 1\n"

    with pytest.raises(UserError, match=f"^{name} is not a module-level constant"):
        rewrite_constants(source, {name: 2})


@pytest.mark.parametrize(
    "second",
    [
        "DEPTH = 12",
        "DEPTH += 1",
        "if True:\n    DEPTH = 4",
        "for DEPTH in range(3):\n    pass",
        "DEPTH, OTHER = 1, 2",
    ],
)
def test_constant_assigned_twice_is_an_error(second: str) -> None:
    source = f"DEPTH = 8\n{second}\n"

    assert "DEPTH" not in read_constants(source)
    with pytest.raises(UserError, match=r"^DEPTH is assigned more than once at module level"):
        rewrite_constants(source, {"DEPTH": 4})


def test_declaration_without_value_is_not_a_second_assignment() -> None:
    source = "DEPTH: int\nDEPTH = 8\n"

    assert rewrite_constants(source, {"DEPTH": 4}) == "DEPTH: int\nDEPTH = 4\n"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("DEPTH", True, r"DEPTH holds an int \(8\), so True \(a bool\) does not fit"),
        ("DEPTH", 2.5, r"DEPTH holds an int \(8\), so 2.5 \(a float\) does not fit"),
        ("MATRIX_LR", "fast", r"MATRIX_LR holds a float \(0.04\), so 'fast' \(a string\)"),
        ("MATRIX_LR", False, r"MATRIX_LR holds a float .* \(a bool\)"),
        ("USE_BIAS", 1, r"USE_BIAS holds a bool \(False\), so 1 \(an int\)"),
        ("ACTIVATION", 3, r"ACTIVATION holds a string \('relu'\), so 3 \(an int\)"),
        ("MATRIX_LR", float("nan"), r"MATRIX_LR: nan cannot be written as a Python literal"),
    ],
)
def test_incompatible_value_is_an_error(name: str, value: ConstantValue, message: str) -> None:
    with pytest.raises(UserError, match=message):
        rewrite_constants(SOURCE, {name: value})


def test_coerce_gives_the_value_as_the_constant_holds_it() -> None:
    constants = ModuleConstants(SOURCE)

    assert constants.coerce("MATRIX_LR", 1) == 1.0
    assert type(constants.coerce("MATRIX_LR", 1)) is float
    assert type(constants.coerce("DEPTH", 4)) is int


def test_invalid_python_is_a_user_error() -> None:
    with pytest.raises(UserError, match=r"not valid Python \(line 2"):
        read_constants("X = 1\nY = (\n")
