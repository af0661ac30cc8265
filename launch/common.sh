# Sourced by the launch and SLURM scripts (REPO must be set): the interpreter and the process count.

# PYTHON: as given, else the repository's .venv, else python3
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi

# local_procs: NPROC = one process per visible GPU (counted without importing torch: CUDA_VISIBLE_DEVICES
# when set, else nvidia-smi), or 2 CPU processes without a GPU, each with its share of the cores
# (torchrun would give each 1 thread). An NPROC already set wins.
local_procs() {
  local gpus=0
  if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
    gpus=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c -v -e '^$' -e '^-1$' || true)
  elif command -v nvidia-smi >/dev/null; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
  if [ "$gpus" -gt 0 ]; then
    NPROC=${NPROC:-$gpus}
  else
    NPROC=${NPROC:-2}
    local cores
    cores=$(nproc)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / NPROC > 0 ? cores / NPROC : 1 ))}
  fi
}
