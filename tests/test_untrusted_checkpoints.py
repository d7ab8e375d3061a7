"""A crafted checkpoint never runs code: a pickle payload in the model states, in either optimizer shard, or in the
universal folder is refused by every way a checkpoint is read (model.init, livt eval, livt predict, export, resume),
including DeepSpeed's universal conversion, which runs in a process of its own (livt_ds/universal.py).

The crafted folders are copies of the shared 2-rank ZeRO-2 BFT run whose rank-0 optimizer shard lost its
``zero_stage`` key: that is how a BF16_Optimizer checkpoint looks, so consolidation goes through the universal
conversion, the path that used to unpickle every file with ``weights_only=False``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import BFT_ARGS, REPO, run_livt
from PIL import Image

from livt_ds.checkpoint import to_universal
from livt_ds.config import load_recipe
from livt_ds.errors import UnsafeWeightsError
from livt_ds.safe_load import load_torch_file

RANK0 = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
POSITIONS = {"model_states": "mp_rank_00_model_states.pt", "optim_rank0": RANK0,
             "optim_rank1": "zero_pp_rank_1_mp_rank_00_optim_states.pt"}


class RunsCode:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path) -> None:
    """Add the payload to a checkpoint file, keeping everything else in it (so readers reach it)."""
    obj = load_torch_file(path)
    obj["extra"] = RunsCode(marker)
    torch.save(obj, path)


def looks_like_bf16_optimizer(tag_dir: Path) -> None:
    """Drop ``zero_stage`` from the rank-0 optimizer shard: consolidation then takes the universal path."""
    obj = load_torch_file(tag_dir / RANK0)
    del obj["optimizer_state_dict"]["zero_stage"]
    torch.save(obj, tag_dir / RANK0)


@pytest.fixture(scope="module")
def bft_with_universal(pipeline_runs, tmp_path_factory) -> Path:
    """A copy of the shared BFT run without its export, its latest tag also converted to the universal format."""
    run = tmp_path_factory.mktemp("untrusted") / "bft"
    shutil.copytree(pipeline_runs / "bft", run, ignore=shutil.ignore_patterns("export", "tensorboard", "plots"))
    tag = (run / "checkpoints" / "latest").read_text().strip()
    to_universal(run / "checkpoints", tag)
    return run


def crafted(source: Path, position: str, tmp_path: Path) -> tuple[Path, Path]:
    """(a crafted copy of the run with the payload at ``position``, the marker file the payload would create)."""
    run = tmp_path / "crafted"
    keep_universal = position == "universal"
    shutil.copytree(source, run, ignore=None if keep_universal else shutil.ignore_patterns("*_universal"))
    tag_dir = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    marker = tmp_path / "code-ran"
    looks_like_bf16_optimizer(tag_dir)
    if keep_universal:
        fp32 = sorted((tag_dir.parent / f"{tag_dir.name}_universal" / "zero").glob("*/fp32.pt"))[0]
        plant_value = {"param": load_torch_file(fp32)["param"], "extra": RunsCode(marker)}
        torch.save(plant_value, fp32)
    else:
        plant(tag_dir / POSITIONS[position], marker)
    return run, marker


def bft_recipe(run: Path, toy_shards: Path, *extra: str):
    return load_recipe(REPO / "configs" / "tiny_bft.yaml", [f"data.path={toy_shards}", f"model.init={run}", *extra])


# ------------------------------------------------------------------------------------------------ the entry points
def model_init(run: Path, toy_shards: Path, tmp_path: Path) -> None:
    from livt_ds.data.shards import load_meta
    from livt_ds.tasks import FinetuneTask
    from livt_ds.weights import initial_model

    initial_model(FinetuneTask(bft_recipe(run, toy_shards), load_meta(toy_shards)))


def evaluate(run: Path, toy_shards: Path, tmp_path: Path) -> None:
    from livt_ds.evaluate import run_eval

    run_eval(bft_recipe(run, toy_shards), str(REPO / "ds_configs" / "cpu_fp32.json"), tmp_path / "eval")


def predict(run: Path, toy_shards: Path, tmp_path: Path) -> None:
    from livt_ds.predict import load_predictor

    load_predictor(run)


def export(run: Path, toy_shards: Path, tmp_path: Path) -> None:
    from livt_ds.weights import export as export_run

    export_run(run)


def resume(run: Path, toy_shards: Path, tmp_path: Path) -> None:
    """A 1-process launch resuming the 2-rank checkpoint: the universal conversion comes first, before an engine."""
    from livt_ds.engine import open_run, train

    recipe = bft_recipe(run / "checkpoints", toy_shards, "model.init=", "augment.mixup=0", "augment.cutmix=0")
    launch, state = open_run("finetune", recipe, str(REPO / "ds_configs" / "cpu_fp32.json"), tmp_path / "resumed",
                             resume=str(run), allow_recipe_change=True)
    try:
        train(launch, state)
    finally:
        launch.close()


# Every entry point meets every position. Where an in-process reader comes first it refuses; otherwise the universal
# converter's process does (model.init on model_states / optim_rank1, resume on optim_rank0 / optim_rank1).
# Left out: eval, predict and export on optim_rank1 (the converter, through the same consolidation as model.init;
# predict is the CLI test below) and resume on universal (an engine reads it: the CLI test below).
SKIP = {("optim_rank1", "evaluate"), ("optim_rank1", "predict"), ("optim_rank1", "export"), ("universal", "resume")}
CASES = [(position, reader) for position in ("model_states", "optim_rank0", "optim_rank1", "universal")
         for reader in (model_init, evaluate, predict, export, resume) if (position, reader.__name__) not in SKIP]


@pytest.mark.slow
@pytest.mark.parametrize(("position", "reader"), CASES, ids=[f"{p}-{r.__name__}" for p, r in CASES])
@pytest.mark.xdist_group("bft_with_universal")
def test_a_crafted_file_is_refused_before_it_runs(bft_with_universal, toy_shards, tmp_path, position, reader):
    run, marker = crafted(bft_with_universal, position, tmp_path)
    with pytest.raises(UnsafeWeightsError, match="refused to load") as refused:
        reader(run, toy_shards, tmp_path)
    assert not marker.exists(), "the payload ran"
    assert str(run) in str(refused.value) and "\n" not in str(refused.value)
    assert not list((run / "checkpoints").glob("*_universal.tmp")), "a refused conversion left its folder"


def one_line_refusal(result, command: str) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"livt {command}: error: ") and "refused to load" in last, last
    return last


@pytest.mark.slow
@pytest.mark.xdist_group("bft_with_universal")
def test_the_commands_fail_with_one_line_and_rc_2(bft_with_universal, toy_shards, tmp_path):
    # predict: the payload sits in rank 1's optimizer shard, which only the universal converter reads
    run, marker = crafted(bft_with_universal, "optim_rank1", tmp_path / "a")
    image = tmp_path / "image.png"
    Image.new("RGB", (20, 20)).save(image)
    result = run_livt(["predict", "--model", str(run), "--input", str(image), "--output",
                       str(tmp_path / "p.jsonl")], ranks=0, check=False)
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in one_line_refusal(result, "predict")
    assert not marker.exists()
    # eval: in the model states
    run, marker = crafted(bft_with_universal, "model_states", tmp_path / "b")
    result = run_livt(["eval", *BFT_ARGS, "--output", str(tmp_path / "eval"), f"data.path={toy_shards}",
                       f"model.init={run}"], ranks=0, check=False)
    assert "mp_rank_00_model_states.pt" in one_line_refusal(result, "eval")
    assert not marker.exists()


@pytest.mark.slow
@pytest.mark.xdist_group("bft_with_universal")
def test_resume_refuses_a_crafted_universal_folder(bft_with_universal, toy_shards, tmp_path):
    """1 rank resuming 2 ranks' checkpoint loads its universal form through DeepSpeed's engine, weights-only."""
    run, marker = crafted(bft_with_universal, "universal", tmp_path)
    result = run_livt(["finetune", *BFT_ARGS, "--output", str(tmp_path / "resumed"), f"data.path={toy_shards}",
                       "model.init=", "augment.mixup=0", "augment.cutmix=0", "--resume", str(run),
                       "--allow-recipe-change"], ranks=0, check=False)
    assert "fp32.pt" in one_line_refusal(result, "finetune")
    assert not marker.exists()
