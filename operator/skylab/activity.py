"""A campaign's budget clock: the time a driver was up and driving it.

Both drivers spend a campaign's budget the same way: a stretch of activity starts when
a driver takes the campaign up (`skylab run`, `--resume`, the operator reconciling a
running Campaign) and is stamped every few seconds while it goes on; it ends when the
campaign is suspended or finished, or with the driver. A driver killed for an hour has
spent at most one stamp's interval of that hour.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from skylab.store.db import Store

# How often the open stretches are stamped: at most this much of a driver's death is
# counted as spent.
STAMP_SECONDS = 5.0
LOGGER = logging.getLogger("skylab.activity")


@dataclass(frozen=True)
class _Stretch:
    id: int
    spent_before: float  # the campaign's seconds of earlier stretches
    began: float  # time.monotonic() when it began


class ActivityClock:
    """The open stretches of the campaigns one driver drives, stamped by a thread.

    A campaign with an open stretch has its spent time counted here, from what its earlier
    stretches add up to and the stretch's own start: asked at every decision, it needs no
    query. The database holds the same within one stamp's interval.
    """

    def __init__(self, store: Callable[[], Store], stamp_seconds: float = STAMP_SECONDS) -> None:
        self.store = store
        self.stamp_seconds = stamp_seconds
        self._open: dict[int, _Stretch] = {}  # by campaign id
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, campaign_id: int) -> None:
        """The campaign is driven from now on (once: an open stretch goes on)."""
        with self._lock:
            if campaign_id not in self._open:
                store = self.store()
                before = store.active_seconds(campaign_id)
                stretch = store.begin_activity(campaign_id)
                self._open[campaign_id] = _Stretch(stretch, before, time.monotonic())

    def stop(self, campaign_id: int) -> None:
        """The campaign is no longer driven (suspended, finished): its stretch ends now."""
        with self._lock:
            stretch = self._open.pop(campaign_id, None)
        if stretch is not None:
            self.store().touch_activity([stretch.id])

    def elapsed(self, campaign_id: int) -> float:
        """The seconds of the campaign's budget spent, up to now."""
        with self._lock:
            stretch = self._open.get(campaign_id)
        if stretch is not None:
            return stretch.spent_before + time.monotonic() - stretch.began
        return self.store().active_seconds(campaign_id)

    def stamp(self) -> None:
        """Every open stretch lasts until now."""
        with self._lock:
            stretches = [stretch.id for stretch in self._open.values()]
        self.store().touch_activity(stretches)

    def run(self) -> ActivityClock:
        """Stamp the open stretches every stamp_seconds, in a thread, until close()."""
        self._thread = threading.Thread(target=self._stamping, name="activity", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop stamping; the open stretches end now (or at the last stamp, if the
        database is away)."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.stamp()
        except Exception as exc:
            LOGGER.warning("could not stamp the campaigns' activity: %s", exc)

    def _stamping(self) -> None:
        while not self._stopped.wait(self.stamp_seconds):
            try:
                self.stamp()
            except Exception as exc:  # the database away: the next stamp catches up
                LOGGER.warning("could not stamp the campaigns' activity: %s", exc)
