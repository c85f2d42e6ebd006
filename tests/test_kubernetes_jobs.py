"""Job and Service manifests of a trial: one GPU, N GPUs, several nodes, Kueue, the
compile cache (and the operator setting that chooses it)."""

from __future__ import annotations

from typing import Any

import pytest

from skylab.api.models import TrialPhase, TrialTemplate
from skylab.controller.reports import JobState, job_state, trial_ending
from skylab.controller.settings import COMPILE_CACHE_VARIABLE, OperatorSettings
from skylab.errors import UserError
from skylab.executors.base import TrialLaunch
from skylab.executors.kubernetes import (
    COMPLETION_INDEX,
    DEFAULT_PULL_ALLOWANCE_SECONDS,
    REPORT_MARGIN_SECONDS,
    TRAINER_UID,
    CompileCache,
    distributed_command,
    trial_job,
)

COMMIT = "a" * 40
OWNER = {"apiVersion": "skylab.dev/v1alpha1", "kind": "Trial", "name": "c-0001", "uid": "u1"}
NO_CACHE = CompileCache()


def _launch(**changes: Any) -> TrialLaunch:
    fields: dict[str, Any] = dict(
        trial="c-0001",
        repo="http://skylab-operator.skylab.svc:8080/git/c.git",
        commit=COMMIT,
        command="python train.py",
        time_budget_seconds=300,
        max_wall_time_seconds=900,
        metric_name="val_bpb",
        metric_pattern=r"^val_bpb:\s+(\S+)",
    )
    return TrialLaunch(**(fields | changes))


def _job(template: dict[str, Any], compile_cache: CompileCache = NO_CACHE, **launch: Any) -> Any:
    return trial_job(
        _launch(**launch),
        TrialTemplate.model_validate({"image": "trainer:1", **template}),
        namespace="research",
        campaign="c",
        owner=OWNER,
        compile_cache=compile_cache,
    )


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_single_gpu_job_follows_the_contract() -> None:
    planned = _job({"gpusPerNode": 1})
    job = planned.job
    assert planned.service is None
    assert job["metadata"]["labels"] == {
        "skylab.dev/campaign": "c",
        "skylab.dev/trial": "c-0001",
        "skylab.dev/run": "1",
    }
    assert job["metadata"]["ownerReferences"] == [OWNER]
    spec = job["spec"]
    # The trainer stops a trial at its wall time (900 s) from its own start; the Job's
    # deadline allows for the image pull and the report on top.
    deadline = 900 + REPORT_MARGIN_SECONDS + DEFAULT_PULL_ALLOWANCE_SECONDS
    assert spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] == deadline
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
    assert env["SKYLAB_MAX_WALL_TIME"] == "900"
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
    assert service["spec"]["selector"] == {"skylab.dev/trial": "c-0001", "skylab.dev/run": "1"}
    assert service["spec"]["publishNotReadyAddresses"] is True


def test_a_confirmation_run_is_a_job_of_its_own_with_its_seed() -> None:
    manifests = _job({"nodes": 2}, run=3, env={"SKYLAB_SEED": "44"})
    job, service = manifests.job, manifests.service
    assert service is not None
    assert job["metadata"]["name"] == service["metadata"]["name"] == "c-0001-r3"
    pod = job["spec"]["template"]
    assert pod["metadata"]["labels"]["skylab.dev/trial"] == "c-0001"  # the trial's, per run
    assert pod["metadata"]["labels"]["skylab.dev/run"] == "3"
    assert service["spec"]["selector"] == {"skylab.dev/trial": "c-0001", "skylab.dev/run": "3"}
    assert _env(pod["spec"]["containers"][0])["SKYLAB_SEED"] == "44"


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


# --- the compile cache ------------------------------------------------------------------

NODE_CACHE = CompileCache(host_path="/var/cache/skylab/compile")
SHARED_CACHE = CompileCache(claim_name="compile-cache")
SINGLE_AND_MULTI_NODE = pytest.mark.parametrize(
    "template",
    [{"gpusPerNode": 1}, {"gpusPerNode": 8, "nodes": 4}],
    ids=["one-pod", "four-nodes"],
)


