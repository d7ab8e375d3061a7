"""`livt {shard,pretrain,finetune,eval,export,predict,compare}` (also `python -m livt_ds ...`, under the
deepspeed launcher)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_DATA_OUTAGE = 4  # the run saved a checkpoint and stopped: resume once the data source is back


def default_ds_config() -> str:
    import torch

    name = "zero2_bf16.json" if torch.cuda.is_available() else "cpu_fp32.json"
    return str(REPO_ROOT / "ds_configs" / name)


def _run_args(parser: argparse.ArgumentParser, training: bool) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    parser.add_argument("--ds-config", default=None,
                        help="DeepSpeed JSON (ds_configs/*.json); default zero2_bf16 on GPU, cpu_fp32 on CPU")
    parser.add_argument("--output", required=True, help="run folder (config, logs, checkpoints, metrics)")
    if training:
        parser.add_argument("--resume", default="auto",
                            help="'auto' (continue from OUTPUT/checkpoints/latest if present), 'none', "
                                 "or a checkpoint path")
        parser.add_argument("--allow-recipe-change", action="store_true",
                            help="resume although the recipe changes what is trained (recorded in history.jsonl; "
                                 "with another train.epochs the lr follows the schedule planned for the new length)")
        parser.add_argument("--overwrite", action="store_true",
                            help="with --resume none: start over in a run folder that holds checkpoints, deleting "
                                 "its checkpoints, export, evaluations, metrics and logs first (history.jsonl stays)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. train.epochs=2 data.path=shards/x")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="livt",
                                     description="LiVT on DeepSpeed: MGP pretraining and Bal-BCE fine-tuning")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("shard", help="write WebDataset shards + meta.json (see scripts/make_shards.py --help)",
                   add_help=False)
    _run_args(sub.add_parser("pretrain", help="MGP: masked generative pretraining"), training=True)
    _run_args(sub.add_parser("finetune", help="BFT: balanced fine-tuning (model.init = an MGP run or export)"),
              training=True)
    evaluation = sub.add_parser("eval", help="evaluate a BFT run or export (model.init) on data.path")
    _run_args(evaluation, training=False)
    evaluation.add_argument("--split", default=None,
                            help="split of data.path to evaluate (default data.eval_split); 'test' reads the test "
                                 "split")
    sub.add_parser("compare", help="compare finished runs side by side, test numbers included (python -m "
                                    "livt_ds.compare --help)", add_help=False)
    export = sub.add_parser("export", help="consolidated fp32 weights of a run, loadable without DeepSpeed")
    export.add_argument("run", help="run folder (holding checkpoints/)")
    export.add_argument("--output", default=None, help="default RUN/export")
    export.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    predict = sub.add_parser("predict", help="named top-k predictions for images (files, folders, lists, shards)")
    predict.add_argument("--model", required=True,
                         help="a BFT run folder, an export folder (config.json + model.safetensors) or a weights file")
    predict.add_argument("--input", required=True, nargs="+",
                         help="image files, folders (recursive), text lists (one path per line), shard sets or .tar")
    predict.add_argument("--output", required=True, help="preds.jsonl or preds.csv")
    predict.add_argument("--top-k", type=int, default=5)
    predict.add_argument("--test-prior", default=None,
                         help="adjust for a test prior: uniform, forward-R, backward-R (e.g. forward-10) or a JSON "
                              "file {class name: weight}")
    predict.add_argument("--batch-size", type=int, default=64)
    predict.add_argument("--workers", type=int, default=None, help="DataLoader decode workers (default: up to 4)")
    predict.add_argument("--split", default="val", help="split of a shard-set input (default val)")
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def strip_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher inserts ``--local_rank=N`` before the sub-command; LOCAL_RANK carries the same."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    if argv[:1] == ["shard"]:
        from livt_ds.data.make_shards import main as shard_main

        return shard_main(argv[1:])
    if argv[:1] == ["compare"]:
        from livt_ds.compare import main as compare_main

        return compare_main(argv[1:])
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    unknown = [r for r in rest if r.startswith("-") or "=" not in r]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if rest:  # key=value overrides placed after options
        args.overrides = [*getattr(args, "overrides", []), *rest]
    from livt_ds.data.remote import DataSourceOutage
    from livt_ds.engine import NonFiniteLossError

    try:
        return _dispatch(args)
    except NonFiniteLossError as exc:
        print(f"livt {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_NONFINITE
    except DataSourceOutage as exc:
        print(f"livt {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_DATA_OUTAGE
    except Exception as exc:
        if not is_expected_error(exc):
            raise  # a bug: its traceback is what helps
        print(f"livt {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def is_expected_error(exc: BaseException) -> bool:
    """Errors of the user's input or setting, reported in one line (exit 2) rather than with a traceback: a bad
    recipe or checkpoint, a locked run folder, a missing file, a shard set that is wrong or cannot be read, missing
    storage credentials."""
    from livt_ds.checkpoint import CheckpointError
    from livt_ds.config import ConfigError
    from livt_ds.data.remote import ShardUnavailable, is_credentials_error
    from livt_ds.data.shards import ShardSetError
    from livt_ds.provenance import RunLockedError

    expected = (ConfigError, CheckpointError, RunLockedError, ShardSetError, ShardUnavailable, FileNotFoundError,
                ValueError)
    return isinstance(exc, expected) or is_credentials_error(exc)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "export":
        from livt_ds.weights import export

        for path in export(args.run, args.output, args.tag):
            print(f"wrote {path}")
        return 0
    if args.command == "predict":
        from livt_ds.predict import default_workers, run_predict

        workers = default_workers() if args.workers is None else args.workers
        done = run_predict(args.model, args.input, args.output, top_k=args.top_k, test_prior=args.test_prior,
                           batch_size=args.batch_size, num_workers=workers, split=args.split,
                           progress=not args.no_progress)
        print(f"wrote {done['images']} predictions and {done['errors']} unreadable-image lines to {done['output']}")
        return 0
    from livt_ds import dist
    from livt_ds.config import ConfigError, load_recipe

    if getattr(args, "overwrite", False) and args.resume != "none":
        raise ConfigError(f"--overwrite starts the run over: use it with --resume none (got --resume {args.resume})")
    recipe = load_recipe(args.config, args.overrides)  # fail on a bad recipe before any process group starts
    dist.init_distributed()
    try:
        return _run_distributed(args, recipe)
    finally:
        dist.shutdown()


def _run_distributed(args: argparse.Namespace, recipe) -> int:
    from livt_ds import dist

    ds_config = args.ds_config or default_ds_config()
    if args.command == "eval":
        from livt_ds.evaluate import run_eval

        metrics = run_eval(recipe, ds_config, args.output, split=args.split)
        if dist.is_main():
            from livt_ds.report import prior_table_text

            shown = {k: metrics[k] for k in ("split", "top1", "many", "medium", "few", "ece", "mce", "num_samples")}
            print(json.dumps(shown))
            loss = metrics["test_prior_loss"]
            print(f"expected top-1 (%) under other test priors (raw, and adjusted for the prior; loss {loss['name']}, "
                  f"tau {loss['tau']}):")
            print(prior_table_text(metrics["test_priors"]))
            print(f"wrote {Path(metrics['output']) / 'metrics.json'}")
        return 0
    from livt_ds.engine import Trainer

    stage = {"pretrain": "pretrain", "finetune": "finetune"}[args.command]
    Trainer(stage, recipe, ds_config, args.output, resume=args.resume,
            allow_recipe_change=args.allow_recipe_change, overwrite=args.overwrite).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
