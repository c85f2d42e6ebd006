"""A Kubernetes API emulator that a real kopf operator and the kubernetes client can run against.

kmock 0.8's KubernetesEmulator stores objects but lacks what both clients rely on (uids,
resourceVersions, 201 on create, status subresources, conflicts, selectors, garbage collection,
watch resumption). This subclass replaces its state handling and its list/watch/fetch serving.
Importing it also patches two kmock 0.8 functions process-wide: its path parsing (namespaces)
and its request dispatch (quadratic). It reaches into kmock 0.8 internals: pin kmock exactly.
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import datetime
import random
import re
import string
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any, NamedTuple

import aiohttp.web
import attrs
import jsonpatch
import jsonpointer
import kmock
from kmock._internal import apps, dsl, k8s_views, parsing, rendering

Body = dict[str, Any]
Key = k8s_views.ArrayKey  # (resource, namespace or None, name)
PODS = kmock.resource("v1/pods")
NAMESPACES = kmock.resource("v1/namespaces")
# The release /version reports: Helm checks a chart's kubeVersion against it, and the chart's
# objects are validated against this release's OpenAPI schema.
KUBERNETES_VERSION = "1.37.0"
# Kept from the stored object on every write: the server owns these fields.
SERVER_FIELDS = ("uid", "creationTimestamp", "deletionTimestamp", "generation", "name", "namespace")
# Selector terms: labels `a`, `!a`, `a=b`, `a==b`, `a!=b`, `a in (b,c)`, `a notin (b)`; fields
# `metadata.name` and `metadata.namespace` with `=`, `==`, `!=`.
LABEL_TERM = re.compile(
    r"\s*(?P<absent>!)?\s*(?P<key>[\w./-]+)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[\w.-]*)|\s+(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*"
)
FIELD_TERM = re.compile(
    r"\s*metadata\.(?P<key>name|namespace)\s*(?P<op>==|=|!=)\s*(?P<value>[\w.-]*)\s*"
)


KMOCK_PARSE_PATH = parsing.parse_path


def parse_path(path: str) -> parsing.ParsedPath:
    """kmock 0.8 reads /api/v1/namespaces[/{name}[/status]] as a namespace without a resource
    (or crashes): read them as the namespaces resource. Other paths are kmock's to read."""
    if m := re.fullmatch(r"/api/v1/namespaces(?:/([^/]+)(?:/(status|finalize))?)?/?", path):
        return parsing.ParsedPath("", "v1", "namespaces", name=m[1], subresource=m[2])
    return KMOCK_PARSE_PATH(path)


parsing.parse_path = parse_path  # kmock's Request._parse() calls it through the module


KMOCK_CONTAINS = dsl.View.__contains__


def view_contains(view: dsl.View, item: Any) -> bool:
    """kmock 0.8 answers `request in view` by replaying all recorded requests through the view's
    filters, and asks it of every reaction on every request: quadratic, seconds per request
    after a few thousand. For a KubeEmulator, a chain of filters sees the request alone."""
    chain, criteria = view, []
    while isinstance(chain, dsl.Filter | dsl.Priority):
        criteria += [chain.criteria] if isinstance(chain, dsl.Filter) else []
        chain = chain._source
    if isinstance(chain, KubeEmulator) and isinstance(item, kmock.Request):
        recorded = any(request is item for request in reversed(chain._requests))
        return recorded and all(check(item) for check in reversed(criteria))
    return KMOCK_CONTAINS(view, item)


dsl.View.__contains__ = view_contains  # type: ignore[method-assign]


class Change(NamedTuple):
    """One write, as every watcher of its resource sees it (old: the state before a MODIFIED)."""

    rv: int
    key: Key
    type: str
    obj: Body
    old: Body | None


class Fault(NamedTuple):
    """An error answered to a request: before it is served, or AFTER_WRITE, once its write
    is made (the answer lost on the way back, as a proxy or a restarting server loses it)."""

    error: kmock.KubernetesError
    after_write: bool = False


def error(status: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message, details=details)


