#!/usr/bin/env bash
# torchrun across several machines (no SLURM): run the same command on every node.
#
#   bash launch/torchrun_multinode.sh --nnodes 2 --rdzv head-node:29500 [KEY=VALUE ...]
#       c10d rendezvous hosted by the agent on head-node (start that one first or within
#       a few minutes of the others); nodes get their ranks in the order they join
#   bash launch/torchrun_multinode.sh --nnodes 2 --rdzv head-node:29500 --node-rank 1 [KEY=VALUE ...]
#       static rendezvous: fixed node ranks, rank 0's node must be head-node
#   bash launch/torchrun_multinode.sh --nnodes 1:4 --max-restarts 3 --rdzv head-node:29500 [KEY=VALUE ...]
#       elastic: 1 to 4 nodes. When a node dies, torchrun restarts the workers of the nodes that
#       are left; they resume from the newest checkpoint at the new world size, with the same global batch
#       (more images per rank), and metrics.jsonl records each epoch's world_size. Give run.name (or the same
#       RDZV_ID on every node) so that every attempt finds the run directory. The rendezvous lives in the
#       agent on head-node: losing that node ends the run (an etcd rendezvous would survive it); say which
#       agent hosts it with --rdzv-conf is_host=true / is_host=false when the hostname does not tell. (A node
#       rejoining mid-run is untested: see README.) A node that left waits --rdzv-conf last_call_timeout
#       (default 30 s) before the survivors go on; set RDZV_CONF=last_call_timeout=5 (or --rdzv-conf) to go
#       on sooner.
#
# The same settings from the environment: NNODES, RDZV (host:port), NODE_RANK, NPROC (processes per
# node, default: the node's GPUs, else 2 CPU processes), MAX_RESTARTS (default 0), RDZV_CONF (c10d
# only, e.g. last_call_timeout=5), RDZV_ID (c10d only, default resnet-dist),
# PYTHON (default: the repository's .venv, else python3). Pick a port that is free on the head node;
# every node must reach head-node:port and each other (set NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME
# to the interface they share if the default one is wrong; see slurm/train.sh for the NCCL notes).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NNODES=${NNODES:-}
RDZV=${RDZV:-}
NODE_RANK=${NODE_RANK:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --nnodes) NNODES=$2; shift 2 ;;
    --rdzv) RDZV=$2; shift 2 ;;
    --node-rank) NODE_RANK=$2; shift 2 ;;
    --nproc) NPROC=$2; shift 2 ;;
    --max-restarts) MAX_RESTARTS=$2; shift 2 ;;
    --rdzv-conf) RDZV_CONF=$2; shift 2 ;;
    *) break ;;
  esac
done
if [ -z "$NNODES" ] || [ -z "$RDZV" ] || [[ "$RDZV" != *:* ]]; then
  echo "usage: $0 --nnodes N|MIN:MAX --rdzv HOST:PORT [--node-rank R] [--nproc P] [--max-restarts N]" \
       "[--rdzv-conf K=V] [train arguments ...]" >&2
  echo "       (or NNODES, RDZV, NODE_RANK, NPROC in the environment)" >&2
  exit 2
fi
source "$REPO/launch/common.sh"
local_procs

if [ -n "$NODE_RANK" ]; then
  rdzv=(--node-rank="$NODE_RANK" --master-addr="${RDZV%:*}" --master-port="${RDZV##*:}")
else
  rdzv=(--rdzv-backend=c10d --rdzv-endpoint="$RDZV" --rdzv-id="${RDZV_ID:-resnet-dist}")
  [ -z "${RDZV_CONF:-}" ] || rdzv+=(--rdzv-conf="$RDZV_CONF")
fi
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$NPROC" "${rdzv[@]}" \
  --max-restarts="${MAX_RESTARTS:-0}" \
  -m resnet_dist.train "$@"
