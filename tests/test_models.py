"""MGP model (masking, loss, patchify, pos-embeds, init) and MGP -> BFT weight transfer."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn

from livt_ds.config import ModelConfig
from livt_ds.models import (
    MLP_RATIO,
    MODEL_SIZES,
    MaskedAutoencoder,
    build_classifier,
    build_mae,
    interpolate_pos_embed,
    load_encoder_weights,
    sincos_pos_embed_2d,
)
from livt_ds.models.mae import random_masking, unshuffle_tokens

TINY_DECODER = dict(decoder_dim=32, decoder_depth=1, decoder_heads=2)


def _mae(img: int = 32, patch: int = 8, **kw) -> nn.Module:
    torch.manual_seed(0)
    return build_mae(ModelConfig("vit_test", img, patch, **{**TINY_DECODER, **kw}))


# ---------------------------------------------------------------- registry
def test_registry_sizes_and_unknown_name() -> None:
    assert (MODEL_SIZES["vit_base"].embed_dim, MODEL_SIZES["vit_base"].depth, MODEL_SIZES["vit_base"].num_heads) == (
        768, 12, 12)
    assert MODEL_SIZES["vit_test"].embed_dim == 32 and MODEL_SIZES["vit_huge"].depth == 32
    with pytest.raises(ValueError, match="vit_base"):
        build_mae(ModelConfig("vit_gigantic", 32, 8))
    with pytest.raises(ValueError, match="multiple"):
        build_classifier(ModelConfig("vit_test", 30, 8), 10)
    with pytest.raises(ValueError, match="global_pool"):
        build_classifier(ModelConfig("vit_test", 32, 8, global_pool="max"), 10)


def test_classifier_pooling_and_head_init() -> None:
    avg = build_classifier(ModelConfig("vit_test", 32, 8, drop_path=0.0), 10)
    assert isinstance(avg.fc_norm, nn.LayerNorm) and isinstance(avg.norm, nn.Identity)
    assert avg.cls_token is not None
    assert avg.head.weight.abs().max() < 1e-3 and avg.head.bias.abs().max() == 0
    tok = build_classifier(ModelConfig("vit_test", 32, 8, global_pool="token"), 10)
    assert isinstance(tok.norm, nn.LayerNorm) and isinstance(tok.fc_norm, nn.Identity)
    assert avg(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_builders_take_every_size_from_the_typed_model_config() -> None:
    """ModelConfig is the only home of the model defaults: the builders read it whole, MaskedAutoencoder has none."""
    config = ModelConfig("vit_test", 32, 8, mask_ratio=0.5, norm_pix=False, decoder_dim=48, decoder_depth=3,
                         decoder_heads=4)
    mae = build_mae(config)
    assert (mae.mask_ratio, mae.norm_pix, mae.patch_size, mae.num_patches) == (0.5, False, 8, 16)
    assert mae.decoder_embed.out_features == 48 and len(mae.decoder_blocks) == 3
    assert mae.decoder_blocks[0].attn.num_heads == 4 and mae.decoder_blocks[0].mlp.fc1.out_features == 48 * MLP_RATIO
    clf = build_classifier(ModelConfig("vit_test", 32, 8, drop_path=0.3, global_pool="token"), 5)
    assert clf.blocks[-1].drop_path1.drop_prob == pytest.approx(0.3) and clf.global_pool == "token"
    assert clf.blocks[0].mlp.fc1.out_features == 32 * MLP_RATIO and clf.head.out_features == 5
    sizes = ("mask_ratio", "norm_pix", "decoder_dim", "decoder_depth", "decoder_heads", "mlp_ratio")
    params = inspect.signature(MaskedAutoencoder).parameters
    assert all(params[name].default is inspect.Parameter.empty for name in sizes)


# ---------------------------------------------------------------- pos-embeds and init
def test_sincos_pos_embed_shape_and_fixed() -> None:
    emb = sincos_pos_embed_2d(32, (4, 4))
    assert emb.shape == (17, 32) and emb.dtype == torch.float32
    assert torch.equal(emb[0], torch.zeros(32))
    assert emb.abs().max() <= 1.0
    assert torch.unique(emb[1:], dim=0).shape[0] == 16  # every position distinct
    # patch (row 0, col 1) and (row 1, col 0) differ only in the x- resp. y-half
    assert torch.equal(emb[1 + 1, 16:], emb[1 + 0, 16:]) and torch.equal(emb[1 + 4, :16], emb[1 + 0, :16])
    non_square = sincos_pos_embed_2d(16, (2, 3), cls_token=False)
    assert non_square.shape == (6, 16)

    model = _mae()
    assert not model.encoder.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    assert torch.equal(model.encoder.pos_embed[0], emb)
    before = (model.encoder.pos_embed.clone(), model.decoder_pos_embed.clone())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randn(2, 3, 32, 32))[0].backward()
    opt.step()
    assert torch.equal(model.encoder.pos_embed, before[0]) and torch.equal(model.decoder_pos_embed, before[1])


def test_init_follows_method() -> None:
    model = _mae()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            fan_out, fan_in = module.weight.shape
            assert module.weight.abs().max() <= math.sqrt(6 / (fan_in + fan_out)) + 1e-6, name
            assert module.bias.abs().max() == 0, name
        if isinstance(module, nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert module.bias.abs().max() == 0, name
    proj = model.encoder.patch_embed.proj.weight  # [32, 3, 8, 8] treated as Linear [32, 192]
    bound = math.sqrt(6 / (32 + 192))
    assert proj.abs().max() <= bound + 1e-6 and proj.abs().max() > 0.8 * bound
    assert model.encoder.patch_embed.proj.bias.abs().max() == 0
    tokens = torch.cat([model.encoder.cls_token.flatten(), model.mask_token.flatten()])
    assert 0.005 < tokens.std() < 0.05


def test_no_weight_decay_names_exist() -> None:
    model = _mae()
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(names)
    assert {"encoder.cls_token", "mask_token"} <= model.no_weight_decay()


# ---------------------------------------------------------------- masking
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.75, 0.9])
def test_masking_keeps_round_count_and_unshuffles(ratio: float) -> None:
    torch.manual_seed(1)
    length = 16
    x = torch.randn(3, length, 5)
    kept, mask, ids_restore = random_masking(x, ratio)
    n_keep = round(length * (1 - ratio))
    assert kept.shape == (3, n_keep, 5)
    assert mask.shape == (3, length) and torch.equal(mask.sum(1), torch.full((3,), float(length - n_keep)))
    restored = unshuffle_tokens(kept, torch.zeros(1, 1, 5), ids_restore)
    visible = (mask == 0).unsqueeze(-1)
    assert torch.equal(torch.where(visible, x, torch.zeros_like(x)), restored)


def test_unshuffle_of_shuffle_is_identity_and_masks_differ_per_image() -> None:
    torch.manual_seed(2)
    x = torch.randn(4, 49, 3)
    shuffled, mask, ids_restore = random_masking(x, 0.0)  # keeps all, in random order
    assert not torch.equal(shuffled, x)
    assert torch.equal(unshuffle_tokens(shuffled, torch.zeros(1, 1, 3), ids_restore), x)
    _, mask, _ = random_masking(x, 0.75)
    assert len({tuple(m.tolist()) for m in mask}) == 4


# ---------------------------------------------------------------- patches and loss
def test_patchify_round_trip_and_layout() -> None:
    model = _mae()
    images = torch.randn(2, 3, 32, 32)
    patches = model.patchify(images)
    assert patches.shape == (2, 16, 8 * 8 * 3)
    assert torch.equal(model.unpatchify(patches), images)
    # patch 1 is row 0, column 1; pixel layout (row, col, channel)
    assert torch.equal(patches[:, 1], images[:, :, 0:8, 8:16].permute(0, 2, 3, 1).reshape(2, -1))
    assert model.patch_size == 8 and model.num_patches == 16


def test_forward_shapes_and_dtypes() -> None:
    model = _mae()
    images = torch.randn(2, 3, 32, 32)
    loss, pred, mask = model(images)
    assert loss.dim() == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert pred.shape == (2, 16, 192) and mask.shape == (2, 16)
    assert torch.equal(mask.sum(1), torch.full((2,), 12.0))
    assert model(images, mask_ratio=0.5)[2].sum(1).tolist() == [8.0, 8.0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_bf16, pred_bf16, _ = model(images)
    assert loss_bf16.dtype == torch.float32 and pred_bf16.dtype == torch.bfloat16 and torch.isfinite(loss_bf16)
    with pytest.raises(ValueError, match="mask_ratio"):
        model(images, mask_ratio=1.0)


def test_loss_counts_masked_patches_only() -> None:
    model = _mae()
    images = torch.rand(2, 3, 32, 32)
    torch.manual_seed(3)
    pred = torch.randn(2, 16, 192)
    _, mask = random_masking(torch.zeros(2, 16, 1), 0.75)[:2]
    base = model.forward_loss(images, pred, mask)
    visible = (mask == 0).unsqueeze(-1)
    assert model.forward_loss(images, pred + 5.0 * visible, mask).item() == pytest.approx(base.item(), rel=1e-6)
    assert model.forward_loss(images, pred + 5.0 * ~visible, mask).item() != pytest.approx(base.item(), rel=1e-3)
    # by hand: per-patch normalised target, mean over pixels, mean over masked patches
    target = model.patchify(images)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((pred - target) ** 2).mean(-1)
    assert base.item() == pytest.approx((per_patch[mask.bool()]).mean().item(), rel=1e-5)
    raw = _mae(norm_pix=False).forward_loss(images, pred, mask)
    manual_raw = ((pred - model.patchify(images)) ** 2).mean(-1)[mask.bool()].mean()
    assert raw.item() == pytest.approx(manual_raw.item(), rel=1e-5)


def test_grad_checkpointing_same_loss_and_grads() -> None:
    images = torch.randn(2, 3, 32, 32)
    results = []
    for enable in (False, True):
        model = _mae()
        model.encoder.set_grad_checkpointing(enable)  # timm's own switch on the encoder
        model.decoder_grad_checkpointing = enable
        torch.manual_seed(4)
        loss = model(images)[0]
        loss.backward()
        results.append((loss.detach(), model.encoder.blocks[0].attn.qkv.weight.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0])
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)
    model = _mae()
    model.set_grad_checkpointing(True)
    assert model.encoder.grad_checkpointing and model.decoder_grad_checkpointing


def test_mae_encoder_matches_timm_forward_without_masking() -> None:
    model = _mae().eval()
    images = torch.randn(2, 3, 32, 32)
    latent, _, ids_restore = model.forward_encoder(images, 0.0)
    reference = model.encoder.forward_features(images)  # timm's own path: the BFT trunk
    assert torch.allclose(latent[:, :1], reference[:, :1], atol=1e-5)
    patches = unshuffle_tokens(latent[:, 1:], torch.zeros(1, 1, 32), ids_restore)
    assert torch.allclose(patches, reference[:, 1:], atol=1e-5)


# ---------------------------------------------------------------- MGP -> BFT transfer
def test_mae_encoder_loads_into_classifier_with_same_trunk_outputs() -> None:
    mae = _mae()
    encoder_keys = set(mae.encoder.state_dict())
    token_config = ModelConfig("vit_test", 32, 8, global_pool="token")
    assert encoder_keys == {k for k in build_classifier(token_config, 10).state_dict() if not k.startswith("head.")}
    token = build_classifier(ModelConfig("vit_test", 32, 8, global_pool="token", drop_path=0.0), 10)
    report = load_encoder_weights(token, mae.state_dict())
    assert report["missing"] == ["head.bias", "head.weight"] and report["unexpected"] == []
    assert "mask_token" in report["ignored"] and all(not k.startswith("encoder.") for k in report["ignored"])
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(token.eval().forward_features(images), mae.encoder.eval().forward_features(images))

    avg = build_classifier(ModelConfig("vit_test", 32, 8, drop_path=0.0), 10)
    report = load_encoder_weights(avg, {"model": mae.state_dict()})
    assert report["missing"] == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert report["unexpected"] == ["norm.bias", "norm.weight"]
    with torch.no_grad():
        trunk = mae.encoder.blocks(mae.encoder._pos_embed(mae.encoder.patch_embed(images)))
        assert torch.allclose(avg.eval().forward_features(images), trunk, atol=1e-6)


def test_bare_encoder_wrapped_and_classifier_state_dicts() -> None:
    mae = _mae()
    clf = build_classifier(ModelConfig("vit_test", 32, 8, global_pool="token"), 10)
    report = load_encoder_weights(clf, {"module": {f"module.{k}": v for k, v in mae.encoder.state_dict().items()}})
    assert report == {"missing": ["head.bias", "head.weight"], "unexpected": [], "ignored": []}
    assert torch.equal(clf.blocks[1].mlp.fc2.weight, mae.encoder.blocks[1].mlp.fc2.weight)
    source = build_classifier(ModelConfig("vit_test", 32, 8, global_pool="token"), 10)
    report = load_encoder_weights(clf, source.state_dict())
    assert report == {"missing": [], "unexpected": [], "ignored": []}
    assert torch.equal(clf.head.weight, source.head.weight)
    other_classes = build_classifier(ModelConfig("vit_test", 32, 8, global_pool="token"), 7)
    report = load_encoder_weights(other_classes, source.state_dict())
    assert report["ignored"] == ["head.bias", "head.weight"] and report["missing"] == ["head.bias", "head.weight"]


def test_pos_embed_interpolation_8x8_to_14x14() -> None:
    mae = _mae(img=64, patch=8)  # 8x8 grid
    clf = build_classifier(ModelConfig("vit_test", 112, 8), 10)  # 14x14 grid
    load_encoder_weights(clf, mae.state_dict())
    assert clf.pos_embed.shape == (1, 1 + 14 * 14, 32)
    assert torch.equal(clf.pos_embed[:, 0], mae.encoder.pos_embed[:, 0])
    # the oracle written out: the 8x8 grid as a [1, D, 8, 8] image, bicubic with antialias (timm's/PIL's a=-0.5
    # kernel), back to [1, 196, D]; the cls position is copied
    grid = mae.encoder.pos_embed.detach()[:, 1:].reshape(1, 8, 8, 32).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(grid, size=(14, 14), mode="bicubic", align_corners=False,
                                              antialias=True)
    expected = torch.cat([mae.encoder.pos_embed.detach()[:, :1], resized.permute(0, 2, 3, 1).reshape(1, 196, 32)], 1)
    torch.testing.assert_close(clf.pos_embed.detach(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(interpolate_pos_embed(mae.encoder.pos_embed.detach(), (14, 14)), expected, rtol=0,
                               atol=1e-6)
    plain = torch.nn.functional.interpolate(grid, size=(14, 14), mode="bicubic", align_corners=False)
    assert not torch.allclose(resized, plain, atol=1e-4)  # the antialias choice is visible: the check can fail
    # interpolation is smooth: corners keep roughly their values, not a copy of the first 196 rows
    src = mae.encoder.pos_embed[0, 1:].reshape(8, 8, 32)
    dst = clf.pos_embed[0, 1:].reshape(14, 14, 32)
    assert (dst[0, 0] - src[0, 0]).abs().max() < 0.2 and (dst[-1, -1] - src[-1, -1]).abs().max() < 0.2
    assert clf.pos_embed.requires_grad
    assert clf(torch.randn(1, 3, 112, 112)).shape == (1, 10)
    same = interpolate_pos_embed(mae.encoder.pos_embed.detach(), (8, 8))
    assert torch.equal(same, mae.encoder.pos_embed.detach())


def test_wrong_model_size_raises_clear_error() -> None:
    mae = _mae()
    demo = build_classifier(ModelConfig("vit_demo", 32, 8), 10)
    with pytest.raises(ValueError, match=r"cls_token.*\[1, 1, 32\].*\[1, 1, 64\]"):
        load_encoder_weights(demo, mae.state_dict())
    with pytest.raises(ValueError, match="patch_size"):
        load_encoder_weights(build_classifier(ModelConfig("vit_test", 32, 4), 10), mae.state_dict())
    with pytest.raises(ValueError, match="state dict"):
        load_encoder_weights(demo, {"epoch": 3})


def test_fixed_pos_tables_are_fp32_buffers_in_the_state_dict() -> None:
    """Buffers, not frozen parameters: ZeRO-1 drops frozen parameters from its checkpoints, buffers it keeps."""
    mae = _mae()
    params = dict(mae.named_parameters())
    assert "encoder.pos_embed" not in params and "decoder_pos_embed" not in params
    state = mae.state_dict()
    assert torch.equal(state["encoder.pos_embed"][0], sincos_pos_embed_2d(32, (4, 4)))
    assert torch.equal(state["decoder_pos_embed"][0], sincos_pos_embed_2d(32, (4, 4)))
    mae.to(torch.bfloat16)  # a blanket cast still runs (the tables are cast to the compute dtype in forward)
    assert mae(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))[0].isfinite()


def test_init_missing_a_trunk_key_is_an_error_naming_it() -> None:
    mae = _mae()
    state = {k: v for k, v in mae.state_dict().items() if k != "encoder.pos_embed"}
    clf = build_classifier(ModelConfig("vit_test", 32, 8), 10)
    with pytest.raises(ValueError, match=r"lacks 1 key.*'pos_embed'.*livt export"):
        load_encoder_weights(clf, state)
    state = {k: v for k, v in mae.encoder.state_dict().items() if not k.startswith("blocks.1.attn.")}
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.proj\.bias"):
        load_encoder_weights(build_classifier(ModelConfig("vit_test", 32, 8, global_pool="token"), 10), state)
