"""Every shipped bf16 DeepSpeed config, end to end on 2 CPU ranks (gloo; DeepSpeed runs bf16 on CPU), or on the
GPUs with LIVT_TEST_DEVICE=cuda (scripts/gpu_check.sh; the world-size change needs 2 GPUs).

Per config: MGP (uninterrupted, saving a checkpoint every step), its step-2 checkpoint resumed with `--resume auto`
in another folder (same per-step losses), the same checkpoint resumed on 1 rank through the universal format, BFT
with model.init = the MGP run, exports of both, and `livt eval`'s evaluation of the BFT export (in this process):
4 launches, each serving all the checks that read it. Plus the dtype gradients really accumulate in, for each config.

Each config is one xdist group: its runs are trained once, on one worker; the configs spread over the workers.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TEST_DEVICE, free_port, launch_ranks, launcher_env, run_livt, run_process, train_losses

pytestmark = pytest.mark.slow

CONFIGS = ["zero1_bf16.json", "zero2_bf16.json", "zero3_bf16.json", "zero2_offload_bf16.json"]
STEPS = 3  # 51 toy images // (8 x 2 ranks) = 3 optimizer steps = 1 epoch (fixed, whatever the world size)
WORLD = launch_ranks(2)
STOP = 2


def mgp_args(ds: str, shards: Path) -> list[str]:
    """MGP without evaluations (no check reads them), saving every step: step 2 is the resumed checkpoint."""
    return ["--config", "configs/tiny_mgp.yaml", "--ds-config", f"ds_configs/{ds}", f"data.path={shards}",
            "train.epochs=1", f"train.steps_per_epoch={STEPS}", "eval.every=0", "checkpoint.every_steps=1",
            f"checkpoint.keep_last={STEPS}"]


def bft_args(ds: str, shards: Path) -> list[str]:
    return ["--config", "configs/tiny_bft.yaml", "--ds-config", f"ds_configs/{ds}", f"data.path={shards}",
            "train.epochs=1", f"train.steps_per_epoch={STEPS}", "augment.mixup=0", "augment.cutmix=0"]


def stopped_at(full: Path, run: Path, step: int) -> str:
    """``run`` as if stopped at ``step``: the uninterrupted run's checkpoints up to it, ``latest`` naming it."""
    tag = f"step{step:08d}"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / tag, run / "checkpoints" / tag)
    (run / "checkpoints" / "latest").write_text(tag)
    return tag


# Each config is one xdist group (its runs are trained once, on one worker): marks on a fixture's own params do not
# reach xdist, so the tests take the config through indirect parametrization.
per_config = pytest.mark.parametrize(
    "chain", [pytest.param(c, marks=pytest.mark.xdist_group(c.removesuffix(".json")), id=c) for c in CONFIGS],
    indirect=True)


@pytest.fixture(scope="module")
def chain(request, toy_shards, tmp_path_factory) -> dict:
    """The runs of one config; each assertion below reads them, none launches its own."""
    from livt_ds.config import load_recipe
    from livt_ds.evaluate import run_eval
    from livt_ds.weights import export

    ds = request.param
    out = tmp_path_factory.mktemp(ds.removesuffix(".json"))
    mgp = mgp_args(ds, toy_shards)
    run_livt(["pretrain", *mgp, "--output", str(out / "mgp")])
    saved = sorted(p.name for p in (out / "mgp" / "checkpoints").glob("step*"))
    stopped_tag = stopped_at(out / "mgp", out / "part", STOP)
    stopped_at(out / "mgp", out / "one_rank", STOP)
    resumed = run_livt(["pretrain", *mgp, "--output", str(out / "part"), "--resume", "auto"])
    if WORLD == 2:  # the 2-rank checkpoint on 1 rank (universal format), same global batch; lr 0 keeps the weights
        run_livt(["pretrain", *mgp, "--output", str(out / "one_rank"), "train.batch_size=16", "train.lr=0",
                  "--resume", "auto", "--allow-recipe-change"], ranks=0)
    run_livt(["finetune", *bft_args(ds, toy_shards), "--output", str(out / "bft"), f"model.init={out / 'mgp'}"])
    for run in ("mgp", "bft", "one_rank") if WORLD == 2 else ("mgp", "bft"):
        export(out / run)
    # what `livt eval` runs, in this process (no engine, no process group: an interpreter start-up spared)
    recipe = load_recipe(str(REPO / "configs" / "tiny_bft.yaml"),
                         [*bft_args(ds, toy_shards)[4:], f"model.init={out / 'bft' / 'export' / 'model.pt'}"])
    run_eval(recipe, str(REPO / "ds_configs" / ds), out / "eval")
    return {"ds": ds, "out": out, "stopped_tag": stopped_tag, "saved": saved,
            "resumed_log": resumed.stdout + resumed.stderr}


def exported(run: Path, name: str = "model.pt") -> dict[str, torch.Tensor]:
    return torch.load(run / "export" / name, map_location="cpu", weights_only=False)["model"]


@per_config
def test_mgp_export_holds_every_tensor_and_the_sincos_tables(chain):
    from livt_ds.config import ModelConfig
    from livt_ds.models.mae import sincos_pos_embed_2d
    from livt_ds.models.registry import build_mae

    out = chain["out"]
    mae = build_mae(ModelConfig("vit_test", 32, 8, decoder_dim=32, decoder_depth=1, decoder_heads=2))
    state = exported(out / "mgp")
    mae.load_state_dict(state, strict=True)  # every parameter and buffer of the MGP model
    mae.encoder.load_state_dict(exported(out / "mgp", "encoder.pt"), strict=True)
    assert torch.equal(state["encoder.pos_embed"][0], sincos_pos_embed_2d(32, (4, 4)))
    assert torch.equal(state["decoder_pos_embed"][0], sincos_pos_embed_2d(32, (4, 4)))


