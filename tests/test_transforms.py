"""MGP / BFT / eval transforms and Mixup: shapes, normalisation, the recipe's settings, soft targets."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from torchvision import transforms as T

from livt_ds.config import AugmentConfig
from livt_ds.data.transforms import (
    build_mixup,
    default_crop_pct,
    eval_transform,
    finetune_transform,
    pretrain_transform,
)

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
PAPER = AugmentConfig()  # the one home of the paper's BFT augmentation defaults


def bft(img_size: int, **changes):
    """The BFT transform with the recipe defaults (AugmentConfig) except ``changes``."""
    settings = dict(rand_augment=PAPER.rand_augment, re_prob=PAPER.re_prob, crop_scale=PAPER.crop_scale)
    return finetune_transform(img_size, MEAN, STD, **{**settings, **changes})
TINY_BFT = Path(__file__).resolve().parents[1] / "configs" / "tiny_bft.yaml"


def flat_image(color=(102, 128, 153), size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, color)


def ops(transform) -> list:
    return list(transform.transforms)


def test_mgp_is_crop_flip_normalise_only():
    tf = pretrain_transform(24, MEAN, STD)
    names = [type(t).__name__ for t in ops(tf)]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    crop = ops(tf)[0]
    assert crop.scale == (0.2, 1.0) and crop.interpolation == T.InterpolationMode.BICUBIC
    x = tf(flat_image())
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    expected = (torch.tensor([102, 128, 153]) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(x.mean((1, 2)), expected, atol=1e-5)  # a flat image stays flat: mean/std applied


def test_bft_uses_rand_augment_and_pixel_erasing():
    tf = bft(32)
    found = {type(t).__name__: t for t in ops(tf)}
    assert isinstance(found["RandAugment"], RandAugment) and "ColorJitter" not in found
    erasing = found["RandomErasing"]
    assert isinstance(erasing, RandomErasing) and erasing.probability == 0.25 and erasing.mode == "pixel"
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8))
    assert tf(img).shape == (3, 32, 32)
    plain = bft(32, rand_augment=None, re_prob=0.0)
    assert "RandAugment" not in {type(t).__name__ for t in ops(plain)}
    assert "RandomErasing" not in {type(t).__name__ for t in ops(plain)}


INCREASING_OPS = ["AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                  "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                  "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"]


def rand_augment_of(transform) -> RandAugment:
    (ra,) = [t for t in ops(transform) if isinstance(t, RandAugment)]
    return ra


def test_bft_rand_augment_is_m9_mstd05_two_layers_increasing_ops():
    """rand-m9-mstd0.5-inc1: 2 ops per image from the 15 'increasing' ops, magnitude 9 with std 0.5, p 0.5 each."""
    ra = rand_augment_of(bft(32))
    assert ra.num_layers == 2 and ra.choice_weights is None
    assert [op.name for op in ra.ops] == INCREASING_OPS
    assert {(op.magnitude, op.magnitude_std, op.prob) for op in ra.ops} == {(9, 0.5, 0.5)}
    erasing = next(t for t in ops(bft(32)) if isinstance(t, RandomErasing))
    assert (erasing.min_count, erasing.max_count) == (1, 1)
    # the recipe's string is what is built: another setting gives other ops, magnitude and layers
    other = rand_augment_of(bft(32, rand_augment="rand-m5-n3"))
    assert other.num_layers == 3 and {(op.magnitude, op.magnitude_std) for op in other.ops} == {(5, 0)}
    assert "PosterizeIncreasing" not in [op.name for op in other.ops]


def test_bft_task_builds_the_recipes_augmentation():
    from livt_ds.config import load_recipe
    from livt_ds.tasks import FinetuneTask

    meta = {"class_counts": [5, 3], "num_classes": 2, "mean": list(MEAN), "std": list(STD)}
    task = FinetuneTask(load_recipe(TINY_BFT, ["augment.rand_augment=rand-m7-n1-mstd0.25",
                                                                "augment.re_prob=0.4"]), meta)
    tf = task.train_transform()
    ra = rand_augment_of(tf)
    assert ra.num_layers == 1 and {(op.magnitude, op.magnitude_std) for op in ra.ops} == {(7, 0.25)}
    assert next(t for t in ops(tf) if isinstance(t, RandomErasing)).probability == 0.4
    assert rand_augment_of(FinetuneTask(load_recipe(TINY_BFT), meta).train_transform()).num_layers == 2


def test_bft_posterize_at_full_magnitude_works():
    """timm's inc1 posterize asks for 0 bits at magnitude 10; Pillow 13 raises there, we give the old black image."""
    (ra,) = [t for t in ops(bft(16)) if isinstance(t, RandAugment)]
    (op,) = [op for op in ra.ops if op.name == "PosterizeIncreasing"]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    out = op(Image.new("RGB", (16, 16), (200, 100, 50)))
    assert out.size == (16, 16) and out.getextrema() == ((0, 0), (0, 0), (0, 0))


