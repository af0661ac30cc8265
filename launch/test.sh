#!/usr/bin/env bash
# The README's second command (and what CI runs): set up with the test extra, check formatting and lint
# (ruff, configured in pyproject.toml), then run the suite. Arguments go to pytest, e.g.
# `bash launch/test.sh -m "not slurm"` or `bash launch/test.sh tests/test_config.py -x`.
#
#   bash launch/test.sh --fast [PYTEST ARGS]   the in-process tests only: none that starts a process, a
#                                              launcher, a process group or a cluster (pytest markers
#                                              `processes` and `slurm`), a few minutes on 2 cores
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
args=()
for a in "$@"; do
  if [ "$a" = --fast ]; then args+=(-m "not processes and not slurm"); else args+=("$a"); fi
done
bash launch/setup.sh test
.venv/bin/ruff format --check --quiet . || { echo "ruff: files need formatting: run .venv/bin/ruff format ." >&2; exit 1; }
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest -q ${args[@]+"${args[@]}"}
