"""The built-in quickstart dataset: scikit-learn's digits prepared with prepare's own code."""

from __future__ import annotations

import os

import numpy as np
from sklearn.datasets import load_digits

from sg2dist.data import ensure_digits_dataset, iter_images, open_manifest
from sg2dist.data.manifest import MANIFEST_NAME


def test_digits_dataset_holds_all_1797_labelled_32px_grayscale_digits(digits_url):
    manifest = open_manifest(digits_url)
    assert (manifest.num_images, manifest.resolution, manifest.channels) == (1797, 32, 1)
    assert manifest.label_names == [str(d) for d in range(10)] and manifest.skipped == []

    labels, brightness = [], []
    for pixels, label in iter_images(digits_url):
        labels.append(label)
        brightness.append(pixels.mean())
    assert np.array_equal(np.bincount(labels), np.bincount(load_digits().target))
    assert min(brightness) > 10  # every image has a visible stroke


def test_second_call_reuses_the_prepared_digits(digits_url):
    manifest_path = os.path.join(digits_url, MANIFEST_NAME)
    before = os.stat(manifest_path).st_mtime_ns
    assert ensure_digits_dataset(digits_url) == digits_url
    assert os.stat(manifest_path).st_mtime_ns == before
