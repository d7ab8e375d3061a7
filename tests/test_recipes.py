"""Shipped recipes and DeepSpeed configs: found by file name from any folder, a path still wins, `livt recipes`."""

from __future__ import annotations

from pathlib import Path

import pytest

from livt_ds.cli import main
from livt_ds.config import load_ds_config, load_recipe
from livt_ds.errors import ConfigError
from livt_ds.recipes import shipped

REPO = Path(__file__).resolve().parents[1]


def test_shipped_names_load_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe("tiny_bft.yaml", ["data.path=shards/toy"])
    assert recipe == load_recipe(REPO / "configs" / "tiny_bft.yaml", ["data.path=shards/toy"])  # base: resolved too
    assert load_recipe("tiny_mgp").model.name == load_recipe(REPO / "configs" / "tiny_mgp.yaml").model.name
    assert load_ds_config("cpu_fp32.json") == load_ds_config(REPO / "ds_configs" / "cpu_fp32.json")


def test_a_path_means_that_file_and_a_missing_name_lists_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny_bft.yaml").write_text("train:\n  epochs: 7\n")  # a local file shadows the shipped name
    assert load_recipe("tiny_bft.yaml").train.epochs == 7
    with pytest.raises(ConfigError, match="tiny_mgp.yaml"):
        load_recipe("no_such_recipe.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_recipe("elsewhere/tiny_mgp.yaml")  # a path is never looked up by its name
    with pytest.raises(ConfigError, match="cpu_fp32.json"):
        load_ds_config("zero9.json")


def test_the_top_level_folders_are_the_shipped_ones():
    for folder, kind in (("configs", "recipe"), ("ds_configs", "ds_config")):
        assert sorted(p.name for p in (REPO / folder).iterdir()) == [p.name for p in shipped(kind)]
        assert (REPO / folder).resolve() == shipped(kind)[0].parent.resolve()


def test_livt_recipes_lists_every_shipped_file(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for kind in ("recipe", "ds_config"):
        for path in shipped(kind):
            assert path.name in out
    assert "ZeRO stage 3, bf16" in out
