"""A benchmark document for people: one line per entry, and the entries that failed."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any, spec: str) -> str:
    width = int(spec.split(".")[0] or 0)
    return "-".rjust(width) if value is None else format(value, spec)


def table(doc: dict[str, Any]) -> str:
    """The matrix and the ZeRO sweep of a ``matrix.run`` document as a fixed-width table."""
    head = (f"{'stage':5} {'path/variant':26} {'input':9} {'batch':>5} {'img/s':>9} {'ms/step':>8} {'wait ms':>8} "
            f"{'TFLOP/s':>8} {'%peak':>6} {'mem GiB':>8} {'ratio':>6}")
    lines = [head, "-" * len(head)]
    for e in doc["results"]:
        path = f"{e['path']}/{e['variant']}"
        if "error" in e:
            lines.append(f"{e['stage']:5} {path:26} {e['input']:9} ERROR {e['error'][:80]}")
            continue
        share = None if e["share_of_peak"] is None else 100 * e["share_of_peak"]
        lines.append(f"{e['stage']:5} {path:26} {e['input']:9} {e['batch']:>5} {e['images_per_s']:>9.1f} "
                     f"{e['step_ms']:>8.1f} {e['data_wait_ms']:>8.1f} {e['model_tflops']:>8.2f} {_fmt(share, '6.1f')} "
                     f"{_fmt(e['peak_mem_gib'], '8.2f')} {_fmt(e['ratio_project_over_baseline'], '6.3f')}")
    for z in doc["zero_stages"] if isinstance(doc["zero_stages"], list) else []:
        if "error" in z:
            lines.append(f"zero {z['zero']:9} ERROR {z['error'][:80]}")
        else:
            lines.append(f"zero {z['zero']:9} batch {z['batch']}: peak {_fmt(z['peak_mem_gib'], '.2f')} GiB, "
                         f"{z['images_per_s']:.1f} images/s")
    if not doc.get("complete", True):
        lines.append(f"(partial: {doc.get('finished_entries')} of {doc.get('planned_entries')} entries)")
    return "\n".join(lines)


def failed(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The entries of a ``matrix.run`` document that recorded an error (the matrix and the ZeRO sweep)."""
    zero = doc["zero_stages"] if isinstance(doc["zero_stages"], list) else []
    return [e for e in [*doc["results"], *zero] if "error" in e]
