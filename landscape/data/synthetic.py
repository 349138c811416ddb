"""Synthetic classification data drawn with JAX from an explicit key: Gaussian blobs and two moons.

Example:
    >>> import jax
    >>> from landscape import data
    >>> ds = data.moons(jax.random.key(0), num_samples=200, noise=0.1)
    >>> ds.x_train.shape, ds.num_classes
    ((160, 2), 2)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from landscape._types import Key
from landscape.data.dataset import Dataset, _check_fraction, make_dataset, split_indices

__all__ = ["blobs", "moons"]


def _check_int(value: object, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        msg = f"{what} must be an integer >= {low}, got {value!r}"
        raise ValueError(msg)
    return int(value)


def _check_nonneg(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not value >= 0:
        msg = f"{what} must be a non-negative number, got {value!r}"
        raise ValueError(msg)
    return float(value)


def _finish(key: Key, x: jax.Array, y: jax.Array, num_classes: int, test_fraction: float, name: str) -> Dataset:
    x, y = np.asarray(x), np.asarray(y)
    kept, held = split_indices(key, y, test_fraction, stratify=True)
    return make_dataset((x[kept], y[kept]), (x[held], y[held]), num_classes=num_classes, name=name)


@functools.partial(jax.jit, static_argnames=("num_samples", "num_classes", "dim"))
def _blobs_arrays(
    key: Key, std: jax.Array, center_box: jax.Array, *, num_samples: int, num_classes: int, dim: int
) -> tuple[jax.Array, jax.Array]:
    k_centre, k_noise = jax.random.split(key)
    centres = jax.random.uniform(
        k_centre, (num_classes, dim), jnp.float32, minval=-center_box, maxval=center_box
    )
    y = jnp.arange(num_samples, dtype=jnp.int32) % num_classes  # order is randomised by the split
    x = centres[y] + std * jax.random.normal(k_noise, (num_samples, dim), jnp.float32)
    return x, y


@functools.partial(jax.jit, static_argnames=("num_samples",))
def _moons_arrays(key: Key, noise: jax.Array, *, num_samples: int) -> tuple[jax.Array, jax.Array]:
    n_out = (num_samples + 1) // 2
    n_in = num_samples - n_out
    t_out = jnp.linspace(0.0, jnp.pi, n_out)
    t_in = jnp.linspace(0.0, jnp.pi, n_in)
    x = jnp.concatenate(
        [
            jnp.stack([jnp.cos(t_out), jnp.sin(t_out)], axis=1),
            jnp.stack([1.0 - jnp.cos(t_in), 0.5 - jnp.sin(t_in)], axis=1),
        ]
    ).astype(jnp.float32)
    y = jnp.concatenate([jnp.zeros(n_out, jnp.int32), jnp.ones(n_in, jnp.int32)])
    x = x + noise * jax.random.normal(key, x.shape, jnp.float32)
    return x, y  # order is randomised by the split


def blobs(
    key: Key,
    *,
    num_samples: int = 1000,
    num_classes: int = 3,
    dim: int = 2,
    std: float = 1.0,
    center_box: float = 5.0,
    test_fraction: float = 0.2,
) -> Dataset:
    """Isotropic Gaussian blobs: ``x = mu_y + std * eps`` with ``eps ~ N(0, I_dim)``.

    Class centres ``mu_c ~ Uniform[-center_box, center_box]^dim``; classes are balanced (sizes
    differ by at most one); the test part is a stratified share ``test_fraction`` and both parts
    come in random order. The same key always gives the same data.

    Args:
        key: Typed PRNG key (centres, points and split use independent subkeys).
        num_samples: Total number of points (at least 2 per class).
        num_classes: Number of blobs / classes.
        dim: Input dimension.
        std: Standard deviation of every blob.
        center_box: Half-width of the box the centres are drawn from.
        test_fraction: Share of points in the test set, strictly between 0 and 1.

    Returns:
        A :class:`~landscape.data.Dataset` named ``"blobs"`` with inputs ``(n, dim)``.
    """
    num_classes = _check_int(num_classes, "num_classes", 1)
    num_samples = _check_int(num_samples, "num_samples", 2 * num_classes)
    dim = _check_int(dim, "dim", 1)
    std = _check_nonneg(std, "std")
    center_box = _check_nonneg(center_box, "center_box")
    test_fraction = _check_fraction(test_fraction, "test_fraction")
    k_data, k_split = jax.random.split(key)
    x, y = _blobs_arrays(
        k_data, jnp.float32(std), jnp.float32(center_box), num_samples=num_samples, num_classes=num_classes, dim=dim
    )
    return _finish(k_split, x, y, num_classes, test_fraction, "blobs")


def moons(
    key: Key,
    *,
    num_samples: int = 1000,
    noise: float = 0.1,
    test_fraction: float = 0.2,
) -> Dataset:
    """Two interleaving half circles (as ``sklearn.datasets.make_moons``) plus Gaussian noise.

    Class 0: ``(cos t, sin t)``, class 1: ``(1 - cos t, 1/2 - sin t)`` with ``t`` evenly spaced in
    ``[0, pi]``, then ``x += noise * eps``, ``eps ~ N(0, I_2)``; a stratified share
    ``test_fraction`` forms the test set, and both parts come in random order.

    Args:
        key: Typed PRNG key.
        num_samples: Total number of points (class 0 gets the extra one when odd), at least 4.
        noise: Standard deviation of the added Gaussian noise.
        test_fraction: Share of points in the test set, strictly between 0 and 1.

    Returns:
        A :class:`~landscape.data.Dataset` named ``"moons"`` with inputs ``(n, 2)``.
    """
    num_samples = _check_int(num_samples, "num_samples", 4)
    noise = _check_nonneg(noise, "noise")
    test_fraction = _check_fraction(test_fraction, "test_fraction")
    k_data, k_split = jax.random.split(key)
    x, y = _moons_arrays(k_data, jnp.float32(noise), num_samples=num_samples)
    return _finish(k_split, x, y, 2, test_fraction, "moons")
