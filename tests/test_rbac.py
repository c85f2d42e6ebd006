"""tests/rbac.py: the permission each API request needs, and RBAC's rule matching."""

from __future__ import annotations

import pytest

from rbac import (
    DISCOVERY_RULES,
    Call,
    Permission,
    Rule,
    chart_rules,
    granted,
    permission,
    read_define,
    ungranted,
    unused,
)

CAMPAIGNS = "/apis/skylab.dev/v1alpha1/namespaces/default/campaigns"
PODS = "/api/v1/namespaces/default/pods"
SKYLAB, NS = "skylab.dev", "default"
P = Permission


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        ("GET", f"{CAMPAIGNS}/c", {}, P("get", SKYLAB, "campaigns", "", NS, "c")),
        ("GET", CAMPAIGNS, {}, P("list", SKYLAB, "campaigns", "", NS)),
        ("GET", "/apis/skylab.dev/v1alpha1/campaigns", {}, P("list", SKYLAB, "campaigns")),
        ("GET", "/apis/batch/v1/jobs", {"watch": "true"}, P("watch", "batch", "jobs")),
        ("GET", "/apis/batch/v1/jobs", {"watch": "1"}, P("watch", "batch", "jobs")),
        ("GET", "/apis/batch/v1/jobs", {"watch": "false"}, P("list", "batch", "jobs")),
        ("GET", "/api/v1/watch/namespaces/default/pods", {}, P("watch", "", "pods", "", NS)),
        ("GET", f"{PODS}/p/log", {"container": "trainer"}, P("get", "", "pods", "log", NS, "p")),
        ("PATCH", f"{CAMPAIGNS}/c/status", {}, P("patch", SKYLAB, "campaigns", "status", NS, "c")),
        ("PATCH", f"{CAMPAIGNS}/c", {}, P("patch", SKYLAB, "campaigns", "", NS, "c")),
        ("POST", "/api/v1/namespaces/default/events", {}, P("create", "", "events", "", NS)),
        ("PUT", f"{PODS}/p", {}, P("update", "", "pods", "", NS, "p")),
        ("DELETE", f"{PODS}/p", {}, P("delete", "", "pods", "", NS, "p")),
        ("DELETE", PODS, {}, P("deletecollection", "", "pods", "", NS)),
        ("GET", "/api/v1/namespaces", {}, P("list", "", "namespaces")),
        ("GET", "/api/v1/namespaces/ns", {}, P("get", "", "namespaces", "", "ns", "ns")),
        (
            "PUT",
            "/api/v1/namespaces/ns/finalize",
            {},
            P("update", "", "namespaces", "finalize", "ns", "ns"),
        ),
        (
            "GET",
            "/apis/kopf.dev/v1/clusterkopfpeerings",
            {"fieldSelector": "metadata.name=skylab"},
            P("list", "kopf.dev", "clusterkopfpeerings", name="skylab"),
        ),
    ],
)
def test_a_resource_request_needs_its_verb_on_its_resource(
    method: str, path: str, query: dict[str, str], expected: Permission
) -> None:
    assert permission(method, path, query) == expected


@pytest.mark.parametrize(
    "path", ["/api", "/api/v1", "/apis", "/apis/batch", "/apis/batch/v1", "/version", "/openapi/v2"]
)
def test_discovery_is_off_the_resources_and_granted_to_everyone(path: str) -> None:
    needed = permission("GET", path)
    assert needed == Permission("get", url=path)
    assert granted(DISCOVERY_RULES, needed)
    assert not granted(DISCOVERY_RULES, permission("GET", "/metrics"))
    assert not granted(DISCOVERY_RULES, permission("GET", "/apis/batch/v1/jobs"))


def rule(groups: list[str], resources: list[str], verbs: list[str], **more: list[str]) -> Rule:
    return {"apiGroups": groups, "resources": resources, "verbs": verbs, **more}


def test_a_rule_grants_only_its_verbs() -> None:
    listing = [rule(["batch"], ["jobs"], ["list"])]
    assert granted(listing, permission("GET", "/apis/batch/v1/jobs"))
    assert not granted(listing, permission("GET", "/apis/batch/v1/jobs", {"watch": "true"}))
    assert not granted(listing, permission("GET", "/apis/batch/v1/namespaces/d/jobs/j"))
    assert granted([rule(["batch"], ["jobs"], ["*"])], permission("DELETE", "/apis/batch/v1/jobs"))