@pytest.mark.parametrize(("size", "crop_pct", "resize"), [(224, None, 256), (384, None, 384), (32, 0.5, 64)])
def test_eval_resizes_then_center_crops(size, crop_pct, resize):
    tf = eval_transform(size, MEAN, STD, crop_pct=crop_pct)
    first = ops(tf)[0]
    assert isinstance(first, T.Resize) and first.size in (resize, [resize], (resize, resize))
    assert first.interpolation == T.InterpolationMode.BICUBIC
    assert tf(flat_image(size=(300, 200))).shape == (3, size, size)
    assert default_crop_pct(224) == 0.875 and default_crop_pct(225) == 1.0


def test_eval_center_crop_keeps_the_middle():
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, :4] = 255  # a bright border stripe: cut off by a center crop of half the resized image
    img[30:34, 30:34] = 255  # a bright centre: kept
    x = eval_transform(64, (0, 0, 0), (1, 1, 1), crop_pct=0.5)(Image.fromarray(img))
    assert x[:, :, :8].abs().max() < 0.01 and x[:, 28:36, 28:36].mean() > 0.9


def test_build_mixup_variants():
    assert build_mixup(10, 0.0, 0.0, 0.0) is None
    x = torch.randn(4, 3, 8, 8)
    y = torch.tensor([0, 1, 2, 3])
    smooth = build_mixup(10, 0.0, 0.0, 0.1)
    xs, ys = smooth(x.clone(), y)
    assert torch.equal(xs, x)  # nothing mixed
    assert torch.allclose(ys[0, 0], torch.tensor(0.9 + 0.01)) and torch.allclose(ys[0, 1], torch.tensor(0.01))
    mix = build_mixup(10, 0.8, 1.0, 0.1)
    np.random.seed(0)
    xm, ym = mix(x.clone(), y)
    assert ym.shape == (4, 10) and torch.allclose(ym.sum(1), torch.ones(4))
    assert not torch.equal(xm, x) and (ym > 0.05).sum(1).min() >= 2  # two classes per mixed target
    with pytest.raises(ValueError):
        build_mixup(10, -1.0, 0.0, 0.0)


def test_bad_mean_std_are_rejected():
    with pytest.raises(ValueError, match="mean"):
        pretrain_transform(16, (0.5, 0.5), STD)


def _crop(transform):
    return next(t for t in ops(transform) if "RandomResizedCrop" in type(t).__name__)


def test_bft_crop_scale_reaches_random_resized_crop():
    default = bft(32, rand_augment=None, re_prob=0.0)
    assert tuple(_crop(default).scale) == (0.08, 1.0)  # timm's default
    larger = bft(32, rand_augment=None, re_prob=0.0, crop_scale=[0.35, 1.0])
    assert tuple(_crop(larger).scale) == (0.35, 1.0)
    # a centred disc: every crop of >= 35 % of the area (side >= 0.51) contains the centre, 8 % crops can miss it
    yy, xx = np.mgrid[:64, :64]
    img = np.zeros((64, 64, 3), np.uint8)
    img[(yy - 31.5) ** 2 + (xx - 31.5) ** 2 <= 12**2] = 255
    black = default(Image.fromarray(np.zeros_like(img))).mean().item()
    torch.manual_seed(0)
    random.seed(0)  # timm's RandomResizedCrop draws from Python's random module
    missed = {name: sum(tf(Image.fromarray(img)).mean().item() < black + 1e-3 for _ in range(300))
              for name, tf in (("default", default), ("larger", larger))}
    assert missed["larger"] == 0 and missed["default"] > 0, missed
    with pytest.raises(ValueError, match="crop_scale"):
        bft(32, crop_scale=(0.5, 0.2))


def test_recipe_crop_scale_is_checked():
    from livt_ds.config import load_recipe
    from livt_ds.errors import ConfigError

    assert load_recipe(None).augment.crop_scale == [0.08, 1.0]
    assert load_recipe(None, ["augment.crop_scale=[0.35, 1]"]).augment.crop_scale == [0.35, 1.0]
    with pytest.raises(ConfigError, match="augment.crop_scale"):
        load_recipe(None, ["augment.crop_scale=[0, 1]"])
    with pytest.raises(ConfigError, match="augment.crop_scale"):
        load_recipe(None, ["augment.crop_scale=[0.5]"])
