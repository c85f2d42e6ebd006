"""An API server that fails the operator's requests for a while: 500s (an overloaded or
restarting server), 500s after the write was made (the answer lost on the way back, so
a retried create meets the object it already made), and 409 Conflicts on updates.

Only the operator's requests fail (kopf's and the kubernetes client's, by User-Agent):
the tests play the kubelet and the Job controller through the same server, and a
cluster's own controllers are not what is under test.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import kmock

from emulator import Fault, error

OPERATOR_AGENTS = ("kopf/", "OpenAPI-Generator/")
# The faults each kind of request may meet: a write may be made before its answer is
# lost, and only an update conflicts.
READ_FAULTS = ("500",)
WRITE_FAULTS = ("500", "500 after the write")
UPDATE_FAULTS = (*WRITE_FAULTS, "409")


@dataclass
class ApiFaults:
    """While ACTIVE, fails each of the operator's requests with chance RATE (seeded)."""

    seed: int
    rate: float = 0.3
    active: bool = False
    # What was answered, by kind: "500", "500 after the write", "409".
    injected: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def __call__(self, request: kmock.Request) -> Fault | None:
        agent = request.headers.get("User-Agent") or ""
        if not self.active or not agent.startswith(OPERATOR_AGENTS):
            return None
        if self._rng.random() >= self.rate:
            return None
        if request.action == kmock.action.UPDATE or request.method == kmock.method.PUT:
            kinds = UPDATE_FAULTS
        elif request.action in (kmock.action.CREATE, kmock.action.DELETE):
            kinds = WRITE_FAULTS
        else:
            kinds = READ_FAULTS
        kind = self._rng.choice(kinds)
        self.injected[kind] += 1
        if kind == "409":
            return Fault(
                error(
                    409,
                    "Conflict",
                    "the object has been modified; please apply your changes to the latest "
                    "version and try again",
                )
            )
        failure = error(500, "InternalError", "an error on the server has prevented the request")
        return Fault(failure, after_write=kind != "500")
