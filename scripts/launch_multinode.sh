#!/usr/bin/env bash
# Two-node LiVT launch with DeepSpeed.
#
# Mode 1 (ssh): run once on node-a; the launcher starts 8 ranks on each host of the hostfile over pdsh/ssh.
#   scripts/launch_multinode.sh ssh
# Mode 2 (no ssh, e.g. SLURM or Kubernetes starting one launcher per node): run on every node with its rank.
#   NODE_RANK=0 MASTER_ADDR=node-a scripts/launch_multinode.sh per-node    # on node-a
#   NODE_RANK=1 MASTER_ADDR=node-a scripts/launch_multinode.sh per-node    # on node-b
# Extra arguments are passed to livt (recipe overrides such as train.epochs=2).
# Environment variables starting with NCCL_, PYTHON or UCX_ and lines of ./.deepspeed_env are forwarded to all ranks.
set -euo pipefail
mode=${1:-ssh}; shift || true
HOSTFILE=${HOSTFILE:-scripts/hostfile.example}
GPUS=${GPUS:-8}
STAGE=${STAGE:-pretrain}
CONFIG=${CONFIG:-configs/mgp_vit_large_imagenet_lt.yaml}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2_bf16.json}
OUTPUT=${OUTPUT:-runs/mgp_vit_large_imagenet_lt}
MASTER_PORT=${MASTER_PORT:-29500}
args=(--module livt_ds "$STAGE" --config "$CONFIG" --ds-config "$DS_CONFIG" --output "$OUTPUT" "$@")
case "$mode" in
  ssh)
    exec deepspeed --hostfile "$HOSTFILE" --num_nodes 2 --num_gpus "$GPUS" --master_port "$MASTER_PORT" "${args[@]}" ;;
  per-node)
    exec deepspeed --hostfile "$HOSTFILE" --num_nodes 2 --num_gpus "$GPUS" --no_ssh --node_rank "${NODE_RANK:?}" \
      --master_addr "${MASTER_ADDR:?}" --master_port "$MASTER_PORT" "${args[@]}" ;;
  *) echo "usage: $0 {ssh|per-node} [key=value ...]" >&2; exit 2 ;;
esac
