"""The store: campaigns, their trials, the trials' runs and their progress, in PostgreSQL.

Every public method runs in a transaction of its own: it commits as a whole or, on
any error, rolls back and leaves no half-written row. A Store wraps one connection;
use one Store per thread.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from types import TracebackType
from typing import Any, Literal

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from skylab.engine import RunView, Status, TrialView, Verdict, stats
from skylab.errors import UserError
from skylab.store.migrate import migrate
from skylab.strategies.base import PastTrial, Skipped, Usage
from skylab_trainer.progress import Progress
from skylab_trainer.report import RunReport, RunStatus

CampaignState = Literal["running", "succeeded", "stopped", "failed", "interrupted"]
Direction = Literal["minimize", "maximize"]
Row = dict[str, Any]


class CampaignExistsError(UserError):
    """A campaign of that name is already recorded."""


class TrialNotRunningError(RuntimeError):
    """The trial was already finished: its outcome and decision are recorded once."""


class RunNotRunningError(RuntimeError):
    """The run was already finished: its report is recorded once."""


@dataclass(frozen=True)
class CampaignRecord:
    id: int
    name: str
    experiment: str
    strategy: str
    profile: str | None
    status: CampaignState
    stop_reason: str | None
    branch: str
    config: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class RunRecord:
    """One execution of a trial's command."""

    trial_id: int
    number: int
    seed: int | None
    status: Status
    metric: float | None
    metrics: dict[str, float]
    peak_vram_mb: float | None
    exit_code: int | None
    duration_seconds: float | None
    message: str
    log_tail: str
    started_at: datetime
    finished_at: datetime | None

    def view(self) -> RunView:
        return RunView(self.number, self.status, self.metric, self.peak_vram_mb)


@dataclass(frozen=True)
class TrialRecord:
    id: int
    campaign_id: int
    number: int
    is_baseline: bool
    commit: str
    parent_commit: str | None
    strategy: str
    description: str
    rationale: str
    diff: str
    params: dict[str, Any]
    status: Status
    kept: bool | None  # None while running
    decision_reason: str
    metric_name: str | None  # None while running
    metric: float | None  # the mean of its successful runs
    metric_sd: float | None  # their sample standard deviation (0 for one run)
    run_count: int  # runs that ended on their own (interrupted ones are not counted)
    metrics: dict[str, float]  # of its last run
    peak_vram_mb: float | None
    exit_code: int | None
    duration_seconds: float | None
    message: str
    log_tail: str
    usage: Usage  # the usage and cost_usd columns together
    created_at: datetime
    started_at: datetime
    finished_at: datetime | None
    runs: tuple[RunRecord, ...] = ()  # in run order

    def view(self) -> TrialView:
        """The trial as the engine sees it."""
        return TrialView(
            number=self.number,
            status=self.status,
            is_baseline=self.is_baseline,
            commit=self.commit,
            metric=self.metric,
            kept=self.kept,
            runs=tuple(run.view() for run in self.runs),
            parent=self.parent_commit,
        )

    def run(self, number: int) -> RunRecord | None:
        return next((run for run in self.runs if run.number == number), None)

    def past(self) -> PastTrial:
        """The trial as strategies see it."""
        return PastTrial(
            number=self.number,
            status=self.status,
            kept=self.kept,
            metric=self.metric,
            description=self.description,
            params=self.params,
            strategy=self.strategy,
            diff=self.diff,
            log_tail=self.log_tail,
            usage=self.usage,
        )


def _columns(names: Sequence[str]) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(name) for name in names)


_CAMPAIGN = _columns([f.name for f in fields(CampaignRecord)])
_TRIAL = _columns([f.name for f in fields(TrialRecord) if f.name != "runs"] + ["cost_usd"])
_RUN = _columns([f.name for f in fields(RunRecord)])
_NO_USAGE = Usage()  # a proposal that called no model
# How long a call waits for a working connection while the server is away.
DEFAULT_TIMEOUT_SECONDS = 10.0
_ORDER: dict[Direction, sql.SQL] = {"minimize": sql.SQL("ASC"), "maximize": sql.SQL("DESC")}


