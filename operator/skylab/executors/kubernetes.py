"""Job manifests for a trial: what the operator creates, as plain dicts (no I/O).

One node: a Job of one pod; N GPUs run `torchrun --standalone --nproc_per_node=N`.
Several nodes: an Indexed Job (completions = parallelism = nodes) plus a headless
Service, and torchrun rendezvous through PET_* env the way PyTorchJob sets it: the
master is pod 0's DNS name, the node rank is the pod's completion index. Every trainer
container mounts the operator's compile cache (CompileCache) at /cache.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from typing import Any

from skylab.api.models import TrialTemplate
from skylab.executors.base import TrialLaunch

Manifest = dict[str, Any]
CAMPAIGN_LABEL = "skylab.dev/campaign"
TRIAL_LABEL = "skylab.dev/trial"
RUN_LABEL = "skylab.dev/run"  # which run of the trial a Job and its pods are
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
COMPLETION_INDEX = f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"
CONTAINER = "trainer"
MASTER_PORT = 29500
TRAINER_UID = 1000
DATA_VOLUME = "data"
SHM_VOLUME = "dshm"  # NCCL and dataloader workers need more than the 64 MiB default
CACHE_VOLUME = "compile-cache"
CACHE_PATH = "/cache"
# Where torch.compile keeps what it compiled: the trainer image (Dockerfile.trainer) sets
# the same, the Job sets them too so that a Campaign's own image uses the volume as well.
CACHE_ENV = {
    "TORCHINDUCTOR_CACHE_DIR": f"{CACHE_PATH}/torchinductor",
    "TRITON_CACHE_DIR": f"{CACHE_PATH}/triton",
}
# The trainer's folder in a node's cache directory (see _cache_owner).
CACHE_SUBPATH = f"uid-{TRAINER_UID}"
# The trainer enforces a trial's wall time itself, from its own start. The Job's
# deadline, counted from the Job's start, adds the time a pod may take to get its image
# (a cold node pulling a 10 GB trainer image) and a margin for the trainer's report, so
# that a trial is timed out by what it trained, never by the pull.
REPORT_MARGIN_SECONDS = 30
DEFAULT_PULL_ALLOWANCE_SECONDS = 900.0


@dataclass(frozen=True)
class CompileCache:
    """What trainer pods mount at /cache, where torch.compile keeps its kernels.

    HOST_PATH: a directory on each node (created if missing), shared by the trials that
    run there, so that all but the first start warm. CLAIM_NAME: a PersistentVolumeClaim
    in the trial's namespace (ReadWriteMany to share it across nodes). Neither: an
    emptyDir, so every trial compiles cold. Entries are named by hashes of what was
    compiled, so trials and campaigns can share one cache.
    """

    host_path: str | None = None
    claim_name: str | None = None

    def __post_init__(self) -> None:
        if self.host_path is not None and self.claim_name is not None:
            raise ValueError("a compile cache is a host path or a claim, not both")


@dataclass(frozen=True)
class TrialJob:
    job: Manifest
    service: Manifest | None  # the headless Service of a multi-node trial


def distributed_command(command: str, gpus_per_node: int, nodes: int) -> str:
    """COMMAND under torchrun when the trial spans several GPUs or nodes.

    `python SCRIPT ARGS` becomes `torchrun ... SCRIPT ARGS`; any other command is
    taken to launch its own workers and is left alone.
    """
    words = shlex.split(command)
    if (gpus_per_node <= 1 and nodes == 1) or not words or words[0] not in ("python", "python3"):
        return command
    if nodes == 1:
        launcher = ["torchrun", "--standalone", f"--nproc_per_node={gpus_per_node}"]
    else:  # rendezvous, node count and rank come from the PET_* env
        launcher = ["torchrun"]
    return shlex.join([*launcher, *words[1:]])


def trial_job(
    launch: TrialLaunch,
    template: TrialTemplate,
    *,
    namespace: str,
    campaign: str,
    owner: Manifest,
    experiment_path: str = ".",
    compile_cache: CompileCache = CompileCache(),
    pull_allowance_seconds: float = DEFAULT_PULL_ALLOWANCE_SECONDS,
) -> TrialJob:
    """The Job (and Service) of one trial, owned by OWNER (the Trial's ownerReference)."""
    name = launch.name
    labels = {CAMPAIGN_LABEL: campaign, TRIAL_LABEL: launch.trial, RUN_LABEL: str(launch.run)}
    job_labels = dict(labels)
    if template.queue_name:
        job_labels[KUEUE_QUEUE_LABEL] = template.queue_name
    multi_node = template.nodes > 1

    pod_spec: Manifest = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,  # trial code is untrusted
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            _container(launch, template, name, namespace, experiment_path, compile_cache)
        ],
        "volumes": _volumes(template, compile_cache),
    }
    if compile_cache.host_path is not None:
        pod_spec["initContainers"] = [_cache_owner(template, compile_cache)]
    if multi_node:
        pod_spec["subdomain"] = name  # pods resolve as <job>-<index>.<service>
    if template.node_selector:
        pod_spec["nodeSelector"] = dict(template.node_selector)
    if template.tolerations:
        pod_spec["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in template.tolerations
        ]
    if template.priority_class_name:
        pod_spec["priorityClassName"] = template.priority_class_name

    job_spec: Manifest = {
        "backoffLimit": 0,
        "activeDeadlineSeconds": math.ceil(
            launch.max_wall_time_seconds + REPORT_MARGIN_SECONDS + pull_allowance_seconds
        ),
        "template": {"metadata": {"labels": labels}, "spec": pod_spec},
    }
    if multi_node:
        job_spec |= {
            "completionMode": "Indexed",
            "completions": template.nodes,
            "parallelism": template.nodes,
        }
    if template.queue_name:
        job_spec["suspend"] = True  # Kueue admits it by unsuspending
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(name, namespace, job_labels, owner),
        "spec": job_spec,
    }
    service = _headless_service(name, namespace, labels, owner) if multi_node else None
    return TrialJob(job=job, service=service)


