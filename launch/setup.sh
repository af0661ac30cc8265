#!/usr/bin/env bash
# Set up everything on a fresh Debian machine with Python 3.11: the Fashion-MNIST files
# (Debian's dataset-fashion-mnist package, when we are root), a virtual environment in .venv,
# and this package in it (pass "test" to add the test extra). Safe to run again: it only adds
# what is missing. Source it or run it; afterwards use .venv/bin/python.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extra=${1:-}
PYTHON=${PYTHON:-python3}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }
apt_install() {  # apt_install PKG...: best effort; without root the fallbacks below apply
  command -v apt-get >/dev/null || return 1
  as_root apt-get install -y -q "$@" >/dev/null 2>&1 ||
    { as_root apt-get update -q >/dev/null 2>&1 && as_root apt-get install -y -q "$@" >/dev/null 2>&1; }
}

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  echo "setup: installing Debian's dataset-fashion-mnist"
  apt_install dataset-fashion-mnist || echo "setup: no Debian copy; the trainer will download Fashion-MNIST"
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv 2>/dev/null || { apt_install python3-venv && rm -rf .venv && "$PYTHON" -m venv .venv; }
fi
spec="."
[ "$extra" = test ] && spec=".[test]"
echo "setup: installing resnet_dist$([ "$extra" = test ] && echo ' with its test extra') into .venv (torch takes a few minutes the first time)"
.venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import resnet_dist, torch, torchvision, yaml, wandb, accelerate" ||
  { echo "setup: the install failed (see above)" >&2; exit 1; }
