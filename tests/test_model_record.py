"""A model carries the facts of its training, and only training writes a training run's files.

- `livt eval` adjusts for test priors with the loss the model was trained with (its export's config.json, its .pt
  payload or its checkpoint's recipe), whatever loss ``--config`` names; it says so when they differ.
- `livt eval --output RUN` writes under ``RUN/evals/``; an export describes the checkpoint it was made of; a run's
  stale export gives way to its latest checkpoint; ``--resume none`` into a used folder needs ``--overwrite``; a
  recipe change that trains nothing is refused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import BFT_ARGS, REPO, read_jsonl, run_livt

from livt_ds.checkpoint import saved_recipe
from livt_ds.config import load_recipe
from livt_ds.data.shards import read_tar_samples, shard_paths
from livt_ds.errors import CheckpointError, ConfigError
from livt_ds.evaluate import run_eval
from livt_ds.priors import expected_accuracy, resolve_prior
from livt_ds.provenance import recipe_digest

DS = str(REPO / "ds_configs" / "cpu_fp32.json")


@pytest.fixture(scope="module")
def ce_run(pipeline_runs, toy_shards, tmp_path_factory) -> Path:
    """A 1-epoch CE fine-tune from the shared MGP run (one process), exported."""
    from livt_ds.weights import export

    run = tmp_path_factory.mktemp("record") / "ce"
    run_livt(["finetune", *BFT_ARGS, "--output", str(run), f"data.path={toy_shards}",
              f"model.init={pipeline_runs / 'mgp'}", "loss.name=ce", "train.epochs=1", "augment.mixup=0",
              "augment.cutmix=0"], ranks=0)
    export(run)
    return run


def copy_run(run: Path, tmp_path: Path, *ignore: str) -> Path:
    target = tmp_path / run.name
    shutil.copytree(run, target, ignore=shutil.ignore_patterns(*ignore) if ignore else None)
    return target


def evaluate(model: Path, toy_shards: Path, output: Path, *overrides: str) -> dict:
    recipe = load_recipe(REPO / "configs" / "tiny_bft.yaml", [f"data.path={toy_shards}", f"model.init={model}",
                                                             *overrides])
    return run_eval(recipe, DS, output)


def predicted_accuracy(model: Path, toy_shards: Path, prior: str, tmp_path: Path) -> float:
    """Expected top-1 under ``prior`` from `livt predict --test-prior` (its own code path) on the val shards."""
    from livt_ds.predict import run_predict

    out = tmp_path / f"{prior}.jsonl"
    run_predict(str(model), [str(toy_shards)], out, top_k=1, test_prior=prior, num_workers=0, progress=False)
    labels = {f"{url}#{s['__key__']}": int(s["cls"]) for url in shard_paths(toy_shards, "val")
              for s in read_tar_samples(url)}
    hits, seen = [0] * 4, [0] * 4
    for line in read_jsonl(out):
        label = labels[line["path"]]
        seen[label] += 1
        hits[label] += line["top_k"][0]["index"] == label
    counts = json.loads((toy_shards / "meta.json").read_text())["class_counts"]
    return expected_accuracy([100.0 * h / n for h, n in zip(hits, seen, strict=True)], resolve_prior(prior, counts))


@pytest.mark.slow
@pytest.mark.xdist_group("ce_run")
def test_eval_adjusts_for_the_models_own_loss_not_the_recipes(ce_run, toy_shards, tmp_path, capsys):
    """A CE model evaluated under the Bal-BCE recipe: the adjusted rows are the CE model's."""
    for model in (ce_run, ce_run / "checkpoints", ce_run / "export", ce_run / "export" / "model.pt"):
        metrics = evaluate(model, toy_shards, tmp_path / model.name)
        assert metrics["test_prior_loss"]["name"] == "ce", model
        assert any("--config's loss bal_bce (tau 1.0) is ignored" in note for note in metrics["notes"]), model
        assert "is ignored: the test-prior adjustment follows the model" in capsys.readouterr().out
        saved = yaml.safe_load((Path(metrics["output"]) / "config.yaml").read_text())
        assert saved["loss"]["name"] == "ce"  # the eval folder's recipe says what was done
    under_ce = evaluate(ce_run / "export", toy_shards, tmp_path / "ce", "loss.name=ce")
    assert under_ce["notes"] == [] and under_ce["test_priors"] == metrics["test_priors"]
    for prior in ("uniform", "forward-50"):
        assert metrics["test_priors"][prior]["adjusted"] == pytest.approx(
            predicted_accuracy(ce_run / "export", toy_shards, prior, tmp_path), abs=1e-6), prior


@pytest.mark.slow
@pytest.mark.xdist_group("ce_run")
def test_eval_of_a_training_run_writes_under_its_evals_folder(ce_run, toy_shards, tmp_path):
    run = copy_run(ce_run, tmp_path)
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "metrics.json", "metrics.jsonl",
                                                           "history.jsonl")}
    metrics = evaluate(run, toy_shards, run)
    out = Path(metrics["output"])
    assert out.parent == run / "evals" and (out / "metrics.json").is_file() and (out / "config.yaml").is_file()
    assert {name: (run / name).read_bytes() for name in before} == before
    assert json.loads((out / "metrics.json").read_text())["provenance"]["checkpoint_tag"] == "step00000006"
    assert Path(evaluate(run, toy_shards, run)["output"]) != out  # a second one does not replace the first


