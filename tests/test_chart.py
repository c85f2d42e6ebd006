"""charts/skylab: linted and installed by Helm's library, every object schema-valid.

Helm (v4, the Go library helm-sdkpy ships) installs the chart into the Kubernetes emulator
for the default values and for each file of examples/values/; the rendered objects are then
validated against the OpenAPI schema of Kubernetes KUBERNETES_VERSION (kubernetes-validate),
and the custom resources against the CRDs the chart ships.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from chart import CHART, Release, helm_install, helm_refusals, helm_revisions, resource_of, run_tool
from emulator import KUBERNETES_VERSION, KubeEmulator
from operator_harness import kmock_options_fixture, kube_fixture, kubeconfig_fixture, stored
from skylab.api.models import TrialTemplate
from skylab.cli import build_parser as cli_parser
from skylab.controller.settings import OperatorSettings
from skylab.executors.base import TrialLaunch
from skylab.executors.kubernetes import CompileCache, trial_job

REPO = Path(__file__).resolve().parents[1]
VALUES_FILES = sorted((REPO / "examples" / "values").glob("*.yaml"))
# Kinds with no schema in Kubernetes nor in the chart's crds/: the Prometheus Operator's.
SCHEMALESS_KINDS = {"ServiceMonitor"}
_ = (kmock_options_fixture, kube_fixture, kubeconfig_fixture)  # fixtures, by their names


def _values(path: Path | None) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) if path else {}


def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> openAPIV3Schema of every CRD in the chart's crds/."""
    schemas = {}
    for path in sorted((CHART / "crds").glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            spec = crd["spec"]
            for version in spec["versions"]:
                api_version = f"{spec['group']}/{version['name']}"
                schemas[api_version, spec["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    return schemas


def _schema_problems(objects: list[dict[str, Any]]) -> list[list[str]]:
    crds = _crd_schemas()
    custom = [obj for obj in objects if (obj["apiVersion"], obj["kind"]) in crds]
    built_in = [obj for obj in objects if obj not in custom and obj["kind"] not in SCHEMALESS_KINDS]
    problems: list[list[str]] = run_tool("validate", KUBERNETES_VERSION, stdin=json.dumps(built_in))
    for obj in custom:
        # OpenAPI v3.0 schemas are draft 4 JSON Schema plus extensions the validator ignores.
        validator = jsonschema.Draft4Validator(crds[obj["apiVersion"], obj["kind"]])
        problems += [
            [obj["kind"], obj["metadata"]["name"], error.message]
            for error in validator.iter_errors(obj)
        ]
    return problems


def test_helm_lint_finds_nothing_to_warn_about() -> None:
    result = run_tool("lint", str(CHART))
    assert result["Errors"] is None, result
    # Helm's severities: 1 info (e.g. no icon), 2 warning, 3 error.
    assert [m for m in result["Messages"] if m["Severity"] >= 2] == [], result


@pytest.mark.parametrize(
    "values_file", [None, *VALUES_FILES], ids=lambda p: p.stem if p else "defaults"
)
@pytest.mark.asyncio
async def test_every_object_helm_installs_is_schema_valid(
    kube: KubeEmulator, kubeconfig: Path, values_file: Path | None
) -> None:
    release = await helm_install(kube, kubeconfig, _values(values_file))

    assert release.objects
    kinds = {obj["kind"] for obj in release.objects}
    assert {"Deployment", "Service", "ServiceAccount"} <= kinds
    for obj in release.objects:  # Helm created each one in the API server
        namespace = obj["metadata"].get("namespace")
        assert stored(kube, resource_of(obj), namespace, obj["metadata"]["name"]), obj["kind"]
    for crd in ("campaigns.skylab.dev", "trials.skylab.dev", "clusterkopfpeerings.kopf.dev"):
        assert stored(kube, "apiextensions.k8s.io/v1/customresourcedefinitions", None, crd)
    assert await asyncio.to_thread(_schema_problems, release.objects) == []
    # What this values set is for (one install per set: Helm's library takes seconds to load).
    check = SPECIFIC_CHECKS.get(values_file.stem if values_file else "defaults")
    if check is not None:
        check(release)


def _container_env(container: dict[str, Any], release: Release) -> dict[str, str]:
    """The container's environment as the kubelet would resolve it: Secrets and $(VAR)."""
    env: dict[str, str] = {}
    for var in container["env"]:
        if "value" in var:
            value = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), var["value"])
        elif "fieldRef" in var["valueFrom"]:
            assert var["valueFrom"]["fieldRef"] == {"fieldPath": "metadata.name"}
            value = "the-pod-name"
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            secrets = release.find("Secret", ref["name"])
            # A Secret the user creates (an external database's URL) stands for itself.
            value = (
                base64.b64decode(secrets[0]["data"][ref["key"]]).decode()
                if secrets
                else f"postgresql://from-secret/{ref['name']}/{ref['key']}"
            )
        env[var["name"]] = value
    return env


def _matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for term in selector.get("matchExpressions", []):
        assert term["operator"] == "Exists", term  # the only operator the chart uses
        if term["key"] not in labels:
            return False
    return True


def _operator_args(container: dict[str, Any]) -> argparse.Namespace:
    """The container's arguments as `skylab operator` reads them (its parser refuses bad ones)."""
    assert container["args"] == [str(arg) for arg in container["args"]]
    return cli_parser().parse_args(["operator", *container["args"]])


def _defaults_wire_the_operator_its_database_and_the_trainer_pods(release: Release) -> None:
    deployment = release.one("Deployment")
    pod = deployment["spec"]["template"]
    [container] = pod["spec"]["containers"]
    args = _operator_args(container)
    assert (args.peering, args.namespace) == ("skylab", [])
    assert (args.log_level, args.log_format) == ("info", "text")
    assert release.one("ClusterKopfPeering", "skylab")
    # Two replicas, one standing by; the ReadWriteOnce workspace volume keeps them on one
    # node, and each names itself in the peering object by its pod's name.
    assert deployment["spec"]["replicas"] == 2
    [term] = pod["spec"]["affinity"]["podAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert _matches(term["labelSelector"], pod["metadata"]["labels"])
    assert _container_env(container, release)["POD_ID"] == "the-pod-name"
    settings = OperatorSettings.from_env(_container_env(container, release))
    password = base64.b64decode(release.one("Secret", "skylab-postgres")["data"]["password"])
    assert len(password) == 32
    assert settings.database_url == (
        f"postgresql://skylab:{password.decode()}@skylab-postgres.default.svc:5432/skylab"
    )
    assert settings.git_url == "http://skylab.default.svc:8080/git"
    assert settings.compile_cache == CompileCache(host_path="/var/cache/skylab/compile")
    # NOTES.txt walks through a first campaign and reading its results.
    assert "kubectl -n default get trials -w" in release.notes
    assert "skylab history --tag default/gpt-sweep --database-url" in release.notes
    service = release.one("Service", "skylab")
    assert _matches({"matchLabels": service["spec"]["selector"]}, pod["metadata"]["labels"])
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[str(settings.workspace_root)] == "workspaces"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True

    # The trainer NetworkPolicy selects every pod of a trial, and lets it reach the operator.
    example = yaml.safe_load((REPO / "examples" / "campaign-sweep.yaml").read_text())
    template = TrialTemplate.model_validate(example["spec"]["trialTemplate"])
    launch = TrialLaunch(
        trial="gpt-sweep-0001",
        repo=f"{settings.git_url}/default/gpt-sweep.git",
        commit="a" * 40,
        command="python train.py",
        time_budget_seconds=300,
        max_wall_time_seconds=900,
        metric_name="val_bpb",
        metric_pattern=r"^val_bpb:\s+(\S+)",
    )
    job = trial_job(launch, template, namespace="default", campaign="gpt-sweep", owner={})
    trainer_labels = job.job["spec"]["template"]["metadata"]["labels"]
    policy = release.one("NetworkPolicy", "skylab-trainer")
    database = release.one("NetworkPolicy", "skylab-postgres")["spec"]
    postgres_pod = release.one("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert _matches(database["podSelector"], postgres_pod)
    [from_operator] = database["ingress"]
    [client] = from_operator["from"]
    assert _matches(client["podSelector"], pod["metadata"]["labels"])
    assert not _matches(client["podSelector"], trainer_labels)
    assert policy["metadata"]["namespace"] == "default"
    assert _matches(policy["spec"]["podSelector"], trainer_labels)
    assert not _matches(policy["spec"]["podSelector"], pod["metadata"]["labels"])
    egress = {
        rule["ports"][0]["port"]: rule for rule in policy["spec"]["egress"] if "ports" in rule
    }
    [peer] = egress[8080]["to"]
    assert _matches(peer["podSelector"], pod["metadata"]["labels"])
    assert _matches(peer["namespaceSelector"], {"kubernetes.io/metadata.name": "default"})
    assert egress[8080]["ports"] == [{"port": 8080, "protocol": "TCP"}]
    [dns] = egress[53]["to"]  # the cluster DNS only: port 53 elsewhere is a way out
    assert _matches(dns["namespaceSelector"], {"kubernetes.io/metadata.name": "kube-system"})
    assert _matches(dns["podSelector"], {"k8s-app": "kube-dns"})

    # The data Job fills the claim that the example Campaigns' trainer pods mount.
    assert template.data_volume is not None
    claim = release.one("PersistentVolumeClaim", template.data_volume.claim_name)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    prepare = release.one("Job")["spec"]["template"]["spec"]
    [prepare_container] = prepare["containers"]
    assert prepare_container["command"] == [
        *("skylab", "prepare", "gpt-pretrain"),
        *("--data-dir", template.data_volume.mount_path),
    ]
    assert prepare_container["volumeMounts"] == [
        {"name": "data", "mountPath": template.data_volume.mount_path}
    ]
    assert prepare["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def _watched_namespaces_get_roles_peerings_and_policies_of_their_own(release: Release) -> None:
    values = _values(REPO / "examples" / "values" / "namespaced.yaml")
    assert release.find("ClusterRole") == [] and release.find("ClusterKopfPeering") == []
    watched = values["watchNamespaces"]
    for kind in ("Role", "RoleBinding", "KopfPeering"):
        assert sorted(o["metadata"]["namespace"] for o in release.find(kind)) == watched
    trainers = release.find("NetworkPolicy", "skylab-trainer")
    policies = sorted(o["metadata"]["namespace"] for o in trainers)
    assert policies == sorted(["default", *watched])
    for role in release.find("Role"):
        [secrets] = [rule for rule in role["rules"] if rule["resources"] == ["secrets"]]
        assert secrets["resourceNames"] == ["anthropic-api-key"]
        assert {"apiGroups": ["kopf.dev"], "resources": ["kopfpeerings"]}.items() <= next(
            rule for rule in role["rules"] if rule["apiGroups"] == ["kopf.dev"]
        ).items()
    [container] = release.one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert _operator_args(container).namespace == ["research-a", "research-b"]
    assert release.find("Job") == []


def _an_external_database_replaces_the_built_in_one(release: Release) -> None:
    assert release.find("StatefulSet") == [] and release.find("Secret") == []
    [container] = release.one("Deployment")["spec"]["template"]["spec"]["containers"]
    settings = OperatorSettings.from_env(_container_env(container, release))
    assert settings.database_url == "postgresql://from-secret/skylab-database/database-url"


def _a_second_replica_stands_by_and_prometheus_scrapes(release: Release) -> None:
    deployment = release.one("Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"  # the volume is shared
    assert "affinity" not in deployment["spec"]["template"]["spec"]  # it may spread
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert "--peering=skylab" in container["args"]
    monitor, service = release.one("ServiceMonitor"), release.one("Service", "skylab")
    assert _matches(monitor["spec"]["selector"], service["metadata"]["labels"])
    [endpoint] = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == (service["spec"]["ports"][0]["name"], "/metrics")


SPECIFIC_CHECKS: dict[str, Callable[[Release], None]] = {
    "defaults": _defaults_wire_the_operator_its_database_and_the_trainer_pods,
    "external-database": _an_external_database_replaces_the_built_in_one,
    "namespaced": _watched_namespaces_get_roles_peerings_and_policies_of_their_own,
    "standby": _a_second_replica_stands_by_and_prometheus_scrapes,
}


def _compile_cache(values: dict[str, Any]) -> dict[str, Any]:
    return {"trainer": {"compileCache": values}}


@pytest.mark.asyncio
async def test_the_compile_cache_values_reach_the_jobs_of_every_trial(
    kube: KubeEmulator, kubeconfig: Path
) -> None:
    # One Helm process: install with the default (a node directory), then upgrade to a
    # claim, then to no cache.
    modes = [
        ({}, CompileCache(host_path="/var/cache/skylab/compile")),
        (
            _compile_cache({"existingClaim": "compile-cache"}),
            CompileCache(claim_name="compile-cache"),
        ),
        (_compile_cache({"enabled": False, "existingClaim": "compile-cache"}), CompileCache()),
    ]
    releases = await helm_revisions(kube, kubeconfig, [values for values, _ in modes])

    example = yaml.safe_load((REPO / "examples" / "campaign-multigpu.yaml").read_text())
    launch = TrialLaunch(
        trial="gpt-ddp-0001",
        repo="http://skylab.default.svc:8080/git/default/gpt-ddp.git",
        commit="a" * 40,
        command="python train.py",
        time_budget_seconds=300,
        max_wall_time_seconds=900,
        metric_name="val_bpb",
        metric_pattern=r"^val_bpb:\s+(\S+)",
    )
    owner = {"apiVersion": "skylab.dev/v1alpha1", "kind": "Trial", "name": launch.name, "uid": "1"}
    objects = []
    for (values, expected), release in zip(modes, releases, strict=True):
        [container] = release.one("Deployment")["spec"]["template"]["spec"]["containers"]
        settings = OperatorSettings.from_env(_container_env(container, release))
        assert settings.compile_cache == expected, values
        for nodes in (1, 2):
            template = TrialTemplate.model_validate(
                example["spec"]["trialTemplate"] | {"nodes": nodes}
            )
            planned = trial_job(
                launch,
                template,
                namespace="default",
                campaign="gpt-ddp",
                owner=owner,
                compile_cache=settings.compile_cache,
            )
            pod = planned.job["spec"]["template"]["spec"]
            [mount] = [
                m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/cache"
            ]
            assert mount["name"] in [v["name"] for v in pod["volumes"]]
            objects += [planned.job] + ([planned.service] if planned.service else [])
    # What each mode adds to a Job (hostPath, subPath, an init container) is schema-valid.
    problems = await asyncio.to_thread(
        run_tool, "validate", KUBERNETES_VERSION, stdin=json.dumps(objects)
    )
    assert problems == []


# Each refused with an error that names the field (one Helm process for all of them).
BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"replicaCount": "two"}, "replicaCount"),
    ({"database": {"builtin": {"enabled": False}}}, "existingSecret"),
    ({"watchNamespaces": ["Research_A"]}, "watchNamespaces"),
    ({"replicas": 2}, "replicas"),
    ({"replicaCount": 2, "peering": {"enabled": False}}, "peering.enabled"),
    (_compile_cache({"hostPath": "var/cache/skylab"}), "hostPath"),
    (_compile_cache({"hostPath": "/var/cache/../../etc"}), "hostPath"),
    (_compile_cache({"hostPath": None}), "trainer.compileCache.hostPath"),
    (_compile_cache({"existingClaim": "Compile_Cache"}), "existingClaim"),
    (_compile_cache({"claimName": "compile-cache"}), "claimName"),
    ({"operator": {"logLevel": "verbose"}}, "logLevel"),
    ({"operator": {"logFormat": "yaml"}}, "logFormat"),
]


@pytest.mark.asyncio
async def test_bad_values_are_refused_naming_the_field(
    kube: KubeEmulator, kubeconfig: Path
) -> None:
    refusals = await helm_refusals(kube, kubeconfig, [values for values, _ in BAD_VALUES])

    for (values, named), refusal in zip(BAD_VALUES, refusals, strict=True):
        assert refusal is not None and named in refusal, (values, refusal)
    assert stored(kube, "apps/v1/deployments", "default", "skylab") is None


@pytest.mark.asyncio
async def test_an_upgrade_keeps_the_database_password(kube: KubeEmulator, kubeconfig: Path) -> None:
    # The data directory was initialised with the first password: a new one would lock the
    # operator out of its database.
    installed, upgraded = await helm_revisions(kube, kubeconfig, [{}, {"replicaCount": 2}])

    def password(release: Release) -> str:
        return str(release.one("Secret", "skylab-postgres")["data"]["password"])

    assert password(upgraded) == password(installed)
    assert upgraded.one("Deployment")["spec"]["replicas"] == 2
    deployment = stored(kube, "apps/v1/deployments", "default", "skylab")
    assert deployment is not None and deployment["spec"]["replicas"] == 2
