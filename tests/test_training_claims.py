"""The BFT loop's claims on real 2-rank DeepSpeed runs with mixup, cutmix and label smoothing on (the path users
run): exact resume (through --resume none and --resume PATH too), the lr of every step and parameter group,
checkpoint pruning that keeps the best, best_metrics.json, and `compare` over the run folders.

One shared set of runs (3 epochs x 3 steps, evaluation every epoch, a checkpoint every step) serves every test.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import read_jsonl, run_livt, train_losses

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("bft_runs")]  # one worker trains the runs once

BFT = ["--config", "configs/tiny_bft.yaml", "--ds-config", "ds_configs/cpu_fp32.json"]
EPOCHS, STEPS_PER_EPOCH = 3, 3  # 51 images // (8 x 2 ranks) = 3 steps per epoch
TOTAL = EPOCHS * STEPS_PER_EPOCH
BLR, BATCH, MIN_LR, WARMUP_EPOCHS, LAYER_DECAY, DEPTH = 1e-2, 16, 1e-6, 1, 0.75, 2  # tiny_bft + overrides, vit_test
STOP = 4  # the interrupted run stops in the middle of epoch 2


@pytest.fixture(scope="module")
def bft_runs(toy_shards, tmp_path_factory) -> dict:
    """full: uninterrupted, keep_last 2. part: --resume none --overwrite in a folder that already holds the finished
    run's checkpoints, stopped at step 4. cont: a new folder continuing from part's step-4 tag folder
    (--resume PATH)."""
    root = tmp_path_factory.mktemp("bft_claims")
    common = ["finetune", *BFT, f"data.path={toy_shards}", "model.init=", f"train.epochs={EPOCHS}", f"train.blr={BLR}",
              "checkpoint.every_steps=1"]
    run_livt([*common, "--output", str(root / "full"), "checkpoint.keep_last=2"])
    shutil.copytree(root / "full" / "checkpoints", root / "part" / "checkpoints")
    part = run_livt([*common, "--output", str(root / "part"), "checkpoint.keep_last=100",
                     f"train.stop_after_steps={STOP}", "--resume", "none", "--overwrite"])
    tag = root / "part" / "checkpoints" / f"step{STOP:08d}"
    cont = run_livt([*common, "--output", str(root / "cont"), "checkpoint.keep_last=100", "--resume", str(tag)])
    return {"full": root / "full", "part": root / "part", "cont": root / "cont", "tag": tag,
            "part_log": part.stdout + part.stderr, "cont_log": cont.stdout + cont.stderr}


def eval_records(run: Path) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if "eval/top1" in r]


def best_record(run: Path) -> dict:
    """The evaluation with the highest top-1 (the earliest on a tie), from the log."""
    return max(eval_records(run), key=lambda r: (r["eval/top1"], -r["step"]))


def lr_by_hand(step: int) -> float:
    """lr of 0-based optimizer step ``step``: linear warm-up over 3 steps to blr * 16 / 256, then half-cycle cosine
    to min_lr at step 9."""
    base = BLR * BATCH / 256
    warmup = WARMUP_EPOCHS * STEPS_PER_EPOCH
    if step < warmup:
        return base * (step + 1) / warmup
    return MIN_LR + (base - MIN_LR) * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (TOTAL - warmup)))


def layer_of(name: str) -> int:
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return DEPTH + 1


def checkpoint_files(tag_dir: Path) -> tuple[dict, dict]:
    model = torch.load(next(tag_dir.glob("*mp_rank_00_model_states.pt")), map_location="cpu", weights_only=False)
    optim = torch.load(next(tag_dir.glob("zero_pp_rank_0_*optim_states.pt")), map_location="cpu", weights_only=False)
    return model, optim


def test_bft_resume_is_exact_with_mixup_cutmix_and_label_smoothing(bft_runs):
    recipe = yaml.safe_load((bft_runs["full"] / "config.yaml").read_text())
    assert (recipe["augment"]["mixup"], recipe["augment"]["cutmix"], recipe["augment"]["label_smoothing"]) == (
        0.8, 1.0, 0.1)
    assert recipe["augment"]["rand_augment"] and recipe["model"]["drop_path"] > 0
    full, part, cont = (train_losses(bft_runs[k]) for k in ("full", "part", "cont"))
    assert sorted(full) == list(range(1, TOTAL + 1))
    assert sorted(part) == list(range(1, STOP + 1)) and sorted(cont) == list(range(STOP + 1, TOTAL + 1))
    for step in range(1, TOTAL + 1):
        resumed = part[step] if step <= STOP else cont[step]
        assert resumed == pytest.approx(full[step], rel=1e-5, abs=1e-6), step
    # the evaluations after the resume match the uninterrupted run's too
    full_evals = {r["step"]: r for r in eval_records(bft_runs["full"])}
    for record in eval_records(bft_runs["cont"]):
        assert record["eval/top1"] == pytest.approx(full_evals[record["step"]]["eval/top1"], abs=1e-9)
        assert record["eval/ece"] == pytest.approx(full_evals[record["step"]]["eval/ece"], abs=1e-4)
    assert [r["step"] for r in eval_records(bft_runs["cont"])] == [6, 9]


def test_resume_none_starts_over_and_resume_path_continues_from_that_checkpoint(bft_runs):
    assert "resumed from" not in bft_runs["part_log"]  # the copied step-9 checkpoint and its 'latest' are deleted
    part_ckpts = bft_runs["part"] / "checkpoints"
    assert not (part_ckpts / f"step{TOTAL:08d}").exists()
    assert (part_ckpts / "latest").read_text().strip() == f"step{STOP:08d}"
    assert {p.name for p in part_ckpts.glob("step*")} >= {f"step{s:08d}" for s in range(1, STOP + 1)}
    assert f"resumed from {bft_runs['tag']} at step {STOP}" in bft_runs["cont_log"]
    assert (bft_runs["cont"] / "checkpoints" / "latest").read_text().strip() == f"step{TOTAL:08d}"


def test_lr_of_every_step_and_parameter_group_follows_warmup_and_cosine(bft_runs):
    logged = {r["step"]: r["lr"] for r in read_jsonl(bft_runs["full"] / "metrics.jsonl") if "lr" in r}
    assert sorted(logged) == list(range(1, TOTAL + 1))
    for step, lr in logged.items():  # the value logged at step s is the lr that step s trained with
        assert lr == pytest.approx(lr_by_hand(step - 1), rel=1e-12), step
    assert logged[3] == pytest.approx(BLR * BATCH / 256) and logged[1] == pytest.approx(logged[3] / 3)
    # what the optimizer really applied: each group's lr and weight decay in every step's checkpoint
    for step in range(1, TOTAL + 1):
        run = bft_runs["part"] if step <= STOP else bft_runs["cont"]
        model, optim = checkpoint_files(run / "checkpoints" / f"step{step:08d}")
        groups = optim["optimizer_state_dict"]["base_optimizer_state"]["param_groups"]
        assert len(groups) == len(model["param_shapes"])
        for group, shapes in zip(groups, model["param_shapes"]):  # group order = the names' order
            for name, shape in shapes.items():
                scale = LAYER_DECAY ** (DEPTH + 1 - layer_of(name))
                assert group["lr"] == pytest.approx(lr_by_hand(step - 1) * scale, rel=1e-12), (step, name)
                decay = 0.0 if len(shape) <= 1 or name in ("cls_token", "pos_embed") else 0.05
                assert group["weight_decay"] == decay, name


def test_keep_last_prunes_old_checkpoints_but_keeps_the_best(bft_runs):
    ckpts = bft_runs["full"] / "checkpoints"
    best = best_record(bft_runs["full"])
    assert best["step"] < TOTAL - 1, "the run's best evaluation must lie before the last two checkpoints"
    kept = {p.name for p in ckpts.iterdir() if p.is_dir()}
    assert kept == {f"step{TOTAL - 1:08d}", f"step{TOTAL:08d}", f"step{best['step']:08d}"}
    assert (ckpts / "latest").read_text().strip() == f"step{TOTAL:08d}"
    model, _ = checkpoint_files(ckpts / f"step{TOTAL:08d}")
    assert model["train_state"]["best"]["tag"] == f"step{best['step']:08d}"
    assert json.loads((ckpts / f"step{TOTAL:08d}" / "train_state.json").read_text()) == model["train_state"]


def test_best_metrics_holds_the_best_evaluation(bft_runs):
    best = best_record(bft_runs["full"])
    saved = json.loads((bft_runs["full"] / "best_metrics.json").read_text())
    assert saved["step"] == best["step"]
    for key in ("top1", "many", "medium", "few", "ece"):  # many is null: no class of the toy set has > 100 images
        want = best[f"eval/{key}"]
        assert saved[key] == (None if want is None else pytest.approx(want, abs=1e-9)), key
    last = json.loads((bft_runs["full"] / "metrics.json").read_text())
    assert last["step"] == TOTAL and saved["step"] < TOTAL, "the best must be an earlier evaluation than the latest"
    assert saved["ece"] != last["ece"]  # best_metrics.json is not a copy of the latest evaluation
    # the best travels in the checkpoint: the resumed run knows the best of the evaluations before the resume
    model, _ = checkpoint_files(bft_runs["cont"] / "checkpoints" / f"step{TOTAL:08d}")
    assert model["train_state"]["best"]["tag"] == f"step{best['step']:08d}"
    assert model["train_state"]["best"]["value"] == pytest.approx(best["eval/top1"], abs=1e-9)


def test_compare_on_real_run_folders(bft_runs, tmp_path):
    from livt_ds import compare

    runs = [bft_runs["full"], bft_runs["cont"]]
    assert compare.main([str(r) for r in runs] + ["--labels", "full", "resumed", "--output", str(tmp_path)]) == 0
    lines = (tmp_path / "loss_comparison.md").read_text().splitlines()
    header = lines.index("| label | top-1 | many | medium | few | ECE | MCE |")
    for offset, (label, run) in enumerate(zip(("full", "resumed"), runs)):
        m = json.loads((run / "metrics.json").read_text())
        cells = ["\u2013" if m[k] is None else f"{m[k]:.1f}" for k in ("top1", "many", "medium", "few", "ece", "mce")]
        assert lines[header + 2 + offset] == f"| {label} | " + " | ".join(cells) + " |"
    history = lines.index("| epoch | full | resumed |")
    full_evals = eval_records(bft_runs["full"])
    expected_rows = []
    for r in full_evals:
        epoch = r["step"] / STEPS_PER_EPOCH
        mine = f"{r['eval/top1']:.1f} / {r['eval/few']:.1f}"
        other = "\u2013" if r["step"] <= STOP else mine  # the resumed folder logged the evaluations after step 4
        expected_rows.append(f"| {epoch:g} | {mine} | {other} |")
    assert lines[history + 2:history + 2 + len(full_evals)] == expected_rows
    counts = json.loads((Path(yaml.safe_load((runs[0] / "config.yaml").read_text())["data"]["path"]) / "meta.json")
                        .read_text())["class_counts"]
    per_class = [line for line in lines if line.startswith("| class") or line.split(" | ")[0][2:].startswith("class")]
    assert [int(line.split(" | ")[1]) for line in per_class[1:]] == sorted(counts, reverse=True)
    for name in ("per_class_accuracy.png", "reliability.png"):
        assert (tmp_path / name).stat().st_size > 1000