class Store:
    """The campaign records in PostgreSQL, over a pool of connections.

    Every method is one transaction on a connection checked out of the pool: a
    connection the server dropped (a restart, a network cut) is found by the pool's check
    and replaced, so after an outage the next call works again, without a restart. While
    the server is away a call fails within the pool's timeout (psycopg_pool.PoolTimeout,
    an OperationalError) and the caller retries. One Store may be shared by threads.
    """

    def __init__(self, pool: ConnectionPool[psycopg.Connection[Any]]) -> None:
        self._pool = pool

    @classmethod
    def connect(
        cls, url: str, *, connections: int = 1, timeout: float = DEFAULT_TIMEOUT_SECONDS
    ) -> Store:
        """Connect to URL (a URI or conninfo string) and bring its schema up to date.

        CONNECTIONS: the most open at once (one per thread that uses the store at a time).
        TIMEOUT: how long a call waits for a working connection before it fails.
        """
        pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url,
            min_size=1,
            max_size=connections,
            kwargs={"autocommit": False},
            check=ConnectionPool.check_connection,
            timeout=timeout,
            # Never give up reconnecting: an outage ends when the server is back.
            reconnect_timeout=0,
            open=False,
        )
        # A first connection of its own migrates, so that a bad URL or a server that is
        # not there fails now, with libpq's own message.
        with psycopg.connect(url, autocommit=False) as conn:
            migrate(conn)
        pool.open()
        return cls(pool)

    def close(self) -> None:
        self._pool.close()

    def ping(self, timeout: float | None = None) -> None:
        """Raise unless the database answers (within TIMEOUT, the pool's when None)."""
        with self._transaction(timeout) as cursor:
            cursor.execute("SELECT 1")

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def _transaction(self, timeout: float | None = None) -> Iterator[psycopg.Cursor[Row]]:
        with (
            self._pool.connection(timeout) as conn,
            conn.transaction(),
            conn.cursor(row_factory=dict_row) as cursor,
        ):
            yield cursor

    # Campaigns

    def create_campaign(
        self,
        name: str,
        experiment: str,
        strategy: str,
        profile: str | None,
        branch: str,
        config: Mapping[str, Any],
    ) -> CampaignRecord:
        query = sql.SQL(
            "INSERT INTO campaigns (name, experiment, strategy, profile, branch, config)"
            " VALUES (%s, %s, %s, %s, %s, %s) RETURNING {}"
        ).format(_CAMPAIGN)
        with self._transaction() as cursor:
            try:
                cursor.execute(
                    query, (name, experiment, strategy, profile, branch, Jsonb(dict(config)))
                )
            except psycopg.errors.UniqueViolation:
                raise CampaignExistsError(
                    f"a campaign named {name!r} already exists: choose another name"
                ) from None
            return CampaignRecord(**_one(cursor))

    def get_campaign(self, name: str) -> CampaignRecord | None:
        query = sql.SQL("SELECT {} FROM campaigns WHERE name = %s").format(_CAMPAIGN)
        with self._transaction() as cursor:
            row = cursor.execute(query, (name,)).fetchone()
        return None if row is None else CampaignRecord(**row)

    def latest_campaign(self, experiment: str | None = None) -> CampaignRecord | None:
        """The campaign created last, of EXPERIMENT or of any experiment."""
        query = sql.SQL(
            "SELECT {} FROM campaigns WHERE %(experiment)s::text IS NULL"
            " OR experiment = %(experiment)s ORDER BY id DESC LIMIT 1"
        ).format(_CAMPAIGN)
        with self._transaction() as cursor:
            row = cursor.execute(query, {"experiment": experiment}).fetchone()
        return None if row is None else CampaignRecord(**row)

    def set_campaign_status(
        self, campaign_id: int, status: CampaignState, stop_reason: str | None = None
    ) -> CampaignRecord:
        """Record STATUS; any status but running is an end, stamped with finished_at."""
        query = sql.SQL(
            "UPDATE campaigns SET status = %(status)s, stop_reason = %(stop_reason)s,"
            " updated_at = now(),"
            " finished_at = CASE WHEN %(status)s = 'running' THEN NULL ELSE now() END"
            " WHERE id = %(id)s RETURNING {}"
        ).format(_CAMPAIGN)
        params = {"status": status, "stop_reason": stop_reason, "id": campaign_id}
        with self._transaction() as cursor:
            row = cursor.execute(query, params).fetchone()
            if row is None:
                raise LookupError(f"no campaign with id {campaign_id}")
        return CampaignRecord(**row)

    def rename_campaign(self, campaign_id: int, name: str) -> CampaignRecord:
        """Give the campaign another name (a deleted Campaign frees its name this way)."""
        query = sql.SQL(
            "UPDATE campaigns SET name = %s, updated_at = now() WHERE id = %s RETURNING {}"
        ).format(_CAMPAIGN)
        with self._transaction() as cursor:
            row = cursor.execute(query, (name, campaign_id)).fetchone()
            if row is None:
                raise LookupError(f"no campaign with id {campaign_id}")
        return CampaignRecord(**row)

    # Trials

    def start_trial(
        self,
        campaign_id: int,
        number: int,
        *,
        is_baseline: bool,
        commit: str,
        parent_commit: str | None,
        strategy: str,
        description: str,
        rationale: str = "",
        diff: str = "",
        params: Mapping[str, Any] | None = None,
        usage: Usage = _NO_USAGE,
    ) -> TrialRecord:
        """Record a trial that starts running now."""
        tokens, cost = _usage_columns(usage)
        query = sql.SQL(
            "INSERT INTO trials (campaign_id, number, is_baseline, commit, parent_commit,"
            " strategy, description, rationale, diff, params, usage, cost_usd)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {}"
        ).format(_TRIAL)
        values = (
            campaign_id,
            number,
            is_baseline,
            commit,
            parent_commit,
            strategy,
            description,
            rationale,
            diff,
            Jsonb(dict(params or {})),
            tokens,
            cost,
        )
        with self._transaction() as cursor:
            return _trial(_one(cursor.execute(query, values)))

    def record_skipped(
        self,
        campaign_id: int,
        number: int,
        *,
        parent_commit: str,
        strategy: str,
        skipped: Skipped,
    ) -> TrialRecord:
        """Record a proposal that was given up before it ran: finished, never kept."""
        tokens, cost = _usage_columns(skipped.usage)
        query = sql.SQL(
            "INSERT INTO trials (campaign_id, number, is_baseline, commit, parent_commit,"
            " strategy, description, rationale, usage, cost_usd, status, kept,"
            " decision_reason, message, duration_seconds, finished_at)"
            " VALUES (%s, %s, false, %s, %s, %s, %s, %s, %s, %s, 'skipped', false,"
            " 'skipped: never ran', %s, 0, now()) RETURNING {}"
        ).format(_TRIAL)
        values = (
            campaign_id,
            number,
            parent_commit,  # nothing was committed: the trial stands on its parent
            parent_commit,
            strategy,
            skipped.description,
            skipped.rationale,
            tokens,
            cost,
            skipped.reason,
        )
        with self._transaction() as cursor:
            return _trial(_one(cursor.execute(query, values)))

    def finish_trial(self, trial_id: int, verdict: Verdict, metric_name: str) -> TrialRecord:
        """Record a running trial's verdict, once, with what its runs add up to.

        Its metric is the mean of its successful runs, metric_sd their spread; the exit
        code, message, log tail and metrics are its last counted run's.
        """
        with self._transaction() as cursor:
            # The row lock makes a second, concurrent finisher wait and then see our status.
            current = cursor.execute(
                "SELECT number, status FROM trials WHERE id = %s FOR UPDATE", (trial_id,)
            ).fetchone()
            if current is None:
                raise LookupError(f"no trial with id {trial_id}")
            if current["status"] != "running":
                raise TrialNotRunningError(
                    f"trial #{current['number']} already finished as {current['status']}"
                )
            runs = self._runs(cursor, [trial_id]).get(trial_id, [])
            counted = [run for run in runs if run.view().counted]
            last = counted[-1] if counted else (runs[-1] if runs else None)
            measured = stats([run.metric for run in counted if run.metric is not None])
            # Only successes are kept, and only on their metric: a failed trial shows none.
            success = verdict.status == "success" and measured is not None
            query = sql.SQL(
                "UPDATE trials SET status = %s, kept = %s, decision_reason = %s,"
                " metric_name = %s, metric = %s, metric_sd = %s, run_count = %s,"
                " metrics = %s, peak_vram_mb = %s, exit_code = %s, duration_seconds = %s,"
                " message = %s, log_tail = %s, finished_at = now() WHERE id = %s RETURNING {}"
            ).format(_TRIAL)
            values = (
                verdict.status,
                verdict.kept,
                verdict.reason,
                metric_name,
                measured.mean if success and measured else None,
                measured.sd if success and measured else None,
                len(counted),
                Jsonb(last.metrics if last else {}),
                max(
                    (run.peak_vram_mb for run in runs if run.peak_vram_mb is not None), default=None
                ),
                last.exit_code if last else None,
                math.fsum(run.duration_seconds or 0.0 for run in runs) if runs else None,
                last.message if last else "",
                last.log_tail if last else "",
                trial_id,
            )
            row = _one(cursor.execute(query, values))
            return _trial(row, tuple(runs))

    # Runs

    def start_run(self, trial_id: int, number: int, seed: int | None) -> RunRecord:
        """Record run NUMBER of a trial as running now; if it is recorded already, that run."""
        with self._transaction() as cursor:
            cursor.execute(
                "INSERT INTO runs (trial_id, number, seed) VALUES (%s, %s, %s)"
                " ON CONFLICT (trial_id, number) DO NOTHING",
                (trial_id, number, seed),
            )
            row = cursor.execute(
                sql.SQL("SELECT {} FROM runs WHERE trial_id = %s AND number = %s").format(_RUN),
                (trial_id, number),
            ).fetchone()
        assert row is not None
        return RunRecord(**row)

    def finish_run(
        self, trial_id: int, number: int, report: RunReport, *, pruned: str | None = None
    ) -> RunRecord:
        """Record a running run's report, once. PRUNED: why it was stopped early, if it was."""
        status = "pruned" if pruned is not None else str(report.status)
        query = sql.SQL(
            "UPDATE runs SET status = %s, metric = %s, metrics = %s, peak_vram_mb = %s,"
            " exit_code = %s, duration_seconds = %s, message = %s, log_tail = %s,"
            " finished_at = now() WHERE trial_id = %s AND number = %s RETURNING {}"
        ).format(_RUN)
        success = report.status is RunStatus.SUCCESS and pruned is None
        values = (
            status,
            _finite(report.metric) if success else None,
            Jsonb({name: v for name, v in report.metrics.items() if math.isfinite(v)}),
            _finite(report.peak_vram_mb),
            report.exit_code,
            report.duration_seconds,
            pruned if pruned is not None else report.message,
            report.log_tail,
            trial_id,
            number,
        )
        with self._transaction() as cursor:
            current = cursor.execute(
                "SELECT status FROM runs WHERE trial_id = %s AND number = %s FOR UPDATE",
                (trial_id, number),
            ).fetchone()
            if current is None:
                raise LookupError(f"no run {number} of trial {trial_id}")
            if current["status"] != "running":
                raise RunNotRunningError(f"run {number} already finished as {current['status']}")
            run = RunRecord(**_one(cursor.execute(query, values)))
            self._remeasure(cursor, trial_id)
            return run

    def _remeasure(self, cursor: psycopg.Cursor[Row], trial_id: int) -> None:
        """A decided trial measured again (the best kept one): its mean, spread, run count
        and time take in the new run; its verdict and reason stay what was decided."""
        runs = self._runs(cursor, [trial_id]).get(trial_id, [])
        counted = [run for run in runs if run.view().counted]
        measured = stats([run.metric for run in counted if run.metric is not None])
        cursor.execute(
            "UPDATE trials SET metric = %s, metric_sd = %s, run_count = %s,"
            " duration_seconds = %s WHERE id = %s AND status = 'success' AND metric IS NOT NULL",
            (
                None if measured is None else measured.mean,
                None if measured is None else measured.sd,
                len(counted),
                math.fsum(run.duration_seconds or 0.0 for run in runs),
                trial_id,
            ),
        )

    def mark_running_runs_killed(self, campaign_id: int, message: str) -> list[tuple[int, int]]:
        """End the runs a dead driver left running; return (trial number, run number) of each.

        Their trials stay undecided: they go on with another run.
        """
        with self._transaction() as cursor:
            rows = cursor.execute(
                "UPDATE runs SET status = 'killed', message = %s, finished_at = now()"
                " FROM trials WHERE runs.trial_id = trials.id AND trials.campaign_id = %s"
                " AND runs.status = 'running' RETURNING trials.number, runs.number AS run",
                (message, campaign_id),
            ).fetchall()
        return sorted((row["number"], row["run"]) for row in rows)

    def _runs(
        self, cursor: psycopg.Cursor[Row], trial_ids: list[int]
    ) -> dict[int, list[RunRecord]]:
        query = sql.SQL(
            "SELECT {} FROM runs WHERE trial_id = ANY(%s) ORDER BY trial_id, number"
        ).format(_RUN)
        found: dict[int, list[RunRecord]] = {}
        for row in cursor.execute(query, (trial_ids,)):
            run = RunRecord(**row)
            found.setdefault(run.trial_id, []).append(run)
        return found

    def mark_running_trials_killed(self, campaign_id: int, message: str) -> list[int]:
        """End the trials left running, and their runs; return the trials' numbers.

        Their duration stays unknown: the driver died at some point before this call.
        """
        with self._transaction() as cursor:
            cursor.execute(
                "UPDATE runs SET status = 'killed', message = %s, finished_at = now()"
                " FROM trials WHERE runs.trial_id = trials.id AND trials.campaign_id = %s"
                " AND runs.status = 'running'",
                (message, campaign_id),
            )
            rows = cursor.execute(
                "UPDATE trials SET status = 'killed', kept = false,"
                " decision_reason = 'interrupted before it finished', message = %s,"
                " finished_at = now() WHERE campaign_id = %s AND status = 'running'"
                " RETURNING number",
                (message, campaign_id),
            ).fetchall()
        return sorted(row["number"] for row in rows)

    def trials(self, campaign_id: int) -> list[TrialRecord]:
        """Every trial of the campaign, in number order."""
        query = sql.SQL("SELECT {} FROM trials WHERE campaign_id = %s ORDER BY number").format(
            _TRIAL
        )
        with self._transaction() as cursor:
            rows = cursor.execute(query, (campaign_id,)).fetchall()
            runs = self._runs(cursor, [row["id"] for row in rows])
        return [_trial(row, tuple(runs.get(row["id"], ()))) for row in rows]

    def get_trial(self, campaign_id: int, number: int) -> TrialRecord | None:
        query = sql.SQL("SELECT {} FROM trials WHERE campaign_id = %s AND number = %s").format(
            _TRIAL
        )
        with self._transaction() as cursor:
            row = cursor.execute(query, (campaign_id, number)).fetchone()
            runs = self._runs(cursor, [row["id"]]) if row is not None else {}
        return None if row is None else _trial(row, tuple(runs.get(row["id"], ())))

    def best_trial(self, campaign_id: int, direction: Direction) -> TrialRecord | None:
        """The kept trial with the best metric; the earliest wins a tie.

        DIRECTION comes from the caller (the experiment's objective): the store does
        not interpret a campaign's config.
        """
        query = sql.SQL(
            "SELECT {} FROM trials WHERE campaign_id = %s AND kept"
            " ORDER BY metric {}, number LIMIT 1"
        ).format(_TRIAL, _ORDER[direction])
        with self._transaction() as cursor:
            row = cursor.execute(query, (campaign_id,)).fetchone()
            runs = self._runs(cursor, [row["id"]]) if row is not None else {}
        return None if row is None else _trial(row, tuple(runs.get(row["id"], ())))

    # Activity: the time a campaign was driven

    def begin_activity(self, campaign_id: int) -> int:
        """Record that a driver takes the campaign up now; the stretch's id."""
        with self._transaction() as cursor:
            row = cursor.execute(
                "INSERT INTO campaign_activity (campaign_id) VALUES (%s) RETURNING id",
                (campaign_id,),
            ).fetchone()
        assert row is not None
        return int(row["id"])

    def touch_activity(self, stretches: Sequence[int]) -> None:
        """The driver is still at it: the STRETCHES last until now."""
        if not stretches:
            return
        with self._transaction() as cursor:
            cursor.execute(
                "UPDATE campaign_activity SET seen_at = greatest(seen_at, now())"
                " WHERE id = ANY(%s)",
                (list(stretches),),
            )

    def active_seconds(self, campaign_id: int) -> float:
        """The seconds the campaign was driven, over every stretch."""
        with self._transaction() as cursor:
            row = cursor.execute(
                "SELECT coalesce(sum(extract(epoch FROM seen_at - started_at)), 0) AS seconds"
                " FROM campaign_activity WHERE campaign_id = %s",
                (campaign_id,),
            ).fetchone()
        assert row is not None
        return float(row["seconds"])

    # Progress

    def add_progress(self, trial_id: int, run: int, items: Sequence[Progress]) -> None:
        """Record progress lines of a run; a step seen again replaces the earlier values."""
        if not items:
            return
        with self._transaction() as cursor:
            cursor.executemany(
                "INSERT INTO trial_progress"
                " (trial_id, run, step, loss, tokens_per_second, percent_done, seconds_left)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (trial_id, run, step) DO UPDATE SET loss = excluded.loss,"
                " tokens_per_second = excluded.tokens_per_second,"
                " percent_done = excluded.percent_done, seconds_left = excluded.seconds_left,"
                " recorded_at = now()",
                [
                    (
                        trial_id,
                        run,
                        item.step,
                        item.loss,
                        item.tokens_per_second,
                        item.percent_done,
                        item.seconds_left,
                    )
                    for item in items
                ],
            )

    def progress(self, trial_id: int, run: int = 1) -> list[Progress]:
        """The progress of a trial's run, in step order."""
        with self._transaction() as cursor:
            rows = cursor.execute(
                "SELECT step, loss, tokens_per_second, percent_done, seconds_left"
                " FROM trial_progress WHERE trial_id = %s AND run = %s ORDER BY step",
                (trial_id, run),
            ).fetchall()
        return [Progress(**row) for row in rows]


def _usage_columns(usage: Usage) -> tuple[Jsonb, float]:
    """The usage column (token counts) and the cost_usd column."""
    tokens = asdict(usage)
    cost: float = tokens.pop("cost_usd")
    return Jsonb(tokens), cost


def _one(cursor: psycopg.Cursor[Row]) -> Row:
    row = cursor.fetchone()
    if row is None:
        raise RuntimeError("the statement returned no row")
    return row


def _trial(row: Row, runs: tuple[RunRecord, ...] = ()) -> TrialRecord:
    usage = Usage(**row.pop("usage"), cost_usd=row.pop("cost_usd"))
    return TrialRecord(**row, usage=usage, runs=runs)


def _finite(value: float | None) -> float | None:
    # JSON and best_trial's ordering have no use for NaN or infinities.
    return value if value is not None and math.isfinite(value) else None
