# Shell helpers shared by scripts/demo.sh and scripts/compare_losses.sh (sourced).

# Devices: every CUDA GPU (1, 2, 4 or 8 so the recipes' global batches split evenly; ZeRO-2 bf16), else 2 CPU
# processes (ZeRO-2 fp32, gloo, one thread each). Sets NUM_CUDA, NPROC, DS_CONFIG, CORES and HW_TEXT.
CORES=$(env -u OMP_NUM_THREADS nproc)  # nproc would report OMP_NUM_THREADS
NUM_CUDA=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if (( NUM_CUDA > 0 )); then
    NPROC=1
    for n in 2 4 8; do (( NUM_CUDA >= n )) && NPROC=$n; done
    DS_CONFIG=ds_configs/zero2_bf16.json
    HW_TEXT="$NPROC CUDA GPU(s)"
else
    NPROC=2
    DS_CONFIG=ds_configs/cpu_fp32.json
    export DS_ACCELERATOR=cpu
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # 2 ranks share the cores; more threads only oversubscribe
    HW_TEXT="$NPROC CPU processes on $CORES cores"
fi

micro_batch() {  # micro_batch CONFIG: on GPUs, the override that splits the recipe's global batch over NPROC ranks
    if (( NUM_CUDA > 0 )); then
        python -c "import sys, yaml; print(f'train.micro_batch={yaml.safe_load(open(sys.argv[1]))[\"train\"][\"batch_size\"] // $NPROC}')" "$1"
    fi
}
ds_launch() {  # ds_launch ARGS...: the livt CLI on NPROC local ranks through the DeepSpeed launcher
    # --log_level error: the launcher's INFO lines and its "Unable to find hostfile" warning (one machine) stay out of
    # the console; its errors (a rank that failed) and everything the ranks print still show.
    deepspeed --log_level error --num_gpus "$NPROC" --master_port "$(free_port)" --module livt_ds "$@"
}
free_port() { python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

finished() {  # finished RUN: its latest checkpoint is the last step of its schedule (run.yaml) and it has metrics
    python - "$1" <<'PYEOF'
import sys
from pathlib import Path
import yaml
run = Path(sys.argv[1])
try:
    total = yaml.safe_load((run / "run.yaml").read_text())["schedule"]["total_steps"]
    tag = (run / "checkpoints" / "latest").read_text().strip()
    done = int(tag.removeprefix("step")) >= int(total) and (run / "metrics.json").is_file()
except (OSError, KeyError, TypeError, ValueError):
    done = False
sys.exit(0 if done else 1)
PYEOF
}
