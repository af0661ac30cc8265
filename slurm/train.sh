#!/usr/bin/env bash
# Train on a SLURM cluster: srun starts one task per GPU on every node; each task is one rank.
#
#   mkdir -p logs && sbatch slurm/train.sh [KEY=VALUE ...]                 (from the repository root)
#   CONFIG=configs/seed.yaml sbatch slurm/train.sh train.epochs=5          (environment overrides)
#   sbatch --nodes=4 --time=01:00:00 slurm/train.sh                         (sbatch options override the lines below)
#
# The #SBATCH lines are the defaults, in this one place: edit them for your cluster. An option on the
# sbatch command line wins over the same #SBATCH line.
#
# GPUs are requested here (--gpus-per-node) because forgetting them on a GPU cluster would not fail:
# the tasks would see no GPU and quietly train on CPU. A cluster without GPUs (no "gpu" GRES) rejects
# any non-zero --gpus-per-node, so there, submit with the CPU layout on the command line; the script
# itself runs unchanged (gloo instead of NCCL, chosen by the trainer):
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 slurm/train.sh
#
# A sweep is a job array: each task trains in its own run directory (ARRAYJOBID_TASKID) and a preempted
# task requeues itself alone. {task} in an argument becomes the task id, {task:a,b,c} its item of a list:
#   sbatch --array=0-3 slurm/train.sh 'run.seed={task}'
#   sbatch --array=0-3 slurm/train.sh 'train.lr={task:0.05,0.1,0.2,0.4}'
# (quote the argument; --output defaults to logs/%x-%j.out, use logs/%x-%A_%a.out for one log per task.)
#
# logs/ must exist before submitting: SLURM does not create it, and a job whose output file cannot
# be opened fails at launch without writing a line anywhere.
#
# Partition / account / QoS: add e.g.  #SBATCH --partition=gpu   #SBATCH --account=myproject
# (or pass them to sbatch; `sinfo -s` lists partitions, `sacctmgr show assoc user=$USER` accounts).
#
#SBATCH --job-name=resnet-dist
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
#
# --ntasks-per-node must equal --gpus-per-node: each task sees all of its node's GPUs and takes the one of
# its local rank. Clusters that bind one GPU per task work too: `sbatch --gpus-per-task=1` (or --gpu-bind,
# or a site default that sets CUDA_VISIBLE_DEVICES per task) shows each task exactly one GPU, which it uses;
# the trainer refuses, in one line, tasks that all see the same single GPU, or more tasks on a node than
# GPUs visible to each. --signal=USR1@120: two minutes before the time limit every task gets SIGUSR1;
# the ranks agree on a step, save a checkpoint, and rank 0 runs `scontrol requeue $SLURM_JOB_ID`
# (hence --requeue). The requeued job keeps its id, so it finds its run directory (run.name defaults
# to $SLURM_JOB_ID) and resumes; --open-mode=append keeps the first part of the log.
#
# NCCL on real clusters (multi-node):
#   NCCL_SOCKET_IFNAME=ib0 (or the cluster's fast interface) when the default route's interface is the slow
#     management network (GLOO_SOCKET_IFNAME likewise for gloo, on CPU clusters; the GPU path has no gloo group);
#   NCCL_IB_HCA=mlx5 selects InfiniBand adapters, NCCL_IB_DISABLE=1 forces TCP (diagnosis only);
#   NCCL_DEBUG=INFO prints the transport chosen (NET/IB vs NET/Socket) at startup: check it once;
#   a dead or hung peer: PyTorch's NCCL watchdog notices a failed collective, or one that outlives
#     dist.timeout_s, and with TORCH_NCCL_ASYNC_ERROR_HANDLING unset (3 = SkipCleanUp, the default since
#     PyTorch 2.2) takes the whole process down (SIGABRT) with its own "Watchdog caught collective operation
#     timeout" lines: the trainer's one-line reason ("another rank died ...") appears only for errors that
#     reach Python (gloo on CPU, the rendezvous store). --kill-on-bad-exit then stops the other tasks.
set -euo pipefail

# sbatch runs a copy of this script from its spool directory: find the repository from the
# submission directory (submit from the repository root), or set REPO.
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO"
CONFIG=${CONFIG:-configs/default.yaml}
source "$REPO/launch/common.sh"
CPUS=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$CPUS}

task_args "$@"   # job arrays: {task} and {task:a,b,c} in the arguments (see below)
echo "job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?} (restart ${SLURM_RESTART_COUNT:-0}): $PYTHON -m resnet_dist.train --config $CONFIG ${TASK_ARGS[*]}"
# --cpus-per-task is passed on explicitly: since slurm 22.05 srun does not inherit it from sbatch.
# --kill-on-bad-exit: when one rank fails, stop the others instead of leaving them in a collective.
srun --kill-on-bad-exit=1 --cpus-per-task="$CPUS" "$PYTHON" -m resnet_dist.train --config "$CONFIG" "${TASK_ARGS[@]}"
