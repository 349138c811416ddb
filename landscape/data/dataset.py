"""The :class:`Dataset` container and the key-driven train / held-out split.

A dataset is four arrays (train and test inputs and integer labels) plus what a report needs to
describe it; an optional validation pair holds examples set aside from the training set, so that
merging and alignment studies pick their hyper-parameters on validation data, never on test data.

Example:
    >>> import jax
    >>> from landscape import data
    >>> ds = data.blobs(jax.random.key(0), num_samples=100, num_classes=2, dim=2)
    >>> x, y = ds.train
    >>> x.shape, y.dtype
    ((80, 2), dtype('int32'))
    >>> ds = data.with_validation(jax.random.key(1), ds, fraction=0.25)
    >>> ds.to_dict()["num_train"], ds.to_dict()["num_val"]
    (60, 20)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landscape._types import Array, Key

__all__ = ["Dataset", "host_rng", "make_dataset", "split", "split_indices", "with_validation"]


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset: train / test (and optional validation) arrays with labels.

    Attributes:
        x_train: Training inputs, float32, shape ``(n_train, *input_shape)``.
        y_train: Training labels, int32 in ``[0, num_classes)``, shape ``(n_train,)``.
        x_test: Test inputs, float32, shape ``(n_test, *input_shape)`` (``n_test`` may be 0).
        y_test: Test labels, int32, shape ``(n_test,)``.
        num_classes: Number of classes ``C``; labels lie in ``0..C-1``.
        name: Short name used in reports (``"digits"``, ``"digits[0,1,2]"``, ...).
        input_shape: Shape of one input, e.g. ``(64,)`` or ``(8, 8, 1)`` (NHWC without N).
        x_val: Optional validation inputs split off the training set (see :func:`with_validation`).
        y_val: Optional validation labels.

    The dataclass is a pytree (arrays are leaves; ``num_classes``, ``name`` and ``input_shape`` are
    static), so a ``Dataset`` can be passed through ``jax.jit`` or moved with ``jax.device_put``.
    """

    x_train: Array
    y_train: Array
    x_test: Array
    y_test: Array
    num_classes: int
    name: str
    input_shape: tuple[int, ...]
    x_val: Array | None = None
    y_val: Array | None = None

    @property
    def train(self) -> tuple[Array, Array]:
        """``(x_train, y_train)``."""
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[Array, Array]:
        """``(x_test, y_test)``."""
        return self.x_test, self.y_test

    @property
    def val(self) -> tuple[Array, Array]:
        """``(x_val, y_val)``; raises ``ValueError`` when no validation split was made."""
        if self.x_val is None or self.y_val is None:
            msg = (
                f"dataset {self.name!r} has no validation split; make one with "
                "landscape.data.with_validation(key, ds, fraction=...)"
            )
            raise ValueError(msg)
        return self.x_val, self.y_val

    @property
    def has_val(self) -> bool:
        """Whether a validation split is present."""
        return self.x_val is not None

    def replace(self, **changes: Any) -> Dataset:
        """A copy with some fields replaced (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary: name, classes, input shape, split sizes and per-class counts."""
        out: dict[str, Any] = {
            "name": self.name,
            "num_classes": int(self.num_classes),
            "input_shape": [int(s) for s in self.input_shape],
            "num_train": int(np.shape(self.y_train)[0]),
            "num_test": int(np.shape(self.y_test)[0]),
            "train_class_counts": _counts(self.y_train, self.num_classes),
            "test_class_counts": _counts(self.y_test, self.num_classes),
        }
        if self.y_val is not None:
            out["num_val"] = int(np.shape(self.y_val)[0])
            out["val_class_counts"] = _counts(self.y_val, self.num_classes)
        return out


jax.tree_util.register_dataclass(
    Dataset,
    data_fields=["x_train", "y_train", "x_test", "y_test", "x_val", "y_val"],
    meta_fields=["num_classes", "name", "input_shape"],
)


def _counts(y: Array, num_classes: int) -> list[int]:
    return [int(c) for c in np.bincount(np.asarray(y), minlength=num_classes)]


