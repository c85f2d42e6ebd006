"""Running the real kopf operator in-process against KubeEmulator.

Import the fixtures into a test module (or a conftest) under any name; pytest registers them
by their declared names `kmock_options` (the emulator class), `kube` and `kubeconfig`:

    from operator_harness import kmock_options_fixture, kube_fixture  # noqa: F401

Import `operator_rbac_fixture` too where the tests run the operator: it checks its calls
against the chart's RBAC role after each test.

The emulator serves on the test's event loop: from a test, talk to it with `await kube.get()`
and the like, or call the sync kubernetes client through `asyncio.to_thread`, never directly.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import inspect
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import attrs
import kopf
import kubernetes
import pytest
import pytest_asyncio
import yaml
from kmock import RawHandler, ResourceInfo
from kmock import action as k8s_action
from kmock import resource as k8s_resource

from emulator import KubeEmulator
from rbac import chart_rules, operator_calls, ungranted

T = TypeVar("T")
# Where fast_settings() makes kopf store what it has handled: present once kopf is done with
# an object's creation, so a test can wait for it before stopping an operator.
HANDLED = "skylab.dev/last-handled-configuration"
REPO = Path(__file__).resolve().parents[1]
VERBS = {"create", "delete", "get", "list", "patch", "update", "watch"}
BUILTINS = {
    "v1/namespaces": ResourceInfo(
        kind="Namespace", singular="namespace", namespaced=False, shortnames={"ns"}
    ),
    "v1/events": ResourceInfo(kind="Event", singular="event", namespaced=True, shortnames={"ev"}),
    "v1/pods": ResourceInfo(
        kind="Pod",
        singular="pod",
        namespaced=True,
        shortnames={"po"},
        subresources={"status", "log"},
    ),
    "v1/services": ResourceInfo(
        kind="Service",
        singular="service",
        namespaced=True,
        shortnames={"svc"},
        subresources={"status"},
    ),
    "v1/secrets": ResourceInfo(kind="Secret", singular="secret", namespaced=True),
    "batch/v1/jobs": ResourceInfo(
        kind="Job", singular="job", namespaced=True, subresources={"status"}
    ),
}


def declare_resources(kube: KubeEmulator, crds: Iterable[Path] = ()) -> None:
    """Declare the built-in resources the operator touches and the CRDs (default: crds/*.yaml).

    kopf only watches what the discovery shows, and sees the status subresource there too.
    kopf posts its events as v1 events only (events.k8s.io is never used).
    """
    paths = tuple(crds) or tuple(sorted((REPO / "crds").glob("*.yaml")))
    for name, info in {**BUILTINS, **read_crds(paths)}.items():
        kube.resources[name] = attrs.evolve(info, verbs=VERBS)  # a copy: tests may change it


@functools.cache  # parsing the CRDs' schemas takes seconds on a busy machine
def read_crds(paths: tuple[Path, ...]) -> dict[str, ResourceInfo]:
    resources = {}
    for path in paths:
        spec = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)["spec"]
        names = spec["names"]
        for version in spec["versions"]:
            if version.get("served", True):
                resources[f"{spec['group']}/{version['name']}/{names['plural']}"] = ResourceInfo(
                    kind=names["kind"],
                    singular=names.get("singular"),
                    namespaced=spec["scope"] == "Namespaced",
                    shortnames=names.get("shortNames", ()),
                    categories=names.get("categories", ()),
                    subresources=version.get("subresources", {}),
                )
    return resources


def url(
    resource: str, namespace: str | None = None, name: str | None = None, sub: str | None = None
) -> str:
    """The API path: url("batch/v1/jobs", "default", "job-1", "status")."""
    res = k8s_resource(resource)
    path = f"/apis/{res.group}/{res.version}" if res.group else f"/api/{res.version}"
    parts = ["namespaces", namespace] if namespace else []
    parts += [p for p in (res.plural, name, sub) if p]
    return "/".join([path, *parts])


async def create(
    kube: KubeEmulator, resource: str, body: dict[str, Any], namespace: str | None = "default"
) -> dict[str, Any]:
    """Create through the API (watchers see it); returns the stored object."""
    async with kube.post(url(resource, namespace), json=body) as response:
        answer: dict[str, Any] = await response.json()
        assert response.status == 201, answer
        return answer


async def patch_status(
    kube: KubeEmulator, resource: str, namespace: str, name: str, status: dict[str, Any]
) -> dict[str, Any]:
    """Merge-patch .status through the status subresource, as a controller would.

    E.g. a finished Job: patch_status(kube, "batch/v1/jobs", ns, name, {"succeeded": 1}); a
    Pod whose container ended: {"phase": "Failed", "containerStatuses": [{"name": "main",
    "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}. A create drops .status.
    """
    async with kube.patch(
        url(resource, namespace, name, "status"),
        json={"status": status},
        headers={"Content-Type": "application/merge-patch+json"},
    ) as response:
        answer: dict[str, Any] = await response.json()
        assert response.status == 200, answer
        return answer


def stored(
    kube: KubeEmulator, resource: str, namespace: str | None, name: str
) -> dict[str, Any] | None:
    """A copy of the object's current state, None if absent or deleted (no request made)."""
    key = (k8s_resource(resource), namespace, name)
    if key not in kube.objects or kube.objects[key].deleted:
        return None
    return copy.deepcopy(kube.objects[key].raw)


def names(kube: KubeEmulator, resource: str, namespace: str | None = None) -> list[str]:
    """The names of the live objects of a resource (in a namespace), in creation order."""
    res = k8s_resource(resource)
    return [
        name
        for (r, ns, name), obj in kube.objects.items()
        if r == res and namespace in (None, ns) and not obj.deleted
    ]


@pytest.fixture(name="kmock_options")
def kmock_options_fixture(kmock_options: dict[str, Any]) -> dict[str, Any]:
    return {**kmock_options, "cls": KubeEmulator}


@pytest_asyncio.fixture(name="kube")
async def kube_fixture(
    kmock: RawHandler, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> KubeEmulator:
    """The emulator with the resources declared, namespace "default" and the clients aimed."""
    assert isinstance(kmock, KubeEmulator), "import the kmock_options fixture too"
    declare_resources(kmock)
    point_clients_at(str(kmock.url).rstrip("/"), tmp_path / "kubeconfig", monkeypatch)
    await create(kmock, "v1/namespaces", {"metadata": {"name": "default"}}, namespace=None)
    return kmock


@pytest.fixture(name="operator_rbac", autouse=True)
def operator_rbac_fixture(kube: KubeEmulator) -> Iterator[None]:
    """After each test of a module that imports it: the chart's ClusterRole (default values)
    grants every call the operator made, so RBAC would have refused none of them."""
    yield
    missing = ungranted(chart_rules(), operator_calls(kube))
    assert not missing, "the chart's role does not grant these operator calls:\n" + "\n".join(
        missing
    )


@pytest.fixture(name="kubeconfig")
def kubeconfig_fixture(kube: KubeEmulator, tmp_path: Path) -> Path:
    """The kubeconfig file that points at the emulator."""
    return tmp_path / "kubeconfig"


def point_clients_at(server: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Aim kopf's login and the kubernetes client at the server, for this test only."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "emulator", "cluster": {"server": server}}],
        "users": [{"name": "emulator", "user": {"token": "emulator"}}],
        "contexts": [
            {
                "name": "emulator",
                "context": {"cluster": "emulator", "user": "emulator", "namespace": "default"},
            }
        ],
        "current-context": "emulator",
    }
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # else kopf logs in in-cluster
    # The client reads $KUBECONFIG once, at import.
    monkeypatch.setattr(kubernetes.config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    # The client's default configuration is process-wide: set it now, restore it afterwards.
    monkeypatch.setattr(kubernetes.client.Configuration, "_default", None)
    kubernetes.config.load_kube_config(config_file=str(path))  # type: ignore[no-untyped-call]


def new_registry() -> kopf.OperatorRegistry:
    """An empty registry that can log in: a bare OperatorRegistry has no login handler at all
    (only kopf's default registry has), and the operator would exit with a LoginError."""
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(kopf.login_via_client)
    return registry


def fast_settings() -> kopf.OperatorSettings:
    """Settings for tests: no peering, no cluster scanning, short retries, quiet exits."""
    settings = kopf.OperatorSettings()
    settings.peering.standalone = True
    settings.scanning.disabled = True
    settings.process.ultimate_exiting_timeout = None  # else kopf SIGKILLs the process on a crash
    settings.networking.error_backoffs = [0.1, 0.2, 0.5]
    settings.watching.reconnect_backoff = 0.05
    # kopf's default, above queueing.exit_timeout (2s): when stopped before the watch delivers
    # its own last patch, kopf waits out this timeout and then handles the stale state it has,
    # so at 1s a stopping operator re-runs handlers that have just succeeded. Never waited out
    # otherwise: the emulator delivers every write's event.
    settings.persistence.consistency_timeout = 5
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="skylab.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="skylab.dev")
    return settings


def open_watches(kube: KubeEmulator) -> set[k8s_resource]:
    """The resources watched through connections that are still open."""
    return {
        request.resource
        for request in kube
        if request.action == k8s_action.WATCH
        and request.resource is not None
        and request._raw_request is not None
        and request._raw_request.transport is not None
    }


class OperatorThread:
    """A kopf operator in a thread of its own, with its own event loop.

    Not a task on the test's loop: on exit, kopf cancels every task created after it started,
    pytest-asyncio's included. Use it as `async with OperatorThread(registry) as operator:`
    (or start() and `await stop()`); a new OperatorThread on the same emulator is a restart.
    PEERING names the ClusterKopfPeering to take part in, as `skylab operator --peering` does;
    without it the operator runs standalone.
    """

    def __init__(
        self,
        registry: kopf.OperatorRegistry,
        settings: kopf.OperatorSettings | None = None,
        memo: object | None = None,
        peering: str | None = None,
    ) -> None:
        self.registry = registry
        self.settings = settings if settings is not None else fast_settings()
        self.memo = memo
        self.peering = peering
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kopf-operator", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(
                kopf.operator(
                    registry=self.registry,
                    settings=self.settings,
                    memo=self.memo,
                    clusterwide=True,
                    standalone=self.peering is None,
                    peering_name=self.peering,
                    stop_flag=self.stop_flag,
                    ready_flag=self.ready_flag,
                )
            )
        except BaseException as exc:  # re-raised by stop() and wait_for_watches()
            self.error = exc

    def start(self) -> None:
        self._thread.start()

    async def stop(self, timeout: float = 15) -> None:
        self.stop_flag.set()
        await asyncio.to_thread(self._thread.join, timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"the operator did not stop within {timeout}s")
        if self.error is not None:
            raise RuntimeError("the operator failed") from self.error

    async def wait_for_watches(
        self, kube: KubeEmulator, resources: Iterable[str], timeout: float = 30
    ) -> None:
        """Wait until this operator watches each resource ("skylab.dev/v1alpha1/campaigns").

        A watch counts while its connection is open, so a stopped operator's do not.
        """
        wanted = {k8s_resource(name) for name in resources}

        def watching() -> bool:
            if not self._thread.is_alive():
                raise RuntimeError("the operator has exited") from self.error
            missing = ", ".join(str(res) for res in wanted - open_watches(kube))
            assert not missing, f"not watched yet: {missing}"
            return True

        await eventually(watching, timeout=timeout)

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


async def eventually(
    predicate: Callable[[], T | Awaitable[T]], timeout: float = 10, interval: float = 0.05
) -> T:
    """Poll a sync or async predicate until it returns something truthy; return that.

    An AssertionError from the predicate counts as "not yet". It runs on the test's loop, the
    emulator's: never call the sync kubernetes client in it but through asyncio.to_thread.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        failure: AssertionError | None = None
        try:
            result = predicate()
            outcome = await result if inspect.isawaitable(result) else result
        except AssertionError as exc:
            failure, outcome = exc, None
        if outcome:
            return outcome
        if loop.time() >= deadline:
            try:
                what = inspect.getsource(predicate).strip()
            except (OSError, TypeError):
                what = repr(predicate)
            last = f"failed: {failure}" if failure else f"returned {outcome!r}"
            raise AssertionError(f"not true within {timeout}s: {what}; last {last}") from failure
        await asyncio.sleep(interval)
