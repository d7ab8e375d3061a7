"""The commands the README names besides training: `livt shard`, scripts/bench_data.py, and
scripts/launch_multinode.sh (a dry run: the deepspeed command it builds, with `deepspeed` replaced on PATH)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import RENDEZVOUS_VARS, make_image_folder, run_process

from livt_ds.cli import main as livt_main
from livt_ds.data.make_shards import main as make_shards_main

REPO = Path(__file__).resolve().parents[1]


def test_livt_shard_is_make_shards(tmp_path):
    raw = make_image_folder(tmp_path / "raw", train_counts=(6, 3), val_per_class=2)
    args = ["--source", "imagefolder", "--input", str(raw), "--shard-size", "4", "--workers", "1", "--no-progress"]
    assert livt_main(["shard", *args, "--output", str(tmp_path / "a")]) == 0
    assert make_shards_main([*args, "--output", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / x / "meta.json").read_text()) for x in "ab")
    assert a["class_counts"] == [6, 3] and a["splits"]["val"]["class_counts"] == [2, 2]
    differ = {k for k in a if a[k] != b[k]}
    assert differ <= {"created", "command", "name"}
    tars = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert tars == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "val-000000.tar"]
    for name in tars:  # the same samples in the same order
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert livt_main(["shard", "--verify", str(tmp_path / "a"), "--no-progress", "--workers", "1"]) == 0


def script_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_bench_data_runs_and_reports_both_pipelines():
    cmd = [sys.executable, "scripts/bench_data.py", "--num-images", "24", "--workers", "0", "--batch-size", "4",
           "--img-size", "32", "--batches", "2", "--warmup", "1", "--repeats", "1"]
    result = run_process(cmd, cwd=REPO, env=script_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["images"] == 24 and report["timed_batches"] == 2 and report["img_size"] == 32
    assert set(report["results"]) == {"pretrain", "finetune"}
    for name, r in report["results"].items():
        stream, folder = r["webdataset_stream"]["img_s"], r["imagefolder"]["img_s"]
        assert stream > 0 and folder > 0, name
        assert r["ratio"] == round(stream / folder, 3)
        http = r["webdataset_stream_http_localhost"]["img_s"]  # the same shards served over HTTP on localhost
        assert http > 0 and r["http_over_local"] == round(http / stream, 3)
        # the same batches, image for image, whether the stream reads the folder or HTTP
        assert r["webdataset_stream_http_localhost"]["checksum"] == r["webdataset_stream"]["checksum"], name
        assert r["imagefolder"]["checksum"] != r["webdataset_stream"]["checksum"], name  # it does tell apart
        assert r["all_img_s"] == {"webdataset_stream": [stream], "imagefolder": [folder],
                                  "webdataset_stream_http_localhost": [http]}


def dry_run(tmp_path: Path, *args: str, script: str = "launch_multinode.sh", cwd: Path = REPO,
            fake: str = "deepspeed", **env_vars: str) -> subprocess.CompletedProcess:
    """Run a launch script with a ``fake`` command on PATH that records its arguments (one per line) and the
    network variables the ranks would get."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    (bindir / fake).write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n'
                               'env | grep -E "^(NCCL|GLOO)_" | sort > "$ARGS_OUT.env" || true\n')
    (bindir / fake).chmod(0o755)
    env = {**script_env(), "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "ARGS_OUT": str(tmp_path / "args"),
           **env_vars}
    return subprocess.run(["bash", str(REPO / "scripts" / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def recorded(tmp_path: Path) -> list[str]:
    return (tmp_path / "args").read_text().splitlines()


def test_launch_multinode_builds_the_deepspeed_commands(tmp_path):
    livt = ["--module", "livt_ds", "pretrain", "--config", "configs/mgp_vit_large_imagenet_lt.yaml", "--ds-config",
            "ds_configs/zero2_bf16.json", "--output", "runs/mgp_vit_large_imagenet_lt"]
    assert dry_run(tmp_path, "ssh", "train.epochs=2").returncode == 0
    assert recorded(tmp_path) == ["--hostfile", "scripts/hostfile.example", "--num_nodes", "2", "--num_gpus", "8",
                                  "--master_port", "29500", *livt, "train.epochs=2"]
    result = dry_run(tmp_path, "per-node", NODE_RANK="1", MASTER_ADDR="node-a", GPUS="4", STAGE="finetune",
                     CONFIG="configs/bft_vit_base_inat18.yaml", OUTPUT="runs/x")
    assert result.returncode == 0, result.stderr
    assert recorded(tmp_path) == ["--hostfile", "scripts/hostfile.example", "--num_nodes", "2", "--num_gpus", "4",
                                  "--no_ssh", "--node_rank", "1", "--master_addr", "node-a", "--master_port", "29500",
                                  "--module", "livt_ds", "finetune", "--config", "configs/bft_vit_base_inat18.yaml",
                                  "--ds-config", "ds_configs/zero2_bf16.json", "--output", "runs/x"]
    missing = dry_run(tmp_path, "per-node", MASTER_ADDR="node-a")
    assert missing.returncode != 0 and "NODE_RANK" in missing.stderr
    bad = dry_run(tmp_path, "scp")
    assert bad.returncode == 2 and "usage" in bad.stderr
    lines = (REPO / "scripts" / "hostfile.example").read_text().splitlines()
    hosts = [line.split() for line in lines if line.strip() and not line.startswith("#")]
    assert hosts == [["node-a", "slots=8"], ["node-b", "slots=8"]]  # two nodes of 8 GPUs: --num_nodes 2, GPUS=8


def test_deepspeed_env_is_checked_and_exported_per_node(tmp_path):
    """./.deepspeed_env: the ssh launcher forwards its lines; per-node mode exports them itself; a line the deepspeed
    launcher cannot split (blank, comment) is refused with its line number."""
    work = tmp_path / "work"
    work.mkdir()
    (work / ".deepspeed_env").write_text((REPO / "scripts" / "deepspeed_env.example").read_text())
    assert dry_run(tmp_path, "per-node", cwd=work, NODE_RANK="1", MASTER_ADDR="node-a").returncode == 0
    assert (tmp_path / "args.env").read_text().splitlines() == ["GLOO_SOCKET_IFNAME=ib0", "NCCL_IB_HCA=mlx5",
                                                                "NCCL_SOCKET_IFNAME=ib0"]
    (work / ".deepspeed_env").write_text("NCCL_SOCKET_IFNAME=ib0\n# the fabric\nGLOO_SOCKET_IFNAME=ib0\n")
    bad = dry_run(tmp_path, "ssh", cwd=work)
    assert bad.returncode == 2 and ".deepspeed_env:2: expected KEY=VALUE" in bad.stderr


def test_sbatch_example_starts_one_task_per_gpu_with_srun(tmp_path):
    script = (REPO / "scripts" / "slurm_train.sbatch").read_text()
    for option in ("--ntasks-per-node=8", "--gpus-per-node=8", "--signal=TERM@"):
        assert f"#SBATCH {option}" in script, option
    result = dry_run(tmp_path, "train.epochs=2", script="slurm_train.sbatch", fake="srun", OUTPUT="/shared/runs/x",
                     STAGE="finetune", CONFIG="configs/bft_vit_base_inat18.yaml")
    assert result.returncode == 0, result.stderr
    assert recorded(tmp_path) == ["--kill-on-bad-exit=1", "python", "-m", "livt_ds", "finetune", "--config",
                                  "configs/bft_vit_base_inat18.yaml", "--ds-config", "ds_configs/zero2_bf16.json",
                                  "--output", "/shared/runs/x", "train.epochs=2"]
    missing = dry_run(tmp_path, script="slurm_train.sbatch", fake="srun")
    assert missing.returncode != 0 and "OUTPUT" in missing.stderr


def test_scaling_doc_holds_the_tables_the_model_prints():
    """docs/scaling.md's tables are scripts/scaling_model.py's output on today's recipes (regenerate on change)."""
    result = subprocess.run([sys.executable, "scripts/scaling_model.py"], cwd=REPO, env=script_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| mgp_vit_large_imagenet_lt | 4096 | 0.0024 | 128 x 4 | 128 x 2 | 128 x 1 |" in result.stdout
    assert result.stdout.strip() in (REPO / "docs" / "scaling.md").read_text()
