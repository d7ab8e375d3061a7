#!/usr/bin/env python
"""Training-step benchmark: the trainer's DeepSpeed engine against plain eager PyTorch loops, in one process.

What is measured and how: ``livt_ds.bench`` (settings, runners, timing, matrix). Prints one JSON document on stdout;
``--json-out`` also gets it, rewritten atomically after every finished entry (``"complete": false`` until the
end), so a run cut short keeps what finished. A table and all logs go to stderr.

    python scripts/bench_train.py                                  # GPU: ViT-L, pretrain and finetune, everything
    python scripts/bench_train.py --model vit_base --shards shards/imagenet_lt --workers 14
    python scripts/bench_train.py --stages none --zero-stages 1,2,3,2offload
    DS_ACCELERATOR=cpu python scripts/bench_train.py --device cpu  # the tiny recipes at 32 px, a few steps
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a checkout without installing the package

from livt_ds.bench import matrix  # noqa: E402
from livt_ds.bench.settings import (  # noqa: E402
    ADAM_VARIANTS,
    EAGER_VARIANTS,
    PEAK_TFLOPS,
    BenchOptions,
    choose_device,
    resolve_settings,
)
from livt_ds.bench.table import failed, table  # noqa: E402
from livt_ds.errors import ConfigError  # noqa: E402
from livt_ds.models.registry import MODEL_SIZES  # noqa: E402
from livt_ds.run_files import write_json_atomic  # noqa: E402


def names(text: str) -> list[str]:
    """A comma list; 'none' (or nothing) is the empty list."""
    return [t.strip() for t in text.split(",") if t.strip() and t.strip() != "none"]


def ints(count: int, sep: str, example: str):
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.lower().split(sep))
        except ValueError:
            values = ()
        if len(values) != count:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {example}")
        return values
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="cpu (or no CUDA): the tiny recipes (vit_test at 32 px), their micro-batches, a few steps")
    p.add_argument("--model", choices=list(MODEL_SIZES),
                   help="[GPU: vit_large, from configs/{mgp,bft}_MODEL_imagenet_lt.yaml (the ViT-L ones for sizes "
                        "without recipes); CPU: configs/tiny_{mgp,bft}.yaml]")
    p.add_argument("--img-size", type=int, help="[the pretraining recipe's]")
    p.add_argument("--patch-size", type=int, help="[the pretraining recipe's]")
    p.add_argument("--decoder", type=ints(3, ",", "DIM,DEPTH,HEADS, e.g. 256,4,8"),
                   help="MAE decoder DIM,DEPTH,HEADS of pretraining [the pretraining recipe's]")
    p.add_argument("--stages", type=names, default="pretrain,finetune",
                   help="comma list of pretrain,finetune, or 'none' [pretrain,finetune]")
    p.add_argument("--paths", type=names, default="project,baseline",
                   help="comma list of project (the engine), baseline (eager loops) [both]")
    p.add_argument("--input", choices=("synthetic", "shards", "both"), default="both", help="[both]")
    p.add_argument("--shards", type=Path, help="shard set folder (make_shards); default: generate one in a temp folder")
    p.add_argument("--gen-images", type=int, help="images of the generated shard set [2048 on GPU, 32 on CPU]")
    p.add_argument("--gen-size", type=ints(2, "x", "WxH, e.g. 500x375"),
                   help="WxH of the generated JPEGs [500x375 on GPU, 40x36 on CPU]")
    p.add_argument("--gen-classes", type=int, help="classes of the generated set [100 on GPU, 4 on CPU]")
    p.add_argument("--workers", type=int,
                   help="train_loader worker processes [min(14, cores - 2) on GPU, the recipe's on CPU]")
    p.add_argument("--pretrain-batch", type=int, help="pretraining micro-batch [the recipe's train.micro_batch]")
    p.add_argument("--finetune-batch", type=int, help="fine-tuning micro-batch, even with soft targets [the recipe's]")
    p.add_argument("--finetune-targets", choices=("soft", "hard"), default="soft",
                   help="soft: the recipe's mixup / cutmix / label smoothing; hard: int labels, all three off [soft]")
    p.add_argument("--num-classes", type=int, default=1000,
                   help="fine-tuning classes when there is no shard set (synthetic only) [1000]")
    p.add_argument("--steps", type=int, help="timed steps [30 on GPU, 3 on CPU]")
    p.add_argument("--warmup", type=int, help="untimed steps first [8 on GPU, 1 on CPU]")
    p.add_argument("--ds-config", type=Path,
                   help="DeepSpeed JSON [ds_configs/zero2_bf16.json on GPU, cpu_fp32.json on CPU]")
    p.add_argument("--ds-adam", type=names, default="config",
                   help=f"comma list of engine optimizers to time: {', '.join(ADAM_VARIANTS)} [config]")
    p.add_argument("--eager", type=names, default=",".join(EAGER_VARIANTS),
                   help="comma list of eager loops: amp-fused (fp32 weights, bf16 autocast, fused AdamW), "
                        "pure-foreach (weights in the engine's dtype, foreach AdamW) [both]")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile both paths (engine.compile() / model.compile())")
    p.add_argument("--zero-stages", type=names, default="",
                   help="memory sweep of the pretraining model, e.g. 1,2,3,2offload (GPU only)")
    p.add_argument("--zero-batch", type=int, help="micro-batch of the ZeRO sweep [the pretraining batch]")
    p.add_argument("--zero-steps", type=int, default=5, help="timed steps per ZeRO config [5]")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS, help="dense bf16 peak for the share [989]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json-out", type=Path, help="also write the JSON document here (after every entry)")
    return p


def options(args: argparse.Namespace) -> BenchOptions:
    return BenchOptions(
        model=args.model, img_size=args.img_size, patch_size=args.patch_size, decoder=args.decoder,
        stages=args.stages, paths=args.paths, inputs=["synthetic", "shards"] if args.input == "both" else [args.input],
        shards=args.shards, gen_images=args.gen_images, gen_size=args.gen_size, gen_classes=args.gen_classes,
        workers=args.workers, pretrain_batch=args.pretrain_batch, finetune_batch=args.finetune_batch,
        finetune_targets=args.finetune_targets,
        num_classes=args.num_classes, steps=args.steps, warmup=args.warmup, ds_config=args.ds_config,
        ds_adam=args.ds_adam, eager=args.eager, compile=args.compile, zero_stages=args.zero_stages,
        zero_batch=args.zero_batch, zero_steps=args.zero_steps, peak_tflops=args.peak_tflops, seed=args.seed,
    )


def log(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Parse, run, print the JSON document on the real stdout (everything else goes to stderr)."""
    args = build_parser().parse_args(argv)
    try:
        settings = resolve_settings(options(args), choose_device(args.device))
    except ConfigError as exn:
        print(f"bench_train: {exn}", file=sys.stderr)
        return 2
    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    json_fd = os.dup(1)
    os.dup2(2, 1)  # DeepSpeed logs and make_shards print to stdout: keep stdout for the JSON document only

    def save(doc: dict) -> None:
        if args.json_out is not None:
            write_json_atomic(args.json_out, doc)

    try:
        doc = matrix.run(settings, log, on_update=save)
    except KeyboardInterrupt:
        log(f"interrupted; what finished is in {args.json_out}" if args.json_out else "interrupted")
        return 130
    finally:
        sys.stdout.flush()
    print(table(doc), file=sys.stderr, flush=True)
    with os.fdopen(json_fd, "w") as out:
        out.write(json.dumps(doc, indent=2) + "\n")
    return 1 if failed(doc) else 0


if __name__ == "__main__":
    raise SystemExit(main())
