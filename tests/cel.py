"""The CRDs' CEL rules (x-kubernetes-validations) as the API server treats them, for the tests.

The emulator never compiles or runs CEL; a real API server does both, with a type for
`self` built from the schema, in which a field without a type is missing. This module
compiles and evaluates the rules with cel-python, values typed by their schema, and lists
the fields a rule names, so tests can refuse a rule that the server would refuse.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import celpy
import lark
from celpy import celtypes

Schema = dict[str, Any]
VALIDATIONS = "x-kubernetes-validations"
_ENV = celpy.Environment()


@dataclass(frozen=True)
class Rule:
    path: str  # where in the schema, e.g. spec.strategy.sweep.parameters.*.range
    schema: Schema  # the node the rule is declared on: `self`
    rule: str
    message: str


def rules(schema: Schema, path: str = "") -> Iterator[Rule]:
    """Every CEL rule declared in SCHEMA, with the node it applies to."""
    for entry in schema.get(VALIDATIONS, []):
        yield Rule(path, schema, entry["rule"], entry["message"])
    for name, child in (schema.get("properties") or {}).items():
        yield from rules(child, f"{path}.{name}".lstrip("."))
    if isinstance(schema.get("items"), dict):
        yield from rules(schema["items"], f"{path}[*]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from rules(schema["additionalProperties"], f"{path}.*")


def compile_rule(rule: str) -> lark.Tree[Any]:
    tree: lark.Tree[Any] = _ENV.compile(rule)
    return tree


def self_paths(rule: str) -> set[tuple[str, ...]]:
    """The field paths a rule reads from `self` (self.a.b -> ('a', 'b'); self -> ())."""
    paths: set[tuple[str, ...]] = set()
    for node in compile_rule(rule).iter_subtrees():
        path = _dotted(node)
        if path is not None:
            paths.add(path)
    return paths


def _dotted(node: lark.Tree[Any]) -> tuple[str, ...] | None:
    """NODE's chain of field names when it is `self` or `self.x.y...`, else None."""
    if node.data == "ident":
        return () if str(node.children[0]) == "self" else None
    if node.data == "member_dot":
        inner, field = node.children
        base = _dotted(inner)
        return None if base is None else (*base, str(field))
    if node.data in ("member", "primary") and len(node.children) == 1:
        child = node.children[0]
        return _dotted(child) if isinstance(child, lark.Tree) else None
    return None


def has_cel_type(schema: Schema) -> bool:
    """Whether the server's CEL type of SCHEMA keeps it: typed, and so is what it holds."""
    if "type" not in schema:
        return False
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict) and not has_cel_type(schema[key]):
            return False
    return True


def untyped_references(rule: Rule) -> list[str]:
    """The fields RULE names whose schema the server's CEL compiler leaves out."""
    missing = []
    for path in sorted(self_paths(rule.rule)):
        node: Schema | None = rule.schema
        for depth, name in enumerate(path):
            node = (node or {}).get("properties", {}).get(name)
            if node is None or not has_cel_type(node):
                missing.append(".".join(("self", *path[: depth + 1])))
                break
    return missing


def to_cel(value: Any, schema: Schema) -> Any:
    """VALUE as the server hands it to CEL: a number field is a double, an integer an int."""
    kind = schema.get("type")
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        return celtypes.MapType(
            {
                celtypes.StringType(key): to_cel(
                    item, properties.get(key) or (extra if isinstance(extra, dict) else {})
                )
                for key, item in value.items()
            }
        )
    if isinstance(value, list):
        return celtypes.ListType([to_cel(item, schema.get("items") or {}) for item in value])
    if kind == "number":
        return celtypes.DoubleType(value)
    if kind == "integer":
        return celtypes.IntType(value)
    return celpy.json_to_cel(value)


def evaluate(rule: Rule, value: Any) -> bool:
    """RULE on VALUE: True when it holds; False when it fails or cannot be evaluated."""
    program = _ENV.program(compile_rule(rule.rule))
    try:
        result = program.evaluate({"self": to_cel(value, rule.schema)})
    except celpy.CELEvalError:
        return False
    return bool(result) if isinstance(result, celtypes.BoolType) else False


def violations(schema: Schema, value: Any) -> list[str]:
    """The messages of the rules VALUE breaks, walking it along SCHEMA as the server does."""
    own = [Rule("", schema, e["rule"], e["message"]) for e in schema.get(VALIDATIONS, [])]
    broken = [rule.message for rule in own if not evaluate(rule, value)]
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            child = properties.get(key) or (extra if isinstance(extra, dict) else None)
            if child is not None:
                broken += violations(child, item)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            broken += violations(schema["items"], item)
    return broken
