"""Masked Generative Pretraining (MGP) model: a masked autoencoder on a timm ViT encoder.

The encoder is a plain `timm` `VisionTransformer` (no head), so its state dict has exactly the keys of the
classifier's trunk (`patch_embed.*`, `cls_token`, `pos_embed`, `blocks.*`, `norm.*`) and loads into the BFT
classifier without renaming. The encoder sees only the visible patches; a light decoder of timm `Block`s puts mask
tokens back in place and regresses the pixels of every patch; the loss counts the masked patches only.
"""

from __future__ import annotations

import torch
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

__all__ = ["MaskedAutoencoder", "sincos_pos_embed_2d", "random_masking", "unshuffle_tokens"]


def _sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """[M] positions -> [M, dim]: first half sin(pos * w_k), second half cos(pos * w_k), w_k = 10000^(-k/(dim/2))."""
    half = dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: tuple[int, int], cls_token: bool = True) -> Tensor:
    """Fixed 2-D sine-cosine positional embedding.

    Returns [(1 if cls_token) + gh*gw, embed_dim] in fp32, patches in row-major order (the order of timm's
    `PatchEmbed`). The first half of the channels encodes the column (x) index, the second half the row (y) index,
    as in MAE. The cls position is all zeros.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"sincos_pos_embed_2d: embed_dim={embed_dim} must be divisible by 4 (sin/cos for x and y)")
    gh, gw = grid_size
    rows = torch.arange(gh).repeat_interleave(gw)  # y of each patch, row-major
    cols = torch.arange(gw).repeat(gh)  # x of each patch
    emb = torch.cat([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def random_masking(x: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image random masking by argsort of uniform noise (no Python loops, no host syncs).

    x: [B, L, D]. Keeps the first round(L * (1 - mask_ratio)) patches of a random permutation per image.
    Returns (kept [B, K, D], mask [B, L] fp32 with 1 = masked and 0 = kept, in the original patch order,
    ids_restore [B, L] = the inverse permutation, used by `unshuffle_tokens`).
    """
    batch, length, dim = x.shape
    len_keep = int(round(length * (1.0 - mask_ratio)))
    noise = torch.rand(batch, length, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(batch, length, device=x.device, dtype=torch.float32)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return kept, mask, ids_restore


def unshuffle_tokens(kept: Tensor, fill: Tensor, ids_restore: Tensor) -> Tensor:
    """Put kept tokens back at their original positions and `fill` (e.g. the mask token) everywhere else.

    kept: [B, K, D]; fill: broadcastable to [B, L-K, D]; ids_restore: [B, L] from `random_masking`. Returns [B, L, D].
    """
    batch, n_kept, dim = kept.shape
    n_masked = ids_restore.shape[1] - n_kept
    fill = fill.to(kept.dtype).expand(batch, n_masked, dim)
    shuffled = torch.cat([kept, fill], dim=1)
    return torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))


