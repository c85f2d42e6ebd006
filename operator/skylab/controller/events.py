"""What the operator tells: Kubernetes Events on Campaigns and Trials, and its log.

Every Event it posts is also one log line, at the same moment and with the same words,
so `kubectl describe` and the operator's log never disagree. kopf adds its own lines for
handlers that fail and are retried, with the cause.
"""

from __future__ import annotations

import logging
from typing import cast

import kopf

from skylab.controller.kubeapi import Manifest

LOGGER = logging.getLogger("skylab.operator")


def post(
    body: Manifest, reason: str, message: str, *, warning: bool = False, **fields: object
) -> None:
    """An Event on BODY, and its log line (FIELDS: more to say in a JSON log)."""
    # kopf reads apiVersion, kind and metadata from any mapping; its Body type is a view.
    target = cast(kopf.Body, body)
    if warning:
        kopf.warn(target, reason=reason, message=message)
    else:
        kopf.info(target, reason=reason, message=message)
    meta = body.get("metadata") or {}
    ref = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "name": meta.get("name"),
        "uid": meta.get("uid"),
        "namespace": meta.get("namespace"),
    }
    LOGGER.log(
        logging.WARNING if warning else logging.INFO,
        "%s %s: %s",
        body.get("kind"),
        reason,
        message,
        # k8s_ref is how kopf's formatters name the object: [ns/name] in text, "object" in JSON.
        extra={"k8s_ref": ref, "reason": reason, **fields},
    )


def configure_logging(level: str, log_format: str) -> None:
    """Log to stderr from LEVEL (debug, info, warning, error) up, as text or JSON lines."""
    kopf.configure(
        debug=level == "debug",
        log_format=kopf.LogFormat.JSON if log_format == "json" else kopf.LogFormat.FULL,
        log_prefix=log_format == "text",
    )
    threshold = logging.getLevelNamesMapping()[level.upper()]
    logging.getLogger().setLevel(threshold)
    # kopf says "succeeded" for every handler call and timer tick: only when debugging.
    # Its failures and retries, with their cause, are warnings and errors: they show.
    logging.getLogger("kopf").setLevel(
        max(threshold, logging.WARNING) if level != "debug" else threshold
    )
