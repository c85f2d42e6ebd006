"""Module-level UPPER_CASE constants of a Python file: read their values, rewrite them.

A rewrite replaces only the source text of each value expression, so comments, blank
lines and every other byte of the file stay exactly as they were.
"""

from __future__ import annotations

import ast
import functools
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from skylab.errors import UserError

ConstantValue = bool | int | float | str  # the literal types a constant may hold
Number = int | float

_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
# `2**19` is a constant; `10**10**10` would hang the reader, so big exponents are refused.
_MAX_EXPONENT = 1024
_ARITHMETIC: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
    ast.Pow: lambda a, b: a**b,
}
# Function and class bodies (and comprehensions) bind names in their own scopes.
_INNER_SCOPES = (
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.ClassDef,
    ast.Lambda,
    ast.ListComp,
    ast.SetComp,
    ast.DictComp,
    ast.GeneratorExp,
)
_KINDS = {bool: "a bool", int: "an int", float: "a float", str: "a string"}


@dataclass(frozen=True)
class _Constant:
    value: ConstantValue
    node: ast.expr  # the value expression: where its source text lies


class ModuleConstants:
    """The rewritable constants of one source file, parsed once.

    A constant is a top-level `NAME = literal` or `NAME: type = literal` whose name is
    bound nowhere else in module scope: a second binding could undo a rewrite.
    """

    def __init__(self, source: str) -> None:
        try:
            tree = ast.parse(source)
        except SyntaxError as exc:
            raise UserError(f"not valid Python (line {exc.lineno}: {exc.msg})") from exc
        self._source = source
        self._bindings = _module_bindings(tree)
        self._constants: dict[str, _Constant] = {}
        for name, node in _simple_assignments(tree):
            value = _literal(node)
            if value is not None and self._bindings[name] == 1:
                self._constants[name] = _Constant(value, node)

    @property
    def values(self) -> dict[str, ConstantValue]:
        return {name: constant.value for name, constant in self._constants.items()}

    def coerce(self, name: str, value: ConstantValue) -> ConstantValue:
        """VALUE as constant NAME would hold it; UserError when it does not fit NAME's type.

        An int given for a float constant becomes a float, so the constant's type (and
        its decimal point in the source) survives the rewrite.
        """
        current = self._constant(name).value
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{name}: {value!r} cannot be written as a Python literal")
        if type(current) is float and type(value) in (int, float):
            return float(value)
        if type(value) is not type(current):
            raise UserError(
                f"{name} holds {_KINDS[type(current)]} ({current!r}), "
                f"so {value!r} ({_KINDS[type(value)]}) does not fit"
            )
        return value

    def rewrite(self, values: Mapping[str, ConstantValue]) -> str:
        """The source with each named constant's value expression replaced by VALUES'."""
        data = self._source.encode()
        line_starts = _line_starts(data)
        replacements = sorted(
            (*self._span(name, line_starts), repr(self.coerce(name, value)))
            for name, value in values.items()
        )
        # Back to front, so the byte offsets of the spans still to replace stay valid.
        for start, end, text in reversed(replacements):
            data = data[:start] + text.encode() + data[end:]
        return data.decode()

    def _constant(self, name: str) -> _Constant:
        constant = self._constants.get(name)
        if constant is not None:
            return constant
        if self._bindings[name] > 1:
            raise UserError(
                f"{name} is assigned more than once at module level, "
                "so a rewrite of one assignment could be undone by another"
            )
        raise UserError(
            f"{name} is not a module-level constant "
            "(`NAME = value` with an int, float, string or bool literal)"
        )

    def _span(self, name: str, line_starts: list[int]) -> tuple[int, int]:
        node = self._constant(name).node
        # ast columns are UTF-8 byte offsets within the line.
        assert node.end_lineno is not None and node.end_col_offset is not None
        start = line_starts[node.lineno - 1] + node.col_offset
        return start, line_starts[node.end_lineno - 1] + node.end_col_offset


@functools.lru_cache(maxsize=32)
def module_constants(source: str) -> ModuleConstants:
    """SOURCE's constants, parsed once for each text (a sweep reads the same train.py
    at every proposal); UserError when it is not valid Python."""
    return ModuleConstants(source)


def read_constants(source: str) -> dict[str, ConstantValue]:
    """Every rewritable module-level UPPER_CASE constant of SOURCE and its value."""
    return module_constants(source).values


def rewrite_constants(source: str, values: Mapping[str, ConstantValue]) -> str:
    """SOURCE with the named constants set to VALUES; UserError naming a bad constant."""
    return module_constants(source).rewrite(values)


def _simple_assignments(tree: ast.Module) -> Iterator[tuple[str, ast.expr]]:
    """(name, value expression) of each top-level single-target UPPER_CASE assignment."""
    for statement in tree.body:
        target: ast.expr
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target, value = statement.targets[0], statement.value
        elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
            target, value = statement.target, statement.value
        else:
            continue
        if isinstance(target, ast.Name) and _NAME.fullmatch(target.id):
            yield target.id, value


def _module_bindings(tree: ast.Module) -> Counter[str]:
    """How many times each name is bound in module scope, at any nesting of if/for/try."""
    counts: Counter[str] = Counter()
    pending: list[ast.AST] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            counts[node.id] += 1
        # `NAME: type` without a value declares the name but binds nothing.
        elif not isinstance(node, _INNER_SCOPES) and not (
            isinstance(node, ast.AnnAssign) and node.value is None
        ):
            pending.extend(ast.iter_child_nodes(node))
    return counts


def _literal(node: ast.expr) -> ConstantValue | None:
    """The value of a literal (or arithmetic on numeric literals); None for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, bool | str):
        return node.value
    number = _number(node)
    if isinstance(number, float) and not math.isfinite(number):
        return None
    return number


def _number(node: ast.expr) -> Number | None:
    if isinstance(node, ast.Constant):
        value = node.value
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
        operand = _number(node.operand)
        if operand is None or isinstance(node.op, ast.UAdd):
            return operand
        return -operand
    if isinstance(node, ast.BinOp):
        return _arithmetic(node)
    return None


def _arithmetic(node: ast.BinOp) -> Number | None:
    operation = _ARITHMETIC.get(type(node.op))
    left, right = _number(node.left), _number(node.right)
    if operation is None or left is None or right is None:
        return None
    if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
        return None
    try:
        result = operation(left, right)
    except ArithmeticError:  # division by zero, float overflow
        return None
    # A negative number to a fractional power is complex: not a constant we can write.
    return result if isinstance(result, int | float) else None


def _line_starts(data: bytes) -> list[int]:
    """Byte offset at which each line of DATA begins (line endings as Python counts them)."""
    return [0, *(match.end() for match in re.finditer(rb"\r\n|\r|\n", data))]
