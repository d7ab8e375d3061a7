#!/usr/bin/env bash
# `make compare`: the losses side by side on the demo set, from ONE MGP run and the same BFT budget and seed.
#   MGP:  runs/demo/mgp (reused when it finished; else made by `DEMO_STOP_AFTER=mgp scripts/demo.sh`)
#   BFT:  configs/demo_bft.yaml with loss.name = ce, bal_ce, bce, bal_bce (same tau for bal_ce and bal_bce),
#         plus bal_bce without MGP (model.init empty)                    -> runs/compare/<name>
#   then  python -m livt_ds.compare ... --output docs/   -> docs/loss_comparison.md, per_class_accuracy.png,
#         reliability.png
# Finished runs are reused (their checkpoints are resumed, which ends at once); COMPARE_FRESH=1 retrains them.
# COMPARE_DOCS=DIR writes the report elsewhere; COMPARE_OVERRIDES="train.epochs=10" applies to every BFT run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
MGP=runs/demo/mgp
OUT=runs/compare
DOCS=${COMPARE_DOCS:-docs}
SHARDS=shards/demo
BFT_CONFIG=configs/demo_bft.yaml
read -r -a EXTRA <<< "${COMPARE_OVERRIDES:-}"

say() { printf '\n[compare %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '[compare] error: %s\n' "$*" >&2; exit 1; }

for tool in python deepspeed; do
    command -v "$tool" > /dev/null || die "'$tool' not found on PATH: run 'make compare' (it creates .venv), or activate the venv (source .venv/bin/activate) and run 'bash scripts/compare_losses.sh'"
done

source scripts/run_helpers.sh  # devices (NPROC, DS_CONFIG, HW_TEXT), micro_batch, free_port, finished
DEVICE_TEXT="$HW_TEXT"

read -r -a BFT_MICRO <<< "$(micro_batch "$BFT_CONFIG")"
same_recipe() {  # same_recipe RUN OVERRIDES...: RUN trained BFT_CONFIG + OVERRIDES (ignoring log/eval/checkpoint)
    python - "$BFT_CONFIG" "$@" <<'EOF'
import sys
from pathlib import Path
import yaml
from livt_ds.config import load_recipe, recipe_to_dict
config, run, overrides = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
try:
    done = yaml.safe_load((run / "config.yaml").read_text())
except OSError:
    sys.exit(1)
want = recipe_to_dict(load_recipe(config, overrides))
same = all(done.get(k) == want[k] for k in want if k not in ("log", "eval", "checkpoint"))
sys.exit(0 if same else 1)
EOF
}

START=$(date +%s)

# ------------------------------------------------------------------------------------------ MGP (shared)
if finished "$MGP"; then
    say "reusing the finished MGP run $MGP"
else
    say "no finished MGP run in $MGP: running it (shards + MGP of scripts/demo.sh)"
    DEMO_STOP_AFTER=mgp bash scripts/demo.sh
fi
[[ -f "$SHARDS/meta.json" ]] || die "$SHARDS/meta.json missing; run 'bash scripts/demo.sh' first"

if [[ "${COMPARE_FRESH:-0}" == 1 && -d "$OUT" ]]; then
    say "COMPARE_FRESH=1: removing $OUT"
    rm -rf "$OUT"
fi
mkdir -p "$OUT"

# ------------------------------------------------------------------------------------------ BFT runs
NAMES=(ce bal_ce bce bal_bce bal_bce_no_mgp)
LABELS=("CE" "Bal-CE" "BCE" "Bal-BCE" "Bal-BCE, no MGP")
NOTES=()
RUNS=()
for i in "${!NAMES[@]}"; do
    name=${NAMES[$i]}
    loss=${name%_no_mgp}
    init=$MGP
    [[ "$name" == *_no_mgp ]] && init=""
    overrides=(data.path="$SHARDS" model.init="$init" loss.name="$loss" "${BFT_MICRO[@]}" "${EXTRA[@]}")
    T=$(date +%s)
    say "$(( i + 1 ))/${#NAMES[@]} BFT ${LABELS[$i]}: loss.name=$loss model.init=${init:-'' (random init)} -> $OUT/$name"
    if [[ "${COMPARE_FRESH:-0}" != 1 ]] && finished "$OUT/$name"; then
        say "$OUT/$name already finished, reusing it"
        RUNS+=("$OUT/$name")
        continue
    fi
    if [[ "$name" == bal_bce ]] && finished runs/demo/bft && same_recipe runs/demo/bft "${overrides[@]}"; then
        say "runs/demo/bft (make demo) is this very run (same recipe, MGP and seed): reusing it"
        RUNS+=(runs/demo/bft)
        continue
    fi
    deepspeed --num_gpus "$NPROC" --master_port "$(free_port)" --module livt_ds finetune \
        --config "$BFT_CONFIG" --ds-config "$DS_CONFIG" --output "$OUT/$name" "${overrides[@]}" log.progress=false \
        || die "BFT ${LABELS[$i]} failed (see above); its run folder is $OUT/$name"
    RUNS+=("$OUT/$name")
    echo "$(( $(date +%s) - T )) s wall on $DEVICE_TEXT (load average at the end: $(cut -d' ' -f1-3 /proc/loadavg))" \
        > "$OUT/$name/wall_time.txt"
    say "${LABELS[$i]} done in $(( $(date +%s) - T )) s"
done
for i in "${!RUNS[@]}"; do
    if [[ -f "${RUNS[$i]}/wall_time.txt" ]]; then NOTES+=("BFT ${LABELS[$i]}: $(< "${RUNS[$i]}/wall_time.txt")"); fi
done
if [[ -f "$MGP/wall_time.txt" ]]; then NOTES+=("MGP (shared): $(< "$MGP/wall_time.txt")"); fi

# ------------------------------------------------------------------------------------------ report
BUDGET=$(python - "$MGP" "${RUNS[3]}" <<'EOF'
import sys
from pathlib import Path
import yaml
mgp, bft = (yaml.safe_load((Path(p) / "config.yaml").read_text()) for p in sys.argv[1:3])
mt, bt, m = mgp["train"], bft["train"], bft["model"]
print(f"{m['name']} ({m['img_size']} px, patch {m['patch_size']}); MGP {mt['epochs']} epochs (batch {mt['batch_size']}, "
      f"blr {mt['blr']}, mask {mgp['model']['mask_ratio']}, decoder {mgp['model']['decoder_depth']}x"
      f"{mgp['model']['decoder_dim']}); BFT {bt['epochs']} epochs per loss (batch {bt['batch_size']}, blr {bt['blr']}, "
      f"layer decay {bt['layer_decay']}, seed {bt['seed']}); tau {bft['loss']['tau']} for Bal-CE and Bal-BCE")
EOF
)
NOTE_ARGS=(--note "Budget: $BUDGET." --note "Data: the built-in demo set ($SHARDS): 10 classes, 32 px, 1,236 long-tailed training images (500..5 per class), 100 val images per class.")
for note in "${NOTES[@]}"; do NOTE_ARGS+=(--note "$note"); done
say "writing the report to $DOCS/"
python -m livt_ds.compare "${RUNS[@]}" --labels "${LABELS[@]}" --output "$DOCS" --meta "$SHARDS" \
    --title "Loss comparison on the demo set" "${NOTE_ARGS[@]}" \
    --command "make compare   # = bash scripts/compare_losses.sh (BFT: configs/demo_bft.yaml, MGP: configs/demo_mgp.yaml)" \
    || die "the report failed (see above)"
say "finished in $(( $(date +%s) - START )) s; TensorBoard: tensorboard --logdir $OUT"
