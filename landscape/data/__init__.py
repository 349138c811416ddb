"""Datasets as arrays: sklearn digits, MNIST-1D, 5000 real MNIST images, synthetic blobs / moons,
loaders of image files a user already has (MNIST / Fashion-MNIST IDX, CIFAR-10 / -100 binary
batches, NumPy arrays), and task constructors.

Everything returns a :class:`Dataset` (float32 inputs, int32 labels, jax arrays); functions that
draw randomness take a typed key first. Nothing here downloads anything or unpickles anything.

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
from landscape.data.files import (
    arrays,
    cifar10,
    cifar100,
    fashion_mnist,
    mnist_idx,
    read_cifar_binary,
    read_idx,
)
from landscape.data.images import STANDARDIZE, mnist, preprocess_images
from landscape.data.registry import DATASETS, load
from landscape.data.standard import digits, digits_full, mnist1d
from landscape.data.synthetic import blobs, moons
from landscape.data.text import STDLIB_FILES, TextDataset, file_subset, stdlib_text, text_files
from landscape.data.tasks import class_subset, input_permutation, permuted_inputs, relabelled

__all__ = [
    "DATASETS",
    "STANDARDIZE",
    "STDLIB_FILES",
    "Dataset",
    "TextDataset",
    "arrays",
    "blobs",
    "cifar10",
    "cifar100",
    "class_subset",
    "digits",
    "digits_full",
    "fashion_mnist",
    "file_subset",
    "host_rng",
    "input_permutation",
    "load",
    "make_dataset",
    "mnist",
    "mnist1d",
    "mnist_idx",
    "moons",
    "permuted_inputs",
    "preprocess_images",
    "read_cifar_binary",
    "read_idx",
    "relabelled",
    "split",
    "split_indices",
    "stdlib_text",
    "text_files",
    "with_validation",
]
