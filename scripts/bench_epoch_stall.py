#!/usr/bin/env python
"""Epoch-boundary stall: how long the first optimizer step of an epoch takes against the median step.

Runs the demo BFT recipe (configs/demo_bft.yaml) as one rank in one process with one loader worker, a log line
every step and no evaluation or checkpoint inside the run (they would stall the boundary for their own reasons),
from scratch (``model.init`` empty: the weights do not change the timing), then reads the step times back from the
run's metrics.jsonl (a step's time = the global batch / its logged ``images_per_s``). The first step of the run
(worker and engine start-up) is left out. Without ``--shards`` it first writes the demo shard set into a temporary
folder. Prints one JSON object (``--json-out F`` also writes it to F).

    python scripts/bench_epoch_stall.py --epochs 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def step_seconds(metrics: Path, global_batch: int) -> dict[int, float]:
    """Optimizer step (1-based) -> seconds, from a run logged every step."""
    times = {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "images_per_s" in record:
            times[int(record["step"])] = global_batch / record["images_per_s"]
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", help="the demo shard set (written to a temporary folder when absent)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--config", default="configs/demo_bft.yaml")
    p.add_argument("--ds-config", help="DeepSpeed JSON [zero2_bf16 on CUDA, cpu_fp32 otherwise]")
    p.add_argument("--repo", type=Path, default=REPO, help="the checkout whose livt_ds runs (compare two versions)")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    repo = args.repo.resolve()
    import torch

    ds_config = args.ds_config or ("ds_configs/zero2_bf16.json" if torch.cuda.is_available() else
                                   "ds_configs/cpu_fp32.json")
    with tempfile.TemporaryDirectory(prefix="bench_stall_") as tmp:
        shards = args.shards
        if not shards:
            shards = str(Path(tmp) / "demo")
            subprocess.run([sys.executable, "scripts/make_shards.py", "--source", "demo", "--output", shards],
                           cwd=repo, check=True, stdout=subprocess.DEVNULL)
        run = Path(tmp) / "run"
        env = {**os.environ, "PYTHONPATH": str(repo)}
        env.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        cmd = [sys.executable, "-m", "livt_ds", "finetune", "--config", args.config, "--ds-config", ds_config,
               "--output", str(run), f"data.path={shards}", "model.init=", f"data.num_workers={args.workers}",
               "log.every_steps=1", "log.progress=false", f"train.epochs={args.epochs}", "train.warmup_epochs=0",
               "eval.every=0", "checkpoint.every_steps=0"]
        subprocess.run(cmd, cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        schedule = yaml.safe_load((run / "run.yaml").read_text())["schedule"]
        times = step_seconds(run / "metrics.jsonl", schedule["global_batch"])
    per_epoch = schedule["steps_per_epoch"]
    steady = [t for step, t in times.items() if step > 1]
    median = statistics.median(steady)
    firsts = {e: times[e * per_epoch + 1] for e in range(1, args.epochs) if e * per_epoch + 1 in times}
    report = {
        "what": "first optimizer step of each epoch (after the first) over the median step; demo BFT, 1 rank, "
                f"{args.workers} loader worker(s), a log line every step",
        "first_step_over_median": {str(e): round(t / median, 2) for e, t in firsts.items()},
        "max_first_step_over_median": round(max(firsts.values()) / median, 2) if firsts else None,
        "median_step_s": round(median, 4),
        "first_step_s": {str(e): round(t, 4) for e, t in firsts.items()},
        "steps_per_epoch": per_epoch,
        "epochs": args.epochs,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "load_avg_1min_after": round(os.getloadavg()[0], 2),
        "repo": str(repo),
        "command": " ".join(["scripts/bench_epoch_stall.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
