"""``train.micro_batch`` is a per-rank ceiling: every shipped recipe resolves with every bf16 DeepSpeed config on any
world size that divides its batch (1 to 512 ranks), and a world size that does not gets an error naming the
nearest batch sizes that work and their lr."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from livt_ds.config import ConfigError, load_ds_config, load_recipe, plan_batch, resolve_ds_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(REPO.glob("configs/*.yaml"))
BF16_CONFIGS = sorted(REPO.glob("ds_configs/*bf16*.json"))
WORLDS = range(1, 513)


@pytest.mark.parametrize("ds_path", BF16_CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("recipe_path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_resolves_on_every_world_that_divides_its_batch(recipe_path, ds_path):
    recipe = load_recipe(recipe_path)
    ds = load_ds_config(ds_path)
    ceiling, batch = recipe.train.micro_batch, recipe.train.batch_size
    for world in WORLDS:
        if batch is not None and batch % world:
            with pytest.raises(ConfigError, match=f"train.batch_size={batch} cannot be split over {world} ranks"):
                resolve_ds_config(ds, recipe, world)
            continue
        out = resolve_ds_config(ds, recipe, world)
        micro, accum = out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"]
        assert 1 <= micro <= ceiling and accum >= 1
        assert out["train_batch_size"] == micro * accum * world
        if batch is None:  # no fixed batch: the micro-batch as given, the batch grows with the world
            assert (micro, accum) == (ceiling, 1)
            continue
        assert out["train_batch_size"] == batch
        # the largest micro-batch at or under the ceiling that makes a whole accumulation
        assert not any((batch // world) % m == 0 for m in range(micro + 1, ceiling + 1)), (world, micro)
        assert out["optimizer"]["params"]["lr"] == pytest.approx(recipe.train.blr * batch / 256)


def test_the_layouts_of_the_first_multi_node_steps():
    ds = load_ds_config(REPO / "ds_configs" / "zero2_bf16.json")

    def layout(name: str, world: int) -> tuple[int, int]:
        plan = plan_batch(ds, load_recipe(REPO / "configs" / f"{name}.yaml").train, world)
        return plan.micro, plan.accumulation

    assert layout("bft_vit_base_imagenet_lt", 1) == (128, 8)
    assert layout("bft_vit_base_imagenet_lt", 16) == (64, 1)  # 2 nodes: under the ceiling of 128
    assert layout("bft_vit_base_imagenet_lt", 512) == (2, 1)
    assert layout("mgp_vit_large_imagenet_lt", 64) == (64, 1)
    assert layout("mgp_vit_base_inat18", 16) == (256, 1)
    assert layout("bft_vit_large_inat18", 32) == (32, 1)


@pytest.mark.parametrize(("world", "suggested"), [(24, [1008, 1032]), (1000, [1000, 2000]), (2048, [2048])])
def test_no_layout_names_the_nearest_batches_and_their_lr(world, suggested):
    recipe = load_recipe(REPO / "configs" / "bft_vit_base_imagenet_lt.yaml")
    ds = load_ds_config(REPO / "ds_configs" / "zero2_bf16.json")
    with pytest.raises(ConfigError) as caught:
        resolve_ds_config(ds, recipe, world)
    text = str(caught.value)
    named = [int(b) for b in re.findall(r"train\.batch_size=(\d+) \(lr", text)]
    assert named == suggested, text
    for b in named:  # each suggestion works and its lr is the one printed
        out = resolve_ds_config(ds, load_recipe(REPO / "configs" / "bft_vit_base_imagenet_lt.yaml",
                                                [f"train.batch_size={b}"]), world)
        assert out["train_batch_size"] == b
        assert f"train.batch_size={b} (lr {recipe.train.blr * b / 256:.3g})" in text


def test_a_micro_batch_fixed_in_the_json_is_not_lowered():
    recipe = load_recipe(None, ["train.batch_size=1024"])
    ds = load_ds_config(REPO / "ds_configs" / "zero2_bf16.json")
    ds["train_micro_batch_size_per_gpu"] = 128
    assert plan_batch(ds, recipe.train, 8).micro == 128
    with pytest.raises(ConfigError, match=r"train_micro_batch_size_per_gpu 128 x 16 ranks.*train.batch_size=2048"):
        plan_batch(ds, recipe.train, 16)
