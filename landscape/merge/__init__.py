"""Merging methods as pure pytree transforms.

Models first, settings keyword-only; ``finetuned``/``models`` is a list of matching params trees or
one stacked tree (leading model axis). Numeric settings (``lam``, ``density``, ``t``, ``drop``,
``weights``) may be traced, so a sweep is one ``jax.vmap``. Methods that need data take an
Objective (``greedy_soup``, ``adamerging``, ``zipit``) or statistics from a separate function
(``fisher_diagonal`` -> ``fisher_average``, ``gram_matrices`` -> ``regmean``, ``kfac_fisher`` ->
``mats``). ``METHODS`` maps names to methods with their paper and variant; docs/merging.md is the
catalogue.
"""

from landscape.merge import sparsify
from landscape.merge.adamerging import AdaMergingResult, adamerging
from landscape.merge.averaging import (
    GreedySoupResult,
    average,
    greedy_soup,
    model_stock,
    slerp,
    swa,
    swa_update,
)
from landscape.merge.catalogue import METHODS, Method
from landscape.merge.fisher import fisher_average, fisher_diagonal
from landscape.merge.mats import KroneckerFactors, kfac_fisher, mats
from landscape.merge.regmean import gram_matrices, regmean
from landscape.merge.task_vectors import (
    breadcrumbs,
    combine_task_vectors,
    dare,
    della,
    propagate_nonfinite,
    stacked_task_vectors,
    task_arithmetic,
    task_vector,
    ties,
)
from landscape.merge.zipit import ZipItResult, feature_correlations, zipit, zipit_matching

__all__ = [
    "METHODS",
    "AdaMergingResult",
    "GreedySoupResult",
    "KroneckerFactors",
    "Method",
    "adamerging",
    "average",
    "breadcrumbs",
    "combine_task_vectors",
    "dare",
    "della",
    "fisher_average",
    "fisher_diagonal",
    "gram_matrices",
    "greedy_soup",
    "kfac_fisher",
    "mats",
    "model_stock",
    "propagate_nonfinite",
    "regmean",
    "slerp",
    "sparsify",
    "stacked_task_vectors",
    "swa",
    "swa_update",
    "task_arithmetic",
    "task_vector",
    "ties",
    "ZipItResult",
    "feature_correlations",
    "zipit",
    "zipit_matching",
]

from landscape.merge.tact import align_experts, head_leaves, tact  # noqa: E402

__all__ += ["align_experts", "head_leaves", "tact"]

from landscape.merge.evolutionary import EvolutionaryResult, evolutionary_merge, layer_groups  # noqa: E402

__all__ += ["EvolutionaryResult", "evolutionary_merge", "layer_groups"]

from landscape.merge.federated import (  # noqa: E402
    ClientSplit,
    FederatedResult,
    client_key,
    fedavg,
    fedsgd,
    split_clients,
)
from landscape.merge.moe import (  # noqa: E402
    MoEModel,
    MoEResult,
    Routing,
    hidden_prototypes,
    load_balancing_loss,
    moe_from_mlps,
)
from landscape.merge.sparse_soups import (  # noqa: E402
    CycleRecord,
    SparseSoupResult,
    SWAResult,
    apply_mask,
    geometric_sparsities,
    imp_sparsities,
    magnitude_mask,
    mask_sparsity,
    particle_key,
    sparse_model_soup,
    swa_with_bn_update,
    swamp,
)

__all__ += [
    "ClientSplit", "CycleRecord", "FederatedResult", "MoEModel", "MoEResult", "Routing", "SWAResult",
    "SparseSoupResult", "apply_mask", "client_key", "fedavg", "fedsgd", "geometric_sparsities", "hidden_prototypes",
    "imp_sparsities", "load_balancing_loss", "magnitude_mask", "mask_sparsity", "moe_from_mlps", "particle_key",
    "sparse_model_soup", "split_clients", "swa_with_bn_update", "swamp",
]

from landscape.merge.spherical import karcher, multislerp, nearswap, nuslerp, sce  # noqa: E402
from landscape.merge.subspace import cart, iso_c, iso_cts, tsv_merge, wudi, wudi_loss  # noqa: E402

__all__ += ["cart", "iso_c", "iso_cts", "karcher", "multislerp", "nearswap", "nuslerp", "sce", "tsv_merge", "wudi",
            "wudi_loss"]
