"""DeepSpeed's universal-checkpoint conversion, with nothing unpickled beyond weights.

``deepspeed.checkpoint.ds_to_universal`` reads every file of a tag (model states, each optimizer shard) with
``torch.load(weights_only=False)``: a crafted file would run code. `checkpoint.to_universal` therefore runs this
module instead (``python -m livt_ds.universal ARGS``, same arguments): it installs livt's weights-only loader
(livt_ds/safe_load.py) in its process, then runs ds_to_universal there with one extract and one merge worker, so
every file is read in that process, through that loader. Its environment also sets
``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, so a process it might start would refuse a pickle rather than run it.
A refused file ends the conversion with exit code `EXIT_REFUSED` and one line on stderr naming the file.
"""

from __future__ import annotations

import os
import sys

EXIT_REFUSED = 3


def environment() -> dict[str, str]:
    """The converter's environment: this one, with this copy of livt_ds importable first and weights-only loading
    forced for any process the converter might start."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"}


def command(input_folder: str | os.PathLike, output_folder: str | os.PathLike) -> list[str]:
    """The command line that converts ``input_folder`` (a tag folder) into ``output_folder``."""
    return [sys.executable, "-m", "livt_ds.universal", "--input_folder", os.fspath(input_folder),
            "--output_folder", os.fspath(output_folder), "--inject_missing_state", "--num_extract_workers", "1",
            "--num_merge_workers", "1"]


def main(argv: list[str] | None = None) -> int:
    from livt_ds.safe_load import UnsafeWeightsError, install_weights_only_loading

    install_weights_only_loading()  # before DeepSpeed's converter is even imported
    from deepspeed.checkpoint import ds_to_universal

    sys.argv = ["ds_to_universal", *(sys.argv[1:] if argv is None else argv)]
    args = ds_to_universal.parse_arguments()
    args.num_extract_workers = args.num_merge_workers = 1  # every file is read in this process
    try:
        ds_to_universal.main(args)
    except Exception as exc:  # noqa: BLE001 - a refusal may arrive wrapped by the converter
        refused = exc
        while refused is not None and not isinstance(refused, UnsafeWeightsError):
            refused = refused.__cause__ or refused.__context__
        if refused is None:
            raise
        print(refused, file=sys.stderr)
        return EXIT_REFUSED
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
