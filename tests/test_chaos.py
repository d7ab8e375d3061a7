"""Chaos: a BFT run killed without warning (SIGKILL to its whole process group) at random moments, during training,
a checkpoint save and an evaluation, and resumed with ``--resume auto`` each time, ends exactly where the
uninterrupted run ends; shards damaged in the middle of training are skipped, counted, and the run finishes.

Only the CLI and run-folder files are used: ``status.json`` (the phase, to choose kill moments), ``checkpoints/``,
``metrics.jsonl`` and ``metrics.json``. Kill moments come from ``random.Random(LIVT_CHAOS_SEED)`` (default 0) and
are printed, with what each kill hit; run with ``-s`` to see them, set LIVT_CHAOS_SEED to try other moments.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, kill_group, launch_command, launcher_env, read_jsonl, run_livt, start_process, train_losses

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("serial")]  # timing-sensitive: never two at once

SEED = int(os.environ.get("LIVT_CHAOS_SEED", "0"))
# tiny_bft from scratch: 51 images / global batch 16 = 3 steps per epoch, 6 epochs = 18 steps; an evaluation at
# every epoch end (steps 3, 6, ...) and a checkpoint every 2 steps and after every evaluation.
EPOCHS, STEPS_PER_EPOCH = 6, 3
RECIPE = ["--config", "configs/tiny_bft.yaml", "--ds-config", "ds_configs/cpu_fp32.json", "model.init=",
          f"train.epochs={EPOCHS}", "checkpoint.every_steps=2", "log.every_steps=1", "eval.every=1",
          "log.progress=false"]
LAUNCH_TIMEOUT_S = 300  # one launch, start to end (about 20 s of start-up on 2 idle cores, a few s of training)


# ------------------------------------------------------------------------------------------------ helpers
def read_status(run: Path) -> dict | None:
    try:
        return json.loads((run / "status.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet (it is replaced atomically)
        return None


def latest_step(run: Path) -> int:
    latest = run / "checkpoints" / "latest"
    return int(latest.read_text().strip()[len("step"):]) if latest.is_file() else 0


def last_records(run: Path, key: str) -> dict[int, dict]:
    """Records holding ``key`` by step; the last occurrence wins (a resumed run appends the steps it redoes)."""
    return {r["step"]: r for r in read_jsonl(run / "metrics.jsonl") if key in r}


class Launch:
    """One ``livt finetune`` with its 2 ranks (conftest's fork launch: a launch process and the ranks forked from
    it, all in the group of the process the test starts), in a process group of its own so that the launch, the
    ranks and their DataLoader workers can be killed together, as a crashing node or the OOM killer would. (Not
    torchrun: it starts each rank in a session of its own, so a kill of its group leaves the ranks running.)"""

    def __init__(self, run: Path, shards: Path, log: Path, recipe: list[str] = RECIPE):
        cmd = [*launch_command(2), "finetune", *recipe, "--output", str(run), f"data.path={shards}",
               "--resume", "auto"]
        self.run, self.log = run, log
        self.started = time.time()
        with open(log, "w") as sink:  # a file, not a pipe: nobody reads while we wait, a full pipe would block
            self.proc = start_process(cmd, cwd=REPO, env=launcher_env(), stdout=sink, stderr=subprocess.STDOUT)

    def status(self) -> dict | None:
        """This launch's status.json (None until rank 0 of this launch has written one)."""
        status = read_status(self.run)
        return status if status and status["time"] >= self.started else None

    def wait(self, want, timeout: float = LAUNCH_TIMEOUT_S):
        """Poll every 2 ms until ``want()`` is truthy and return it; None when the launch ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = want()
            if found:
                return found
            if self.proc.poll() is not None:
                return None
            time.sleep(0.002)
        raise AssertionError(f"the kill moment did not come within {timeout} s\n{self.tail()}")

    def kill(self) -> None:
        kill_group(self.proc)

    def finish(self) -> int:
        try:
            return self.proc.wait(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the run did not end within {LAUNCH_TIMEOUT_S} s\n{self.tail()}") from None

    def tail(self, n: int = 6000) -> str:
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        return "\n".join(line for line in text.splitlines() if "rank1]" not in line)[-n:]


def tag_files(tag_dir: Path) -> set[str]:
    return {p.name for p in tag_dir.iterdir()}


def check_latest_is_complete(run: Path, reference_files: set[str]) -> str | None:
    """``latest`` (if any) names a tag folder with every rank's files, each of them loadable."""
    latest = run / "checkpoints" / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    tag_dir = run / "checkpoints" / tag
    assert tag_dir.is_dir(), f"latest names {tag}, which does not exist"
    assert tag_files(tag_dir) == reference_files, f"{tag}: {sorted(tag_files(tag_dir))} != {sorted(reference_files)}"
    for path in tag_dir.iterdir():
        if path.suffix == ".pt":
            torch.load(path, map_location="cpu", weights_only=False)  # a partly written file does not load
    return tag