def _as_inputs(x: Any, what: str) -> Array:
    arr = np.asarray(x)
    if arr.ndim < 2:
        msg = f"{what} must have shape (num_examples, *input_shape), got shape {arr.shape}"
        raise ValueError(msg)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        msg = f"{what} must hold real numbers, got dtype {arr.dtype}"
        raise ValueError(msg)
    return jnp.asarray(arr, dtype=jnp.float32)


def _as_labels(y: Any, n: int, num_classes: int, what: str) -> Array:
    arr = np.asarray(y)
    if arr.shape != (n,):
        msg = f"{what} must have shape ({n},) to match the inputs, got shape {arr.shape}"
        raise ValueError(msg)
    if n and not np.issubdtype(arr.dtype, np.integer):
        msg = f"{what} must be integer class labels, got dtype {arr.dtype}"
        raise ValueError(msg)
    if n and (arr.min() < 0 or arr.max() >= num_classes):
        msg = (
            f"{what} must lie in 0..{num_classes - 1} (num_classes={num_classes}), got labels in "
            f"{int(arr.min())}..{int(arr.max())}"
        )
        raise ValueError(msg)
    return jnp.asarray(arr, dtype=jnp.int32)


def make_dataset(
    train: tuple[Any, Any],
    test: tuple[Any, Any],
    *,
    num_classes: int,
    name: str,
    val: tuple[Any, Any] | None = None,
) -> Dataset:
    """Build a checked :class:`Dataset` from ``(x, y)`` pairs (numpy or jax arrays).

    Inputs become float32 and labels int32 jax arrays; shapes and label ranges are checked.

    Args:
        train: ``(x_train, y_train)``.
        test: ``(x_test, y_test)``; may hold zero examples.
        num_classes: Number of classes (labels must lie in ``0..num_classes-1``).
        name: Name used in reports.
        val: Optional ``(x_val, y_val)``.

    Returns:
        The dataset.

    Raises:
        ValueError: On inconsistent shapes, non-integer labels or labels out of range.
    """
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        msg = f"num_classes must be a positive integer, got {num_classes!r}"
        raise ValueError(msg)
    num_classes = int(num_classes)
    x_train = _as_inputs(train[0], "x_train")
    input_shape = tuple(int(s) for s in x_train.shape[1:])
    pairs = {"train": train, "test": test} | ({"val": val} if val is not None else {})
    arrays: dict[str, Array] = {}
    for part, (x, y) in pairs.items():
        xa = x_train if part == "train" else _as_inputs(x, f"x_{part}")
        if tuple(xa.shape[1:]) != input_shape:
            msg = (
                f"x_{part} has input shape {tuple(xa.shape[1:])} but x_train has {input_shape}; "
                "all parts of a dataset must share one input shape"
            )
            raise ValueError(msg)
        arrays[f"x_{part}"] = xa
        arrays[f"y_{part}"] = _as_labels(y, xa.shape[0], num_classes, f"y_{part}")
    if arrays["x_train"].shape[0] == 0:
        msg = f"dataset {name!r} has an empty training set"
        raise ValueError(msg)
    return Dataset(num_classes=num_classes, name=name, input_shape=input_shape, **arrays)


def _check_fraction(fraction: Any, what: str = "fraction") -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)):
        msg = f"{what} must be a number strictly between 0 and 1, got {fraction!r}"
        raise ValueError(msg)
    fraction = float(fraction)
    if not 0.0 < fraction < 1.0:
        msg = f"{what} must be strictly between 0 and 1, got {fraction}"
        raise ValueError(msg)
    return fraction


def host_rng(key: Key) -> np.random.Generator:
    """A NumPy generator determined by ``key``: PCG64 seeded with ``jax.random.bits(key, (4,))``.

    Used for host-side index shuffling, where a jax op would compile once per array size.
    """
    return np.random.default_rng(np.asarray(jax.random.bits(key, (4,), jnp.uint32)))