def _metadata(name: str, namespace: str, labels: dict[str, str], owner: Manifest) -> Manifest:
    return {
        "name": name,
        "namespace": namespace,
        "labels": labels,
        "ownerReferences": [owner],
    }


def _container(
    launch: TrialLaunch,
    template: TrialTemplate,
    name: str,
    namespace: str,
    experiment_path: str,
    compile_cache: CompileCache,
) -> Manifest:
    command = distributed_command(launch.command, template.gpus_per_node, template.nodes)
    env: list[Manifest] = [
        _env("SKYLAB_REPO_URL", launch.repo),
        _env("SKYLAB_COMMIT", launch.commit),
        _env("SKYLAB_EXPERIMENT_PATH", experiment_path),
        _env("SKYLAB_COMMAND", command),
        _env("SKYLAB_TIME_BUDGET", f"{launch.time_budget_seconds:g}"),
        _env("SKYLAB_MAX_WALL_TIME", f"{launch.max_wall_time_seconds:g}"),
        _env("SKYLAB_METRIC_NAME", launch.metric_name),
        _env("SKYLAB_METRIC_PATTERN", launch.metric_pattern),
        _env("SKYLAB_TRIAL", name),
    ]
    if template.data_volume is not None:
        env.append(_env("SKYLAB_DATA_DIR", template.data_volume.mount_path))
    if template.nodes > 1:
        env += _rendezvous_env(name, namespace, template)
    given = {*launch.env, *(var.name for var in template.env)}
    env += [_env(key, value) for key, value in CACHE_ENV.items() if key not in given]
    env += [_env(key, value) for key, value in launch.env.items()]
    env += [_env(var.name, var.value) for var in template.env]

    mounts: list[Manifest] = [
        {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
        _cache_mount(compile_cache),
    ]
    if template.data_volume is not None:
        mounts.append(
            {"name": DATA_VOLUME, "mountPath": template.data_volume.mount_path, "readOnly": True}
        )
    container: Manifest = {
        "name": CONTAINER,
        "image": template.image,
        "args": ["run"],
        "env": env,
        "resources": _resources(template, gpus=True),
        "volumeMounts": mounts,
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if template.nodes > 1:
        container["ports"] = [{"name": "rendezvous", "containerPort": MASTER_PORT}]
    return container


def _resources(template: TrialTemplate, *, gpus: bool) -> Manifest:
    requests: dict[str, str] = {}
    if template.resources.cpu:
        requests["cpu"] = template.resources.cpu
    if template.resources.memory:
        requests["memory"] = template.resources.memory
    limits: dict[str, str] = {}
    if gpus and template.gpus_per_node > 0:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(template.gpus_per_node)
    if template.resources.memory:
        limits["memory"] = template.resources.memory
    resources: Manifest = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    return resources


def _cache_mount(compile_cache: CompileCache) -> Manifest:
    mount: Manifest = {"name": CACHE_VOLUME, "mountPath": CACHE_PATH}
    if compile_cache.host_path is not None:
        mount["subPath"] = CACHE_SUBPATH
    return mount


def _cache_owner(template: TrialTemplate, compile_cache: CompileCache) -> Manifest:
    """The init container that gives the node's cache folder to the trainer's uid.

    The kubelet creates a hostPath directory, and a subPath in it, owned by root, and
    fsGroup does not apply to hostPath volumes, so the trainer (uid 1000) could not
    write there. Asking node admins to prepare the directory breaks trials on any node
    where nobody did; this container does it before every trial, idempotently: `chown`
    as root with CAP_CHOWN alone, in the trainer's image (already on the node). It
    changes only the uid-1000 folder inside the configured directory, not recursively:
    neither the directory itself (a mistaken path such as /var hands nothing to uid
    1000) nor what trials wrote. The baseline Pod Security Standard allows root with
    CAP_CHOWN but not hostPath (only privileged does), so this container needs nothing
    the volume did not; claims and emptyDir get no such container and stay within the
    restricted Standard. Its resources are the trainer's CPU and memory: it fits
    wherever the trainer does (ResourceQuota, LimitRange), and the pod asks for no more
    (of init containers only the largest request counts).
    """
    return {
        "name": CACHE_VOLUME,
        "image": template.image,
        "command": ["chown", f"{TRAINER_UID}:{TRAINER_UID}", CACHE_PATH],
        "resources": _resources(template, gpus=False),
        "volumeMounts": [_cache_mount(compile_cache)],
        # chown's error, if any, becomes the Trial's message (reports.trial_ending).
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": ["CHOWN"]},
        },
    }


def _rendezvous_env(name: str, namespace: str, template: TrialTemplate) -> list[Manifest]:
    return [
        _env("PET_NNODES", str(template.nodes)),
        _env("PET_NPROC_PER_NODE", str(max(template.gpus_per_node, 1))),
        _env("PET_MASTER_ADDR", f"{name}-0.{name}.{namespace}.svc"),
        _env("PET_MASTER_PORT", str(MASTER_PORT)),
        {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}},
    ]


