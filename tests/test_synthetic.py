"""livt_ds/data/synthetic.py: photo-like JPEGs, the image folder and its determinism."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from livt_ds.data.synthetic import photo_jpeg, write_image_folder


def test_jpeg_size_jitter_and_determinism():
    sizes = set()
    for i in range(12):
        blob = photo_jpeg(3, i, (60, 40), (5, 4))
        assert blob == photo_jpeg(3, i, (60, 40), (5, 4))  # image i depends on (seed, i) only
        image = Image.open(io.BytesIO(blob))
        assert image.format == "JPEG" and image.mode == "RGB"
        assert 55 <= image.width <= 65 and 36 <= image.height <= 44
        sizes.add(image.size)
    assert len(sizes) > 1
    assert photo_jpeg(3, 0, (60, 40)) != photo_jpeg(4, 0, (60, 40))
    assert Image.open(io.BytesIO(photo_jpeg(0, 0, (30, 20)))).size == (30, 20)
    with pytest.raises(ValueError, match="larger sides"):
        photo_jpeg(0, 0, (2, 2), (4, 0))


def test_folder_is_the_same_with_a_pool(tmp_path):
    one = write_image_folder(tmp_path / "one", 7, size=(24, 20), classes=3)
    two = write_image_folder(tmp_path / "two", 7, size=(24, 20), classes=3, workers=2)
    files = sorted(p.relative_to(one).as_posix() for p in one.rglob("*.jpg"))
    assert files == [f"train/c{i % 3:04d}/{i:06d}.jpg" for i in sorted(range(7), key=lambda i: (i % 3, i))]
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