def test_a_rule_grants_only_its_groups() -> None:
    core = [rule([""], ["jobs"], ["get"])]
    assert not granted(core, permission("GET", "/apis/batch/v1/namespaces/d/jobs/j"))
    assert granted([rule(["*"], ["jobs"], ["get"])], permission("GET", "/api/v1/jobs/j"))


def test_a_subresource_is_granted_apart_from_its_resource() -> None:
    log = permission("GET", f"{PODS}/p/log")
    pod = permission("GET", f"{PODS}/p")
    assert not granted([rule([""], ["pods"], ["get"])], log)
    assert not granted([rule([""], ["pods/log"], ["get"])], pod)
    assert granted([rule([""], ["pods/log"], ["get"])], log)
    assert granted([rule([""], ["*/log"], ["get"])], log)
    assert not granted([rule([""], ["*/status"], ["get"])], log)
    assert granted([rule([""], ["*"], ["get"])], log)


def test_resource_names_grant_only_calls_on_those_names() -> None:
    named = [rule([""], ["secrets"], ["get", "list"], resourceNames=["git"])]
    assert granted(named, permission("GET", "/api/v1/namespaces/d/secrets/git"))
    assert not granted(named, permission("GET", "/api/v1/namespaces/d/secrets/other"))
    assert not granted(named, permission("GET", "/api/v1/namespaces/d/secrets"))  # all of them
    selected = permission("GET", "/api/v1/secrets", {"fieldSelector": "metadata.name=git"})
    assert granted(named, selected)


def test_ungranted_names_each_refused_call_once_with_its_permission() -> None:
    rules = [rule(["batch"], ["jobs"], ["list"])]
    made = [
        Call("GET", "/apis/batch/v1/jobs", {}, True),
        Call("GET", "/apis/batch/v1/jobs", {"watch": "true"}, True),
        Call("GET", "/apis/batch/v1/jobs", {"watch": "true"}, True),
        Call("GET", f"{PODS}/p/log", {}, True),
        Call("GET", "/apis", {}, True),
    ]
    assert ungranted(rules, made) == [
        "watch batch/jobs (GET /apis/batch/v1/jobs)",
        f"get core/pods/log (GET {PODS}/p/log)",
    ]


def test_unused_names_each_grant_no_call_needed() -> None:
    rules = [rule(["", "batch"], ["pods", "pods/log"], ["get", "list"])]
    made = [
        Call("GET", PODS, {}, True),
        Call("GET", "/apis/batch/v1/namespaces/d/pods/p", {}, True),
    ]
    assert unused(rules, made) == [
        "get core/pods",
        "get core/pods/log",
        "list core/pods/log",
        "list batch/pods",
        "get batch/pods/log",
        "list batch/pods/log",
    ]


TEMPLATE = """\
{{- /* a comment */}}
{{- define "rules" -}}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
  {{- with .Values.names }}
  resourceNames:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
{{- define "other" -}}
{{- end -}}
"""


def test_a_define_is_read_without_the_blocks_on_empty_values() -> None:
    assert read_define(TEMPLATE, "rules", {"names": []}).splitlines() == [
        '- apiGroups: [""]',
        '  resources: ["secrets"]',
        '  verbs: ["get"]',
    ]
    assert read_define(TEMPLATE, "other", {}) == ""
    with pytest.raises(ValueError, match="set by default"):
        read_define(TEMPLATE, "rules", {"names": ["git"]})
    with pytest.raises(ValueError, match="no define"):
        read_define(TEMPLATE, "missing", {})


def test_the_chart_rules_are_read_with_the_peering_rule() -> None:
    rules = chart_rules()
    assert granted(rules, permission("PATCH", "/apis/kopf.dev/v1/clusterkopfpeerings/skylab"))
    assert granted(rules, permission("GET", "/api/v1/namespaces/d/secrets/any"))


def test_blocking_an_owner_s_deletion_needs_update_on_its_finalizers() -> None:
    # Where OwnerReferencesPermissionEnforcement runs, a child with blockOwnerDeletion needs it.
    create = Call(
        "POST", "/apis/batch/v1/namespaces/d/jobs", {}, True, (("skylab.dev/v1alpha1", "Trial"),)
    )
    jobs = rule(["batch"], ["jobs"], ["create"])
    assert ungranted([jobs], [create]) == [
        "update skylab.dev/trials/finalizers (POST /apis/batch/v1/namespaces/d/jobs)"
    ]
    assert (
        ungranted([jobs, rule(["skylab.dev"], ["trials/finalizers"], ["update"])], [create]) == []
    )
