"""livt_ds.compare on fake-but-valid run folders: markdown table + per-class order + settings, PNGs, errors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image

from livt_ds import compare
from livt_ds.metrics import classification_report

COUNTS = [5, 500, 40, 150, 12, 80]  # not sorted: the report must order head -> tail by these counts
NAMES = ["tail_a", "head", "mid_a", "head_b", "tail_b", "mid_b"]


def _fake_run(root, name: str, bias_to_head: float, loss: str, seed: int):
    """A run folder whose metrics.json comes from classification_report on constructed logits: a clean signal
    plus ``bias_to_head`` * log(count), so a larger bias hurts the tail classes as a plain loss would."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(COUNTS)).repeat_interleave(30)
    prior = torch.tensor(COUNTS, dtype=torch.float32).log()
    logits = 1.5 * torch.nn.functional.one_hot(labels).float() + torch.randn(len(labels), len(COUNTS), generator=g)
    logits = logits + bias_to_head * (prior - prior.mean())
    run = root / name
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(classification_report(logits, labels, COUNTS)))
    recipe = {"model": {"name": "vit_test", "init": "runs/mgp"}, "data": {"path": str(root / "shards")},
              "train": {"epochs": 3, "batch_size": 32, "blr": 1e-3, "seed": 0},
              "loss": {"name": loss, "tau": 1.0}, "augment": {"mixup": 0.0, "cutmix": 0.0, "rand_augment": None}}
    (run / "config.yaml").write_text(yaml.safe_dump(recipe))
    (run / "run.yaml").write_text(yaml.safe_dump({"schedule": {"steps_per_epoch": 5, "total_steps": 15}}))
    rows = [{"step": 5, "loss": 2.0}, {"step": 10, "eval/top1": 20.0 + seed, "eval/few": 1.0 * seed},
            {"step": 15, "eval/top1": 40.0 + seed, "eval/few": 10.0 * seed, "eval/per_class": [0.0] * len(COUNTS)}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return run


@pytest.fixture()
def runs(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "meta.json").write_text(json.dumps({"num_classes": len(COUNTS), "classes": NAMES,
                                                  "class_counts": COUNTS}))
    return [_fake_run(tmp_path, "bce", 1.0, "bce", 1), _fake_run(tmp_path, "bal_bce", 0.0, "bal_bce", 2)]


def _png_size(path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 1000, path
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_main_writes_markdown_and_pngs(runs, tmp_path, capsys) -> None:
    out = tmp_path / "docs"
    rc = compare.main([str(r) for r in runs] + ["--labels", "BCE", "Bal-BCE", "--output", str(out),
                                                "--note", "budget: 3 epochs"])
    assert rc == 0
    metrics = {r.name: json.loads((r / "metrics.json").read_text()) for r in runs}
    text = (out / "loss_comparison.md").read_text()
    lines = text.splitlines()
    header = lines.index("| label | top-1 | many | medium | few | ECE | MCE |")
    bce_row = lines[header + 2]
    m = metrics["bce"]
    keys = ("top1", "many", "medium", "few", "ece", "mce")
    assert bce_row == "| BCE | " + " | ".join(f"{m[k]:.1f}" for k in keys) + " |"
    assert lines[header + 3].startswith("| Bal-BCE | ")
    # the constructed head bias must show: the tail (few) accuracy is lower with it
    assert metrics["bce"]["few"] < metrics["bal_bce"]["few"]
    # per-class section lists classes head -> tail with their training counts
    per_class_rows = [line for line in lines if line.startswith("| ") and line.split(" | ")[0][2:] in NAMES]
    order = [row.split(" | ")[0][2:] for row in per_class_rows]
    assert order == ["head", "head_b", "mid_b", "mid_a", "tail_b", "tail_a"]
    assert per_class_rows[-1].split(" | ")[1] == "5"
    settings = next(line for line in lines if line.startswith("| Bal-BCE | `"))  # from the run's config.yaml
    cells = [c.strip() for c in settings.strip("|").split("|")]
    assert cells[2:11] == ["runs/mgp", "vit_test", "3", "32", "0.001", "\u2013", "bal_bce", "1.0", "0.0"]
    bce_settings = next(line for line in lines if line.startswith("| BCE | `"))
    assert [c.strip() for c in bce_settings.strip("|").split("|")][8:10] == ["bce", "\u2013"]  # tau unused by BCE
    # evaluations during training from metrics.jsonl, at epochs step / steps_per_epoch
    history = lines.index("| epoch | BCE | Bal-BCE |")
    assert lines[history + 2:history + 4] == ["| 2 | 21.0 / 1.0 | 22.0 / 2.0 |", "| 3 | 41.0 / 10.0 | 42.0 / 20.0 |"]
    assert "budget: 3 epochs" in text and "python -m livt_ds.compare" in text
    assert "![per-class accuracy](per_class_accuracy.png)" in text
    width, height = _png_size(out / "per_class_accuracy.png")
    assert width >= 600 and height >= 300
    r_width, _ = _png_size(out / "reliability.png")
    assert r_width >= 500  # two panels side by side
    assert "| BCE |" in capsys.readouterr().out


def test_explicit_meta_and_default_labels(runs, tmp_path) -> None:
    out = tmp_path / "o"
    rc = compare.main([str(runs[0]), "--output", str(out), "--meta", str(tmp_path / "shards" / "meta.json"),
                       "--command", "bash scripts/compare_losses.sh", "--markdown-name", "results.md"])
    assert rc == 0
    assert not (out / "loss_comparison.md").exists()
    text = (out / "results.md").read_text()
    assert "| bce | " in text and "bash scripts/compare_losses.sh" in text


def test_errors_are_clear(runs, tmp_path, capsys) -> None:
    assert compare.main([str(r) for r in runs] + ["--labels", "only_one", "--output", str(tmp_path / "x")]) == 2
    assert "one --labels entry per run" in capsys.readouterr().err
    mgp = tmp_path / "mgp"
    mgp.mkdir()
    (mgp / "metrics.json").write_text(json.dumps({"recon_loss": 0.5}))
    assert compare.main([str(mgp), "--output", str(tmp_path / "x")]) == 2
    assert "not an MGP run" in capsys.readouterr().err
    (tmp_path / "meta6.json").write_text(json.dumps({"class_counts": [1, 2, 3]}))
    assert compare.main([str(runs[0]), "--output", str(tmp_path / "x"), "--meta", str(tmp_path / "meta6.json")]) == 2
    assert "has 6 classes" in capsys.readouterr().err
    assert not (tmp_path / "x" / "loss_comparison.md").exists()


def test_runs_sharing_a_label_are_seeds_mean_and_std(tmp_path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "meta.json").write_text(json.dumps({"classes": NAMES, "class_counts": COUNTS}))
    seeds = []
    for seed in (0, 1, 2):
        run = _fake_run(tmp_path, f"bce_s{seed}", 1.0, "bce", seed + 10)
        recipe = yaml.safe_load((run / "config.yaml").read_text())
        recipe["train"]["seed"] = seed
        recipe["log"] = {"every_steps": seed + 1}  # log settings may differ between seeds
        (run / "config.yaml").write_text(yaml.safe_dump(recipe))
        seeds.append(run)
    single = _fake_run(tmp_path, "bal_bce", 0.0, "bal_bce", 2)
    out = tmp_path / "docs"
    argv = [*map(str, seeds), str(single), "--labels", "BCE", "BCE", "BCE", "Bal-BCE", "--output", str(out)]
    assert compare.main(argv) == 0
    values = [json.loads((r / "metrics.json").read_text()) for r in seeds]
    lines = (out / "loss_comparison.md").read_text().splitlines()
    row = next(line for line in lines if line.startswith("| BCE | ") and "\u00b1" in line)
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    for cell, key in zip(cells, ("top1", "many", "medium", "few", "ece", "mce"), strict=True):
        xs = [v[key] for v in values]
        mean = sum(xs) / 3
        std = (sum((x - mean) ** 2 for x in xs) / 2) ** 0.5  # sample standard deviation
        assert cell == f"{mean:.1f} \u00b1 {std:.1f}", (key, cell)
    assert lines[lines.index(row) + 1] == "| Bal-BCE | " + " | ".join(
        f"{json.loads((single / 'metrics.json').read_text())[k]:.1f}" for k in ("top1", "many", "medium", "few",
                                                                              "ece", "mce")) + " |"
    head = NAMES.index("head")
    per_class = next(line for line in lines if line.startswith("| head | 500 | "))
    assert per_class.split(" | ")[2] == f"{sum(v['per_class'][head] for v in values) / 3:.0f}"
    settings = next(line for line in lines if line.startswith("| BCE | `"))
    assert settings.rstrip(" |").endswith("0, 1, 2") and settings.count("`") == 6
    assert "seeds per row: BCE 3, Bal-BCE 1" in "\n".join(lines)
    # pooled reliability bins: counts of the three runs summed
    summary = compare.mean_metrics([compare.load_run(r) for r in seeds])
    assert sum(summary["reliability"]["count"]) == 3 * len(COUNTS) * 30 and summary["seeds"] == 3

    # seeds must differ, and nothing but the seed may
    assert compare.main([str(seeds[0]), str(seeds[0]), "--labels", "x", "x", "--output", str(tmp_path / "e")]) == 2
    other = _fake_run(tmp_path, "bce_other", 1.0, "bce", 7)
    recipe = yaml.safe_load((other / "config.yaml").read_text())
    recipe["train"].update(seed=5, blr=0.5)
    (other / "config.yaml").write_text(yaml.safe_dump(recipe))
    assert compare.main([str(seeds[0]), str(other), "--labels", "x", "x", "--output", str(tmp_path / "e")]) == 2
    assert not (tmp_path / "e" / "loss_comparison.md").exists()


def test_seed_group_errors_say_what_differs(tmp_path, capsys) -> None:
    a, b = _fake_run(tmp_path, "a", 1.0, "bce", 1), _fake_run(tmp_path, "b", 1.0, "ce", 2)
    for run, seed in ((a, 0), (b, 1)):
        recipe = yaml.safe_load((run / "config.yaml").read_text())
        recipe["train"]["seed"] = seed
        (run / "config.yaml").write_text(yaml.safe_dump(recipe))
    assert compare.main([str(a), str(b), "--labels", "L", "L", "--output", str(tmp_path / "o"),
                         "--meta", str(tmp_path / "m.json")]) == 2
    capsys.readouterr()
    (tmp_path / "m.json").write_text(json.dumps({"class_counts": COUNTS}))
    assert compare.main([str(a), str(b), "--labels", "L", "L", "--output", str(tmp_path / "o"),
                         "--meta", str(tmp_path / "m.json")]) == 2
    assert "differ in ['loss.name']" in capsys.readouterr().err
    assert compare.main([str(a), str(a), "--labels", "L", "L", "--output", str(tmp_path / "o"),
                         "--meta", str(tmp_path / "m.json")]) == 2
    assert "different train.seed" in capsys.readouterr().err
