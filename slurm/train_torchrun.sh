#!/usr/bin/env bash
# Train on a SLURM cluster with torchrun: srun starts ONE torchrun agent per node, each agent starts
# one worker per GPU, and the agents meet at a c10d rendezvous on the allocation's first host.
#
#   mkdir -p logs && sbatch slurm/train_torchrun.sh [KEY=VALUE ...]        (from the repository root)
#   sbatch --gpus-per-node=0 --cpus-per-task=2 slurm/train_torchrun.sh     (a CPU-only cluster: see below)
#
# Use this instead of slurm/train.sh when you want torchrun's behaviour (its worker restarts,
# TORCHELASTIC_* variables, or a script that expects LOCAL_RANK); otherwise slurm/train.sh is simpler.
# Do not run `srun torchrun` with one task per GPU: that starts N independent jobs (the trainer stops
# with an error saying so).
#
# The #SBATCH lines are the defaults; the sbatch command line overrides them. As in slurm/train.sh,
# GPUs are requested here so that a GPU job never silently runs on CPU; a cluster without GPU GRES
# rejects --gpus-per-node>0, so there pass --gpus-per-node=0 to sbatch. Workers per node:
# NPROC_PER_NODE, default the node's GPUs ($SLURM_GPUS_ON_NODE), or 1 on CPU.
# Partition / account: add  #SBATCH --partition=...  #SBATCH --account=...  NCCL notes: slurm/train.sh.
#
#SBATCH --job-name=resnet-dist-torchrun
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=02:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
#
# --ntasks-per-node=1 and --cpus-per-task = all the node's cores: the one task per node is the agent,
# its workers share the cores. --signal=USR1@120 reaches the workers (see the trap below): they
# checkpoint and rank 0 requeues the job, as with slurm/train.sh; a requeued job keeps its id, so the
# trainer finds its run directory (run.name defaults to $SLURM_JOB_ID) and resumes.
set -euo pipefail

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}   # sbatch runs a copy of this script: submit from the repository root
cd "$REPO"
CONFIG=${CONFIG:-configs/default.yaml}
source "$REPO/launch/common.sh"
NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
[ "$NPROC_PER_NODE" -gt 0 ] || NPROC_PER_NODE=1   # no GPU on the node: one CPU worker per node
CPUS=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS / NPROC_PER_NODE > 0 ? CPUS / NPROC_PER_NODE : 1 ))}
# the rendezvous: the first host of the allocation, a port derived from the job id (two jobs differ)
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${RDZV_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}

task_args "$@"   # job arrays: {task} and {task:a,b,c} in the arguments (see slurm/train.sh)
echo "job $SLURM_JOB_ID on $SLURM_JOB_NODELIST (restart ${SLURM_RESTART_COUNT:-0}): torchrun x $SLURM_NNODES nodes x $NPROC_PER_NODE, rendezvous $HEAD:$PORT"
# --kill-on-bad-exit: when one agent fails, stop the others instead of leaving them waiting.
# `trap '' USR1`: SLURM signals every process of the step, agents and workers alike. The workers
# checkpoint on SIGUSR1, but a torchrun agent dies of it (it handles TERM, INT, HUP and QUIT only),
# and srun would then kill the workers mid-checkpoint; ignored by the agent, it still reaches the
# workers, which install their own handler. (SIGTERM, at the time limit, the agent handles: it passes it on and waits 30 s.)
srun --kill-on-bad-exit=1 --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS" \
  bash -c 'trap "" USR1 && exec "$@"' torchrun-agent \
  "$PYTHON" -m torch.distributed.run \
    --nnodes="$SLURM_NNODES" --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$HEAD:$PORT" --rdzv-id="$SLURM_JOB_ID" \
    -m resnet_dist.train --config "$CONFIG" "${TASK_ARGS[@]}"
