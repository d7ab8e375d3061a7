"""Shared fixtures: a tiny long-tailed image folder sharded once per test session, and launch helpers."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TRAIN_COUNTS = (24, 14, 8, 5)  # a long tail over 4 classes: 51 training images
VAL_PER_CLASS = 5


def _image(rng: np.random.Generator, label: int, size: int = 20) -> bytes:
    """A class-dependent colour + stripe pattern with noise, so the classes are learnable but not trivial."""
    base = np.zeros((size, size, 3), np.float32)
    base[..., label % 3] = 0.7
    stripes = (np.arange(size)[:, None] // (2 + label) % 2).astype(np.float32)
    base += 0.3 * stripes[..., None]
    base += rng.normal(0, 0.15, base.shape)
    buf = io.BytesIO()
    Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_image_folder(root: Path, train_counts=TRAIN_COUNTS, val_per_class=VAL_PER_CLASS, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for split, counts in (("train", train_counts), ("val", [val_per_class] * len(train_counts))):
        for label, count in enumerate(counts):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (folder / f"img{i:03d}.png").write_bytes(_image(rng, label))
    return root


@pytest.fixture(scope="session")
def toy_shards(tmp_path_factory) -> Path:
    """shards/toy-like set: 51 long-tailed training images in 4 shards, 20 balanced val images in 2 shards."""
    from livt_ds.data.make_shards import main as make_shards

    root = tmp_path_factory.mktemp("toy")
    make_image_folder(root / "raw")
    out = root / "shards"
    code = make_shards(["--source", "imagefolder", "--input", str(root / "raw"), "--output", str(out),
                        "--shard-size", "14", "--workers", "1"])
    assert code == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["class_counts"] == list(TRAIN_COUNTS)
    return out


# CI runs the launches on CPU ranks (gloo). scripts/gpu_check.sh runs tests/test_bf16_configs.py with
# LIVT_TEST_DEVICE=cuda: the same launches on CUDA ranks (nccl), as many as there are GPUs, 2 at most.
TEST_DEVICE = os.environ.get("LIVT_TEST_DEVICE", "cpu")


def launch_ranks(wanted: int = 2) -> int:
    """How many ranks a launch test gets: ``wanted`` CPU processes, or on CUDA at most one per GPU."""
    if TEST_DEVICE == "cpu":
        return wanted
    import torch

    return min(wanted, torch.cuda.device_count())


def launcher_env() -> dict[str, str]:
    env = dict(os.environ)
    if TEST_DEVICE == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    else:
        env.pop("DS_ACCELERATOR", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(ranks: int, launcher: str = "torchrun") -> list[str]:
    """The command line that starts ``ranks`` processes of ``python -m livt_ds``: torchrun (one launcher process
    importing torch only: the cheap default of the suite) or the deepspeed launcher users run (runner + launch,
    each importing deepspeed), which the shared pipeline runs, the SIGTERM, multi-node and chaos tests use."""
    n, port = str(launch_ranks(ranks)), str(free_port())
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", n, "--master_port", port,
                "--module", "livt_ds"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", n, "--master_port", port,
            "--module", "livt_ds"]


def run_livt(args: list[str], *, ranks: int = 2, cwd: Path | None = None, check: bool = True,
             timeout: int = 600, launcher: str | None = None) -> subprocess.CompletedProcess:
    """Run `livt ARGS` with ``ranks`` CPU processes under ``launcher`` (or plainly when ranks == 0). A test that
    reads the exit code (``check=False``) gets the deepspeed launcher by default: it passes a rank's exit code on,
    while torchrun reports every failure as 1."""
    launcher = launcher or ("torchrun" if check else "deepspeed")
    if ranks:
        cmd = [*launch_command(ranks, launcher), *args]
    else:
        cmd = [sys.executable, "-m", "livt_ds", *args]
    result = subprocess.run(cmd, cwd=cwd or REPO, env=launcher_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r}


MGP_ARGS = ["--config", "configs/tiny_mgp.yaml", "--ds-config", "ds_configs/cpu_fp32.json"]
BFT_ARGS = ["--config", "configs/tiny_bft.yaml", "--ds-config", "ds_configs/cpu_fp32.json"]


@pytest.fixture(scope="session")
def pipeline_runs(toy_shards, tmp_path_factory):
    """MGP -> BFT (from the MGP run) -> export, under the deepspeed launcher with 2 CPU ranks; shared by the
    test files that need trained runs (test_training, test_predict)."""
    out = tmp_path_factory.mktemp("runs")
    data = f"data.path={toy_shards}"
    run_livt(["pretrain", *MGP_ARGS, "--output", str(out / "mgp"), data, "train.epochs=2"], launcher="deepspeed")
    run_livt(["finetune", *BFT_ARGS, "--output", str(out / "bft"), data, f"model.init={out / 'mgp'}", "train.epochs=2",
              "augment.mixup=0", "augment.cutmix=0"], launcher="deepspeed")
    run_livt(["export", str(out / "bft")], ranks=0)
    run_livt(["export", str(out / "mgp")], ranks=0)
    return out
