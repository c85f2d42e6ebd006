"""CustomResourceDefinitions generated from the pydantic models (`skylab crds`).

Kubernetes wants a *structural* OpenAPI v3.0 schema: no $ref, no anyOf of types, a
boolean exclusiveMinimum. Pydantic emits JSON Schema 2020-12, so it is rewritten here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from skylab.api.models import (
    GROUP,
    VERSION,
    CampaignSpec,
    CampaignStatus,
    TrialSpec,
    TrialStatus,
)

JsonSchema = dict[str, Any]
ANY_VALUE: JsonSchema = {"x-kubernetes-preserve-unknown-fields": True}


@dataclass(frozen=True)
class Resource:
    kind: str
    plural: str
    short_names: tuple[str, ...]
    description: str
    spec: type[BaseModel]
    status: type[BaseModel]
    columns: tuple[tuple[str, str, str], ...]  # (name, type, JSONPath)

    @property
    def filename(self) -> str:
        return f"{GROUP}_{self.plural}.yaml"


CAMPAIGN = Resource(
    kind="Campaign",
    plural="campaigns",
    short_names=("camp",),
    description="An autonomous research campaign: propose, train, measure, keep or revert.",
    spec=CampaignSpec,
    status=CampaignStatus,
    columns=(
        ("Phase", "string", ".status.phase"),
        ("Trials", "integer", ".status.counts.total"),
        ("Best", "number", ".status.best.value"),
        ("Strategy", "string", ".spec.strategy.type"),
        ("Age", "date", ".metadata.creationTimestamp"),
    ),
)
TRIAL = Resource(
    kind="Trial",
    plural="trials",
    short_names=("tr",),
    description="One step of a Campaign: a commit trained for the time budget and measured.",
    spec=TrialSpec,
    status=TrialStatus,
    columns=(
        ("Campaign", "string", ".spec.campaign"),
        ("Phase", "string", ".status.phase"),
        ("Runs", "integer", ".status.runs"),
        ("Metric", "number", ".status.metric"),
        ("Decision", "string", ".status.decision"),
        ("Description", "string", ".spec.description"),
        ("Age", "date", ".metadata.creationTimestamp"),
    ),
)
RESOURCES = (CAMPAIGN, TRIAL)


def structural(model: type[BaseModel]) -> JsonSchema:
    """The model's validation schema, by alias, as a structural OpenAPI v3.0 schema."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    definitions = schema.pop("$defs", {})
    return _convert(schema, definitions)


def _convert(node: JsonSchema, definitions: dict[str, JsonSchema]) -> JsonSchema:
    if "$ref" in node:
        target = definitions[node["$ref"].rsplit("/", 1)[1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _convert(merged, definitions)
    if "anyOf" in node:
        options = [option for option in node["anyOf"] if option.get("type") != "null"]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if len(options) == 1:
            return _convert({**options[0], **rest}, definitions)
        # A union of scalar types (a sweep value): any value, checked by the operator.
        described = {"description": rest["description"]} if "description" in rest else {}
        return {**described, **ANY_VALUE}
    out: JsonSchema = {}
    for key, value in node.items():
        if key in ("title", "$defs") or (key == "additionalProperties" and value is False):
            continue
        if key == "default" and (value is None or isinstance(value, dict | list)):
            continue  # only scalar defaults are applied by the API server
        if key == "properties":
            out[key] = {name: _convert(child, definitions) for name, child in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            out[key] = _convert(value, definitions)
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "const":
            out["enum"] = [value]
        else:
            out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    return out


def definition(resource: Resource) -> JsonSchema:
    """The CustomResourceDefinition of RESOURCE."""
    root: JsonSchema = {
        "type": "object",
        "description": resource.description,
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": structural(resource.spec),
            "status": structural(resource.status),
        },
        "required": ["spec"],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{resource.plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": resource.kind,
                "listKind": f"{resource.kind}List",
                "plural": resource.plural,
                "singular": resource.kind.lower(),
                "shortNames": list(resource.short_names),
                "categories": ["skylab"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": name, "type": kind, "jsonPath": path}
                        for name, kind, path in resource.columns
                    ],
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def render(resource: Resource) -> str:
    header = "# Generated by `skylab crds` from skylab/api/models.py. Do not edit.\n"
    return header + yaml.safe_dump(definition(resource), sort_keys=False, width=100)


def write_crds(directory: Path) -> list[Path]:
    """Write every CRD into DIRECTORY; return the paths whose content changed."""
    directory.mkdir(parents=True, exist_ok=True)
    changed = []
    for resource in RESOURCES:
        path = directory / resource.filename
        text = render(resource)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            changed.append(path)
    return changed
