"""Config-driven construction: ``build(name, key, **kwargs)`` and ``permutation_spec(model)``.

Example:
    >>> import jax
    >>> from landscape.models import build
    >>> model = build("mlp", jax.random.key(0), in_features=64, widths=(16, 10))
    >>> type(model).__name__
    'MLP'
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from landscape._types import Key
from landscape.align.spec import PermutationSpec
from landscape.models.cnn import CNN, VGG, VGG11, VGG16
from landscape.models.functional import FunctionalModel
from landscape.models.mlp import MLP
from landscape.models.resnet import ResNet, ResNet20
from landscape.models.transformer import GPT, ViT

__all__ = ["MODELS", "build", "permutation_spec"]

MODELS: dict[str, type[nnx.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "resnet": ResNet,
    "resnet20": ResNet20,
    "vgg": VGG,
    "vgg11": VGG11,
    "vgg16": VGG16,
    "gpt": GPT,
    "vit": ViT,
}
"""Zoo models by name: ``"resnet20"`` and ``"vgg11"`` / ``"vgg16"`` are the width ladders of
git-re-basin and REPAIR (``width_multiplier=k``); ``"vgg"`` takes ``depth=``; ``"gpt"`` / ``"vit"`` are the
transformers of :mod:`landscape.models.transformer`."""


def _arguments(cls: type) -> tuple[list[str], list[str]]:
    """``(required, optional)`` constructor arguments of ``cls`` other than ``rngs``."""
    required, optional = [], []
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", "rngs"):
            continue
        (required if p.default is inspect.Parameter.empty else optional).append(name)
    return required, optional


def build(name: str, key: Key, **kwargs: Any) -> nnx.Module:
    """Build a zoo model by name with its parameters drawn from ``key``.

    Args:
        name: ``"mlp"``, ``"cnn"``, ``"resnet"``, ``"resnet20"``, ``"vgg"``, ``"vgg11"``, ``"vgg16"``,
            ``"gpt"`` or ``"vit"``.
        key: a typed PRNG key (``jax.random.key(seed)``); the model's ``nnx.Rngs`` is made from it.
        **kwargs: the model's constructor arguments except ``rngs``, e.g.
            ``build("mlp", key, in_features=64, widths=(512, 512, 10))``.

    Raises:
        ValueError: unknown ``name``, a raw ``uint32`` key, or unknown / missing arguments (the
            message lists the accepted ones).
    """
    if name not in MODELS:
        msg = f"unknown model {name!r}; accepted: {sorted(MODELS)}"
        raise ValueError(msg)
    if not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        msg = f"build needs a typed key from jax.random.key(seed), got {getattr(key, 'dtype', type(key))}"
        raise ValueError(msg)
    if key.shape != ():
        msg = f"build needs a single key, got a key array of shape {key.shape}"
        raise ValueError(msg)
    cls = MODELS[name]
    required, optional = _arguments(cls)
    unknown = sorted(set(kwargs) - set(required) - set(optional))
    missing = [a for a in required if a not in kwargs]
    if unknown or missing:
        msg = (
            f"bad arguments for model {name!r}: unknown {unknown}, missing {missing}; "
            f"required: {required}, optional: {optional}"
        )
        raise ValueError(msg)
    return cls(**kwargs, rngs=nnx.Rngs(key))


def permutation_spec(model: nnx.Module | FunctionalModel) -> PermutationSpec:
    """The :class:`~landscape.align.PermutationSpec` of a zoo model or of its ``FunctionalModel``."""
    if isinstance(model, FunctionalModel):
        if model.spec is None:
            msg = "this FunctionalModel wraps a module without permutation_spec(); write a spec by hand"
            raise ValueError(msg)
        return model.spec
    if hasattr(model, "permutation_spec"):
        return model.permutation_spec()
    msg = (
        f"{type(model).__name__} has no permutation spec; accepted: {sorted(MODELS)} models, "
        "their FunctionalModel, or write a PermutationSpec by hand (docs/permutation-specs.md)"
    )
    raise ValueError(msg)
