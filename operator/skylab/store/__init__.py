"""The store remembers: campaigns, trials and their progress, in PostgreSQL."""

from skylab.store.db import (
    CampaignExistsError,
    CampaignRecord,
    CampaignState,
    Direction,
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
    "Store",
    "TrialNotRunningError",
    "TrialRecord",
    "configured_url",
    "open_database",
]
