#!/usr/bin/env python
"""Collect the results of scripts/gpu_check.sh into OUT/gpu_check.json and print a short summary.

Reads OUT/phases.tsv (name, exit code, seconds, log per phase), the JUnit XML of the e2e phase and the JSON
documents of scripts/bench_train.py. Exits 1 when a phase failed or timed out.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def junit_counts(path: Path) -> dict:
    """Counts and failed test names of a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    cases = root.iter("testcase")
    failed, skipped, total = [], [], 0
    for case in cases:
        total += 1
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif case.find("skipped") is not None:
            skipped.append(f"{name}: {case.find('skipped').get('message', '')}")
    return {"tests": total, "failed": failed, "skipped": skipped}


def bench_rows(doc: dict) -> list[str]:
    rows = []
    for e in doc.get("results", []):
        if "error" in e:
            rows.append(f"  {e['stage']} {e['path']} {e['input']}: ERROR {e['error'][:100]}")
            continue
        share, ratio, mem = e.get("share_of_peak"), e.get("ratio_project_over_baseline"), e.get("peak_mem_gib")
        text = f"  {e['stage']} {e['path']:8} {e['input']:9} batch {e['batch']:4}: {e['images_per_s']:8.1f} img/s, "
        text += f"{e['model_tflops']:6.1f} TFLOP/s" + (f" ({100 * share:.0f} % of peak)" if share else "")
        text += (f", ratio {ratio:.2f}" if ratio else "") + (f", peak {mem:.1f} GiB" if mem else "")
        rows.append(text)
    for z in doc.get("zero_stages") or []:
        if isinstance(z, dict):
            text = f"ERROR {z['error'][:100]}" if "error" in z else (
                f"peak {z['peak_mem_gib']:.1f} GiB, {z['images_per_s']:.1f} img/s")
            rows.append(f"  zero {z['zero']:8} batch {z['batch']}: {text}")
    return rows


def main(out: Path) -> int:
    summary: dict = {"phases": {}}
    smi = out / "nvidia-smi.txt"
    if smi.is_file():
        summary["nvidia_smi"] = smi.read_text()[:4000]
    ok = True
    lines = []
    for line in (out / "phases.tsv").read_text().splitlines():
        name, rc, seconds, log = line.split("\t")
        phase = {"exit_code": int(rc), "seconds": int(seconds), "log": log,
                 "timed_out": int(rc) in (124, 137)}
        ok &= int(rc) == 0
        if name == "e2e" and (out / "e2e.xml").is_file():
            phase["tests"] = junit_counts(out / "e2e.xml")
        result = out / f"{name}.json"
        if result.is_file():
            phase["result"] = json.loads(result.read_text())
        summary["phases"][name] = phase
        status = "ok" if int(rc) == 0 else ("TIMED OUT" if phase["timed_out"] else f"FAILED (exit {rc})")
        lines.append(f"{name}: {status} in {seconds}s")
        if "tests" in phase:
            t = phase["tests"]
            lines.append(f"  {t['tests']} tests, {len(t['failed'])} failed, {len(t['skipped'])} skipped")
            lines += [f"  failed: {n}" for n in t["failed"]] + [f"  skipped: {n}" for n in t["skipped"]]
        if "result" in phase:
            lines += bench_rows(phase["result"])
    summary["ok"] = ok
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n".join(lines))
    print(f"gpu_check: {'all phases passed' if ok else 'some phases FAILED'}; details in {out / 'gpu_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: gpu_check_summary.py OUT_DIR")
    raise SystemExit(main(Path(sys.argv[1])))
