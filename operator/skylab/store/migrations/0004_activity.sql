-- The stretches of time a campaign was driven: one row from when a driver (`skylab run`
-- or the operator) took it up to when that driver last said it was still at it. A
-- campaign's budget is the sum of these, so time while no driver was up, or while the
-- campaign was suspended, is never spent.

CREATE TABLE campaign_activity (
    id          bigserial PRIMARY KEY,
    campaign_id bigint NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    started_at  timestamptz NOT NULL DEFAULT now(),
    seen_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT seen_after_start CHECK (seen_at >= started_at)
);
CREATE INDEX campaign_activity_campaign ON campaign_activity (campaign_id);

-- What a campaign recorded before spent its trials' time: one stretch, from its first
-- trial to its last trial's end.
INSERT INTO campaign_activity (campaign_id, started_at, seen_at)
SELECT campaign_id, min(created_at), greatest(min(created_at), max(coalesce(finished_at, created_at)))
FROM trials GROUP BY campaign_id;
