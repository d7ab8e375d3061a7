"""MGP crops resized on the device: the loader worker decodes and cuts each crop, the trainer resizes the batch.

Resizing a crop to ``img_size`` costs a loader core about half of what decoding a pre-resized JPEG does (torch's
uint8 bicubic), for work a GPU does in microseconds. So a worker sends each crop's pixels as they are, padded into one
uint8 canvas per batch (:class:`CropBatch`), with their sizes and flip bits; :meth:`CropBatch.resized` then resizes
and flips the whole batch in two batched matrix products, wherever the batch is.

The resampling is the one of PIL and torch's antialiased bicubic (a = -0.5, the filter widened by the scale when
shrinking, the window cut at the crop's borders, weights normalised per output pixel), written as
separable weight matrices: ``out = Wy @ (crop @ Wx^T)``. As in PIL's and torch's uint8 resamplers, the horizontal
pass comes first and its result is rounded and clipped to 0-255 before the vertical one (bicubic overshoots at sharp
edges; the clipping in between shows there), and so is the output. A flip reverses the rows of ``Wx``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

CUBIC_A = -0.5  # PIL's bicubic (torch's antialiased bicubic uses the same)


@dataclass
class Crop:
    """One sample as a worker sends it: the crop's pixels (a uint8 ``[h, w, 3]`` view) and whether to flip it."""

    pixels: Tensor
    flip: bool


@dataclass
class CropBatch:
    """A batch of crops to resize to ``out_size`` on the device: crop ``b`` is ``canvas[b, :, :h_b, :w_b]`` with
    ``(h_b, w_b) = sizes[b]``, mirrored when ``flips[b]``. Moves like a tensor (``to``, ``pin_memory``), so the
    trainer's ``batch.to(device)`` then ``task.prepare_batch`` take it as they take an image tensor."""

    canvas: Tensor  # uint8 [B, 3, H, W], channels-last strides; zero outside each crop
    sizes: Tensor  # int64 [B, 2]: (h, w)
    flips: Tensor  # bool [B]
    out_size: int

    def __len__(self) -> int:
        return self.canvas.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CropBatch:
        return CropBatch(self.canvas.to(device, non_blocking=non_blocking),
                         self.sizes.to(device, non_blocking=non_blocking),
                         self.flips.to(device, non_blocking=non_blocking), self.out_size)  # fmt: skip

    def pin_memory(self) -> CropBatch:
        return CropBatch(self.canvas.pin_memory(), self.sizes.pin_memory(), self.flips.pin_memory(), self.out_size)

    def resized(self) -> Tensor:
        """float32 ``[B, 3, out_size, out_size]`` in 0-255 (whole levels), on the batch's device."""
        size = self.out_size
        rows = resample_weights(self.sizes[:, 0], self.canvas.shape[2], size)  # [B, size, H]
        cols = resample_weights(self.sizes[:, 1], self.canvas.shape[3], size)  # [B, size, W]
        cols = torch.where(self.flips.view(-1, 1, 1), cols.flip(1), cols)
        pixels = self.canvas.to(torch.float32, memory_format=torch.contiguous_format)
        across = (pixels @ cols.transpose(1, 2).unsqueeze(1)).round_().clamp_(0, 255)  # [B, 3, H, size]
        return (rows.unsqueeze(1) @ across).round_().clamp_(0, 255)


def collate_crops(crops: list[Crop], out_size: int) -> CropBatch:
    """Pad the crops into one canvas as large as the largest (the pixels a worker sends; nothing is resized)."""
    height = max(c.pixels.shape[0] for c in crops)
    width = max(c.pixels.shape[1] for c in crops)
    canvas = torch.zeros(len(crops), height, width, 3, dtype=torch.uint8)  # zero padding: equal batches, equal bytes
    for b, crop in enumerate(crops):
        h, w, _ = crop.pixels.shape
        canvas[b, :h, :w] = crop.pixels
    sizes = torch.tensor([c.pixels.shape[:2] for c in crops], dtype=torch.int64)
    flips = torch.tensor([c.flip for c in crops], dtype=torch.bool)
    return CropBatch(canvas.permute(0, 3, 1, 2), sizes, flips, out_size)


def stack_images(images: list[Tensor]) -> Tensor:
    """``[B, 3, H, W]`` from ``[3, H, W]`` images, in their memory layout: channels-last images (``PretrainCrop``'s)
    are copied as whole ``H*W*3`` blocks into a channels-last batch, several times faster than gathering them into a
    channels-first one, which ``to_model_input`` makes on the device."""
    if images[0].dim() == 3 and images[0].stride(0) == 1:
        return torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
    return torch.stack(images)


def _cubic(x: Tensor) -> Tensor:
    x = x.abs()
    a = CUBIC_A
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resample_weights(lengths: Tensor, padded: int, out: int) -> Tensor:
    """``[B, out, padded]`` weights resampling ``lengths[b]`` input pixels (the rest padding, weight 0) to ``out``.

    Output pixel ``i`` centres on input coordinate ``(i + 0.5) * scale`` (``scale = length / out``); input pixel
    ``j`` weighs ``cubic((j + 0.5 - centre) / max(scale, 1))``, normalised so that each row sums to 1.
    """
    n = lengths.to(torch.float32).view(-1, 1, 1)
    scale = n / out
    stretch = scale.clamp(min=1.0)
    centre = (torch.arange(out, device=lengths.device, dtype=torch.float32).view(1, -1, 1) + 0.5) * scale
    j = torch.arange(padded, device=lengths.device, dtype=torch.float32).view(1, 1, -1)
    weights = _cubic((j + 0.5 - centre) / stretch) * (j < n)
    return weights / weights.sum(-1, keepdim=True)
