"""The store against a real PostgreSQL, and the embedded server's life cycle."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import psutil
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from skylab.activity import ActivityClock
from skylab.engine import Verdict
from skylab.errors import UserError
from skylab.store import (
    CampaignExistsError,
    CampaignRecord,
    RunNotRunningError,
    Store,
    TrialNotRunningError,
    open_database,
)
from skylab.store.embedded import embedded_postgres
from skylab.store.migrate import MigrationError, available, migrate
from skylab.store.url import URL_VARIABLE
from skylab.strategies.base import Skipped, Usage
from skylab_trainer.progress import Progress
from skylab_trainer.report import RunReport, RunStatus


def _campaign(
    store: Store, name: str = "nanochat-1", experiment: str = "nanochat"
) -> CampaignRecord:
    return store.create_campaign(
        name, experiment, "sweep", None, f"skylab/{name}", {"direction": "minimize"}
    )


def _start(store: Store, campaign_id: int, number: int) -> int:
    trial = store.start_trial(
        campaign_id,
        number,
        is_baseline=number == 1,
        commit=f"{number:040x}",
        parent_commit=None,
        strategy="sweep",
        description=f"trial {number}",
    )
    return trial.id


def _report(status: RunStatus = RunStatus.SUCCESS, metric: float | None = 1.0) -> RunReport:
    return RunReport(status=status, metric_name="val_bpb", metric=metric)


def _runs(store: Store, trial_id: int, *reports: RunReport) -> None:
    """Run the trial once for each report."""
    for number, report in enumerate(reports, start=1):
        store.start_run(trial_id, number, seed=41 + number)
        store.finish_run(trial_id, number, report)


def _verdict(kept: bool, reason: str = "", status: str = "success") -> Verdict:
    return Verdict(kept, reason, status)


def _finish(store: Store, campaign_id: int, number: int, metric: float, kept: bool) -> None:
    trial_id = _start(store, campaign_id, number)
    _runs(store, trial_id, _report(metric=metric))
    store.finish_trial(trial_id, _verdict(kept), "val_bpb")


# Migrations


def _recorded_migrations(url: str) -> list[tuple[int, str, datetime]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT version, name, applied_at FROM schema_migrations ORDER BY 1")
        return rows.fetchall()


def test_migrations_apply_once(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        assert migrate(conn) == available()
    recorded = _recorded_migrations(database_url)

    with psycopg.connect(database_url) as conn:
        assert migrate(conn) == []
    Store.connect(database_url).close()

    assert _recorded_migrations(database_url) == recorded
    assert [(version, name) for version, name, _ in recorded] == [
        (migration.version, migration.name) for migration in available()
    ]
    assert available()[0].name == "initial"


def test_trials_recorded_before_runs_existed_become_their_run_one(database_url: str) -> None:
    before_runs = [m for m in available() if m.version < 3]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        for migration in before_runs:
            conn.execute(migration.sql.encode())
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
        conn.execute(
            "INSERT INTO campaigns (name, experiment, strategy, branch)"
            " VALUES ('old', 'x', 's', 'b')"
        )
        for number, status, kept, metric in [
            (1, "success", True, 1.0),
            (2, "crash", False, None),
            (3, "skipped", False, None),
            (4, "running", None, None),
        ]:
            finished = "NULL" if status == "running" else "now()"
            conn.execute(
                "INSERT INTO trials (campaign_id, number, is_baseline, commit, strategy,"
                f" description, status, kept, metric, exit_code, finished_at) SELECT id, %s,"
                f" %s = 1, 'c', 's', 'd', %s, %s, %s, 3, {finished} FROM campaigns",
                (number, number, status, kept, metric),
            )
    with Store.connect(database_url) as store:  # migrates the rest
        campaign = store.get_campaign("old")
        assert campaign is not None
        trials = store.trials(campaign.id)
    assert [[(r.number, r.status, r.metric, r.exit_code) for r in t.runs] for t in trials] == [
        [(1, "success", 1.0, 3)],
        [(1, "crash", None, 3)],
        [],  # a skipped proposal never ran
        [(1, "running", None, 3)],
    ]
    assert [t.run_count for t in trials] == [1, 1, 0, 0]
    with Store.connect(database_url) as store:
        # What it spent before activity was recorded: from its first trial to its last end.
        first, last = trials[0].created_at, max(t.finished_at or t.created_at for t in trials)
        spent = store.active_seconds(campaign.id)
        assert spent == pytest.approx((last - first).total_seconds(), abs=1e-3)
    with psycopg.connect(database_url) as conn:
        assert migrate(conn) == []  # and applied once


def test_concurrent_migrations_apply_each_file_once(database_url: str) -> None:
    start = threading.Barrier(3)
    errors: list[BaseException] = []

    def connect() -> None:
        start.wait()
        try:
            Store.connect(database_url).close()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=connect) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len(_recorded_migrations(database_url)) == len(available())


def test_a_newer_schema_is_refused(database_url: str) -> None:
    Store.connect(database_url).close()
    with psycopg.connect(database_url) as conn:
        conn.execute("INSERT INTO schema_migrations (version, name) VALUES (9999, 'future')")

    with pytest.raises(MigrationError, match="upgrade skylab"):
        Store.connect(database_url)


# Campaigns


def test_campaigns_are_created_and_found(store: Store) -> None:
    config = {"direction": "minimize", "budget": {"trials": 10}, "tags": ["a", "b"]}
    first = store.create_campaign("gpt-1", "nanochat", "llm", "h100", "skylab/gpt-1", config)
    second = store.create_campaign("sweep-1", "nanochat", "sweep", None, "skylab/sweep-1", {})
    other = store.create_campaign("mnist-1", "mnist", "sweep", None, "skylab/mnist-1", {})

    assert (first.name, first.experiment, first.strategy, first.profile) == (
        "gpt-1",
        "nanochat",
        "llm",
        "h100",
    )
    assert (first.branch, first.config, first.status) == ("skylab/gpt-1", config, "running")
    assert first.stop_reason is None and first.finished_at is None
    assert store.get_campaign("gpt-1") == first
    assert store.get_campaign("nope") is None
    assert store.latest_campaign("nanochat") == second
    assert store.latest_campaign("mnist") == other
    assert store.latest_campaign() == other
    assert store.latest_campaign("cifar") is None


def test_a_duplicate_campaign_name_is_a_clear_error(store: Store) -> None:
    _campaign(store, "same")

    with pytest.raises(CampaignExistsError, match="'same' already exists") as raised:
        _campaign(store, "same", experiment="other")
    assert isinstance(raised.value, UserError)
    # The failed insert was rolled back: the connection goes on working.
    assert store.get_campaign("same") is not None
    assert store.latest_campaign("other") is None


def test_campaign_status_stamps_the_end(store: Store) -> None:
    campaign = _campaign(store)

    stopped = store.set_campaign_status(campaign.id, "interrupted", "ctrl-c")
    assert (stopped.status, stopped.stop_reason) == ("interrupted", "ctrl-c")
    assert stopped.finished_at is not None
    assert stopped.updated_at >= campaign.updated_at

    resumed = store.set_campaign_status(campaign.id, "running")
    assert (resumed.status, resumed.stop_reason, resumed.finished_at) == ("running", None, None)

    done = store.set_campaign_status(campaign.id, "succeeded", "budget_spent")
    assert done.finished_at is not None
    assert store.get_campaign(campaign.name) == done

    with pytest.raises(LookupError):
        store.set_campaign_status(campaign.id + 100, "failed")


def test_a_renamed_campaign_frees_its_name(store: Store) -> None:
    old = _campaign(store, "default/demo")
    renamed = store.rename_campaign(old.id, "default/demo@1234abcd")
    assert (renamed.id, renamed.name) == (old.id, "default/demo@1234abcd")
    assert store.get_campaign("default/demo") is None
    assert _campaign(store, "default/demo").id != old.id
    with pytest.raises(LookupError):
        store.rename_campaign(old.id + 100, "x")


# Trials


def test_a_trial_is_found_by_its_number(store: Store) -> None:
    campaign = _campaign(store)
    trial_id = _start(store, campaign.id, 3)
    found = store.get_trial(campaign.id, 3)
    assert found is not None and (found.id, found.number) == (trial_id, 3)
    assert store.get_trial(campaign.id, 4) is None


def test_a_skipped_proposal_is_a_finished_trial_that_keeps_its_usage(store: Store) -> None:
    campaign = _campaign(store)
    _finish(store, campaign.id, 1, 1.0, kept=True)
    usage = Usage(10, 20, 30, 40, 0.25)
    skipped = Skipped("LR 0.2", "You made no change", "I tried", usage)
    row = store.record_skipped(
        campaign.id, 2, parent_commit=f"{1:040x}", strategy="llm", skipped=skipped
    )
    assert (row.status, row.kept, row.finished_at is not None) == ("skipped", False, True)
    assert (row.commit, row.parent_commit) == (f"{1:040x}", f"{1:040x}")
    assert (row.description, row.message, row.rationale) == (
        "LR 0.2",
        "You made no change",
        "I tried",
    )
    assert row.usage == usage and row.past().usage == usage
    assert store.mark_running_trials_killed(campaign.id, "stopped") == []
    with pytest.raises(psycopg.errors.UniqueViolation):
        _start(store, campaign.id, 2)


def test_a_trial_round_trips_every_field(store: Store, database_url: str) -> None:
    campaign = _campaign(store)
    usage = Usage(
        input_tokens=1200,
        output_tokens=340,
        cache_read_tokens=5000,
        cache_write_tokens=70,
        cost_usd=0.0421,
    )
    started = store.start_trial(
        campaign.id,
        2,
        is_baseline=False,
        commit="c" * 40,
        parent_commit="p" * 40,
        strategy="llm",
        description="raise the learning rate",
        rationale="the loss curve is still steep",
        diff="-LR = 0.02\n+LR = 0.04\n",
        params={"LR": 0.04, "DEPTH": 8},
        usage=usage,
    )
    assert started.campaign_id == campaign.id
    assert (started.number, started.is_baseline, started.status) == (2, False, "running")
    assert (started.commit, started.parent_commit) == ("c" * 40, "p" * 40)
    assert (started.strategy, started.description) == ("llm", "raise the learning rate")
    assert started.rationale == "the loss curve is still steep"
    assert started.diff == "-LR = 0.02\n+LR = 0.04\n"
    assert started.params == {"LR": 0.04, "DEPTH": 8}
    assert started.usage == usage
    assert (started.kept, started.metric_name, started.metric, started.finished_at) == (
        None,
        None,
        None,
        None,
    )
    assert (started.decision_reason, started.message, started.log_tail) == ("", "", "")
    assert started.metrics == {} and started.peak_vram_mb is None
    assert started.exit_code is None and started.duration_seconds is None
    assert (started.runs, started.run_count, started.metric_sd) == ((), 0, None)

    def report(metric: float, vram: float, seconds: float) -> RunReport:
        return RunReport(
            status=RunStatus.SUCCESS,
            metric_name="val_bpb",
            metric=metric,
            metrics={"val_bpb": metric, "peak_vram_mb": vram, "mfu": 39.7},
            exit_code=0,
            duration_seconds=seconds,
            message="done",
            log_tail=f"val_bpb: {metric:.6f}\n",
        )

    _runs(store, started.id, report(0.99, 45060.2, 302.5), report(0.98, 45100.0, 301.0))
    store.start_run(started.id, 3, seed=44)
    assert store.mark_running_runs_killed(campaign.id, "skylab stopped") == [(2, 3)]
    store.start_run(started.id, 4, seed=44)
    store.finish_run(started.id, 4, report(0.97, 45000.0, 300.0))
    finished = store.finish_trial(started.id, _verdict(True, "kept: 0.98 ± 0.01 (n=3)"), "val_bpb")

    assert finished == replace(
        started,
        status="success",
        kept=True,
        decision_reason="kept: 0.98 ± 0.01 (n=3)",
        metric_name="val_bpb",
        metric=pytest.approx(0.98),
        metric_sd=pytest.approx(0.01),
        run_count=3,  # the interrupted run is not counted
        metrics={"val_bpb": 0.97, "peak_vram_mb": 45000.0, "mfu": 39.7},  # the last run's
        peak_vram_mb=45100.0,  # the most any run used
        exit_code=0,
        duration_seconds=pytest.approx(903.5),
        message="done",
        log_tail="val_bpb: 0.970000\n",
        finished_at=finished.finished_at,
        runs=finished.runs,
    )
    assert [(r.number, r.seed, r.status, r.metric) for r in finished.runs] == [
        (1, 42, "success", 0.99),
        (2, 43, "success", 0.98),
        (3, 44, "killed", None),
        (4, 44, "success", 0.97),
    ]
    assert finished.runs[2].message == "skylab stopped" and finished.runs[2].finished_at
    assert finished.finished_at is not None and finished.finished_at >= finished.started_at
    # Committed: a second connection reads the same record.
    with Store.connect(database_url) as other:
        assert other.trials(campaign.id) == [finished]
        assert other.get_trial(campaign.id, 2) == finished


def test_non_finite_values_are_not_stored(store: Store) -> None:
    campaign = _campaign(store)
    trial_id = _start(store, campaign.id, 1)
    report = RunReport(
        status=RunStatus.CRASH,
        metric_name="val_bpb",
        metric=float("nan"),
        metrics={"val_bpb": float("nan"), "peak_vram_mb": 100.0},
    )
    _runs(store, trial_id, report)

    finished = store.finish_trial(trial_id, _verdict(False, "crash", "crash"), "val_bpb")

    assert finished.metric is None and finished.runs[0].metric is None
    assert finished.metrics == {"peak_vram_mb": 100.0}


def test_a_trial_and_each_run_are_finished_once(store: Store) -> None:
    campaign = _campaign(store)
    trial_id = _start(store, campaign.id, 1)
    _runs(store, trial_id, _report(metric=1.0))
    with pytest.raises(RunNotRunningError, match="run 1 already finished as success"):
        store.finish_run(trial_id, 1, _report(RunStatus.CRASH, None))
    assert store.start_run(trial_id, 1, seed=7).seed == 42  # recorded already: that one
    first = store.finish_trial(trial_id, _verdict(True, "baseline"), "val_bpb")

    with pytest.raises(TrialNotRunningError, match="#1 already finished as success"):
        store.finish_trial(trial_id, _verdict(False, "again", "crash"), "val_bpb")
    assert store.trials(campaign.id) == [first]

    with pytest.raises(LookupError):
        store.finish_trial(trial_id + 100, _verdict(False), "val_bpb")
    with pytest.raises(LookupError):
        store.finish_run(trial_id, 9, _report())


def test_a_kept_trial_measured_again_takes_each_run_into_its_mean_not_its_verdict(
    store: Store,
) -> None:
    campaign = _campaign(store)
    trial_id = _start(store, campaign.id, 1)
    _runs(store, trial_id, _report(metric=1.0), _report(metric=1.02), _report(metric=0.98))
    kept = store.finish_trial(trial_id, _verdict(True, "baseline: 1.0 (n=3)"), "val_bpb")
    store.start_run(trial_id, 4, seed=45)
    running = store.get_trial(campaign.id, 1)
    assert running is not None and running.metric == kept.metric  # a run going adds nothing
    store.finish_run(trial_id, 4, _report(metric=1.04))
    store.start_run(trial_id, 5, seed=46)
    store.finish_run(trial_id, 5, _report(RunStatus.CRASH, None))
    again = store.get_trial(campaign.id, 1)
    assert again is not None
    assert (again.status, again.kept, again.decision_reason) == (
        "success",
        True,
        kept.decision_reason,
    )
    assert again.metric == pytest.approx(1.01)  # the mean of its four successful runs
    assert again.metric_sd == pytest.approx(0.0258199, abs=1e-6)
    assert again.run_count == 5  # the crash counts as a run, not in the mean
    assert again.finished_at == kept.finished_at


def test_a_pruned_run_keeps_why_and_no_metric(store: Store) -> None:
    campaign = _campaign(store)
    trial_id = _start(store, campaign.id, 2)
    store.start_run(trial_id, 1, seed=42)
    run = store.finish_run(
        trial_id, 1, _report(RunStatus.KILLED, None), pruned="loss 4.1 above the best's 3.9"
    )
    assert (run.status, run.metric, run.message) == (
        "pruned",
        None,
        "loss 4.1 above the best's 3.9",
    )
    trial = store.finish_trial(trial_id, _verdict(False, "run 1 pruned", "pruned"), "val_bpb")
    assert (trial.status, trial.kept, trial.metric, trial.run_count) == ("pruned", False, None, 1)


def test_a_failed_finish_leaves_the_trial_untouched(store: Store) -> None:
    campaign = _campaign(store)
    trial_id = _start(store, campaign.id, 1)
    # It printed its metric, then hung until it was killed.
    timed_out = RunReport(
        status=RunStatus.TIMEOUT,
        metric_name="val_bpb",
        metric=0.99,
        exit_code=-9,
        message="outlived its wall time",
        log_tail="val_bpb: 0.990000",
    )
    _runs(store, trial_id, timed_out)
    [running] = store.trials(campaign.id)

    # Only a success can be kept: the database refuses, and writes nothing.
    with pytest.raises(psycopg.errors.CheckViolation, match=r"only_successes|have_a_metric"):
        store.finish_trial(trial_id, _verdict(True, "wrongly kept", "timeout"), "val_bpb")
    assert store.trials(campaign.id) == [running]

    finished = store.finish_trial(trial_id, _verdict(False, "never kept", "timeout"), "val_bpb")
    assert (finished.status, finished.kept, finished.metric, finished.log_tail) == (
        "timeout",
        False,
        None,  # a failed trial has no mean
        "val_bpb: 0.990000",
    )


def test_a_kept_trial_needs_a_metric(store: Store) -> None:
    campaign = _campaign(store)
    trial_id = _start(store, campaign.id, 1)
    _runs(store, trial_id, _report(metric=float("inf")))

    with pytest.raises(psycopg.errors.CheckViolation, match="kept_trials_have_a_metric"):
        store.finish_trial(trial_id, _verdict(True, "baseline"), "val_bpb")
    assert store.trials(campaign.id)[0].status == "running"


def test_trial_numbers_are_unique_per_campaign(store: Store) -> None:
    first = _campaign(store, "one")
    second = _campaign(store, "two")
    _start(store, first.id, 1)
    _start(store, second.id, 1)

    with pytest.raises(psycopg.errors.UniqueViolation):
        _start(store, first.id, 1)
    assert [trial.number for trial in store.trials(first.id)] == [1]


def test_running_trials_are_marked_killed(store: Store) -> None:
    campaign = _campaign(store)
    other = _campaign(store, "other")
    _finish(store, campaign.id, 1, 1.0, kept=True)
    for number in (3, 2):
        _start(store, campaign.id, number)
    _start(store, other.id, 1)

    assert store.mark_running_trials_killed(campaign.id, "the driver was killed") == [2, 3]

    trials = store.trials(campaign.id)
    assert [trial.number for trial in trials] == [1, 2, 3]
    assert trials[0].status == "success"
    for trial in trials[1:]:
        assert (trial.status, trial.kept, trial.message) == (
            "killed",
            False,
            "the driver was killed",
        )
        assert trial.finished_at is not None and trial.duration_seconds is None
    assert store.trials(other.id)[0].status == "running"
    assert store.mark_running_trials_killed(campaign.id, "again") == []


def test_a_killed_trials_running_run_is_killed_with_it(store: Store) -> None:
    campaign = _campaign(store)
    trial_id = _start(store, campaign.id, 1)
    _runs(store, trial_id, _report(metric=1.0))
    store.start_run(trial_id, 2, seed=43)
    assert store.mark_running_trials_killed(campaign.id, "the Campaign was deleted") == [1]
    [trial] = store.trials(campaign.id)
    assert [(run.number, run.status) for run in trial.runs] == [(1, "success"), (2, "killed")]


def test_best_trial_follows_the_direction(store: Store) -> None:
    campaign = _campaign(store)
    assert store.best_trial(campaign.id, "minimize") is None
    for number, metric, kept in [(1, 1.0, True), (2, 0.5, False), (3, 0.9, True), (4, 0.9, True)]:
        _finish(store, campaign.id, number, metric, kept)
    _start(store, campaign.id, 5)

    lowest = store.best_trial(campaign.id, "minimize")
    highest = store.best_trial(campaign.id, "maximize")

    assert lowest is not None and (lowest.number, lowest.metric) == (3, 0.9)  # first of a tie
    assert highest is not None and (highest.number, highest.metric) == (1, 1.0)


# Progress


def test_progress_is_upserted_by_step_for_each_run(store: Store) -> None:
    campaign = _campaign(store)
    trial_id = _start(store, campaign.id, 1)
    other_id = _start(store, campaign.id, 2)

    store.add_progress(trial_id, 1, [Progress(2, 4.0, 1e6, 2.0, 290.0), Progress(1, 5.0)])
    store.add_progress(trial_id, 1, [Progress(2, 3.5, 1.1e6, 2.5, 288.0), Progress(3, 3.0)])
    store.add_progress(trial_id, 2, [Progress(1, 6.0)])
    store.add_progress(other_id, 1, [Progress(1, 9.0)])
    store.add_progress(other_id, 1, [])

    assert store.progress(trial_id, 1) == [
        Progress(1, 5.0),
        Progress(2, 3.5, 1.1e6, 2.5, 288.0),
        Progress(3, 3.0),
    ]
    assert store.progress(trial_id, 2) == [Progress(1, 6.0)]
    assert store.progress(other_id) == [Progress(1, 9.0)]


def test_a_failed_progress_batch_stores_none_of_it(store: Store) -> None:
    campaign = _campaign(store)
    trial_id = _start(store, campaign.id, 1)
    store.add_progress(trial_id, 1, [Progress(1, 5.0)])

    batch = [Progress(1, 4.0), Progress(2, 3.0), Progress(2**31, 2.0)]  # beyond integer
    with pytest.raises(psycopg.errors.NumericValueOutOfRange):
        store.add_progress(trial_id, 1, batch)

    assert store.progress(trial_id) == [Progress(1, 5.0)]


def test_deleting_a_campaign_deletes_its_trials(store: Store, database_url: str) -> None:
    campaign = _campaign(store)
    trial_id = _start(store, campaign.id, 1)
    _runs(store, trial_id, _report())
    store.add_progress(trial_id, 1, [Progress(1, 5.0)])

    with psycopg.connect(database_url) as conn:
        conn.execute("DELETE FROM campaigns WHERE id = %s", (campaign.id,))

    assert store.trials(campaign.id) == []
    assert store.progress(trial_id) == []


# The embedded server


def _insert(url: str, value: str) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS notes (value text)")
        conn.execute("INSERT INTO notes VALUES (%s)", (value,))


def _notes(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [value for (value,) in conn.execute("SELECT value FROM notes")]


def _refused(url: str) -> bool:
    try:
        psycopg.connect(url, connect_timeout=5).close()
    except psycopg.OperationalError:
        return True
    return False


def _lock_file(data_dir: Path) -> Path:
    return data_dir / "data" / "postmaster.pid"


def test_embedded_server_stops_and_keeps_its_data(embedded_data_dir: Path) -> None:
    with embedded_postgres(embedded_data_dir) as url, psycopg.connect(url) as conn:
        assert conn.info.dbname == "skylab"
        _insert(url, "before the stop")
    assert _refused(url)
    assert not _lock_file(embedded_data_dir).exists()

    with embedded_postgres(embedded_data_dir) as url:
        assert "before the stop" in _notes(url)


def test_embedded_server_is_shared_until_the_last_user_leaves(embedded_data_dir: Path) -> None:
    # A user that died without leaving is no reason to keep the server running.
    (embedded_data_dir / "users" / f"{2**31 - 1}.dead").touch()
    with embedded_postgres(embedded_data_dir) as outer:
        with embedded_postgres(embedded_data_dir) as inner:
            assert inner == outer
        assert not _refused(outer)
    assert _refused(outer)
    assert list((embedded_data_dir / "users").iterdir()) == []


def test_embedded_server_recovers_from_a_killed_server(embedded_data_dir: Path) -> None:
    with embedded_postgres(embedded_data_dir) as url:
        _insert(url, "before the kill")
        postmaster = psutil.Process(int(_lock_file(embedded_data_dir).read_text().split()[0]))
        postmaster.send_signal(signal.SIGKILL)
        postmaster.wait(10)
    assert _refused(url)
    assert _lock_file(embedded_data_dir).exists()  # stale, left by the killed server

    with embedded_postgres(embedded_data_dir) as url:
        assert "before the kill" in _notes(url)


def test_embedded_server_recovers_from_a_reused_pid(embedded_data_dir: Path) -> None:
    with embedded_postgres(embedded_data_dir) as url:
        _insert(url, "before the reboot")
        lines = _lock_file(embedded_data_dir).read_text().splitlines()
    # After a reboot, the PID in the lock files belongs to another process.
    with subprocess.Popen(["sleep", "60"]) as other:
        try:
            stale = "\n".join([str(other.pid), *lines[1:]]) + "\n"
            _lock_file(embedded_data_dir).write_text(stale)
            (Path(lines[4]) / f".s.PGSQL.{lines[3]}.lock").write_text(stale)

            with embedded_postgres(embedded_data_dir) as url:
                assert "before the reboot" in _notes(url)
        finally:
            other.kill()


def test_open_database_prefers_a_configured_url(
    embedded_data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(URL_VARIABLE, "postgresql:///from-env")
    with open_database("postgresql:///explicit", embedded_data_dir) as url:
        assert url == "postgresql:///explicit"
    with open_database(None, embedded_data_dir) as url:
        assert url == "postgresql:///from-env"
    assert not _lock_file(embedded_data_dir).exists()

    monkeypatch.delenv(URL_VARIABLE)
    with open_database(None, embedded_data_dir) as url, Store.connect(url) as store:
        assert store.latest_campaign() is None
    assert _refused(url)


def test_connections_the_server_dropped_are_replaced_without_an_error(
    store: Store, database_url: str
) -> None:
    campaign = _campaign(store)
    dbname = conninfo_to_dict(database_url)["dbname"]
    with psycopg.connect(database_url, autocommit=True) as admin:
        ended = admin.execute(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        ).fetchone()
    assert ended is not None and ended[0] >= 1  # the store's connection, as a restart would
    assert store.get_campaign(campaign.name) == campaign  # a new connection, no error


def test_a_campaigns_budget_is_the_sum_of_its_stretches_of_activity(store: Store) -> None:
    campaign = _campaign(store)
    assert store.active_seconds(campaign.id) == 0.0
    first = store.begin_activity(campaign.id)
    time.sleep(0.4)
    store.touch_activity([first])
    time.sleep(0.6)  # the driver died: no stamp, nothing spent
    second = store.begin_activity(campaign.id)
    time.sleep(0.3)
    store.touch_activity([second])
    spent = store.active_seconds(campaign.id)
    assert 0.7 <= spent < 0.95, spent
    other = _campaign(store, "other")
    assert store.active_seconds(other.id) == 0.0  # one campaign's time is its own


def test_the_activity_clock_counts_driven_time_only(store: Store) -> None:
    campaign = _campaign(store)
    clock = ActivityClock(lambda: store, stamp_seconds=0.1).run()
    try:
        clock.start(campaign.id)
        clock.start(campaign.id)  # once: the open stretch goes on
        time.sleep(0.5)
        assert 0.4 <= store.active_seconds(campaign.id) < 0.6  # stamped by its thread
        clock.stop(campaign.id)
        time.sleep(0.5)  # suspended
        assert 0.45 <= clock.elapsed(campaign.id) < 0.6
        clock.start(campaign.id)
        time.sleep(0.2)
        assert 0.65 <= clock.elapsed(campaign.id) < 0.85
    finally:
        clock.close()
