"""The latest known state of the objects the operator watches, kept in memory.

A trial's reaction reads its Campaign, its Trial and its Job several times; a GET of each
on every event costs the API server and the operator more than the decision does. kopf
already watches all three: every event it receives is kept here, and so is the API
server's answer to each write the operator makes (a write's answer is the object as
stored, newer than any event yet delivered). Whichever of the two has the higher
resourceVersion wins, so the operator never reads back an older state than one it wrote.
A miss is a GET.

Objects handed out are shared: callers read them and never change them.
"""

from __future__ import annotations

import threading
from typing import Any

Manifest = dict[str, Any]
Key = tuple[str, str, str]  # plural, namespace, name
Group = tuple[str, str, str]  # plural, namespace, the group label's value


def _version(body: Manifest) -> int | None:
    """The resourceVersion as a number, None if it is not one (then it is not compared)."""
    text = str((body.get("metadata") or {}).get("resourceVersion") or "")
    return int(text) if text.isdigit() else None


class ObjectCache:
    """Objects by kind, namespace and name, and grouped by the value of one label (GROUP_BY:
    the campaign an object belongs to)."""

    def __init__(self, group_by: str) -> None:
        self.group_by = group_by
        self._objects: dict[Key, Manifest] = {}
        self._groups: dict[Group, set[str]] = {}
        self._lock = threading.Lock()

    def get(self, plural: str, namespace: str, name: str) -> Manifest | None:
        with self._lock:
            return self._objects.get((plural, namespace, name))

    def group(self, plural: str, namespace: str, value: str) -> list[Manifest]:
        """The objects kept in NAMESPACE whose GROUP_BY label is VALUE, by name."""
        with self._lock:
            names = sorted(self._groups.get((plural, namespace, value), ()))
            return [self._objects[(plural, namespace, name)] for name in names]

    def remember(self, plural: str, body: Manifest) -> None:
        """BODY is a state the API server holds (an answer or a watch event): kept unless
        an object of a higher resourceVersion is kept already."""
        meta = body.get("metadata") or {}
        key = (plural, meta.get("namespace") or "", meta.get("name") or "")
        with self._lock:
            kept = self._objects.get(key)
            if kept is not None and kept["metadata"].get("uid") == meta.get("uid"):
                old, new = _version(kept), _version(body)
                if old is not None and new is not None and new < old:
                    return
            self._ungroup(key)
            self._objects[key] = body
            value = (meta.get("labels") or {}).get(self.group_by)
            if value is not None:
                self._groups.setdefault((plural, key[1], value), set()).add(key[2])

    def forget(self, plural: str, namespace: str, name: str) -> None:
        with self._lock:
            self._ungroup((plural, namespace, name))
            self._objects.pop((plural, namespace, name), None)

    def _ungroup(self, key: Key) -> None:
        kept = self._objects.get(key)
        value = None if kept is None else (kept["metadata"].get("labels") or {}).get(self.group_by)
        if value is not None:
            members = self._groups.get((key[0], key[1], value))
            if members is not None:
                members.discard(key[2])
                if not members:
                    del self._groups[(key[0], key[1], value)]