@per_config
def test_bft_starts_from_the_mgp_encoder_and_exports_every_tensor(chain):
    from livt_ds.config import ModelConfig
    from livt_ds.models.mae import sincos_pos_embed_2d
    from livt_ds.models.registry import build_classifier

    out = chain["out"]
    state = exported(out / "bft")
    build_classifier(ModelConfig("vit_test", 32, 8), 4).load_state_dict(state, strict=True)
    # BFT started from the MGP encoder: every trunk tensor is where MGP left it, up to bf16 rounding of the start
    # (DeepSpeed builds the fp32 master weights from the bf16 copy) and STEPS Adam steps of at most ~lr each.
    # A random start (timm: N(0, 0.02) tokens and pos_embed, xavier/trunc-normal weights) is O(0.1-1) away.
    lr = json.loads((out / "bft" / "ds_config.json").read_text())["optimizer"]["params"]["lr"]
    mgp = exported(out / "mgp", "encoder.pt")
    assert torch.equal(mgp["pos_embed"][0], sincos_pos_embed_2d(32, (4, 4)))
    trunk = [k for k in mgp if not k.startswith("norm.")]  # avg pooling: the classifier has fc_norm instead
    assert "pos_embed" in trunk and "cls_token" in trunk and len(trunk) > 20
    for key in trunk:
        bound = 3 * STEPS * lr + mgp[key].abs() * 2.0**-8
        assert ((state[key] - mgp[key]).abs() <= bound).all(), (key, (state[key] - mgp[key]).abs().max())


@per_config
def test_resumed_bf16_run_follows_the_uninterrupted_one(chain):
    out = chain["out"]
    assert chain["saved"] == [f"step{s:08d}" for s in range(1, STEPS + 1)]
    full, part = train_losses(out / "mgp"), train_losses(out / "part")
    assert sorted(full) == list(range(1, STEPS + 1)) and sorted(part) == list(range(STOP + 1, STEPS + 1))
    assert f"resumed from {out / 'part' / 'checkpoints' / chain['stopped_tag']} at step {STOP}" in chain["resumed_log"]
    assert part == {s: full[s] for s in part}  # CPU bf16 is deterministic: the same losses, bit for bit


@per_config
@pytest.mark.skipif(WORLD < 2, reason="the world-size change needs 2 ranks (2 GPUs under LIVT_TEST_DEVICE=cuda)")
def test_universal_resume_onto_one_rank(chain):
    from livt_ds.weights import consolidate

    out = chain["out"]
    ckpt = out / "one_rank" / "checkpoints"
    assert sorted(train_losses(out / "one_rank")) == list(range(STOP + 1, STEPS + 1))
    assert (ckpt / f"{chain['stopped_tag']}_universal").is_dir()
    # with lr 0 the 1-rank run keeps the fp32 weights it loaded: they are the 2-rank checkpoint's, exactly
    loaded, saved = exported(out / "one_rank"), consolidate(ckpt, chain["stopped_tag"])
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key


@per_config
def test_export_gives_the_engine_eval_metrics(chain):
    out = chain["out"]
    engine = json.loads((out / "bft" / "metrics.json").read_text())
    plain = json.loads((out / "eval" / "metrics.json").read_text())
    assert plain["num_samples"] == engine["num_samples"] == 20
    for key in ("top1", "many", "medium", "few"):
        assert plain[key] == engine[key], key
    assert plain["ece"] == pytest.approx(engine["ece"], abs=2e-2)  # the engine's trunk runs bf16, the export fp32


def test_gradients_accumulate_in_fp32_on_every_shipped_bf16_config(tmp_path):
    """A real engine per config accumulates 8 micro-batches; see tests/grad_accum_probe.py for the oracle."""
    from grad_accum_probe import FP32_SUM

    bf16_accum = json.loads((REPO / "ds_configs" / "zero1_bf16.json").read_text())
    bf16_accum.pop("data_types")  # the control: DeepSpeed's default for bf16 ZeRO-1 accumulates in bf16
    (tmp_path / "bf16_accum.json").write_text(json.dumps(bf16_accum))
    paths = [str(REPO / "ds_configs" / name) for name in CONFIGS] + [str(tmp_path / "bf16_accum.json")]
    cmd = [sys.executable, str(REPO / "tests" / "grad_accum_probe.py"), str(free_port()), str(tmp_path / "r.json"),
           *paths]
    result = run_process(cmd, cwd=REPO, env=launcher_env())
    assert result.returncode == 0, result.stderr[-4000:]
    found = {Path(r["config"]).name: r for r in json.loads((tmp_path / "r.json").read_text())}
    for name in CONFIGS:
        r = found[name]
        assert r["device"].startswith(TEST_DEVICE), r  # the probe runs where the e2e tests run
        assert r["param_dtype"] == "torch.bfloat16", r
        assert r["grad_dtype"] == "torch.float32" and set(r["grad"]) == {FP32_SUM}, (name, r["optimizer"])
    assert found["zero1_bf16.json"]["optimizer"] == "BF16_Optimizer"
    assert set(found["bf16_accum.json"]["grad"]) == {1.0}  # the probe does see bf16 accumulation
