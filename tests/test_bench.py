"""scripts/bench_train.py and livt_ds.bench: the CPU run end to end (both paths, both inputs), the FLOP count
against the reference figures, the settings, the generated shard set."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_process
from PIL import Image

from livt_ds import bench
from livt_ds.config import load_recipe
from livt_ds.data.synthetic import generate_shards
from livt_ds.models.flops import flops_per_image

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_train.py"
KEYS = ("stage", "path", "input", "batch", "steps", "warmup", "images_per_s", "step_ms", "data_wait_ms",
        "model_tflops", "model_tflops_with_embed_heads", "share_of_peak", "peak_mem_gib", "mem_start_gib",
        "ratio_project_over_baseline", "loss")


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
    result = run_process(cmd, cwd=REPO, env=_env(), timeout=300)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    doc = json.loads(result.stdout)  # stdout holds the JSON document only; logs go to stderr
    assert json.loads(json_out.read_text()) == doc
    assert "img/s" in result.stderr  # the human table

    entries = doc["results"]
    assert sorted((e["stage"], e["path"], e["ds_adam"] or "", e["input"]) for e in entries) == sorted(
        (st, p, a, i) for st in ("mgp", "bft") for p, a in (("project", "config"), ("project", "torch-fused"),
                                                             ("baseline", "")) for i in ("synthetic", "shards"))
    settings = doc["settings"]
    assert settings["model"] == "vit_test" and settings["img_size"] == 32
    assert settings["num_classes"] == 4  # the shard set's meta.json drives the BFT head and the Bal-BCE prior
    assert settings["recipes"] == {"mgp": "configs/tiny_mgp.yaml", "bft": "configs/tiny_bft.yaml"}
    tiny_mgp = load_recipe(REPO / "configs" / "tiny_mgp.yaml").model  # the values come from the recipe
    assert settings["patch_size"] == tiny_mgp.patch_size and settings["mask_ratio"] == tiny_mgp.mask_ratio
    assert settings["decoder"] == {"dim": tiny_mgp.decoder_dim, "depth": tiny_mgp.decoder_depth,
                                   "heads": tiny_mgp.decoder_heads}
    for stage in ("mgp", "bft"):
        model = load_recipe(REPO / settings["recipes"][stage], settings["recipe_overrides"]).model
        assert doc["flops_per_image"][stage] == flops_per_image(stage, model, num_classes=4)
    by_key = {(e["stage"], e["ds_adam"] or e["path"], e["input"]): e for e in entries}
    for e in entries:
        assert "error" not in e, e
        missing = [k for k in KEYS if k not in e]
        assert not missing, f"{missing} missing in {e}"
        assert e["images_per_s"] > 0 and e["step_ms"] > 0 and math.isfinite(e["loss"])
        assert e["steps"] == 2
        assert e["warmup"] == (1 if e["input"] == "synthetic" else 1 + 2 * settings["workers"])
        assert e["share_of_peak"] is None and e["peak_mem_gib"] is None  # CPU: no GPU peak or memory figure
        flops = doc["flops_per_image"][e["stage"]]["train"]
        assert e["model_tflops"] == pytest.approx(e["images_per_s"] * flops / 1e12, rel=1e-2, abs=2e-3)
        project = e["images_per_s"] if e["path"] == "project" else by_key[(e["stage"], "config", e["input"])][
            "images_per_s"]
        baseline = by_key[(e["stage"], "baseline", e["input"])]["images_per_s"]
        assert e["ratio_project_over_baseline"] == pytest.approx(project / baseline, rel=1e-3)
    project_mgp = by_key[("mgp", "config", "synthetic")]
    assert project_mgp["ds_config"].endswith("cpu_fp32.json") and project_mgp["zero_stage"] == 2
    assert project_mgp["optimizer"] == "AdamW" and not project_mgp["optimizer_fused"]  # the JSON's torch_adam
    assert by_key[("bft", "torch-fused", "shards")]["optimizer_fused"] is True
    assert by_key[("bft", "baseline", "shards")]["dtype"] == "float32"
    assert "skipped" in doc["zero_stages"]  # the ZeRO memory sweep needs a GPU


def _flops(recipe: str) -> dict[str, int]:
    """FLOPs per image of a shipped ImageNet-LT recipe's model (1000 classes)."""
    return flops_per_image(recipe[:3], load_recipe(REPO / "configs" / f"{recipe}.yaml").model, num_classes=1000)


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


