"""The console of a CPU run: no per-rank library warnings from starting DeepSpeed or from ZeRO's collectives."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

_PROBE = textwrap.dedent(
    """
    import warnings
    warnings.simplefilter("default")  # show FutureWarning/DeprecationWarning as a fresh process would
    import torch
    from livt_ds import dist
    dist.init_distributed()
    from deepspeed import comm
    out, x = torch.zeros(4), torch.arange(4.0)
    comm.all_gather_into_tensor(out, x)  # what ZeRO-1/2 calls to gather the updated parameters
    red = torch.zeros(4)
    comm.reduce_scatter_tensor(red, x)
    assert torch.equal(out, x) and torch.equal(red, x), (out, red)
    print("gathered", out.tolist())
    """
)


@pytest.mark.slow  # starts DeepSpeed in a fresh process (tens of seconds)
def test_cpu_start_and_collectives_print_no_library_warnings(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        env.pop(key, None)  # a world of one process on a free port
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gathered [0.0, 1.0, 2.0, 3.0]" in done.stdout
    console = done.stdout + done.stderr
    assert "No CUDA runtime is found" not in console  # torch warns so only where nvcc or CUDA_HOME exists
    assert "deprecated" not in console and "FutureWarning" not in console, console[-3000:]


def test_held_output_drops_chatter_and_keeps_it_for_errors(capsys) -> None:
    from livt_ds.console import held_output

    with held_output():
        print("Processing zero checkpoint")
        print("Loading checkpoint shards: 100%", file=sys.stderr)
    assert capsys.readouterr() == ("", "")
    with pytest.raises(RuntimeError, match="broken"), held_output():
        print("Parsing checkpoint")
        raise RuntimeError("broken")
    assert "Parsing checkpoint" in capsys.readouterr().err
