"""End-to-end DeepSpeed runs on CPU (gloo, 2 ranks) through the real CLI and the deepspeed launcher."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port, launcher_env, run_livt, train_losses

pytestmark = pytest.mark.slow

MGP = ["--config", "configs/tiny_mgp.yaml", "--ds-config", "ds_configs/cpu_fp32.json"]
BFT = ["--config", "configs/tiny_bft.yaml", "--ds-config", "ds_configs/cpu_fp32.json"]


def tb_tags(run: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in (run / "tensorboard").glob("events.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        tags |= set(acc.Tags()["scalars"]) | set(acc.Tags()["images"])
    return tags


def test_pretrain_writes_logs_checkpoints_and_reconstructions(pipeline_runs):
    mgp = pipeline_runs / "mgp"
    for name in ("config.yaml", "ds_config.json", "metrics.jsonl", "metrics.json", "checkpoints/latest"):
        assert (mgp / name).exists(), name
    losses = train_losses(mgp)
    assert sorted(losses) == list(range(1, 7))  # 51 images // (8 x 2 ranks) = 3 steps per epoch, 2 epochs
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    tags = tb_tags(mgp)
    assert {"loss", "lr", "images_per_s", "grad_norm", "eval/recon_loss", "eval/reconstructions"} <= tags
    ds = json.loads((mgp / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 1
    assert ds["optimizer"]["params"]["lr"] == pytest.approx(1.5e-4 * 16 / 256)


def test_finetune_from_mgp_evaluates_and_keeps_best(pipeline_runs):
    bft = pipeline_runs / "bft"
    metrics = json.loads((bft / "metrics.json").read_text())
    for key in ("top1", "many", "medium", "few", "ece", "mce", "per_class", "num_samples"):
        assert key in metrics, key
    assert metrics["num_samples"] == 20  # every val image exactly once across 2 ranks
    assert len(metrics["per_class"]) == 4
    assert (bft / "best_metrics.json").is_file()
    assert {"eval/top1", "eval/ece", "eval/per_class_accuracy", "eval/reliability", "loss"} <= tb_tags(bft)
    assert list((bft / "plots").glob("per_class_accuracy_*.png"))


def test_export_loads_without_deepspeed_and_matches_engine_eval(pipeline_runs, toy_shards, tmp_path):
    from livt_ds.models.registry import build_classifier

    exported = torch.load(pipeline_runs / "bft" / "export" / "model.pt", weights_only=False)
    model = build_classifier("vit_test", 32, 8, num_classes=4)
    model.load_state_dict(exported["model"])  # strict: every key of the plain model
    encoder = torch.load(pipeline_runs / "mgp" / "export" / "encoder.pt", weights_only=False)["model"]
    assert "pos_embed" in encoder and not any(k.startswith("decoder") for k in encoder)

    run_livt(["eval", *BFT, "--output", str(tmp_path / "eval"), f"data.path={toy_shards}",
              f"model.init={pipeline_runs / 'bft' / 'export' / 'model.pt'}"])
    plain = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    engine = json.loads((pipeline_runs / "bft" / "metrics.json").read_text())
    assert plain["num_samples"] == engine["num_samples"] == 20
    for key in ("top1", "many", "medium", "few"):
        assert plain[key] == pytest.approx(engine[key], abs=1e-6), key
    assert plain["ece"] == pytest.approx(engine["ece"], abs=1e-3)


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_follows_the_uninterrupted_run(toy_shards, tmp_path, stage):
    ds = json.loads((REPO / "ds_configs" / "cpu_fp32.json").read_text())
    ds["zero_optimization"]["stage"] = stage
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    args = ["--config", "configs/tiny_mgp.yaml", "--ds-config", str(tmp_path / "ds.json"), f"data.path={toy_shards}",
            "train.epochs=2", "eval.every=0"]
    run_livt(["pretrain", *args, "--output", str(tmp_path / "full")])
    run_livt(["pretrain", *args, "--output", str(tmp_path / "part"), "train.stop_after_steps=2"])
    assert (tmp_path / "part" / "checkpoints" / "step00000002").is_dir()
    run_livt(["pretrain", *args, "--output", str(tmp_path / "part"), "--resume", "auto"])
    full, part = train_losses(tmp_path / "full"), train_losses(tmp_path / "part")
    assert sorted(full) == list(range(1, 7)) and sorted(part) == list(range(1, 7))
    for step in range(1, 7):
        assert part[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step
    if stage == 2:  # and on one rank from the 2-rank checkpoint (universal checkpoint), same global batch
        out = tmp_path / "one_rank"
        import shutil

        shutil.copytree(tmp_path / "part" / "checkpoints", out / "checkpoints")
        (out / "checkpoints" / "latest").write_text("step00000002")
        run_livt(["pretrain", *args, "--output", str(out), "train.batch_size=16", "--resume", "auto"], ranks=0)
        resumed = train_losses(out)
        assert sorted(resumed) == [3, 4, 5, 6]
        assert all(abs(resumed[s] - full[s]) < 0.5 * abs(full[s]) + 1e-3 for s in resumed)


def test_two_node_launch_on_one_machine(toy_shards, tmp_path):
    """Two deepspeed launchers (--no_ssh, node ranks 0 and 1) form one 2-rank job, as on a 2-node cluster."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    args = ["pretrain", *MGP, "--output", str(tmp_path / "run"), f"data.path={toy_shards}", "train.epochs=1",
            "eval.every=0"]
    procs = [subprocess.Popen([sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
                               "--num_nodes", "2", "--no_ssh", "--node_rank", str(rank), "--master_addr",
                               "127.0.0.1", "--master_port", port, "--module", "livt_ds", *args],
                              cwd=REPO, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
    run_info = (tmp_path / "run" / "run.yaml").read_text()
    assert "world_size: 2" in run_info
    assert sorted(train_losses(tmp_path / "run")) == [1, 2, 3]


def test_sigterm_saves_a_checkpoint_and_resume_continues(toy_shards, tmp_path):
    """Preemption: SIGTERM to every process of the job (as SLURM does) -> a checkpoint, then --resume auto."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "livt_ds", "pretrain", *MGP, "--output", str(out), f"data.path={toy_shards}",
           "train.epochs=200", "eval.every=0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(train_losses(out) if (out / "metrics.jsonl").is_file() else {}) < 2:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler preempting the job signals all of its processes
    log = proc.communicate(timeout=120)[0]
    tags = [p.name for p in (out / "checkpoints").glob("step*")]
    assert tags, "\n".join(line for line in log.splitlines() if "rank1]" not in line)[-6000:]
    saved = int((out / "checkpoints" / "latest").read_text().strip()[4:])
    assert 0 < saved < 600
    result = run_livt(["pretrain", *MGP, "--output", str(out), f"data.path={toy_shards}", "train.epochs=200",
                       "eval.every=0", f"train.stop_after_steps={saved + 2}"])
    assert "resumed from" in result.stdout + result.stderr
    assert max(train_losses(out)) == saved + 2


# ------------------------------------------------------------------------------------------------ bad input


def livt_plain(args: list[str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    return run_livt(args, ranks=0, check=False, cwd=cwd)


def test_unknown_recipe_key_fails_before_training(toy_shards, tmp_path):
    result = livt_plain(["pretrain", *MGP, "--output", str(tmp_path / "r"), f"data.path={toy_shards}",
                         "train.epoch=3"])
    assert result.returncode == 2
    assert "unknown key 'train.epoch'" in result.stderr and "epochs" in result.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_missing_shards_is_a_clear_error(tmp_path):
    result = livt_plain(["pretrain", *MGP, "--output", str(tmp_path / "r"), f"data.path={tmp_path / 'nothing'}"])
    assert result.returncode == 2
    assert "meta.json" in result.stderr and "make_shards" in result.stderr


def test_ds_json_contradicting_the_recipe_is_refused(toy_shards, tmp_path):
    ds = json.loads((REPO / "ds_configs" / "cpu_fp32.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 4
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    result = livt_plain(["pretrain", "--config", "configs/tiny_mgp.yaml", "--ds-config", str(tmp_path / "ds.json"),
                         "--output", str(tmp_path / "r"), f"data.path={toy_shards}"])
    assert result.returncode == 2
    assert "contradicts train_micro_batch_size_per_gpu" in result.stderr


def test_checkpoint_of_another_model_size_is_refused(pipeline_runs, toy_shards, tmp_path):
    result = livt_plain(["finetune", *BFT, "--output", str(tmp_path / "r"), f"data.path={toy_shards}",
                         "model.name=vit_demo", f"model.init={pipeline_runs / 'mgp' / 'export' / 'encoder.pt'}"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "shape" in result.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
    # resuming a vit_test run's checkpoint with a vit_demo model
    import shutil

    shutil.copytree(pipeline_runs / "mgp" / "checkpoints", tmp_path / "r2" / "checkpoints")
    result = livt_plain(["pretrain", *MGP, "--output", str(tmp_path / "r2"), f"data.path={toy_shards}",
                         "model.name=vit_demo", "model.decoder_dim=64"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "does not match the model" in result.stderr


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(toy_shards, tmp_path):
    out = tmp_path / "r"
    args = ["pretrain", *MGP, "--output", str(out), f"data.path={toy_shards}", "train.epochs=3", "eval.every=0",
            "checkpoint.every_steps=1", "checkpoint.keep_last=10"]
    assert livt_plain([*args, "train.stop_after_steps=1"]).returncode == 0
    result = livt_plain([*args, "train.lr=1e30"])  # resumes at step 1, then the weights explode
    assert result.returncode == 3, result.stderr[-2000:]
    match = re.search(r"non-finite at optimizer step (\d+)", result.stderr)
    assert match, result.stderr[-2000:]
    bad = int(match.group(1))
    assert bad > 1
    latest = int((out / "checkpoints" / "latest").read_text().strip()[4:])
    saved = sorted(int(p.name[4:]) for p in (out / "checkpoints").glob("step*"))
    assert latest == saved[-1] < bad  # nothing written at or after the first bad step
    losses = train_losses(out)
    assert all(math.isfinite(v) for s, v in losses.items() if s < bad)
