#!/usr/bin/env bash
# Start this node's ranks of a multi-node ds-loradrop job with the DeepSpeed launcher, without ssh.
# Run it once on every node (under Slurm: one srun task per node, see launch/slurm_train.sbatch).
#
# Environment (the same on every node, except NODE_RANK):
#   NODE_RANK      this node's index, 0 .. number of nodes - 1      (Slurm: $SLURM_NODEID)
#   NODES          the nodes' host names, space-separated, in the same order everywhere
#                  (Slurm: $(scontrol show hostnames "$SLURM_JOB_NODELIST"))
#   GPUS_PER_NODE  ranks to start on each node
#   MASTER_ADDR    an address of the first node that every node can reach
#   MASTER_PORT    a free TCP port there (default 29500)
#   DEEPSPEED      the launcher to run (default: deepspeed on PATH)
# Arguments are passed to launch/train.py. --output_dir (and DS_LORADROP_CACHE for the tiny preset)
# must be on a file system every node sees: all ranks write their checkpoint shards there.
set -euo pipefail

: "${NODE_RANK:?set NODE_RANK to the index of this node}"
: "${NODES:?set NODES to the host names of all nodes, space-separated}"
: "${GPUS_PER_NODE:?set GPUS_PER_NODE}"
: "${MASTER_ADDR:?set MASTER_ADDR to an address of the first node}"
MASTER_PORT="${MASTER_PORT:-29500}"

hostfile="$(mktemp)"
trap 'rm -f "$hostfile"' EXIT
for node in $NODES; do
    echo "$node slots=$GPUS_PER_NODE"
done > "$hostfile"

"${DEEPSPEED:-deepspeed}" --hostfile "$hostfile" --no_ssh --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    "$(dirname "$0")/train.py" "$@"
