"""Image transforms of the two LiVT stages and evaluation, plus Mixup/CutMix, all from timm/torchvision.

The reference transforms map an RGB PIL image to a normalised ``[3, img_size, img_size]`` float32 tensor.
``mean`` and ``std`` (0-1 scale, per channel) come from the recipe or from the shard set's meta.json.

MGP training uses :class:`PretrainCrop` instead of :func:`pretrain_transform`: the same crop and flip, drawn with
the same random calls, but from the encoded bytes (a JPEG is decoded at 1/2, 1/4 or 1/8 of its size when the crop
stays at least ``img_size`` there) to a ``uint8`` tensor; :func:`to_model_input` converts and normalises the batch
on the device.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.data import auto_augment as timm_aa
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_image

from livt_ds.data.device_crop import Crop, CropBatch, collate_crops, stack_images

PRETRAIN_SCALE = (0.2, 1.0)  # RandomResizedCrop area range of masked generative pretraining (MAE recipe)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _check(img_size: int, mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if img_size < 1:
        raise ValueError(f"img_size {img_size}: must be positive")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean {list(mean)} / std {list(std)}: need 3 values each, std > 0")
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def pretrain_transform(img_size: int, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """MGP: RandomResizedCrop (scale 0.2-1, bicubic) + horizontal flip + normalise, nothing else."""
    mean, std = _check(img_size, mean, std)
    return T.Compose(
        [
            T.RandomResizedCrop(img_size, scale=PRETRAIN_SCALE, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


@dataclass
class CropDraw:
    """A sample's random draws (:meth:`PretrainCrop.draw`): its bytes, PIL's header (None where the JPEG frame
    header gave the size), its ``(height, width)``, the crop box in full-size pixels, the flip."""

    data: bytes
    header: Image.Image | None
    size: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool


class PretrainCrop:
    """MGP's RandomResizedCrop (scale 0.2-1, aspect 3/4-4/3, bicubic) + horizontal flip, encoded bytes -> uint8.

    The crop box and the flip are drawn exactly as ``pretrain_transform`` draws them (torchvision's
    ``RandomResizedCrop.get_params`` on the full image size, then one ``torch.rand``), so both give the same geometry
    from the same RNG state. The box is drawn from the image header, before decoding: a JPEG whose crop keeps at
    least ``2 * img_size`` pixels on its shorter side is decoded at 1/2, 1/4 or 1/8 of its size (DCT scaling, PIL's
    draft); otherwise torchvision's decoder reads it. The crop is resized on uint8 with torch's antialiased bicubic
    (PIL's filter, a = -0.5; within 2 levels of PIL's output). Three steps, so that the loader draws a sample's random
    numbers under its seed (:meth:`draw`), tells corrupt bytes (:meth:`draw` or :meth:`load` raise: a skipped sample)
    from bugs (:meth:`__call__` raises: an error), and decodes a batch's images back to back.

    ``resize_on_device``: :meth:`__call__` returns the crop's pixels and flip bit unresized (a
    :class:`~livt_ds.data.device_crop.Crop`), :meth:`collate` pads a batch of them into a
    :class:`~livt_ds.data.device_crop.CropBatch`, and :func:`to_model_input` resizes and flips it where the batch is
    (the same filter). A crop longer than ``2 * img_size`` on a side is still resized here, so that a batch from
    full-size images stays within ``2 * img_size`` pixels a side.
    """

    REDUCTIONS = (8, 4, 2)  # the DCT scalings a JPEG decoder offers

    def __init__(self, img_size: int, scale: Sequence[float] = PRETRAIN_SCALE,
                 ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0), *, resize_on_device: bool = False) -> None:
        if img_size < 1:
            raise ValueError(f"img_size {img_size}: must be positive")
        self.img_size, self.scale, self.ratio = img_size, list(scale), list(ratio)
        self.resize_on_device = resize_on_device
        self._log_ratio = [float(v) for v in torch.log(torch.tensor(self.ratio))]  # as get_params computes it
        self._draw = torch.empty(1)  # float32, as get_params's draws

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``RandomResizedCrop.get_params`` for an image of this size: the same random calls in the same order, on
        the same dtypes, so the same box from the same RNG state (a test holds them equal), at a third of its cost
        (it builds tensors from the ratio and logs an API use per call)."""
        area = height * width
        for _ in range(10):
            target_area = area * self._draw.uniform_(self.scale[0], self.scale[1]).item()
            aspect_ratio = torch.exp(self._draw.uniform_(self._log_ratio[0], self._log_ratio[1])).item()
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = torch.randint(0, height - h + 1, size=(1,)).item()
                left = torch.randint(0, width - w + 1, size=(1,)).item()
                return top, left, h, w
        in_ratio = width / height  # no box found: the centred crop of the nearest allowed aspect
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def draw(self, data: bytes) -> CropDraw:
        """Every random draw of a sample, from the image header alone: the crop box, then the flip (the reference's
        order). Raises on bytes that are not an image (a corrupt sample)."""
        size = jpeg_size(data)  # a JPEG's size from its frame header: ~1 us, PIL's header parse ~30 us
        header = Image.open(io.BytesIO(data)) if size is None else None
        width, height = size if header is None else header.size
        box = self.crop_box(height, width)
        return CropDraw(data, header, (height, width), box, bool(torch.rand(1) < 0.5))

    def load(self, drawn: CropDraw) -> tuple[torch.Tensor, tuple[int, int, int, int], bool]:
        """Decode: (uint8 ``[3, H, W]`` pixels, crop box ``(top, left, height, width)`` in those pixels, flip); raises
        on corrupt data. No random draws, so a loader can decode a batch's images back to back (faster than
        decoding each between the Python work of the others)."""
        data, img, (height, width), (top, left, h, w) = drawn.data, drawn.header, drawn.size, drawn.box
        factor = next((f for f in self.REDUCTIONS if min(w, h) >= 2 * f * self.img_size), 1)
        if factor > 1 and (img is None or img.format == "JPEG"):
            img = Image.open(io.BytesIO(data)) if img is None else img
            img.draft("RGB", (width // factor, height // factor))
            pixels = _pil_pixels(img)
        else:
            pixels = _decode_pixels(data, img)
        sy, sx = pixels.shape[1] / height, pixels.shape[2] / width
        box = (round(top * sy), round(left * sx), max(1, round(h * sy)), max(1, round(w * sx)))
        return pixels, box, drawn.flip

    def __call__(self, loaded: tuple[torch.Tensor, tuple[int, int, int, int], bool]) -> torch.Tensor | Crop:
        """The crop resized to uint8 ``[3, img_size, img_size]`` (channels-last strides), flipped as drawn; with
        ``resize_on_device`` the crop as it is and its flip bit."""
        pixels, (top, left, h, w), flip = loaded
        crop = pixels[:, top : top + h, left : left + w]
        if self.resize_on_device:
            if max(h, w) > 2 * self.img_size:
                crop = self._resize(crop, flip=False)
            return Crop(crop.permute(1, 2, 0), flip)
        return self._resize(crop, flip)

    def collate(self, crops: list) -> torch.Tensor | CropBatch:
        """A batch of :meth:`__call__`'s outputs: a :class:`CropBatch` with ``resize_on_device``, else ``[B, 3, S, S]``
        uint8 (channels-last)."""
        return collate_crops(crops, self.img_size) if self.resize_on_device else stack_images(crops)

    def _resize(self, crop: torch.Tensor, flip: bool) -> torch.Tensor:
        """``[3, h, w]`` uint8 -> ``[3, img_size, img_size]``. The crop is copied into a contiguous channels-last block
        first (torch's vectorised uint8 resampler takes only that layout; on a strided view it falls back to a path
        about twice as slow), mirrored in the same copy when flipped: the filter is symmetric, so this is the flip of
        the resized crop, pixel for pixel, and cheaper than flipping the larger output."""
        crop = crop[None].flip(-1) if flip else crop[None].contiguous(memory_format=torch.channels_last)
        return torch.nn.functional.interpolate(crop, size=(self.img_size, self.img_size), mode="bicubic",
                                               antialias=True, align_corners=False)[0]


_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (0xC4/C8/CC: DHT, JPG, DAC)
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # markers without a length field (RSTn, TEM)


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` from a JPEG's frame header (the segments before it skipped by their lengths); None for
    other formats or a header this walk does not understand (then PIL reads it)."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, end = 2, len(data) - 9
    while pos <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in _STANDALONE:
            pos += 2
        elif marker in _SOF:
            height, width = struct.unpack_from(">HH", data, pos + 5)
            return (width, height) if width and height else None
        else:
            pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
    return None


def _pil_pixels(img: Image.Image) -> torch.Tensor:
    """A PIL image (decoded here) as uint8 ``[3, H, W]`` with channels-last strides (torch's fast resize layout)."""
    img.load()
    img = img if img.mode == "RGB" else img.convert("RGB")
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def _decode_pixels(data: bytes, header: Image.Image | None) -> torch.Tensor:
    """Full-size decode: torchvision's for JPEG and PNG (faster than PIL's), PIL for the rest and for what
    torchvision declines (e.g. CMYK JPEGs); raises on corrupt data. ``header``: PIL's, None for a JPEG whose size
    :func:`jpeg_size` read."""
    if header is None or header.format in ("JPEG", "PNG"):
        try:
            chw = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            return chw.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # channels-last
        except RuntimeError:
            pass
    return _pil_pixels(Image.open(io.BytesIO(data)) if header is None else header)


def to_model_input(images: torch.Tensor | CropBatch, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A batch as the model takes it: uint8 ``[B, 3, H, W]`` (from :class:`PretrainCrop`) to float32, scaled to 0-1 and
    normalised, wherever the batch is (the device); a :class:`CropBatch` is resized and flipped there first; float
    batches (already normalised) pass unchanged. The same arithmetic as ``ToTensor`` + ``Normalize``, so the values
    are identical."""
    if isinstance(images, CropBatch):
        x = images.resized().div_(255)
    elif images.dtype != torch.uint8:
        return images
    else:
        x = images.to(torch.float32, memory_format=torch.contiguous_format).div_(255)  # channels-first, as ToTensor
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(mean_t).div_(std_t)


def finetune_transform(
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    rand_augment: str | None,
    re_prob: float,
    crop_scale: Sequence[float],
) -> Callable:
    """BFT: timm's training transform (RandomResizedCrop, flip, RandAugment, random erasing in pixel mode).

    The three settings come from the recipe's ``augment`` section (their defaults live in AugmentConfig).
    No colour jitter (as in the MAE/LiVT fine-tuning recipe); ``rand_augment=None`` turns RandAugment off.
    ``crop_scale`` is RandomResizedCrop's (min, max) area fraction: timm's 0.08-1 can cut a small image's
    object out, so small-image recipes may raise the lower bound (``augment.crop_scale``).
    """
    mean, std = _check(img_size, mean, std)
    if len(crop_scale) != 2 or not 0 < crop_scale[0] <= crop_scale[1] <= 1:
        raise ValueError(f"crop_scale {list(crop_scale)}: need (min, max) area fractions, 0 < min <= max <= 1")
    transform = create_transform(
        input_size=img_size,
        is_training=True,
        color_jitter=None,
        auto_augment=rand_augment,
        scale=(float(crop_scale[0]), float(crop_scale[1])),
        interpolation="bicubic",
        re_prob=re_prob,
        re_mode="pixel",
        re_count=1,
        mean=mean,
        std=std,
    )
    _patch_posterize(transform)
    return transform


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize with the Pillow < 13 meaning of 0 bits (a black image) instead of Pillow 13's ValueError.

    ``inc1`` RandAugment maps magnitude 10 (reached by ``m9-mstd0.5`` about 2 % of the time) to 0 bits.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(transform: Callable) -> None:
    for t in getattr(transform, "transforms", []):
        if isinstance(t, timm_aa.RandAugment):
            for op in t.ops:
                if op.aug_fn is timm_aa.posterize:
                    op.aug_fn = _posterize


def default_crop_pct(img_size: int) -> float:
    """0.875 up to 224 px (resize to img_size/0.875 then center-crop), 1.0 above (LiVT/MAE evaluation)."""
    return 0.875 if img_size <= 224 else 1.0


def eval_transform(
    img_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float | None = None
) -> Callable:
    """Evaluation: resize the shorter side to ``img_size / crop_pct`` (bicubic), center crop, normalise."""
    mean, std = _check(img_size, mean, std)
    crop_pct = default_crop_pct(img_size) if crop_pct is None else crop_pct
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct {crop_pct}: must be in (0, 1]")
    return create_transform(
        input_size=img_size, is_training=False, interpolation="bicubic", crop_pct=crop_pct, mean=mean, std=std
    )


def build_mixup(num_classes: int, mixup_alpha: float, cutmix_alpha: float, label_smoothing: float) -> Mixup | None:
    """timm Mixup/CutMix producing soft targets ``[B, num_classes]``; None when all three are 0.

    With label smoothing only, the returned object mixes nothing and just smooths the one-hot targets.
    The batch size must be even (timm's requirement).
    """
    if mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= label_smoothing < 1:
        raise ValueError(f"mixup {mixup_alpha}, cutmix {cutmix_alpha}: >= 0; label_smoothing {label_smoothing}: [0, 1)")
    if mixup_alpha == 0 and cutmix_alpha == 0 and label_smoothing == 0:
        return None
    mixup = Mixup(
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )
    if mixup_alpha == 0 and cutmix_alpha == 0:
        mixup.mixup_enabled = False  # timm asserts one alpha > 0 when mixing; lam stays 1, targets smoothed
    return mixup


def normalisation(recipe, meta: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The recipe's mean/std, else the ones make_shards measured into meta.json, else ImageNet's."""
    mean = recipe.data.mean or meta.get("mean") or IMAGENET_MEAN
    std = recipe.data.std or meta.get("std") or IMAGENET_STD
    return tuple(mean), tuple(std)
