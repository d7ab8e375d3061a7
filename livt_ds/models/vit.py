"""Classifier helpers: load an MGP (or BFT) trunk into a timm ViT classifier, resizing the pos-embed grid, and
run its head in fp32.

MGP may run at a lower resolution than BFT (iNat18: 128 -> 224; 224 -> 384), so `pos_embed` is resampled
bicubically when the grids differ. Everything else must match in shape; a mismatch means the checkpoint was made
for another model size or patch size, and we stop with a message naming the key and both shapes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

__all__ = ["load_encoder_weights", "interpolate_pos_embed", "unwrap_state_dict", "Fp32LayerNorm", "Fp32Linear",
           "fp32_head"]

_WRAPPER_KEYS = ("model", "module", "state_dict")
_HEAD_PREFIXES = ("head.",)
NEW_HEAD_PREFIXES = ("head.", "fc_norm.")  # what a fresh BFT classifier may lack in an MGP checkpoint
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def interpolate_pos_embed(pos_embed: Tensor, new_grid: tuple[int, int]) -> Tensor:
    """Bicubic resample of a [1, 1+L, D] pos-embed (square source grid, one cls position) to [1, 1+gh*gw, D]."""
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"interpolate_pos_embed: expected [1, 1+L, D], got {list(pos_embed.shape)}")
    num_patches = pos_embed.shape[1] - 1
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(
            f"interpolate_pos_embed: {num_patches} patch positions (after 1 cls position) are not a square grid"
        )
    return resample_abs_pos_embed(
        pos_embed, new_size=[int(new_grid[0]), int(new_grid[1])], old_size=[side, side], num_prefix_tokens=1
    )


def unwrap_state_dict(state_dict: Mapping[str, object]) -> dict[str, Tensor]:
    """Strip {"model": sd} / {"module": sd} / {"state_dict": sd} wrappers and DDP's "module." key prefix."""
    sd: Mapping[str, object] = state_dict
    while not any(isinstance(v, Tensor) for v in sd.values()):
        inner = next((sd[k] for k in _WRAPPER_KEYS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(
                f"load_encoder_weights: no tensors found; top-level keys {sorted(sd)[:10]} are not a state dict "
                f"or a wrapper with one of {_WRAPPER_KEYS}"
            )
        sd = inner
    out = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


def _split_mae(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """MAE state dict -> (encoder keys without the "encoder." prefix, the other (decoder) keys to ignore)."""
    if not any(k.startswith("encoder.") for k in sd):
        return sd, []
    encoder = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    ignored = sorted(k for k in sd if not k.startswith("encoder."))
    return encoder, ignored


def _depth(keys: object) -> int:
    """Number of transformer blocks named in an iterable of state-dict keys."""
    ids = [int(m.group(1)) for m in map(_BLOCK_RE.match, keys) if m]  # type: ignore[arg-type]
    return max(ids) + 1 if ids else 0


def _check_blocks(source: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> None:
    src, dst = _depth(source), _depth(target)
    if src and src != dst:
        raise ValueError(
            f"load_encoder_weights: the checkpoint has {src} transformer blocks, the model {dst}; "
            "it was made for another model size (check model.name)"
        )


def _match_shapes(
    source: dict[str, Tensor], target: Mapping[str, Tensor], grid: tuple[int, int]
) -> tuple[dict[str, Tensor], list[str]]:
    """Resample pos_embed if needed; drop a head of another class count (ignored); raise on any other mismatch."""
    matched: dict[str, Tensor] = {}
    ignored: list[str] = []
    for key, value in source.items():
        if key not in target or value.shape == target[key].shape:
            matched[key] = value
            continue
        want = tuple(target[key].shape)
        if key == "pos_embed" and value.dim() == 3 and value.shape[-1] == want[-1]:
            value = interpolate_pos_embed(value, grid)
            if tuple(value.shape) == want:
                matched[key] = value
                continue
        if key.startswith(_HEAD_PREFIXES):
            ignored.append(key)
            continue
        raise ValueError(
            f"load_encoder_weights: {key!r} has shape {list(value.shape)} in the checkpoint but {list(want)} in the "
            "model; the checkpoint was made for another model size or patch size (check model.name and "
            "model.patch_size)"
        )
    return matched, ignored


def load_encoder_weights(
    model: VisionTransformer, state_dict: Mapping[str, object], allow_missing: tuple[str, ...] = NEW_HEAD_PREFIXES
) -> dict[str, list[str]]:
    """Load an MGP encoder (MAE state dict, `encoder.*` keys), a bare encoder or a classifier into `model`.

    Accepts plain or {"model": sd} / {"module": sd} wrapped state dicts. Strict about the trunk: a key of `model`
    that the checkpoint lacks raises ValueError naming it, unless it starts with one of `allow_missing` (the new
    `head.*` and `fc_norm.*` of a BFT model, which MGP never had). Returns {"missing", "unexpected", "ignored"}
    key lists: with average pooling the encoder's final `norm.*` is unexpected; decoder keys of an MAE state dict
    and a head with another number of classes are ignored. `pos_embed` is resampled bicubically when the patch
    grids differ. Raises ValueError when shapes cannot match (another width, depth or patch size).
    """
    source, ignored = _split_mae(unwrap_state_dict(state_dict))
    target = model.state_dict()
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    matched, head_ignored = _match_shapes(source, target, grid)  # type: ignore[arg-type]
    _check_blocks(source, target)
    lacking = sorted(k for k in target if k not in matched and not k.startswith(tuple(allow_missing)))
    if lacking:
        raise ValueError(
            f"load_encoder_weights: the checkpoint lacks {len(lacking)} key(s) of the model: {lacking[:8]}"
            f"{' ...' if len(lacking) > 8 else ''}; only a new head ({', '.join(p + '*' for p in allow_missing)}) "
            "may be missing. The checkpoint is incomplete or of another model: export the MGP/BFT run again with "
            "`livt export RUN` (or point model.init at the run folder) with the current code"
        )
    ignored += head_ignored
    loadable = {k: v for k, v in matched.items() if k in target}
    with torch.no_grad():
        result = model.load_state_dict(loadable, strict=False)
    return {
        "missing": sorted(result.missing_keys),
        "unexpected": sorted(k for k in matched if k not in target),
        "ignored": sorted(ignored),
    }


class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the dtype of its input and weights (a bf16 engine, bf16 autocast)."""

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)


class Fp32Linear(nn.Linear):
    """Linear layer computed in fp32 whatever the dtype of its input and weights; its output is fp32."""

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.float()
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float(), bias)


def fp32_head(model: VisionTransformer) -> VisionTransformer:
    """Make the classifier's last LayerNorm (``fc_norm`` with average pooling, ``norm`` with the cls token) and its
    ``head`` compute in fp32, in place; returns ``model``.

    A bf16 head rounds the logits to 8 bits of mantissa: at thousands of classes that ties the argmax and biases
    the calibration error. In fp32 the logits keep the trunk's precision for a negligible cost. The parameters and
    their names stay as they are (bf16 under a bf16 engine, the same state dict keys)."""
    for name in ("norm", "fc_norm"):
        norm = getattr(model, name)
        if isinstance(norm, nn.LayerNorm) and not isinstance(norm, Fp32LayerNorm):
            fp32 = Fp32LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=norm.elementwise_affine,
                                 bias=norm.bias is not None)
            fp32.load_state_dict(norm.state_dict())
            setattr(model, name, fp32)
    head = model.head
    if isinstance(head, nn.Linear) and not isinstance(head, Fp32Linear):
        fp32 = Fp32Linear(head.in_features, head.out_features, bias=head.bias is not None)
        fp32.load_state_dict(head.state_dict())
        model.head = fp32
    return model
