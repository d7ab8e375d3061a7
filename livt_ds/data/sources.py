"""Readers that turn each raw data-set format into an index of records (label + where the image is).

Reading is split in two so that ``make_shards`` can subsample (``--imbalance``) and report missing files
before it touches a single image: a source builds a cheap :class:`Source` (class names, per-split
:class:`Record` lists, the paths it could not find), and :func:`load_record_bytes` fetches one image's
encoded bytes later, inside the encoding worker pool.

Formats (the split names written are ``train``, ``val`` and ``test``, each when the source has it):

- ``imagefolder``: ``ROOT/{train,val,test}/CLASS/*.{jpg,jpeg,png,...}``; class index = position in the sorted
  class names of ``ROOT/train``.
- ``list``: ImageNet-LT / Places-LT list files, one ``relative/path.jpg LABEL`` per line, paths under ``--input``
  (``--train-list``, ``--val-list``, ``--test-list``).
- ``inat``: iNaturalist-2018 COCO-style JSON (``images``, ``annotations``, ``categories``); labels are the
  category ids as they are. iNat18 has no labelled test set: its val is its test (``Source.test_split`` "val").
- ``cifar``: the CIFAR-10/100 python pickles (``data_batch_1..5``/``test_batch`` or ``train``/``test``). The
  official test set is ``test`` with ``--val-per-class N`` (a balanced val of N images per class carved from
  train, before any ``--imbalance``), else ``val`` and the test split too (``Source.test_split`` "val").
- ``demo``: the built-in generated set of :mod:`livt_ds.data.demo`.

``Source.test_split`` (written to meta.json as ``test_split``) names the split that is the data set's test set:
``test`` when there is one, ``val`` where the two are the same, None when the source has no test set.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SOURCE_KINDS = ("imagefolder", "list", "inat", "cifar", "demo")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})
SPLITS = ("train", "val")  # the demo's


class SourceError(ValueError):
    """The raw data cannot be read as asked; the message says where and what to do."""


@dataclass(frozen=True, eq=False)
class Record:
    """One image of a split: its label, a human-readable origin, and exactly one way to get its bytes.

    ``path``: a file to read; ``data``: encoded image bytes already in memory (demo); ``pixels``: an
    ``[H, W, 3]`` uint8 array (CIFAR), PNG-encoded when loaded.
    """

    label: int
    name: str
    path: str | None = None
    data: bytes | None = None
    pixels: np.ndarray | None = None


@dataclass
class Source:
    """An indexed raw data set: what ``make_shards`` writes, before any image is read."""

    kind: str
    classes: list[str]
    splits: dict[str, list[Record]]
    missing: dict[str, list[str]] = field(default_factory=dict)
    args: dict[str, str | None] = field(default_factory=dict)
    test_split: str | None = None  # the split that is the test set; None: "test" when there is one

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_record_bytes(record: Record) -> bytes:
    """The encoded image bytes of ``record`` (file contents, inline bytes, or a PNG of its pixels)."""
    if record.path is not None:
        with open(record.path, "rb") as f:
            return f.read()
    if record.data is not None:
        return record.data
    if record.pixels is not None:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(record.pixels).save(buf, format="PNG")
        return buf.getvalue()
    raise SourceError(f"record {record.name}: has neither a path, bytes nor pixels")


def open_source(
    kind: str,
    input_path: str | Path | None,
    *,
    train_list: str | Path | None = None,
    val_list: str | Path | None = None,
    test_list: str | Path | None = None,
    num_classes: int | None = None,
    val_per_class: int | None = None,
    seed: int = 0,
) -> Source:
    """Index the raw data set ``kind`` found at ``input_path`` (see the module docstring for the layouts)."""
    if kind not in SOURCE_KINDS:
        raise SourceError(f"--source {kind!r}: unknown; choose one of {', '.join(SOURCE_KINDS)}")
    if test_list is not None and kind != "list":
        raise SourceError(f"--test-list is for --source list (ImageNet-LT / Places-LT lists), not {kind}"
                          + ("; put the test images under ROOT/test/CLASS" if kind == "imagefolder" else ""))
    if val_per_class is not None and kind != "cifar":
        raise SourceError(f"--val-per-class is for --source cifar (a balanced val carved from train), not {kind}")
    if kind == "demo":
        source = read_demo(seed)
    else:
        if input_path is None:
            raise SourceError(f"--source {kind} needs --input PATH (the data set's root folder)")
        root = Path(input_path)
        if not root.is_dir():
            raise SourceError(f"--input {root}: not a folder; pass the data set's root folder")
        if kind == "imagefolder":
            source = read_imagefolder(root)
        elif kind == "list":
            source = read_lists(root, train_list, val_list, num_classes=num_classes, test_list=test_list)
        elif kind == "inat":
            source = read_inat(root, train_list, val_list)
        else:
            source = read_cifar(root, val_per_class=val_per_class, seed=seed)
    if source.test_split is None and source.splits.get("test") is not None:
        source.test_split = "test"
    if not source.splits.get("train") and not source.missing.get("train"):
        raise SourceError(f"--source {kind} --input {input_path}: no training images found; check the path and layout")
    return source


# ---------------------------------------------------------------------------------------------- imagefolder
def read_imagefolder(root: Path) -> Source:
    """``ROOT/train/CLASS/*.jpg`` (+ ``ROOT/val``, ``ROOT/test``); classes = sorted names under train."""
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise SourceError(f"{train_dir}: missing; --source imagefolder expects ROOT/train/CLASS/*.jpg (and ROOT/val)")
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise SourceError(f"{train_dir}: no class folders; expected ROOT/train/CLASS/*.jpg")
    index = {name: i for i, name in enumerate(classes)}
    splits = {"train": _folder_records(train_dir, index)}
    for split in ("val", "test"):
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        unknown = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and d.name not in index)
        if unknown:
            raise SourceError(
                f"{split_dir}: class folders {unknown[:5]} do not exist under {train_dir} (label out of range); "
                "every evaluation class needs a training folder (it may be empty)"
            )
        splits[split] = _folder_records(split_dir, index)
    return Source("imagefolder", classes, splits, args={"input": str(root.resolve())})


def _folder_records(split_dir: Path, index: dict[str, int]) -> list[Record]:
    records = []
    for name in sorted(index):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        for path in sorted(class_dir.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() and not path.name.startswith("."):
                records.append(Record(index[name], str(path.relative_to(split_dir.parent)), path=str(path)))
    return records


# ---------------------------------------------------------------------------------------------- list files
def read_lists(
    root: Path, train_list: str | Path | None, val_list: str | Path | None, *, num_classes: int | None = None,
    test_list: str | Path | None = None,
) -> Source:
    """ImageNet-LT / Places-LT list files: ``relative/path.jpg LABEL`` per line, paths relative to ``root``."""
    if train_list is None:
        raise SourceError("--source list needs --train-list FILE (lines 'relative/path.jpg LABEL')")
    entries = {"train": _parse_list(Path(train_list))}
    for split, listed in (("val", val_list), ("test", test_list)):
        if listed is not None:
            entries[split] = _parse_list(Path(listed))
    if num_classes is None:
        num_classes = 1 + max((label for _, label, _ in entries["train"]), default=-1)
    for split, rows in entries.items():
        for rel, label, where in rows:
            if not 0 <= label < num_classes:
                raise SourceError(
                    f"{where}: label {label} of {rel} is out of range 0..{num_classes - 1} ({split}); "
                    "fix the list, or pass --num-classes N when the training list lacks some classes"
                )
    classes = _names_from_paths(entries["train"], num_classes)
    splits, missing = {}, {}
    for split, rows in entries.items():
        paths = [(str(root / rel.lstrip("/")), rel, label) for rel, label, _ in rows]
        splits[split], missing[split] = _split_existing(paths)
    args = {"input": str(root.resolve()), "train_list": _abs(train_list), "val_list": _abs(val_list),
            "test_list": _abs(test_list)}
    return Source("list", classes, splits, missing, args)


def _parse_list(path: Path) -> list[tuple[str, int, str]]:
    if not path.is_file():
        raise SourceError(f"{path}: list file missing")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise SourceError(f"{path}:{lineno}: expected 'relative/path.jpg LABEL', got {line[:80]!r}")
            rows.append((parts[0], int(parts[1]), f"{path}:{lineno}"))
    return rows


def _names_from_paths(rows: list[tuple[str, int, str]], num_classes: int) -> list[str]:
    """Class names from the image folders (``train/n01440764/x.JPEG`` -> ``n01440764``) when unambiguous."""
    for depth in (1, 2, 3):
        names: dict[int, set[str]] = {}
        for rel, label, _ in rows:
            parent = Path(rel.lstrip("/")).parent.parts
            names.setdefault(label, set()).add("/".join(parent[-depth:]) if parent else "")
        flat = {label: next(iter(s)) for label, s in names.items() if len(s) == 1}
        if len(flat) == len(names) and len(set(flat.values())) == len(flat) and "" not in flat.values():
            width = len(str(num_classes - 1))
            return [flat.get(i, f"class_{i:0{width}d}") for i in range(num_classes)]
        if any(len(s) > 1 for s in names.values()):
            break
    width = len(str(num_classes - 1))
    return [f"class_{i:0{width}d}" for i in range(num_classes)]


def _split_existing(paths: list[tuple[str, str, int]]) -> tuple[list[Record], list[str]]:
    """Records for the files that exist; the names of those that do not."""
    records, missing = [], []
    for full, rel, label in paths:
        if os.path.isfile(full):
            records.append(Record(label, rel, path=full))
        else:
            missing.append(full)
    return records, missing


def _abs(path: str | Path | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


# ---------------------------------------------------------------------------------------------- iNaturalist
def read_inat(root: Path, train_json: str | Path | None, val_json: str | Path | None) -> Source:
    """iNaturalist-2018 COCO-style JSON; labels are the JSON's category ids, not re-sorted."""
    if train_json is None:
        raise SourceError("--source inat needs --train-list train2018.json (and --val-list val2018.json)")
    docs = {"train": _load_json(Path(train_json))}
    if val_json is not None:
        docs["val"] = _load_json(Path(val_json))
    categories = docs["train"].get("categories") or []
    cat_ids = [int(c["id"]) for c in categories]
    num_classes = 1 + max(cat_ids) if cat_ids else 1 + max(int(a["category_id"]) for a in docs["train"]["annotations"])
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    classes = [names.get(i, f"class_{i}") for i in range(num_classes)]
    splits, missing = {}, {}
    for split, doc in docs.items():
        rows = _inat_rows(doc, split, num_classes, Path(train_json if split == "train" else val_json))
        splits[split], missing[split] = _split_existing([(str(root / rel), rel, label) for rel, label in rows])
    args = {"input": str(root.resolve()), "train_list": _abs(train_json), "val_list": _abs(val_json)}
    return Source("inat", classes, splits, missing, args, test_split="val" if "val" in splits else None)


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise SourceError(f"{path}: JSON file missing")
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    for key in ("images", "annotations"):
        if key not in doc:
            raise SourceError(f"{path}: no '{key}' list; expected iNaturalist COCO-style JSON (images, annotations)")
    return doc


def _inat_rows(doc: dict, split: str, num_classes: int, where: Path) -> list[tuple[str, int]]:
    labels: dict[int, int] = {}
    for ann in doc["annotations"]:
        label = int(ann["category_id"])
        if not 0 <= label < num_classes:
            raise SourceError(
                f"{where}: annotation of image {ann['image_id']} has category_id {label}, out of range "
                f"0..{num_classes - 1} of the training JSON's categories; use the matching train/val JSON pair"
            )
        labels[int(ann["image_id"])] = label
    rows = [(img["file_name"], labels[int(img["id"])]) for img in doc["images"] if int(img["id"]) in labels]
    unlabeled = len(doc["images"]) - len(rows)
    if unlabeled and not rows:
        raise SourceError(f"{where}: {unlabeled} images but no annotations ({split}); a test JSON cannot be sharded")
    return rows


# ---------------------------------------------------------------------------------------------- CIFAR
_CIFAR_LAYOUTS = (
    # (train files, test file, meta file, label key, names key)
    ([f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta", b"labels", b"label_names"),
    (["train"], "test", "meta", b"fine_labels", b"fine_label_names"),
)


def read_cifar(root: Path, *, val_per_class: int | None = None, seed: int = 0) -> Source:
    """CIFAR-10 (``data_batch_1..5``, ``test_batch``, ``batches.meta``) or CIFAR-100 (``train``, ``test``, ``meta``).

    With ``val_per_class`` N: val = N training images per class (drawn with ``seed``), test = the official test set;
    without: val = the official test set, which is then also the test split."""
    folder, layout = _find_cifar(root)
    train_files, test_file, meta_file, label_key, names_key = layout
    with open(folder / meta_file, "rb") as f:
        classes = [n.decode() for n in pickle.load(f, encoding="bytes")[names_key]]
    train = [r for name in train_files for r in _cifar_records(folder / name, label_key, len(classes))]
    official_test = _cifar_records(folder / test_file, label_key, len(classes))
    args = {"input": str(folder.resolve())}
    if val_per_class is None:
        return Source("cifar", classes, {"train": train, "val": official_test}, args=args, test_split="val")
    train, val = carve_balanced(train, len(classes), val_per_class, seed)
    args["val_per_class"] = str(val_per_class)
    return Source("cifar", classes, {"train": train, "val": val, "test": official_test}, args=args)


def carve_balanced(records: list[Record], num_classes: int, per_class: int, seed: int) -> tuple[list[Record],
                                                                                                  list[Record]]:
    """(rest, carved): ``per_class`` records of every class drawn with ``seed`` (a balanced val), and the others in
    their order. Every class must keep at least one record."""
    if per_class < 1:
        raise SourceError(f"--val-per-class {per_class}: must be >= 1 image per class")
    by_class: dict[int, list[int]] = {}
    for i, r in enumerate(records):
        by_class.setdefault(r.label, []).append(i)
    short = [c for c in range(num_classes) if len(by_class.get(c, [])) <= per_class]
    if short:
        have = min(len(by_class.get(c, [])) for c in short)
        raise SourceError(f"--val-per-class {per_class}: class {short[0]} has only {have} training images (a val of "
                          f"{per_class} would leave it none); choose a smaller N")
    rng = np.random.default_rng(seed)
    carved = {i for c in range(num_classes) for i in rng.choice(by_class[c], size=per_class, replace=False).tolist()}
    return ([r for i, r in enumerate(records) if i not in carved],
            [r for i, r in enumerate(records) if i in carved])


def _find_cifar(root: Path) -> tuple[Path, tuple]:
    for folder in (root, root / "cifar-10-batches-py", root / "cifar-100-python"):
        for layout in _CIFAR_LAYOUTS:
            if all((folder / n).is_file() for n in [*layout[0], layout[1], layout[2]]):
                return folder, layout
    raise SourceError(
        f"{root}: no CIFAR python pickles; expected data_batch_1..5, test_batch, batches.meta (CIFAR-10) or "
        "train, test, meta (CIFAR-100), e.g. the extracted cifar-10-batches-py folder"
    )


def _cifar_records(path: Path, label_key: bytes, num_classes: int) -> list[Record]:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    pixels = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = [int(v) for v in batch[label_key]]
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise SourceError(f"{path}: label {bad[0]} out of range 0..{num_classes - 1}; the pickle and meta disagree")
    return [Record(label, f"{path.name}:{i}", pixels=np.ascontiguousarray(pixels[i])) for i, label in enumerate(labels)]


# ---------------------------------------------------------------------------------------------- demo
def read_demo(seed: int) -> Source:
    """The built-in generated long-tailed set (:mod:`livt_ds.data.demo`)."""
    from livt_ds.data import demo  # imported lazily: only this source needs it

    classes = list(demo.DEMO_CLASSES)
    splits = {}
    for split in SPLITS:
        records = [Record(label, key, data=data) for key, data, label in demo.demo_samples(split, seed)]
        bad = [r for r in records if not 0 <= r.label < len(classes)]
        if bad:
            raise SourceError(f"demo {split} {bad[0].name}: label {bad[0].label} out of range 0..{len(classes) - 1}")
        splits[split] = records
    return Source("demo", classes, splits, args={"input": None})


def class_counts(records: list[Record], num_classes: int) -> list[int]:
    """Images per class, ``[num_classes]``."""
    counts = Counter(r.label for r in records)
    return [counts.get(i, 0) for i in range(num_classes)]
