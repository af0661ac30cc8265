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

# task_args ARG...: the arguments with job-array placeholders filled in, into the array TASK_ARGS.
# {task} becomes $SLURM_ARRAY_TASK_ID; {task:a,b,c} the task-th item of the list (a sweep over values):
#   sbatch --array=0-3 slurm/train.sh 'run.seed={task}'
#   sbatch --array=0-3 slurm/train.sh 'train.lr={task:0.05,0.1,0.2,0.4}'
task_args() {
  TASK_ARGS=()
  local arg task=${SLURM_ARRAY_TASK_ID:-} before list after items
  for arg in "$@"; do
    if [[ "$arg" == *"{task"* && -z "$task" ]]; then
      echo "error: '$arg' uses {task}, but this is not a task of a job array (sbatch --array=...)" >&2
      exit 2
    fi
    while [[ "$arg" =~ ^(.*)\{task:([^}]*)\}(.*)$ ]]; do
      before=${BASH_REMATCH[1]} list=${BASH_REMATCH[2]} after=${BASH_REMATCH[3]}
      IFS=, read -r -a items <<<"$list"
      if [ "$task" -ge "${#items[@]}" ]; then
        echo "error: '$arg': array task $task, but the list has ${#items[@]} values" >&2
        exit 2
      fi
      arg="$before${items[$task]}$after"
    done
    TASK_ARGS+=("${arg//\{task\}/$task}")
  done
}