def _cache(pod: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trainer's mount at /cache and the volume it mounts."""
    (container,) = pod["containers"]
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == "/cache"]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return mount, volume


@SINGLE_AND_MULTI_NODE
def test_a_node_cache_is_a_host_directory_handed_to_the_trainer_uid(
    template: dict[str, Any],
) -> None:
    pod = _job(template, NODE_CACHE).job["spec"]["template"]["spec"]
    mount, volume = _cache(pod)
    assert volume["hostPath"] == {"path": "/var/cache/skylab/compile", "type": "DirectoryOrCreate"}
    # A folder of the directory, never the directory itself, changes owner.
    assert mount["subPath"] == f"uid-{TRAINER_UID}"
    [owner] = pod["initContainers"]
    assert owner["image"] == "trainer:1"
    assert owner["command"] == ["chown", f"{TRAINER_UID}:{TRAINER_UID}", "/cache"]
    assert owner["volumeMounts"] == [mount]
    security = owner["securityContext"]
    assert security["runAsUser"] == 0 and security["runAsNonRoot"] is False
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert security["allowPrivilegeEscalation"] is False
    assert "nvidia.com/gpu" not in str(owner["resources"])
    # The trainer itself stays as it was: non-root, every capability dropped.
    assert pod["securityContext"]["runAsNonRoot"] is True
    (trainer,) = pod["containers"]
    assert trainer["securityContext"]["capabilities"] == {"drop": ["ALL"]}


@SINGLE_AND_MULTI_NODE
def test_a_claim_cache_is_mounted_as_it_is_with_no_root_container(
    template: dict[str, Any],
) -> None:
    pod = _job(template, SHARED_CACHE).job["spec"]["template"]["spec"]
    mount, volume = _cache(pod)
    assert volume["persistentVolumeClaim"] == {"claimName": "compile-cache"}
    assert "subPath" not in mount and "readOnly" not in mount
    assert "initContainers" not in pod


@SINGLE_AND_MULTI_NODE
def test_without_a_cache_each_pod_compiles_into_an_empty_dir(template: dict[str, Any]) -> None:
    pod = _job(template).job["spec"]["template"]["spec"]
    mount, volume = _cache(pod)
    assert volume["emptyDir"] == {} and "subPath" not in mount
    assert "initContainers" not in pod


def test_the_cache_env_points_into_the_volume_unless_the_campaign_sets_it() -> None:
    (container,) = _job({}).job["spec"]["template"]["spec"]["containers"]
    env = _env(container)
    assert env["TORCHINDUCTOR_CACHE_DIR"] == "/cache/torchinductor"
    assert env["TRITON_CACHE_DIR"] == "/cache/triton"
    (container,) = _job(
        {"env": [{"name": "TRITON_CACHE_DIR", "value": "/tmp/triton"}]},
        env={"TORCHINDUCTOR_CACHE_DIR": "/tmp/inductor"},
    ).job["spec"]["template"]["spec"]["containers"]
    names = [e["name"] for e in container["env"]]
    assert names.count("TRITON_CACHE_DIR") == names.count("TORCHINDUCTOR_CACHE_DIR") == 1
    env = _env(container)
    assert env["TRITON_CACHE_DIR"] == "/tmp/triton"
    assert env["TORCHINDUCTOR_CACHE_DIR"] == "/tmp/inductor"


def test_the_cache_init_container_gets_the_trainer_cpu_and_memory() -> None:
    pod = _job({"gpusPerNode": 2, "resources": {"cpu": "8", "memory": "64Gi"}}, NODE_CACHE).job[
        "spec"
    ]["template"]["spec"]
    assert pod["initContainers"][0]["resources"] == {
        "requests": {"cpu": "8", "memory": "64Gi"},
        "limits": {"memory": "64Gi"},
    }


