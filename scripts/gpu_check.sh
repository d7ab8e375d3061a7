#!/usr/bin/env bash
# The GPU check: everything CI cannot run, in one command on a GPU machine, in under 8 minutes on one GPU.
set -uo pipefail

usage() {
    cat <<'EOF'
usage: scripts/gpu_check.sh [--out DIR] [--phases LIST] [--dry-run] [-h|--help]

Runs on a CUDA machine, from the repository root, and writes DIR/gpu_check.json plus one log per phase.
The phases, in the order they run (the figures first, so a short loan still yields them):
  bench_vit_large    scripts/bench_train.py, ViT-L/16 224, MGP and BFT, synthetic input: the trainer's DeepSpeed
                     engine (its JSON's AdamW and torch's fused AdamW) against two eager loops in the same process
                     (autocast + fused AdamW; bf16 weights + foreach AdamW, the engine's arithmetic)
  bench_vit_base     the same for ViT-B/16, engine and like-for-like eager loop, synthetic and the real shard stream
  e2e_zero1, e2e_zero2, e2e_zero3, e2e_zero2_offload
                     tests/test_bf16_configs.py for one config each on CUDA/nccl (MGP -> export -> BFT -> eval ->
                     export, stop + --resume auto; the world-size change needs >= 2 GPUs); e2e_zero2_offload also
                     runs the gradient accumulation probe of every config on the GPU
  memory_vit_large   peak GPU memory of the ViT-L MGP model per ZeRO config (1, 2, 3, 2offload)
  memory_vit_huge    the same for ViT-H (not in the default run)
Options:
  --out DIR      where results go [gpu_check_out]
  --phases LIST  comma list of phase names or groups (bench, e2e, memory) [bench,e2e,memory]
  --dry-run      print the phases, their limits and commands; runs and writes nothing (works without a GPU)
Each phase has a time limit (seconds, printed by --dry-run; override with <PHASE>_S, e.g. E2E_ZERO3_S=90). At its
limit a phase gets SIGINT (pytest then still writes its JUnit file), then SIGKILL 15 s later; the benchmarks
rewrite their JSON after every finished entry, so a phase cut short keeps what finished and is reported partial.
Packages: torch, timm, tensorboard, pyyaml and numpy must be installed. If deepspeed or webdataset is not,
wheels in .whl/ (if present) are installed into a temporary folder with pip --no-index; nothing is downloaded.
EOF
}

OUT=gpu_check_out
PHASES=bench,e2e,memory
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

ALL=(bench_vit_large bench_vit_base e2e_zero1 e2e_zero2 e2e_zero3 e2e_zero2_offload memory_vit_large memory_vit_huge)
# Seconds per phase, 460 in all (8 minutes with the installs): the e2e phases must finish their config's chain of
# launches to report anything, the benchmarks and the memory sweep keep every entry that finished.
declare -A LIMIT=([bench_vit_large]=90 [bench_vit_base]=50 [e2e_zero1]=70 [e2e_zero2]=65 [e2e_zero3]=70
                  [e2e_zero2_offload]=85 [memory_vit_large]=30 [memory_vit_huge]=45)
declare -A GROUP=([bench]="bench_vit_large bench_vit_base" [e2e]="e2e_zero1 e2e_zero2 e2e_zero3 e2e_zero2_offload"
                  [memory]="memory_vit_large")
declare -A WANTED=()
for item in ${PHASES//,/ }; do
    if [[ -n "${GROUP[$item]:-}" ]]; then
        for phase in ${GROUP[$item]}; do WANTED[$phase]=1; done
    elif [[ -n "${LIMIT[$item]:-}" ]]; then
        WANTED[$item]=1
    else
        echo "gpu_check: unknown phase '$item' (groups: bench, e2e, memory; phases: ${ALL[*]})" >&2
        exit 2
    fi
done

cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

limit_of() {  # limit_of PHASE: its seconds, from <PHASE>_S when set
    local var
    var=$(echo "$1" | tr '[:lower:]' '[:upper:]')_S
    echo "${!var:-${LIMIT[$1]}}"
}

command_of() {  # command_of PHASE: the phase's command line, one word per line
    local bench=("$PY" scripts/bench_train.py)
    local e2e=(env LIVT_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/test_bf16_configs.py)
    case "$1" in
        bench_vit_large) printf '%s\n' "${bench[@]}" --model vit_large --input synthetic --ds-adam config,torch-fused \
            --eager amp-fused,pure-foreach --steps 10 --warmup 3 --json-out "$OUT/$1.json" ;;
        bench_vit_base) printf '%s\n' "${bench[@]}" --model vit_base --input both --ds-adam config \
            --eager pure-foreach --gen-images 1024 --steps 10 --warmup 3 --json-out "$OUT/$1.json" ;;
        e2e_zero1|e2e_zero2|e2e_zero3) printf '%s\n' "${e2e[@]}" -k "${1#e2e_}_bf16" --junitxml "$OUT/$1.xml" ;;
        e2e_zero2_offload) printf '%s\n' "${e2e[@]}" -k "zero2_offload_bf16 or gradients_accumulate" \
            --junitxml "$OUT/$1.xml" ;;
        memory_vit_large) printf '%s\n' "${bench[@]}" --model vit_large --stages none \
            --zero-stages 1,2,3,2offload --zero-batch 128 --zero-steps 3 --json-out "$OUT/$1.json" ;;
        memory_vit_huge) printf '%s\n' "${bench[@]}" --model vit_huge --stages none \
            --zero-stages 1,2,3,2offload --zero-batch 64 --zero-steps 3 --json-out "$OUT/$1.json" ;;
    esac
}

if (( DRY )); then
    total=0
    for phase in "${ALL[@]}"; do
        [[ -n "${WANTED[$phase]:-}" ]] || continue
        mapfile -t cmd < <(command_of "$phase")
        echo "[$phase, limit $(limit_of "$phase")s] $(printf '%q ' "${cmd[@]}")"
        total=$(( total + $(limit_of "$phase") ))
    done
    echo "total limit ${total}s"
    exit 0
fi

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
mkdir -p "$OUT"
: > "$OUT/phases.tsv"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

for phase in "${ALL[@]}"; do
    [[ -n "${WANTED[$phase]:-}" ]] || continue
    limit=$(limit_of "$phase")
    mapfile -t cmd < <(command_of "$phase")
    echo "[gpu_check] $phase (limit ${limit}s): $(printf '%q ' "${cmd[@]}")" >&2
    start=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "${cmd[@]}" > "$OUT/$phase.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$phase" "$rc" "$(( SECONDS - start ))" "$phase.log" >> "$OUT/phases.tsv"
    echo "[gpu_check] $phase: exit $rc after $(( SECONDS - start ))s (log: $OUT/$phase.log)" >&2
done
"$PY" scripts/gpu_check_summary.py "$OUT"
