"""examples/argocd: the Applications point at real paths and valid values, and the Campaign
health check (Lua, run by a real Lua runtime) maps each phase to Argo CD's health."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from chart import CHART, run_tool

REPO = Path(__file__).resolve().parents[1]
ARGOCD = REPO / "examples" / "argocd"
HEALTH_KEY = "resource.customizations.health.skylab.dev_Campaign"


def _load(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ARGOCD / name).read_text())
    return document


def test_the_chart_application_installs_this_repository_s_chart_with_valid_values() -> None:
    source = _load("skylab.yaml")["spec"]["source"]
    assert (REPO / source["path"] / "Chart.yaml").is_file()
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator(schema).validate(source["helm"]["valuesObject"])


def test_the_campaigns_application_leaves_the_operator_s_fields_alone() -> None:
    spec = _load("campaigns.yaml")["spec"]
    assert spec["syncPolicy"]["automated"]["prune"] is False  # no cascade from a Git delete
    [ignored] = spec["ignoreDifferences"]
    assert (ignored["group"], ignored["kind"]) == ("skylab.dev", "Campaign")


@pytest.fixture(scope="module")
def health_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("argocd") / "health.lua"
    path.write_text(_load("argocd-cm.yaml")["data"][HEALTH_KEY])
    return path


def _campaign(status: dict[str, Any] | None, generation: int = 1) -> dict[str, Any]:
    campaign: dict[str, Any] = {
        "apiVersion": "skylab.dev/v1alpha1",
        "kind": "Campaign",
        "metadata": {"name": "c", "generation": generation},
        "spec": {},
    }
    if status is not None:
        campaign["status"] = status
    return campaign


COUNTS = {"total": 4, "kept": 2}


@pytest.mark.parametrize(
    ("campaign", "health", "message"),
    [
        (_campaign(None), "Progressing", "waiting for the skylab operator"),
        (
            _campaign({"phase": "Running", "counts": COUNTS, "observedGeneration": 1}),
            "Progressing",
            "Running: 4 trials, 2 kept",
        ),
        (
            _campaign({"phase": "Succeeded", "counts": COUNTS, "observedGeneration": 1}),
            "Healthy",
            "Succeeded: 4 trials, 2 kept",
        ),
        (
            _campaign(
                {
                    "phase": "Failed",
                    "observedGeneration": 1,
                    "conditions": [
                        {"type": "Ready", "status": "False", "reason": "R", "message": ""},
                        {
                            "type": "Failed",
                            "status": "True",
                            "reason": "InvalidAPIKey",
                            "message": "invalid key",
                        },
                    ],
                }
            ),
            "Degraded",
            "Failed: 0 trials, 0 kept; invalid key",
        ),
        (_campaign({"phase": "Suspended", "observedGeneration": 1}), "Suspended", "Suspended"),
        (
            _campaign({"phase": "Succeeded", "observedGeneration": 1}, generation=2),
            "Progressing",
            "the operator has not seen the latest spec yet",
        ),
    ],
    ids=["new", "running", "succeeded", "failed", "suspended", "spec-changed"],
)
def test_campaign_health(
    health_script: Path, campaign: dict[str, Any], health: str, message: str
) -> None:
    answer = run_tool("health", str(health_script), stdin=json.dumps(campaign))
    assert answer["status"] == health
    assert answer["message"].startswith(message)
