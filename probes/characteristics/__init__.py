"""The survey's loss-landscape characteristics (§6.1), measured: one function each, returning a
result with a headline number, the raw measurements behind it and spreads over seeds.

* :func:`convexity` — mode convexity (§6.1.1): chords, barriers, SWA and ensemble gains and
  curvature of a basin sampled around a solution (:mod:`probes.basin`).
* :func:`determinism` — mode determinism (§6.1.2): the instability analysis of Frankle et al.
  2020 (arXiv 1912.05671), barrier between children vs spawn step and its onset.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from landscape import Objective
    >>> from probes.characteristics import convexity
    >>> obj = Objective(lambda p, x: jnp.zeros((x.shape[0], 1)) + jnp.sum(p ** 2),
    ...                 jnp.zeros((2, 1)), jnp.zeros((2, 1)), loss=lambda z, y: z[:, 0])
    >>> convexity(jax.random.key(0), obj, [jnp.ones(2), -jnp.ones(2)], curvature=False).chord_fraction
    1.0
"""

from probes.characteristics._convexity import (
    CONVEXITY_METRICS,
    QUICK_CONVEXITY,
    ConvexityResult,
    ConvexitySample,
    convexity,
    convexity_from_training,
    quick_convexity,
)
from probes.characteristics._determinism import (
    QUICK_DETERMINISM,
    DeterminismResult,
    determinism,
    quick_determinism,
    spawn_ladder,
)

__all__ = [
    "CONVEXITY_METRICS",
    "QUICK_CONVEXITY",
    "QUICK_DETERMINISM",
    "ConvexityResult",
    "ConvexitySample",
    "DeterminismResult",
    "convexity",
    "convexity_from_training",
    "determinism",
    "quick_convexity",
    "quick_determinism",
    "spawn_ladder",
]

from probes.characteristics._connectivity import (  # noqa: E402
    CONNECTIVITY_METHODS,
    ConnectivityResult,
    ConnectivitySample,
    connectivity,
    connectivity_vs_width,
)

__all__ += ["CONNECTIVITY_METHODS", "ConnectivityResult", "ConnectivitySample", "connectivity", "connectivity_vs_width"]

from probes.characteristics._directedness import DirectednessResult, directedness  # noqa: E402

__all__ += ["DirectednessResult", "directedness"]
