"""The operator running an LLM campaign: the real SDK against the fake Messages API.

The tests play the Job controller and the kubelet (tests/kubelet.py).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
from collections.abc import Iterator
from typing import Any

# Imported at collection: the SDK takes minutes to import on a small machine, which
# must not count against a test's timeout.
import anthropic  # noqa: F401
import pytest
from tests.fake_anthropic import FakeAnthropic, Reply
from tests.scripted_model import Proposals, Turn, done, set_constant

from emulator import KubeEmulator
from kubelet import (  # noqa: F401  # the settings fixture registers under its own name
    CAMPAIGNS,
    JOBS,
    NAMESPACE,
    SLOW,
    TRIALS,
    Outcome,
    condition,
    kubelet,
    mortal,
    phase_is,
    rows,
    running_operator,
    settings_fixture,
    status,
    success,
    sweep_campaign,
)
from operator_harness import (  # noqa: F401  # fixtures register under their own names
    create,
    eventually,
    kmock_options_fixture,
    kube_fixture,
    names,
    operator_rbac_fixture,
    stored,
)
from skylab.controller.settings import OperatorSettings
from skylab.store import Store

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(900)]

KEY = "sk-ant-operator-0123456789"
METRICS = {1: 1.04, 2: 1.0025, 3: 1.01}


@pytest.fixture
def server() -> Iterator[FakeAnthropic]:
    with FakeAnthropic(api_key=KEY) as fake:
        yield fake


def llm_campaign(name: str, server: FakeAnthropic) -> dict[str, Any]:
    campaign = sweep_campaign(name, budget={"maxTrials": 3})
    campaign["spec"]["strategy"] = {
        "type": "llm",
        "llm": {
            "apiKeySecret": {"name": "anthropic", "key": "api-key"},
            "baseUrl": server.url,
            "maxRetries": 1,
        },
    }
    return campaign


async def add_key_secret(kube: KubeEmulator, key: str) -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "anthropic"},
        "data": {"api-key": base64.b64encode(key.encode()).decode()},
    }
    await create(kube, "v1/secrets", secret)


def script(number: int) -> Outcome:
    return success(METRICS[number])


def everything_visible(kube: KubeEmulator, database_url: str) -> str:
    """Every object of the emulator and every row of the database, as text."""
    visible = json.dumps([obj.raw for obj in kube.objects.values()], default=str)
    with Store.connect(database_url) as store, store._transaction() as cursor:
        visible += str(cursor.execute("SELECT * FROM trials").fetchall())
        visible += str(cursor.execute("SELECT * FROM campaigns").fetchall())
    return visible


async def test_an_llm_campaign_runs_to_the_end(
    kube: KubeEmulator, settings: OperatorSettings, database_url: str, server: FakeAnthropic
) -> None:
    server.script = Proposals(
        [set_constant("LR", "0.25"), done("LR 0.1 -> 0.25")],
        [set_constant("LR", "0.2"), done("LR 0.25 -> 0.2")],
    )
    await add_key_secret(kube, KEY)
    async with kubelet(kube, script), running_operator(kube, settings):
        await create(kube, CAMPAIGNS, llm_campaign("claude", server))
        await eventually(lambda: phase_is(kube, "claude", "Succeeded"), timeout=SLOW)

    trials = [f"claude-{n:04d}" for n in (1, 2, 3)]
    assert names(kube, TRIALS, NAMESPACE) == trials
    specs = [stored(kube, TRIALS, NAMESPACE, t)["spec"] for t in trials]  # type: ignore[index]
    assert [s["description"] for s in specs] == ["baseline", "LR 0.1 -> 0.25", "LR 0.25 -> 0.2"]
    assert [s["strategy"] for s in specs] == ["baseline", "llm", "llm"]
    assert specs[2]["parentCommit"] == specs[1]["commit"]
    assert rows(database_url, "claude") == [
        (1, "success", True, 1.04),
        (2, "success", True, 1.0025),
        (3, "success", False, 1.01),
    ]
    with Store.connect(database_url) as store:
        record = store.get_campaign(f"{NAMESPACE}/claude")
        assert record is not None
        usage = [t.usage for t in store.trials(record.id)]
    assert usage[0].total_tokens == 0
    assert all(u.output_tokens > 0 and u.cost_usd > 0 for u in usage[1:])
    assert KEY not in everything_visible(kube, database_url)


async def test_a_refused_key_fails_the_campaign_before_any_trial(
    kube: KubeEmulator, settings: OperatorSettings, database_url: str, server: FakeAnthropic
) -> None:
    await add_key_secret(kube, "sk-ant-revoked")
    async with running_operator(kube, settings):
        await create(kube, CAMPAIGNS, llm_campaign("revoked", server))
        await eventually(lambda: phase_is(kube, "revoked", "Failed"), timeout=SLOW)
    failed = condition(kube, "revoked", "Failed")
    assert failed["reason"] == "InvalidAPIKey"
    assert "invalid or missing Anthropic API key (HTTP 401)" in failed["message"]
    assert names(kube, TRIALS) == [] and names(kube, JOBS) == []
    assert server.messages_requests() == []
    assert "sk-ant-revoked" not in everything_visible(kube, database_url)


async def test_a_proposal_in_flight_when_the_operator_dies_is_redone(
    kube: KubeEmulator, settings: OperatorSettings, database_url: str, server: FakeAnthropic
) -> None:
    await add_key_secret(kube, KEY)
    dying: list[Any] = []

    def die_then(turn: Turn) -> Turn:
        """TURN, answered after the operator has died: its proposal can never be applied."""

        def answer(request: dict[str, Any]) -> Reply:
            dying[0].set()
            return turn(request)

        return answer

    server.script = Proposals(
        [set_constant("LR", "0.25"), die_then(done("LR 0.25, first try"))],
        [set_constant("LR", "0.25"), done("LR 0.1 -> 0.25, redone")],
        [set_constant("LR", "0.2"), done("LR 0.25 -> 0.2")],
    )
    async with kubelet(kube, script):
        async with running_operator(kube, settings) as (operator, thread):
            dying.append(mortal(operator, thread))
            await create(kube, CAMPAIGNS, llm_campaign("redo", server))
            await eventually(dying[0].is_set, timeout=SLOW)
        assert names(kube, TRIALS, NAMESPACE) == ["redo-0001"]
        async with running_operator(kube, settings):
            await eventually(lambda: phase_is(kube, "redo", "Succeeded"), timeout=SLOW)

    trials = [f"redo-{n:04d}" for n in (1, 2, 3)]
    assert names(kube, TRIALS, NAMESPACE) == trials
    assert names(kube, JOBS, NAMESPACE) == trials
    descriptions = [stored(kube, TRIALS, NAMESPACE, t)["spec"]["description"] for t in trials]  # type: ignore[index]
    assert descriptions == ["baseline", "LR 0.1 -> 0.25, redone", "LR 0.25 -> 0.2"]
    assert [row[:3] for row in rows(database_url, "redo")] == [
        (1, "success", True),
        (2, "success", True),
        (3, "success", False),
    ]
    assert status(kube, CAMPAIGNS, "redo")["counts"]["total"] == 3


# Long enough for trial 2's Job to be made, run and decided on a loaded machine.
PROPOSAL_SECONDS = 10.0


def slowly(turn: Turn) -> Turn:
    """TURN, answered after PROPOSAL_SECONDS, as a model that takes its time."""
    return lambda request: dataclasses.replace(turn(request), delay=PROPOSAL_SECONDS)


async def test_the_campaign_goes_on_while_the_model_proposes(
    kube: KubeEmulator, settings: OperatorSettings, database_url: str, server: FakeAnthropic
) -> None:
    """Two trials at a time: while the model takes its time over trial 3, trial 2 gets
    its Job, runs and is decided; trial 3 is then made from the proposal, still due."""
    server.script = Proposals(
        [set_constant("LR", "0.25"), done("LR 0.1 -> 0.25")],
        [slowly(set_constant("LR", "0.2")), done("LR 0.1 -> 0.2")],
    )
    campaign = llm_campaign("patient", server)
    campaign["spec"]["parallelism"] = 2
    await add_key_secret(kube, KEY)
    async with kubelet(kube, script), running_operator(kube, settings):
        await create(kube, CAMPAIGNS, campaign)
        await eventually(
            lambda: status(kube, TRIALS, "patient-0002").get("decision") is not None, timeout=SLOW
        )
        trials_when_decided = names(kube, TRIALS, NAMESPACE)
        await eventually(lambda: phase_is(kube, "patient", "Succeeded"), timeout=SLOW)

    assert trials_when_decided == ["patient-0001", "patient-0002"]  # 3 still being proposed
    trials = [f"patient-{n:04d}" for n in (1, 2, 3)]
    assert names(kube, TRIALS, NAMESPACE) == trials
    assert names(kube, JOBS, NAMESPACE) == trials
    specs = [stored(kube, TRIALS, NAMESPACE, t)["spec"] for t in trials]  # type: ignore[index]
    assert specs[2]["description"] == "LR 0.1 -> 0.2"
    assert specs[2]["parentCommit"] == specs[0]["commit"]  # proposed while 2 ran
    assert len(server.messages_requests()) == 4  # two conversations, none asked twice
    assert rows(database_url, "patient") == [
        (1, "success", True, 1.04),
        (2, "success", True, 1.0025),
        (3, "success", False, 1.01),
    ]


async def test_a_campaign_deleted_while_the_model_proposes_is_gone_at_once(
    kube: KubeEmulator, settings: OperatorSettings, database_url: str, server: FakeAnthropic
) -> None:
    """The deletion does not wait for the model, and its late proposal makes no trial."""
    server.script = Proposals([slowly(set_constant("LR", "0.25")), done("LR 0.1 -> 0.25")])
    await add_key_secret(kube, KEY)
    async with kubelet(kube, script), running_operator(kube, settings):
        await create(kube, CAMPAIGNS, llm_campaign("impatient", server))
        await eventually(lambda: len(server.messages_requests()) == 1, timeout=SLOW)
        asked = time.monotonic()
        path = f"/apis/skylab.dev/v1alpha1/namespaces/{NAMESPACE}/campaigns/impatient"
        async with kube.delete(path) as response:
            assert response.status == 200
        await eventually(
            lambda: stored(kube, CAMPAIGNS, NAMESPACE, "impatient") is None, timeout=SLOW
        )
        gone_after = time.monotonic() - asked
        await asyncio.sleep(PROPOSAL_SECONDS - gone_after + 2)  # the model answers meanwhile

    assert gone_after < PROPOSAL_SECONDS
    assert names(kube, TRIALS) == [] and names(kube, JOBS) == []
    with Store.connect(database_url) as store:
        assert store.get_campaign(f"{NAMESPACE}/impatient") is None
