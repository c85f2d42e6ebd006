"""The container images' Dockerfiles: what they copy, what they run, and the lint rules.

Each rule is checked on both Dockerfiles and, so a rule that can never fire is caught,
on a small bad example it must flag.
"""

from __future__ import annotations

import importlib
import shlex
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.dockerfile import (
    RULES,
    Dockerfile,
    DockerIgnore,
    add_url_problems,
    context_sources,
    secret_env_problems,
    unpinned_bases,
    user_problems,
)

from skylab.controller.settings import OperatorSettings
from skylab.executors.kubernetes import CACHE_ENV, CACHE_PATH, TRAINER_UID

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = ["Dockerfile.trainer", "Dockerfile.operator"]
# The command each image runs by default: ENTRYPOINT plus CMD.
COMMANDS = {
    "Dockerfile.trainer": ["skylab-trainer", "run"],
    "Dockerfile.operator": ["skylab", "operator"],
}

Rule = Callable[[Dockerfile], list[str]]


def _dockerfile(name: str) -> Dockerfile:
    return Dockerfile.parse((REPO / name).read_text())


def _dockerignore() -> DockerIgnore:
    return DockerIgnore.parse((REPO / ".dockerignore").read_text())


def _console_script(name: str) -> Callable[[list[str]], object]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    scripts: dict[str, str] = project["scripts"]
    assert name in scripts, f"{name} is not in pyproject's [project.scripts]"
    module, _, function = scripts[name].partition(":")
    main: Callable[[list[str]], object] = getattr(importlib.import_module(module), function)
    return main


def _exit_code(main: Callable[[list[str]], object], argv: list[str]) -> object:
    """The exit status of a console script: what it returns, or what it exits with."""
    try:
        return main(argv)
    except SystemExit as exited:
        return exited.code


# --- the parsers ------------------------------------------------------------------------


def test_parser_joins_continuations_and_drops_comments() -> None:
    parsed = Dockerfile.parse(
        "# syntax=docker/dockerfile:1\n"
        "FROM python:3.12.13-slim AS build\n"
        "RUN --mount=type=cache,target=/root/.cache apt-get update \\\n"
        "    # a comment inside the command\n"
        "    && echo done\n"
        "COPY --from=build /a /b\n"
        "copy x y/\n"
    )
    assert [i.keyword for i in parsed.instructions] == ["FROM", "RUN", "COPY", "COPY"]
    run = parsed.instructions[1]
    assert run.flags == ("--mount=type=cache,target=/root/.cache",)
    assert run.value.split() == ["apt-get", "update", "&&", "echo", "done"]
    assert run.line == 3
    assert [(s.base, s.name) for s in parsed.stages] == [("python:3.12.13-slim", "build")]
    assert context_sources(parsed) == ["x"]


def test_dockerignore_matches_like_docker() -> None:
    ignore = DockerIgnore.parse("*\n!operator/\n**/__pycache__\n*.md\n!README.md\n")
    assert not ignore.excluded("operator/skylab/cli.py")
    assert not ignore.excluded("README.md")
    assert ignore.excluded("operator/skylab/__pycache__/cli.cpython-312.pyc")
    assert ignore.excluded("tests/test_engine.py")
    assert ignore.excluded(".git/HEAD")


