#!/usr/bin/env bash
# Creates (once) and activates the Python environment hiresctl runs in.
#
# The environment lives outside the clone, keyed by a hash of the dependency lists in
# pyproject.toml and the Python version, so a second clone or a second run reuses it and a
# change of dependencies builds a new one. Set HIRESCTL_ENV_ROOT to move it.
# Sourced by ./run and .ci/run: it must not change the caller's shell options.
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
key="$("$py" - "$repo/pyproject.toml" <<'PY'
import hashlib, sys, tomllib, platform
cfg = tomllib.load(open(sys.argv[1], "rb"))["project"]
text = repr((cfg["dependencies"], cfg["optional-dependencies"], platform.python_version()))
print(hashlib.sha256(text.encode()).hexdigest()[:16])
PY
)"
root="${HIRESCTL_ENV_ROOT:-$HOME/.cache/hiresctl/envs}"
venv="$root/$key"
if [ ! -f "$venv/.complete" ]; then
  echo "hiresctl: building the environment in $venv (first run only; torch is large, a few minutes)" >&2
  rm -rf "$venv"
  mkdir -p "$root"
  "$py" -m venv "$venv" || return 1
  # pip replacing itself can fail at the very end (the old process lazily imports a module of
  # the new version, e.g. rich's unicode tables); a second run is the new pip, and idempotent.
  "$venv/bin/python" -m pip install --quiet --upgrade pip setuptools wheel >&2 \
    || "$venv/bin/python" -m pip install --quiet --upgrade pip setuptools wheel >&2 || return 1
  # Install the dependency lists (not the project) so the environment can serve any clone.
  "$venv/bin/python" - "$repo/pyproject.toml" >"$venv/requirements.txt" <<'PY'
import sys, tomllib
cfg = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(cfg["dependencies"] + cfg["optional-dependencies"]["dev"]))
PY
  "$venv/bin/python" -m pip install --quiet -r "$venv/requirements.txt" >&2 || return 1
  touch "$venv/.complete"
fi
# Point the environment at this clone (cheap; the entry point follows the clone in use).
if [ ! -x "$venv/bin/hiresctl" ] || ! (cd / && "$venv/bin/python" -I -c "import hiresctl, pathlib, sys; sys.exit(pathlib.Path(hiresctl.__file__).resolve().parents[1] != pathlib.Path('$repo').resolve())" 2>/dev/null); then
  "$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$repo" >&2 || return 1
fi
export VIRTUAL_ENV="$venv"
export PATH="$venv/bin:$PATH"
