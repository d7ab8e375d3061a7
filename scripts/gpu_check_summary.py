#!/usr/bin/env python
"""Collect the results of scripts/gpu_check.sh into OUT/gpu_check.json and print a short summary.

Reads OUT/phases.tsv (name, exit code, seconds, log per phase), the JUnit XML of each e2e phase (OUT/PHASE.xml)
and the JSON documents of scripts/bench_train.py (OUT/PHASE.json). Each phase gets a status:

- ``ok``: it exited 0 with its whole result (every benchmark entry, or the JUnit file of a finished pytest);
- ``partial``: it was stopped at its time limit but left results (the entries that finished, the tests that ran);
- ``timed out``: stopped at its limit with no result;
- ``failed``: it exited non-zero by itself (a failed test, a benchmark entry with an error, a crash).

Exits 1 unless every phase is ok.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

TIMEOUT_CODES = (124, 137)  # timeout(1) after SIGINT, or SIGKILL after its grace period


def junit_counts(path: Path) -> dict:
    """Counts and failed test names of a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    failed, skipped, total = [], [], 0
    for case in root.iter("testcase"):
        total += 1
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        elif case.find("skipped") is not None:
            skipped.append(f"{name}: {case.find('skipped').get('message', '')}")
    return {"tests": total, "failed": failed, "skipped": skipped}


def result_state(phase: dict[str, Any]) -> str:
    """What the phase left: "complete", "partial" or "none"."""
    if "result" in phase:  # a benchmark document says itself whether every planned entry finished
        return "complete" if phase["result"].get("complete") is True else "partial"
    if "tests" in phase:  # pytest writes its JUnit file at the end, or when SIGINT stops it early
        return "partial" if phase["timed_out"] else "complete"
    return "none"


def status(phase: dict[str, Any]) -> str:
    """ok, partial, timed out or failed (see the module docstring)."""
    if phase["timed_out"]:
        return "partial" if phase["results"] != "none" else "timed out"
    if phase["exit_code"] != 0:
        return "failed"
    return "ok" if phase["results"] == "complete" else "failed"


def read_phase(out: Path, name: str, rc: int, seconds: int, log: str) -> dict[str, Any]:
    phase: dict[str, Any] = {"exit_code": rc, "seconds": seconds, "log": log, "timed_out": rc in TIMEOUT_CODES}
    xml, doc = out / f"{name}.xml", out / f"{name}.json"
    if xml.is_file():
        try:
            phase["tests"] = junit_counts(xml)
        except ET.ParseError as exn:
            phase["unreadable"] = f"{xml.name}: {exn}"
    if doc.is_file():
        try:
            phase["result"] = json.loads(doc.read_text())
        except json.JSONDecodeError as exn:
            phase["unreadable"] = f"{doc.name}: {exn}"
    phase["results"] = result_state(phase)
    phase["status"] = status(phase)
    return phase


def bench_rows(doc: dict) -> list[str]:
    rows = []
    for e in doc.get("results", []):
        where = f"{e['stage']} {e['path']}/{e.get('variant', '')} {e['input']}"
        if "error" in e:
            rows.append(f"  {where}: ERROR {e['error'][:100]}")
            continue
        share, ratio, mem = e.get("share_of_peak"), e.get("ratio_project_over_baseline"), e.get("peak_mem_gib")
        text = f"  {where:40} batch {e['batch']:4}: {e['images_per_s']:8.1f} img/s, "
        text += f"{e['model_tflops']:6.1f} TFLOP/s" + (f" ({100 * share:.0f} % of peak)" if share else "")
        text += (f", ratio {ratio:.2f}" if ratio else "") + (f", peak {mem:.1f} GiB" if mem else "")
        rows.append(text)
    for z in doc.get("zero_stages") or []:
        if isinstance(z, dict):
            text = f"ERROR {z['error'][:100]}" if "error" in z else (
                f"peak {z['peak_mem_gib']:.1f} GiB, {z['images_per_s']:.1f} img/s")
            rows.append(f"  zero {z['zero']:8} batch {z['batch']}: {text}")
    return rows


def phase_lines(name: str, phase: dict[str, Any]) -> list[str]:
    head = f"{name}: {phase['status']} ({phase['seconds']}s, exit {phase['exit_code']})"
    doc = phase.get("result")
    if doc is not None and phase["results"] == "partial":
        head += f": {doc.get('finished_entries', len(doc.get('results', [])))} of {doc.get('planned_entries', '?')} "
        head += "entries finished"
    lines = [head]
    if "unreadable" in phase:
        lines.append(f"  unreadable result {phase['unreadable']}")
    if "tests" in phase:
        t = phase["tests"]
        lines.append(f"  {t['tests']} tests{' (those that ran)' if phase['results'] == 'partial' else ''}, "
                     f"{len(t['failed'])} failed, {len(t['skipped'])} skipped")
        lines += [f"  failed: {n}" for n in t["failed"]] + [f"  skipped: {n}" for n in t["skipped"]]
    if doc is not None:
        lines += bench_rows(doc)
    return lines


def main(out: Path) -> int:
    summary: dict = {"phases": {}}
    smi = out / "nvidia-smi.txt"
    if smi.is_file():
        summary["nvidia_smi"] = smi.read_text()[:4000]
    lines = []
    for line in (out / "phases.tsv").read_text().splitlines():
        name, rc, seconds, log = line.split("\t")
        phase = read_phase(out, name, int(rc), int(seconds), log)
        summary["phases"][name] = phase
        lines += phase_lines(name, phase)
    summary["ok"] = all(p["status"] == "ok" for p in summary["phases"].values())
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n".join(lines))
    print(f"gpu_check: {'all phases passed' if summary['ok'] else 'not every phase passed'}; details in "
          f"{out / 'gpu_check.json'}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: gpu_check_summary.py OUT_DIR", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(Path(sys.argv[1])))
