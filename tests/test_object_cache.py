"""The operator's memory of the objects it watches: the newest state wins, by campaign."""

from __future__ import annotations

from typing import Any

from skylab.controller.cache import ObjectCache

LABEL = "skylab.dev/campaign"


def trial(
    name: str, version: str, uid: str = "u1", campaign: str = "c", **status: Any
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": uid,
            "resourceVersion": version,
            "labels": {LABEL: campaign},
        },
        "status": status,
    }


def test_an_older_state_never_replaces_a_newer_one() -> None:
    cache = ObjectCache(group_by=LABEL)
    cache.remember("trials", trial("c-0001", "12", phase="Running"))  # a write's answer
    cache.remember("trials", trial("c-0001", "11", phase="Pending"))  # its watch event, late
    assert cache.get("trials", "ns", "c-0001")["status"]["phase"] == "Running"
    cache.remember("trials", trial("c-0001", "13", phase="Succeeded"))
    assert cache.get("trials", "ns", "c-0001")["status"]["phase"] == "Succeeded"


def test_an_object_made_again_under_its_name_replaces_the_old_one() -> None:
    cache = ObjectCache(group_by=LABEL)
    cache.remember("trials", trial("c-0001", "90", uid="old"))
    cache.remember("trials", trial("c-0001", "5", uid="new"))  # versions of another object
    assert cache.get("trials", "ns", "c-0001")["metadata"]["uid"] == "new"


def test_versions_that_are_not_numbers_are_not_compared() -> None:
    cache = ObjectCache(group_by=LABEL)
    cache.remember("trials", trial("c-0001", "b", phase="Running"))
    cache.remember("trials", trial("c-0001", "a", phase="Pending"))
    assert cache.get("trials", "ns", "c-0001")["status"]["phase"] == "Pending"  # the last


def test_a_campaign_s_objects_are_found_by_its_label_and_forgotten() -> None:
    cache = ObjectCache(group_by=LABEL)
    cache.remember("trials", trial("c-0002", "1"))
    cache.remember("trials", trial("c-0001", "2"))
    cache.remember("trials", trial("d-0001", "3", campaign="d"))
    cache.remember("jobs", trial("c-0001", "4"))  # another kind, the same label
    assert [t["metadata"]["name"] for t in cache.group("trials", "ns", "c")] == [
        "c-0001",
        "c-0002",
    ]
    assert cache.group("trials", "other", "c") == []
    cache.forget("trials", "ns", "c-0001")
    assert cache.get("trials", "ns", "c-0001") is None
    assert [t["metadata"]["name"] for t in cache.group("trials", "ns", "c")] == ["c-0002"]
    relabelled = trial("c-0002", "5", campaign="d")
    cache.remember("trials", relabelled)
    assert cache.group("trials", "ns", "c") == []
    assert len(cache.group("trials", "ns", "d")) == 2
