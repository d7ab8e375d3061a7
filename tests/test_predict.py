"""Using a trained model: the timm hub export (checked with plain timm in a clean process), `livt predict`,
`livt eval`'s test-prior table, and safe loading of weights files."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

import PIL.Image
import pytest
import torch
from conftest import BFT_ARGS, REPO, make_image_folder, read_jsonl, run_livt, run_process

from livt_ds.errors import UnsafeWeightsError
from livt_ds.weights import load_weights

CLASSES = ["class0", "class1", "class2", "class3"]

PLAIN_TIMM = r"""
import json, sys
from pathlib import Path
import timm, torch
from PIL import Image

export, images, out = Path(sys.argv[1]), sys.argv[2:-1], sys.argv[-1]
model = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
config = timm.data.resolve_data_config(model=model)
transform = timm.data.create_transform(**config)
batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
with torch.no_grad():
    result = {"outputs": model(batch).tolist(), "num_classes": model.num_classes, "data_config": config,
              "label_names": model.pretrained_cfg.get("label_names"), "pos_embed": model.pos_embed.tolist()}
assert not any(name.startswith("livt_ds") for name in sys.modules), "livt_ds was imported"
Path(out).write_text(json.dumps(result))
"""


def plain_timm(export: Path, images: list[Path], tmp_path: Path) -> dict:
    """Run PLAIN_TIMM in a fresh interpreter that cannot import livt_ds (isolated mode, cwd outside the repo)."""
    script, out = tmp_path / "plain_timm.py", tmp_path / f"timm_{export.parent.name}.json"
    script.write_text(PLAIN_TIMM)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = run_process([sys.executable, "-I", str(script), str(export), *map(str, images), str(out)],
                         cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def val_images(tmp_path_factory) -> list[Path]:
    """The toy set's val images as PNG files (the same generator as the shards)."""
    root = make_image_folder(tmp_path_factory.mktemp("pngs"))
    return sorted((root / "val").rglob("*.png"))


def engine_model(run: Path):
    """The BFT classifier with the weights of the run's last checkpoint (consolidated from ZeRO shards)."""
    from livt_ds.config import ModelConfig
    from livt_ds.models.registry import build_classifier

    model = build_classifier(ModelConfig("vit_test", 32, 8), 4)
    model.load_state_dict(load_weights(run / "checkpoints"))
    return model.eval()


def engine_transform(run: Path):
    """The eval transform the trainer used: recipe + the shard set's measured mean/std."""
    import yaml

    from livt_ds.config import recipe_from_dict
    from livt_ds.data.shards import load_meta
    from livt_ds.tasks import FinetuneTask

    recipe = recipe_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    return FinetuneTask(recipe, load_meta(recipe.data.path)).eval_transform()


@pytest.mark.slow
def test_export_loads_in_plain_timm_with_the_engines_predictions(pipeline_runs, val_images, tmp_path):
    from livt_ds.models.mae import sincos_pos_embed_2d

    export = pipeline_runs / "bft" / "export"
    config = json.loads((export / "config.json").read_text())
    assert (export / "model.safetensors").is_file()
    assert config["num_classes"] == 4 and config["label_names"] == CLASSES
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32] and cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.875
    timm_out = plain_timm(export, val_images, tmp_path)
    assert timm_out["num_classes"] == 4 and timm_out["label_names"] == CLASSES
    assert timm_out["data_config"]["crop_pct"] == 0.875 and timm_out["data_config"]["mean"] == cfg["mean"]

    model = engine_model(pipeline_runs / "bft")
    from PIL import Image

    transform = engine_transform(pipeline_runs / "bft")  # the trainer's eval transform, not the export's
    with torch.no_grad():
        engine = model(torch.stack([transform(Image.open(p).convert("RGB")) for p in val_images]))
    timm_logits = torch.tensor(timm_out["outputs"])
    assert torch.allclose(timm_logits, engine, atol=1e-5), (timm_logits - engine).abs().max()
    assert torch.equal(timm_logits.argmax(1), engine.argmax(1))

    # the MGP encoder: num_classes 0, cls-token features, every weight (pos_embed = the sin-cos table) in place
    enc_export = pipeline_runs / "mgp" / "export"
    assert json.loads((enc_export / "config.json").read_text())["num_classes"] == 0
    enc_out = plain_timm(enc_export, val_images[:3], tmp_path)
    assert enc_out["num_classes"] == 0
    assert torch.allclose(torch.tensor(enc_out["pos_embed"])[0], sincos_pos_embed_2d(32, (4, 4)), atol=1e-6)
    from livt_ds.config import ModelConfig
    from livt_ds.models.registry import build_mae

    mae = build_mae(ModelConfig("vit_test", 32, 8, decoder_dim=32, decoder_depth=1, decoder_heads=2))
    mae.load_state_dict(load_weights(pipeline_runs / "mgp" / "checkpoints"))
    with torch.no_grad():
        features = mae.encoder.eval()(torch.stack([transform(Image.open(p).convert("RGB")) for p in val_images[:3]]))
    assert torch.allclose(torch.tensor(enc_out["outputs"]), features, atol=1e-5)


