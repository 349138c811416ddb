"""Task constructors for merging and directedness studies: class subsets, permuted inputs, relabelled.

Each takes a :class:`~landscape.data.Dataset` and returns a new one; train, test and (when present)
validation parts are transformed the same way, so a "task" is fully described by the dataset it
returns. Typical uses: split the 10 digits into two 5-class tasks and merge the two fine-tuned
models; build permuted-pixel tasks (Goodfellow et al. 2013, arXiv:1312.6211) for continual-learning
style merging; or relabel the classes to get tasks with the same inputs but different outputs.

Example:
    >>> import jax
    >>> from landscape import data
    >>> ds = data.digits()
    >>> a = data.class_subset(ds, [0, 1, 2, 3, 4])
    >>> b = data.class_subset(ds, [5, 6, 7, 8, 9])
    >>> a.num_classes, sorted(set(b.y_train.tolist()))
    (5, [0, 1, 2, 3, 4])
    >>> p = data.permuted_inputs(jax.random.key(0), ds)
    >>> p.name
    'digits-permuted'
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, overload

import jax
import jax.numpy as jnp
import numpy as np

from landscape._types import Key
from landscape.data.dataset import Dataset

__all__ = ["class_subset", "permuted_inputs", "relabelled"]

_PARTS = ("train", "test", "val")


def _parts(ds: Dataset) -> list[str]:
    return [p for p in _PARTS if getattr(ds, f"y_{p}") is not None]


def class_subset(ds: Dataset, classes: Sequence[int], *, relabel: bool = True) -> Dataset:
    """Keep only the examples of ``classes`` (in train, test and validation).

    Args:
        ds: Source dataset.
        classes: Distinct class labels to keep, each in ``0..ds.num_classes-1``.
        relabel: Map ``classes[i] -> i`` (so the result has ``len(classes)`` classes and a model
            with that many outputs fits it); with ``False`` labels and ``num_classes`` are kept.

    Returns:
        The subset, named e.g. ``"digits[0,1,2]"``.

    Raises:
        ValueError: On no classes, a repeated or unknown class, or an empty training set (or an
            empty test / validation part where ``ds`` had examples).
    """
    if isinstance(classes, jax.Array):
        classes = np.asarray(classes)
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence | np.ndarray):
        msg = f"classes must be a sequence of class labels in 0..{ds.num_classes - 1}, got {classes!r}"
        raise ValueError(msg)
    wanted = list(classes)
    if not wanted:
        msg = f"classes must name at least one class in 0..{ds.num_classes - 1}, got an empty sequence"
        raise ValueError(msg)
    for c in wanted:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 0 <= c < ds.num_classes:
            msg = f"unknown class {c!r} for dataset {ds.name!r}: accepted classes are 0..{ds.num_classes - 1}"
            raise ValueError(msg)
    wanted = [int(c) for c in wanted]
    if len(set(wanted)) != len(wanted):
        msg = f"classes must be distinct, got {wanted}"
        raise ValueError(msg)
    table = np.full(ds.num_classes, -1, dtype=np.int32)
    table[wanted] = np.arange(len(wanted), dtype=np.int32) if relabel else wanted
    name = f"{ds.name}[{','.join(str(c) for c in wanted)}]"
    changes: dict[str, Any] = {}
    for part in _parts(ds):
        x, y = getattr(ds, f"x_{part}"), np.asarray(getattr(ds, f"y_{part}"))
        keep = np.flatnonzero(table[y] >= 0)
        if keep.size == 0 and (y.size > 0 or part == "train"):
            msg = f"class_subset({wanted}) of dataset {ds.name!r} leaves its {part} set empty"
            raise ValueError(msg)
        changes[f"x_{part}"] = jnp.asarray(np.asarray(x)[keep])
        changes[f"y_{part}"] = jnp.asarray(table[y[keep]], dtype=jnp.int32)
    return ds.replace(num_classes=len(wanted) if relabel else ds.num_classes, name=name, **changes)


def input_permutation(key: Key, input_shape: Sequence[int]) -> jax.Array:
    """The permutation :func:`permuted_inputs` applies for ``key`` and ``input_shape``.

    For vector inputs ``(d,)`` it permutes the ``d`` features; for inputs with a trailing channel
    axis (``(H, W, C)``, ``(L, C)``) it permutes the ``prod(shape[:-1])`` positions and keeps each
    position's channels together (the permuted-pixel construction).
    """
    shape = tuple(int(s) for s in input_shape)
    n = shape[0] if len(shape) == 1 else math.prod(shape[:-1])
    return jax.random.permutation(key, n)


def permuted_inputs(key: Key, ds: Dataset) -> Dataset:
    """Apply one fixed random permutation of input features / pixels to every example.

    The same permutation (from :func:`input_permutation`) is used for train, test and validation,
    so the task is as learnable as the original for a fully connected model while destroying
    spatial structure: ``x'[..., i] = x[..., perm[i]]``.

    Args:
        key: Typed PRNG key fixing the permutation.
        ds: Source dataset.

    Returns:
        The permuted dataset, named ``f"{ds.name}-permuted"``.
    """
    shape = tuple(ds.input_shape)
    if not shape:
        msg = f"permuted_inputs needs inputs with at least one feature axis, got input_shape {shape}"
        raise ValueError(msg)
    perm = np.asarray(input_permutation(key, shape))
    changes: dict[str, Any] = {}
    for part in _parts(ds):
        x = np.asarray(getattr(ds, f"x_{part}"))
        n = x.shape[0]
        if len(shape) == 1:
            changes[f"x_{part}"] = jnp.asarray(x[:, perm])
        else:
            flat = x.reshape(n, -1, shape[-1])
            changes[f"x_{part}"] = jnp.asarray(flat[:, perm, :].reshape(x.shape))
    return ds.replace(name=f"{ds.name}-permuted", **changes)


def _mapping_table(mapping: Sequence[int] | Mapping[int, int], num_classes: int) -> np.ndarray:
    accepted = f"a permutation of 0..{num_classes - 1} (sequence of length {num_classes} or dict old->new)"
    if isinstance(mapping, jax.Array):
        mapping = np.asarray(mapping)
    if isinstance(mapping, Mapping):
        table = np.arange(num_classes)
        for old, new in mapping.items():
            for v in (old, new):
                if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < num_classes:
                    msg = f"mapping must be {accepted}; got entry {old!r}: {new!r}"
                    raise ValueError(msg)
            table[int(old)] = int(new)
    elif isinstance(mapping, Sequence | np.ndarray) and not isinstance(mapping, (str, bytes)):
        values = list(mapping)
        if len(values) != num_classes or any(
            isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in values
        ):
            msg = f"mapping must be {accepted}; got {values!r}"
            raise ValueError(msg)
        table = np.asarray(values, dtype=np.int64)
    else:
        msg = f"mapping must be {accepted}; got {mapping!r}"
        raise ValueError(msg)
    if sorted(table.tolist()) != list(range(num_classes)):
        msg = f"mapping must be {accepted}; it maps classes 0..{num_classes - 1} to {table.tolist()}"
        raise ValueError(msg)
    return table.astype(np.int32)


@overload
def relabelled(ds: Dataset, mapping: Sequence[int] | Mapping[int, int], /) -> Dataset: ...
@overload
def relabelled(key: Key, ds: Dataset, /) -> Dataset: ...
def relabelled(first: Any, second: Any, /) -> Dataset:
    """A fixed permutation of the class labels: ``y' = mapping[y]``.

    Two forms:

    * ``relabelled(ds, mapping)``: ``mapping`` is a sequence with ``mapping[old] = new`` (a
      permutation of ``0..C-1``) or a dict ``{old: new}`` (classes not named map to themselves;
      the result must still be a permutation).
    * ``relabelled(key, ds)``: a uniformly random permutation ``jax.random.permutation(key, C)``.

    Args:
        first: The dataset, or a typed PRNG key.
        second: The mapping, or the dataset.

    Returns:
        The relabelled dataset, named ``f"{ds.name}-relabelled"``.

    Raises:
        ValueError: If the mapping is not a permutation of the classes.
    """
    if isinstance(first, Dataset):
        ds, table = first, _mapping_table(second, first.num_classes)
    elif isinstance(second, Dataset):
        ds = second
        table = np.asarray(jax.random.permutation(first, ds.num_classes), dtype=np.int32)
    else:
        msg = (
            "relabelled takes (ds, mapping) or (key, ds); got "
            f"({type(first).__name__}, {type(second).__name__})"
        )
        raise ValueError(msg)
    changes = {
        f"y_{part}": jnp.asarray(table[np.asarray(getattr(ds, f"y_{part}"))], dtype=jnp.int32)
        for part in _parts(ds)
    }
    return ds.replace(name=f"{ds.name}-relabelled", **changes)
