-- A trial may have several runs (one execution of its command each: a seed, a metric, a
-- status, a duration, progress). The trial's own columns become what its runs add up to:
-- metric is their mean, metric_sd their spread, run_count how many ended on their own.
-- A trial can also end pruned: stopped early because it could not catch up.

ALTER TABLE trials DROP CONSTRAINT trials_status_check;
ALTER TABLE trials ADD CONSTRAINT trials_status_check
    CHECK (status IN ('running', 'success', 'crash', 'timeout', 'killed', 'skipped', 'pruned'));
ALTER TABLE trials ADD COLUMN metric_sd double precision;
ALTER TABLE trials ADD COLUMN run_count integer NOT NULL DEFAULT 0;

CREATE TABLE runs (
    trial_id         bigint NOT NULL REFERENCES trials (id) ON DELETE CASCADE,
    number           integer NOT NULL CHECK (number >= 1),
    seed             integer,  -- NULL: a run from before runs had seeds
    status           text NOT NULL DEFAULT 'running'
                     CHECK (status IN ('running', 'success', 'crash', 'timeout', 'killed',
                                       'pruned')),
    metric           double precision,
    metrics          jsonb NOT NULL DEFAULT '{}',
    peak_vram_mb     double precision,
    exit_code        integer,
    duration_seconds double precision,
    message          text NOT NULL DEFAULT '',
    log_tail         text NOT NULL DEFAULT '',
    started_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    PRIMARY KEY (trial_id, number),
    CONSTRAINT finished_unless_running CHECK ((status = 'running') = (finished_at IS NULL)),
    CONSTRAINT finite_metric CHECK (metric IS NULL OR metric NOT IN ('NaN', 'Infinity', '-Infinity'))
);

-- Every trial recorded before had exactly one run: it becomes run 1.
INSERT INTO runs (trial_id, number, status, metric, metrics, peak_vram_mb, exit_code,
                  duration_seconds, message, log_tail, started_at, finished_at)
SELECT id, 1, status,
       CASE WHEN metric IN ('NaN', 'Infinity', '-Infinity') THEN NULL ELSE metric END,
       metrics, peak_vram_mb, exit_code, duration_seconds, message, log_tail, started_at,
       finished_at
FROM trials WHERE status <> 'skipped';
UPDATE trials SET run_count = 1 WHERE status NOT IN ('skipped', 'running', 'killed');

-- Progress is per run.
ALTER TABLE trial_progress ADD COLUMN run integer NOT NULL DEFAULT 1;
ALTER TABLE trial_progress DROP CONSTRAINT trial_progress_pkey;
ALTER TABLE trial_progress ADD PRIMARY KEY (trial_id, run, step);
