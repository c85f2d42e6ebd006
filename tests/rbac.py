"""Which RBAC permission a Kubernetes API request needs, and whether a role's rules grant it.

The API server's authorization, reduced to what the tests need: a request's method, path and
query give the verb, API group, resource, subresource, namespace and name that RBAC checks (as
the API server reads them), and a rule grants that when each of its lists matches ("*"
wildcards, "*/subresource", resourceNames, nonResourceURLs).

The emulator keeps every request it served; the operator's are the ones with credentials: its
kubeconfig carries a bearer token, while the tests' own requests (`kube.post()` and the like)
carry no Authorization header.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import kmock
import yaml

Rule = Mapping[str, Any]  # a PolicyRule, as a role's YAML has it
REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "skylab"
# Kubernetes binds its default ClusterRoles system:discovery and system:public-info-viewer to
# every authenticated user: API discovery, /version and the health endpoints need no rule of
# ours, but anything else outside the resource paths would.
DISCOVERY_RULES: tuple[Rule, ...] = (
    {
        "nonResourceURLs": [
            "/api",
            "/api/*",
            "/apis",
            "/apis/*",
            "/healthz",
            "/livez",
            "/openapi",
            "/openapi/*",
            "/readyz",
            "/version",
            "/version/",
        ],
        "verbs": ["get"],
    },
)
VERB_OF_METHOD = {
    "GET": "get",
    "HEAD": "get",
    "POST": "create",
    "PUT": "update",
    "PATCH": "patch",
    "DELETE": "delete",
}
TRUE = {"1", "t", "T", "true", "True", "TRUE"}  # what the API server's boolean parameters accept


@dataclass(frozen=True)
class Permission:
    """What RBAC checks for one request; `url` instead of group and resource off the API."""

    verb: str
    group: str = ""
    resource: str = ""
    subresource: str = ""
    namespace: str | None = None
    name: str | None = None
    url: str | None = None

    @property
    def resource_path(self) -> str:
        """How rules name it: "pods", "pods/log"."""
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource

    def __str__(self) -> str:
        if self.url is not None:
            return f"{self.verb} {self.url}"
        return f"{self.verb} {self.group or 'core'}/{self.resource_path}"


class Call(NamedTuple):
    """One request the emulator served."""

    method: str
    path: str
    query: Mapping[str, str]
    authorized: bool  # it carried credentials: the operator's, not the test's
    # Owners the body names with blockOwnerDeletion: (apiVersion, kind) of each.
    blocked_owners: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        return f"{permission(self.method, self.path, self.query)} ({self.method} {self.path})"


def calls(kube: Iterable[kmock.Request], since: int = 0) -> list[Call]:
    """The requests KUBE served, oldest first, from the SINCE-th on."""
    return [
        Call(
            str(request.method.value).upper(),
            request.url.path,
            request.params,
            "Authorization" in request.headers,  # aiohttp's headers ignore case
            _blocked_owners(request.data),
        )
        for request in list(kube)[since:]
    ]


def _blocked_owners(body: Any) -> tuple[tuple[str, str], ...]:
    references = (
        body.get("metadata", {}).get("ownerReferences", []) if isinstance(body, dict) else []
    )
    return tuple(
        (reference["apiVersion"], reference["kind"])
        for reference in references
        if reference.get("blockOwnerDeletion")
    )


def operator_calls(kube: Iterable[kmock.Request], since: int = 0) -> list[Call]:
    """The requests with credentials: the operator's."""
    return [call for call in calls(kube, since) if call.authorized]


def permission(method: str, path: str, query: Mapping[str, str] | None = None) -> Permission:
    """The permission a request needs, read from its path as the API server reads it.

    /api/v1/... is the core group, /apis/GROUP/VERSION/... the others; then an optional
    namespaces/NS, the resource, the name and a subresource. A GET without a name lists, or
    watches with ?watch=true (or under the old /watch/ prefix); a DELETE without one deletes
    the collection. /api/v1/namespaces/NAME[/status|/finalize] is the namespace itself.
    """
    query = query or {}
    parts = [part for part in path.split("/") if part]
    if parts[:1] == ["api"] and len(parts) > 2:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) > 3:
        group, rest = parts[1], parts[3:]
    else:
        return Permission(verb=method.lower(), url=path)
    verb = VERB_OF_METHOD[method.upper()]
    watching = rest[0] == "watch"
    rest = rest[1:] if watching else rest
    namespace = None
    if rest[:1] == ["namespaces"] and len(rest) > 1:
        namespace = rest[1]
        if len(rest) > 2 and rest[2] not in ("status", "finalize"):
            rest = rest[2:]
    if not rest or len(rest) > 3:
        raise ValueError(f"not a resource path: {path}")
    resource, name, subresource = (*rest, None, None)[:3]
    if name is None:
        if verb == "get":
            verb = "watch" if watching or query.get("watch") in TRUE else "list"
            # A selection of one name is checked as that name (resourceNames apply).
            for term in query.get("fieldSelector", "").split(","):
                key, _, value = term.partition("=")
                if key.strip() == "metadata.name" and value:
                    name = value.lstrip("=").strip()
        elif verb == "delete":
            verb = "deletecollection"
    elif watching:
        verb = "watch"
    return Permission(verb, group, resource, subresource or "", namespace, name)


