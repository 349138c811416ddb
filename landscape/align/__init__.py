"""Neuron alignment: permutation specs and the functions that act with them.

:mod:`landscape.align.spec` defines :class:`PermutationSpec` and :func:`apply`, the only place in the
toolkit that permutes parameters. :func:`trace_spec` derives the spec of any ``apply_fn`` from its
jaxpr and :func:`activations` returns its hidden activations at every permutation group
(:mod:`landscape.align.trace`). See ``docs/permutation-specs.md``.
"""

from landscape.align.spec import (
    Permutation,
    PermutationSpec,
    apply,
    apply_state,
    check_permutation,
    check_spec,
    compose,
    identity,
    invert,
    random_permutation,
)

__all__ = [
    "Permutation",
    "PermutationSpec",
    "apply",
    "apply_state",
    "check_permutation",
    "check_spec",
    "compose",
    "identity",
    "invert",
    "random_permutation",
]

from landscape.align.ot_fusion import OTFusionInfo, ot_fusion  # noqa: E402

__all__ += ["OTFusionInfo", "ot_fusion"]

# Matchers, STE and REPAIR/RESET (weight_matching.py, activation_matching.py, ste.py, repair.py).
from landscape.align.activation_matching import (  # noqa: E402
    ACTIVATION_METHODS,
    ActivationMatchingInfo,
    activation_matching,
    cross_statistics,
)
from landscape.align.repair import repair, repair_layers, reset, unit_statistics  # noqa: E402
from landscape.align.ste import STEInfo, ste_matching  # noqa: E402
from landscape.align.weight_matching import WeightMatchingInfo, weight_matching  # noqa: E402

__all__ += [
    "ACTIVATION_METHODS",
    "ActivationMatchingInfo",
    "STEInfo",
    "WeightMatchingInfo",
    "activation_matching",
    "cross_statistics",
    "repair",
    "repair_layers",
    "reset",
    "ste_matching",
    "unit_statistics",
    "weight_matching",
]

# Traced specs and activations of any model (trace.py).
from landscape.align.trace import (  # noqa: E402
    ACTIVATION_KINDS,
    LayerInputs,
    TracedModel,
    activations,
    match_names,
    rename,
    trace_spec,
    with_activations,
)

__all__ += [
    "ACTIVATION_KINDS",
    "LayerInputs",
    "TracedModel",
    "activations",
    "match_names",
    "rename",
    "trace_spec",
    "with_activations",
]