def split_indices(
    key: Key, y: Any, fraction: float, *, stratify: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays ``(kept, held)`` of a random split holding out ``fraction`` of the examples.

    With ``stratify=True`` every class contributes ``round(fraction * n_c)`` of its ``n_c``
    examples to the held-out part (so class proportions are kept up to rounding); otherwise the
    first ``round(fraction * n)`` entries of one random permutation are held out. Both parts are
    in random order. The permutation is drawn by NumPy's PCG64 generator seeded with 128 bits of
    ``jax.random.bits(key)`` (:func:`host_rng`), so a key fixes the split on every platform and no
    XLA program is compiled per dataset size.

    Raises:
        ValueError: On a fraction outside ``(0, 1)`` or when either part would be empty.
    """
    fraction = _check_fraction(fraction)
    labels = np.asarray(y)
    if labels.ndim != 1:
        msg = f"labels must have shape (num_examples,), got shape {labels.shape}"
        raise ValueError(msg)
    n = labels.shape[0]
    perm = host_rng(key).permutation(n)
    held = np.zeros(n, dtype=bool)
    if stratify:
        for c in np.unique(labels):
            members = perm[labels[perm] == c]
            held[members[: int(round(fraction * members.size))]] = True
    else:
        held[perm[: int(round(fraction * n))]] = True
    num_held = int(held.sum())
    if num_held == 0 or num_held == n:
        msg = (
            f"splitting {n} examples with fraction={fraction} leaves an empty "
            f"{'held-out' if num_held == 0 else 'kept'} part; choose a fraction with both parts "
            "non-empty"
        )
        raise ValueError(msg)
    return perm[~held[perm]], perm[held[perm]]


def split(
    key: Key, x: Any, y: Any, fraction: float, *, stratify: bool = True
) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    """Randomly split ``(x, y)`` into a kept part and a held-out part of about ``fraction``.

    Args:
        key: Typed PRNG key; fixes the split.
        x: Inputs with a leading example axis.
        y: Integer labels, shape ``(n,)``.
        fraction: Share of examples held out, strictly between 0 and 1.
        stratify: Hold out the same share of every class (default) or of the whole set.

    Returns:
        ``((x_kept, y_kept), (x_held, y_held))`` as jax arrays.

    Raises:
        ValueError: On a bad fraction, mismatched lengths, or an empty part.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x, y = jnp.arange(20.0)[:, None], jnp.arange(20) % 2
        >>> (xk, yk), (xh, yh) = split(jax.random.key(0), x, y, 0.2)
        >>> xk.shape, xh.shape, int(yh.sum())
        ((16, 1), (4, 1), 2)
    """
    if np.ndim(x) < 1 or np.ndim(y) != 1 or np.shape(x)[0] != np.shape(y)[0]:
        msg = f"x and y must share the leading example axis, got shapes {np.shape(x)} and {np.shape(y)}"
        raise ValueError(msg)
    kept, held = split_indices(key, y, fraction, stratify=stratify)
    xa, ya = np.asarray(x), np.asarray(y)  # index on the host: no per-shape XLA gathers
    return (jnp.asarray(xa[kept]), jnp.asarray(ya[kept])), (jnp.asarray(xa[held]), jnp.asarray(ya[held]))


def with_validation(
    key: Key, ds: Dataset, *, fraction: float = 0.1, stratify: bool = True
) -> Dataset:
    """Set aside ``fraction`` of the training set as a validation split (test set untouched).

    Merging and alignment studies choose hyper-parameters (λ, density, ...) on ``ds.val`` and
    report on ``ds.test``.

    Args:
        key: Typed PRNG key; fixes which examples are held out.
        ds: Dataset without a validation split.
        fraction: Share of the training set to hold out, strictly between 0 and 1.
        stratify: Keep class proportions (default).

    Returns:
        A dataset with a smaller training set and ``ds.val`` set.

    Raises:
        ValueError: If ``ds`` already has a validation split, or on a bad fraction.
    """
    if ds.has_val:
        msg = f"dataset {ds.name!r} already has a validation split of {np.shape(ds.y_val)[0]} examples"
        raise ValueError(msg)
    train, val = split(key, ds.x_train, ds.y_train, fraction, stratify=stratify)
    return ds.replace(x_train=train[0], y_train=train[1], x_val=val[0], y_val=val[1])

