"""Config-driven access to the datasets by name: ``load("digits", test_fraction=0.2)``.

Example:
    >>> from landscape import data
    >>> data.load("moons", seed=3, num_samples=100).num_classes
    2
    >>> sorted(data.DATASETS)  # doctest: +NORMALIZE_WHITESPACE
    ['arrays', 'blobs', 'cifar10', 'cifar100', 'digits', 'fashion_mnist', 'mnist', 'mnist1d',
     'mnist_idx', 'moons', 'stdlib_text', 'text_files']

The file loaders take the folder as ``path=``: ``load("cifar10", path="~/data/cifar-10-batches-bin")``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from landscape.data.dataset import Dataset
from landscape.data.files import arrays, cifar10, cifar100, fashion_mnist, mnist_idx
from landscape.data.images import mnist
from landscape.data.standard import digits, mnist1d
from landscape.data.synthetic import blobs, moons
from landscape.data.text import stdlib_text, text_files

__all__ = ["DATASETS", "load"]

DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": digits,
    "mnist1d": mnist1d,
    "blobs": blobs,
    "moons": moons,
    "mnist": mnist,
    "mnist_idx": mnist_idx,
    "fashion_mnist": fashion_mnist,
    "cifar10": cifar10,
    "cifar100": cifar100,
    "arrays": arrays,
    "stdlib_text": stdlib_text,
    "text_files": text_files,
}
"""Dataset name -> constructor."""

_KEYED = ("blobs", "moons")


def load(name: str, **kwargs: Any) -> Dataset:
    """Build the dataset called ``name`` with keyword settings (as read from a config file).

    The synthetic sets (``"blobs"``, ``"moons"``) need randomness: pass either ``key=`` (a typed
    PRNG key) or ``seed=`` (an integer, default 0, turned into ``jax.random.key(seed)``).

    Args:
        name: One of ``"digits"``, ``"mnist1d"``, ``"mnist"``, ``"blobs"``, ``"moons"``, or a loader
            of files on disk: ``"mnist_idx"``, ``"fashion_mnist"``, ``"cifar10"``, ``"cifar100"``,
            ``"arrays"`` (these need ``path=``, the folder or file); ``"stdlib_text"`` (byte-level
            language modelling on Python's own source) and ``"text_files"`` (``paths=`` a list of
            UTF-8 files), see :mod:`landscape.data.text`.
        **kwargs: Settings of that constructor (keyword-only ones, plus ``path`` for file loaders).

    Returns:
        The dataset.

    Raises:
        ValueError: On an unknown name or keyword (the message lists the accepted ones).
    """
    if name not in DATASETS:
        msg = f"unknown dataset {name!r}; accepted names: {sorted(DATASETS)}"
        raise ValueError(msg)
    fn = DATASETS[name]
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind in named]
    if name in _KEYED:
        params = [p for p in params if p.name != "key"]
    accepted = [p.name for p in params]
    if name in _KEYED:
        accepted = ["key", "seed", *accepted]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        msg = f"unknown setting(s) {unknown} for dataset {name!r}; accepted: {accepted}"
        raise ValueError(msg)
    missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in kwargs]
    if missing:
        msg = f"dataset {name!r} needs {missing} (the folder or file holding it); accepted: {accepted}"
        raise ValueError(msg)
    if name not in _KEYED:
        return fn(**kwargs)
    kwargs = dict(kwargs)
    key, seed = kwargs.pop("key", None), kwargs.pop("seed", None)
    if key is not None and seed is not None:
        msg = f"dataset {name!r}: pass either key= or seed=, not both"
        raise ValueError(msg)
    if key is None:
        seed = 0 if seed is None else seed
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            msg = f"dataset {name!r}: seed must be an integer, got {seed!r}"
            raise ValueError(msg)
        key = jax.random.key(int(seed))
    return fn(key, **kwargs)