@pytest.mark.slow
def test_predict_writes_named_top_k_and_reports_unreadable_images(pipeline_runs, val_images, tmp_path):
    folder = tmp_path / "photos"
    for i, src in enumerate(val_images[::5]):  # one image per class, in nested folders
        (folder / f"sub{i % 2}").mkdir(parents=True, exist_ok=True)
        (folder / f"sub{i % 2}" / f"img{i}.png").write_bytes(src.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "preds.jsonl"
    result = run_livt(["predict", "--model", str(pipeline_runs / "bft" / "export"), "--input", str(folder),
                       "--output", str(out), "--top-k", "2", "--workers", "1"], ranks=0)
    assert "wrote 4 predictions and 1 unreadable-image lines" in result.stdout
    lines = {Path(r["path"]).name: r for r in read_jsonl(out)}
    assert sorted(lines) == ["broken.png", "img0.png", "img1.png", "img2.png", "img3.png"]
    assert "error" in lines["broken.png"] and "top_k" not in lines["broken.png"]
    model = engine_model(pipeline_runs / "bft")
    for name, line in lines.items():
        if name == "broken.png":
            continue
        top = line["top_k"]
        assert len(top) == 2 and top[0]["prob"] >= top[1]["prob"] and all(t["class"] in CLASSES for t in top)
        assert top[0]["class"] == CLASSES[top[0]["index"]]
    # the same top-1 as the engine's model on the same image
    from PIL import Image

    image = engine_transform(pipeline_runs / "bft")(Image.open(folder / "sub0" / "img0.png").convert("RGB"))
    with torch.no_grad():
        assert CLASSES[int(model(image[None]).argmax())] == lines["img0.png"]["top_k"][0]["class"]


@pytest.mark.slow
def test_predict_lists_shards_csv_and_test_prior(pipeline_runs, toy_shards, val_images, tmp_path):
    from livt_ds.predict import run_predict
    from livt_ds.priors import prior_adjustment, resolve_prior

    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p} 0\n" for p in val_images[:3]) + "missing.png\n")
    csv_out = tmp_path / "p.csv"
    run = tmp_path / "run"  # a run folder without export: its latest ZeRO checkpoint is consolidated (safely)
    shutil.copytree(pipeline_runs / "bft" / "checkpoints", run / "checkpoints")
    for name in ("config.yaml", "run.yaml"):
        shutil.copy(pipeline_runs / "bft" / name, run / name)
    done = run_predict(str(run), [str(listing), str(toy_shards)], csv_out, top_k=4, num_workers=1,
                       progress=False)  # a list and the shard set's val split (20 images)
    assert done["images"] == 3 + 20 and done["errors"] == 1
    rows = csv_out.read_text().splitlines()
    assert rows[0].startswith("path,class_1,prob_1,class_2") and rows[0].endswith(",error")
    assert any("missing.png" in r and "FileNotFoundError" in r for r in rows)
    assert sum("#val_" in r for r in rows) == 20
    exported = tmp_path / "exported.csv"
    run_predict(str(pipeline_runs / "bft" / "export"), [str(listing), str(toy_shards)], exported, top_k=4,
                num_workers=0, progress=False)
    assert exported.read_text() == csv_out.read_text()  # the run's checkpoint and its export predict alike

    raw, adjusted = tmp_path / "raw.jsonl", tmp_path / "fwd.jsonl"
    export = str(pipeline_runs / "bft" / "export")
    run_predict(export, [str(p) for p in val_images], raw, top_k=4, num_workers=0, progress=False)
    run_predict(export, [str(p) for p in val_images], adjusted, top_k=4, num_workers=0, progress=False,
                test_prior="forward-50")
    config = json.loads((pipeline_runs / "bft" / "export" / "config.json").read_text())
    counts = config["livt"]["class_counts"]
    adj = prior_adjustment(counts, "bal_bce", resolve_prior("forward-50", counts))
    for r, a in zip(read_jsonl(raw), read_jsonl(adjusted), strict=True):
        p_raw = torch.zeros(4)
        for t in r["top_k"]:
            p_raw[t["index"]] = t["prob"]
        expect = torch.softmax(p_raw.log() + adj, dim=0)  # softmax(z + a) = softmax(log softmax(z) + a)
        got = torch.zeros(4)
        for t in a["top_k"]:
            got[t["index"]] = t["prob"]
        assert torch.allclose(got, expect, atol=1e-5)