def _accepts(accept: str, media_type: str) -> bool:
    """Whether an Accept header admits MEDIA_TYPE."""
    family = media_type.split("/")[0] + "/*"
    return any(
        part.split(";")[0].strip() in (media_type, family, "*/*") for part in accept.split(",")
    )


def _container_started(pod: Body, container: str | None) -> bool:
    """Whether the pod's CONTAINER (its first, if None) is running or has run: it has a log."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if container in (None, status.get("name")):
            state = status.get("state") or {}
            return "running" in state or "terminated" in state
    return False


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (kmock's own refuses to replace a dict by a scalar)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge(result.get(key), value)
    return result


def selector(params: Mapping[str, str]) -> Callable[[Body], bool]:
    """A predicate for the request's labelSelector and fieldSelector; 400 if unparseable."""
    terms: list[tuple[bool, str, bool, set[str] | None]] = []  # (field?, key, wanted, values)
    for term in re.split(r",(?![^(]*\))", params.get("labelSelector", "")):
        if term.strip():
            m = LABEL_TERM.fullmatch(term)
            if not m or (m["absent"] and (m["op"] or m["setop"])):
                raise error(400, "BadRequest", f"unable to parse requirement: {term!r}")
            values = {v.strip() for v in m["values"].split(",")} if m["setop"] else None
            wanted = not (m["absent"] or m["op"] == "!=" or m["setop"] == "notin")
            terms.append((False, m["key"], wanted, {m["value"]} if m["op"] else values))
    for term in params.get("fieldSelector", "").split(","):
        if term.strip():
            if not (m := FIELD_TERM.fullmatch(term)):
                raise error(400, "BadRequest", f"field label not supported: {term!r}")
            terms.append((True, m["key"], m["op"] != "!=", {m["value"]}))

    def matches(obj: Body) -> bool:
        meta = obj.get("metadata") or {}
        for is_field, key, wanted, values in terms:
            source = meta if is_field else meta.get("labels") or {}
            if (key in source if values is None else source.get(key) in values) != wanted:
                return False
        return True

    return matches


