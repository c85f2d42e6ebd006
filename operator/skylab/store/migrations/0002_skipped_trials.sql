-- A proposal the strategy gave up on (no change, no compiling change, a duplicate) is
-- recorded as a skipped trial: it ran nothing, but its reason and its LLM usage stay.

ALTER TABLE trials DROP CONSTRAINT trials_status_check;
ALTER TABLE trials ADD CONSTRAINT trials_status_check
    CHECK (status IN ('running', 'success', 'crash', 'timeout', 'killed', 'skipped'));
