# Sourced by the scripts: create .venv and install skylab with the given extras.
# Let imports cache bytecode: re-reading all of torch from source costs seconds per trial.
unset PYTHONDONTWRITEBYTECODE

ensure_venv() {
  local extras=$1 python=${PYTHON:-python3}
  if [ ! -x .venv/bin/python ]; then
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
      || { echo "skylab needs Python 3.11 or newer (set PYTHON=...)" >&2; return 1; }
    "$python" -m venv .venv
  fi
  # --no-compile: byte-compiling all of torch at install time costs minutes.
  local pip=(.venv/bin/python -m pip install --quiet --no-compile --disable-pip-version-check)
  local stamp=".venv/.installed-${extras//,/-}"
  [ "$stamp" -nt pyproject.toml ] && return 0
  if ! .venv/bin/python -c 'import importlib.util as u; exit(u.find_spec("torch") is None)'; then
    # The CPU build of torch; set SKYLAB_TORCH to choose another.
    "${pip[@]}" "${SKYLAB_TORCH:-torch==2.13.0}"
  fi
  "${pip[@]}" -e ".[$extras]"
  touch "$stamp"
}
