#!/usr/bin/env bash
# The README's second command (and what CI runs): set up with the test extra, check formatting and lint
# (ruff, configured in pyproject.toml), then run the suite. Arguments go to pytest, e.g.
# `bash launch/test.sh -m "not slurm"`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh test
.venv/bin/ruff format --check --quiet . || { echo "ruff: files need formatting: run .venv/bin/ruff format ." >&2; exit 1; }
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest -q "$@"