@pytest.mark.slow
def test_exports_and_predictions_describe_the_checkpoint_not_a_rewritten_config(pipeline_runs, tmp_path):
    """Whatever a later launch wrote into config.yaml, an export's recipe, loss and hash are its checkpoint's."""
    from livt_ds.predict import load_predictor
    from livt_ds.weights import export

    run = copy_run(pipeline_runs / "bft", tmp_path, "export", "tensorboard")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["loss"]["name"] = "ce"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    trained_with = saved_recipe(run / "checkpoints" / "step00000006")
    assert load_predictor(run).config["livt"]["loss"]["name"] == "bal_bce"  # consolidated on the fly
    export(run)
    livt = json.loads((run / "export" / "config.json").read_text())["livt"]
    assert livt["loss"]["name"] == "bal_bce" and livt["recipe"] == trained_with
    assert livt["provenance"]["recipe_sha256"] == recipe_digest(trained_with)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".export")) == []  # no temporary left
    (run / "export" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="holds files that are not an export's"):
        export(run)
    assert (run / "export" / "notes.txt").is_file()


@pytest.mark.slow
def test_a_stale_export_gives_way_to_the_latest_checkpoint(pipeline_runs, tmp_path, capsys):
    """RUN/export of step 3 while the run's latest is step 6: model.init=RUN and --model RUN use step 6."""
    import torch

    from livt_ds.weights import consolidate, export, load_config_and_weights, load_weights, weights_provenance

    run = copy_run(pipeline_runs / "bft", tmp_path, "export", "tensorboard")
    export(run, tag="step00000003")
    latest = consolidate(run / "checkpoints", "step00000006")
    weights = load_weights(run)
    assert "older than the run's latest checkpoint step00000006" in capsys.readouterr().out
    assert all(torch.equal(weights[k], latest[k]) for k in latest)
    assert not all(torch.equal(weights[k], load_weights(run / "export")[k]) for k in latest)
    assert weights_provenance(run)["checkpoint_tag"] == "step00000006"
    assert load_config_and_weights(run)[0]["livt"]["tag"] == "step00000006"
    export(run)  # refreshed: the export is used again
    capsys.readouterr()
    assert torch.equal(load_weights(run)["head.weight"], latest["head.weight"])
    assert "older" not in capsys.readouterr().out
    assert weights_provenance(run)["checkpoint_tag"] == "step00000006"


def _launch(run: Path, toy_shards: Path, *overrides: str, **kwargs) -> None:
    """One in-process finetune launch into ``run`` (open_run, then train)."""
    from livt_ds.engine import open_run, train

    recipe = load_recipe(REPO / "configs" / "tiny_bft.yaml", [f"data.path={toy_shards}", *overrides])
    launch, state = open_run("finetune", recipe, DS, run, **kwargs)
    try:
        train(launch, state)
    finally:
        launch.close()


@pytest.mark.slow
def test_a_fresh_start_in_a_used_folder_needs_overwrite(pipeline_runs, toy_shards, tmp_path):
    from livt_ds.cli import main
    from livt_ds.provenance import discard_run_outputs

    run = copy_run(pipeline_runs / "bft", tmp_path, "tensorboard")
    before = sorted(p.name for p in run.rglob("*"))
    with pytest.raises(CheckpointError, match="--resume none: .* holds checkpoints of an earlier run.*--overwrite"):
        _launch(run, toy_shards, resume="none")
    assert sorted(p.name for p in run.rglob("*")) == before
    assert main(["finetune", *BFT_ARGS, "--output", str(run), "--overwrite"]) == 2  # only with --resume none
    history = (run / "history.jsonl").read_text()
    assert {"checkpoints", "export", "metrics.jsonl", "config.yaml"} <= set(discard_run_outputs(run))
    assert sorted(p.name for p in run.iterdir()) == ["history.jsonl"]
    assert (run / "history.jsonl").read_text() == history


@pytest.mark.slow
@pytest.mark.xdist_group("ce_run")
def test_overwrite_starts_over(ce_run, toy_shards, tmp_path):
    run = copy_run(ce_run, tmp_path)
    run_livt(["finetune", *BFT_ARGS, "--output", str(run), f"data.path={toy_shards}", "model.init=",
              "train.stop_after_steps=1", "--resume", "none", "--overwrite"], ranks=0)
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step")) == ["step00000001"]
    assert not (run / "export").exists() and not (run / "evals").exists()
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] == [1]
    starts = [r for r in read_jsonl(run / "history.jsonl") if r["event"] == "start"]
    assert [s["recipe"]["loss"]["name"] for s in starts] == ["ce", "bal_bce"] and starts[1]["start_step"] == 0


@pytest.mark.slow
def test_a_recipe_change_that_trains_nothing_is_refused(pipeline_runs, toy_shards, tmp_path):
    """A finished Bal-BCE run 'continued' as CE for 0 steps would only relabel its weights."""
    run = copy_run(pipeline_runs / "bft", tmp_path, "tensorboard")
    saved = saved_recipe(run / "checkpoints" / "step00000006")
    # the same schedule on one process: 3 steps an epoch, so the launch would end at the checkpoint's step 6
    same = [f"model.init={saved['model']['init']}", "augment.mixup=0", "augment.cutmix=0", "train.batch_size=16"]
    before = (run / "config.yaml").read_bytes(), (run / "history.jsonl").read_bytes()
    with pytest.raises(ConfigError, match=r"would train nothing, so the recipe change \(loss.name, train.batch_size"):
        _launch(run, toy_shards, *same, "loss.name=ce", resume="auto", allow_recipe_change=True)
    assert ((run / "config.yaml").read_bytes(), (run / "history.jsonl").read_bytes()) == before
    assert not (run / "run.lock").exists()
