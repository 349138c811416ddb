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
    assemble_blocks,
    check_blocks,
    check_permutation,
    check_spec,
    compose,
    identity,
    invert,
    random_permutation,
    split_blocks,
)

__all__ = [
    "Permutation",
    "PermutationSpec",
    "apply",
    "apply_state",
    "assemble_blocks",
    "check_blocks",
    "check_permutation",
    "check_spec",
    "compose",
    "identity",
    "invert",
    "random_permutation",
    "split_blocks",
]

from landscape.align.ot_fusion import OTFusionInfo, ot_fusion  # noqa: E402

__all__ += ["OTFusionInfo", "ot_fusion"]

# Transformer OT fusion (Imfeld et al., arXiv 2310.05719; transformer_fusion.py).
from landscape.align.transformer_fusion import (  # noqa: E402
    TransformerFusionInfo,
    TransformerLayout,
    transformer_activations,
    transformer_ot_fusion,
)

__all__ += ["TransformerFusionInfo", "TransformerLayout", "transformer_activations", "transformer_ot_fusion"]

# Matchers, STE and REPAIR/RESET (weight_matching.py, activation_matching.py, ste.py, repair.py).
from landscape.align.activation_matching import (  # noqa: E402
    ACTIVATION_METHODS,
    ActivationMatchingInfo,
    activation_matching,
    cross_statistics,
)
from landscape.align.repair import repair, repair_layers, reset, unit_statistics  # noqa: E402
from landscape.align.ste import STEInfo, ste_matching  # noqa: E402
from landscape.align.weight_matching import WeightMatchingInfo, blockwise_assignment, weight_matching  # noqa: E402

__all__ += [
    "ACTIVATION_METHODS",
    "ActivationMatchingInfo",
    "STEInfo",
    "WeightMatchingInfo",
    "activation_matching",
    "blockwise_assignment",
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
    LayerOutputs,
    TracedModel,
    activations,
    layer_outputs,
    match_names,
    rename,
    trace_spec,
    with_activations,
)

__all__ += [
    "ACTIVATION_KINDS",
    "LayerInputs",
    "LayerOutputs",
    "TracedModel",
    "activations",
    "layer_outputs",
    "match_names",
    "rename",
    "trace_spec",
    "with_activations",
]

# Bayesian nonparametric neuron matching of several models (pfnm.py).
from landscape.align.pfnm import (  # noqa: E402
    PFNMResult,
    fedma,
    match_neurons,
    objective_retrain,
    pfnm,
    pfnm_cost,
)

__all__ += ["PFNMResult", "fedma", "match_neurons", "objective_retrain", "pfnm", "pfnm_cost"]
