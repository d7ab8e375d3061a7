"""scripts/bench_data.py --per-core: one core, the MGP stream against decode alone, figures in the JSON file."""

from __future__ import annotations

import json
import subprocess
import sys

from test_scripts import REPO, script_env


def test_per_core_writes_pipeline_and_decode_only_rates(tmp_path):
    out = tmp_path / "per_core.json"
    cmd = [sys.executable, "scripts/bench_data.py", "--per-core", "--num-images", "24", "--batch-size", "4",
           "--img-size", "32", "--batches", "2", "--warmup", "1", "--repeats", "1", "--json-out", str(out)]
    result = subprocess.run(cmd, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report == json.loads(result.stdout)
    rates = ("pipeline_img_s", "decode_only_img_s", "resize_in_worker_pipeline_img_s", "reference_pipeline_img_s")
    assert all(report[k] > 0 for k in rates)
    assert report["pipeline_over_decode"] == round(report["pipeline_img_s"] / report["decode_only_img_s"], 3)
    assert report["resize_in_worker_over_decode"] == round(
        report["resize_in_worker_pipeline_img_s"] / report["decode_only_img_s"], 3)
    assert "CPU second" in report["what"] and "training device" in report["what"]  # what the figure counts
    assert report["images"] == 24 and report["max_side"] == 256 and isinstance(report["machine"]["core"], int)
