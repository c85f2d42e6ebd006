# Sourced by the scripts: create .venv and install skylab with the given extras.
# Let imports cache bytecode: re-reading all of torch from source costs seconds per trial.
unset PYTHONDONTWRITEBYTECODE

ensure_venv() {
  local extras=$1 python=${PYTHON:-python3}
  local stamp=".venv/.installed-${extras//,/-}"
  [ "$stamp" -nt pyproject.toml ] && return 0
  if [ ! -x .venv/bin/python ]; then
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
      || { echo "skylab needs Python 3.11 or newer (set PYTHON=...)" >&2; return 1; }
    if outer_pip_can_target "$python"; then
      # Seeding pip into the venv costs a minute on a small machine; the outer pip
      # installs into it instead.
      "$python" -m venv --without-pip .venv
    else
      "$python" -m venv .venv
    fi
  fi
  recent_pip "$python"
  # --no-compile: byte-compiling all of torch at install time costs minutes.
  local pip=(.venv/bin/python -m pip install --quiet --no-compile --disable-pip-version-check)
  local packages=(-e ".[$extras]")
  if ! .venv/bin/python -c 'import importlib.util as u; exit(u.find_spec("torch") is None)'; then
    # Pinned in the same resolution, so the dependencies never pull a CUDA build of torch
    # in; set SKYLAB_TORCH to choose another build.
    packages=("${SKYLAB_TORCH:-torch==2.13.0}" "${packages[@]}")
  fi
  "${pip[@]}" "${packages[@]}"
  # Installed without bytecode: compile the modules a trial imports now, once, rather
  # than inside the first trial's wall-clock limit.
  .venv/bin/python -c 'import torch, torch.nn.functional, numpy, pyarrow.parquet, tiktoken'
  touch "$stamp"
}

# pip 25 and newer resolve skylab's 80-odd dependencies several times faster than the pip
# Python 3.11 bundles (4 minutes against 22 on a busy 2-core machine): put one in .venv.
recent_pip() {
  local version
  version=$(.venv/bin/python -m pip --version 2>/dev/null | cut -d' ' -f2) || version=""
  [ -n "$version" ] && [ "${version%%.*}" -ge 25 ] && return 0
  local upgrade=(install --quiet --disable-pip-version-check "pip>=25")
  if [ -n "$version" ]; then
    .venv/bin/python -m pip "${upgrade[@]}"
  else
    "$1" -m pip --python .venv/bin/python "${upgrade[@]}"
  fi
}

# pip >= 22.3 installs into another interpreter's environment with --python.
outer_pip_can_target() {
  "$1" -m pip --help 2>/dev/null | grep -q -- '--python <python>'
}
