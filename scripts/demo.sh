#!/usr/bin/env bash
# `make demo`: LiVT end to end on the built-in long-tailed demo set (10 classes, 32 px, 500..5 training images).
#   1. shard the demo set into shards/demo (skipped when it is already there and current)
#   2. MGP  (masked generative pretraining, configs/demo_mgp.yaml)   -> runs/demo/mgp
#   3. BFT  (balanced fine-tuning with Bal-BCE, configs/demo_bft.yaml) -> runs/demo/bft
#   4. `livt eval` of the fine-tuned model on the balanced val split  -> runs/demo/eval
#   5. table (top-1, many/medium/few, ECE, MCE) + per-class plot        -> runs/demo/report
# Runs on every CUDA GPU of the machine (ZeRO-2, bf16), else on 2 CPU processes (ZeRO-2, fp32, gloo).
# About 8-10 minutes on 2 quiet CPU cores (45 minutes measured while other jobs kept the load at 6-33).
# Finished runs are reused,
# interrupted ones resume from their checkpoints;
# DEMO_FRESH=1 deletes runs/demo first. Extra recipe overrides for both stages: DEMO_OVERRIDES="train.seed=1".
# DEMO_STOP_AFTER=mgp stops after pretraining (scripts/compare_losses.sh uses it).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=runs/demo
SHARDS=shards/demo
MGP_CONFIG=configs/demo_mgp.yaml
BFT_CONFIG=configs/demo_bft.yaml
read -r -a EXTRA <<< "${DEMO_OVERRIDES:-}"

say() { printf '\n[demo %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '[demo] error: %s\n' "$*" >&2; exit 1; }

for tool in python deepspeed livt; do
    command -v "$tool" > /dev/null || die "'$tool' not found on PATH: run 'make demo' (it creates .venv), or activate the venv (source .venv/bin/activate) and run 'bash scripts/demo.sh'"
done
python -c "import livt_ds" 2> /dev/null || die "python cannot import livt_ds: install the package (make venv) and activate .venv"

# ------------------------------------------------------------------------------------------ devices
source scripts/run_helpers.sh  # devices (NPROC, DS_CONFIG, HW_TEXT), ds_launch, micro_batch, finished
if (( NUM_CUDA > 0 )); then
    DEVICE_TEXT="$HW_TEXT (of $NUM_CUDA), $DS_CONFIG"
else
    DEVICE_TEXT="$HW_TEXT (no CUDA GPU found), $DS_CONFIG"
fi




read -r -a MGP_MICRO <<< "$(micro_batch "$MGP_CONFIG")"
read -r -a BFT_MICRO <<< "$(micro_batch "$BFT_CONFIG")"

wall_time() {  # wall_time RUN T0: note how long the run took (shown by scripts/compare_losses.sh)
    echo "$(( $(date +%s) - $2 )) s wall on $HW_TEXT (load average at the end: $(cut -d' ' -f1-3 /proc/loadavg))" \
        > "$1/wall_time.txt"
}

START=$(date +%s)
stage_done() { say "$1 done in $(( $(date +%s) - $2 )) s (total $(( $(date +%s) - START )) s)"; }

if [[ "${DEMO_FRESH:-0}" == 1 && -d "$OUT" ]]; then
    say "DEMO_FRESH=1: removing $OUT"
    rm -rf "$OUT"
fi
mkdir -p "$OUT"
say "LiVT demo on $DEVICE_TEXT; output in $OUT/"

# ------------------------------------------------------------------------------------------ 1. shards
T=$(date +%s)
SHARD_STATE=$(python - "$SHARDS" <<'EOF'
import hashlib, json, sys, tarfile
from itertools import islice
from pathlib import Path
from livt_ds.data.demo import demo_class_counts, demo_samples

def current(folder: Path, meta: dict) -> bool:
    """Same class counts and the first rendered training images are in the shards (demo.py unchanged)."""
    if meta.get("class_counts") != demo_class_counts("train"):
        return False
    stored = set()
    for name in meta["splits"]["train"]["shards"]:
        with tarfile.open(folder / name) as tar:
            stored |= {hashlib.sha1(tar.extractfile(m).read()).hexdigest() for m in tar if m.name.endswith(".png")}
    return all(hashlib.sha1(png).hexdigest() in stored for _, png, _ in islice(demo_samples("train"), 16))

folder = Path(sys.argv[1])
if not (folder / "meta.json").is_file():
    print("missing")
else:
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("source") != "demo":
        print(f"foreign:{meta.get('source')}")
    else:
        try:
            print("ok" if current(folder, meta) else "stale")
        except (OSError, KeyError, tarfile.TarError):
            print("stale")
EOF
)
case "$SHARD_STATE" in
    ok) say "1/4 shards: $SHARDS/meta.json is the current demo set, skipping" ;;
    missing) say "1/4 shards: writing the demo set to $SHARDS"
             python scripts/make_shards.py --source demo --output "$SHARDS" ;;
    stale) say "1/4 shards: $SHARDS is from an older demo set, rewriting it"
           python scripts/make_shards.py --source demo --output "$SHARDS" --overwrite
           if [[ -d "$OUT/mgp" ]]; then say "note: $OUT was trained on the older set; DEMO_FRESH=1 retrains it"; fi ;;
    foreign:*) die "$SHARDS/meta.json holds another data set (source '${SHARD_STATE#foreign:}'), not the demo; move it away or delete $SHARDS" ;;
    *) die "could not check $SHARDS/meta.json ($SHARD_STATE)" ;;