def test_settings_refuse_an_odd_mixup_batch():
    args = bench.build_parser().parse_args(["--device", "cpu", "--bft-batch", "7"])
    with pytest.raises(SystemExit, match="even"):
        bench.resolve_settings(args, cuda=False)
    args = bench.build_parser().parse_args(["--device", "cpu", "--bft-batch", "7", "--bft-targets", "hard"])
    assert bench.resolve_settings(args, cuda=False).batches["bft"] == 7
    with pytest.raises(SystemExit, match="zero-stages"):
        bench.resolve_settings(bench.build_parser().parse_args(["--zero-stages", "4"]), cuda=False)


def test_generated_shard_set(tmp_path):
    shards = generate_shards(tmp_path, images=10, size=(30, 20), classes=3, workers=1)
    meta = json.loads((shards / "meta.json").read_text())
    assert meta["num_classes"] == 3
    assert meta["class_counts"] == [4, 3, 3]
    assert meta["splits"]["train"]["num_samples"] == 10
    assert Image.open(next((tmp_path / "raw" / "train" / "c0000").iterdir())).size == (30, 20)


def test_settings_take_the_shipped_recipes():
    """GPU settings (resolved here without a GPU): the ViT-L ImageNet-LT recipes as written, except no MGP init,
    no accumulation and the CLI's model; CPU settings: the tiny recipes."""
    parse = bench.build_parser().parse_args
    s = bench.resolve_settings(parse([]), cuda=True)
    for stage in ("mgp", "bft"):
        shipped = load_recipe(REPO / "configs" / f"{stage}_vit_large_imagenet_lt.yaml")
        got = s.recipes[stage]
        assert got.model == dataclasses.replace(shipped.model, init="")
        assert (got.augment, got.loss) == (shipped.augment, shipped.loss)
        assert (got.train.blr, got.train.betas, got.train.layer_decay, got.train.batch_size) == (
            shipped.train.blr, shipped.train.betas, shipped.train.layer_decay, None)
        made = bench.make_recipe(s, stage, 6)  # what a run builds: the same recipe at this micro-batch
        assert made.model == got.model and made.train == dataclasses.replace(got.train, micro_batch=6)
    assert s.batches == {"mgp": 256, "bft": 128} and s.model.name == "vit_large"

    s = bench.resolve_settings(parse(["--model", "vit_base", "--decoder", "256,4,8", "--img-size", "192"]), cuda=True)
    assert {st: r.model.name for st, r in s.recipes.items()} == {"mgp": "vit_base", "bft": "vit_base"}
    assert (s.model.decoder_dim, s.model.decoder_depth, s.model.decoder_heads, s.model.img_size) == (256, 4, 8, 192)
    assert s.recipes["bft"].model.img_size == 192 and s.batches == {"mgp": 512, "bft": 256}
    assert bench.make_recipe(s, "bft", 4).model == s.recipes["bft"].model

    s = bench.resolve_settings(parse(["--device", "cpu"]), cuda=False)
    tiny = {stage: load_recipe(REPO / "configs" / f"tiny_{stage}.yaml") for stage in ("mgp", "bft")}
    assert s.recipes["mgp"].model == tiny["mgp"].model
    assert s.recipes["bft"].model == dataclasses.replace(tiny["bft"].model, init="")
    assert s.batches == {st: r.train.micro_batch for st, r in tiny.items()}
    assert s.workers == tiny["mgp"].data.num_workers
    with pytest.raises(SystemExit, match="DIM,DEPTH,HEADS"):
        bench.resolve_settings(parse(["--decoder", "512x8"]), cuda=False)
