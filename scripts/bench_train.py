#!/usr/bin/env python
"""Training-step benchmark: the project's DeepSpeed engine against a plain-PyTorch loop, in one process.

The command line of ``livt_ds.bench`` (what is measured and how: its docstring). Prints one JSON document on
stdout (and ``--json-out``); a table and all logs go to stderr.

    python scripts/bench_train.py                                  # H100: vit_large, everything (~3-4 min)
    python scripts/bench_train.py --model vit_base --shards shards/imagenet_lt --workers 14
    python scripts/bench_train.py --stages none --zero-stages 1,2,3,2offload
    DS_ACCELERATOR=cpu python scripts/bench_train.py --device cpu  # the tiny recipes at 32 px, a few steps
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a checkout without installing the package

from livt_ds import bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse, run, print the JSON document on the real stdout (everything else goes to stderr)."""
    args = bench.build_parser().parse_args(argv)
    cuda = bench.choose_device(args.device)
    settings = bench.resolve_settings(args, cuda)
    sys.stdout.flush()
    json_fd = os.dup(1)
    os.dup2(2, 1)  # DeepSpeed logs and make_shards print to stdout: keep stdout for the JSON document only

    def log(text: str) -> None:
        print(f"[bench] {text}", file=sys.stderr, flush=True)

    try:
        doc = bench.run(settings, log)
    finally:
        sys.stdout.flush()
    text = json.dumps(doc, indent=2)
    if settings.json_out is not None:
        settings.json_out.parent.mkdir(parents=True, exist_ok=True)
        settings.json_out.write_text(text + "\n")
    print(bench.table(doc["results"], doc["zero_stages"] if isinstance(doc["zero_stages"], list) else None),
          file=sys.stderr, flush=True)
    with os.fdopen(json_fd, "w") as out:
        out.write(text + "\n")
    return 1 if bench.failed(doc) else 0


if __name__ == "__main__":
    raise SystemExit(main())
