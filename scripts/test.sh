#!/usr/bin/env bash
# The test suite, with lint and type checks. Creates .venv if it is missing.
# Extra arguments go to pytest: `./scripts/test.sh -m slow` runs the end-to-end
# campaign of the real train.py (minutes on two cores).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv dev

.venv/bin/ruff format --check .
.venv/bin/ruff check .
.venv/bin/mypy
[ $# -gt 0 ] || set -- -m "not slow"
.venv/bin/pytest "$@"
