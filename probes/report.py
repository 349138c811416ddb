"""Batch geometry reports: ``landscape report [CONFIG.toml] --out DIR``.

A report trains (or loads from its checkpoint cache) a small model zoo, runs every probe section
on it and writes

* ``DIR/index.html`` — one self-contained page (plotly.js embedded once; opens offline);
* ``DIR/results.json`` — every number behind the page, with ``schema_version`` (see
  ``docs/report-schema.md``);
* ``DIR/checkpoints/`` — safetensors files named by model, seeds and a digest of the settings that
  produced them, so a rerun with the same settings loads instead of training.

Sections are functions ``section(ctx) -> Section``; each is timed and recorded. The config is
validated in full (file, then dataset and model construction) before any training starts.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import html
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from landscape import Objective, io, models, tree
from landscape import data as data_lib
from landscape.train import TrainResult, Trainer, make_optimizer
from probes.config import ConfigError, ReportConfig, check_dataset_fit
from probes.curves import PathResult, interpolate
from probes.numerics import json_safe
from probes.plot import COLORS, figure_html, path_figure

__all__ = ["SCHEMA_VERSION", "Context", "Section", "TrainedModel", "is_token_dataset", "run_report"]

SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """One zoo member: its seeds, parameters, model state and where it came from."""

    index: int
    init_seed: int
    data_seed: int
    params: Any
    state: Any
    checkpoint: str
    cached: bool
    train_seconds: float
    losses: np.ndarray


@dataclasses.dataclass
class Context:
    """What every section sees: the config, data, the functional model and the trained zoo."""

    config: ReportConfig
    out: Path
    dataset: Any
    apply_fn: Any
    train_objective: Objective
    test_objective: Objective
    models: list[TrainedModel]
    key: jax.Array
    log: Callable[[str], None]
    loss: str = "cross_entropy"
    """The objectives' and the Trainer's loss: ``"next_token"`` on token data (see :func:`is_token_dataset`)."""
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Results shared between sections (e.g. the aligned model and fitted curve for the surfaces)."""

    def level(self, section: str) -> str:
        """The configured setting of a section: ``"quick"``, ``"full"`` or ``"off"``."""
        return getattr(self.config.sections, section)

    def section_key(self, section: str) -> jax.Array:
        """A key of its own for each section (``fold_in`` of the report key with a fixed integer)."""
        return jax.random.fold_in(self.key, SECTION_IDS.index(section))

    def objective(self, split: str, member: TrainedModel | None = None) -> Objective:
        """The train or test Objective, bound to ``member``'s model state when it has one."""
        obj = self.train_objective if split == "train" else self.test_objective
        if member is not None and member.state and hasattr(self.apply_fn, "with_state"):
            obj = obj.replace(apply_fn=self.apply_fn.with_state(member.state))
        return obj


@dataclasses.dataclass(frozen=True)
class Section:
    """A rendered report section: anchor id, title, HTML body and its JSON results."""

    id: str
    title: str
    body: str
    results: dict[str, Any]


# ---------------------------------------------------------------------------- setup
TOKEN_MODELS = ("gpt",)
"""Zoo models that read token ids (``(N, T)`` int) and need a token dataset."""

TRANSFORMER_MODELS = ("gpt", "vit")
"""Zoo transformers: their taps are layer inputs only, so activation matching reads the traced spec's
units (:class:`landscape.align.TracedModel`), and REPAIR is skipped (:data:`TRANSFORMER_SKIPPED_METHODS`)."""

TOKEN_SKIPPED = {
    "convexity": "mode convexity (FGE basin sampling) is switched off on token data in this version",
    "determinism": "instability analysis is switched off on token data in this version",
    "directedness": "task vectors and merges are built for image classification (class splits, permuted pixels); "
                    "tasks from the corpus's source files (landscape.data.file_subset) are not wired into the "
                    "report yet",
}
"""Sections a report on token data does not run, with the note shown in their place (HTML and
``results.json``): never a crash, never a silent omission."""

TRANSFORMER_SKIPPED_METHODS = {
    "repair": "REPAIR needs one layer to fold each unit group's correction into; a transformer's residual-stream "
              "group is written by every block (embeddings, attention and MLP outputs, norms), so the "
              "weight-matched line is not REPAIRed",
}
"""Connectivity methods skipped on a transformer, with the reason recorded."""


