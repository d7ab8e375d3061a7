"""Recipe schema, overrides, and the merge with DeepSpeed JSON configs."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from livt_ds.config import (
    Recipe,
    load_ds_config,
    load_recipe,
    plan_batch,
    recipe_from_dict,
    recipe_to_dict,
    resolve_ds_config,
    save_recipe,
)
from livt_ds.errors import ConfigError
from livt_ds.provenance import flatten

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "model:\n  name: vit_test\n  img_size: 32\ntrain:\n  epochs: 3\n  blr: 1.0e-3\n")
    recipe = load_recipe(path, ["train.epochs=7", "loss.tau=0.5", "data.path=shards/x", "loss.test_prior=[0.5, 0.5]"])
    assert recipe.model.name == "vit_test" and recipe.model.img_size == 32
    assert recipe.train.epochs == 7 and recipe.train.blr == 1e-3
    assert recipe.loss.tau == 0.5 and recipe.loss.test_prior == [0.5, 0.5]
    assert recipe.data.path == "shards/x"
    assert recipe.model.patch_size == 16  # default kept


def test_int_is_accepted_for_float_and_null_for_optional(tmp_path):
    recipe = load_recipe(None, ["train.blr=1", "augment.rand_augment=null", "train.lr=null"])
    assert isinstance(recipe.train.blr, float) and recipe.augment.rand_augment is None


def test_unknown_key_names_key_and_valid_siblings(tmp_path):
    path = write(tmp_path, "train:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "train.epoch" in message and "epochs" in message and "warmup_epochs" in message
    with pytest.raises(ConfigError, match="unknown key 'modle'"):
        load_recipe(None, ["modle.name=vit_base"])


def test_wrong_type_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="train.epochs: expected int"):
        load_recipe(None, ["train.epochs=abc"])
    with pytest.raises(ConfigError, match="model.norm_pix"):
        load_recipe(None, ["model.norm_pix=3"])
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_recipe(write(tmp_path, "model: 3\n"))


def test_round_trip_through_yaml(tmp_path):
    recipe = load_recipe(None, ["train.epochs=5", "loss.name=bce"])
    save_recipe(recipe, tmp_path / "out.yaml")
    again = load_recipe(tmp_path / "out.yaml")
    assert again == recipe
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.train.epochs = 3


def test_every_shipped_recipe_round_trips_and_resolves(tmp_path):
    """Each recipe: every value its YAML (and its bases) sets is the loaded value; saved and loaded again it is the
    same recipe; and on 2 ranks with each shipped DeepSpeed JSON it resolves to batch = micro x accumulation x
    world with lr = blr x batch / 256 (or train.lr)."""
    from livt_ds.config import read_recipe_tree, resolve_ds_config

    paths = sorted((REPO / "configs").glob("*.yaml"))
    ds_paths = sorted((REPO / "ds_configs").glob("*.json"))
    assert len(paths) >= 15 and len(ds_paths) >= 5
    for path in paths:
        recipe = load_recipe(path)
        assert isinstance(recipe, Recipe)
        loaded = flatten(recipe_to_dict(recipe))
        written = {k: v for k, v in flatten(read_recipe_tree(path)).items() if k != "base"}
        assert written and {k: loaded[k] for k in written} == written, path.name
        save_recipe(recipe, tmp_path / path.name)
        assert load_recipe(tmp_path / path.name) == recipe, path.name
        assert recipe_from_dict(recipe_to_dict(recipe)) == recipe, path.name
        for ds_path in ds_paths:
            ds = resolve_ds_config(load_ds_config(ds_path), recipe, world=2)
            batch = ds["train_batch_size"]
            assert batch == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 2
            assert batch == (recipe.train.batch_size or recipe.train.micro_batch * 2), (path.name, ds_path.name)
            expected_lr = recipe.train.lr if recipe.train.lr is not None else recipe.train.blr * batch / 256
            assert ds["optimizer"]["params"]["lr"] == pytest.approx(expected_lr, rel=1e-12)
            assert "auto" not in json.dumps(ds), (path.name, ds_path.name)
    for path in sorted((REPO / "ds_configs").glob("*.json")):
        ds = load_ds_config(path)
        assert ds["gradient_clipping"] == 0.0  # explicit: DeepSpeed would clip at 1.0 otherwise


def ds(**kw):
    base = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": 0.05}}}
    base.update(kw)
    return base


def test_auto_fields_are_filled_from_the_recipe():
    recipe = load_recipe(None, ["train.batch_size=64", "train.micro_batch=8", "train.blr=1e-3"])
    out = resolve_ds_config(ds(), recipe, world=2)
    assert out["train_micro_batch_size_per_gpu"] == 8
    assert out["gradient_accumulation_steps"] == 4
    assert out["train_batch_size"] == 64
    assert out["optimizer"]["params"]["lr"] == pytest.approx(1e-3 * 64 / 256)
    assert out["gradient_clipping"] == 0.0


def test_explicit_json_values_are_used_when_recipe_is_silent():
    recipe = load_recipe(None, ["train.blr=2.56e-2"])
    out = resolve_ds_config(ds(train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2), recipe, world=2)
    assert out["train_batch_size"] == 16
    assert out["optimizer"]["params"]["lr"] == pytest.approx(2.56e-2 * 16 / 256)


def test_contradictions_are_errors():
    recipe = load_recipe(None, ["train.batch_size=64", "train.micro_batch=8"])
    with pytest.raises(ConfigError, match="contradicts train_micro_batch_size_per_gpu"):
        resolve_ds_config(ds(train_micro_batch_size_per_gpu=4), recipe, world=2)
    with pytest.raises(ConfigError, match="contradicts train_batch_size"):
        resolve_ds_config(ds(train_batch_size=128), recipe, world=2)
    bad_lr = ds()
    bad_lr["optimizer"]["params"]["lr"] = 0.1
    with pytest.raises(ConfigError, match="optimizer.params.lr"):
        resolve_ds_config(bad_lr, recipe, world=2)
    with pytest.raises(ConfigError, match="scheduler"):
        resolve_ds_config(ds(scheduler={"type": "WarmupLR"}), recipe, world=2)


def test_batch_triple_is_checked():
    recipe = load_recipe(None, ["train.batch_size=61", "train.micro_batch=8"])
    with pytest.raises(ConfigError, match="not a multiple of the world size"):
        plan_batch(ds(), recipe.train, world=2)
    recipe = load_recipe(None, ["train.batch_size=64"])
    with pytest.raises(ConfigError, match=r"64 != micro 8 x gradient_accumulation_steps 3 x world 2"):
        plan_batch(ds(train_micro_batch_size_per_gpu=8, gradient_accumulation_steps=3), recipe.train, world=2)
    with pytest.raises(ConfigError, match="set train.micro_batch"):
        plan_batch(ds(), load_recipe(None).train, world=1)


def test_ds_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_ds_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_ds_config(tmp_path / "bad.json")
    (tmp_path / "ok.json").write_text(json.dumps(ds()))
    assert load_ds_config(tmp_path / "ok.json")["train_batch_size"] == "auto"


def test_betas_come_from_the_recipe_where_the_json_says_auto():
    auto = ds()
    auto["optimizer"]["params"]["betas"] = "auto"
    bft = load_recipe(None, ["train.micro_batch=8", "train.betas=[0.9, 0.999]"])
    assert resolve_ds_config(auto, bft, world=1)["optimizer"]["params"]["betas"] == [0.9, 0.999]
    with pytest.raises(ConfigError, match="set train.betas"):
        resolve_ds_config(auto, load_recipe(None, ["train.micro_batch=8"]), world=1)
    explicit = ds()
    explicit["optimizer"]["params"]["betas"] = [0.9, 0.95]
    silent = load_recipe(None, ["train.micro_batch=8"])
    assert resolve_ds_config(explicit, silent, world=1)["optimizer"]["params"]["betas"] == [0.9, 0.95]
    with pytest.raises(ConfigError, match=r"betas=\[0.9, 0.95\] in the DeepSpeed config contradicts train.betas"):
        resolve_ds_config(explicit, bft, world=1)
    assert "betas" not in resolve_ds_config(ds(), silent, world=1)["optimizer"]["params"]  # the optimizer's default
    with pytest.raises(ConfigError, match="two numbers"):
        resolve_ds_config(auto, load_recipe(None, ["train.micro_batch=8", "train.betas=[0.9]"]), world=1)


def test_shipped_recipes_give_each_stage_its_betas_through_the_shipped_json():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        recipe = load_recipe(path)
        for ds_path in sorted((REPO / "ds_configs").glob("*.json")):
            out = resolve_ds_config(load_ds_config(ds_path), recipe, world=2)
            assert out["optimizer"]["params"]["betas"] == recipe.train.betas, (path.name, ds_path.name)


# the README's table of ds_configs/: stage, bf16, fp32 gradient accumulation, optimizer offload
SHIPPED_DS = {
    "cpu_fp32.json": {"stage": 2, "bf16": False, "grad_accum_dtype": None, "offload": None},
    "zero1_bf16.json": {"stage": 1, "bf16": True, "grad_accum_dtype": "fp32", "offload": None},
    "zero2_bf16.json": {"stage": 2, "bf16": True, "grad_accum_dtype": "fp32", "offload": None},
    "zero3_bf16.json": {"stage": 3, "bf16": True, "grad_accum_dtype": "fp32", "offload": None},
    "zero2_offload_bf16.json": {"stage": 2, "bf16": True, "grad_accum_dtype": "fp32", "offload": "cpu"},
}


@pytest.mark.parametrize("name", sorted(SHIPPED_DS))
def test_shipped_ds_configs_are_what_the_readme_says(name):
    ds = load_ds_config(REPO / "ds_configs" / name)
    want = SHIPPED_DS[name]
    zero = ds["zero_optimization"]
    assert zero["stage"] == want["stage"]
    assert bool(ds.get("bf16", {}).get("enabled", False)) is want["bf16"]
    assert not ds.get("fp16", {}).get("enabled", False)
    assert ds.get("data_types", {}).get("grad_accum_dtype") == want["grad_accum_dtype"]
    assert (zero.get("offload_optimizer") or {}).get("device") == want["offload"]
    assert "offload_param" not in zero
    opt = ds["optimizer"]
    assert opt["type"] == "AdamW" and opt["params"]["lr"] == "auto" and opt["params"]["weight_decay"] == 0.05
    assert opt["params"]["betas"] == "auto"  # from the recipe's train.betas
    assert "scheduler" not in ds


def test_shipped_ds_configs_are_all_listed():
    assert sorted(p.name for p in (REPO / "ds_configs").glob("*.json")) == sorted(SHIPPED_DS)


# (model, img_size, patch, effective batch, blr) of the large-scale recipes: iNat18 MGP at 128 px, BFT at 224
SHIPPED_RECIPES = {
    "mgp_vit_base_imagenet_lt": ("vit_base", 224, 16, 4096, 1.5e-4),
    "mgp_vit_base_inat18": ("vit_base", 128, 16, 4096, 1.5e-4),
    "mgp_vit_base_imagenet1k": ("vit_base", 224, 16, 4096, 1.5e-4),
    "mgp_vit_large_imagenet_lt": ("vit_large", 224, 16, 4096, 1.5e-4),
    "mgp_vit_large_inat18": ("vit_large", 128, 16, 4096, 1.5e-4),
    "bft_vit_base_imagenet_lt": ("vit_base", 224, 16, 1024, 1e-3),
    "bft_vit_base_inat18": ("vit_base", 224, 16, 1024, 1e-3),
    "bft_vit_base_places_lt": ("vit_base", 224, 16, 1024, 1e-3),
    "bft_vit_base_cifar100_lt": ("vit_base", 224, 16, 1024, 1e-3),
    "bft_vit_large_imagenet_lt": ("vit_large", 224, 16, 1024, 1e-3),
    "bft_vit_large_inat18": ("vit_large", 224, 16, 1024, 1e-3),
}


@pytest.mark.parametrize("name", sorted(SHIPPED_RECIPES))
def test_shipped_recipes_have_their_sizes_and_resolve_for_8_gpus(name):
    recipe = load_recipe(REPO / "configs" / f"{name}.yaml")
    model, img, patch, batch, blr = SHIPPED_RECIPES[name]
    assert (recipe.model.name, recipe.model.img_size, recipe.model.patch_size) == (model, img, patch)
    assert (recipe.train.batch_size, recipe.train.blr) == (batch, blr)
    if name.startswith("bft"):
        # Places-LT and CIFAR-100-LT fine-tune from MGP on ImageNet-1K, as in the paper
        imagenet1k = name.endswith(("places_lt", "cifar100_lt"))
        mgp = "mgp_vit_base_imagenet1k" if imagenet1k else name.replace("bft", "mgp", 1)
        assert recipe.loss.name == "bal_bce" and recipe.model.init == f"runs/{mgp}"
        assert recipe.train.layer_decay == 0.75
    for ds_name in ("zero2_bf16.json", "zero3_bf16.json", "zero2_offload_bf16.json"):
        out = resolve_ds_config(load_ds_config(REPO / "ds_configs" / ds_name), recipe, world=8)
        micro, accum = out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"]
        assert out["train_batch_size"] == batch == micro * accum * 8 and micro == recipe.train.micro_batch
        assert out["optimizer"]["params"]["lr"] == pytest.approx(blr * batch / 256)


# ---------------------------------------------------------------------------------------------- base recipes


def test_base_chain_merges_maps_deeply_and_replaces_lists_and_scalars(tmp_path):
    (tmp_path / "root.yaml").write_text(
        "model:\n  name: vit_test\n  img_size: 32\n  decoder_dim: 64\n"
        "train:\n  epochs: 10\n  betas: [0.9, 0.95]\n  micro_batch: 8\n"
        "augment:\n  crop_scale: [0.2, 1.0]\n  mixup: 0.5\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mid.yaml").write_text(  # base: is relative to this file's folder
        "base: ../root.yaml\nmodel:\n  img_size: 64\ntrain:\n  betas: [0.9]\n  micro_batch: null\n")
    (tmp_path / "sub" / "leaf.yaml").write_text(
        "base: mid.yaml\ntrain:\n  betas: [0.5, 0.6]\naugment:\n  crop_scale: [0.35, 1.0]\nloss:\n")
    recipe = load_recipe(tmp_path / "sub" / "leaf.yaml")
    assert (recipe.model.name, recipe.model.img_size, recipe.model.decoder_dim) == ("vit_test", 64, 64)
    assert recipe.train.epochs == 10 and recipe.train.micro_batch is None  # null replaces a scalar
    assert recipe.train.betas == [0.5, 0.6]  # lists replace, never concatenate or merge by index
    assert recipe.augment.crop_scale == [0.35, 1.0] and recipe.augment.mixup == 0.5
    assert recipe.loss == Recipe().loss  # an empty section changes nothing
    assert load_recipe(tmp_path / "sub" / "mid.yaml").train.betas == [0.9]


def test_overrides_apply_after_the_merge(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  epochs: 10\n  warmup_epochs: 2\n  betas: [0.9, 0.95]\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  epochs: 20\n")
    recipe = load_recipe(tmp_path / "child.yaml", ["train.epochs=3", "train.warmup_epochs=1", "train.betas=[0.8, 0.9]"])
    assert (recipe.train.epochs, recipe.train.warmup_epochs, recipe.train.betas) == (3, 1.0, [0.8, 0.9])
    assert load_recipe(tmp_path / "child.yaml").train.epochs == 20


def test_missing_base_and_cycles_are_errors_that_name_the_files(tmp_path):
    (tmp_path / "child.yaml").write_text("base: nowhere.yaml\ntrain:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"child\.yaml: base recipe .*nowhere\.yaml not found"):
        load_recipe(tmp_path / "child.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: c.yaml\n")
    (tmp_path / "c.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*c\.yaml -> .*a\.yaml"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "self.yaml").write_text("base: ./self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(tmp_path / "self.yaml")
    (tmp_path / "list.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: base: expected the file name of a recipe"):
        load_recipe(tmp_path / "list.yaml")


def test_unknown_key_in_a_base_names_the_base_file(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  epoch: 3\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"base\.yaml: unknown key 'train.epoch'"):
        load_recipe(tmp_path / "child.yaml")
    (tmp_path / "ok.yaml").write_text("train:\n  epochs: 3\n")
    (tmp_path / "bad_child.yaml").write_text("base: ok.yaml\nmodle:\n  name: vit_base\n")
    with pytest.raises(ConfigError, match=r"bad_child\.yaml: unknown key 'modle'"):
        load_recipe(tmp_path / "bad_child.yaml")


def test_saved_recipe_has_no_base_and_round_trips(tmp_path):
    child = REPO / "configs" / "bft_vit_large_inat18.yaml"
    assert yaml.safe_load(child.read_text())["base"] == "bft_vit_large_imagenet_lt.yaml"  # a chain of two bases
    recipe = load_recipe(child, ["train.epochs=3"])
    save_recipe(recipe, tmp_path / "config.yaml")  # what the trainer writes into the run folder
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "base" not in saved and set(saved) == {f.name for f in dataclasses.fields(Recipe)}
    assert load_recipe(tmp_path / "config.yaml") == recipe == recipe_from_dict(saved)


# values each shipped recipe gets through its base chain: (epochs, warmup, drop_path) of BFT, per the paper
BFT_SCHEDULES = {
    "bft_vit_base_imagenet_lt": (100, 10.0, 0.1),
    "bft_vit_base_inat18": (100, 10.0, 0.2),
    "bft_vit_base_places_lt": (30, 5.0, 0.1),
    "bft_vit_base_cifar100_lt": (100, 10.0, 0.1),
    "bft_vit_large_imagenet_lt": (50, 5.0, 0.2),
    "bft_vit_large_inat18": (50, 5.0, 0.2),
}


@pytest.mark.parametrize("name", sorted(SHIPPED_RECIPES))
def test_shipped_recipes_resolve_to_the_paper_values_through_their_bases(name):
    recipe = load_recipe(REPO / "configs" / f"{name}.yaml")
    assert recipe.train.betas == [0.9, 0.95] and recipe.train.micro_batch is not None
    assert recipe.data.path.startswith(f"shards/{name.split('_', 3)[3]}") and recipe.data.num_workers == 10
    assert (recipe.eval.every, recipe.checkpoint.every_steps, recipe.log.every_steps) == (
        50 if name.startswith("mgp") else 5, 1000, 50)
    m = recipe.model
    if name.startswith("mgp"):
        assert (m.mask_ratio, m.norm_pix, m.decoder_dim, m.decoder_depth, m.decoder_heads) == (0.75, True, 512, 8, 16)
        assert (recipe.train.epochs, recipe.train.warmup_epochs, recipe.train.min_lr) == (800, 40.0, 0.0)
        return
    assert (recipe.train.epochs, recipe.train.warmup_epochs, m.drop_path) == BFT_SCHEDULES[name]
    assert (m.global_pool, recipe.train.min_lr, recipe.loss.tau) == ("avg", 1e-6, 1.0)
    a = recipe.augment
    assert (a.rand_augment, a.re_prob, a.mixup, a.cutmix, a.label_smoothing) == ("rand-m9-mstd0.5-inc1", 0.25, 0.8,
                                                                                  1.0, 0.1)


def test_demo_and_tiny_recipes_keep_their_changes_over_the_paper_base():
    demo = load_recipe(REPO / "configs" / "demo_bft.yaml")
    assert (demo.augment.rand_augment, demo.augment.mixup, demo.augment.crop_scale) == (None, 0.0, [0.35, 1.0])
    assert (demo.train.epochs, demo.train.batch_size, demo.train.layer_decay, demo.loss.name) == (100, 64, 0.75,
                                                                                                  "bal_bce")
    demo_mgp = load_recipe(REPO / "configs" / "demo_mgp.yaml")
    assert (demo_mgp.model.decoder_dim, demo_mgp.model.mask_ratio, demo_mgp.train.epochs) == (64, 0.75, 150)
    for name in ("tiny_mgp", "tiny_bft"):
        tiny = load_recipe(REPO / "configs" / f"{name}.yaml")
        assert (tiny.model.name, tiny.train.batch_size, tiny.train.micro_batch, tiny.train.epochs) == ("vit_test", None,
                                                                                                       8, 2)
