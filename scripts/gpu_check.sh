#!/usr/bin/env bash
# The GPU check: everything CI cannot run, in one command on a GPU machine, in under 8 minutes on one GPU.
set -uo pipefail

usage() {
    cat <<'EOF'
usage: scripts/gpu_check.sh [--out DIR] [--phases LIST] [--dry-run] [-h|--help]

Runs on a CUDA machine, from the repository root, and writes DIR/gpu_check.json plus one log per phase:
  e2e     the bf16 matrix of tests/test_bf16_configs.py on CUDA/nccl: MGP -> export -> BFT -> eval -> export and
          stop + --resume auto for zero1/zero2/zero3/zero2_offload bf16 (world-size change only with >= 2 GPUs)
  bench   scripts/bench_train.py, ViT-L/16 and ViT-B/16 at 224, MGP and BFT, the trainer's DeepSpeed engine
          against a plain eager PyTorch loop in the same process (ViT-L also through the real shard stream)
  memory  peak GPU memory of the MGP model per ZeRO config (1, 2, 3, 2offload), ViT-L and ViT-H
Options:
  --out DIR      where results go [gpu_check_out]
  --phases LIST  comma list of e2e,bench,memory [all three]
  --dry-run      print the commands instead of running them (works without a GPU)
Packages: torch, timm, tensorboard, pyyaml and numpy must be installed. If deepspeed or webdataset is not,
wheels in .whl/ (if present) are installed into a temporary folder with pip --no-index; nothing is downloaded.
Each phase has a time limit (seconds; override with E2E_S, BENCH_L_S, BENCH_B_S, MEM_L_S, MEM_H_S).
EOF
}

OUT=gpu_check_out
PHASES=e2e,bench,memory
DRY=0
while (( $# )); do
    case "$1" in
        --out) OUT=${2:?--out needs a folder}; shift 2 ;;
        --phases) PHASES=${2:?--phases needs a list}; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done
for phase in ${PHASES//,/ }; do
    case "$phase" in e2e|bench|memory) ;; *) echo "gpu_check: unknown phase '$phase' (e2e, bench, memory)" >&2; exit 2 ;; esac
done
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
: > "$OUT/phases.tsv"

run_phase() {  # run_phase NAME SECONDS LOG COMMAND...: one phase under a time limit, its status in phases.tsv
    local name=$1 limit=$2 log=$3; shift 3
    if (( DRY )); then
        echo "[$name, limit ${limit}s] $*"
        return
    fi
    echo "[gpu_check] $name (limit ${limit}s): $*" >&2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - start ))" "$log" >> "$OUT/phases.tsv"
    echo "[gpu_check] $name: exit $rc after $(( SECONDS - start ))s (log: $OUT/$log)" >&2
}

if (( ! DRY )); then
    if ! "$PY" -c "import deepspeed, webdataset" 2>/dev/null; then
        if compgen -G ".whl/*.whl" > /dev/null; then
            site=$(mktemp -d /tmp/livt-site.XXXXXX)
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 3
            export PYTHONPATH="$PYTHONPATH:$site"
        else
            echo "gpu_check: deepspeed/webdataset are not installed and there is no .whl/ folder to install from" >&2
            exit 3
        fi
    fi
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: torch sees no CUDA device; use --dry-run to see the commands" >&2
        exit 3
    fi
    # DeepSpeed's op builders cannot parse arch names such as "9.0a": name the device's plain compute capability.
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")}
    export TORCH_CUDA_ARCH_LIST
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
fi

for phase in ${PHASES//,/ }; do
    case "$phase" in
        e2e)
            run_phase e2e "${E2E_S:-210}" e2e.log env LIVT_TEST_DEVICE=cuda \
                "$PY" -m pytest -q -p no:cacheprovider tests/test_bf16_configs.py --junitxml "$OUT/e2e.xml" ;;
        bench)
            run_phase bench_vit_large "${BENCH_L_S:-120}" bench_vit_large.log "$PY" scripts/bench_train.py \
                --model vit_large --steps 20 --warmup 6 --gen-images 1024 --json-out "$OUT/bench_vit_large.json"
            run_phase bench_vit_base "${BENCH_B_S:-60}" bench_vit_base.log "$PY" scripts/bench_train.py \
                --model vit_base --input synthetic --steps 20 --warmup 6 --json-out "$OUT/bench_vit_base.json" ;;
        memory)
            run_phase memory_vit_large "${MEM_L_S:-50}" memory_vit_large.log "$PY" scripts/bench_train.py \
                --model vit_large --stages none --zero-stages 1,2,3,2offload --zero-batch 128 --zero-steps 3 \
                --json-out "$OUT/memory_vit_large.json"
            run_phase memory_vit_huge "${MEM_H_S:-40}" memory_vit_huge.log "$PY" scripts/bench_train.py \
                --model vit_huge --stages none --zero-stages 1,2,3,2offload --zero-batch 64 --zero-steps 3 \
                --json-out "$OUT/memory_vit_huge.json" ;;
    esac
done
(( DRY )) && exit 0
"$PY" scripts/gpu_check_summary.py "$OUT"
