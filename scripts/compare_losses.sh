#!/usr/bin/env bash
# `make compare`: the losses side by side on the demo set, from ONE MGP run and the same BFT budget, over seeds.
#   MGP:  runs/demo/mgp (reused when it finished; else made by `DEMO_STOP_AFTER=mgp scripts/demo.sh`)
#   BFT:  configs/demo_bft.yaml with loss.name = ce, bal_ce, bce, bal_bce (same tau for bal_ce and bal_bce),
#         plus bal_bce without MGP (model.init empty), and the baselines focal, cb_ce, cb_focal, ldam (LDAM-DRW,
#         trained on hard labels: augment.label_smoothing=0), each with train.seed = 0 .. COMPARE_SEEDS-1
#                                                                         -> runs/compare/<name>/seed<k>
#   then  python -m livt_ds.compare ... --output docs/   -> docs/loss_comparison.md (mean +- std over the seeds),
#         per_class_accuracy.png (mean over seeds), reliability.png
# COMPARE_SEEDS=3 by default (9 x 3 BFT runs of 400-1400 s each on 2 shared CPU cores); COMPARE_SEEDS=1 for a quick
# look. COMPARE_DRY_RUN=1 prints the BFT commands (one per loss and seed) and exits without running anything.
# Runs go seed by seed (all losses with seed 0, then seed 1, ...). COMPARE_LOSSES="ce bal_bce" runs a subset.
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
SEEDS=${COMPARE_SEEDS:-3}

