"""The trainer's pieces in isolation: line splitting, the summary block, report files."""

from __future__ import annotations

import io
import os
import re
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from skylab_trainer import supervise
from skylab_trainer.cli import parse_config
from skylab_trainer.output import MAX_LINE_CHARS, TAIL_LINES, LineSplitter, OutputSink
from skylab_trainer.report import RunReport, RunStatus, write_report
from skylab_trainer.summary import find_metric, parse_summary

DEFAULT_PATTERN = re.compile(r"^val_bpb:\s+([-+0-9.eE]+)", re.MULTILINE)


def split_all(*chunks: bytes) -> list[str]:
    splitter = LineSplitter()
    lines = [line for chunk in chunks for line in splitter.feed(chunk)]
    return lines + splitter.close()


def test_carriage_return_redraws_become_lines() -> None:
    assert split_all(b"start\n\rstep 1\rstep 2\rstep 3\ndone\n") == [
        "start",
        "step 1",
        "step 2",
        "step 3",
        "done",
    ]


def test_crlf_split_across_reads_is_one_line_end() -> None:
    assert split_all(b"a\r", b"\nb\r\n\n") == ["a", "b", ""]


def test_a_line_is_held_until_its_end_arrives() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b"step 1 | lo") == []
    assert splitter.feed(b"ss 2\nnext") == ["step 1 | loss 2"]
    assert splitter.close() == ["next"]


def test_utf8_split_across_reads_is_decoded_whole() -> None:
    encoded = "loss ↓ 3.2\n".encode()
    cut = encoded.index("↓".encode()) + 1
    assert split_all(encoded[:cut], encoded[cut:]) == ["loss ↓ 3.2"]


def test_endless_line_is_cut_into_bounded_pieces() -> None:
    length = MAX_LINE_CHARS * 2 + 10
    chunks = [b"y" * 1000 for _ in range(length // 1000)] + [b"y" * (length % 1000), b"\n"]

    lines = split_all(*chunks)

    assert [len(line) for line in lines] == [MAX_LINE_CHARS, MAX_LINE_CHARS, 10]


def test_sink_keeps_a_bounded_tail_and_survives_a_closed_stdout(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody reads our stdout any more
    log = tmp_path / "out.log"
    with os.fdopen(write_end, "wb", buffering=0) as echo:
        sink = OutputSink(echo, log)
        for i in range(TAIL_LINES + 5):
            sink.write(f"line {i}\n".encode())
        sink.close()

    assert len(sink.tail) == TAIL_LINES
    assert sink.tail[-1] == f"line {TAIL_LINES + 4}"
    assert log.read_text().count("\n") == TAIL_LINES + 5


def test_sink_survives_a_full_disk_under_the_log() -> None:
    echo = io.BytesIO()
    sink = OutputSink(echo, Path("/dev/full"))  # every write fails with ENOSPC

    sink.write(b"one\ntwo\n")
    sink.write(b"three\n")
    sink.close()

    assert echo.getvalue() == b"one\ntwo\nthree\n"
    assert list(sink.tail) == ["one", "two", "three"]


def test_summary_is_the_block_after_the_last_separator() -> None:
    lines = [
        "---",
        "val_bpb: 9.0",  # an earlier block, superseded
        "step 00100 | loss 3.1",
        "---",
        "val_bpb:          0.997900",
        "peak_vram_mb:     45060.2",
        "num_steps:        953",
        "note:             not-a-number",
        "free text without a colon",
    ]

    assert parse_summary(lines) == {"val_bpb": 0.9979, "peak_vram_mb": 45060.2, "num_steps": 953.0}


def test_no_separator_means_no_summary() -> None:
    assert parse_summary(["val_bpb: 1.0", "-- -", "----"]) == {}


def test_metric_pattern_takes_the_last_match() -> None:
    text = "val_bpb: 1.5\nsomething\nval_bpb:   1.25\nnot val_bpb: 0.1"

    assert find_metric(text, DEFAULT_PATTERN) == "1.25"
    assert find_metric("val_loss: 2.0", DEFAULT_PATTERN) is None


def test_report_replaces_a_regular_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    path.write_text("stale")
    report = RunReport(status=RunStatus.SUCCESS, metric_name="val_bpb", metric=1.0)

    write_report(report, path)

    assert RunReport.from_json(path.read_text()) == report
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp file left


def test_report_is_written_into_a_special_file_in_place(tmp_path: Path) -> None:
    # Like /dev/termination-log, a FIFO must be written to, never renamed over.
    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    report = RunReport(status=RunStatus.CRASH, metric_name="val_bpb", message="boom")

    write_report(report, fifo)
    reader.join(timeout=10)

    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert [RunReport.from_json(text) for text in received] == [report]


@pytest.mark.parametrize("log_lines", [10, 100_000])
def test_report_json_fits_the_termination_message_keeping_the_end(log_lines: int) -> None:
    tail = "\n".join(f"line {i} " + "x" * 60 for i in range(log_lines))
    report = RunReport(status=RunStatus.CRASH, metric_name="val_bpb", log_tail=tail)

    text = report.to_json()

    assert len(text.encode()) <= 4096
    kept = RunReport.from_json(text).log_tail
    assert kept == tail if log_lines == 10 else len(kept) > 2000
    assert tail.endswith(kept)


def test_flags_override_env_and_an_empty_variable_is_unset(tmp_path: Path) -> None:
    env = {
        "SKYLAB_WORKDIR": str(tmp_path),
        "SKYLAB_COMMAND": "python train.py",
        "SKYLAB_MAX_WALL_TIME": "600",
        "SKYLAB_TIME_BUDGET": "",
        "SKYLAB_METRIC_NAME": "val_loss",
        "SKYLAB_REPORT_PATH": str(tmp_path / "from-env.json"),
    }
    argv = ["run", "--max-wall-time", "90", "--kill-grace", "0", "--env", "A=b=c"]

    config, report_path = parse_config(argv, env)

    assert config.workdir == tmp_path
    assert config.command == "python train.py"
    assert (config.limits.max_wall_time, config.limits.kill_grace) == (90.0, 0.0)
    assert config.time_budget is None
    assert config.metric_pattern.search("val_loss:   2.5\n") is not None  # follows the name
    assert config.extra_env == {"A": "b=c"}
    assert report_path == tmp_path / "from-env.json"


def test_a_group_of_zombies_has_no_live_members(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    leader = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        assert supervise._group_has_live_members(leader.pid)
        leader.kill()
        deadline = time.monotonic() + 30
        while supervise._group_has_live_members(leader.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        # Unreaped, it still answers kill(0), yet it runs nothing any more.
        os.killpg(leader.pid, 0)
        assert not supervise._group_has_live_members(leader.pid)
        # Without /proc to tell zombies apart, an existing group counts as live.
        monkeypatch.setattr(supervise, "PROC", tmp_path / "no-proc")
        assert supervise._group_has_live_members(leader.pid)
    finally:
        leader.kill()
        leader.wait()
    assert not supervise._group_has_live_members(leader.pid)
