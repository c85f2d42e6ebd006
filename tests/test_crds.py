"""The CRDs: generated from the models, checked in, structural, and refusing bad input."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

import cel
from skylab.api.crds import CAMPAIGN, RESOURCES, TRIAL, definition, render, write_crds
from skylab.api.models import GROUP, CampaignSpec
from skylab.config import LOG_RANGE_POSITIVE, RANGE_ORDER

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("campaign-*.yaml"))


def _schema(resource: Any) -> dict[str, Any]:
    version = definition(resource)["spec"]["versions"][0]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def _errors(resource: Any, manifest: dict[str, Any]) -> list[str]:
    # OpenAPI 3.0 schemas are draft 4 JSON Schema (boolean exclusiveMinimum) plus
    # extensions, which draft 4 validators ignore.
    validator = jsonschema.Draft4Validator(_schema(resource))
    return [error.message for error in validator.iter_errors(manifest)]


@pytest.mark.parametrize("folder", ["crds", "charts/skylab/crds"])
@pytest.mark.parametrize("resource", RESOURCES, ids=lambda r: r.kind)
def test_checked_in_crds_match_the_models(resource: Any, folder: str) -> None:
    path = REPO / folder / resource.filename
    assert path.exists(), f"run `skylab crds` and commit {folder}/"
    assert path.read_text() == render(resource), f"{folder}/ is stale: run `skylab crds`"


def test_write_crds_reports_only_changes(tmp_path: Path) -> None:
    assert len(write_crds(tmp_path)) == len(RESOURCES)
    assert write_crds(tmp_path) == []


def _walk(node: Any, path: str = "") -> Any:
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{path}/{index}")


@pytest.mark.parametrize("resource", RESOURCES, ids=lambda r: r.kind)
def test_schemas_are_structural(resource: Any) -> None:
    schema = _schema(resource)
    for path, node in _walk(schema):
        assert not {"$ref", "anyOf", "allOf", "$defs", "const"} & node.keys(), path
        # A oneOf is structural when its branches only validate values: required fields.
        for branch in node.get("oneOf", []) if not path.endswith("/properties") else []:
            assert branch.keys() == {"required"}, f"{path}/oneOf"
        assert node.get("additionalProperties") is not False, path
        if path.endswith(("/properties", "/x-kubernetes-validations")) or "/enum" in path:
            continue
        if any(key in node for key in ("type", "properties", "items")) or path == "":
            assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True, path


def test_crd_shape() -> None:
    crd = definition(TRIAL)
    assert crd["metadata"]["name"] == "trials.skylab.dev"
    names = crd["spec"]["names"]
    assert names["categories"] == ["skylab"] and names["shortNames"]
    (version,) = crd["spec"]["versions"]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Campaign", "Phase", "Runs", "Metric", "Decision", "Description", "Age"]
    campaign_columns = definition(CAMPAIGN)["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [c["name"] for c in campaign_columns] == ["Phase", "Trials", "Best", "Strategy", "Age"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path: Path) -> None:
    manifest = yaml.safe_load(path.read_text())
    assert _errors(CAMPAIGN, manifest) == []
    CampaignSpec.model_validate(manifest["spec"])  # the operator's own reading


def _good() -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load((REPO / "examples/campaign-sweep.yaml").read_text())
    return manifest


def _with(path: str, value: Any) -> dict[str, Any]:
    manifest = copy.deepcopy(_good())
    *parents, last = path.split(".")
    node = manifest
    for key in parents:
        node = node.setdefault(key, {})
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return manifest


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("spec.trialTemplate.image", _DELETE),
        ("spec.strategy.type", "bayes"),
        ("spec.parallelism", 0),
        ("spec.budget.wallClock", "8 hours"),
        ("spec.budget.maxTrials", 0),
        ("spec.trialTemplate.gpusPerNode", -1),
        ("spec.trialTemplate.timeBudgetSeconds", 0),
        ("spec.metric", {"name": "val_bpb", "direction": "down", "pattern": "x"}),
        ("spec.experiment.bundled", "Not_A_Name"),
        ("spec.strategy.sweep.parameters", {}),
        ("spec.suspend", "yes"),
        ("spec.decision.baselineRuns", 0),
        ("spec.decision.confirmRuns", -1),
        ("spec.decision.z", 0),
        ("spec.decision.noise", "on"),
        ("spec.decision.pruneGrace", 1.5),
        ("spec.decision.maxRuns", 0),
        ("spec.decision.bestRuns", 0),
        ("spec.trialTemplate.maxPreemptions", -1),
    ],
)
def test_schema_refuses_bad_campaigns(path: str, value: Any) -> None:
    assert _errors(CAMPAIGN, _with(path, value)), f"{path}={value!r} was accepted"
    if path.startswith(("spec.decision", "spec.trialTemplate.max")):  # the operator too
        with pytest.raises(ValueError, match=re.escape(path.removeprefix("spec."))):
            CampaignSpec.model_validate(_with(path, value)["spec"])


def _rules_at(schema: dict[str, Any], *keys: str) -> list[str]:
    node = schema
    for key in keys:
        node = node["properties"][key]
    return [rule["rule"] for rule in node.get("x-kubernetes-validations", [])]


def test_cross_field_rules_are_cel() -> None:
    spec = _schema(CAMPAIGN)["properties"]["spec"]
    assert "has(self.bundled) != has(self.git)" in _rules_at(spec, "experiment")
    assert "self.type != 'llm' || has(self.llm)" in _rules_at(spec, "strategy")
    assert any("maxWallTimeSeconds" in rule for rule in _rules_at(spec, "trialTemplate"))


def _checked_in_rules() -> list[tuple[str, cel.Rule]]:
    found = []
    for folder in ("crds", "charts/skylab/crds"):
        for path in sorted((REPO / folder).glob(f"{GROUP}_*.yaml")):
            crd = yaml.safe_load(path.read_text())
            for version in crd["spec"]["versions"]:
                schema = version["schema"]["openAPIV3Schema"]
                found += [(f"{folder}/{path.name}", rule) for rule in cel.rules(schema)]
    return found


def test_every_cel_rule_compiles_and_names_only_fields_with_a_type() -> None:
    found = _checked_in_rules()
    assert found, "no CEL rules found"
    problems = []
    for where, rule in found:
        cel.compile_rule(rule.rule)  # a rule that does not parse raises here
        problems += [
            f"{where} {rule.path}: {rule.rule!r} names {field}, which has no type"
            for field in cel.untyped_references(rule)
        ]
    assert problems == []


def test_the_rule_check_finds_a_rule_over_an_untyped_field() -> None:
    # The shape the API server refused: `values` holds untyped items.
    schema = {
        "type": "object",
        "properties": {
            "values": {"type": "array", "items": {"x-kubernetes-preserve-unknown-fields": True}},
            "range": {"type": "array", "items": {"type": "number"}},
        },
    }
    rule = cel.Rule("p", schema, "has(self.values) != has(self.range)", "one of")
    assert cel.untyped_references(rule) == ["self.values"]
    assert cel.untyped_references(cel.Rule("p", schema, "self.range[0] > 0.0", "m")) == []
    assert cel.untyped_references(cel.Rule("p", schema, "has(self.nothere)", "m")) == [
        "self.nothere"
    ]


# One Campaign for each CEL rule (some for more than one), breaking it and nothing else.
CEL_CASES = [
    ("spec.experiment.git", {"url": "https://example.com/x.git"}, "set exactly one of bundled"),
    ("spec.experiment.bundled", _DELETE, "set exactly one of bundled and git"),
    ("spec.strategy.type", "llm", "strategy llm needs strategy.llm"),
    (
        "spec.trialTemplate.maxWallTimeSeconds",
        300,
        "maxWallTimeSeconds must be greater than timeBudgetSeconds",
    ),
    ("spec.strategy.sweep.parameters", {"LR": {"range": [0.5, 0.1]}}, RANGE_ORDER),
    ("spec.strategy.sweep.parameters", {"LR": {"range": [0.2, 0.2]}}, RANGE_ORDER),
    ("spec.strategy.sweep.parameters", {"LR": {"range": [0, 1], "log": True}}, LOG_RANGE_POSITIVE),
]


def test_the_good_campaign_keeps_every_rule() -> None:
    assert cel.violations(_schema(CAMPAIGN), _good()) == []


def test_every_cel_rule_has_a_case() -> None:
    stated = {rule.message for _, rule in _checked_in_rules()}
    cased = {message for _, _, message in CEL_CASES}
    assert {m for m in stated if not any(m.startswith(c) for c in cased)} == set()


@pytest.mark.parametrize(("path", "value", "message"), CEL_CASES)
def test_a_cel_rule_refuses_and_the_operator_refuses_it_too_with_its_message(
    path: str, value: Any, message: str
) -> None:
    manifest = _with(path, value)
    broken = cel.violations(_schema(CAMPAIGN), manifest)
    assert len(broken) == 1 and broken[0].startswith(message)
    # A cluster that skips CEL still refuses it: the operator's own reading.
    with pytest.raises(ValueError, match=re.escape(message)):
        CampaignSpec.model_validate(manifest["spec"])


@pytest.mark.parametrize(
    "parameter",
    [{"values": [1], "range": [1, 2]}, {"steps": 3}],
    ids=["both", "neither"],
)
def test_a_sweep_parameter_needs_exactly_one_of_values_and_range(parameter: Any) -> None:
    manifest = _with("spec.strategy.sweep.parameters", {"LR": parameter})
    assert _errors(CAMPAIGN, manifest), "the schema's oneOf accepted it"
    with pytest.raises(ValueError, match="set exactly one of values and range"):
        CampaignSpec.model_validate(manifest["spec"])


def test_max_failed_trials_has_no_default_so_the_experiment_applies() -> None:
    budget = _schema(CAMPAIGN)["properties"]["spec"]["properties"]["budget"]
    assert "default" not in budget["properties"]["maxFailedTrials"]
