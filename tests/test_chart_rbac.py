"""The chart's RBAC role against what the operator really calls.

Helm installs the chart into the emulator, then the operator runs as the chart's Deployment
runs it (cluster-wide, in the peering the chart creates) through a campaign that takes every
path to the API: a git source with credentials, multi-node trials, progress read from pod
logs, a run pruned (its Job deleted), events, a Service left over from an earlier run, and
the Campaign's deletion. Every call
it made must be granted by the role Helm rendered, and every grant of that role used.
"""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest

from chart import Release, helm_install
from emulator import KubeEmulator
from kubelet import (  # noqa: F401  # the settings fixture registers under its own name
    CAMPAIGNS,
    GOOD,
    GRID,
    HOPELESS,
    NAMESPACE,
    SERVICES,
    SLIGHTLY_DIFFERENT,
    SLOW,
    TRIALS,
    LossCurves,
    Outcome,
    kubelet,
    phase_is,
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
    kubeconfig_fixture,
    stored,
    url,
)
from rbac import chart_rules, operator_calls, ungranted, unused
from skylab.controller.settings import OperatorSettings
from toy_experiment import write_toy_experiment

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(900)]

# The operator's own namespace, apart from the Campaigns': the chart's data-preparation Job
# stays out of the way of the tests' kubelet, which runs every Job in NAMESPACE.
RELEASE_NAMESPACE = "skylab"
PEERINGS = "kopf.dev/v1/clusterkopfpeerings"
PRUNING = """
[decision]
baseline_runs = 2
confirm_runs = 0
prune = true
"""


async def test_the_rules_read_from_the_template_are_the_ones_helm_renders(
    kube: KubeEmulator, kubeconfig: Path
) -> None:
    # The operator tests check their calls against chart_rules(), read without Helm.
    release = await helm_install(kube, kubeconfig, namespace=RELEASE_NAMESPACE)
    assert release.one("ClusterRole")["rules"] == chart_rules()


def peering_name(release: Release) -> str:
    """The peering the chart's Deployment runs the operator in."""
    [container] = release.one("Deployment")["spec"]["template"]["spec"]["containers"]
    [name] = [arg.removeprefix("--peering=") for arg in container["args"] if "--peering=" in arg]
    return name


def git_repository(path: Path) -> Path:
    """A repository whose main branch holds the toy experiment."""
    # Two baseline runs, no confirmations: enough for a second trial to be pruned.
    write_toy_experiment(path, GRID, decision=PRUNING)
    author = ["-c", "user.name=skylab", "-c", "user.email=skylab@example.com"]
    for args in (
        ["init", "-q", "-b", "main"],
        ["add", "."],
        [*author, "commit", "-q", "-m", "toy"],
    ):
        subprocess.run(["git", "-C", str(path), *args], check=True)
    return path


def encoded(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def test_the_operator_uses_every_grant_of_the_chart_role_and_needs_no_other(
    kube: KubeEmulator, kubeconfig: Path, settings: OperatorSettings, tmp_path: Path
) -> None:
    release = await helm_install(kube, kubeconfig, namespace=RELEASE_NAMESPACE)
    rules = release.one("ClusterRole")["rules"]
    peering = peering_name(release)
    assert stored(kube, PEERINGS, None, peering), "Helm created no peering object"
    since = len(list(kube))  # Helm's calls, with the same credentials, come before

    secret = {"username": encoded("skylab"), "password": encoded("hunter2")}
    await create(kube, "v1/secrets", {"metadata": {"name": "git"}, "data": secret})
    # Left by an operator that died between a trial's Service and its Job: this one creates
    # it all the same, is refused (409) and reads the one there.
    await create(kube, SERVICES, {"metadata": {"name": "rbac-0001"}, "spec": {"clusterIP": "None"}})
    campaign = sweep_campaign("rbac", budget={"maxTrials": 2}, trialTemplate={"nodes": 2})
    source = git_repository(tmp_path / "source")
    campaign["spec"]["experiment"] = {
        "git": {"url": str(source), "ref": "main", "credentialsSecret": "git"}
    }

    curves = LossCurves(settings.database_url, "rbac")

    def script(number: int, run: int) -> Outcome | None:
        # The baseline's runs go on until the operator has read their curves from the pods'
        # logs; the second trial's until the operator prunes it (and deletes its Job).
        if number == 2 or not curves.followed(number, run):
            return None
        return success(1.0 - number / 10)

    async with (
        running_operator(kube, settings, peering=peering),
        kubelet(kube, run_script=script) as player,
    ):
        player.logs = curves.logs({1: [GOOD, SLIGHTLY_DIFFERENT], 2: [HOPELESS]})
        await create(kube, CAMPAIGNS, campaign)
        await eventually(lambda: phase_is(kube, "rbac", "Succeeded"), timeout=SLOW)
        assert status(kube, TRIALS, "rbac-0002")["phase"] == "Pruned"
        async with kube.delete(url(CAMPAIGNS, NAMESPACE, "rbac")) as response:
            assert response.status == 200
        await eventually(lambda: stored(kube, CAMPAIGNS, NAMESPACE, "rbac") is None, timeout=SLOW)
    curves.close()

    made = operator_calls(kube, since)
    missing = ungranted(rules, made)
    assert not missing, "the role does not grant:\n" + "\n".join(missing)
    idle = unused(rules, made)
    assert not idle, "the operator never needed:\n" + "\n".join(idle)