@attrs.define(kw_only=True)
class KubeEmulator(kmock.KubernetesEmulator):
    """The stateful emulator with the API server's bookkeeping; see the module docstring.

    All state changes run without an await on the server's event loop, so they are atomic and
    reads need no lock; the lock is there for the condition that wakes the watchers up.
    """

    # What GET .../pods/{name}/log answers, by (namespace, pod name); tests fill it.
    pod_logs: dict[tuple[str, str], str] = attrs.field(factory=dict, init=False)
    _rv: int = attrs.field(default=0, init=False)
    _changes: list[Change] = attrs.field(factory=list, init=False)  # never compacted: no 410s
    _results: dict[kmock.Request, Body] = attrs.field(factory=dict, init=False)
    _changed: asyncio.Condition = attrs.field(init=False)
    # The objects by resource, for lists and watches that would otherwise scan them all.
    _by_resource: dict[kmock.resource, dict[Key, kmock.Object]] = attrs.field(
        factory=dict, init=False
    )
    # Asked of every request to a resource: the error to answer instead (see faults.py).
    faults: Callable[[kmock.Request], Fault | None] | None = attrs.field(default=None, init=False)

    @_changed.default
    def _make_changed(self) -> asyncio.Condition:
        return asyncio.Condition(self._lock)  # watchers wake up on writes made under the lock

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback[self._is_put] << self._serve_update  # kmock 0.8 has no action for a PUT

    @staticmethod
    def _is_put(request: kmock.Request) -> bool:
        return request.method == kmock.method.PUT and request.name is not None

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # Writes change the state here, then the usual dispatch answers (users' reactions first,
        # then the _serve_* fallbacks below), as in kmock; discovery requests have no plural.
        if request.resource is not None and request.resource.plural is not None:
            fault = None if self.faults is None else self.faults(request)
            if fault is not None and not fault.after_write:
                return await self._render_error(fault.error)
            if request.resource == PODS and request.subresource == "log":
                return await self._serve_log(request)
            try:
                async with self._lock:
                    if request.action == kmock.action.CREATE:
                        self._results[request] = self._create(request)
                    elif request.action == kmock.action.UPDATE or self._is_put(request):
                        self._results[request] = self._update(request)
                    elif request.action == kmock.action.DELETE and request.name is not None:
                        key = (request.resource, request.namespace, request.name)
                        self._results[request] = self._delete(key)
            except kmock.KubernetesError as exc:  # an API answer, not a failure of the emulator
                return await self._render_error(exc)
            if fault is not None:  # the write is made, and its answer lost on the way back
                self._results.pop(request, None)
                return await self._render_error(fault.error)
        return await apps.RawHandler._handle(self, request)

    def _alive(self, key: Key) -> kmock.Object | None:
        return self.objects[key] if key in self.objects and not self.objects[key].deleted else None

    def _info(self, resource: kmock.resource) -> kmock.ResourceInfo | None:
        # Not .get(): kmock's ResourcesArray creates the entries that it is asked for.
        return self.resources[resource] if resource in self.resources else None  # noqa: SIM401

    def _has_status(self, resource: kmock.resource) -> bool:
        return "status" in getattr(self._info(resource), "subresources", ())

    def _write(self, key: Key, type: str, obj: Body, old: Body | None = None) -> Body:
        """Store a new state (or the removal) under the next resourceVersion; tell watchers."""
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        if type == "DELETED":
            self.objects[key].delete()
        elif key in self.objects:
            self.objects[key].history.append(obj)
        else:
            self.objects[key] = obj
            self._by_resource.setdefault(key[0], {})[key] = self.objects[key]
        self._changes.append(Change(self._rv, key, type, copy.deepcopy(obj), old))
        self._changed.notify_all()
        return obj

    def _create(self, request: kmock.Request) -> Body:
        assert request.resource is not None
        if not isinstance(request.data, dict):
            raise error(400, "BadRequest", "the body must be a JSON object")
        obj = copy.deepcopy(request.data)
        meta = obj.setdefault("metadata", {})
        if (ns := request.namespace) and meta.setdefault("namespace", ns) != ns:
            raise error(400, "BadRequest", "the namespace of the body does not match the URL")
        if not meta.get("name") and meta.get("generateName"):
            while True:
                meta["name"] = meta["generateName"] + "".join(
                    random.choices(string.ascii_lowercase + string.digits, k=5)
                )
                if not self._alive((request.resource, request.namespace, meta["name"])):
                    break
        if not meta.get("name"):
            raise error(422, "Invalid", "name or generateName is required")
        key = (request.resource, request.namespace, meta["name"])
        if self._alive(key):
            raise error(409, "AlreadyExists", f"{key[2]!r} already exists", name=key[2])
        if self._has_status(request.resource):
            obj.pop("status", None)  # as the API server does: status is written via /status only
        info = self._info(request.resource)
        group, version = request.resource.group, request.resource.version
        obj.setdefault("apiVersion", f"{group}/{version}" if group else version)
        if info is not None and info.kind:
            obj.setdefault("kind", info.kind)
        meta.pop("deletionTimestamp", None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now(), generation=1)
        return self._write(key, "ADDED", obj)

    def _update(self, request: kmock.Request) -> Body:
        assert request.resource is not None and request.name is not None
        key = (request.resource, request.namespace, request.name)
        has_status = self._has_status(request.resource)
        if not (stored := self._alive(key)) or request.subresource not in (None, "status"):
            raise error(404, "NotFound", f"{request.resource.plural} {request.name!r} not found")
        if request.subresource == "status" and not has_status:
            raise error(404, "NotFound", f"{request.resource.plural} have no status subresource")
        old: Body = copy.deepcopy(stored.raw)
        old.setdefault("metadata", {})
        data = request.data
        if isinstance(data, list) and request.method == kmock.method.PATCH:
            try:
                new = jsonpatch.apply_patch(old, data)
            except jsonpatch.JsonPatchTestFailed as exc:
                raise error(422, "Invalid", f"the JSON patch test failed: {exc}") from exc
            except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
                raise error(422, "Invalid", f"the JSON patch cannot be applied: {exc}") from exc
        elif isinstance(data, dict):
            sent_rv = (data.get("metadata") or {}).get("resourceVersion")
            if sent_rv is not None and sent_rv != old["metadata"].get("resourceVersion"):
                raise error(409, "Conflict", "the object has been modified", name=request.name)
            put = request.method == kmock.method.PUT
            new = copy.deepcopy(data) if put else merge(copy.deepcopy(old), data)
        else:
            raise error(400, "BadRequest", "the body must be a JSON object or a JSON patch")
        if has_status:  # through /status only .status changes, elsewhere anything but it
            new, source = (copy.deepcopy(old), new) if request.subresource else (new, old)
            new.pop("status", None)
            new.update({"status": source["status"]} if source.get("status") is not None else {})
        meta = new.setdefault("metadata", {})
        for field in (*SERVER_FIELDS, "resourceVersion"):
            meta.pop(field, None)
            if field in old["metadata"]:
                meta[field] = old["metadata"][field]
        if new == old:
            return old  # a no-op write: no new resourceVersion, no watch event, as in Kubernetes
        # generation counts the changes of the desired state: neither metadata nor status.
        skip = {"metadata", "status"} if has_status else {"metadata"}
        if {k: v for k, v in new.items() if k not in skip} != {
            k: v for k, v in old.items() if k not in skip
        }:
            meta["generation"] = meta.get("generation", 0) + 1
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            return self._remove(key, new)
        return self._write(key, "MODIFIED", new, old)

    def _delete(self, key: Key) -> Body:
        if not (stored := self._alive(key)):
            raise error(404, "NotFound", f"{key[0].plural} {key[2]!r} not found")
        obj: Body = copy.deepcopy(stored.raw)
        meta = obj.setdefault("metadata", {})
        if not meta.get("finalizers"):
            return self._remove(key, obj)
        if meta.get("deletionTimestamp"):
            return obj  # already being deleted: waiting for its finalizers
        old = copy.deepcopy(obj)
        meta.update(deletionTimestamp=now(), deletionGracePeriodSeconds=0)
        return self._write(key, "MODIFIED", obj, old)

    def _remove(self, key: Key, obj: Body) -> Body:
        """Remove the object, then collect its dependents (background propagation)."""
        self._write(key, "DELETED", obj)
        uid = obj["metadata"].get("uid")
        live = {o.get("metadata", {}).get("uid") for o in self.objects.values() if not o.deleted}
        for dep_key, dep in list(self.objects.items()):
            refs = [] if dep.deleted else dep.get("metadata", {}).get("ownerReferences") or []
            owned = uid is not None and any(ref.get("uid") == uid for ref in refs)
            # As Kubernetes' collector does: an object with another live owner stays.
            orphaned = owned and not any(ref.get("uid") in live for ref in refs)
            # A namespace takes its objects with it.
            emptied = key[0] == NAMESPACES and dep_key[1] == key[2] and not dep.deleted
            if orphaned or emptied:
                self._delete(dep_key)
        return obj

    async def _serve_server_version(self, request: kmock.Request) -> kmock.Payload:
        major, minor, _ = KUBERNETES_VERSION.split(".")
        version = await super()._serve_server_version(request)
        return {**version, "major": major, "minor": minor, "gitVersion": f"v{KUBERNETES_VERSION}"}

    async def _serve_version(self, request: kmock.Request) -> kmock.Payload:
        # kmock names the core group "/v1"; Go clients (Helm's) refuse that and see no kinds.
        listed = await super()._serve_version(request)
        if isinstance(listed, dict) and listed.get("groupVersion") == "/v1":
            listed["groupVersion"] = "v1"
        return listed

    async def _serve_create(self, request: kmock.Request) -> kmock.Payload:
        return rendering.Response(status=201, payload=self._results.pop(request))

    async def _serve_update(self, request: kmock.Request) -> kmock.Payload:
        return self._results.pop(request)

    _serve_delete = _serve_update

    async def _serve_fetch(self, request: kmock.Request) -> kmock.Payload:
        assert request.resource is not None and request.name is not None
        if stored := self._alive((request.resource, request.namespace, request.name)):
            return stored.raw
        raise error(404, "NotFound", f"{request.resource.plural} {request.name!r} not found")

    async def _serve_log(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        """A pod's log as the API server serves it: text on success; an error is a Status,
        which a client that accepts only text/plain gets as 406 instead; a container that
        has not started yet is a 400."""
        assert request.namespace is not None and request.name is not None
        problem = None
        pod = self._alive((PODS, request.namespace, request.name))
        if pod is None:
            problem = error(404, "NotFound", f"pods {request.name!r} not found")
        elif not _container_started(pod.raw, request.params.get("container")):
            problem = error(
                400,
                "BadRequest",
                f"container in pod {request.name!r} is waiting to start: ContainerCreating",
            )
        if problem is not None:
            if not _accepts(request.headers.get("Accept", "*/*"), "application/json"):
                return aiohttp.web.Response(
                    status=406,
                    text="only the following media types are accepted: application/json, "
                    "application/yaml, application/vnd.kubernetes.protobuf",
                )
            return await self._render_error(problem)
        text = self.pod_logs.get((request.namespace, request.name), "")
        if tail := request.params.get("tailLines"):
            text = "".join(text.splitlines(keepends=True)[-int(tail) :])
        return aiohttp.web.Response(text=text, content_type="text/plain")

    @staticmethod
    def _visible(request: kmock.Request, key: Key) -> bool:
        resource, namespace, name = key
        same_name = request.name in (None, name)
        return resource == request.resource and request.namespace in (None, namespace) and same_name

    def _stored(self, resource: kmock.resource) -> Iterator[tuple[Key, kmock.Object]]:
        """The objects stored under RESOURCE (and a few of others: callers filter)."""
        if sum(map(len, self._by_resource.values())) != len(self.objects):
            # Objects assigned to `objects` directly, not through _write: index them all.
            self._by_resource = {}
            for key, obj in self.objects.items():
                self._by_resource.setdefault(key[0], {})[key] = obj
        for stored, objects in list(self._by_resource.items()):
            if stored == resource:
                yield from list(objects.items())

    async def _serve_list(self, request: kmock.Request) -> kmock.Payload:
        assert request.resource is not None
        if request.resource not in self._get_resources():
            raise error(404, "NotFound", f"the server could not find {request.resource}")
        matches = selector(request.params)
        items = [
            copy.deepcopy(obj.raw)
            for key, obj in self._stored(request.resource)
            if not obj.deleted and self._visible(request, key) and matches(obj.raw)
        ]
        info = self._info(request.resource)
        kind = f"{info.kind}List" if info is not None and info.kind else "List"
        return {"kind": kind, "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[kmock.Payload]:
        matches = selector(request.params)  # raised before streaming, it answers 400
        since = request.params.get("resourceVersion", "0")
        timeout = request.params.get("timeoutSeconds")
        deadline = asyncio.get_running_loop().time() + float(timeout) if timeout else None
        yield b""  # send the headers now: watching starts even if nothing ever happens
        # The snapshot and the position in the change log are taken at once: nothing is lost.
        if since.isdigit() and int(since):  # resume after that version, as kopf does after a list
            index = bisect.bisect_right(self._changes, int(since), key=lambda c: c.rv)
            initial = []
        else:
            index = len(self._changes)
            initial = [
                {"type": "ADDED", "object": copy.deepcopy(obj.raw)}
                for key, obj in self._stored(request.resource)
                if not obj.deleted and self._visible(request, key) and matches(obj.raw)
            ]
        for event in initial:
            yield event
        while True:
            async with self._changed:
                try:
                    async with asyncio.timeout_at(deadline):
                        while len(self._changes) <= index:
                            await self._changed.wait()
                except TimeoutError:
                    return  # timeoutSeconds: the server ends the stream
                changes, index = self._changes[index:], len(self._changes)
            for change in changes:
                if not self._visible(request, change.key):
                    continue
                # A selector watch sees objects enter and leave its selection as ADDED/DELETED.
                now_in, was_in = matches(change.obj), change.old is not None and matches(change.old)
                if change.type != "MODIFIED":
                    type = change.type if now_in else None
                else:
                    type = "MODIFIED" if now_in and was_in else "ADDED" if now_in else None
                    type = "DELETED" if was_in and not now_in else type
                if type is not None:
                    yield {"type": type, "object": change.obj}