esac
stage_done "shards" "$T"

# ------------------------------------------------------------------------------------------ 2. MGP
T=$(date +%s)
say "2/4 MGP: masked generative pretraining, $MGP_CONFIG -> $OUT/mgp (progress bar below)"
if finished "$OUT/mgp"; then
    say "$OUT/mgp already finished: reusing it (DEMO_FRESH=1 retrains)"
else
    ds_launch pretrain --config "$MGP_CONFIG" --ds-config "$DS_CONFIG" --output "$OUT/mgp" \
        data.path="$SHARDS" "${MGP_MICRO[@]}" "${EXTRA[@]}" \
        || die "MGP failed (see the messages above); its run folder is $OUT/mgp"
    wall_time "$OUT/mgp" "$T"
fi
stage_done "MGP" "$T"
if [[ "${DEMO_STOP_AFTER:-}" == mgp ]]; then
    say "DEMO_STOP_AFTER=mgp: stopping after pretraining ($OUT/mgp)"
    exit 0
fi

# ------------------------------------------------------------------------------------------ 3. BFT
T=$(date +%s)
say "3/4 BFT: balanced fine-tuning with Bal-BCE, $BFT_CONFIG (model.init=$OUT/mgp) -> $OUT/bft"
if finished "$OUT/bft"; then
    say "$OUT/bft already finished: reusing it (DEMO_FRESH=1 retrains)"
else
    ds_launch finetune --config "$BFT_CONFIG" --ds-config "$DS_CONFIG" --output "$OUT/bft" \
        data.path="$SHARDS" model.init="$OUT/mgp" "${BFT_MICRO[@]}" "${EXTRA[@]}" \
        || die "BFT failed (see the messages above); its run folder is $OUT/bft"
    wall_time "$OUT/bft" "$T"
fi
stage_done "BFT" "$T"

# ------------------------------------------------------------------------------------------ 4. eval + table
T=$(date +%s)
say "4/4 eval: livt eval of $OUT/bft on the balanced val split -> $OUT/eval"
livt eval --config "$BFT_CONFIG" --ds-config "$DS_CONFIG" --output "$OUT/eval" \
    data.path="$SHARDS" model.init="$OUT/bft" "${EXTRA[@]}" \
    || die "evaluation failed (see the messages above)"
mkdir -p "$OUT/report"
python -m livt_ds.compare "$OUT/eval" --labels "MGP + BFT (Bal-BCE)" --output "$OUT/report" --meta "$SHARDS" \
    --title "LiVT demo" --markdown-name results.md --command "bash scripts/demo.sh" > "$OUT/report/table.txt" 2>&1 \
    || { cat "$OUT/report/table.txt" >&2 2> /dev/null; die "could not write the report"; }
stage_done "eval" "$T"

python - "$OUT/eval/metrics.json" "$SHARDS" <<'EOF'
import json, sys
from pathlib import Path
from livt_ds.report import results_table_markdown
metrics = json.loads(Path(sys.argv[1]).read_text())
meta = json.loads((Path(sys.argv[2]) / "meta.json").read_text())
print("\nResults on the balanced val split (%d images; percent; ECE/MCE with 15 bins):\n" % metrics["num_samples"])
print(results_table_markdown({"MGP + BFT (Bal-BCE)": metrics}))
print("Per-class accuracy, head -> tail (training images):")
order = sorted(range(len(meta["class_counts"])), key=lambda i: -meta["class_counts"][i])
for i in order:
    acc = metrics["per_class"][i]
    print(f"  {meta['classes'][i]:<26} {meta['class_counts'][i]:>4}  {'-' if acc is None else f'{acc:5.1f}'}")
EOF

cat <<EOF

[demo] finished in $(( $(date +%s) - START )) s on $DEVICE_TEXT.
  TensorBoard:  tensorboard --logdir $OUT      (loss, lr, eval metrics, reconstructions, per-class accuracy)
  Plots:        $OUT/mgp/plots/ (MGP reconstructions), $OUT/bft/plots/ and $OUT/eval/plots/ (per-class, reliability)
  Report:       $OUT/report/results.md, per_class_accuracy.png, reliability.png
  Metrics:      $OUT/eval/metrics.json;  the model: livt export $OUT/bft
  Compare the losses (CE, Bal-CE, BCE, Bal-BCE, no MGP) on the same budget: make compare
EOF
