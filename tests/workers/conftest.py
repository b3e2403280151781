"""Fixtures for the workers' tests: small ImageFolder archives of real Fashion-MNIST images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from workers.sample_data import (
    balanced_indices,
    fashion_mnist_available,
    load_fashion_mnist,
    write_imagefolder,
)

needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist",
)


@pytest.fixture(scope="session")
def fashion_test():
    if not fashion_mnist_available():
        pytest.skip("Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
    return load_fashion_mnist("test")


@pytest.fixture(scope="session")
def small_images(fashion_test):
    """4 real images per class for 3 classes: (images (12, 28, 28), labels (12,))."""
    images, labels = fashion_test
    keep = np.isin(labels, [0, 1, 7])
    images, labels = images[keep], labels[keep]
    idx = balanced_indices(labels, 4)
    return images[idx], labels[idx]


@pytest.fixture(scope="session")
def small_zip(tmp_path_factory, small_images) -> Path:
    """An ImageFolder zip wrapped in one top-level folder, as macOS' Compress makes them."""
    path = tmp_path_factory.mktemp("data") / "small.zip"
    return write_imagefolder(path, *small_images, wrapper="fashion/")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")
