-- Campaigns, their trials and each trial's progress time series.

CREATE TABLE campaigns (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    experiment  text NOT NULL,
    strategy    text NOT NULL,
    profile     text,
    status      text NOT NULL DEFAULT 'running'
                CHECK (status IN ('running', 'succeeded', 'stopped', 'failed', 'interrupted')),
    stop_reason text,
    branch      text NOT NULL,
    config      jsonb NOT NULL DEFAULT '{}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    CONSTRAINT finished_unless_running CHECK ((status = 'running') = (finished_at IS NULL))
);

-- latest_campaign(experiment): the newest campaign of one experiment.
CREATE INDEX campaigns_experiment_id ON campaigns (experiment, id);

CREATE TABLE trials (
    id               bigserial PRIMARY KEY,
    campaign_id      bigint NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    number           integer NOT NULL,
    is_baseline      boolean NOT NULL,
    commit           text NOT NULL,
    parent_commit    text,
    strategy         text NOT NULL,
    description      text NOT NULL,
    rationale        text NOT NULL DEFAULT '',
    diff             text NOT NULL DEFAULT '',
    params           jsonb NOT NULL DEFAULT '{}',
    status           text NOT NULL DEFAULT 'running'
                     CHECK (status IN ('running', 'success', 'crash', 'timeout', 'killed')),
    -- NULL until decided; a decision is recorded exactly when the trial finishes.
    kept             boolean,
    decision_reason  text NOT NULL DEFAULT '',
    metric_name      text,
    metric           double precision,
    metrics          jsonb NOT NULL DEFAULT '{}',
    peak_vram_mb     double precision,
    exit_code        integer,
    duration_seconds double precision,
    message          text NOT NULL DEFAULT '',
    log_tail         text NOT NULL DEFAULT '',
    -- Token counts of the proposal (LLM strategies); its price is cost_usd.
    usage            jsonb NOT NULL DEFAULT '{}',
    cost_usd         double precision NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    UNIQUE (campaign_id, number),
    CONSTRAINT decided_when_finished CHECK ((status = 'running') = (kept IS NULL)),
    CONSTRAINT finished_unless_running CHECK ((status = 'running') = (finished_at IS NULL)),
    CONSTRAINT only_successes_are_kept CHECK (NOT kept OR status = 'success'),
    -- best_trial ranks kept trials by metric: each needs a real number.
    CONSTRAINT kept_trials_have_a_metric CHECK (
        NOT kept OR (metric IS NOT NULL AND metric NOT IN ('NaN', 'Infinity', '-Infinity'))
    )
);

-- mark_running_trials_killed and best_trial look at few rows of a campaign.
CREATE INDEX trials_running ON trials (campaign_id) WHERE status = 'running';
CREATE INDEX trials_kept ON trials (campaign_id, metric) WHERE kept;

CREATE TABLE trial_progress (
    trial_id          bigint NOT NULL REFERENCES trials (id) ON DELETE CASCADE,
    step              integer NOT NULL,
    loss              double precision,
    tokens_per_second double precision,
    percent_done      double precision,
    seconds_left      double precision,
    recorded_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (trial_id, step)
);
