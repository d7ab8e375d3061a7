#!/usr/bin/env bash
# Two-node LiVT launch with DeepSpeed.
#
# Mode 1 (ssh): run once on node-a; the launcher starts 8 ranks on each host of the hostfile over pdsh/ssh.
#   scripts/launch_multinode.sh ssh
# Mode 2 (no ssh, e.g. SLURM or Kubernetes starting one launcher per node): run on every node with its rank.
#   NODE_RANK=0 MASTER_ADDR=node-a scripts/launch_multinode.sh per-node    # on node-a
#   NODE_RANK=1 MASTER_ADDR=node-a scripts/launch_multinode.sh per-node    # on node-b
# Extra arguments are passed to livt (recipe overrides such as train.epochs=2).
# Environment: in ssh mode the launcher forwards variables starting with NCCL, PYTHON, UCX (not GLOO_SOCKET_IFNAME)
# and the KEY=VALUE lines of ~/.deepspeed_env and ./.deepspeed_env (scripts/deepspeed_env.example) to every rank.
# In per-node mode the ranks inherit this shell's environment, and ./.deepspeed_env is exported here, so one file
# serves both. DeepSpeed splits every line at '=': a blank or comment line would stop it, so it is refused here.
set -euo pipefail
mode=${1:-ssh}; shift || true
env_file=${DS_ENV_FILE:-.deepspeed_env}
for f in "$HOME/$env_file" "./$env_file"; do
  [[ -f $f ]] || continue
  n=0
  while IFS= read -r line || [[ -n $line ]]; do
    n=$((n + 1))
    if [[ ! $line =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then
      echo "$f:$n: expected KEY=VALUE (no blank or comment lines; the deepspeed launcher reads every line): '$line'" >&2
      exit 2
    fi
  done < "$f"
done
if [[ $mode == per-node && -f ./$env_file ]]; then
  set -a; source "./$env_file"; set +a
fi
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
