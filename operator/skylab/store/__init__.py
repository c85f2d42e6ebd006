"""The store remembers: campaigns, trials, their runs and progress, in PostgreSQL."""

from skylab.store.db import (
    CampaignExistsError,
    CampaignRecord,
    CampaignState,
    Direction,
    RunNotRunningError,
    RunRecord,
    Store,
    TrialNotRunningError,
    TrialRecord,
)
from skylab.store.url import configured_url, open_database

__all__ = [
    "CampaignExistsError",
    "CampaignRecord",
    "CampaignState",
    "Direction",
    "RunNotRunningError",
    "RunRecord",
    "Store",
    "TrialNotRunningError",
    "TrialRecord",
    "configured_url",
    "open_database",
]