@pytest.mark.slow
def test_eval_prints_the_test_prior_table_equal_to_the_engines(pipeline_runs, toy_shards, tmp_path):
    out = tmp_path / "eval"
    result = run_livt(["eval", *BFT_ARGS, "--output", str(out), f"data.path={toy_shards}",
                       f"model.init={pipeline_runs / 'bft' / 'export'}"], ranks=0)
    assert "forward-50" in result.stdout and "backward-50" in result.stdout and "adjusted" in result.stdout
    plain = json.loads((out / "metrics.json").read_text())
    engine = json.loads((pipeline_runs / "bft" / "metrics.json").read_text())  # 2 ranks, gathered
    exported = json.loads((pipeline_runs / "bft" / "export" / "config.json").read_text())["livt"]["provenance"]
    assert plain["provenance"] == {**exported, "weights": str((pipeline_runs / "bft" / "export").resolve())}
    table = plain["test_priors"]
    assert list(table)[:11] == ["backward-50", "backward-25", "backward-10", "backward-5", "backward-2", "uniform",
                                "forward-2", "forward-5", "forward-10", "forward-25", "forward-50"]
    for name, row in table.items():
        for key in ("raw", "adjusted"):
            assert row[key] == pytest.approx(engine["test_priors"][name][key], abs=1e-6), (name, key)
    # a balanced val set: uniform raw = top-1; a Bal-BCE model needs no adjustment for the uniform prior
    assert table["uniform"]["raw"] == pytest.approx(plain["top1"])
    assert table["uniform"]["adjusted"] == pytest.approx(plain["top1"])
    assert list((out / "plots").glob("test_priors_*.png")) and list((pipeline_runs / "bft" / "plots").glob(
        "test_priors_*.png"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for run in (out, pipeline_runs / "bft"):
        images = set()
        for events in (run / "tensorboard").glob("events.*"):
            acc = EventAccumulator(str(events), size_guidance={"images": 0})
            acc.Reload()
            images |= set(acc.Tags()["images"])
        assert "eval/test_priors" in images, (run, images)


# ---------------------------------------------------------------------------------------------- safe loading
class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.pt"
    torch.save({"model": {"head.weight": torch.zeros(4, 32)}, "extra": _RunsCode(marker)}, evil)
    with pytest.raises(UnsafeWeightsError, match="refused to load.*posix.system|refused to load.*os.system"):
        load_weights(evil)
    assert not marker.exists()
    # inside a DeepSpeed checkpoint folder: DeepSpeed's own loader runs with weights_only forced on
    tag = tmp_path / "run" / "checkpoints" / "step00000001"
    tag.mkdir(parents=True)
    (tag.parent / "latest").write_text("step00000001")
    torch.save({"module": {}, "evil": _RunsCode(marker)}, tag / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": _RunsCode(marker)}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(UnsafeWeightsError, match="refused to load"):
        load_weights(tmp_path / "run")
    assert not marker.exists()
    # the CLI says so and exits 2 (model.init / eval use the same load_weights); it reads its input first
    images = tmp_path / "images"
    images.mkdir()
    PIL.Image.new("RGB", (20, 20), (90, 30, 200)).save(images / "one.png")
    result = run_livt(["predict", "--model", str(evil), "--input", str(images), "--output",
                       str(tmp_path / "p.jsonl")], ranks=0, check=False)
    assert result.returncode == 2 and "refused to load" in result.stderr, result.stderr[-2000:]
    assert not marker.exists()


def test_model_init_refuses_it_too(tmp_path):
    from livt_ds.config import load_recipe
    from livt_ds.tasks import FinetuneTask
    from livt_ds.weights import initial_model

    marker = tmp_path / "pwned"
    torch.save({"model": {"x": torch.zeros(1)}, "extra": _RunsCode(marker)}, tmp_path / "evil.pt")
    recipe = load_recipe(REPO / "configs" / "tiny_bft.yaml", [f"model.init={tmp_path / 'evil.pt'}"])
    meta = {"num_classes": 4, "classes": CLASSES, "class_counts": [24, 14, 8, 5], "splits": {}}
    with pytest.raises(UnsafeWeightsError, match="refused to load"):
        initial_model(FinetuneTask(recipe, meta))
    assert not marker.exists()


@pytest.mark.slow
def test_predict_takes_safetensors_and_pt_weights_and_a_single_tar(pipeline_runs, toy_shards, val_images, tmp_path):
    """``--model`` as the export's weights files (.safetensors, .pt) predicts what the export folder does, and a
    single shard ``.tar`` as input gives one line per sample of that tar (keys as in the shard)."""
    from livt_ds.predict import run_predict

    export = pipeline_runs / "bft" / "export"
    shard = toy_shards / json.loads((toy_shards / "meta.json").read_text())["splits"]["val"]["shards"][0]
    with tarfile.open(shard) as tar:
        keys = sorted({Path(m.name).name.split(".", 1)[0] for m in tar.getmembers() if m.isfile()})
    assert len(keys) >= 5
    inputs = [str(p) for p in val_images[:4]] + [str(shard)]
    outputs = {}
    for name, model in (("folder", export), ("safetensors", export / "model.safetensors"),
                        ("pt", export / "model.pt")):
        outputs[name] = tmp_path / f"{name}.jsonl"
        done = run_predict(str(model), inputs, outputs[name], top_k=4, num_workers=0, progress=False)
        assert done == {**done, "images": 4 + len(keys), "errors": 0}, name
    lines = read_jsonl(outputs["folder"])
    assert sorted(line["path"].rsplit("#", 1)[1] for line in lines if "#" in line["path"]) == keys
    for name in ("safetensors", "pt"):
        assert read_jsonl(outputs[name]) == lines, name  # the same classes and probabilities, line for line