def is_token_dataset(dataset: Any) -> bool:
    """Whether ``dataset`` is next-token data: a :class:`~landscape.data.TextDataset`, or integer
    targets ``(N, T)`` of the inputs' shape (one next-token id, or ``IGNORE_INDEX``, per position).

    Decided from the data, never from the model name: the objectives then use ``loss="next_token"``.
    """
    if isinstance(dataset, data_lib.TextDataset):
        return True
    x, y = dataset.train
    return (not isinstance(x, dict) and np.ndim(y) == 2 and np.shape(y) == np.shape(x)
            and np.issubdtype(np.asarray(y).dtype, np.integer))


def _image_geometry(name: str, shape: tuple[int, ...]) -> tuple[int, int]:
    """``(side, channels)`` of square images with inputs of ``shape`` (NHWC, HW or flattened rows)."""
    if len(shape) == 3 and shape[0] == shape[1]:
        return int(shape[0]), int(shape[2])
    if len(shape) == 2 and shape[0] == shape[1]:
        return int(shape[0]), 1
    if len(shape) == 1 and math.isqrt(int(shape[0])) ** 2 == int(shape[0]):
        return math.isqrt(int(shape[0])), 1
    msg = f"model 'vit' needs square images, got dataset {name!r} with inputs of shape {shape}"
    raise ValueError(msg)


def _model_kwargs(config: ReportConfig, dataset: Any) -> dict[str, Any]:
    opts = dict(config.model.options)
    shape = tuple(dataset.input_shape)
    name, data_name = config.model.name, config.data.name
    tokens = is_token_dataset(dataset)
    if name in TOKEN_MODELS:
        if not tokens:
            msg = (f"model {name!r} needs a token dataset (next-token ids (N, T), e.g. 'stdlib_text' or "
                   f"'text_files'), got dataset {data_name!r} with inputs of shape {shape}")
            raise ValueError(msg)
        return {"vocab_size": int(dataset.num_classes), "context": int(shape[-1]), **opts}
    if tokens:
        msg = (f"model {name!r} does not read token ids: dataset {data_name!r} holds next-token sequences of shape "
               f"{shape}; use model {TOKEN_MODELS[0]!r}")
        raise ValueError(msg)
    if name == "vit":
        side, channels = _image_geometry(data_name, shape)
        return {"image_size": side, "channels": channels, "num_classes": dataset.num_classes, **opts}
    if name == "mlp":
        hidden = list(opts.pop("widths", [128, 128]))
        return {"in_features": int(math.prod(shape)), "widths": (*hidden, dataset.num_classes), **opts}
    return {"in_channels": int(shape[-1]), "num_classes": dataset.num_classes, **opts}


def _load_dataset(config: ReportConfig) -> Any:
    opts = dict(config.data.options)
    if config.model.name in ("cnn", "resnet") and config.data.name == "digits":
        opts.setdefault("image", True)
    return data_lib.load(config.data.name, **opts)


def _prepare(config: ReportConfig) -> tuple[Any, Any, dict[str, Any]]:
    """Load the data and build one model: every config error surfaces here, before training and
    before any folder is created, as a :class:`~probes.config.ConfigError` naming the file and table."""
    try:
        dataset = _load_dataset(config)
    except (ValueError, TypeError) as err:
        msg = f"{config.source}: data: {err}"
        raise ConfigError(msg) from err
    check_dataset_fit(config, num_train=int(len(dataset.train[0])))
    try:
        kwargs = _model_kwargs(config, dataset)
        model = models.build(config.model.name, jax.random.key(0), **kwargs)
    except (ValueError, TypeError) as err:
        msg = f"{config.source}: model: {err}"
        raise ConfigError(msg) from err
    apply_fn, _, _ = models.functional(model)
    return dataset, apply_fn, kwargs


def _seeds(config: ReportConfig, i: int) -> tuple[int, int]:
    """Model ``i`` uses init seed ``seed + i`` and data-order seed ``seed + 1000 + i``."""
    return config.seed + i, config.seed + 1000 + i


