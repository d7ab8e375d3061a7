"""scripts/bench_train.py and livt_ds.bench: the CPU run end to end (every path and variant, both inputs, the same
training on each), a run cut short, the FLOP count against the reference figures, the settings and their errors,
the generated shard set."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from livt_ds.bench.settings import BenchOptions, make_recipe, resolve_settings
from livt_ds.config import load_recipe
from livt_ds.data.synthetic import generate_shards
from livt_ds.errors import ConfigError
from livt_ds.models.flops import flops_per_image
from livt_ds.seeding import seed_everything

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_train.py"
KEYS = ("stage", "path", "variant", "input", "batch", "steps", "warmup", "images_per_s", "step_ms", "data_wait_ms",
        "model_tflops", "model_tflops_with_embed_heads", "share_of_peak", "peak_mem_gib", "mem_start_gib",
        "ratio_project_over_baseline", "loss", "losses")


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    """4 classes x 3..6 tiny PNGs in an image folder, sharded with make_shards (3 shards)."""
    from livt_ds.data.make_shards import main as make_shards

    root = tmp_path_factory.mktemp("bench_data")
    rng = np.random.default_rng(0)
    for label, count in enumerate((6, 5, 4, 3)):
        folder = root / "raw" / "train" / f"class{label}"
        folder.mkdir(parents=True)
        for i in range(count):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
            (folder / f"{i}.png").write_bytes(buf.getvalue())
    out = root / "shards"
    assert make_shards(["--source", "imagefolder", "--input", str(root / "raw"), "--output", str(out),
                        "--shard-size", "7", "--workers", "1", "--no-progress"]) == 0
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    return env


def test_cpu_run_reports_every_stage_path_and_input(tiny_shards, tmp_path):
    json_out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--steps", "2", "--warmup", "1", "--input", "both",
           "--shards", str(tiny_shards), "--zero-stages", "1,2", "--ds-adam", "config,torch-fused",
           "--json-out", str(json_out)]
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    doc = json.loads(result.stdout)  # stdout holds the JSON document only; logs go to stderr
    assert json.loads(json_out.read_text()) == doc
    assert doc["complete"] is True and doc["finished_entries"] == doc["planned_entries"] == 16
    assert "img/s" in result.stderr  # the human table

    entries = doc["results"]
    runs = (("project", "config"), ("project", "torch-fused"), ("baseline", "amp-fused"),
            ("baseline", "pure-foreach"))
    assert sorted((e["stage"], e["path"], e["variant"], e["input"]) for e in entries) == sorted(
        (st, p, v, i) for st in ("pretrain", "finetune") for p, v in runs for i in ("synthetic", "shards"))
    settings = doc["settings"]
    assert settings["model"] == "vit_test" and settings["img_size"] == 32
    assert settings["num_classes"] == 4  # the shard set's meta.json drives the BFT head and the Bal-BCE prior
    assert settings["recipes"] == {"pretrain": "livt_ds/configs/tiny_mgp.yaml",
                                   "finetune": "livt_ds/configs/tiny_bft.yaml"}
    tiny = {stage: load_recipe(REPO / path) for stage, path in settings["recipes"].items()}
    assert settings["batches"] == {stage: r.train.micro_batch for stage, r in tiny.items()}  # the recipes' batches
    tiny_mgp = tiny["pretrain"].model  # the values come from the recipe
    assert settings["patch_size"] == tiny_mgp.patch_size and settings["mask_ratio"] == tiny_mgp.mask_ratio
    assert settings["decoder"] == {"dim": tiny_mgp.decoder_dim, "depth": tiny_mgp.decoder_depth,
                                   "heads": tiny_mgp.decoder_heads}
    for stage in ("pretrain", "finetune"):
        model = load_recipe(REPO / settings["recipes"][stage], settings["recipe_overrides"]).model
        assert doc["flops_per_image"][stage] == flops_per_image(stage, model, num_classes=4)
    by_key = {(e["stage"], e["variant"], e["input"]): e for e in entries}
    for e in entries:
        assert "error" not in e, e
        missing = [k for k in KEYS if k not in e]
        assert not missing, f"{missing} missing in {e}"
        assert e["steps"] == 2 and len(e["losses"]) == e["warmup"] + e["steps"]
        assert e["warmup"] == (1 if e["input"] == "synthetic" else 1 + 2 * settings["workers"])
        assert e["share_of_peak"] is None and e["peak_mem_gib"] is None  # CPU: no GPU peak or memory figure
        flops = doc["flops_per_image"][e["stage"]]["train"]
        assert e["model_tflops"] == pytest.approx(e["images_per_s"] * flops / 1e12, rel=1e-2, abs=2e-3)
        project = e["images_per_s"] if e["path"] == "project" else by_key[(e["stage"], "config", e["input"])][
            "images_per_s"]
        baseline = e["images_per_s"] if e["path"] == "baseline" else by_key[(e["stage"], "pure-foreach",
                                                                              e["input"])]["images_per_s"]
        # the document rounds the ratio to 4 decimals (a busy machine can make it as small as 0.02)
        assert e["ratio_project_over_baseline"] == pytest.approx(project / baseline, rel=1e-3, abs=5e-5)
    for stage in ("pretrain", "finetune"):
        # Same seed, batch, parameter groups, learning rate and loss: on the CPU (fp32 everywhere) the engine and
        # both eager loops compute the same training, step after step, whichever AdamW implementation runs it.
        engine = by_key[(stage, "config", "synthetic")]["losses"]
        assert len(set(engine)) > 1  # the steps do train
        for variant in ("torch-fused", "amp-fused", "pure-foreach"):
            assert by_key[(stage, variant, "synthetic")]["losses"] == pytest.approx(engine, rel=1e-5), variant
    project_mgp = by_key[("pretrain", "config", "synthetic")]
    assert project_mgp["ds_config"].endswith("cpu_fp32.json") and project_mgp["zero_stage"] == 2
    assert project_mgp["optimizer"] == "AdamW" and not project_mgp["optimizer_fused"]  # the JSON's torch_adam
    assert by_key[("finetune", "torch-fused", "shards")]["optimizer_fused"] is True
    assert by_key[("finetune", "pure-foreach", "shards")]["optimizer_foreach"] is True
    assert by_key[("finetune", "amp-fused", "shards")]["dtype"] == "float32"  # no autocast on the CPU
    assert "skipped" in doc["zero_stages"]  # the ZeRO memory sweep needs a GPU


def test_a_run_killed_midway_keeps_the_entries_that_finished(tmp_path):
    """The document is rewritten atomically after each entry: a run killed hard after its first entry (what
    gpu_check's time limit ends with) leaves a valid document that says it is partial."""
    json_out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--stages", "pretrain", "--input", "synthetic",
           "--steps", "200", "--warmup", "0", "--json-out", str(json_out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if json_out.is_file() and json.loads(json_out.read_text())["finished_entries"] >= 1:
                break
            time.sleep(0.1)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err[-3000:]  # killed, not finished
    doc = json.loads(json_out.read_text())
    assert doc["complete"] is False and doc["planned_entries"] == 3
    assert 1 <= doc["finished_entries"] == len(doc["results"]) < 3
    assert doc["results"][0]["variant"] == "config" and doc["results"][0]["images_per_s"] > 0


def _flops(recipe: str) -> dict[str, int]:
    """FLOPs per image of a shipped ImageNet-LT recipe's model (1000 classes)."""
    stage = "pretrain" if recipe.startswith("mgp") else "finetune"
    return flops_per_image(stage, load_recipe(REPO / "configs" / f"{recipe}.yaml").model, num_classes=1000)


def test_flops_match_the_reference_figures_of_docs_gpu_md():
    """docs/gpu.md: ViT-B/16 224 ~35 GFLOPs forward, MGP step ViT-B ~58 and ViT-L ~125 GFLOPs per image;
    the anchors' images/s x FLOPs give their TFLOP/s column."""
    bft_b = _flops("bft_vit_base_imagenet_lt")
    mgp_b = _flops("mgp_vit_base_imagenet_lt")
    mgp_l = _flops("mgp_vit_large_imagenet_lt")
    bft_l = _flops("bft_vit_large_imagenet_lt")
    assert bft_b["layers_fwd"] / 1e9 == pytest.approx(35, rel=0.02)
    assert mgp_b["train"] / 1e9 == pytest.approx(58, rel=0.02)
    assert mgp_l["train"] / 1e9 == pytest.approx(125, rel=0.02)
    for ips, flops, tflops in ((2466, bft_b, 260), (3754, mgp_b, 218), (856, bft_l, 316), (2043, mgp_l, 253)):
        assert ips * flops["train"] / 1e12 == pytest.approx(tflops, rel=0.02)
    assert mgp_b["train_with_extras"] > mgp_b["train"]
    with pytest.raises(ValueError, match="stage"):
        flops_per_image("eval", load_recipe(REPO / "configs" / "bft_vit_base_imagenet_lt.yaml").model, num_classes=1)


def test_settings_refuse_what_cannot_run():
    with pytest.raises(ConfigError, match="even"):
        resolve_settings(BenchOptions(finetune_batch=7), cuda=False)
    hard = resolve_settings(BenchOptions(finetune_batch=7, finetune_targets="hard"), cuda=False)
    assert hard.batches["finetune"] == 7
    with pytest.raises(ConfigError, match="zero_stages"):
        resolve_settings(BenchOptions(zero_stages=["4"]), cuda=False)
    with pytest.raises(ConfigError, match="multiple"):
        resolve_settings(BenchOptions(img_size=36), cuda=False)


def test_command_line_errors_are_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    for args, words in ((["--finetune-batch", "7"], "even"), (["--stages", "pretrain,eval"], "stages"),
                        (["--stages", "mgp"], "stages"),
                        (["--decoder", "512x8"], "DIM,DEPTH,HEADS")):
        try:
            code = cli.main(["--device", "cpu", *args])
        except SystemExit as exn:  # argparse's own refusal of a malformed value
            code = exn.code
        out, err = capsys.readouterr()
        assert code == 2 and "Traceback" not in err and out == "", (args, err)
        last = err.strip().splitlines()[-1]  # argparse prints its usage first; the settings' errors are one line
        assert last.startswith("bench_train: ") and words in last, (args, err)
        assert args[0] == "--decoder" or len(err.strip().splitlines()) == 1, err


def test_generated_shard_set(tmp_path):
    shards = generate_shards(tmp_path, images=10, size=(30, 20), classes=3, workers=1)
    meta = json.loads((shards / "meta.json").read_text())
    assert meta["num_classes"] == 3
    assert meta["class_counts"] == [4, 3, 3]
    assert meta["splits"]["train"]["num_samples"] == 10
    assert Image.open(next((tmp_path / "raw" / "train" / "c0000").iterdir())).size == (30, 20)


def test_settings_take_the_shipped_recipes():
    """GPU settings (resolved here without a GPU): the model's ImageNet-LT recipes as written, micro-batches
    included, except no MGP init and no accumulation; CPU settings: the tiny recipes."""
    s = resolve_settings(BenchOptions(), cuda=True)
    for stage, method in (("pretrain", "mgp"), ("finetune", "bft")):
        shipped = load_recipe(REPO / "configs" / f"{method}_vit_large_imagenet_lt.yaml")
        got = s.recipes[stage]
        assert s.recipe_files[stage].name == f"{method}_vit_large_imagenet_lt.yaml"
        assert got.model == dataclasses.replace(shipped.model, init="")
        assert (got.augment, got.loss) == (shipped.augment, shipped.loss)
        assert (got.train.blr, got.train.betas, got.train.layer_decay, got.train.batch_size) == (
            shipped.train.blr, shipped.train.betas, shipped.train.layer_decay, None)
        assert s.batches[stage] == shipped.train.micro_batch
        made = make_recipe(s, stage, 6)  # what a run builds: the same recipe at this micro-batch
        assert made.model == got.model and made.train == dataclasses.replace(got.train, micro_batch=6)
    assert s.model.name == "vit_large"

    s = resolve_settings(BenchOptions(model="vit_base", decoder=(256, 4, 8), img_size=192), cuda=True)
    assert {st: p.name for st, p in s.recipe_files.items()} == {
        "pretrain": "mgp_vit_base_imagenet_lt.yaml", "finetune": "bft_vit_base_imagenet_lt.yaml"}
    assert {st: r.model.name for st, r in s.recipes.items()} == {"pretrain": "vit_base", "finetune": "vit_base"}
    assert (s.model.decoder_dim, s.model.decoder_depth, s.model.decoder_heads, s.model.img_size) == (256, 4, 8, 192)
    assert s.recipes["finetune"].model.img_size == 192
    assert s.batches == {st: load_recipe(REPO / "configs" / f"{method}_vit_base_imagenet_lt.yaml").train.micro_batch
                         for st, method in (("pretrain", "mgp"), ("finetune", "bft"))}
    assert make_recipe(s, "finetune", 4).model == s.recipes["finetune"].model

    s = resolve_settings(BenchOptions(model="vit_huge", pretrain_batch=64), cuda=True)  # no recipes of its own
    assert s.recipe_files["pretrain"].name == "mgp_vit_large_imagenet_lt.yaml" and s.model.name == "vit_huge"
    assert s.batches["pretrain"] == 64 and s.zero_batch == 64

    s = resolve_settings(BenchOptions(), cuda=False)
    tiny = {stage: load_recipe(REPO / "configs" / f"tiny_{method}.yaml")
            for stage, method in (("pretrain", "mgp"), ("finetune", "bft"))}
    assert s.recipes["pretrain"].model == tiny["pretrain"].model
    assert s.recipes["finetune"].model == dataclasses.replace(tiny["finetune"].model, init="")
    assert s.batches == {st: r.train.micro_batch for st, r in tiny.items()}
    assert s.workers == tiny["pretrain"].data.num_workers


def test_engine_and_eager_loops_train_alike():
    """Same seed, batch, parameter groups (layer decay, no decay on norms), learning rate and loss: on the CPU
    (fp32) the engine and both eager loops give the same loss at every step, so the ratio compares like with
    like. A learning rate of 1e-2 makes a step move the loss enough to see a wrong group or rate."""
    from livt_ds import dist
    from livt_ds.bench.runners import eager_runner, project_runner
    from livt_ds.bench.settings import synthetic_meta
    from livt_ds.bench.timing import synthetic_batches
    from livt_ds.tasks import build_task

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_distributed()
    s = resolve_settings(BenchOptions(finetune_targets="hard"), cuda=False)
    s.overrides.append("train.lr=0.01")
    recipe = make_recipe(s, "finetune", 8)
    assert recipe.train.layer_decay < 1  # the groups carry different learning rates
    task = build_task("finetune", recipe, synthetic_meta(10))
    device = torch.device("cpu")
    runners = {"engine": project_runner(recipe, task, s.ds_config, compile_model=False)}
    runners.update({v: eager_runner(s, recipe, task, device, compile_model=False, variant=v)
                    for v in ("amp-fused", "pure-foreach")})
    losses = {}
    for name, runner in runners.items():
        batches = synthetic_batches(8, recipe.model.img_size, 10, device)
        seed_everything(0)  # drop path draws the same masks on every path
        losses[name] = [float(runner.step(*next(batches)).detach()) for _ in range(4)]
        runner.close()
    assert losses["engine"][0] != losses["engine"][-1]
    for name in ("amp-fused", "pure-foreach"):
        assert losses[name] == pytest.approx(losses["engine"], rel=1e-6), (name, losses)
