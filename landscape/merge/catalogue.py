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
    """

    name: str
    fn: Callable[..., Any]
    paper: str
    arxiv: str | None
    variant: str
    needs: frozenset[str] = frozenset()
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)

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
       "layer-wise (or task-wise) coefficients, Adam on full-data prediction entropy, init 0.3",
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
