"""Entry checks of plain settings and params trees, one definition each.

Every public function checks its settings at entry and raises a ``ValueError`` whose message
names the setting and what is accepted: ``"momentum: must be a finite number in [0, 1), got
1.5"``. The same checks (an int that is not a bool, a finite float in a range, a bool, one of
a few names) were written out by hand in many modules; these are the shared versions.

Each ``check_*`` returns the value converted to its plain Python type, so a caller can write
``steps = check_int("steps", steps, low=1)``. ``problem_*`` give the message without raising (for
callers, like the report config, that prefix a file name and a key).

Example:
    >>> from landscape._checks import check_float, check_int
    >>> check_int("steps", 3, low=1)
    3
    >>> check_float("momentum", 1.5, low=0.0, high=1.0, high_open=True)
    Traceback (most recent call last):
    ...
    ValueError: momentum: must be a finite number in [0, 1), got 1.5
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

__all__ = [
    "check_array_leaves",
    "check_bool",
    "check_choice",
    "check_float",
    "check_int",
    "problem_array_leaves",
    "problem_bool",
    "problem_choice",
    "problem_float",
    "problem_int",
]


def _fmt(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _range(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {_fmt(low)}"
    if high is not None:
        return f" {'<' if high_open else '<='} {_fmt(high)}"
    return ""


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def problem_int(value: Any, *, low: int | None = None, high: int | None = None) -> str | None:
    """What is wrong with ``value`` as an int in ``[low, high]`` (``None`` when nothing is).

    Bools are not ints here (``True`` for a step count is a mistake); NumPy integers are.
    """
    if not _is_int(value) or (low is not None and value < low) or (high is not None and value > high):
        return f"must be an int{_range(low, high, False, False)}, got {value!r}"
    return None


def problem_float(
    value: Any,
    *,
    finite: bool = True,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> str | None:
    """What is wrong with ``value`` as a real number in the given range (``None`` when nothing is).

    Ints are accepted (``learning_rate = 1`` in a TOML file); bools, strings and arrays are not.
    With ``finite=True`` (the default) NaN and infinities are refused: a NaN learning rate trains
    to NaN params without a word, and ``x < low`` is false for NaN, so range checks alone miss it.
    """
    kind = "a finite number" if finite else "a number"
    msg = f"must be {kind}{_range(low, high, low_open, high_open)}, got {value!r}"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return msg
    v = float(value)
    if math.isnan(v) or (finite and math.isinf(v)):
        return msg
    if low is not None and (v <= low if low_open else v < low):
        return msg
    if high is not None and (v >= high if high_open else v > high):
        return msg
    return None


def problem_bool(value: Any) -> str | None:
    """What is wrong with ``value`` as a bool (``None`` when nothing is); ``0``/``1`` are refused."""
    if not isinstance(value, (bool, np.bool_)):
        return f"must be a bool (true or false), got {value!r}"
    return None


def problem_choice(value: Any, accepted: Sequence[Any]) -> str | None:
    """What is wrong with ``value`` as one of ``accepted`` (``None`` when nothing is)."""
    try:
        ok = value in accepted
    except TypeError:  # an unhashable value tested against a set or dict
        ok = False
    if not ok:
        return f"unknown value {value!r}; accepted: {list(accepted)}"
    return None


def _raise(name: str, problem: str | None) -> None:
    if problem is not None:
        msg = f"{name}: {problem}"
        raise ValueError(msg)


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """``int(value)``, or ``ValueError`` naming ``name`` unless it is an int (not a bool) in ``[low, high]``."""
    _raise(name, problem_int(value, low=low, high=high))
    return int(value)


def check_float(
    name: str,
    value: Any,
    *,
    finite: bool = True,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``float(value)``, or ``ValueError`` naming ``name`` unless it is a real number in range.

    ``low_open`` / ``high_open`` exclude the bound: ``check_float("learning_rate", lr, low=0,
    low_open=True)`` accepts ``(0, inf)``; NaN and, with ``finite=True``, infinities never pass.
    """
    _raise(name, problem_float(value, finite=finite, low=low, high=high, low_open=low_open, high_open=high_open))
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    """``bool(value)``, or ``ValueError`` naming ``name`` unless it is a bool."""
    _raise(name, problem_bool(value))
    return bool(value)


def check_choice(name: str, value: Any, accepted: Sequence[Any]) -> Any:
    """``value``, or ``ValueError`` naming ``name`` and the accepted values unless it is one of them."""
    _raise(name, problem_choice(value, accepted))
    return value


def _is_array_leaf(leaf: Any) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray, np.generic, numbers.Number))


def problem_array_leaves(params: Any, *, what: str = "params") -> str | None:
    """What is wrong with ``params`` as a pytree of arrays (``None`` when nothing is).

    An Equinox module is a pytree whose leaves include its non-array fields (activation
    functions, ``None`` placeholders kept as leaves, Python objects); the tree operations would
    then fail deep inside ``jnp.result_type`` with "Cannot determine dtype". The message names
    the first such leaf and, for an Equinox module, the partition that separates the arrays.
    """
    from landscape.tree import key_name

    for path, leaf in jax.tree.leaves_with_path(params):
        if _is_array_leaf(leaf):
            continue
        kind = type(leaf).__name__
        msg = f"{what} leaf {key_name(path)!r} is a {kind}, not an array: params must be a pytree of arrays"
        if any(c.__module__.split(".")[0] == "equinox" for c in type(params).__mro__):
            msg += (
                f" ({what} is an Equinox module {type(params).__name__}, which holds non-array fields: pass "
                "params, static = eqx.partition(model, eqx.is_array) and an "
                "apply_fn(params, x) = jax.vmap(eqx.combine(params, static))(x))"
            )
        return msg
    return None


def check_array_leaves(params: Any, *, what: str = "params") -> None:
    """``ValueError`` naming the first leaf of ``params`` that is not an array (see :func:`problem_array_leaves`)."""
    problem = problem_array_leaves(params, what=what)
    if problem is not None:
        raise ValueError(problem)
