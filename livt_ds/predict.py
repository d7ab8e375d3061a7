"""`livt predict`: named top-k predictions for images, from a run folder, an export folder or a weights file.

Inputs: image files, folders (searched recursively), text lists (one image path per line, relative to the list's
folder; a trailing integer label is ignored) and shard sets (a folder with meta.json: its ``--split``) or .tar
shards. Decoding runs in DataLoader workers, the model in batches on the GPU when there is one. An image that
cannot be read becomes an output line with an ``error`` field; the run goes on.

Output: JSONL (``{"path", "top_k": [{"class", "index", "prob"}, ...]}`` or ``{"path", "error"}``) or CSV
(``path, class_1, prob_1, ..., error``), chosen by the output's suffix. ``prob`` is the softmax of the fp32
logits, after the test-prior adjustment when ``--test-prior`` is given (livt_ds/priors.py).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from tqdm import tqdm

from livt_ds.data.pipeline import worker_context
from livt_ds.data.remote import is_url, local_path, open_url
from livt_ds.data.shards import decode_image, image_key, read_tar_samples, shard_paths
from livt_ds.data.transforms import eval_transform
from livt_ds.errors import NothingPredictedError
from livt_ds.priors import recipe_prior_adjustment, resolve_prior
from livt_ds.weights import load_classifier

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
LIST_SUFFIXES = {".txt", ".lst", ".list"}


@dataclass
class Predictor:
    """A classifier ready to predict: the timm model, its hub config, and the per-class logit adjustment [C]."""

    model: nn.Module
    config: dict[str, Any]
    adjustment: torch.Tensor

    @property
    def class_names(self) -> list[str]:
        return list(self.config["label_names"])


# ------------------------------------------------------------------------------------------------ the model
def load_predictor(spec: str | Path, test_prior: str | None = None, device: torch.device | None = None) -> Predictor:
    """The classifier of ``spec`` in eval mode on ``device``, with the logit adjustment for ``test_prior``."""
    model, config = load_classifier(spec, device=device)
    adjustment = torch.zeros(config["num_classes"])
    if test_prior:
        livt = config["livt"]
        prior = resolve_prior(test_prior, livt["class_counts"], config["label_names"])
        adjustment = recipe_prior_adjustment(livt["class_counts"], {"loss": livt["loss"], **livt.get("recipe", {})},
                                             prior)
    return Predictor(model, config, adjustment.to(next(model.parameters()).device))


def predictor_transform(config: dict[str, Any]) -> Callable:
    """The eval transform of the export's pretrained_cfg (what timm's resolve_data_config + create_transform give)."""
    cfg = config["pretrained_cfg"]
    return eval_transform(int(cfg["input_size"][-1]), cfg["mean"], cfg["std"], cfg["crop_pct"])


# ------------------------------------------------------------------------------------------------ inputs
def collect_inputs(inputs: Sequence[str], split: str = "val") -> tuple[list[str], list[str]]:
    """(image paths, .tar shard paths) from files, folders, text lists and shard sets, local or URLs (as
    ``data.path`` takes them: a shard set, a ``.tar`` or an image); FileNotFoundError for a local input that does
    not exist (an entry of a text list that does not exist gets an error line instead)."""
    files: list[str] = []
    tars: list[str] = []
    for item in inputs:
        if is_url(item):
            suffix = Path(item.rstrip("/")).suffix.lower()
            if suffix == ".tar":
                tars.append(item)
            elif suffix in IMAGE_SUFFIXES:
                files.append(item)
            else:
                tars += shard_paths(item, split)
            continue
        path = local_path(item)
        if not path.exists():
            raise FileNotFoundError(f"--input {item}: no such file or folder")
        if path.is_dir() and (path / "meta.json").is_file():
            tars += shard_paths(path, split)
        elif path.is_dir():
            files += sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.suffix == ".tar":
            tars.append(str(path))
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            files += _read_list(path)
        else:
            files.append(str(path))
    return files, tars


def _read_list(path: Path) -> list[str]:
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, _, tail = line.rpartition(" ")
        entry = head.strip() if head and tail.lstrip("-").isdigit() else line
        out.append(entry if Path(entry).is_absolute() else str(path.parent / entry))
    return out


Item = tuple[str, "torch.Tensor | None", str]  # (name, image [3, H, W] or None, error message or "")


def _prepare(name: str, load: Callable[[], Image.Image], transform: Callable) -> Item:
    try:
        image = load()
    except Exception as exc:  # noqa: BLE001 - any unreadable input becomes an error line, never a crash
        return name, None, f"{type(exc).__name__}: {exc}"
    return name, transform(image), ""  # transform errors are bugs, not bad input: they propagate


def _open_file(path: str) -> Image.Image:
    if is_url(path):
        with open_url(path) as f:
            data = io.BytesIO(f.read())
        with Image.open(data) as img:
            img.load()
            return img.convert("RGB")
    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


class ImageFiles(Dataset):
    """Image files in order; item ``(path, image or None, error)``."""

    def __init__(self, paths: Sequence[str], transform: Callable) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Item:
        path = self.paths[index]
        return _prepare(path, lambda: _open_file(path), self.transform)


class ShardImages(IterableDataset):
    """Samples of .tar shards (shard i read by worker i % W); item ``("shard.tar#key", image or None, error)``."""

    def __init__(self, tars: Sequence[str], transform: Callable) -> None:
        self.tars, self.transform = list(tars), transform

    def __iter__(self) -> Iterator[Item]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for url in self.tars[worker::workers]:
            try:
                for sample in read_tar_samples(url):
                    name = f"{url}#{sample.get('__key__')}"
                    yield _prepare(name, lambda s=sample: decode_image(s[image_key(s)]), self.transform)
            except Exception as exc:  # noqa: BLE001 - an unreadable shard is reported, the others still run
                yield url, None, f"{type(exc).__name__}: {exc}"


def _collate(items: list[Item]) -> tuple[list[str], torch.Tensor | None, list[str]]:
    images = [image for _, image, _ in items if image is not None]
    return [n for n, _, _ in items], torch.stack(images) if images else None, [e for _, _, e in items]


# ------------------------------------------------------------------------------------------------ running
class _Writer:
    """JSONL or CSV lines, by the output's suffix."""

    def __init__(self, path: Path, top_k: int) -> None:
        if path.suffix not in (".jsonl", ".csv"):
            raise ValueError(f"--output {path}: use a .jsonl or .csv file name")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "w", newline="")  # noqa: SIM115 - closed in close()
        self.csv = csv.writer(self.file) if path.suffix == ".csv" else None
        if self.csv is not None:
            ranks = [f"{what}_{i}" for i in range(1, top_k + 1) for what in ("class", "prob")]
            self.csv.writerow(["path", *ranks, "error"])
        self.top_k = top_k

    def write(self, name: str, top: list[tuple[str, int, float]] | None, error: str) -> None:
        if self.csv is not None:
            cells = [c for n, _, p in (top or []) for c in (n, f"{p:.6f}")]
            cells += [""] * (2 * self.top_k - len(cells))
            self.csv.writerow([name, *cells, error])
        elif error:
            self.file.write(json.dumps({"path": name, "error": error}) + "\n")
        else:
            line = {"path": name, "top_k": [{"class": n, "index": i, "prob": p} for n, i, p in top or []]}
            self.file.write(json.dumps(line) + "\n")

    def close(self) -> None:
        self.file.close()


