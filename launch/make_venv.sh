#!/usr/bin/env bash
# Creates a virtualenv with the newest Python >= 3.12 on this machine (jax 0.12 there; pip gives
# Python 3.11 jax 0.10.2, which trains the CPU default ~1.3x slower), else with python3.
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: bash launch/make_venv.sh [DIR]

Creates the virtualenv DIR (default .venv) with the newest Python >= 3.12 it finds: python3.13
or python3.12 on the PATH, else the newest such version pyenv has installed (PYENV_VERSION),
else python3. Prints the Python it chose. An existing DIR is kept as it is.
The interpreter is tried, not only looked up: a pyenv shim of an inactive version fails.

Settings (environment):
  PYTHON   use this interpreter instead of searching (e.g. PYTHON=python3.11)

Example:
  bash launch/make_venv.sh && .venv/bin/pip install -e .
USAGE
}

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
esac
dir="${1:-.venv}"
if [ -x "$dir/bin/python" ]; then
  echo "make_venv: $dir exists ($("$dir/bin/python" --version 2>&1)); kept."
  exit 0
fi

works() {  # the interpreter runs and has venv and ensurepip (Debian splits them off)
  "$@" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 12))' 2>/dev/null
}

python=()
if [ -n "${PYTHON:-}" ]; then
  python=("$PYTHON")
else
  for candidate in python3.13 python3.12; do
    if works "$candidate"; then python=("$candidate"); break; fi
  done
  if [ ${#python[@]} -eq 0 ] && command -v pyenv >/dev/null 2>&1; then
    while read -r version; do
      if works env PYENV_VERSION="$version" python3; then
        python=(env PYENV_VERSION="$version" python3)
        break
      fi
    done < <(pyenv versions --bare 2>/dev/null | grep -E '^3\.(1[2-9])\.[0-9]+$' | sort -rV)
  fi
  if [ ${#python[@]} -eq 0 ]; then
    python=(python3)
    echo "make_venv: no Python >= 3.12 found; using python3 (jax 0.10.2, slower on a CPU)."
  fi
fi
echo "make_venv: $dir with ${python[*]} ($("${python[@]}" --version 2>&1))"
"${python[@]}" -m venv "$dir"