say() { printf '\n[compare %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '[compare] error: %s\n' "$*" >&2; exit 1; }

for tool in python deepspeed; do
    command -v "$tool" > /dev/null || die "'$tool' not found on PATH: run 'make compare' (it creates .venv), or activate the venv (source .venv/bin/activate) and run 'bash scripts/compare_losses.sh'"
done

[[ "$SEEDS" =~ ^[1-9][0-9]*$ ]] || die "COMPARE_SEEDS=$SEEDS: give a positive number of seeds (1 for a quick look)"
ALL_NAMES=(ce bal_ce bce bal_bce bal_bce_no_mgp focal cb_ce cb_focal ldam)
ALL_LABELS=("CE" "Bal-CE" "BCE" "Bal-BCE" "Bal-BCE, no MGP" "Focal" "CB-CE" "CB-focal" "LDAM-DRW")
read -r -a WANTED <<< "${COMPARE_LOSSES:-${ALL_NAMES[*]}}"
for want in "${WANTED[@]}"; do
    [[ " ${ALL_NAMES[*]} " == *" $want "* ]] || die "COMPARE_LOSSES: unknown '$want'; choose from: ${ALL_NAMES[*]}"
done
NAMES=()   # the wanted ones, in the order above (the table's row order)
LABELS=()
for i in "${!ALL_NAMES[@]}"; do
    if [[ " ${WANTED[*]} " == *" ${ALL_NAMES[$i]} "* ]]; then NAMES+=("${ALL_NAMES[$i]}"); LABELS+=("${ALL_LABELS[$i]}"); fi
done
source scripts/run_helpers.sh  # devices (NPROC, DS_CONFIG, HW_TEXT), ds_launch, micro_batch, finished
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

bft_overrides() {  # bft_overrides NAME SEED: the recipe overrides of one BFT run (into the array OVERRIDES)
    local name=$1 seed=$2 loss=${1%_no_mgp} init=$MGP
    [[ "$name" == *_no_mgp ]] && init=""
    OVERRIDES=(data.path="$SHARDS" model.init="$init" loss.name="$loss" train.seed="$seed" "${BFT_MICRO[@]}")
    # LDAM's margin belongs to one true class: no soft targets (the demo recipe has no mixup / cutmix already)
    [[ "$loss" == ldam ]] && OVERRIDES+=(augment.label_smoothing=0)
    OVERRIDES+=("${EXTRA[@]}")
}

if [[ "${COMPARE_DRY_RUN:-0}" == 1 ]]; then
    for (( seed = 0; seed < SEEDS; seed++ )); do
        for name in "${NAMES[@]}"; do
            bft_overrides "$name" "$seed"
            echo "livt finetune --config $BFT_CONFIG --ds-config $DS_CONFIG --output $OUT/$name/seed$seed ${OVERRIDES[*]}"
        done
    done
    exit 0
fi

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
RUN_ARGS=()   # run folders for livt_ds.compare, one per (loss, seed)
LABEL_ARGS=() # the matching labels: runs of one label are averaged as seeds
WALLS=()      # BFT wall seconds of the runs trained now or before
TOTAL=$(( ${#NAMES[@]} * SEEDS ))
n=0
RESUMED_NOTE="this launch resumed an interrupted run"  # in wall_time.txt: the time is not the run's
for (( seed = 0; seed < SEEDS; seed++ )); do
    for i in "${!NAMES[@]}"; do
        n=$(( n + 1 ))
        name=${NAMES[$i]}
        loss=${name%_no_mgp}
        init=$MGP
        [[ "$name" == *_no_mgp ]] && init=""
        run=$OUT/$name/seed$seed
        bft_overrides "$name" "$seed"
        overrides=("${OVERRIDES[@]}")
        T=$(date +%s)
        say "$n/$TOTAL BFT ${LABELS[$i]}, seed $seed: loss.name=$loss model.init=${init:-'' (random init)} -> $run"
        if [[ "${COMPARE_FRESH:-0}" != 1 ]] && finished "$run"; then
            say "$run already finished, reusing it"
        elif [[ "$name" == bal_bce ]] && finished runs/demo/bft && same_recipe runs/demo/bft "${overrides[@]}"; then
            say "runs/demo/bft (make demo) is this very run (same recipe, MGP and seed): reusing it"
            run=runs/demo/bft
        else
            part=""  # a launch that resumes an interrupted run times only its own part: not a run's wall time
            [[ -d "$run/checkpoints" ]] && part="; $RESUMED_NOTE"
            ds_launch finetune \
                --config "$BFT_CONFIG" --ds-config "$DS_CONFIG" --output "$run" "${overrides[@]}" log.progress=false \
                || die "BFT ${LABELS[$i]} seed $seed failed (see above); its run folder is $run"
            echo "$(( $(date +%s) - T )) s wall on $DEVICE_TEXT (load average at the end: $(cut -d' ' -f1-3 /proc/loadavg))$part" \
                > "$run/wall_time.txt"
            say "${LABELS[$i]} seed $seed done in $(( $(date +%s) - T )) s"
        fi
        RUN_ARGS+=("$run")
        LABEL_ARGS+=("${LABELS[$i]}")
        if [[ -f "$run/wall_time.txt" ]] && ! grep -qF "$RESUMED_NOTE" "$run/wall_time.txt"; then
            WALLS+=("$(cut -d' ' -f1 "$run/wall_time.txt")")
        fi
    done
done
NOTES=()
if (( ${#WALLS[@]} )); then
    read -r lo hi <<< "$(printf '%s\n' "${WALLS[@]}" | sort -n | sed -n '1p;$p' | tr '\n' ' ')"
    NOTES+=("BFT wall time per run: $lo..$hi s (${#WALLS[@]} runs) on $DEVICE_TEXT, with other jobs on the machine")
fi
if [[ -f "$MGP/wall_time.txt" ]]; then NOTES+=("MGP (shared by all runs): $(< "$MGP/wall_time.txt")"); fi

# ------------------------------------------------------------------------------------------ report
BUDGET=$(python - "$MGP" "${RUN_ARGS[0]}" <<'EOF'
import sys
from pathlib import Path
import yaml
mgp, bft = (yaml.safe_load((Path(p) / "config.yaml").read_text()) for p in sys.argv[1:3])
mt, bt, m = mgp["train"], bft["train"], bft["model"]
print(f"{m['name']} ({m['img_size']} px, patch {m['patch_size']}); MGP {mt['epochs']} epochs (batch {mt['batch_size']}, "
      f"blr {mt['blr']}, mask {mgp['model']['mask_ratio']}, decoder {mgp['model']['decoder_depth']}x"
      f"{mgp['model']['decoder_dim']}); BFT {bt['epochs']} epochs per loss (batch {bt['batch_size']}, blr {bt['blr']}, "
      f"layer decay {bt['layer_decay']}, crop scale {bft['augment'].get('crop_scale')}); tau {bft['loss']['tau']} "
      "for Bal-CE and Bal-BCE")
EOF
)
NOTE_ARGS=(--note "Budget: $BUDGET; seeds 0..$(( SEEDS - 1 )) (train.seed sets the initial head weights, all weights without MGP, the data order, augmentation and drop-path; the MGP run is shared)." --note "Data: the built-in demo set ($SHARDS): 10 classes, 32 px, 1,236 long-tailed training images (500..5 per class), 100 val images per class; each few-shot class is a new combination of colour, texture and shape values that the frequent classes need (livt_ds/data/demo.py).")
for note in "${NOTES[@]}"; do NOTE_ARGS+=(--note "$note"); done
NOTE_ARGS+=(--note "A few seeds of one small model on one synthetic set: a difference smaller than about two standard deviations is not a result. What these runs show and do not show: README.md, 'Demo results'.")
say "writing the report to $DOCS/"
python -m livt_ds.compare "${RUN_ARGS[@]}" --labels "${LABEL_ARGS[@]}" --output "$DOCS" --meta "$SHARDS" \
    --title "Loss comparison on the demo set" "${NOTE_ARGS[@]}" \
    --command "$(if [[ "$SEEDS" != 3 ]]; then printf 'COMPARE_SEEDS=%s ' "$SEEDS"; fi; if [[ -n "${COMPARE_LOSSES:-}" ]]; then printf 'COMPARE_LOSSES="%s" ' "$COMPARE_LOSSES"; fi; if [[ -n "${COMPARE_DOCS:-}" ]]; then printf 'COMPARE_DOCS=%s ' "$COMPARE_DOCS"; fi)make compare   # = bash scripts/compare_losses.sh (BFT: configs/demo_bft.yaml, MGP: configs/demo_mgp.yaml)" \
    || die "the report failed (see above)"
say "finished in $(( $(date +%s) - START )) s; TensorBoard: tensorboard --logdir $OUT"