@torch.no_grad()
def predict_batch(predictor: Predictor, images: torch.Tensor, top_k: int) -> list[list[tuple[str, int, float]]]:
    """Top-k ``(class name, index, probability)`` per image of a ``[B, 3, H, W]`` batch (fp32 softmax)."""
    device = predictor.adjustment.device
    logits = predictor.model(images.to(device, non_blocking=True)).float() + predictor.adjustment
    probs, index = torch.softmax(logits, dim=1).topk(min(top_k, logits.shape[1]), dim=1)
    names = predictor.class_names
    return [[(names[i], i, p) for i, p in zip(row_i, row_p, strict=True)]
            for row_i, row_p in zip(index.cpu().tolist(), probs.cpu().tolist(), strict=True)]


def run_predict(
    model: str,
    inputs: Sequence[str],
    output: str | Path,
    *,
    top_k: int = 5,
    test_prior: str | None = None,
    batch_size: int = 64,
    num_workers: int = 4,
    split: str = "val",
    progress: bool = True,
) -> dict[str, Any]:
    """Predict every input image and write one line per image; returns counts and the output path."""
    if top_k < 1 or batch_size < 1 or num_workers < 0:
        raise ValueError(f"--top-k {top_k}, --batch-size {batch_size}, --workers {num_workers}: need k >= 1, "
                         "batch >= 1, workers >= 0")
    files, tars = collect_inputs(inputs, split)  # before the model: a wrong input fails fast
    if not files and not tars:
        raise ValueError(f"--input {' '.join(inputs)}: no images found")
    predictor = load_predictor(model, test_prior)
    transform = predictor_transform(predictor.config)
    datasets = [d for d in (ImageFiles(files, transform) if files else None,
                            ShardImages(tars, transform) if tars else None) if d is not None]
    writer = _Writer(Path(output), top_k)
    counts = {"images": 0, "errors": 0}
    total = len(files) + sum(_shard_size_hint(t) for t in tars)
    bar = tqdm(total=total or None, unit="img", desc="predict", disable=not progress, dynamic_ncols=True)
    try:
        for dataset in datasets:
            workers = min(num_workers, len(tars)) if isinstance(dataset, ShardImages) else num_workers
            loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                                pin_memory=torch.cuda.is_available(),
                                multiprocessing_context=worker_context() if workers > 0 else None)
            for names, images, errors in loader:
                tops = iter(predict_batch(predictor, images, top_k)) if images is not None else iter(())
                for name, error in zip(names, errors, strict=True):
                    writer.write(name, None if error else next(tops), error)
                    counts["errors" if error else "images"] += 1
                bar.update(len(names))
    finally:
        bar.close()
        writer.close()
    if not counts["images"]:
        raise NothingPredictedError(f"--input {' '.join(inputs)}: no image could be read ({counts['errors']} "
                                    f"unreadable; each has its error in {output})")
    return {**counts, "output": str(output)}


def _shard_size_hint(url: str) -> int:
    """Samples in a shard from its shard set's meta.json (0 when unknown: the bar then counts without a total)."""
    meta_path = Path(url).parent / "meta.json"
    if is_url(url) or not meta_path.is_file():
        return 0
    meta = json.loads(meta_path.read_text())
    for info in meta.get("splits", {}).values():
        if Path(url).name in info.get("shards", []):
            return int(info["shard_sizes"][info["shards"].index(Path(url).name)])
    return 0


def default_workers() -> int:
    return max(0, min(4, (os.cpu_count() or 1) - 1))


__all__ = ["NothingPredictedError",
           "Predictor", "load_predictor", "collect_inputs", "predict_batch", "run_predict",
           "predictor_transform", "default_workers"]
