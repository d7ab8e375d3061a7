"""The console of a CPU run: no per-rank library warnings from starting DeepSpeed or from ZeRO's collectives."""

from __future__ import annotations

import re
import sys

import pytest

# Every line a 2-rank CPU launch (the deepspeed launcher users run) may print. Anything else (a library warning on
# every rank, a deprecation, a CUDA notice on a CPU run, a stray print) fails the test with the lines it found.
ALLOWED_STDOUT = [
    r"\[[\d\- :,]+\] \[INFO\] \[(runner|launch)\.py:\d+:main\] .*",  # the launcher: command, world, ranks, exit
    r"\[[\d\- :,]+\] \[WARNING\] \[runner\.py:\d+:fetch_hostfile\] Unable to find hostfile, will proceed with "
    r"training with local resources only\.",
    r"DeepSpeed deepspeed\.ops\.comm\.deepspeed_shm_comm_op built successfully",  # rank 0 only (dist.py)
    r"\[livt\] .*",
]
ALLOWED_STDERR = [
    r"\s*",
    r"(train|eval): +\d+%\|.*\| \d+/\d+ \[.*\]",  # rank 0's progress bar
]


def unexpected(text: str, allowed: list[str]) -> list[str]:
    patterns = [re.compile(p) for p in allowed]
    return [line for line in text.splitlines() if not any(p.fullmatch(line) for p in patterns)]


@pytest.mark.slow
@pytest.mark.parametrize("run", ["mgp", "bft"])
def test_a_two_rank_launch_prints_only_the_allowed_lines(pipeline_runs, run) -> None:
    """The shared pipeline runs' console (MGP; BFT loading the MGP weights, evaluating, saving the best): rank 0's
    lines and the launcher's, nothing from the libraries on any rank."""
    stdout = (pipeline_runs / f"{run}.stdout").read_text()
    stderr = (pipeline_runs / f"{run}.stderr").read_text()
    assert unexpected(stdout, ALLOWED_STDOUT) == [], stdout[-3000:]
    assert unexpected(stderr, ALLOWED_STDERR) == [], stderr[-3000:]
    assert sum(line.startswith("[livt] ") for line in stdout.splitlines()) >= 2
    assert stdout.count("exits successfully") == 2  # both ranks


def test_the_allow_list_catches_a_library_warning() -> None:
    warning = "/x/deepspeed/comm/torch.py:12: FutureWarning: `torch.distributed.reduce_op` is deprecated"
    assert unexpected(f"[livt] eval at step 3: top1 50\n{warning}\n", ALLOWED_STDOUT) == [warning]
    assert unexpected("train:  50%|#####     | 3/6 [00:04<00:08,  2.91s/step]\n[rank1]: warn\n",
                      ALLOWED_STDERR) == ["[rank1]: warn"]


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
