"""The Kubernetes API calls the operator makes, on plain dicts.

A thin layer over the kubernetes client's REST plumbing rather than its typed API
classes: the operator reads and writes manifests as the API server speaks them
(camelCase dicts), and every call it makes is listed here, which is what the
chart's RBAC role has to grant.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from kubernetes import client, config

from skylab.api.models import GROUP, VERSION
from skylab.controller.cache import ObjectCache
from skylab.executors.kubernetes import CAMPAIGN_LABEL

Manifest = dict[str, Any]
_JSON = "application/json"
_MERGE_PATCH = "application/merge-patch+json"
_LOG_ACCEPT = "text/plain, application/json;q=0.9, */*;q=0.8"
_TIMEOUT_SECONDS = 30.0


class KubeError(Exception):
    """The API server refused a call."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


def load_client() -> client.ApiClient:
    """An API client from the pod's service account, else from the kubeconfig."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()


def _custom(namespace: str, plural: str, name: str = "") -> str:
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


def _core(namespace: str, plural: str, name: str = "") -> str:
    path = f"/api/v1/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


def _batch(namespace: str, plural: str, name: str = "") -> str:
    path = f"/apis/batch/v1/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


def _plural(kind: str) -> str:
    return kind.lower() + "s"


def _path_of(manifest: Manifest) -> str:
    """The collection a manifest is created in."""
    namespace = manifest["metadata"]["namespace"]
    api_version, kind = manifest["apiVersion"], manifest["kind"]
    plural = _plural(kind)
    if api_version == "v1":
        return _core(namespace, plural)
    return f"/apis/{api_version}/namespaces/{namespace}/{plural}"


# The kinds whose latest state the operator keeps (see cache.py): those it watches.
CACHED = ("campaigns", "trials", "jobs")


class KubeApi:
    def __init__(self, api_client: client.ApiClient) -> None:
        self._client = api_client
        self.cache = ObjectCache(group_by=CAMPAIGN_LABEL)

    # Campaigns, Trials and their Jobs: read from the cache, which watch events and
    # writes keep fresh

    def observe(self, plural: str, event_type: str | None, body: Manifest) -> None:
        """A watch event of one of the CACHED kinds."""
        meta = body["metadata"]
        if event_type == "DELETED":
            self.cache.forget(plural, meta["namespace"], meta["name"])
        else:
            self.cache.remember(plural, body)

    def get_campaign(self, namespace: str, name: str) -> Manifest | None:
        return self._get_cached("campaigns", _custom(namespace, "campaigns", name))

    def patch_campaign_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self._patch_status("campaigns", namespace, name, status)

    def list_trials(self, namespace: str, campaign: str, label: str) -> list[Manifest]:
        return self._list(_custom(namespace, "trials"), f"{label}={campaign}")

    def get_trial(self, namespace: str, name: str) -> Manifest | None:
        return self._get_cached("trials", _custom(namespace, "trials", name))

    def known_trials(self, namespace: str, campaign: str) -> list[Manifest]:
        """The campaign's Trials as the watch last showed them (no call is made)."""
        return self.cache.group("trials", namespace, campaign)

    def patch_trial_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self._patch_status("trials", namespace, name, status)

    def _get_cached(self, plural: str, path: str) -> Manifest | None:
        """The object at PATH (.../namespaces/NS/PLURAL/NAME), from the cache if it has it."""
        *_, namespace, _, name = path.split("/")
        body = self.cache.get(plural, namespace, name)
        if body is None:
            body = self._get(path)
            if body is not None:
                self.cache.remember(plural, body)
        return body

    def _patch_status(
        self, plural: str, namespace: str, name: str, status: Mapping[str, Any]
    ) -> None:
        path = _custom(namespace, plural, name) + "/status"
        try:
            stored = self._request(
                "PATCH", path, body={"status": dict(status)}, content_type=_MERGE_PATCH
            )
        except KubeError as exc:
            if exc.status == 404:
                self.cache.forget(plural, namespace, name)
            raise
        self.cache.remember(plural, stored)

    # Trial workloads

    def create(self, manifest: Manifest) -> Manifest:
        """Create MANIFEST; when its name is taken, the object that holds it."""
        try:
            created = self._request("POST", _path_of(manifest), body=manifest)
        except KubeError as exc:
            if exc.status != 409:
                raise
            metadata = manifest["metadata"]
            existing = self._get(f"{_path_of(manifest)}/{metadata['name']}")
            if existing is None:  # deleted between the two calls: the caller retries
                raise KubeError(409, f"{metadata['name']} exists and is being deleted") from None
            created = existing
        plural = _plural(manifest["kind"])
        if plural in CACHED:
            self.cache.remember(plural, created)
        return created

    def get_job(self, namespace: str, name: str) -> Manifest | None:
        return self._get_cached("jobs", _batch(namespace, "jobs", name))

    def delete_job(self, namespace: str, name: str) -> None:
        """Delete a Job and, in the background, its pods; a Job already gone is no error."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        try:
            self._request("DELETE", _batch(namespace, "jobs", name), body=body)
        except KubeError as exc:
            if exc.status != 404:
                raise
        self.cache.forget("jobs", namespace, name)

    def list_pods(self, namespace: str, selector: str) -> list[Manifest]:
        return self._list(_core(namespace, "pods"), selector)

    def pod_log(self, namespace: str, name: str, since_seconds: int | None = None) -> str:
        """The trainer container's log ('' when the pod has none yet)."""
        query = {"container": "trainer"}
        if since_seconds is not None:
            query["sinceSeconds"] = str(since_seconds)
        path = (
            _core(namespace, "pods", name)
            + "/log?"
            + "&".join(f"{key}={quote(value)}" for key, value in query.items())
        )
        try:
            # The log is text, but an error is a Status object: a client that accepts
            # only text/plain gets a 406 in place of any error.
            response = self._call("GET", path, accept=_LOG_ACCEPT)
        except KubeError as exc:
            if exc.status in (400, 404):  # not started yet, or gone
                return ""
            raise
        return response.decode(errors="replace")

    def read_secret_key(self, namespace: str, name: str, key: str) -> bytes | None:
        """One key of a Secret, decoded; None when the Secret or the key is missing."""

        secret = self._get(_core(namespace, "secrets", name))
        if secret is None:
            return None
        value = (secret.get("data") or {}).get(key)
        return None if value is None else base64.b64decode(value)

    # Plumbing

    def _get(self, path: str) -> Manifest | None:
        try:
            return self._request("GET", path)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    def _list(self, path: str, selector: str) -> list[Manifest]:
        listed = self._request("GET", f"{path}?labelSelector={quote(selector)}")
        items: list[Manifest] = listed.get("items") or []
        return items

    def _request(
        self,
        method: str,
        path: str,
        body: Manifest | None = None,
        content_type: str = _JSON,
    ) -> Manifest:
        data = self._call(method, path, body=body, content_type=content_type)
        parsed: Manifest = json.loads(data) if data else {}
        return parsed

    def _call(
        self,
        method: str,
        path: str,
        body: Manifest | None = None,
        content_type: str = _JSON,
        accept: str = _JSON,
    ) -> bytes:
        headers = {"Accept": accept, "Content-Type": content_type}
        method, url, headers, payload, post = self._client.param_serialize(
            method=method,
            resource_path=path,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self._client.call_api(
            method, url, headers, payload, post, _request_timeout=_TIMEOUT_SECONDS
        )
        data: bytes = response.read() or b""  # type: ignore[no-untyped-call]
        if response.status >= 400:
            raise KubeError(response.status, _status_message(data, response.reason))
        return data


def _status_message(data: bytes, fallback: str) -> str:
    try:
        return str(json.loads(data).get("message") or fallback)
    except (ValueError, AttributeError):
        return fallback