def _trainer(config: ReportConfig, dataset: Any, apply_fn: Any) -> Trainer:
    """The configured optimizer and batch size on the training split."""
    tc = config.train
    x, y = dataset.train
    optimizer = make_optimizer(
        tc.optimizer, learning_rate=tc.learning_rate, momentum=tc.momentum, weight_decay=tc.weight_decay,
        schedule=tc.schedule, total_steps=tc.epochs * (len(x) // tc.batch_size),
    )
    return Trainer(apply_fn, x, y, optimizer=optimizer, batch_size=tc.batch_size, loss=_loss(dataset))


def _loss(dataset: Any) -> str:
    """``"next_token"`` on token data (mean over real tokens), ``"cross_entropy"`` otherwise."""
    return "next_token" if is_token_dataset(dataset) else "cross_entropy"


def _train_member(
    ctx_parts: dict[str, Any], config: ReportConfig, i: int, ckpt_dir: Path, log: Callable[[str], None]
) -> TrainedModel:
    dataset, kwargs = ctx_parts["dataset"], ctx_parts["kwargs"]
    init_seed, data_seed = _seeds(config, i)
    digest = config.digest("data", "model", "train")
    path = ckpt_dir / f"{config.model.name}-{config.data.name}-init{init_seed}-data{data_seed}-{digest}.safetensors"
    model = models.build(config.model.name, jax.random.key(init_seed), **kwargs)
    apply_fn, params, state = models.functional(model)
    template = {"params": params, "state": state}
    if path.is_file():
        stored, meta = io.load(path, like=template)
        bad = tree.nonfinite_leaves(stored)
        if bad:  # never resume from a poisoned cache
            msg = (
                f"cached checkpoint {str(path)!r} holds non-finite values (leaves {bad[:5]}); delete it to "
                "retrain that model"
            )
            raise ValueError(msg)
        log(f"model {i}: loaded {path.name}")
        losses = np.asarray(json.loads(meta.get("losses", "[]")), dtype=np.float32)
        return TrainedModel(i, init_seed, data_seed, stored["params"], stored["state"], str(path), True,
                            float(meta.get("train_seconds", 0.0)), losses)
    tc = config.train
    trainer = _trainer(config, dataset, apply_fn)
    t0 = time.perf_counter()
    result: TrainResult = trainer.run(jax.random.key(data_seed), trainer.init(params, state), epochs=tc.epochs,
                                      progress=None)
    jax.block_until_ready(result.params)
    seconds = time.perf_counter() - t0
    spe = trainer.steps_per_epoch
    epoch_losses = result.losses.reshape(tc.epochs, spe).mean(axis=1)
    meta = {
        "model": config.model.name, "dataset": config.data.name, "init_seed": init_seed, "data_seed": data_seed,
        "config": json.dumps(config.to_dict(), sort_keys=True), "train_seconds": seconds,
        "losses": json.dumps([round(float(v), 6) for v in epoch_losses]),
    }
    to_save = {"params": result.params, "state": result.state.model_state}
    bad = tree.nonfinite_leaves(to_save)
    if bad:  # the Trainer stops on a divergence; a non-finite checkpoint is never cached either way
        msg = f"model {i}: training ended with non-finite values in {bad[:5]}; not caching {str(path)!r}"
        raise FloatingPointError(msg)
    io.save(path, to_save, metadata=meta)
    log(f"model {i}: trained {tc.epochs} epochs in {seconds:.1f}s -> {path.name}")
    return TrainedModel(i, init_seed, data_seed, result.params, result.state.model_state, str(path), False,
                        seconds, epoch_losses.astype(np.float32))


# ---------------------------------------------------------------------------- sections
def _fmt(v: float, digits: int = 4) -> str:
    return f"{v:.{digits}g}" if isinstance(v, float) else html.escape(str(v))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def models_section(ctx: Context) -> Section:
    """Each member's seeds, train/test loss and accuracy, and its training curve."""
    import plotly.graph_objects as go

    rows, results = [], []
    fig = go.Figure()
    for m in ctx.models:
        tr = {k: float(v) for k, v in ctx.objective("train", m).evaluate(m.params).items()}
        te = {k: float(v) for k, v in ctx.objective("test", m).evaluate(m.params).items()}
        rows.append([m.index, m.init_seed, m.data_seed, tr["loss"], tr["accuracy"], te["loss"], te["accuracy"],
                     round(m.train_seconds, 2), "cache" if m.cached else "trained"])
        results.append({"index": m.index, "init_seed": m.init_seed, "data_seed": m.data_seed, "train": tr,
                        "test": te, "train_seconds": m.train_seconds, "cached": m.cached,
                        "checkpoint": os.path.relpath(m.checkpoint, ctx.out)})
        if m.losses.size:
            fig.add_trace(go.Scatter(x=np.arange(1, m.losses.size + 1), y=m.losses, mode="lines",
                                     name=f"model {m.index}", line={"color": COLORS[m.index % len(COLORS)]}))
    fig.update_layout(template="plotly_white", title="training loss (epoch mean of minibatch losses)",
                      xaxis_title="epoch", yaxis_title="loss", yaxis_type="log", height=360)
    header = ["model", "init seed", "data seed", "train loss", "train acc", "test loss", "test acc",
              "train s", "source"]
    body = _table(header, rows) + figure_html(fig)
    if ctx.loss == "next_token":
        meta = getattr(ctx.dataset, "metadata", {})
        body = ("<p>Token data: loss is the next-token cross-entropy averaged over real (non-ignored) tokens, "
                "accuracy the token accuracy over the same tokens" + (
                    f"; corpus {html.escape(', '.join(meta['files']))} (Python {html.escape(meta['python_version'])}, "
                    f"sha256 <code>{html.escape(meta['sha256'][:16])}…</code>)" if "sha256" in meta else "")
                + ".</p>" + body)
    return Section("models", "Models", body, {"members": results})


def interpolation_section(ctx: Context) -> Section:
    """Linear interpolation between the first two members on the train and test sets."""
    a, b = ctx.models[0], ctx.models[1]
    cfg = ctx.config.interpolation
    out: dict[str, Any] = {"between": [a.index, b.index]}
    curves: list[tuple[str, PathResult]] = []
    rows = []
    for split in ("train", "test"):
        res = interpolate(ctx.objective(split, a), a.params, b.params, num=cfg.num, chunk=cfg.chunk,
                          **_bn_path(ctx, a, b))
        out[split] = res.to_dict()
        curves.append((split, res))
        for d in ("linear", "mean"):
            bar = res.barrier_for(d)
            rows.append([split, d, bar.loss, bar.t_loss, bar.error, bar.t_error, res.midpoint["accuracy"]])
    note = ""
    if a.state:
        note = ("<p class='note'>BatchNorm: every point between the ends uses running statistics recomputed "
                "there on the training inputs (RESET, Jordan et al. 2022); the ends use their own.</p>")
    fig = path_figure(curves, title=f"linear path from model {a.index} to model {b.index}")
    header = ["split", "definition", "loss barrier", "t (loss)", "error barrier", "t (error)", "acc at t=½"]
    intro = ("<p>Barrier (survey Eq. 1): <code>max_t L(θ(t)) − ((1−t)L(θ0) + tL(θ1))</code> "
             "(\"linear\"); \"mean\" compares with ½(L(θ0)+L(θ1)) as git-re-basin does. Training-set "
             "barriers come first: over-confident models can hide a barrier in the test loss.</p>")
    return Section("interpolation", "Linear interpolation", intro + _table(header, rows) + note + figure_html(fig), out)


def _bn_path(ctx: Context, a: TrainedModel, b: TrainedModel) -> dict[str, Any]:
    """Keywords of a path probe between two members: with running statistics (BatchNorm), RESET
    between the ends on the training inputs and each end with its own statistics."""
    if not a.state:
        return {}
    return {"stats": "reset", "end_states": (a.state, b.state), "reset_x": ctx.train_objective.x}


def connectivity_section(ctx: Context) -> Section:
    """Barriers naive / weight matching / activation matching / REPAIR, and Bezier curves."""
    from probes.characteristics import CONNECTIVITY_METHODS, connectivity

    full = ctx.level("connectivity") == "full"
    methods = [m for m in CONNECTIVITY_METHODS if not (m == "repair" and ctx.config.model.name == "resnet")]
    transformer = ctx.config.model.name in TRANSFORMER_MODELS
    skipped = dict(TRANSFORMER_SKIPPED_METHODS) if transformer else {}
    methods = [m for m in methods if m not in skipped]
    extra: dict[str, Any] = {}
    if transformer:  # transformer taps are layer inputs only: activations come from the traced spec
        from landscape import align

        extra["apply_fn"] = align.TracedModel(ctx.apply_fn, ctx.apply_fn.spec)
    members = ctx.models if full else ctx.models[:2]
    idx = list(range(0, len(members) - 1, 2 if not full else 1))
    pairs = [(members[i].params, members[i + 1].params) for i in idx]
    bn_states = [(members[i].state, members[i + 1].state) for i in idx] if members[0].state else None
    res = connectivity(
        ctx.section_key("connectivity"), ctx.objective("train", members[0]), pairs,
        eval_objectives={"test": ctx.objective("test", members[0])}, methods=methods,
        num=25 if full else 13, curve_steps=2000 if full else 300, singular_k=10, states=bn_states, **extra,
    )
    ctx.cache["connectivity"] = res
    table = res.table()
    rows = []
    for m, by_split in table.items():
        for split, st in by_split.items():
            rows.append([m, split, st["loss_barrier"]["mean"], st["loss_barrier"]["std"],
                         st["error_barrier"]["mean"], st["midpoint_accuracy"]["mean"]])
    d = res.to_dict()
    d["skipped_methods"] = skipped
    notes = "".join(f"<p class='note'>{html.escape(m)} skipped: {html.escape(why)}.</p>" for m, why in skipped.items())
    if transformer:
        notes += ("<p class='note'>Transformer: the permutation spec is traced through attention (heads; queries and "
                  "keys share one permutation per head, values and the output projection another; one residual-stream "
                  "permutation across blocks; embeddings and a tied unembedding follow it), and activation matching "
                  "reads the traced units' activations (over all tokens of a sequence model).</p>")
    if ctx.loss == "next_token":
        notes += "<p class='note'>Token data: barriers are in next-token loss and token error.</p>"
    intro = (
        f"<p>{len(pairs)} pair(s) of independently initialised models. <b>weight_matching</b>: B permuted to A "
        "(Ainsworth et al. 2022); <b>activation_matching</b>: correlation of z-scored activations (Tatro et al. "
        "2020); <b>repair</b>: weight-matched line with every point REPAIRed (Jordan et al. 2022); <b>bezier</b>: "
        "quadratic Bezier curve fitted with Adam (Garipov et al. 2018), before and after alignment. Weight-matching "
        f"objective ⟨θ_A, π(θ_B)⟩ = {_fmt(d['wm_objective']['mean'])}; singular-direction alignment (top 10, mean "
        f"over layers) {_fmt(d['singular_mean_before']['mean'])} before and "
        f"{_fmt(d['singular_mean_after']['mean'])} after the permutation (Ito et al. 2024).</p>"
    )
    header = ["method", "split", "loss barrier", "± std", "error barrier", "acc at t=½"]
    body = intro + notes + _table(header, rows)
    for split in ("train", "test"):
        body += figure_html(res.plot(split=split, title=f"connectivity paths ({split})"))
    return Section("connectivity", "Connectivity", body, d)


def surfaces_section(ctx: Context) -> Section:
    """A filter-normalised random plane around model 0, and the plane through A, aligned B and the bend."""
    from probes.surface import plane_through, random_direction, surface_2d

    full = ctx.level("surfaces") == "full"
    m0 = ctx.models[0]
    obj = ctx.objective("test", m0)
    k1, k2 = jax.random.split(ctx.section_key("surfaces"))
    n = 51 if full else 15
    d1 = random_direction(k1, m0.params, normalization="filter", ignore="biasbn")
    d2 = random_direction(k2, m0.params, normalization="filter", ignore="biasbn")
    axis = np.linspace(-1.0, 1.0, n)
    bn = {"reset_x": ctx.train_objective.x} if m0.state else {}
    random_plane = surface_2d(obj, m0.params, (d1, d2), grid=(axis, axis), **bn)
    out: dict[str, Any] = {"random_plane": random_plane.to_dict()}
    body = (f"<p>Test loss on a filter-normalised random plane around model 0 (Li et al. 2018), {n}×{n} grid "
            "over [−1, 1]².</p>")
    body += figure_html(random_plane.plot(kind="surface", log=True))
    conn = ctx.cache.get("connectivity")
    sample = conn.samples[0] if conn is not None else None
    if sample is not None and sample.aligned is not None and "bezier_aligned" in sample.curves:
        fit = sample.curves["bezier_aligned"]
        bend = fit.bends[0]
        plane = plane_through(m0.params, sample.aligned, bend, margin=0.2)
        xs, ys = plane.grid(21 if full else 15)
        curve_pts = [fit.path(float(t)) for t in np.linspace(0, 1, 21)]
        through = surface_2d(obj, plane.origin, plane.directions, grid=(xs, ys),
                             overlays={"model A": m0.params, "aligned B": sample.aligned, "bend": bend,
                                       "Bezier curve": curve_pts},
                             overlay_states={"model A": m0.state, "aligned B": sample.aligned_state} if m0.state
                             else None, **bn)
        out["model_plane"] = through.to_dict()
        body += ("<p>Test loss on the plane through model A, model B after weight matching, and the bend of the "
                 "fitted Bezier curve (Garipov et al. 2018), with the curve drawn.</p>")
        body += figure_html(through.plot(kind="contour", log=True))
    return Section("surfaces", "Loss surfaces", body, out)


def curvature_section(ctx: Context) -> Section:
    """Hessian spectrum of each model (training loss) and sharpness along the linear path."""
    from probes import hessian
    from probes.paths import linear

    full = ctx.level("curvature") == "full"
    key = ctx.section_key("curvature")
    rows, per_model = [], []
    body = ""
    for i, m in enumerate(ctx.models[:2]):
        obj = ctx.objective("train", m)
        ks = jax.random.split(jax.random.fold_in(key, i), 4)
        spec = hessian.eigenvalues(ks[0], obj, m.params, k=10 if full else 3, which="both" if full else "top")
        tr = hessian.trace(ks[1], obj, m.params, method="xtrace" if full else "hutchinson",
                           num_probes=64 if full else 16)
        dens = hessian.density(ks[2], obj, m.params, num_probes=4 if full else 1, num_steps=100 if full else 40,
                               grid=500 if full else 200)
        entry = {"index": m.index, "eigenvalues": spec.to_dict(), "trace": tr.to_dict(), "density": dens.to_dict()}
        if full:
            entry["per_layer"] = hessian.per_layer(ks[3], obj, m.params).to_dict()
        per_model.append(entry)
        top = np.asarray(spec.eigenvalues)
        rows.append([m.index, float(np.max(top)), float(np.asarray(spec.residuals)[np.argmax(top)]),
                     float(tr.estimate), float(tr.stderr), float(dens.negative_mass)])
        if i == 0:
            body_fig = figure_html(dens.plot())
    a, b = ctx.models[0], ctx.models[1]
    ts = np.linspace(0.0, 1.0, 13 if full else 7)
    along = hessian.along_path(jax.random.fold_in(key, 99), ctx.objective("train", a), linear(a.params, b.params), ts,
                               k=1, num_probes=16 if full else 8)
    header = ["model", "λ_max", "residual", "trace", "± s.e.", "mass below 0 (SLQ)"]
    body = ("<p>Curvature of the training loss: top eigenvalues by Lanczos with full reorthogonalisation "
            "(residual ‖Hv − λv‖), trace by Hutchinson/XTrace with its standard error, and the spectral density "
            "by stochastic Lanczos quadrature (probes.lanczos).</p>" + _table(header, rows) + body_fig)
    body += "<p>Sharpness along the linear path between models 0 and 1.</p>" + figure_html(along.plot())
    return Section("curvature", "Curvature", body, {"models": per_model, "along_path": along.to_dict()})


def convexity_section(ctx: Context) -> Section:
    """Mode convexity of each trained model's basin, sampled by FGE cycles."""
    from probes.characteristics import convexity_from_training, quick_convexity

    trainer = _trainer(ctx.config, ctx.dataset, ctx.apply_fn)
    states = [trainer.init(m.params, m.state) for m in ctx.models]
    key = ctx.section_key("convexity")
    test = ctx.objective("test", ctx.models[0])
    if ctx.level("convexity") == "full":
        res = convexity_from_training(key, trainer, states, method="fge", eval_objective=test,
                                      sampling={"cycles": 12, "cycle_steps": 2 * trainer.steps_per_epoch,
                                                "learning_rate": 0.05, "final_fraction": 0.01},
                                      num_chords=64, num_points=11)
    else:
        res = quick_convexity(key, trainer, states, eval_objective=test)
    d = res.to_dict()
    summary = d.get("summary", {})
    rows = [[k, v.get("mean"), v.get("std")] for k, v in summary.items() if isinstance(v, dict) and "mean" in v]
    intro = ("<p>Basin members from Fast Geometric Ensembling cycles around each trained model (one basin per "
             "seed). Chord fraction: random chords between members whose midpoint loss is at most the mean "
             "endpoint loss; SWA and ensemble gains on the test set; curvature of the training loss at the "
             "solution.</p>")
    return Section("convexity", "Mode convexity", intro + _table(["metric", "mean", "std"], rows)
                   + figure_html(res.plot()), d)


def determinism_section(ctx: Context) -> Section:
    """Instability analysis: the barrier between children spawned at step k, against k."""
    from probes.characteristics import determinism, quick_determinism, spawn_ladder

    trainer = _trainer(ctx.config, ctx.dataset, ctx.apply_fn)
    name, kwargs = ctx.config.model.name, _model_kwargs(ctx.config, ctx.dataset)

    def init(key: jax.Array) -> Any:
        _, params, state = models.functional(models.build(name, key, **kwargs))
        return trainer.init(params, state)

    key = ctx.section_key("determinism")
    test = ctx.objective("test", ctx.models[0])
    if ctx.level("determinism") == "full":
        steps = ctx.config.train.epochs * trainer.steps_per_epoch
        res = determinism(key, trainer, init, steps=steps, spawn_steps=(0, *spawn_ladder(steps)), num_seeds=3,
                          objective=test)
    else:
        res = quick_determinism(key, trainer, init, objective=test)
    d = res.to_dict()
    intro = ("<p>Frankle et al. 2020: a parent is trained; at spawn step k two children copy it and train to the "
             "end with different data-order seeds; their linear barrier (test error) is plotted against k. "
             f"Onset k* (barrier below the threshold): <b>{html.escape(str(res.onset))}</b>.</p>")
    return Section("determinism", "Mode determinism", intro + figure_html(res.plot()), d)


def directedness_section(ctx: Context) -> Section:
    """Task vectors fine-tuned from a base on three tasks: cosines, ±λ curves, merges chosen on validation."""
    from probes.characteristics._directedness import QUICK_DIRECTEDNESS, standard_directedness

    key = ctx.section_key("directedness")
    settings = dict(QUICK_DIRECTEDNESS) if ctx.level("directedness") == "quick" else {}
    res = standard_directedness(key, ctx.dataset, **settings)
    d = res.to_dict()
    chosen, lams = np.asarray(res.chosen_test), np.asarray(res.chosen_lam)
    rows = [[m, *[float(v) for v in chosen[i].mean(0)], float(chosen[i].mean()),
             "—" if np.all(np.isnan(lams[i])) else float(np.nanmean(lams[i]))] for i, m in enumerate(res.methods)]
    base = np.asarray(res.base_accuracy, dtype=float).reshape(-1)
    if base.size == len(res.task_names):
        rows.append(["base", *[float(v) for v in base], float(base.mean()), "—"])
    same, cross = res.same_task_cosine, res.cross_task_cosine
    intro = (
        "<p>A base MLP is trained on all classes, then fine-tuned on three tasks (first half of the classes, second "
        "half, permuted pixels) with several seeds each. Task vectors τ = θ_task − θ_base: cosine similarity "
        f"within a task {_fmt(same[0])} ± {_fmt(same[1])}, across tasks {_fmt(cross[0])} ± {_fmt(cross[1])}; "
        f"effective rank of all task vectors {_fmt(float(res.erank_all))}. Merge coefficients λ are chosen on a "
        "validation split, never on test; the table gives test accuracy per task at that λ.</p>"
    )
    header = ["method", *list(res.task_names), "average", "λ (mean)"]
    body = intro + _table(header, rows)
    return Section("directedness", "Directedness and merging", body + figure_html(res.plot()), d)


def _skipped_section(name: str, note: str) -> Callable[[Context], Section]:
    """A section that does not run on this data: its place in the page and ``results.json`` holds ``note``."""
    titles = {"convexity": "Mode convexity", "determinism": "Mode determinism",
              "directedness": "Directedness and merging"}

    def section(ctx: Context) -> Section:
        del ctx
        body = f"<p class='note'>Not run on token data: {html.escape(note)}.</p>"
        return Section(name, titles.get(name, name), body, {"skipped": True, "note": note})

    return section


SECTIONS: tuple[tuple[str, Callable[[Context], Section]], ...] = (
    ("models", models_section),
    ("interpolation", interpolation_section),
    ("connectivity", connectivity_section),
    ("surfaces", surfaces_section),
    ("curvature", curvature_section),
    ("convexity", convexity_section),
    ("determinism", determinism_section),
    ("directedness", directedness_section),
)
SECTION_IDS = tuple(name for name, _ in SECTIONS)
OPTIONAL_SECTIONS = ("connectivity", "surfaces", "curvature", "convexity", "determinism", "directedness")


# ---------------------------------------------------------------------------- page
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:1em 0;font-size:.92em} td,th{border:1px solid #ddd;padding:.3em .6em;text-align:right}
th{background:#f5f5f5} .meta{color:#666;font-size:.9em} .note{color:#8a6d3b} nav a{margin-right:1em}
code{background:#f5f5f5;padding:0 .2em}
"""


def _page(config: ReportConfig, sections: list[Section], meta: dict[str, Any]) -> str:
    from plotly.offline import get_plotlyjs

    nav = "".join(f"<a href='#{s.id}'>{html.escape(s.title)}</a>" for s in sections)
    body = "".join(f"<section id='{s.id}'><h2>{html.escape(s.title)}</h2>{s.body}</section>" for s in sections)
    cfg = html.escape(json.dumps(config.to_dict(), indent=1, sort_keys=True))
    info = (f"config: {html.escape(config.source)} · generated {meta['generated']} · "
            f"jax {meta['jax']} on {html.escape(meta['device'])} · total {meta['total_seconds']:.1f}s")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>landscape report</title><style>{_CSS}</style>"
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
        f"<h1>landscape geometry report</h1><p class='meta'>{info}</p><nav>{nav}</nav>{body}"
        f"<h2>Configuration</h2><pre>{cfg}</pre></body></html>"
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def run_report(
    config: ReportConfig,
    out: str | Path,
    *,
    log: Callable[[str], None] = print,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train or load the zoo, run every section, write ``index.html`` and ``results.json``.

    Args:
        config: the validated configuration.
        out: the output folder (created after the whole config has been checked).
        log: receives one line per finished step (model trained or loaded, section timings).
        progress: print a line to stderr when each section starts; ``None`` (default): only
            when stderr is a terminal (so tests and pipes stay quiet).

    Returns the results dictionary that was written to ``results.json``.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        msg = f"--out {str(out)!r} exists and is not a directory"
        raise ConfigError(msg)
    show = _stderr_is_terminal() if progress is None else bool(progress)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    dataset, apply_fn, kwargs = _prepare(config)
    timings["setup"] = time.perf_counter() - t0

    ckpt_dir = out / "checkpoints"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        msg = f"--out {str(out)!r}: cannot create {str(ckpt_dir)!r}: {err.strerror or err}"
        raise ConfigError(msg) from err
    t0 = time.perf_counter()
    parts = {"dataset": dataset, "kwargs": kwargs}
    members = [_train_member(parts, config, i, ckpt_dir, log) for i in range(config.num_models)]
    timings["train"] = time.perf_counter() - t0

    xt, yt = dataset.train
    xs, ys = dataset.test
    loss = _loss(dataset)
    ctx = Context(
        config=config, out=out, dataset=dataset, apply_fn=apply_fn,
        train_objective=Objective(apply_fn, xt, yt, batch_size=512, loss=loss),
        test_objective=Objective(apply_fn, xs, ys, batch_size=512, loss=loss),
        models=members, key=jax.random.key(config.seed), log=log, loss=loss,
    )
    sections: list[Section] = []
    todo = [(name, fn) for name, fn in SECTIONS if not (name in OPTIONAL_SECTIONS and ctx.level(name) == "off")]
    if ctx.loss == "next_token":
        todo = [(name, _skipped_section(name, TOKEN_SKIPPED[name]) if name in TOKEN_SKIPPED else fn)
                for name, fn in todo]
    for number, (name, fn) in enumerate(todo, 1):
        if show:
            print(f"landscape: [{number}/{len(todo)}] section {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        sections.append(fn(ctx))
        timings[name] = time.perf_counter() - t0
        log(f"section {name}: {timings[name]:.1f}s")
    timings["total"] = time.perf_counter() - t_start

    meta = {
        "generated": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "jax": jax.__version__, "device": str(jax.devices()[0].device_kind), "platform": platform.platform(),
        "total_seconds": timings["total"],
    }
    notes = [{"section": s.id, "note": s.results["note"]} for s in sections if s.results.get("skipped")]
    notes += [{"section": "connectivity", "method": m, "note": why}
              for s in sections if s.id == "connectivity" for m, why in s.results.get("skipped_methods", {}).items()]
    results = {
        "schema_version": SCHEMA_VERSION,
        "meta": meta,
        "loss": loss,
        "notes": notes,
        "config": config.to_dict(),
        "dataset": dataset.to_dict() if hasattr(dataset, "to_dict") else {"name": config.data.name},
        "sections": {s.id: s.results for s in sections},
        "timings": timings,
    }
    results = json_safe(results)  # NaN / inf -> null: results.json is strict JSON (allow_nan=False)
    _write_atomic(out / "results.json", json.dumps(results, indent=1, sort_keys=True, default=_json_default,
                                                   allow_nan=False))
    _write_atomic(out / "index.html", _page(config, sections, meta))
    log(f"wrote {out / 'index.html'} and {out / 'results.json'} in {timings['total']:.1f}s")
    return results


def _stderr_is_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.generic, np.ndarray)) or hasattr(obj, "__array__"):
        return np.asarray(obj).tolist()
    msg = f"not JSON serialisable: {type(obj).__name__}"
    raise TypeError(msg)