def granted(rules: Iterable[Rule], needed: Permission) -> bool:
    """Whether any of RULES grants NEEDED (RBAC only ever adds: no rule denies).

    RULES are a ClusterRole's; a Role's would grant only in its own namespace.
    """
    return any(_grants(rule, needed) for rule in rules)


def _grants(rule: Rule, needed: Permission) -> bool:
    if not _listed(rule.get("verbs"), needed.verb):
        return False
    if needed.url is not None:
        return any(
            url == needed.url or (url.endswith("*") and needed.url.startswith(url[:-1]))
            for url in rule.get("nonResourceURLs") or ()
        )
    if not _listed(rule.get("apiGroups"), needed.group):
        return False
    sub = needed.subresource
    if not any(
        resource in ("*", needed.resource_path) or (bool(sub) and resource == f"*/{sub}")
        for resource in rule.get("resources") or ()
    ):
        return False
    # A rule limited to names grants nothing that names no object (create, list, watch).
    names = rule.get("resourceNames") or ()
    return not names or needed.name in names


def _listed(values: Iterable[str] | None, wanted: str) -> bool:
    listed = set(values or ())
    return "*" in listed or wanted in listed


def ungranted(rules: Iterable[Rule], made: Iterable[Call]) -> list[str]:
    """The calls RULES (with what every user may do) do not grant, each once."""
    allowed = [*rules, *DISCOVERY_RULES]
    missing = (
        f"{needed} ({call.method} {call.path})"
        for call in made
        for needed in _needed(call)
        if not granted(allowed, needed)
    )
    return list(dict.fromkeys(missing))


def unused(rules: Iterable[Rule], made: Iterable[Call]) -> list[str]:
    """Each (group, resource, verb) RULES grant that none of the calls needed."""
    needed = [permission for call in made for permission in _needed(call)]
    found = []
    for rule in rules:
        for group in rule.get("apiGroups") or ():
            for resource in rule.get("resources") or ():
                for verb in rule.get("verbs") or ():
                    one = {**rule, "apiGroups": [group], "resources": [resource], "verbs": [verb]}
                    if not any(_grants(one, permission) for permission in needed):
                        found.append(f"{verb} {group or 'core'}/{resource}")
    return found


def _needed(call: Call) -> list[Permission]:
    """The request's own permission and, where the OwnerReferencesPermissionEnforcement
    admission plugin runs (OpenShift), `update` on the finalizers of each owner whose
    deletion the new object blocks."""
    owners = [
        Permission("update", api_version.rpartition("/")[0], kind.lower() + "s", "finalizers")
        for api_version, kind in call.blocked_owners
    ]
    return [permission(call.method, call.path, call.query), *owners]


def chart_rules() -> list[Rule]:
    """The rules of the ClusterRole the chart renders for its default values.

    Read from templates/rbac.yaml without Helm, which takes seconds and an API server:
    the rules' `define`, with the blocks whose value is empty by default left out, then the
    peering rule when peering is on by default. tests/test_chart_rbac.py checks the result
    against what Helm renders.
    """
    template = (CHART / "templates" / "rbac.yaml").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    text = read_define(template, "skylab.rules", values)
    if values["peering"]["enabled"]:
        peering = read_define(template, "skylab.peeringRule", values)
        text += "\n" + peering.replace("{{ . | quote }}", '"clusterkopfpeerings"')
    if "{{" in text:
        raise ValueError(f"cannot render: {text}")
    rules: list[Rule] = yaml.safe_load(text)
    return rules


def read_define(template: str, name: str, values: Mapping[str, Any]) -> str:
    """The body of the template's `define NAME`, its `with`/`if` blocks on empty values out."""
    lines = iter(template.splitlines())
    # Consumes the lines up to the define's own.
    if f'{{{{- define "{name}" -}}}}' not in (line.strip() for line in lines):
        raise ValueError(f"no define {name!r}")
    body: list[str] = []
    blocks: list[bool] = []  # for each open block: whether its lines are rendered (never yet)
    for line in lines:
        stripped = line.strip()
        if not stripped.startswith("{{"):
            if all(blocks):
                body.append(line)
            continue
        if not stripped.endswith("}}"):
            raise ValueError(f"cannot render: {line}")
        keyword, _, argument = (
            stripped.removeprefix("{{").removesuffix("}}").strip("- ").partition(" ")
        )
        if keyword == "end":
            if not blocks:
                return "\n".join(body)
            blocks.pop()
        elif keyword in ("with", "if"):
            if all(blocks) and _value(values, argument):
                raise ValueError(f"cannot render a block on a value set by default: {line}")
            blocks.append(False)
        elif all(blocks) and not keyword.startswith("/*"):
            raise ValueError(f"cannot render: {line}")
    raise ValueError(f"define {name!r} has no end")


def _value(values: Mapping[str, Any], reference: str) -> Any:
    if not reference.startswith(".Values."):
        raise ValueError(f"cannot evaluate {reference!r}")
    value: Any = values
    for key in reference.removeprefix(".Values.").split("."):
        value = value.get(key) if isinstance(value, Mapping) else None
    return value
