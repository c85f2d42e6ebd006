"""Kubernetes Events on Campaigns and Trials, posted through kopf's event queue."""

from __future__ import annotations

from typing import cast

import kopf

from skylab.controller.kubeapi import Manifest


def post(body: Manifest, reason: str, message: str, *, warning: bool = False) -> None:
    # kopf reads apiVersion, kind and metadata from any mapping; its Body type is a view.
    target = cast(kopf.Body, body)
    if warning:
        kopf.warn(target, reason=reason, message=message)
    else:
        kopf.info(target, reason=reason, message=message)
