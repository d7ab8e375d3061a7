"""Build the DeepSpeed JIT ops that CPU runs load (shared-memory comm, CPU Adam) into TORCH_EXTENSIONS_DIR once,
both at the same time, so that no training launch pays for a build (about 40 s and 70 s on 2 cores).

Usage: DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=.venv/torch_extensions python scripts/build_ds_ops.py
"""

from __future__ import annotations

import subprocess
import sys

OPS = ("ShareMemCommBuilder", "CPUAdamBuilder")


def build(name: str) -> None:
    from deepspeed.accelerator import get_accelerator

    get_accelerator().create_op_builder(name).load(verbose=False)


def main(argv: list[str]) -> int:
    if argv:
        build(argv[0])
        return 0
    procs = [subprocess.Popen([sys.executable, __file__, name]) for name in OPS]
    return max(proc.wait() for proc in procs)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