def appended_steps(run: Path, lines_before: int) -> list[int]:
    """Training steps a launch logged (the records after the first ``lines_before`` lines of metrics.jsonl)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()][lines_before:]
    return [r["step"] for r in map(json.loads, lines) if "loss" in r]


def jsonl_lines(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len([line for line in path.read_text().splitlines() if line.strip()]) if path.is_file() else 0


# ------------------------------------------------------------------------------------------------ kill -9
@pytest.fixture(scope="module")
def reference(toy_shards, tmp_path_factory) -> Path:
    """The same recipe, never interrupted."""
    run = tmp_path_factory.mktemp("chaos") / "reference"
    run_livt(["finetune", *RECIPE, "--output", str(run), f"data.path={toy_shards}"])
    return run


def kill_at(launch: Launch, kind: str, step: int, rng: random.Random, lines_before: int) -> dict | None:
    """Kill ``launch`` inside its first save / evaluation at or after ``step`` (kind "save" / "eval"), or at a
    random moment (up to 50 ms) after it logged ``step`` (kind "any"); say what the kill hit. None when the launch
    ended before the moment came."""
    if kind == "any":
        target = None
        if not launch.wait(lambda: any(s >= step for s in appended_steps(launch.run, lines_before))):
            return None
        delay = rng.uniform(0.0, 0.05)  # a step takes ~0.1 s on 2 quiet cores: the run must not end first
    else:
        target = launch.wait(lambda: (s := launch.status()) and s["phase"] == kind and s["step"] >= step and s)
        if target is None:
            return None
        tag_dir = launch.run / "checkpoints" / f"step{target['step']:08d}"
        if kind == "save":  # inside the writing: once the tag folder exists (or the save has ended)
            launch.wait(lambda: tag_dir.is_dir() or launch.status() != target)
        delay = rng.uniform(0.0, 0.01 if kind == "save" else 0.05)  # saves take ~0.1 s, evaluations ~0.1-3 s
    time.sleep(delay)
    if launch.proc.poll() is not None:
        return None
    launch.kill()
    after = read_status(launch.run) or {}
    hit = target is not None and (after.get("phase"), after.get("step")) == (target["phase"], target["step"])
    hit = hit and (kind != "save" or tag_dir.is_dir())  # a save hit: killed after its files began to appear
    latest = latest_step(launch.run)
    left = sorted(p.name for p in (launch.run / "checkpoints").glob("step*") if int(p.name[4:]) > latest) \
        if (launch.run / "checkpoints").is_dir() else []
    return {"kind": kind, "at_step": step, "delay_s": round(delay, 4),
            "killed_in": f"{after.get('phase')}@{after.get('step')}", "hit": hit, "unnamed_tags_left": left}


def test_sigkill_at_random_moments_and_resume_match_the_uninterrupted_run(reference, toy_shards, tmp_path):
    rng = random.Random(SEED)
    run = tmp_path / "chaos"
    total = EPOCHS * STEPS_PER_EPOCH
    reference_files = tag_files(reference / "checkpoints" / (reference / "checkpoints" / "latest").read_text().strip())
    assert {"mp_rank_00_model_states.pt"} < reference_files and len(reference_files) >= 3  # + one shard per rank
    # five kills spread over the run (steps 1..15, so the run never ends before its last kill): one inside a
    # checkpoint save, one inside an evaluation, two at random moments, one more of any of these
    kinds = ["save", "eval", rng.choice(["save", "eval", "any"]), "any", "any"]
    rng.shuffle(kinds)
    plan = list(zip(kinds, sorted(rng.sample(range(1, 16), len(kinds)))))
    print(f"chaos seed {SEED}: plan {plan}", flush=True)
    kills: list[dict] = []
    launch = None
    try:
        while plan and len(kills) < 9:
            resumed_at, lines_before = latest_step(run), jsonl_lines(run)
            launch = Launch(run, toy_shards, tmp_path / f"launch{len(kills)}.log")
            kind, step = plan.pop(0)
            kill = kill_at(launch, kind, max(step, resumed_at + 1), rng, lines_before)
            assert kill is not None, f"the run ended before kill {len(kills) + 1} ({kind} at step {step})\n" \
                                     f"{launch.tail()}"
            kill["latest"] = check_latest_is_complete(run, reference_files)
            steps = appended_steps(run, lines_before)
            # --resume auto continued from 'latest': the first step this launch logged follows it, none is skipped
            assert steps == list(range(resumed_at + 1, resumed_at + 1 + len(steps))), (kill, resumed_at, steps)
            kills.append(kill)
            print(f"chaos seed {SEED} kill {len(kills)} (resumed at step {resumed_at}): {kill}", flush=True)
            missing = {"save", "eval"} - {k["kind"] for k in kills if k["hit"]}
            if not plan and missing:  # the kill came after the save/evaluation had ended: once more, right away
                plan = [(kind, latest_step(run) + 1) for kind in sorted(missing)]
        resumed_at, lines_before = latest_step(run), jsonl_lines(run)
        launch = Launch(run, toy_shards, tmp_path / "final.log")
        assert launch.finish() == 0, launch.tail()
        assert appended_steps(run, lines_before) == list(range(resumed_at + 1, total + 1))
    finally:
        if launch is not None and launch.proc.poll() is None:
            launch.kill()
    assert len(kills) >= 5, kills
    assert {"save", "eval"} <= {k["kind"] for k in kills if k["hit"]}, kills  # killed inside a save and an eval
    assert read_status(run)["phase"] == "finished"
    assert check_latest_is_complete(run, reference_files) == f"step{total:08d}"
    expected = train_losses(reference)
    assert sorted(expected) == list(range(1, total + 1))
    losses = {step: r["loss"] for step, r in last_records(run, "loss").items()}
    assert losses == expected  # bit for bit: CPU fp32 resume is exact
    evals = last_records(run, "eval/top1")
    assert evals == last_records(reference, "eval/top1") and sorted(evals) == list(range(3, total + 1, 3))
    assert json.loads((run / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())


# ------------------------------------------------------------------------------------------------ bad shards
def test_shards_damaged_during_training_are_skipped_and_counted(toy_shards, tmp_path):
    """Once training runs, one training shard is cut short (in place, as a copy that stopped) and another is
    replaced by random bytes under the same name; the next epochs read them: the run finishes every step, and
    every read of a damaged shard is counted as a skipped shard and a skipped sample (sums over the ranks since
    each rank started; a training stream reads each shard many times per epoch)."""
    shards = tmp_path / "shards"
    shutil.copytree(toy_shards, shards)  # never the shared fixture files
    run = tmp_path / "run"
    # all EPOCHS epochs: a busy machine may log several steps before this process gets to damage the files, and the
    # epochs after the damage must still read them
    steps = EPOCHS * STEPS_PER_EPOCH
    recipe = [*RECIPE[:RECIPE.index(f"train.epochs={EPOCHS}") + 1], "eval.every=0", "checkpoint.every_steps=0",
              "log.every_steps=1", "log.progress=false",
              "data.num_workers=1"]  # a loader worker reads the damaged shards: its skips count too
    launch = Launch(run, shards, tmp_path / "launch.log", recipe)
    try:
        assert launch.wait(lambda: appended_steps(run, 0)), launch.tail()  # step 1 logged: epoch 0 is reading
        truncated, garbage = shards / "train-000001.tar", shards / "train-000002.tar"
        os.truncate(truncated, truncated.stat().st_size // 2 + 100)  # mid-file, not on a 512-byte tar block
        tmp = shards / "garbage.tmp"
        tmp.write_bytes(random.Random(SEED).randbytes(garbage.stat().st_size))
        os.replace(tmp, garbage)
        damaged_after = max(appended_steps(run, 0))  # the last step logged before the damage
        assert launch.finish() == 0, launch.tail()
    finally:
        if launch.proc.poll() is None:
            launch.kill()
    records = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) for r in records)
    assert read_status(run)["phase"] == "finished"
    samples = [r["data/skipped_samples"] for r in records]
    shard_reads = [r["data/skipped_shards"] for r in records]
    print(f"damaged after step {damaged_after}; skipped samples {samples}, skipped shards {shard_reads}")
    assert samples[0] == 0 and shard_reads[0] == 0  # logged before the damage
    assert samples == sorted(samples) and shard_reads == sorted(shard_reads)  # counts only grow
    assert all(s >= r for s, r in zip(samples, shard_reads))  # a skipped shard read is a skipped sample too
    next_epoch = (damaged_after // STEPS_PER_EPOCH + 1) * STEPS_PER_EPOCH  # its loader reads the damaged files
    assert next_epoch < steps, f"the damage came after step {damaged_after}: too late to be read (machine too busy?)"
    assert all(r > 0 for r in shard_reads[next_epoch:])

    # the totals are the run's, not the launch's: a resume carries them on. With the shards repaired, the resumed
    # epoch adds nothing, so each of its records holds exactly the totals saved in the checkpoint it resumed from
    for name in ("train-000001.tar", "train-000002.tar"):
        shutil.copy(toy_shards / name, shards / name)
    latest = (run / "checkpoints" / "latest").read_text().strip()
    saved = json.loads((run / "checkpoints" / latest / "train_state.json").read_text())["skipped"]
    assert saved["shards"] >= shard_reads[-1] > 0 and saved["samples"] >= samples[-1] > 0
    at = recipe.index(f"train.epochs={EPOCHS}")
    run_livt(["finetune", *recipe[:at], f"train.epochs={EPOCHS + 1}", *recipe[at + 1:], "--output", str(run),
              f"data.path={shards}", "--allow-recipe-change"])
    resumed = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r and r["step"] > steps]
    assert [r["step"] for r in resumed] == [steps + 1, steps + 2, steps + 3]
    assert all(r["data/skipped_shards"] == saved["shards"] and r["data/skipped_samples"] == saved["samples"]
               for r in resumed), (saved, resumed)
