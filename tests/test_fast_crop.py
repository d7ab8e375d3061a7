"""PretrainCrop (the MGP training path: decode at reduced size, crop and flip on uint8, normalise on the device) against
the reference transform (torchvision RandomResizedCrop + flip + ToTensor + Normalize)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from livt_ds.data import transforms
from livt_ds.data.pipeline import seeded_rngs
from livt_ds.data.transforms import PretrainCrop, pretrain_transform, to_model_input

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def coordinate_image(width: int, height: int, fmt: str) -> bytes:
    """Red = x, green = y (0-255 across the image), blue = a fixed texture: a crop's pixels say where it came from."""
    xs = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    ys = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    blue = np.random.default_rng(0).integers(0, 256, (height, width))
    buf = io.BytesIO()
    Image.fromarray(np.stack([xs, ys, blue], -1).astype(np.uint8)).save(buf, format=fmt, quality=95)
    return buf.getvalue()


def reference(data: bytes, size: int, seed: int) -> torch.Tensor:
    with seeded_rngs(seed):
        return pretrain_transform(size, MEAN, STD)(Image.open(io.BytesIO(data)).convert("RGB"))


def fast(data: bytes, size: int, seed: int) -> torch.Tensor:
    crop = PretrainCrop(size)
    with seeded_rngs(seed):
        out = crop(crop.load(crop.draw(data)))
    assert out.dtype == torch.uint8 and out.shape == (3, size, size)
    return to_model_input(out[None], MEAN, STD)[0]


def geometry(x: torch.Tensor) -> tuple[float, float, bool]:
    """(area fraction, aspect w/h, flipped) of a crop of a coordinate image, read from its normalised pixels."""
    rgb = x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    red, green = rgb[0], rgb[1]
    left, right = red[:, 0].mean().item(), red[:, -1].mean().item()
    top, bottom = green[0].mean().item(), green[-1].mean().item()
    w, h = abs(right - left), bottom - top
    return w * h, w / h, right < left


def test_same_seed_same_crop_and_flip_as_the_reference_and_nearly_the_same_pixels():
    """Without a reduced decode (a PNG) the crop box and the flip come from the same random calls as the reference's:
    for every seed the pixels match up to the resampler's rounding (torch's antialiased bicubic vs PIL's)."""
    data = coordinate_image(300, 200, "PNG")
    for seed in range(25):
        ref, new = reference(data, 32, seed), fast(data, 32, seed)
        scale = torch.tensor(STD).view(3, 1, 1) * 255  # back to 0-255 levels
        diff = ((ref - new) * scale).abs()
        assert diff.max() <= 3.01 and diff.mean() < 0.3, seed


@pytest.mark.parametrize(("width", "height", "size"), [(300, 200, 32), (800, 600, 32)])
def test_crop_area_aspect_and_flip_statistics_match_the_reference(width, height, size):
    """Crop area, aspect ratio and flips, read back from the output pixels of both transforms over 200 seeds: the same
    distributions (the same draws, seed by seed). The 800 x 600 JPEG at 32 px is decoded at 1/2 to 1/8 of its size
    for most crops; the 300 x 200 one never."""
    data = coordinate_image(width, height, "JPEG")
    seeds = range(200)
    ref = np.array([geometry(reference(data, size, seed)) for seed in seeds])
    new = np.array([geometry(fast(data, size, seed)) for seed in seeds])
    for column, tol in ((0, 0.02), (1, 0.03)):  # area fraction (0.2-1), aspect (3/4-4/3)
        assert abs(ref[:, column].mean() - new[:, column].mean()) < tol
        for q in (0.1, 0.5, 0.9):
            assert abs(np.quantile(ref[:, column], q) - np.quantile(new[:, column], q)) < 2 * tol
    assert np.array_equal(ref[:, 2], new[:, 2]) and 0.4 < new[:, 2].mean() < 0.6  # the same flips, at rate 1/2
    assert 0.2 - 0.03 < new[:, 0].min() and new[:, 0].max() < 1.03


def test_large_crops_of_a_jpeg_are_decoded_at_reduced_size(monkeypatch):
    sizes = []
    real = transforms._pil_pixels

    def spy(img):
        sizes.append(img.size)
        return real(img)

    monkeypatch.setattr(transforms, "_pil_pixels", spy)
    data = coordinate_image(1600, 1200, "JPEG")
    crop = PretrainCrop(64)
    for seed in range(20):
        with seeded_rngs(seed):
            pixels, (top, left, h, w), _ = crop.load(crop.draw(data))
        assert top >= 0 and left >= 0 and top + h <= pixels.shape[1] and left + w <= pixels.shape[2]
        assert min(h, w) >= 64
    assert sizes and all(w <= 800 for w, _ in sizes)  # every crop of this size allows at least 1/2


def test_corrupt_bytes_raise_in_decode_and_float_batches_pass_unchanged():
    crop = PretrainCrop(16)
    data = coordinate_image(64, 48, "JPEG")
    for broken in (data[:200], data[: len(data) // 2], b"not an image"):  # the loader counts these as corrupt
        with pytest.raises(OSError):
            crop.load(crop.draw(broken))
    floats = torch.randn(2, 3, 4, 4)
    assert to_model_input(floats, MEAN, STD) is floats
