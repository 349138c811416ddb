"""The model zoo (Flax NNX) and the bridge to pure pytrees.

Models: :class:`MLP`, :class:`CNN` (small VGG-style), :class:`VGG` (VGG-11/13/16/19 with a width
multiplier; :class:`VGG11`, :class:`VGG16`), :class:`ResNet` and :class:`ResNet20` (ResNet-20 xk),
each exporting its :class:`~landscape.align.PermutationSpec`, and the transformers :class:`GPT` (causal
decoder) and :class:`ViT` (:mod:`landscape.models.transformer`). :func:`functional` turns any NNX module
into ``(apply_fn, params, state)`` so the rest of the toolkit sees only pytrees; :func:`build` makes a
model from a name and a key for config-driven use.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from landscape import models
    >>> apply_fn, params, state = models.functional(
    ...     models.build("cnn", jax.random.key(0), in_channels=1, num_classes=10, widths=(8, 16)))
    >>> apply_fn(params, jnp.zeros((4, 8, 8, 1))).shape
    (4, 10)
    >>> apply_fn.spec.names
    ('P_0', 'P_1')
"""

from landscape.models.base import NORMS, Taps, ZooModel
from landscape.models.cnn import CNN, VGG, VGG11, VGG16, VGG_CONFIGS
from landscape.models.functional import INTERMEDIATE_KINDS, FunctionalModel, functional
from landscape.models.mlp import MLP
from landscape.models.registry import MODELS, build, permutation_spec
from landscape.models.resnet import ResNet, ResNet20
from landscape.models.transformer import GPT, ViT

__all__ = [
    "CNN",
    "INTERMEDIATE_KINDS",
    "MLP",
    "MODELS",
    "NORMS",
    "FunctionalModel",
    "GPT",
    "ResNet",
    "ResNet20",
    "Taps",
    "VGG",
    "VGG11",
    "VGG16",
    "VGG_CONFIGS",
    "ViT",
    "ZooModel",
    "build",
    "functional",
    "permutation_spec",
]
