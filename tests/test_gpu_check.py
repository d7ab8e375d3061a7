"""scripts/gpu_check.sh on a machine without a GPU: its help, its plan, its argument errors, and the summary it
writes from phase results (the real run needs CUDA: the `gpu` test at the end)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"


def gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, cwd=REPO)


def test_help_names_the_phases_and_options():
    result = gpu_check("--help")
    assert result.returncode == 0, result.stderr
    for word in ("e2e", "bench", "memory", "--out", "--phases", "--dry-run", ".whl/"):
        assert word in result.stdout, word


def test_dry_run_prints_every_phase_command_without_a_gpu(tmp_path):
    result = gpu_check("--dry-run", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(",")[0].lstrip("[") for line in lines] == [
        "e2e", "bench_vit_large", "bench_vit_base", "memory_vit_large", "memory_vit_huge"]
    assert "LIVT_TEST_DEVICE=cuda" in lines[0] and "tests/test_bf16_configs.py" in lines[0]
    assert "--zero-stages 1,2,3,2offload" in lines[3] and "--model vit_huge" in lines[4]
    only = gpu_check("--dry-run", "--phases", "memory", "--out", str(tmp_path / "out"))
    assert [line.split(",")[0] for line in only.stdout.splitlines()] == ["[memory_vit_large", "[memory_vit_huge"]


def test_bad_arguments_are_refused():
    assert gpu_check("--phases", "e2e,speed").returncode == 2
    result = gpu_check("--frobnicate")
    assert result.returncode == 2 and "unknown argument" in result.stderr


def test_summary_collects_phase_results_and_fails_on_a_timeout(tmp_path):
    (tmp_path / "phases.tsv").write_text("e2e\t0\t95\te2e.log\nbench_vit_large\t124\t120\tbench_vit_large.log\n")
    (tmp_path / "e2e.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_bf16_configs" name="test_a[zero1]"/>'
        '<testcase classname="tests.test_bf16_configs" name="test_b[zero2]"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_bf16_configs" name="test_c"><skipped message="needs 2 GPUs"/></testcase>'
        "</testsuite></testsuites>")
    bench = {"results": [{"stage": "mgp", "path": "project", "input": "synthetic", "batch": 256, "images_per_s": 2500.0,
                          "model_tflops": 300.0, "share_of_peak": 0.3, "ratio_project_over_baseline": 1.2,
                          "peak_mem_gib": 40.0}], "zero_stages": None}
    (tmp_path / "bench_vit_large.json").write_text(json.dumps(bench))
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check_summary.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1  # the timed-out phase fails the check
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["ok"] is False
    e2e, bench_phase = summary["phases"]["e2e"], summary["phases"]["bench_vit_large"]
    assert e2e["tests"]["tests"] == 3
    assert e2e["tests"]["failed"] == ["tests.test_bf16_configs::test_b[zero2]"]
    assert e2e["tests"]["skipped"] == ["tests.test_bf16_configs::test_c: needs 2 GPUs"]
    assert bench_phase["timed_out"] is True and bench_phase["result"] == bench
    assert "TIMED OUT" in result.stdout and "2500.0 img/s" in result.stdout and "ratio 1.20" in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_check_passes_on_a_gpu(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                            timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "gpu_check.json").read_text())  # what each phase really did, not only the code
    assert summary["ok"] is True
    phases = summary["phases"]
    assert "e2e" in phases and any(name.startswith("bench") for name in phases), sorted(phases)
    for name, phase in phases.items():
        assert phase["timed_out"] is False and phase["exit_code"] == 0, (name, phase)
        assert not [e for e in phase.get("result", {}).get("results", []) if "error" in e], name
        assert all(e["images_per_s"] > 0 for e in phase.get("result", {}).get("results", [])), name
    e2e = phases["e2e"]["tests"]
    assert e2e["tests"] >= 6 and e2e["failed"] == [], e2e  # the bf16 matrix ran and passed on the GPU
