"""The one inference model (weights.load_classifier): `livt eval` describes it from its recipe, `livt predict` from
the weights' own record, and both get the same network; a checkpoint folder moved out of its run still loads."""

from __future__ import annotations

import shutil

import torch

from livt_ds.config import load_recipe
from livt_ds.data.shards import load_meta
from livt_ds.hub import hub_config
from livt_ds.models.vit import Fp32Linear
from livt_ds.tasks import FinetuneTask
from livt_ds.weights import load_classifier


def outputs(model: torch.nn.Module, size: int) -> torch.Tensor:
    images = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(images)


def test_eval_and_predict_build_the_same_classifier(pipeline_runs):
    run = pipeline_runs / "bft"
    recipe = load_recipe(run / "config.yaml")
    task = FinetuneTask(recipe, load_meta(recipe.data.path))
    described = hub_config(recipe, "finetune", task.meta["classes"], task.class_counts, task.mean, task.std)
    for_eval, _ = load_classifier(run, described)
    for_predict, recorded = load_classifier(run)
    assert not for_eval.training and isinstance(for_eval.head, Fp32Linear)  # the head in fp32, as in training
    assert recorded["architecture"] == described["architecture"]
    assert recorded["model_args"] == described["model_args"]
    assert for_eval.state_dict().keys() == for_predict.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(for_eval.state_dict().values(), for_predict.state_dict().values()))
    size = recipe.model.img_size
    assert torch.equal(outputs(for_eval, size), outputs(for_predict, size))


def test_a_checkpoint_outside_its_run_folder_loads_like_the_run(pipeline_runs, tmp_path):
    run = pipeline_runs / "bft"
    tag = (run / "checkpoints" / "latest").read_text().strip()
    loose = tmp_path / tag
    shutil.copytree(run / "checkpoints" / tag, loose)
    moved, config = load_classifier(loose)
    exported, export_config = load_classifier(run / "export")  # the export of the same checkpoint
    assert config["livt"]["tag"] == export_config["livt"]["tag"] == tag
    assert config["label_names"] == export_config["label_names"]
    size = config["pretrained_cfg"]["input_size"][-1]
    assert torch.equal(outputs(moved, size), outputs(exported, size))
