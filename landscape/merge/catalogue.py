"""``METHODS``: every merging method by name, with its paper and the published variant implemented.

Each entry is a :class:`Method`, callable exactly like the function it wraps (with some settings
fixed for the named variants, e.g. ``"dare_ties"``), so config-driven code can do
``METHODS[name](models, **settings)``.

Example:
    >>> from landscape.merge import METHODS
    >>> METHODS["ties"].arxiv
    '2306.01708'
    >>> sorted(METHODS["dare"].needs)
    ['base', 'key']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from landscape.merge.adamerging import adamerging
from landscape.merge.averaging import average, greedy_soup, model_stock, slerp, swa
from landscape.merge.fisher import fisher_average
from landscape.merge.mats import mats
from landscape.merge.regmean import regmean
from landscape.merge.task_vectors import breadcrumbs, dare, della, task_arithmetic, ties
from landscape.merge.zipit import zipit

__all__ = ["METHODS", "Method"]


@dataclasses.dataclass(frozen=True)
class Method:
    """A merging method: the function, fixed settings for a named variant, and its provenance.

    Attributes:
        name: registry name.
        fn: the function in :mod:`landscape.merge`.
        paper: short citation.
        arxiv: arXiv id, or None for methods without one.
        variant: which published variant (and defaults) the function implements.
        needs: what a call needs besides the models: ``"base"``, ``"key"``, ``"data"`` (an
            Objective), ``"statistics"`` (Fishers / Gram matrices from a separate function).
        fixed: settings the variant fixes (passed before the caller's keyword arguments).
        jittable: whether ``jax.jit`` can wrap the call (string options and counts static); None
            where not recorded.
        architectures: which models it supports (``"any pytree"``: any params tree; otherwise the
            layers or model families it needs).
        checked_against: the peer implementation (or closed form) its tests compare with.
    """

    name: str
    fn: Callable[..., Any]
    paper: str
    arxiv: str | None
    variant: str
    needs: frozenset[str] = frozenset()
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    jittable: bool | None = None
    architectures: str = ""
    checked_against: str = ""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **{**self.fixed, **kwargs})

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description."""
        return {
            "name": self.name,
            "function": f"landscape.merge.{self.fn.__name__}",
            "paper": self.paper,
            "arxiv": self.arxiv,
            "variant": self.variant,
            "needs": sorted(self.needs),
            "fixed": dict(self.fixed),
            "jittable": self.jittable,
            "architectures": self.architectures,
            "checked_against": self.checked_against,
        }


def _m(name: str, fn: Callable[..., Any], paper: str, arxiv: str | None, variant: str,
       needs: tuple[str, ...] = (), **fixed: Any) -> Method:
    return Method(name, fn, paper, arxiv, variant, frozenset(needs), MappingProxyType(fixed))


_ALL = [
    _m("average", average, "Wortsman et al. 2022, Model soups (uniform soup); McMahan et al. 2017, FedAvg",
       "2203.05482", "weighted mean sum(w_i theta_i)/sum(w_i) (mergekit linear, normalize=True)"),
    _m("fedavg", average, "McMahan et al. 2017, Communication-efficient learning (FedAvg)", "1602.05629",
       "average weighted by sample counts: pass weights=counts"),
    _m("swa", swa, "Izmailov et al. 2018, Averaging weights leads to wider optima", "1803.05407",
       "equal-weight running average of the given checkpoints"),
    _m("greedy_soup", greedy_soup, "Wortsman et al. 2022, Model soups (greedy soup)", "2203.05482",
       "sorted by held-out accuracy, add if soup accuracy does not drop (>=)", ("data",)),
    _m("model_stock", model_stock, "Jang et al. 2024, Model Stock", "2403.19522",
       "per tensor or per row; pairwise cosines averaged (mergekit) or angles (FusionBench)", ("base",)),
    _m("slerp", slerp, "Shoemake 1985, quaternion slerp; mergekit slerp", None,
       "per tensor, lerp fallback when |cos| > 0.9995, eps=1e-8 normalisation"),
    _m("task_arithmetic", task_arithmetic, "Ilharco et al. 2023, Editing models with task arithmetic",
       "2212.04089", "theta_0 + lam * sum(w_i tau_i); negation by negative lam", ("base",)),
    _m("ties", ties, "Yadav et al. 2023, TIES-Merging", "2306.01708",
       "exact top-k trim (leaf: mergekit, global: original), mass sign election, disjoint mean",
       ("base",)),
    _m("ties_sum", ties, "Yadav et al. 2023, TIES-Merging (FusionBench default)", "2306.01708",
       "TIES with disjoint sum (FusionBench merge_func=sum; use lam=0.3)", ("base",), merge="sum"),
    _m("dare", dare, "Yu et al. 2024, Language models are Super Mario (DARE)", "2311.03099",
       "Bernoulli drop, rescale 1/(1-p), task arithmetic (mergekit dare_linear with paper rescale)",
       ("base", "key")),
    _m("dare_ties", dare, "Yu et al. 2024, DARE + TIES sign election", "2311.03099",
       "Bernoulli drop, rescale 1/(1-p), sign election, disjoint sum (mergekit dare_ties)",
       ("base", "key"), combine="ties"),
    _m("breadcrumbs", breadcrumbs, "Davari & Belilovsky 2023, Model breadcrumbs", "2312.06795",
       "per row (last axis): drop top-gamma, keep next beta; task arithmetic", ("base",)),
    _m("breadcrumbs_ties", breadcrumbs, "Davari & Belilovsky 2023 + TIES election (mergekit)",
       "2312.06795", "breadcrumbs mask, sign election, disjoint sum", ("base",), combine="ties"),
    _m("della", della, "Deep et al. 2024, DELLA-Merging", "2406.11617",
       "MAGPRUNE row-wise rank probabilities, 1/p rescale, sign election, disjoint mean",
       ("base", "key")),
    _m("della_linear", della, "Deep et al. 2024, DELLA-Merging without election (mergekit)",
       "2406.11617", "MAGPRUNE, 1/p rescale, task arithmetic", ("base", "key"),
       combine="task_arithmetic"),
    _m("fisher", fisher_average, "Matena & Raffel 2022, Merging models with Fisher-weighted averaging",
       "2111.09832", "exact per-example diagonal Fisher; floor F+1e-6 for all (FusionBench) or max "
       "on target (original); coefficients normalised by ||F||", ("statistics",)),
    _m("regmean", regmean, "Jin et al. 2023, Dataless knowledge fusion (RegMean)", "2212.09849",
       "Gram matrices X^T X per dense kernel, off-diagonal scale alpha, other leaves averaged",
       ("statistics",)),
    _m("mats", mats, "Tam et al. 2024, Merging by matching models in task parameter subspaces",
       "2312.04339", "block-diagonal Fisher (diagonal or K-FAC blocks), CG from the average",
       ("statistics",)),
    _m("adamerging", adamerging, "Yang et al. 2024, AdaMerging", "2310.02575",
       "layer-wise (or task-wise) coefficients, Adam on prediction entropy, init 0.3; full-data "
       "steps (default) or the paper's mini-batches of 16 (batch_size=16, key=)",
       ("base", "data")),
    _m("zipit", zipit, "Stoica et al. 2024, ZipIt! Merging models from different tasks without training",
       "2305.03053", "greedy within/across-model feature matching on correlations (alpha=0.3, "
       "beta=0.125), MLP chains, optional partial zipping", ("data",)),
]

METHODS: Mapping[str, Method] = MappingProxyType({m.name: m for m in _ALL})
"""Name -> :class:`Method`, read-only."""

from landscape.merge.tact import tact as _tact  # noqa: E402

METHODS = MappingProxyType({
    **METHODS,
    "tact": _m("tact", _tact, "Sharma, Roy & Dziugaite 2024, The non-local model merging problem (TACT)",
               "2410.12766", "per-task rescale+shift of hidden pre-activations to the expert's exact "
               "per-unit mean/std on task data, folded into each layer; per-task heads kept",
               ("data",)),
})

from landscape.merge.evolutionary import evolutionary_merge as _evolutionary  # noqa: E402

METHODS = MappingProxyType({
    **METHODS,
    "evolutionary": _m("evolutionary", _evolutionary, "Akiba et al. 2024, Evolutionary optimization of model "
                       "merging recipes (parameter space)", "2403.13187",
                       "CMA-ES (evosax) over per-model, per-layer-group weights (and optional densities) of "
                       "task arithmetic / TIES (disjoint sum) / DARE (fixed mask key); fitness = summed "
                       "Objective loss or -accuracy", ("base", "key", "data")),
})

from landscape.merge.federated import fedavg as _fedavg_loop  # noqa: E402
from landscape.merge.federated import fedsgd as _fedsgd_loop  # noqa: E402
from landscape.merge.moe import moe_from_mlps as _moe  # noqa: E402
from landscape.merge.sparse_soups import sparse_model_soup as _sms  # noqa: E402
from landscape.merge.sparse_soups import swa_with_bn_update as _swa_bn  # noqa: E402
from landscape.merge.sparse_soups import swamp as _swamp  # noqa: E402

METHODS = MappingProxyType({
    **METHODS,
    "moe": _m("moe", _moe, "Shazeer et al. 2017, sparsely-gated MoE; mergekit-moe (Mixtral upcycling)", "1701.06538",
              "zoo-MLP hidden layers as experts, head shared (base or average), router from normalised mean "
              "hidden states of each expert's examples (gate='hidden') or randn; top-k softmax renormalised",
              ("data",)),
    "switch": _m("switch", _moe, "Fedus et al. 2021, Switch Transformers", "2101.03961",
                 "top-1 routing weighted by the router probability; load_balancing_loss = E sum f_i P_i; "
                 "no capacity factor", ("data",), router="switch", top_k=1),
    "fedavg_rounds": _m("fedavg_rounds", _fedavg_loop, "McMahan et al. 2017, FedAvg (Algorithm 1)", "1602.05629",
                        "rounds of client sampling (C), E local epochs with batch B, n_k-weighted average",
                        ("key", "data")),
    "fedsgd": _m("fedsgd", _fedsgd_loop, "McMahan et al. 2017, FedSGD", "1602.05629",
                 "one full-batch local gradient step per round, n_k-weighted average (= weighted gradient "
                 "average)", ("key", "data")),
    "sparse_model_soup": _m("sparse_model_soup", _sms, "Zimmer et al. 2023, Sparse model soups", "2306.16788",
                            "IMP with global magnitude pruning, per-cycle uniform (or greedy) soup of particles "
                            "retrained from the pruned soup under a shared mask", ("key", "data")),
    "swamp": _m("swamp", _swamp, "Choi et al. 2023, SWAMP", "2305.14852",
                "IMP where each cycle averages SWA particles (optional weight rewinding); prune the average",
                ("key", "data")),
    "swa_bn": _m("swa_bn", _swa_bn, "Izmailov et al. 2018, SWA with BatchNorm update", "1803.05407",
                 "equal-weight checkpoint average, then RESET of BatchNorm statistics on the training inputs",
                 ("data",)),
})

# --- issue 15 part 5: newest task-vector and spherical methods; part 8: provenance of every entry ---

from landscape.merge.spherical import karcher as _karcher  # noqa: E402
from landscape.merge.spherical import multislerp as _multislerp  # noqa: E402
from landscape.merge.spherical import nearswap as _nearswap  # noqa: E402
from landscape.merge.spherical import nuslerp as _nuslerp  # noqa: E402
from landscape.merge.spherical import sce as _sce  # noqa: E402
from landscape.merge.subspace import cart as _cart  # noqa: E402
from landscape.merge.subspace import iso_c as _iso_c  # noqa: E402
from landscape.merge.subspace import iso_cts as _iso_cts  # noqa: E402
from landscape.merge.subspace import tsv_merge as _tsv  # noqa: E402
from landscape.merge.subspace import wudi as _wudi  # noqa: E402

METHODS = MappingProxyType({
    **METHODS,
    "tsv_merge": _m("tsv_merge", _tsv, "Gargiulo et al. 2025 (CVPR), Task Singular Vectors", "2412.00081",
                    "per matrix: top floor(r/T) singular triplets of each task, U and V^T orthogonalised by polar "
                    "factors; vectors averaged (FusionBench TaskSingularVectorMerging)", ("base",)),
    "iso_c": _m("iso_c", _iso_c, "Marczak et al. 2025, No task left behind: isotropic model merging (Iso-C)",
                "2502.04959", "per matrix: mean singular value times the polar factor of the task-vector sum; "
                "vectors averaged (FusionBench ISO_C_Merge)", ("base",)),
    "iso_cts": _m("iso_cts", _iso_cts, "Marczak et al. 2025, isotropic merging in common and task subspaces "
                  "(Iso-CTS)", "2502.04959", "common left/right subspace of the sum (fraction 0.8) plus each "
                  "task's top directions outside it, flat spectrum (FusionBench ISO_CTS_Merge)", ("base",)),
    "wudi": _m("wudi", _wudi, "Cheng et al. 2025, Whoever started the interference should end it (WUDI)",
               "2503.08099", "data-free: per matrix, 300 Adam steps (lr 1e-5) from the task-vector sum on "
               "sum_i ||(tau - tau_i) tau_i^T||^2 / ||tau_i||^2; vectors averaged (FusionBench wudi_merging)",
               ("base",)),
    "cart": _m("cart", _cart, "Choi et al. 2024, Revisiting weight averaging for model merging (CART)",
               "2412.12153", "average + lam * sum of rank-k truncations of the task vectors centred on the "
               "average (rank_fraction 0.1); no base model"),
    "nuslerp": _m("nuslerp", _nuslerp, "mergekit nuslerp (Goddard et al. 2024, mergekit)", "2403.13257",
                  "SLERP of two models or their task vectors at t = w1/(w0+w1), per leaf or per output unit"),
    "multislerp": _m("multislerp", _multislerp, "mergekit multislerp (Goddard et al. 2024, mergekit)", "2403.13257",
                     "weighted barycentre on the hypersphere via one tangent-space step, per leaf"),
    "karcher": _m("karcher", _karcher, "mergekit karcher: Riemannian (Karcher 1977) mean (Goddard et al. 2024, mergekit)", "2403.13257",
                  "equal-weight Karcher mean of each leaf's direction (10 iterations, tol 1e-5) times the mean norm"),
    "sce": _m("sce", _sce, "Wan et al. 2024, FuseChat (SCE: select, calculate, erase)", "2408.07990",
              "per leaf: top-variance selection, mean-square model weights, TIES sign consensus (mergekit sce)",
              ("base",)),
    "nearswap": _m("nearswap", _nearswap, "mergekit nearswap", None,
                   "per entry: w = clip(t/|a-b|, 0, 1), result w*other + (1-w)*base"),
})

_ANY = "any pytree"
_MATRIX = "any pytree; SVD on rank>=2 leaves (conv kernels reshaped per output unit along out_axis), vectors averaged"
_MK = "mergekit 0.1.5 outputs (tensor-wise kernel: tests/probes/test_merge_command.py)"
_OWN = "closed forms / invariants in its own tests (no peer code)"
_PROVENANCE: dict[str, tuple[bool | None, str, str]] = {
    "average": (True, _ANY, _MK + " (linear)"),
    "fedavg": (True, _ANY, _OWN),
    "swa": (True, _ANY, _OWN),
    "greedy_soup": (False, _ANY + " with an Objective", _OWN),
    "model_stock": (True, _ANY + "; scope='row' per output unit along out_axis",
                    "mergekit 0.1.5 model_stock and filter_wise (pytree, tests/landscape/test_merge_exact.py)"),
    "slerp": (True, _ANY, _MK),
    "task_arithmetic": (True, _ANY, _MK),
    "ties": (True, _ANY, _MK + "; original topk_values_mask count (trim='original', numpy transcription)"),
    "ties_sum": (True, _ANY, _OWN),
    "dare": (True, _ANY, _MK + " with recorded masks"),
    "dare_ties": (True, _ANY, _MK + " with recorded masks"),
    "breadcrumbs": (True, _ANY + "; groups per output unit along out_axis",
                    "mergekit 0.1.5 breadcrumbs (pytree, scope='leaf', tests/landscape/test_merge_exact.py)"),
    "breadcrumbs_ties": (True, _ANY, _MK),
    "della": (True, _ANY + "; ranks per output unit along out_axis",
              "mergekit 0.1.5 della with recorded masks (pytree, tests/landscape/test_merge_exact.py)"),
    "della_linear": (True, _ANY, "mergekit 0.1.5 della_linear with recorded masks (pytree)"),
    "fisher": (True, _ANY, _OWN),
    "regmean": (True, "dense kernels named by features_fn; other leaves averaged", _OWN),
    "mats": (True, "dense and conv kernels (K-FAC blocks; conv read as (kh*kw*in, out)); diagonal blocks elsewhere",
             "closed form: dense Kronecker solve (tests/landscape/test_merge_exact.py)"),
    "adamerging": (True, _ANY + " with Objectives", _OWN),
    "zipit": (False, "MLP chains (dense layers)", _OWN),
    "tact": (None, "zoo models with a PermutationSpec", _OWN),
    "evolutionary": (False, _ANY + " with an Objective", _OWN),
    "moe": (None, "zoo MLPs", _OWN),
    "switch": (None, "zoo MLPs", _OWN),
    "fedavg_rounds": (False, "any apply_fn with params", _OWN),
    "fedsgd": (False, "any apply_fn with params", _OWN),
    "sparse_model_soup": (False, "any apply_fn with params", _OWN),
    "swamp": (False, "any apply_fn with params", _OWN),
    "swa_bn": (None, "models with BatchNorm state", _OWN),
    "tsv_merge": (True, _MATRIX, "FusionBench 0.2.33 compute_and_sum_svd_mem_reduction (tests/data/fusionbench)"),
    "iso_c": (True, _MATRIX, "FusionBench 0.2.33 iso_c"),
    "iso_cts": (True, _MATRIX, "FusionBench 0.2.33 iso_cts"),
    "wudi": (True, _MATRIX, "FusionBench 0.2.33 wudi_merging"),
    "cart": (True, _MATRIX, "closed form (numpy SVD); not in FusionBench 0.2.33"),
    "nuslerp": (True, _ANY, "mergekit 0.1.5 nuslerp (flatten, rows, row_wise)"),
    "multislerp": (True, _ANY, "mergekit 0.1.5 multislerp (with and without base)"),
    "karcher": (True, _ANY, "mergekit 0.1.5 karcher"),
    "sce": (True, _ANY, "mergekit 0.1.5 sce"),
    "nearswap": (True, _ANY, "mergekit 0.1.5 nearswap"),
}

METHODS = MappingProxyType({
    name: (dataclasses.replace(m, jittable=_PROVENANCE[name][0], architectures=_PROVENANCE[name][1],
                               checked_against=_PROVENANCE[name][2]) if name in _PROVENANCE else m)
    for name, m in METHODS.items()
})
