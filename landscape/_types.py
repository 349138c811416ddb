"""Type aliases shared across the toolkit.

The toolkit sees models only as ``apply_fn(params, x) -> logits`` over a ``params`` pytree, so these
aliases are deliberately loose: any pytree of arrays is a ``Params``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

import jax

Array: TypeAlias = jax.Array
Params: TypeAlias = Any
"""Any pytree whose leaves are floating-point arrays."""
Batch: TypeAlias = tuple[Array, Array]
"""An ``(inputs, targets)`` pair with a shared leading example axis."""
ApplyFn: TypeAlias = Callable[[Params, Array], Array]
"""``apply_fn(params, x) -> logits``."""
LossFn: TypeAlias = Callable[[Array, Array], Array]
"""``loss_fn(logits, targets) -> per-example losses`` with shape ``(batch,)``."""
Key: TypeAlias = jax.Array
"""A typed PRNG key from ``jax.random.key``."""