def _volumes(template: TrialTemplate, compile_cache: CompileCache) -> list[Manifest]:
    volumes: list[Manifest] = [{"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}}]
    cache: Manifest = {"name": CACHE_VOLUME}
    if compile_cache.host_path is not None:
        cache["hostPath"] = {"path": compile_cache.host_path, "type": "DirectoryOrCreate"}
    elif compile_cache.claim_name is not None:
        cache["persistentVolumeClaim"] = {"claimName": compile_cache.claim_name}
    else:
        cache["emptyDir"] = {}
    volumes.append(cache)
    if template.data_volume is not None:
        claim = {"claimName": template.data_volume.claim_name, "readOnly": True}
        volumes.append({"name": DATA_VOLUME, "persistentVolumeClaim": claim})
    return volumes


def _headless_service(
    name: str, namespace: str, labels: dict[str, str], owner: Manifest
) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name, namespace, labels, owner),
        "spec": {
            "clusterIP": "None",
            "selector": {TRIAL_LABEL: labels[TRIAL_LABEL], RUN_LABEL: labels[RUN_LABEL]},
            "publishNotReadyAddresses": True,  # rank 0 must resolve before it is ready
            "ports": [{"name": "rendezvous", "port": MASTER_PORT}],
        },
    }


def _env(name: str, value: str) -> Manifest:
    return {"name": name, "value": value}
