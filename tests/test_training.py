"""End-to-end DeepSpeed runs on CPU (gloo, 2 ranks) through the real CLI: ranks started from a shell with the
launcher variables, and the deepspeed launcher for the shared pipeline runs and SIGTERM (the multi-node launch is
in test_scale_out.py)."""

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
from conftest import (
    LAUNCH_TIMEOUT_S,
    REPO,
    finish_process,
    free_port,
    launcher_env,
    run_livt,
    start_process,
    train_losses,
)

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


def tb_scalars(run: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events in (run / "tensorboard").glob("events.*"):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values.update({e.step: e.value for e in acc.Scalars(tag)})
    return values


def fp32_weights(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of a ZeRO checkpoint straight from DeepSpeed's zero_to_fp32."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)


def eval_records(run: Path) -> list[dict]:
    from conftest import read_jsonl

    return [r for r in read_jsonl(run / "metrics.jsonl") if "eval/top1" in r or "eval/recon_loss" in r]


def test_pretrain_writes_logs_checkpoints_and_reconstructions(pipeline_runs):
    mgp = pipeline_runs / "mgp"
    for name in ("config.yaml", "ds_config.json", "metrics.jsonl", "metrics.json", "checkpoints/latest"):
        assert (mgp / name).exists(), name
    assert status(mgp) == {"phase": "finished", "step": 6}
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
    # best_metrics.json is the evaluation with the highest top-1 (the first one on a tie), read from the log
    evals = eval_records(bft)
    assert [r["step"] for r in evals] == [3, 6]  # every epoch
    best = max(evals, key=lambda r: (r["eval/top1"], -r["step"]))
    saved_best = json.loads((bft / "best_metrics.json").read_text())
    assert saved_best["step"] == best["step"] and saved_best["top1"] == pytest.approx(best["eval/top1"], abs=1e-9)
    assert saved_best["few"] == pytest.approx(best["eval/few"], abs=1e-9)
    assert metrics["step"] == 6 and metrics["top1"] == pytest.approx(evals[-1]["eval/top1"], abs=1e-9)


@pytest.fixture(scope="module")
def zero3_bft(pipeline_runs, toy_shards, tmp_path_factory):
    """BFT from the MGP run on ZeRO-3, one step with lr 0 (so the weights stay exactly what model.init loaded),
    evaluated on ZeRO-3 at that step, then exported."""
    out = tmp_path_factory.mktemp("zero3")
    ds = json.loads((REPO / "ds_configs" / "cpu_fp32.json").read_text())
    ds["zero_optimization"]["stage"] = 3
    (out / "ds.json").write_text(json.dumps(ds))
    run_livt(["finetune", "--config", "configs/tiny_bft.yaml", "--ds-config", str(out / "ds.json"), "--output",
              str(out / "bft"), f"data.path={toy_shards}", f"model.init={pipeline_runs / 'mgp'}", "train.epochs=1",
              "train.steps_per_epoch=1", "train.blr=0", "train.min_lr=0"])
    from livt_ds.weights import export

    export(out / "bft")
    return out / "bft"


@pytest.mark.xdist_group("zero3_bft")
def test_finetune_loads_the_mgp_encoder_exactly(zero3_bft, pipeline_runs):
    mgp_dir = pipeline_runs / "mgp" / "checkpoints"
    mgp = fp32_weights(mgp_dir, (mgp_dir / "latest").read_text().strip())
    from livt_ds.weights import load_weights

    bft = load_weights(zero3_bft / "export")  # the export folder (not the checkpoint)
    shared = sorted(k for k in bft if f"encoder.{k}" in mgp)
    trunk = [k for k in bft if k.startswith(("blocks.", "patch_embed.")) or k == "cls_token"]
    assert trunk and set(trunk) <= set(shared)
    for key in shared:  # lr 0: the BFT weights are the loaded MGP encoder, bit for bit
        assert torch.equal(bft[key], mgp[f"encoder.{key}"].float()), key
    assert {k for k in bft if k not in shared} <= {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias",
                                                  "norm.weight", "norm.bias"}


@pytest.mark.xdist_group("zero3_bft")
def test_zero3_evaluation_and_export(zero3_bft, toy_shards):
    """The ZeRO-3 engine's evaluation (weights gathered in forward, 2 ranks) equals the exported weights run
    on one process here: the same accuracy per class over the same 20 images."""
    from livt_ds.config import ModelConfig
    from livt_ds.data.pipeline import eval_loader
    from livt_ds.data.transforms import eval_transform
    from livt_ds.models.registry import build_classifier
    from livt_ds.weights import load_weights

    model = build_classifier(ModelConfig("vit_test", 32, 8, global_pool="avg"), 4)
    model.load_state_dict(load_weights(zero3_bft / "export"))  # strict: a complete ZeRO-3 consolidation
    model.eval()
    meta = json.loads((toy_shards / "meta.json").read_text())
    loader = eval_loader(toy_shards, split="val", transform=eval_transform(32, meta["mean"], meta["std"]),
                         batch_size=7, num_workers=0, rank=0, world_size=1)
    correct, seen = torch.zeros(4), torch.zeros(4)
    with torch.no_grad():
        for images, labels in loader:
            hits = (model(images).argmax(1) == labels).float()
            correct.index_add_(0, labels, hits)
            seen.index_add_(0, labels, torch.ones_like(hits))
    engine = json.loads((zero3_bft / "metrics.json").read_text())
    assert engine["num_samples"] == int(seen.sum()) == 20
    assert engine["top1"] == pytest.approx(100 * int(correct.sum()) / int(seen.sum()), abs=1e-6)  # counts, not fp32
    assert engine["per_class"] == pytest.approx((100 * correct / seen).tolist(), abs=1e-6)
    ds = json.loads((zero3_bft / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3


def test_export_loads_without_deepspeed_and_matches_engine_eval(pipeline_runs, toy_shards, tmp_path):
    from livt_ds.config import ModelConfig
    from livt_ds.models.registry import build_classifier

    exported = torch.load(pipeline_runs / "bft" / "export" / "model.pt", weights_only=False)
    model = build_classifier(ModelConfig("vit_test", 32, 8), 4)
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
    # livt eval's TensorBoard scalars and images, and its plots
    ev = tmp_path / "eval"
    assert {"eval/top1", "eval/few", "eval/ece", "eval/per_class_accuracy", "eval/reliability"} <= tb_tags(ev)
    for key in ("top1", "many", "medium", "few", "ece", "mce"):  # a null group (no class > 100 images) is not logged
        want = {} if plain[key] is None else {0: pytest.approx(plain[key], rel=1e-6, abs=1e-6)}
        assert tb_scalars(ev, f"eval/{key}") == want, key
    from PIL import Image

    for name in ("per_class_accuracy", "reliability"):
        with Image.open(ev / "plots" / f"{name}_step00000000.png") as image:
            assert image.format == "PNG" and image.size[0] >= 300 and image.size[1] >= 200


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_follows_the_uninterrupted_run(pipeline_runs, toy_shards, tmp_path, stage):
    ds = json.loads((REPO / "ds_configs" / "cpu_fp32.json").read_text())
    ds["zero_optimization"]["stage"] = stage
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    args = ["--config", "configs/tiny_mgp.yaml", "--ds-config", str(tmp_path / "ds.json"), f"data.path={toy_shards}",
            "train.epochs=2", "eval.every=0"]
    if stage == 2:  # the shared MGP run is this recipe on ZeRO-2 (evaluations fork the RNG: same losses)
        full_run = pipeline_runs / "mgp"
        assert json.loads((full_run / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
    else:
        full_run = tmp_path / "full"
        run_livt(["pretrain", *args, "--output", str(full_run)])
    run_livt(["pretrain", *args, "--output", str(tmp_path / "part"), "train.stop_after_steps=2"])
    assert (tmp_path / "part" / "checkpoints" / "step00000002").is_dir()
    run_livt(["pretrain", *args, "--output", str(tmp_path / "part"), "--resume", "auto"])
    full, part = train_losses(full_run), train_losses(tmp_path / "part")
    assert sorted(full) == list(range(1, 7)) and sorted(part) == list(range(1, 7))
    for step in range(1, 7):
        assert part[step] == pytest.approx(full[step], rel=1e-5, abs=1e-6), step
    if stage == 2:  # and on one rank from the 2-rank checkpoint (universal checkpoint), same global batch
        out = tmp_path / "one_rank"
        import shutil

        shutil.copytree(tmp_path / "part" / "checkpoints", out / "checkpoints")
        (out / "checkpoints" / "latest").write_text("step00000002")
        # one step with lr 0 after the resume: the weights must come out exactly as the 2-rank run saved them
        run_livt(["pretrain", *args, "--output", str(out), "train.batch_size=16", "train.blr=0", "train.min_lr=0",
                  "train.stop_after_steps=3", "checkpoint.keep_last=10", "--resume", "auto", "--allow-recipe-change"],
                 ranks=0)
        resumed = train_losses(out)
        assert sorted(resumed) == [3]
        assert all(abs(resumed[s] - full[s]) < 0.5 * abs(full[s]) + 1e-3 for s in resumed)
        check_exact_carry_over(tmp_path / "part" / "checkpoints", out / "checkpoints",
                               betas=tuple(json.loads((tmp_path / "part" / "ds_config.json").read_text())[
                                   "optimizer"]["params"]["betas"]))  # as resolved from the recipe's train.betas


def check_exact_carry_over(two_rank: Path, one_rank: Path, betas: tuple[float, float]) -> None:
    """Weights bit for bit (2-rank step 2 -> universal -> 1-rank step 3 at lr 0), and Adam's moments: the 1-rank
    step-3 moments must be one Adam update of the 2-rank step-2 moments (m3 = b1 m2 + (1 - b1) g,
    v3 = b2 v2 + (1 - b2) g^2 for one g); moments restarted from zero would not fit."""
    before = fp32_weights(two_rank, "step00000002")
    after = fp32_weights(one_rank, "step00000003")
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    universal = one_rank / "step00000002_universal" / "zero"
    states = torch.load(next(one_rank.glob("step00000003/*mp_rank_00_model_states.pt")), weights_only=False)
    optim = torch.load(next(one_rank.glob("step00000003/*optim_states.pt")), weights_only=False)
    base = optim["optimizer_state_dict"]["base_optimizer_state"]
    assert len(list(one_rank.glob("step00000003/*optim_states.pt"))) == 1
    b1, b2 = betas
    for index, shapes in enumerate(states["param_shapes"]):  # optimizer group order, parameter names
        def flat(kind: str, names=shapes) -> torch.Tensor:
            parts = []
            for name in names:
                saved = torch.load(universal / name / f"{kind}.pt", weights_only=False)
                parts.append((saved["param"] if isinstance(saved, dict) else saved).flatten().float())
            return torch.cat(parts)

        torch.testing.assert_close(flat("fp32"), torch.cat([before[n].flatten() for n in shapes]), rtol=0, atol=0)
        m2, v2 = flat("exp_avg"), flat("exp_avg_sq")
        state = base["state"][index]
        m3, v3 = state["exp_avg"][: m2.numel()].float(), state["exp_avg_sq"][: v2.numel()].float()
        assert m2.abs().max() > 0 and v2.max() > 0  # the 2-rank moments are not trivial
        grad = (m3.double() - b1 * m2.double()) / (1 - b1)
        expected_v3 = b2 * v2.double() + (1 - b2) * grad**2
        torch.testing.assert_close(v3.double(), expected_v3, rtol=2e-3, atol=1e-6 * float(v3.max()))
        assert int(torch.as_tensor(state["step"]).max()) == 3


def start_long_run(out: Path, toy_shards: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "livt_ds", "pretrain", *MGP, "--output", str(out), f"data.path={toy_shards}",
           "train.epochs=200", "eval.every=0", "data.num_workers=1"]  # a loader worker gets the signal too
    return start_process(cmd, cwd=REPO, env=launcher_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_steps(out: Path, n: int) -> int:
    """Wait until ``n`` optimizer steps are logged; return how many are logged now."""
    deadline = time.time() + 300
    while time.time() < deadline and len(train_losses(out) if (out / "metrics.jsonl").is_file() else {}) < n:
        time.sleep(0.5)
    logged = len(train_losses(out))
    assert logged >= n, "the run did not start"
    return logged


def check_saved_on_sigterm(out: Path, log: str, logged_at_signal: int) -> int:
    """The checkpoint of a preempted run: written by both ranks at the last logged step, at most the step in
    flight after the signal, and named by ``latest``."""
    shown = "\n".join(line for line in log.splitlines() if "rank1]" not in line)[-6000:]
    assert (out / "checkpoints" / "latest").is_file(), shown
    saved = int((out / "checkpoints" / "latest").read_text().strip()[4:])
    assert saved == max(train_losses(out)), shown  # no step after the checkpoint, none lost before it
    assert logged_at_signal <= saved <= logged_at_signal + 2 < 600, shown  # stopped at once, not at the end
    assert len(list((out / "checkpoints" / f"step{saved:08d}").glob("*optim_states.pt"))) == 2  # both ranks saved
    assert f"SIGTERM: saved a checkpoint at step {saved}" in log
    return saved


@pytest.mark.xdist_group("serial")
def test_sigterm_saves_a_checkpoint_and_resume_continues(toy_shards, tmp_path):
    """Preemption: SIGTERM to every process of the job (as SLURM does) -> a checkpoint, then --resume auto."""
    out = tmp_path / "run"
    proc = start_long_run(out, toy_shards)
    logged = wait_for_steps(out, 2)
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler preempting the job signals all of its processes
    log = finish_process(proc, timeout=120)[0]
    # the single-node deepspeed runner has no SIGTERM handler: the job ends as terminated by the signal (not with
    # a crash code), after the ranks have saved
    assert proc.returncode == -signal.SIGTERM, log[-3000:]
    saved = check_saved_on_sigterm(out, log, logged)
    assert status(out) == {"phase": "stopped", "step": saved}  # stopped by the signal, not finished
    result = run_livt(["pretrain", *MGP, "--output", str(out), f"data.path={toy_shards}", "train.epochs=200",
                       "eval.every=0", "data.num_workers=1", f"train.stop_after_steps={saved + 2}"])
    assert f"resumed from {out / 'checkpoints' / f'step{saved:08d}'} at step {saved}" in result.stdout + result.stderr
    assert max(train_losses(out)) == saved + 2
    assert status(out) == {"phase": "stopped", "step": saved + 2}  # stopped by train.stop_after_steps


def status(run: Path) -> dict:
    """status.json's phase and step (pid and time left out)."""
    found = json.loads((run / "status.json").read_text())
    return {"phase": found["phase"], "step": found["step"]}


def rank_pid(out: Path, local_rank: int) -> int:
    """The pid of training rank ``local_rank`` of the run writing to ``out`` (not its DataLoader workers)."""
    def cmdline(pid: str) -> str:
        try:
            return (Path("/proc") / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            return ""

    def parent(pid: str) -> str:
        try:
            return (Path("/proc") / pid / "stat").read_text().rsplit(")", 1)[1].split()[1]
        except OSError:
            return ""

    mine = [pid for pid in os.listdir("/proc") if pid.isdigit() and f"--local_rank={local_rank}" in cmdline(pid)
            and str(out) in cmdline(pid)]
    ranks = [pid for pid in mine if parent(pid) not in mine]  # workers are forks of the rank
    assert len(ranks) == 1, ranks
    return int(ranks[0])


@pytest.mark.xdist_group("serial")
def test_sigterm_to_one_rank_only_stops_every_rank_with_a_checkpoint(toy_shards, tmp_path):
    """SIGTERM to rank 1 alone (rank 0 never sees it): the ranks agree through the all-reduce, both save the same
    step and exit cleanly, and the launcher exits 0."""
    out = tmp_path / "run"
    proc = start_long_run(out, toy_shards)
    logged = wait_for_steps(out, 2)
    os.kill(rank_pid(out, 1), signal.SIGTERM)
    log = finish_process(proc, timeout=LAUNCH_TIMEOUT_S)[0]
    assert proc.returncode == 0, log[-3000:]
    check_saved_on_sigterm(out, log, logged)


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
                         "model.name=vit_demo", "model.decoder_dim=64", "--allow-recipe-change"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "does not match the model" in result.stderr


def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(toy_shards, tmp_path):
    out = tmp_path / "r"
    args = ["pretrain", *MGP, "--output", str(out), f"data.path={toy_shards}", "train.epochs=3", "eval.every=0",
            "checkpoint.every_steps=1", "checkpoint.keep_last=10"]
    assert livt_plain([*args, "train.stop_after_steps=1"]).returncode == 0
    result = livt_plain([*args, "train.lr=1e30", "--allow-recipe-change"])  # resumes at step 1, then explodes
    assert result.returncode == 3, result.stderr[-2000:]
    match = re.search(r"non-finite at optimizer step (\d+)", result.stderr)
    assert match, result.stderr[-2000:]
    bad = int(match.group(1))
    assert bad > 1
    latest = int((out / "checkpoints" / "latest").read_text().strip()[4:])
    saved = sorted(int(p.name[4:]) for p in (out / "checkpoints").glob("step*"))
    assert latest == saved[-1] < bad  # nothing written at or after the first bad step
    assert status(out) == {"phase": "failed", "step": bad}  # the step whose loss was not finite
    losses = train_losses(out)
    assert all(math.isfinite(v) for s, v in losses.items() if s < bad)
