"""scripts/gpu_check.sh on a machine without a GPU: its help, its plan (order, limits, what each phase selects),
its argument errors, and the status its summary gives each phase from crafted results (the real run needs CUDA:
the `gpu` test at the end)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_check.sh"
SUMMARY = REPO / "scripts" / "gpu_check_summary.py"
ORDER = ["bench_vit_large", "bench_vit_base", "e2e_zero1", "e2e_zero2", "e2e_zero3", "e2e_zero2_offload",
         "memory_vit_large"]
BUDGET_S = 8 * 60  # the whole check, out of 15 minutes of GPU time (machine start-up takes much of the rest)


def gpu_check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, **(env or {})})


def plan(*args: str, env: dict[str, str] | None = None) -> tuple[dict[str, tuple[int, list[str]]], int]:
    """--dry-run as {phase: (limit, command words)} in printed order, and the printed total."""
    result = gpu_check("--dry-run", *args, env=env)
    assert result.returncode == 0, result.stderr
    phases = {}
    *lines, total = result.stdout.splitlines()
    for line in lines:
        match = re.fullmatch(r"\[(\w+), limit (\d+)s\] (.*)", line.strip())
        assert match, line
        phases[match[1]] = (int(match[2]), shlex.split(match[3]))
    return phases, int(re.fullmatch(r"total limit (\d+)s", total)[1])


def test_help_names_the_phases_and_options():
    result = gpu_check("--help")
    assert result.returncode == 0, result.stderr
    for word in (*ORDER, "memory_vit_huge", "--out", "--phases", "--dry-run", ".whl/", "SIGINT", "partial"):
        assert word in result.stdout, word


def test_dry_run_plans_the_phases_in_order_within_the_loan_and_writes_nothing(tmp_path):
    phases, total = plan("--out", str(tmp_path / "out"))
    assert list(phases) == ORDER  # figures first, then one e2e phase per config, memory last
    assert total == sum(limit for limit, _ in phases.values()) <= BUDGET_S - 20  # 20 s for installs and nvidia-smi
    assert not (tmp_path / "out").exists()  # --dry-run creates nothing
    large = phases["bench_vit_large"][1]
    assert large[large.index("--ds-adam") + 1] == "config,torch-fused"
    assert large[large.index("--eager") + 1] == "amp-fused,pure-foreach"
    assert large[large.index("--model") + 1] == "vit_large" and "--json-out" in large
    assert phases["bench_vit_base"][1][phases["bench_vit_base"][1].index("--model") + 1] == "vit_base"
    for name in ORDER[2:6]:
        words = phases[name][1]
        assert "LIVT_TEST_DEVICE=cuda" in words and words[words.index("--junitxml") + 1] == str(
            tmp_path / "out" / f"{name}.xml")  # one JUnit file per config
    assert "1,2,3,2offload" in phases["memory_vit_large"][1]


def test_phase_selection_groups_names_and_limit_overrides():
    phases, total = plan("--phases", "memory,e2e_zero3", env={"E2E_ZERO3_S": "90"})
    assert list(phases) == ["e2e_zero3", "memory_vit_large"]  # the run order, not the order asked
    assert phases["e2e_zero3"][0] == 90 and total == 90 + phases["memory_vit_large"][0]
    assert list(plan("--phases", "memory_vit_huge")[0]) == ["memory_vit_huge"]


def test_the_e2e_phases_select_every_bf16_test_exactly_once():
    """Each e2e phase's -k picks its config's tests; together they are the whole file, with no test twice."""
    phases, _ = plan()
    expressions = [""] + [phases[name][1][phases[name][1].index("-k") + 1] for name in ORDER[2:6]]
    collect = ("import sys, pytest\n"
               "for k in sys.argv[1:]:\n"
               "    print('=== selection', k, flush=True)\n"
               "    pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', 'tests/test_bf16_configs.py',"
               " *(['-k', k] if k else [])])\n")
    result = subprocess.run([sys.executable, "-c", collect, *expressions], cwd=REPO, capture_output=True, text=True,
                            timeout=300)  # one process for the five collections
    blocks = result.stdout.split("=== selection")[1:]
    assert len(blocks) == 5, result.stdout[-3000:] + result.stderr[-3000:]
    everything, *selected = ([line for line in block.splitlines() if "::" in line] for block in blocks)
    picked = dict(zip(ORDER[2:6], selected, strict=True))
    assert all(picked.values()), picked
    config = {"e2e_zero1": "[zero1_bf16.json]", "e2e_zero2": "[zero2_bf16.json]", "e2e_zero3": "[zero3_bf16.json]",
              "e2e_zero2_offload": "[zero2_offload_bf16.json]"}
    for name, tests in picked.items():
        assert all(t.endswith(config[name]) or "gradients_accumulate" in t for t in tests), (name, tests)
    assert any("gradients_accumulate" in t for t in picked["e2e_zero2_offload"])
    flat = [t for tests in picked.values() for t in tests]
    assert sorted(flat) == sorted(everything) and len(set(flat)) == len(flat)


def test_bad_arguments_are_refused():
    result = gpu_check("--phases", "e2e,speed")
    assert result.returncode == 2 and "unknown phase 'speed'" in result.stderr
    result = gpu_check("--frobnicate")
    assert result.returncode == 2 and "unknown argument" in result.stderr


def bench_doc(entries: int, planned: int, error: bool = False) -> dict:
    row = {"stage": "pretrain", "path": "project", "variant": "config", "input": "synthetic", "batch": 128,
           "images_per_s": 2500.0, "model_tflops": 300.0, "share_of_peak": 0.3, "ratio_project_over_baseline": 1.2,
           "peak_mem_gib": 40.0}
    results = [dict(row) for _ in range(entries)]
    if error:
        results[-1] = {**row, "error": "RuntimeError: CUDA out of memory"}
    return {"complete": entries == planned, "planned_entries": planned, "finished_entries": entries,
            "results": results, "zero_stages": None}


def junit(*cases: str) -> str:
    return f'<testsuites><testsuite name="pytest">{"".join(cases)}</testsuite></testsuites>'


PASSED = '<testcase classname="tests.test_bf16_configs" name="test_a[zero1_bf16.json]"/>'
FAILED = ('<testcase classname="tests.test_bf16_configs" name="test_b[zero2_bf16.json]"><failure message="x"/>'
          '</testcase>')
SKIPPED = '<testcase classname="tests.test_bf16_configs" name="test_c"><skipped message="needs 2 GPUs"/></testcase>'


def summarise(out: Path, phases: list[tuple[str, int]]) -> tuple[subprocess.CompletedProcess, dict]:
    (out / "phases.tsv").write_text("".join(f"{name}\t{rc}\t30\t{name}.log\n" for name, rc in phases))
    result = subprocess.run([sys.executable, str(SUMMARY), str(out)], capture_output=True, text=True, timeout=60)
    return result, json.loads((out / "gpu_check.json").read_text())


def test_summary_tells_complete_partial_timed_out_and_failed_phases_apart(tmp_path):
    crafted = {
        "bench_vit_large": (0, bench_doc(8, 8)),  # every entry: ok
        "bench_vit_base": (124, bench_doc(3, 8)),  # stopped at its limit after 3 entries: partial
        "memory_vit_large": (0, bench_doc(2, 4)),  # exit 0 without its whole document: failed
        "memory_vit_huge": (1, bench_doc(4, 4, error=True)),  # an entry with an error: failed
        "e2e_zero1": (0, junit(PASSED, SKIPPED)),  # ok (a skip is not a failure)
        "e2e_zero2": (1, junit(PASSED, FAILED)),  # a failed test: failed
        "e2e_zero3": (124, junit(PASSED)),  # SIGINT at the limit, pytest wrote what ran: partial
        "e2e_zero2_offload": (137, None),  # killed with nothing written: timed out
    }
    for name, (_, content) in crafted.items():
        if isinstance(content, dict):
            (tmp_path / f"{name}.json").write_text(json.dumps(content))
        elif content is not None:
            (tmp_path / f"{name}.xml").write_text(content)
    result, summary = summarise(tmp_path, [(name, rc) for name, (rc, _) in crafted.items()])
    assert result.returncode == 1 and summary["ok"] is False
    got = {name: phase["status"] for name, phase in summary["phases"].items()}
    assert got == {"bench_vit_large": "ok", "bench_vit_base": "partial", "memory_vit_large": "failed",
                   "memory_vit_huge": "failed", "e2e_zero1": "ok", "e2e_zero2": "failed", "e2e_zero3": "partial",
                   "e2e_zero2_offload": "timed out"}
    phases = summary["phases"]
    assert phases["bench_vit_base"]["result"] == crafted["bench_vit_base"][1]  # the partial figures are kept
    assert phases["e2e_zero2"]["tests"] == {"tests": 2, "failed": ["tests.test_bf16_configs::test_b[zero2_bf16.json]"],
                                            "skipped": []}
    assert phases["e2e_zero1"]["tests"]["skipped"] == ["tests.test_bf16_configs::test_c: needs 2 GPUs"]
    assert "bench_vit_base: partial (30s, exit 124): 3 of 8 entries finished" in result.stdout
    assert "e2e_zero3: partial" in result.stdout and "1 tests (those that ran)" in result.stdout
    assert "2500.0 img/s" in result.stdout and "ratio 1.20" in result.stdout and "out of memory" in result.stdout


def test_summary_passes_when_every_phase_is_whole(tmp_path):
    (tmp_path / "bench_vit_large.json").write_text(json.dumps(bench_doc(2, 2)))
    (tmp_path / "e2e_zero1.xml").write_text(junit(PASSED))
    result, summary = summarise(tmp_path, [("bench_vit_large", 0), ("e2e_zero1", 0)])
    assert result.returncode == 0 and summary["ok"] is True, result.stdout
    assert "all phases passed" in result.stdout


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