def test_a_trial_whose_cache_could_not_be_prepared_says_so() -> None:
    pod = _job({}, NODE_CACHE).job["spec"]["template"]
    [owner] = pod["spec"]["initContainers"]
    assert owner["terminationMessagePolicy"] == "FallbackToLogsOnError"
    chown = "chown: changing ownership of '/cache': Read-only file system\n"
    pod["metadata"]["name"] = "c-0001-x7k2p"
    pod["status"] = {
        "phase": "Failed",
        "initContainerStatuses": [
            {"name": owner["name"], "state": {"terminated": {"exitCode": 1, "message": chown}}}
        ],
        "containerStatuses": [
            {"name": "trainer", "state": {"waiting": {"reason": "PodInitializing"}}}
        ],
    }
    ending = trial_ending(
        JobState(TrialPhase.FAILED, True, "BackoffLimitExceeded"), [pod], "val_bpb"
    )
    assert ending.reason == "NoReport"
    assert ending.report.message == (
        "the trainer never started: init container compile-cache exited 1: "
        "chown: changing ownership of '/cache': Read-only file system"
    )


@pytest.mark.parametrize(
    ("status", "phase"),
    [
        ({}, TrialPhase.PENDING),
        ({"active": 1, "ready": 0}, TrialPhase.PENDING),  # the pod is pending: image, node
        ({"active": 1, "ready": 1}, TrialPhase.RUNNING),
        ({"active": 2, "ready": 1}, TrialPhase.RUNNING),  # one of two nodes' pods runs
        ({"active": 1}, TrialPhase.RUNNING),  # a server that reports no `ready`
        (
            {"active": 0, "conditions": [{"type": "Complete", "status": "True"}]},
            TrialPhase.SUCCEEDED,
        ),
    ],
)
def test_a_trial_runs_once_its_pod_is_ready_not_while_it_is_pending(
    status: dict[str, Any], phase: TrialPhase
) -> None:
    assert job_state({"spec": {}, "status": status}).phase is phase


def test_a_cache_is_a_host_path_or_a_claim() -> None:
    with pytest.raises(ValueError, match="not both"):
        CompileCache(host_path="/var/cache", claim_name="cache")


REQUIRED = {
    "SKYLAB_DATABASE_URL": "postgresql://skylab@db/skylab",
    "SKYLAB_WORKSPACE_ROOT": "/var/lib/skylab/workspaces",
    "SKYLAB_GIT_URL": "http://skylab.skylab.svc:8080/git",
}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, NO_CACHE),
        ("", NO_CACHE),
        ("hostPath:/var/cache/skylab/compile", NODE_CACHE),
        (" hostPath:/var/cache/skylab/compile/ ", NODE_CACHE),
        ("claim:compile-cache", SHARED_CACHE),
    ],
)
def test_the_compile_cache_setting(value: str | None, expected: CompileCache) -> None:
    env = REQUIRED if value is None else REQUIRED | {COMPILE_CACHE_VARIABLE: value}
    assert OperatorSettings.from_env(env).compile_cache == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("hostPath:var/cache", "hostPath needs an absolute directory"),
        ("hostPath:/", "other than /"),
        ("hostPath:/var/../etc", "without '..'"),
        ("hostPath:", "absolute directory"),
        ("claim:Compile_Cache", "claim needs a PersistentVolumeClaim name"),
        ("claim:", "PersistentVolumeClaim name"),
        ("/var/cache/skylab", "expected hostPath:/DIRECTORY, claim:NAME or nothing"),
        ("emptyDir", "expected hostPath:/DIRECTORY"),
    ],
)
def test_a_bad_compile_cache_setting_is_one_line_naming_the_variable(
    value: str, expected: str
) -> None:
    with pytest.raises(UserError) as raised:
        OperatorSettings.from_env(REQUIRED | {COMPILE_CACHE_VARIABLE: value})
    message = str(raised.value)
    assert message.startswith(f"{COMPILE_CACHE_VARIABLE}: ") and "\n" not in message
    assert expected in message and repr(value) in message


def test_the_pull_allowance_is_the_operators_to_set() -> None:
    job = trial_job(
        _launch(),
        TrialTemplate.model_validate({"image": "trainer:1"}),
        namespace="research",
        campaign="c",
        owner=OWNER,
        pull_allowance_seconds=60,
    ).job
    assert job["spec"]["activeDeadlineSeconds"] == 900 + REPORT_MARGIN_SECONDS + 60
