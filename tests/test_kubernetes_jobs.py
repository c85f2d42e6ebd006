"""Job and Service manifests of a trial: one GPU, N GPUs, several nodes, Kueue."""

from __future__ import annotations

from typing import Any

import pytest

from skylab.api.models import TrialTemplate
from skylab.executors.base import TrialLaunch
from skylab.executors.kubernetes import (
    COMPLETION_INDEX,
    REPORT_MARGIN_SECONDS,
    distributed_command,
    trial_job,
)

COMMIT = "a" * 40
OWNER = {"apiVersion": "skylab.dev/v1alpha1", "kind": "Trial", "name": "c-0001", "uid": "u1"}


def _launch(**changes: Any) -> TrialLaunch:
    fields: dict[str, Any] = dict(
        name="c-0001",
        repo="http://skylab-operator.skylab.svc:8080/git/c.git",
        commit=COMMIT,
        command="python train.py",
        time_budget_seconds=300,
        max_wall_time_seconds=900,
        metric_name="val_bpb",
        metric_pattern=r"^val_bpb:\s+(\S+)",
    )
    return TrialLaunch(**(fields | changes))


def _job(template: dict[str, Any], **launch: Any) -> Any:
    return trial_job(
        _launch(**launch),
        TrialTemplate.model_validate({"image": "trainer:1", **template}),
        namespace="research",
        campaign="c",
        owner=OWNER,
    )


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_single_gpu_job_follows_the_contract() -> None:
    planned = _job({"gpusPerNode": 1})
    job = planned.job
    assert planned.service is None
    assert job["metadata"]["labels"] == {"skylab.dev/campaign": "c", "skylab.dev/trial": "c-0001"}
    assert job["metadata"]["ownerReferences"] == [OWNER]
    spec = job["spec"]
    assert spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] == 900
    assert "completionMode" not in spec and "suspend" not in spec
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["args"] == ["run"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env = _env(container)
    assert env["SKYLAB_REPO_URL"].endswith("/git/c.git") and env["SKYLAB_COMMIT"] == COMMIT
    assert env["SKYLAB_COMMAND"] == "python train.py"
    assert env["SKYLAB_TIME_BUDGET"] == "300"
    assert env["SKYLAB_MAX_WALL_TIME"] == str(900 - REPORT_MARGIN_SECONDS)
    assert not any(name.startswith("PET_") for name in env)


def test_cpu_job_requests_no_gpu_and_mounts_data_read_only() -> None:
    planned = _job(
        {
            "gpusPerNode": 0,
            "resources": {"cpu": "2", "memory": "4Gi"},
            "dataVolume": {"claimName": "skylab-data"},
            "env": [{"name": "EXTRA", "value": "1"}],
        }
    )
    pod = planned.job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"memory": "4Gi"},
    }
    assert {"name": "data", "mountPath": "/data", "readOnly": True} in container["volumeMounts"]
    claim = next(v for v in pod["volumes"] if v["name"] == "data")["persistentVolumeClaim"]
    assert claim == {"claimName": "skylab-data", "readOnly": True}
    env = _env(container)
    assert env["SKYLAB_DATA_DIR"] == "/data" and env["EXTRA"] == "1"


def test_several_gpus_on_one_node_run_torchrun_standalone() -> None:
    (container,) = _job({"gpusPerNode": 8}).job["spec"]["template"]["spec"]["containers"]
    assert _env(container)["SKYLAB_COMMAND"] == "torchrun --standalone --nproc_per_node=8 train.py"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"


def test_two_nodes_get_an_indexed_job_a_headless_service_and_pet_env() -> None:
    planned = _job({"gpusPerNode": 4, "nodes": 2})
    spec = planned.job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "c-0001"
    env = _env(pod["containers"][0])
    assert env["SKYLAB_COMMAND"] == "torchrun train.py"
    assert env["PET_NNODES"] == "2" and env["PET_NPROC_PER_NODE"] == "4"
    assert env["PET_MASTER_ADDR"] == "c-0001-0.c-0001.research.svc"
    assert env["PET_MASTER_PORT"] == "29500"
    assert env["PET_NODE_RANK"] == {"fieldRef": {"fieldPath": COMPLETION_INDEX}}
    service = planned.service
    assert service is not None
    assert service["metadata"]["name"] == "c-0001"
    assert service["metadata"]["ownerReferences"] == [OWNER]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"] == {"skylab.dev/trial": "c-0001"}
    assert service["spec"]["publishNotReadyAddresses"] is True


def test_kueue_queue_labels_the_job_and_creates_it_suspended() -> None:
    job = _job({"queueName": "gpu-queue", "priorityClassName": "research"}).job
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert job["spec"]["suspend"] is True
    assert job["spec"]["template"]["spec"]["priorityClassName"] == "research"
    # The pods carry only skylab's labels.
    assert "kueue.x-k8s.io/queue-name" not in job["spec"]["template"]["metadata"]["labels"]


def test_scheduling_fields_pass_through() -> None:
    pod = _job(
        {
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
        }
    ).job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]


@pytest.mark.parametrize(
    ("command", "gpus", "nodes", "expected"),
    [
        ("python train.py", 1, 1, "python train.py"),
        ("python3 train.py --x 1", 2, 1, "torchrun --standalone --nproc_per_node=2 train.py --x 1"),
        ("python train.py", 8, 3, "torchrun train.py"),
        ("bash run.sh", 8, 1, "bash run.sh"),
    ],
)
def test_distributed_command(command: str, gpus: int, nodes: int, expected: str) -> None:
    assert distributed_command(command, gpus, nodes) == expected
