"""landscape: loss-landscape geometry and model merging in JAX.

Foundations (pure functions over parameter pytrees); the measurements live in :mod:`probes`.
"""

from landscape import tree
from landscape.objective import Objective

__all__ = ["Objective", "tree"]
__version__ = "0.1.0"
