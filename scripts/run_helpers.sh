# Shell helpers shared by scripts/demo.sh and scripts/compare_losses.sh (sourced; they read NUM_CUDA and NPROC).

micro_batch() {  # micro_batch CONFIG: on GPUs, the override that splits the recipe's global batch over NPROC ranks
    if (( NUM_CUDA > 0 )); then
        python -c "import sys, yaml; print(f'train.micro_batch={yaml.safe_load(open(sys.argv[1]))[\"train\"][\"batch_size\"] // $NPROC}')" "$1"
    fi
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
