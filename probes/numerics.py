"""Non-finite values in probe results: one policy, one spread over seeds, one JSON conversion.

The policy (``docs/numerics.md``):

1. A probe never turns a non-finite value into a plausible number. A NaN or infinite loss at a
   point propagates as NaN into every number derived from it (a barrier, a mean), and the result
   says so with a ``finite`` flag; nothing is skipped silently.
2. A spread over seeds (:func:`spread`) is the mean and the sample standard deviation
   (``ddof=1``) of the **finite** samples, with ``n`` (finite samples) and ``n_nonfinite`` (the
   others) reported next to them and every sample kept. With no finite sample the mean is NaN;
   with fewer than two the standard deviation is NaN (undefined, not 0).
3. JSON has no NaN: :func:`json_safe` turns every non-finite float into ``None`` (``null``), the
   one converter every ``to_dict`` uses; reports then write with ``json.dump(..., allow_nan=False)``.

Example:
    >>> from probes.numerics import spread
    >>> s = spread([0.1, float("nan"), 0.3])
    >>> round(s.mean, 6), round(s.std, 6), s.n, s.n_nonfinite, s.finite
    (0.2, 0.141421, 2, 1, False)
    >>> s.to_dict()["samples"]
    [0.1, None, 0.3]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["Spread", "json_safe", "spread"]


def json_safe(x: Any) -> Any:
    """``x`` with arrays as lists, numpy scalars as Python numbers and NaN/±inf as ``None``.

    Recurses through dicts (keys kept), lists and tuples (both become lists); objects with a
    ``to_dict`` method are converted by it first. Everything else is returned as is.
    """
    if isinstance(x, Mapping):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.ndarray) or hasattr(x, "__array__"):
        return json_safe(np.asarray(x).tolist())
    if hasattr(x, "to_dict") and callable(x.to_dict):
        return json_safe(x.to_dict())
    return x


@dataclasses.dataclass(frozen=True)
class Spread:
    """Mean and spread of samples over seeds (or pairs), over their finite values.

    Scalars for 1-D samples; arrays of the remaining shape when the samples have more axes.

    Attributes:
        mean: mean of the finite samples (NaN when there is none).
        std: sample standard deviation of the finite samples, ``ddof=1`` (NaN when fewer than 2).
        n: number of finite samples.
        n_nonfinite: number of NaN / ±inf samples (excluded from ``mean`` and ``std``).
        samples: every sample, non-finite ones included, along the leading axis.
    """

    mean: Any
    std: Any
    n: Any
    n_nonfinite: Any
    samples: np.ndarray

    @property
    def finite(self) -> bool:
        """True when every sample is finite and there is at least one."""
        return bool(np.all(np.asarray(self.n_nonfinite) == 0) and np.all(np.asarray(self.n) > 0))

    def to_dict(self, *, samples: bool = True) -> dict[str, Any]:
        """``{"mean", "std", "n", "n_nonfinite", "samples"}``, non-finite values as ``None``
        (``samples=False`` leaves the samples out)."""
        out = {"mean": self.mean, "std": self.std, "n": self.n, "n_nonfinite": self.n_nonfinite}
        if samples:
            out["samples"] = self.samples
        return json_safe(out)


def _as_float_array(samples: Any) -> np.ndarray:
    if isinstance(samples, (list, tuple)):
        samples = [np.nan if v is None else v for v in samples]
    return np.asarray(samples, dtype=np.float64)


def spread(samples: Any, *, axis: int = 0) -> Spread:
    r"""The one mean/std over seeds of the toolkit (see the module docstring).

    .. math:: \bar x = \frac{1}{n}\sum_{i \in F} x_i, \qquad
              s = \sqrt{\frac{1}{n - 1}\sum_{i \in F}(x_i - \bar x)^2}, \qquad n = |F|,

    over the finite samples ``F``; ``None`` entries count as non-finite.

    Args:
        samples: array-like of samples; ``axis`` is the seed axis.
        axis: the axis to reduce.

    Returns:
        :class:`Spread` (Python floats / ints for 1-D samples).
    """
    a = np.moveaxis(_as_float_array(samples), axis, 0) if np.ndim(samples) else _as_float_array(samples)[None]
    ok = np.isfinite(a)
    n = ok.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, np.where(ok, a, 0.0).sum(axis=0) / np.maximum(n, 1), np.nan)
        dev = np.where(ok, a - mean, 0.0)
        std = np.where(n > 1, np.sqrt((dev**2).sum(axis=0) / np.maximum(n - 1, 1)), np.nan)
    bad = a.shape[0] - n
    if np.ndim(mean) == 0:
        return Spread(float(mean), float(std), int(n), int(bad), a)
    return Spread(mean, std, n, bad, a)
