#!/usr/bin/env bash
# The test suite, with lint and type checks. Creates .venv and .venv-tools if missing.
# Extra arguments go to pytest: `./scripts/test.sh -m "not slow"` leaves out the
# minutes-long runs of the real train.py, `-m slow` runs only those.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
source scripts/tools-venv.sh
# The tools' venv mostly waits on downloads: it is made while .venv installs.
tools_log=$(mktemp)
trap 'rm -f "$tools_log"' EXIT
ensure_tools_venv > "$tools_log" 2>&1 &
tools=$!
ensure_venv dev
wait "$tools" || { cat "$tools_log" >&2; exit 1; }

.venv/bin/ruff format --check .
.venv/bin/ruff check .
.venv/bin/mypy
# Two workers, a test file each at a time: most tests wait on subprocesses, servers or
# the operator, so a second worker fills the idle core (SKYLAB_TEST_WORKERS=0: none).
.venv/bin/pytest -n "${SKYLAB_TEST_WORKERS:-2}" --dist loadfile "$@"
