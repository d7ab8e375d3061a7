"""Measure the precision DeepSpeed accumulates gradients in, for DeepSpeed JSON configs, in a real engine.

Usage: python tests/grad_accum_probe.py PORT OUT.json DS_CONFIG.json [...]  (one process, world size 1). It runs
where the environment says, as the trainer does (livt_ds.dist): on the GPU (nccl) when torch sees one and
DS_ACCELERATOR is not "cpu", else on the CPU (gloo).

Eight micro-batches are accumulated into one optimizer step of a bf16 model whose only parameter w [64] gets the
gradient dL/dw = c_i per micro-batch (after DeepSpeed's 1/8 loss scaling): c_0 = 1, c_1..4 = 2^-9, c_5..7 = 0, all
exact in bf16. Summed in fp32 that is 1 + 2^-7 = 1.0078125; summed in bf16 every addition of 2^-9 rounds back to 1.0
(half the bf16 spacing at 1.0 is 2^-8). The sum is itself a bf16 number because DeepSpeed all-reduces the
accumulated gradient in bf16 at the boundary (its default communication_data_type under bf16), which would round
1 + 7 * 2^-9. The gradient is read at the accumulation boundary, before the optimizer step, with
deepspeed.utils.safe_get_full_grad (the accumulation buffer, in its own dtype).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

ACCUMULATION = 8
GRADS = [1.0] + [2.0**-9] * 4 + [0.0] * 3  # dL/dw of each micro-batch
FP32_SUM = 1.0 + 2.0**-7  # what fp32 accumulation gives; bf16 accumulation gives 1.0


class OneWeight(nn.Module):
    """loss = sum(w) * c, so dL/dw = c everywhere; w [64]."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(64))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return (self.w * c).sum()


def probe(ds_path: str) -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from livt_ds.config import load_ds_config, load_recipe, resolve_ds_config
    from livt_ds.cuda_arch import set_plain_cuda_arch_list

    recipe = load_recipe(str(Path(__file__).resolve().parents[1] / "configs" / "tiny_mgp.yaml"),
                         ["train.micro_batch=1", f"train.batch_size={ACCUMULATION}"])
    ds = resolve_ds_config(load_ds_config(ds_path), recipe, world=1)
    assert ds["gradient_accumulation_steps"] == ACCUMULATION
    model = OneWeight()
    set_plain_cuda_arch_list()
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
    dtype = next(engine.module.parameters()).dtype
    for i, grad in enumerate(GRADS):
        c = torch.tensor(ACCUMULATION * grad, dtype=dtype, device=engine.device)
        engine.backward(engine(c))  # engine.backward divides by 8
        if i < ACCUMULATION - 1:
            engine.step()  # not a boundary: only counts the micro-step
    grad = safe_get_full_grad(engine.module.w)
    result = {"config": ds_path, "device": str(engine.device), "param_dtype": str(dtype),
              "optimizer": type(optimizer).__name__, "grad_dtype": str(grad.dtype),
              "grad": grad.float().flatten().tolist()}
    engine.step()
    engine.destroy()
    return result


def main(argv: list[str]) -> int:
    os.environ.setdefault("MASTER_PORT", argv[0])
    from livt_ds import dist

    dist.init_distributed()  # a world of one: nccl on the GPU, gloo on the CPU
    results = [probe(path) for path in argv[2:]]
    Path(argv[1]).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
