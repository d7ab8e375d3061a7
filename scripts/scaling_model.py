"""The scaling model of docs/scaling.md on paper: per-GPU rate, gradient traffic per ZeRO stage against NVLink and
InfiniBand, decode cores per GPU, batch layout and lr per world size, time per epoch and in total, for the shipped
ViT-B / ViT-L MGP and BFT recipes on 1 to 64 nodes of 8 H100s. Nothing here is measured: every input is a figure
quoted below with its source, and the output is arithmetic on them.

    python scripts/scaling_model.py > /tmp/tables.md
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from livt_ds.config import base_lr, load_ds_config, load_recipe, plan_batch  # noqa: E402
from livt_ds.errors import ConfigError  # noqa: E402
from livt_ds.models.flops import flops_per_image  # noqa: E402
from livt_ds.models.registry import get_size  # noqa: E402

# images/s per H100 SXM, plain PyTorch eager, bf16, synthetic input (docs/gpu.md, "Reference figures")
GPU_RATE = {("pretrain", "vit_base"): 3754, ("pretrain", "vit_large"): 2043, ("finetune", "vit_base"): 2466,
            ("finetune", "vit_large"): 856}
GPU_RATE_AT = 224  # the image size of those figures
# images/s per CPU core of the input pipeline: README "Data in a bucket" table, 2 workers on a 2-core machine
CORE_RATE = {"pretrain": 520 / 2, "finetune": 421 / 2}
CORES_PER_GPU = 112 / 8  # DGX H100: 2 x Xeon Platinum 8480C (56 cores each) for 8 GPUs (NVIDIA DGX H100 datasheet)
NVLINK_GBS = 450.0  # H100 SXM NVLink 4: 900 GB/s per GPU both directions together (NVIDIA H100 datasheet)
IB_GBS = 50.0  # one 400 Gb/s NDR ConnectX-7 per GPU (NVIDIA DGX H100 datasheet), per direction
LINK_EFFICIENCY = 0.8  # assumption: the share of the link rate a large NCCL collective reaches
WIRE_BYTES = 2  # gradients and parameters travel in bf16 (DeepSpeed's communication_data_type under bf16)
SAMPLES = {"imagenet_lt": 115_846, "inat18": 437_513}  # training images (docs/method.md, data sets table)
NODES = (1, 2, 4, 8, 16, 32, 64)

RECIPES = ["mgp_vit_base_imagenet_lt", "mgp_vit_large_imagenet_lt", "mgp_vit_base_inat18", "mgp_vit_large_inat18",
           "bft_vit_base_imagenet_lt", "bft_vit_large_imagenet_lt", "bft_vit_base_inat18", "bft_vit_large_inat18"]


def params(stage: str, name: str, decoder_dim: int, decoder_depth: int, num_classes: int) -> int:
    """Trainable parameters: 12 d^2 + 13 d per block, patch embedding, tokens; MGP adds the decoder, BFT the head."""
    size = get_size(name)
    d = size.embed_dim
    encoder = size.depth * (12 * d * d + 13 * d) + (3 * 16 * 16 * d + d) + 2 * d
    if stage == "pretrain":
        dd = decoder_dim
        return encoder + d * dd + dd + decoder_depth * (12 * dd * dd + 13 * dd) + 2 * dd + dd * 3 * 16 * 16 + dd
    return encoder + d * num_classes + num_classes


def traffic_bytes(zero: int, p: int, world: int, accumulation: int) -> float:
    """Bytes each GPU sends per optimizer step (ring collectives: (N-1)/N of the buffer per pass).

    ZeRO-1: gradients reduced once per step and the updated parameters gathered: 2 passes (the ZeRO paper's 2 psi,
    the volume of a plain all-reduce). ZeRO-2: the gradients are reduce-scattered at every micro-batch (it keeps only
    its partition), then the parameters gathered once. ZeRO-3: every micro-batch gathers the parameters in forward
    and in backward and reduce-scatters the gradients: 3 passes (the paper's 3 psi) per micro-batch."""
    one = (world - 1) / world * p * WIRE_BYTES
    return {1: 2 * one, 2: (accumulation + 1) * one, 3: 3 * accumulation * one}[zero]


def link_gbs(world: int) -> float:
    """The bandwidth that bounds a collective: NVLink inside one node, each GPU's InfiniBand port across nodes."""
    return (NVLINK_GBS if world <= 8 else IB_GBS) * LINK_EFFICIENCY


def rate(stage: str, recipe) -> float:
    """Per-GPU images/s: the measured figure, scaled by model FLOPs for another image size (an estimate)."""
    measured = GPU_RATE[(stage, recipe.model.name)]
    if recipe.model.img_size == GPU_RATE_AT:
        return measured
    ref = replace(recipe.model, img_size=GPU_RATE_AT)
    return measured * flops_per_image(stage, ref, num_classes=1000)["train"] / flops_per_image(
        stage, recipe.model, num_classes=1000)["train"]


def fmt_time(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def input_cap(stage: str) -> float:
    """Images/s one GPU can be fed when all of its share of the node's cores decode (the trainer's own core aside)."""
    return (CORES_PER_GPU - 1) * CORE_RATE[stage]


def model_rows():
    """Per recipe: name, stage, data set, recipe, parameters, per-GPU rate (GPU-bound and input-capped)."""
    for name in RECIPES:
        recipe = load_recipe(REPO / "configs" / f"{name}.yaml")
        stage, data = "pretrain" if name.startswith("mgp") else "finetune", name.split("_", 3)[3]
        p = params(stage, recipe.model.name, recipe.model.decoder_dim, recipe.model.decoder_depth,
                   8142 if data == "inat18" else 1000)
        gpu = rate(stage, recipe)
        yield name, stage, data, recipe, p, gpu, min(gpu, input_cap(stage))


def main() -> None:
    ds = load_ds_config(REPO / "ds_configs" / "zero2_bf16.json")
    nodes_head = " | ".join(f"{n} x 8" for n in NODES)
    print("### Per-GPU rate and input\n")
    print("| recipe | img px | params (M) | GPU-bound img/s | cores/GPU to feed it | input-capped img/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = list(model_rows())
    for name, stage, _, recipe, p, gpu, fed in rows:
        print(f"| {name} | {recipe.model.img_size} | {p / 1e6:.0f} | {gpu:,.0f} | {gpu / CORE_RATE[stage]:.1f} | "
              f"{fed:,.0f} |")
    print("\n### Layout (micro x accumulation per GPU) and lr per world size (ZeRO-2 bf16)\n")
    print(f"| recipe | batch | lr | {nodes_head} |")
    print("| --- " * (3 + len(NODES)) + "|")
    for name, _, _, recipe, *_ in rows:
        cells = []
        for nodes in NODES:
            try:
                plan = plan_batch(ds, recipe.train, 8 * nodes)
                cells.append(f"{plan.micro} x {plan.accumulation}")
            except ConfigError:
                cells.append("no layout")
        b = recipe.train.batch_size
        print(f"| {name} | {b} | {base_lr(recipe.train, b):.2g} | " + " | ".join(cells) + " |")
    print("\n### Step: compute / gradient traffic (ZeRO-2), share of the step spent computing\n")
    print(f"| recipe | {nodes_head} |")
    print("| --- " * (1 + len(NODES)) + "|")
    times = {}
    for name, _, data, recipe, p, _, fed in rows:
        cells = []
        for nodes in NODES:
            world = 8 * nodes
            plan = plan_batch(ds, recipe.train, world)
            compute = plan.global_batch / (world * fed)
            comm = traffic_bytes(2, p, world, plan.accumulation) / (link_gbs(world) * 1e9)
            step = max(compute, comm)
            epoch = SAMPLES[data] // plan.global_batch * step
            times[name, nodes] = (epoch, epoch * recipe.train.epochs)
            cells.append(f"{fmt_time(compute)} / {fmt_time(comm)}, {100 * compute / step:.0f} %")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n### Time per epoch and in total (the recipe's epochs)\n")
    print(f"| recipe | epochs | steps/epoch | {nodes_head} |")
    print("| --- " * (3 + len(NODES)) + "|")
    for name, _, data, recipe, *_ in rows:
        steps = SAMPLES[data] // recipe.train.batch_size
        cells = [f"{fmt_time(times[name, n][0])}, {fmt_time(times[name, n][1])}" for n in NODES]
        print(f"| {name} | {recipe.train.epochs} | {steps} | " + " | ".join(cells) + " |")
    print("\n### Gradient traffic per GPU per optimizer step, accumulation 1, 16 GPUs\n")
    print("| recipe | ZeRO stage | GB sent per GPU | on NVLink | on InfiniBand |")
    print("| --- | --- | --- | --- | --- |")
    for name, _, _, _, p, _, _ in rows:
        if "inat18" in name:
            continue
        for zero in (1, 2, 3):
            gb = traffic_bytes(zero, p, 16, 1) / 1e9
            print(f"| {name} | {zero} | {gb:.2f} | {fmt_time(gb / link_gbs(8))} | {fmt_time(gb / link_gbs(16))} |")


if __name__ == "__main__":
    main()
