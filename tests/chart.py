"""The Helm chart, installed by Helm's own library into the Kubernetes emulator.

`helm_install` runs tests/toolbox.py with .venv-tools' Python (helm-sdkpy needs 3.12 or
newer; scripts/tools-venv.sh makes it): Helm discovers the emulator's API, renders the
chart (lookup included), creates the CRDs from crds/ and then every object, as it would in
a cluster. The emulator serves on the test's event loop, so the tool runs as an asyncio
subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kmock import ResourceInfo

from emulator import KubeEmulator
from operator_harness import BUILTINS

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "skylab"
TOOLS_PYTHON = REPO / ".venv-tools" / "bin" / "python"
TOOLBOX = Path(__file__).with_name("toolbox.py")
# The kinds the chart creates, beyond what operator_harness.declare_resources declares.
CHART_KINDS = {
    "v1/serviceaccounts": "ServiceAccount",
    "v1/persistentvolumeclaims": "PersistentVolumeClaim",
    "apps/v1/deployments": "Deployment",
    "apps/v1/statefulsets": "StatefulSet",
    "rbac.authorization.k8s.io/v1/clusterroles": "ClusterRole",
    "rbac.authorization.k8s.io/v1/clusterrolebindings": "ClusterRoleBinding",
    "rbac.authorization.k8s.io/v1/roles": "Role",
    "rbac.authorization.k8s.io/v1/rolebindings": "RoleBinding",
    "networking.k8s.io/v1/networkpolicies": "NetworkPolicy",
    "apiextensions.k8s.io/v1/customresourcedefinitions": "CustomResourceDefinition",
    "kopf.dev/v1/clusterkopfpeerings": "ClusterKopfPeering",
    "kopf.dev/v1/kopfpeerings": "KopfPeering",
    "monitoring.coreos.com/v1/servicemonitors": "ServiceMonitor",
}
# The chart's kinds that are not namespaced.
CLUSTER_SCOPED = {
    "rbac.authorization.k8s.io/v1/clusterroles",
    "rbac.authorization.k8s.io/v1/clusterrolebindings",
    "apiextensions.k8s.io/v1/customresourcedefinitions",
    "kopf.dev/v1/clusterkopfpeerings",
}
VERBS = {"create", "delete", "get", "list", "patch", "update", "watch"}


class ToolFailed(Exception):
    """toolbox.py exited with an error (its output is the message)."""


@dataclass(frozen=True)
class Release:
    objects: list[dict[str, Any]]
    notes: str

    def find(self, kind: str, name: str | None = None) -> list[dict[str, Any]]:
        return [
            obj
            for obj in self.objects
            if obj["kind"] == kind and name in (None, obj["metadata"]["name"])
        ]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = self.find(kind, name)
        assert len(found) == 1, f"{len(found)} {kind} objects named {name}"
        return found[0]


def declare_chart_kinds(kube: KubeEmulator) -> None:
    for name, kind in CHART_KINDS.items():
        kube.resources[name] = ResourceInfo(
            kind=kind, singular=kind.lower(), namespaced=name not in CLUSTER_SCOPED, verbs=VERBS
        )


def _tools_python() -> str:
    if not TOOLS_PYTHON.exists():
        raise ToolFailed(
            f"{TOOLS_PYTHON} is missing: make it with "
            "`bash -c 'source scripts/tools-venv.sh && ensure_tools_venv'` (or run make test)"
        )
    return str(TOOLS_PYTHON)


def run_tool(*args: str, stdin: str | None = None) -> Any:
    """toolbox.py's JSON answer, from a test that does not need the emulator."""
    done = subprocess.run(
        [_tools_python(), str(TOOLBOX), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise ToolFailed(done.stderr.strip().splitlines()[-1] if done.stderr else "no output")
    return json.loads(done.stdout)


async def helm_install(
    kube: KubeEmulator,
    kubeconfig: Path,
    values: dict[str, Any] | None = None,
    *,
    namespace: str = "default",
    release: str = "skylab",
) -> Release:
    """Install the chart into the emulator; the objects as Helm rendered them."""
    [installed] = await helm_revisions(
        kube, kubeconfig, [values or {}], namespace=namespace, release=release
    )
    return installed


async def helm_revisions(
    kube: KubeEmulator,
    kubeconfig: Path,
    values: list[dict[str, Any]],
    *,
    namespace: str = "default",
    release: str = "skylab",
) -> list[Release]:
    """Install with values[0], then `helm upgrade` with each next: a Release per revision."""
    revisions = await _helm(kube, "install", kubeconfig, values, namespace, release)
    return [
        Release(
            objects=[doc for doc in yaml.safe_load_all(revision["manifest"]) if doc],
            notes=revision["notes"],
        )
        for revision in revisions
    ]


async def helm_refusals(
    kube: KubeEmulator, kubeconfig: Path, values: list[dict[str, Any]]
) -> list[str | None]:
    """Helm's error for each values set it refuses to install (None where it installs)."""
    refusals: list[str | None] = await _helm(
        kube, "refusals", kubeconfig, values, "default", "skylab"
    )
    return refusals


async def _helm(
    kube: KubeEmulator,
    command: str,
    kubeconfig: Path,
    values: list[dict[str, Any]],
    namespace: str,
    release: str,
) -> Any:
    declare_chart_kinds(kube)
    process = await asyncio.create_subprocess_exec(
        _tools_python(),
        str(TOOLBOX),
        command,
        str(kubeconfig),
        namespace,
        release,
        str(CHART),
        *(json.dumps(each) for each in values),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # Helm keeps its release record in memory: Go clients write Secrets as protobuf,
        # which the emulator does not speak.
        env={**os.environ, "HELM_DRIVER": "memory"},
    )
    out, err = await asyncio.wait_for(process.communicate(), 300)
    if process.returncode != 0:
        lines = err.decode().strip().splitlines()
        raise ToolFailed(lines[-1] if lines else f"exit status {process.returncode}")
    return json.loads(out)


def resource_of(obj: dict[str, Any]) -> str:
    """The emulator's resource name ("apps/v1/deployments") of a rendered object."""
    kinds = {**{name: info.kind for name, info in BUILTINS.items()}, **CHART_KINDS}
    for name, kind in kinds.items():
        if kind == obj["kind"] and name.rsplit("/", 1)[0] == obj["apiVersion"]:
            return name
    raise KeyError(f"{obj['apiVersion']} {obj['kind']} is not declared in the emulator")