class MaskedAutoencoder(nn.Module):
    """MAE-style MGP model: timm ViT encoder (`self.encoder`) on visible patches + light Transformer decoder.

    forward(images [B,3,H,W]) -> (loss 0-dim fp32, pred [B, L, p*p*3], mask [B, L] with 1 = masked).
    Every size is an argument without a default: build it from a recipe with `registry.build_mae`.
    """

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        *,
        mask_ratio: float,
        norm_pix: bool,
        decoder_dim: int,
        decoder_depth: int,
        decoder_heads: int,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        _check_heads("encoder", embed_dim, num_heads)
        _check_heads("decoder", decoder_dim, decoder_heads)
        _check_mask_ratio(mask_ratio)
        if img_size % patch_size != 0:
            raise ValueError(f"MaskedAutoencoder: img_size={img_size} is not a multiple of patch_size={patch_size}")
        self.mask_ratio = mask_ratio
        self.norm_pix = norm_pix
        self.encoder = VisionTransformer(
            img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
            mlp_ratio=mlp_ratio, qkv_bias=True, num_classes=0, global_pool="token",
        )
        grid = tuple(self.encoder.patch_embed.grid_size)
        _make_fixed(self.encoder, "pos_embed", sincos_pos_embed_2d(embed_dim, grid).unsqueeze(0))
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(decoder_dim, grid).unsqueeze(0))
        self.decoder_blocks = nn.Sequential(*[
            Block(decoder_dim, decoder_heads, mlp_ratio=mlp_ratio, qkv_bias=True) for _ in range(decoder_depth)
        ])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size * patch_size * 3)
        self.decoder_grad_checkpointing = False
        self.initialize_weights()

    # ------------------------------------------------------------------ setup
    def initialize_weights(self) -> None:
        """MAE init: xavier-uniform Linear (patch conv as Linear), tokens N(0, .02); the pos tables are fixed."""
        with torch.no_grad():
            proj = self.encoder.patch_embed.proj.weight
            nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
            if self.encoder.patch_embed.proj.bias is not None:
                nn.init.zeros_(self.encoder.patch_embed.proj.bias)
            nn.init.normal_(self.encoder.cls_token, std=0.02)
            nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            _init_module(module)

    @property
    def patch_size(self) -> int:
        return int(self.encoder.patch_embed.patch_size[0])

    @property
    def num_patches(self) -> int:
        return int(self.encoder.patch_embed.num_patches)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names that take no weight decay (the tokens; the pos tables are buffers, not trained)."""
        return {"encoder.cls_token", "mask_token"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of the encoder (timm's flag) and decoder blocks."""
        self.encoder.set_grad_checkpointing(enable)
        self.decoder_grad_checkpointing = enable

    # ------------------------------------------------------------------ patches
    def patchify(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] -> [B, L, p*p*3], patches row-major, pixels (row, col, channel) within a patch."""
        p = self.patch_size
        batch, chans, height, width = images.shape
        if height % p or width % p:
            raise ValueError(f"patchify: image size {height}x{width} is not a multiple of patch size {p}")
        h, w = height // p, width // p
        x = images.reshape(batch, chans, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(batch, h * w, p * p * chans)

    def unpatchify(self, patches: Tensor) -> Tensor:
        """[B, L, p*p*3] -> [B, 3, H, W]; inverse of `patchify` for the model's own grid."""
        p = self.patch_size
        h, w = self.encoder.patch_embed.grid_size
        batch, length, _ = patches.shape
        if length != h * w:
            raise ValueError(f"unpatchify: got {length} patches, the model's grid is {h}x{w}={h * w}")
        x = patches.reshape(batch, h, w, p, p, 3)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(batch, 3, h * p, w * p)

    # ------------------------------------------------------------------ forward
    def forward_encoder(self, images: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
        """images [B,3,H,W] -> (latent [B, 1+K, D], mask [B, L], ids_restore [B, L])."""
        enc = self.encoder
        x = enc.patch_embed(images)
        x = x + enc.pos_embed[:, 1:, :].to(x.dtype)  # the fp32 table in the compute dtype (bf16 under DeepSpeed)
        x, mask, ids_restore = random_masking(x, mask_ratio)
        cls = (enc.cls_token + enc.pos_embed[:, :1, :].to(enc.cls_token.dtype)).expand(x.shape[0], -1, -1)
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        if enc.grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint_seq(enc.blocks, x)
        else:
            x = enc.blocks(x)
        return enc.norm(x), mask, ids_restore

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """latent [B, 1+K, D] -> pixel predictions [B, L, p*p*3] for every patch (original order)."""
        x = self.decoder_embed(latent)
        patches = unshuffle_tokens(x[:, 1:, :], self.mask_token, ids_restore)
        x = torch.cat([x[:, :1, :], patches], dim=1) + self.decoder_pos_embed.to(x.dtype)
        if self.decoder_grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint_seq(self.decoder_blocks, x)
        else:
            x = self.decoder_blocks(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def forward_loss(self, images: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Masked-patch MSE in fp32: per-patch mean over pixels, then sum(loss * mask) / sum(mask).

        The target is normalised per patch when `norm_pix` ((x - mean) / sqrt(var + 1e-6), var unbiased as in MAE).
        """
        target = self.patchify(images).float()
        if self.norm_pix:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        mask = mask.float()
        per_patch = (pred.float() - target).pow(2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(self, images: Tensor, mask_ratio: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """images [B,3,H,W] -> (loss 0-dim fp32, pred [B, L, p*p*3], mask [B, L] with 1 = masked)."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        _check_mask_ratio(ratio)
        latent, mask, ids_restore = self.forward_encoder(images, ratio)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(images, pred, mask)
        return loss, pred, mask


def _make_fixed(module: nn.Module, name: str, table: Tensor) -> None:
    """Replace ``module.<name>`` (a timm parameter) by a persistent fp32 buffer holding ``table``.

    A buffer keeps its state-dict key (``encoder.pos_embed`` loads into the classifier's learnable ``pos_embed``),
    stays fp32 under DeepSpeed's bf16 (only parameters are cast) and is saved by every ZeRO stage, whereas a frozen
    parameter is dropped from ZeRO-1 checkpoints.
    """
    delattr(module, name)
    module.register_buffer(name, table)


def _init_module(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        if module.weight is not None:
            nn.init.ones_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _check_heads(where: str, dim: int, heads: int) -> None:
    if heads <= 0 or dim % heads != 0:
        raise ValueError(f"MaskedAutoencoder {where}: width {dim} is not divisible by num_heads {heads}")


def _check_mask_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"MaskedAutoencoder: mask_ratio={ratio} must be in [0, 1) (the paper uses 0.75)")

