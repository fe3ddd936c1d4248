#!/usr/bin/env bash
# Make sure .venv holds the pinned dependencies of pyproject.toml and this checkout, installed.
#
# The venv is ~7 GB (torch's CUDA build), so it is keyed by a hash of the pinned dependency
# list: a stale one (pins changed) is rebuilt, a current one is reused. When
# AGESCALE_VENV_CACHE is set (CI does), the venv lives there, outside the clone, under
# that hash, and .venv is a symlink to it; the project itself is always (re)installed in
# editable mode from this checkout, which takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${AGESCALE_PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 /root/.pyenv/versions/3.11.7/bin/python3.11; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; assert sys.version_info[:2]==(3,11)' 2>/dev/null; then PY=$c; break; fi
  done
fi
[ -n "$PY" ] || { echo "ensure_venv: Python 3.11 not found (set AGESCALE_PYTHON)" >&2; exit 1; }

# Hash of the [project] dependencies block only, so README edits don't rebuild 7 GB.
deps_hash=$( { sed -n '/^dependencies = \[/,/^\]/p' pyproject.toml; sed -n '/^no_deps = \[/,/^\]/p' pyproject.toml; } \
  | sha256sum | cut -c1-16)

if [ -n "${AGESCALE_VENV_CACHE:-}" ]; then
  target="$AGESCALE_VENV_CACHE/venv-$deps_hash"
  if [ ! -L .venv ] || [ "$(readlink .venv)" != "$target" ]; then rm -rf .venv; ln -s "$target" .venv; fi
else
  target=.venv
fi

if [ ! -f "$target/.deps-$deps_hash" ]; then
  echo "ensure_venv: creating $target (pinned dependencies, hash $deps_hash)" >&2
  rm -rf "$target"
  "$PY" -m venv "$target"
  "$target/bin/python" -m pip install -q --upgrade "pip>=24" setuptools wheel
  sed -n '/^dependencies = \[/,/^\]/p' pyproject.toml | grep -o '"[^"]*"' | tr -d '"' > "$target/requirements.txt"
  # (the machine's pip config lists local indexes that print a warning per package; hide those)
  "$target/bin/python" -m pip install -q -r "$target/requirements.txt" 2> >(grep -v '^WARNING: Location' >&2)
  sed -n '/^no_deps = \[/,/^\]/p' pyproject.toml | grep -o '"[^"]*"' | tr -d '"' > "$target/requirements-nodeps.txt"
  "$target/bin/python" -m pip install -q --no-deps -r "$target/requirements-nodeps.txt" 2> >(grep -v '^WARNING: Location' >&2)
  touch "$target/.deps-$deps_hash"
fi

# (Re)install this checkout in editable mode when the venv points elsewhere or pyproject.toml
# changed (a new package or console script needs a fresh editable install).
stamp="$(pwd -P) $(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$target/.project-stamp" 2>/dev/null)" != "$stamp" ]; then
  "$target/bin/python" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
  echo "$stamp" > "$target/.project-stamp"
fi
