"""A small Dockerfile and .dockerignore reader, and the lint rules skylab's images follow.

Each rule takes the parsed file and returns its problems, one line each; none is a pass.
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
from dataclasses import dataclass
from pathlib import PurePosixPath

# Instructions whose leading `--name=value` words are flags, not arguments.
_FLAGGED = {"ADD", "COPY", "FROM", "RUN"}


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    flags: tuple[str, ...]  # e.g. ("--from=wheel",)
    value: str  # the arguments, continuation lines joined
    line: int  # where it starts, 1-based

    def exec_form(self) -> list[str] | None:
        """The JSON array form's words, or None for the shell form."""
        try:
            words = json.loads(self.value)
        except json.JSONDecodeError:
            return None
        if isinstance(words, list) and words and all(isinstance(w, str) for w in words):
            return words
        return None

    def words(self) -> list[str]:
        return self.exec_form() or self.value.split()

    def flag(self, name: str) -> str | None:
        prefix = f"--{name}="
        return next((f.removeprefix(prefix) for f in self.flags if f.startswith(prefix)), None)

    def __str__(self) -> str:
        text = " ".join(self.value.split())
        return f"line {self.line}: {self.keyword} {text[:50]}{'...' if len(text) > 50 else ''}"


@dataclass(frozen=True)
class Stage:
    base: str
    name: str | None
    instructions: tuple[Instruction, ...]  # after its FROM

    def last(self, keyword: str) -> Instruction | None:
        found = [i for i in self.instructions if i.keyword == keyword]
        return found[-1] if found else None


@dataclass(frozen=True)
class Dockerfile:
    instructions: tuple[Instruction, ...]

    @classmethod
    def parse(cls, text: str) -> Dockerfile:
        instructions: list[Instruction] = []
        pieces: list[str] = []
        start = 0
        for number, line in enumerate(text.splitlines(), 1):
            stripped = line.strip()
            # Comments (parser directives too) and blank lines vanish, even mid-continuation.
            if not stripped or stripped.startswith("#"):
                continue
            if not pieces:
                start = number
            if line.rstrip().endswith("\\"):
                pieces.append(line.rstrip()[:-1])
                continue
            pieces.append(line)
            instructions.append(_instruction("".join(pieces), start))
            pieces = []
        if pieces:
            raise ValueError(f"line {start}: continuation runs past the end of the file")
        return cls(tuple(instructions))

    @property
    def stages(self) -> list[Stage]:
        stages: list[Stage] = []
        for index, instruction in enumerate(self.instructions):
            if instruction.keyword != "FROM":
                continue
            words = instruction.value.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            following = self.instructions[index + 1 :]
            end = next((i for i, x in enumerate(following) if x.keyword == "FROM"), None)
            stages.append(Stage(words[0], name, following[:end]))
        return stages

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def _instruction(logical: str, line: int) -> Instruction:
    keyword, rest = _first_word(logical)
    keyword = keyword.upper()
    flags: list[str] = []
    while keyword in _FLAGGED and rest.startswith("--"):
        flag, rest = _first_word(rest)
        flags.append(flag)
    return Instruction(keyword, tuple(flags), rest, line)


def _first_word(text: str) -> tuple[str, str]:
    first, *rest = text.strip().split(maxsplit=1)
    return first, rest[0] if rest else ""


def context_sources(dockerfile: Dockerfile) -> list[str]:
    """The build-context paths COPY and ADD read; copies from other stages are not."""
    sources: list[str] = []
    for instruction in dockerfile.all("COPY") + dockerfile.all("ADD"):
        if instruction.flag("from") is None:
            sources += instruction.words()[:-1]
    return sources


# --- .dockerignore ----------------------------------------------------------------------


@dataclass(frozen=True)
class DockerIgnore:
    rules: tuple[tuple[bool, re.Pattern[str]], ...]  # (is an exception "!", pattern)

    @classmethod
    def parse(cls, text: str) -> DockerIgnore:
        rules = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = posixpath.normpath(line.removeprefix("!").strip()).lstrip("/")
            rules.append((negate, re.compile(_glob_regex(pattern))))
        return cls(tuple(rules))

    def excluded(self, path: str) -> bool:
        """Whether PATH stays out of the context: the last pattern matching it or a
        folder above it decides, as Docker does."""
        parts = PurePosixPath(posixpath.normpath(path)).parts
        candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        excluded = False
        for negate, regex in self.rules:
            if any(regex.fullmatch(c) for c in candidates):
                excluded = not negate
        return excluded


def _glob_regex(pattern: str) -> str:
    """Go's filepath.Match syntax plus `**` (any number of folders), as a regex."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i:]:
            end = pattern.index("]", i)
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("^") else body) + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


# --- rules ------------------------------------------------------------------------------

# A full X.Y.Z version at the start of the tag: `3.12` or `3.12-slim` float to new patches.
_EXACT_TAG = re.compile(r"\d+\.\d+\.\d+")
_SECRET_NAME = re.compile(r"KEY|TOKEN|PASSWORD|SECRET", re.IGNORECASE)
_URL = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|git@)", re.IGNORECASE)


def unpinned_bases(dockerfile: Dockerfile) -> list[str]:
    """Base images must name an exact version tag or a digest (stages may name stages)."""
    problems = []
    stage_names: set[str] = set()
    for stage in dockerfile.stages:
        image = stage.base
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        if image in stage_names or image == "scratch" or "@sha256:" in image:
            pass
        elif not tag:
            problems.append(f"FROM {image}: no tag (means latest)")
        elif not _EXACT_TAG.match(tag):
            problems.append(f"FROM {image}: tag {tag!r} is not an exact X.Y.Z version")
        if stage.name:
            stage_names.add(stage.name)
    return problems


def user_problems(dockerfile: Dockerfile) -> list[str]:
    """The final stage runs as a numeric, non-root uid: runAsNonRoot can only check numbers."""
    user = dockerfile.final.last("USER")
    if user is None:
        return ["final stage: no USER (runs as root)"]
    uid = user.value.partition(":")[0]
    if not uid.isdigit():
        return [f"{user}: not a numeric uid"]
    if int(uid) == 0:
        return [f"{user}: root"]
    return []


def add_url_problems(dockerfile: Dockerfile) -> list[str]:
    """No ADD of URLs: unverified downloads that also defeat the build cache."""
    return [
        f"{add}: fetches {source}"
        for add in dockerfile.all("ADD")
        for source in add.words()[:-1]
        if _URL.match(source)
    ]


def secret_env_problems(dockerfile: Dockerfile) -> list[str]:
    """No secret-looking ENV or ARG: both stay readable in the image's history."""
    problems = []
    for instruction in dockerfile.all("ENV") + dockerfile.all("ARG"):
        for name in _declared_names(instruction):
            if _SECRET_NAME.search(name):
                problems.append(f"{instruction}: {name} looks like a secret")
    return problems


def _declared_names(instruction: Instruction) -> list[str]:
    words = shlex.split(instruction.value)
    if instruction.keyword == "ENV" and words and "=" not in words[0]:
        return [words[0]]  # the legacy `ENV NAME value` form
    return [w.partition("=")[0] for w in words]


# The rules hadolint (also run by the tests) has no equivalent for: apt, pip, exec-form
# and WORKDIR practice are its DL3015, DL3009, DL3042, DL3025 and DL3000.
RULES = (
    unpinned_bases,
    user_problems,
    add_url_problems,
    secret_env_problems,
)
