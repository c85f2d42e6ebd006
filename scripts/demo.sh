#!/usr/bin/env bash
# The demo: a 3-trial sweep campaign of the real gpt-pretrain experiment on the CPU.
# Creates .venv (if missing), installs skylab into it, prepares the data (offline it
# falls back to a corpus built from Python's own sources and docs), runs the
# campaign and prints its history.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
ensure_venv trainer,local

tag="demo-$(date +%Y%m%d-%H%M%S)"
.venv/bin/skylab prepare gpt-pretrain --profile cpu
.venv/bin/skylab run gpt-pretrain --profile cpu --strategy sweep --max-trials 3 --tag "$tag"
.venv/bin/skylab history gpt-pretrain --tag "$tag"
echo
echo "Kept improvements are on branch skylab/$tag of .skylab/workspaces/$tag.git"
