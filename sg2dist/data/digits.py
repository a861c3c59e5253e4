"""The built-in quickstart dataset: scikit-learn's 1,797 handwritten digits at 32 px.

scikit-learn ships the images (8 x 8, 16 grey levels), so nothing is downloaded.
They are written as a folder-per-class of PNGs and converted with prepare's own
code (grayscale, Lanczos upscaling: smooth strokes instead of 4 x 4 blocks), into
shards of 256 so the loader has several shards to draw from.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
from PIL import Image

from sg2dist import storage
from sg2dist.data.imageops import ConvertSettings
from sg2dist.data.manifest import MANIFEST_NAME
from sg2dist.data.prepare import prepare_dataset
from sg2dist.errors import UserError

DIGITS_RESOLUTION = 32
DIGITS_SHARD_SIZE = 256


def _write_digit_pngs(folder: str) -> None:
    from sklearn.datasets import load_digits  # heavy import, only on first use

    digits = load_digits()
    for index, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        pixels = np.round(image * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
        class_dir = os.path.join(folder, str(int(label)))
        os.makedirs(class_dir, exist_ok=True)
        Image.fromarray(pixels, "L").save(os.path.join(class_dir, f"{index:04d}.png"))


def ensure_digits_dataset(folder: str) -> str:
    """Build the digits dataset in `folder` unless its manifest is there; returns the URL."""
    if storage.exists(storage.join(folder, MANIFEST_NAME)):
        return folder
    settings = ConvertSettings(
        resolution=DIGITS_RESOLUTION, channels=1, crop="none", resize_filter="lanczos"
    )
    with tempfile.TemporaryDirectory(prefix="sg2dist-digits-") as source:
        _write_digit_pngs(source)
        try:
            prepare_dataset(
                source,
                folder,
                settings,
                labels="folders",
                shard_size=DIGITS_SHARD_SIZE,
                workers=1,
                progress=False,
            )
        except UserError:
            # Another process (a second rank) may have finished the same build first.
            if not storage.exists(storage.join(folder, MANIFEST_NAME)):
                raise
    return folder
