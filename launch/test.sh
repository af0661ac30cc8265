#!/usr/bin/env bash
# The README's second command (and what CI runs): set up with the test extra, then run the suite.
# Arguments go to pytest, e.g. `bash launch/test.sh -m "not slurm"`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh test
exec .venv/bin/python -m pytest -q "$@"