# --- what the images copy and run -------------------------------------------------------


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copied_paths_exist_and_are_in_the_context(name: str) -> None:
    ignore = _dockerignore()
    sources = context_sources(_dockerfile(name))
    assert sources, "copies nothing from the build context"
    for source in sources:
        path = REPO / source
        assert path.exists(), f"{name}: COPY {source}: no such path"
        assert not ignore.excluded(source), f"{name}: COPY {source}: excluded by .dockerignore"
        if path.is_dir():
            tracked = subprocess.run(
                ["git", "ls-files", "-z", "--", source],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.split("\0")
            left_out = [f for f in tracked if f and ignore.excluded(f)]
            assert not left_out, f"{name}: COPY {source}: .dockerignore drops {left_out}"


def test_dockerignore_keeps_the_clutter_out() -> None:
    ignore = _dockerignore()
    for path in [".git/HEAD", ".venv/bin/python", ".skylab/runs/x", "tests/conftest.py"]:
        assert ignore.excluded(path), path
    assert ignore.excluded("operator/skylab/__pycache__/cli.cpython-311.pyc")
    assert ignore.excluded("experiments/gpt-pretrain/.skylab/data/x")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_default_command_is_a_console_script_and_subcommand(name: str) -> None:
    final = _dockerfile(name).final
    entrypoint, cmd = final.last("ENTRYPOINT"), final.last("CMD")
    assert entrypoint is not None, f"{name}: no ENTRYPOINT"
    command = (entrypoint.exec_form() or []) + (cmd.exec_form() or [] if cmd else [])
    assert command == COMMANDS[name]
    main = _console_script(command[0])
    # --help exits 0 only when every word before it is a real (sub)command.
    assert _exit_code(main, [*command[1:], "--help"]) == 0
    assert _exit_code(main, ["no-such-command", "--help"]) == 2


def test_trainer_runs_as_the_uid_of_the_job_manifests() -> None:
    user = _dockerfile("Dockerfile.trainer").final.last("USER")
    assert user is not None
    assert user.value.partition(":")[0] == str(TRAINER_UID)


def test_trainer_keeps_its_compile_caches_where_the_jobs_mount_the_cache() -> None:
    final = _dockerfile("Dockerfile.trainer").final
    volume = final.last("VOLUME")
    assert volume is not None and volume.words() == [CACHE_PATH]
    env = dict(
        word.partition("=")[::2]
        for instruction in final.instructions
        if instruction.keyword == "ENV"
        for word in shlex.split(instruction.value)
    )
    assert {name: env.get(name) for name in CACHE_ENV} == CACHE_ENV


def test_operator_exposes_its_http_port() -> None:
    exposed = _dockerfile("Dockerfile.operator").final.last("EXPOSE")
    assert exposed is not None
    assert str(OperatorSettings.http_port) in exposed.value.split()


# --- the lint rules ---------------------------------------------------------------------


@pytest.mark.parametrize("name", DOCKERFILES)
@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.__name__)
def test_dockerfile_follows_rule(name: str, rule: Rule) -> None:
    assert rule(_dockerfile(name)) == []


GOOD = "FROM python:3.12.13-slim-bookworm\nUSER 1000\n"

BAD_EXAMPLES: list[tuple[Rule, str]] = [
    (unpinned_bases, "FROM python\nUSER 1000\n"),
    (unpinned_bases, "FROM python:latest\nUSER 1000\n"),
    (unpinned_bases, "FROM python:3.12-slim\nUSER 1000\n"),
    (unpinned_bases, "FROM registry:5000/team/app\nUSER 1000\n"),
    (user_problems, "FROM python:3.12.13-slim\n"),
    (user_problems, "FROM python:3.12.13-slim\nUSER skylab\n"),
    (user_problems, "FROM python:3.12.13-slim\nUSER 0:0\n"),
    (user_problems, "FROM python:3.12.13 AS a\nUSER 1000\nFROM python:3.12.13\n"),
    (add_url_problems, GOOD + "ADD https://example.com/tool.tar.gz /opt/\n"),
    (secret_env_problems, GOOD + "ENV ANTHROPIC_API_KEY=sk-ant-x\n"),
    (secret_env_problems, GOOD + "ENV GITHUB_TOKEN abc\n"),
    (secret_env_problems, GOOD + "ARG DB_PASSWORD\n"),
]


@pytest.mark.parametrize(
    ("rule", "text"),
    BAD_EXAMPLES,
    ids=[f"{r.__name__}-{n}" for n, (r, _) in enumerate(BAD_EXAMPLES)],
)
def test_rule_flags_its_bad_example(rule: Rule, text: str) -> None:
    assert rule(Dockerfile.parse(text)), text


def test_rules_pass_a_good_example() -> None:
    good = Dockerfile.parse(
        "FROM python:3.12.13-slim AS wheel\n"
        "FROM wheel AS more\n"
        "FROM python:3.12.13-slim@sha256:" + "0" * 64 + "\n"
        "ENV PYTHONUNBUFFERED=1 HOME=/home/app\n"
        "RUN apt-get update \\\n"
        "    && apt-get install -y --no-install-recommends git \\\n"
        "    && rm -rf /var/lib/apt/lists/*\n"
        "RUN pip install --no-cache-dir skylab\n"
        "ADD files.tar /opt/\n"
        "WORKDIR /app\n"
        "USER 1000:1000\n"
        'ENTRYPOINT ["skylab"]\n'
        'CMD ["run"]\n'
    )
    assert {rule.__name__: rule(good) for rule in RULES} == {rule.__name__: [] for rule in RULES}


HADOLINT = REPO / ".venv-tools" / "bin" / "hadolint"


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HADOLINT), "--no-color", "--failure-threshold", "info", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_finds_nothing(name: str) -> None:
    linted = _hadolint(REPO / name)
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install -y git\n")
    linted = _hadolint(bad)
    assert linted.returncode != 0
    assert "DL3007" in linted.stdout  # the latest tag
