"""Datasets as arrays: sklearn digits, MNIST-1D, synthetic blobs / moons, and task constructors.

Everything returns a :class:`Dataset` (float32 inputs, int32 labels, jax arrays); functions that
draw randomness take a typed key first. Nothing here downloads anything.

Example:
    >>> import jax
    >>> from landscape import data
    >>> ds = data.load("digits")
    >>> ds = data.with_validation(jax.random.key(0), ds, fraction=0.1)
    >>> low = data.class_subset(ds, [0, 1, 2, 3, 4])
    >>> low.num_classes, low.val[0].shape[1]
    (5, 64)
"""

from landscape.data.dataset import (
    Dataset,
    host_rng,
    make_dataset,
    split,
    split_indices,
    with_validation,
)
from landscape.data.registry import DATASETS, load
from landscape.data.standard import digits, digits_full, mnist1d
from landscape.data.synthetic import blobs, moons
from landscape.data.tasks import class_subset, input_permutation, permuted_inputs, relabelled

__all__ = [
    "DATASETS",
    "Dataset",
    "blobs",
    "class_subset",
    "digits",
    "digits_full",
    "host_rng",
    "input_permutation",
    "load",
    "make_dataset",
    "mnist1d",
    "moons",
    "permuted_inputs",
    "relabelled",
    "split",
    "split_indices",
    "with_validation",
]
