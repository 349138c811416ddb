"""``landscape merge RECIPE --out DIR``: mergekit-recipe merges of safetensors checkpoints, streamed.

The driver validates the recipe (:mod:`landscape.merge.recipe`), opens every model lazily
(:func:`landscape.checkpoints.open_checkpoint`: headers only), and plans every output tensor —
which tensor of which model feeds it, its layer position, every resolved parameter — so a missing
model, a tensor missing from one model, shapes that disagree or a parameter without value are
reported **before any tensor is written**. Then it streams: for each output tensor it reads that
tensor from each input model (memory-mapped), merges it (:mod:`landscape.merge.tensorwise`, on
``--device``), casts it and hands it to :class:`landscape.checkpoints.CheckpointWriter`, which
writes shards of at most ``--max-shard-size`` and moves the finished folder into place atomically:
a failed or interrupted merge leaves no output folder (and a rerun starts cleanly). Peak memory is
the current tensor of each model, its merge, and at most one pending shard — independent of the
model size.

Layer positions (for gradient parameters and ``slices``) come from tensor names: a name
``<prefix>.(layers|h|blocks|block|layer).<i>.<rest>`` belongs to layer ``i`` (Llama
``model.layers.3.mlp...``, GPT-2 ``transformer.h.3.attn...``); other tensors (embeddings, final
norm, head) are outside the layers (:math:`t = 0`, as in mergekit). For ``slices`` the tensors
outside the layers come from the first slice's models when their name mentions an embedding
(``embed``, ``wte``, ``wpe``) and from the last slice's otherwise, and the output's
``config.json`` gets the new layer count.

``config.json`` / ``generation_config.json`` are copied from the base model (else the first
model), tokenizer files from ``tokenizer_source`` (``base`` or a model path; default the same
donor); the recipe itself is saved as ``landscape_recipe.yml`` (or ``.toml``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import pathlib
import re
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "MergePlan",
    "MergeResult",
    "PlannedTensor",
    "add_parser",
    "layer_of",
    "main",
    "parse_size",
    "plan_merge",
    "run_merge",
]

_LAYER = re.compile(r"^(?P<pre>(?:.*\.)?(?:layers|h|blocks|block|layer)\.)(?P<idx>\d+)(?P<post>\..+)$")
_PRE_HINTS = ("embed", "wte", "wpe")
_CONFIG_FILES = ("config.json", "generation_config.json")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def layer_of(name: str) -> tuple[str, int, str] | None:
    """``(prefix, index, suffix)`` of a layer tensor name, or None outside the layers.

    Example:
        >>> layer_of("model.layers.3.mlp.up_proj.weight")
        ('model.layers.', 3, '.mlp.up_proj.weight')
        >>> layer_of("model.norm.weight") is None
        True
    """
    m = _LAYER.match(name)
    if m is None:
        return None
    return m["pre"], int(m["idx"]), m["post"]


def parse_size(text: str | int) -> int:
    """Bytes from ``"5GB"`` (10^9), ``"500MB"``, ``"2GiB"`` (2^30), ``"64KiB"`` or a plain integer."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
        if m is None:
            msg = f"--max-shard-size must look like 5GB, 500MB, 2GiB or a byte count, got {text!r}"
            raise ValueError(msg)
        unit = (m[2] or "B").upper()
        base = 1024 if "I" in unit else 1000
        power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
        value = int(float(m[1]) * base**power)
    if value < 1:
        msg = f"--max-shard-size must be positive, got {text!r}"
        raise ValueError(msg)
    return value


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    """One output tensor of a merge.

    Attributes:
        name: output tensor name.
        inputs: ``(model index, tensor name in that model)`` per input, in recipe order.
        base_index: position of the base model in ``inputs``, or None.
        t: layer position in [0, 1] used for gradients.
        shape: tensor shape.
        out_dtype: numpy dtype name of the written tensor.
        floating: False for integer / bool buffers (copied from the first input).
        shared: resolved shared parameters.
        per_input: resolved per-input parameters.
    """

    name: str
    inputs: tuple[tuple[int, str], ...]
    base_index: int | None
    t: float
    shape: tuple[int, ...]
    out_dtype: str
    floating: bool
    shared: Mapping[str, Any]
    per_input: tuple[Mapping[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class MergePlan:
    """Everything a merge will do, checked before anything is written.

    Attributes:
        method: merge method name.
        models: resolved paths of the models, indexed by :attr:`PlannedTensor.inputs`.
        tensors: the output tensors in write order.
        config_source: folder whose ``config.json`` is copied (None when the donor is a file).
        tokenizer_source: folder whose tokenizer files are copied, or None.
        num_layers: layers of the output model (None when it has no recognised layers).
        changed_layers: True when the output's layer count differs from the donor's (slices).
    """

    method: str
    models: tuple[pathlib.Path, ...]
    tensors: tuple[PlannedTensor, ...]
    config_source: pathlib.Path | None
    tokenizer_source: pathlib.Path | None
    num_layers: int | None
    changed_layers: bool


@dataclasses.dataclass(frozen=True)
class MergeResult:
    """Outcome of :func:`run_merge`.

    Attributes:
        out_dir: the written model folder.
        method: merge method.
        num_tensors: tensors written.
        num_bytes: bytes of tensor data written.
        seconds: wall time of the streaming phase.
        seed: seed used for random masks (None when the method draws none).
        device: the JAX device the arithmetic ran on.
    """

    out_dir: pathlib.Path
    method: str
    num_tensors: int
    num_bytes: int
    seconds: float
    seed: int | None
    device: str


# --------------------------------------------------------------------------------------------
# Planning


def _resolve_model_path(ref: str, recipe: Any, where: str) -> pathlib.Path:
    p = pathlib.Path(ref).expanduser()
    if p.exists():
        return p
    if recipe.source is not None and not p.is_absolute():
        q = recipe.source.parent / p
        if q.exists():
            return q
    msg = f"{where}: no checkpoint at {ref!r} (landscape merge reads local safetensors files or model folders; Hub ids are not downloaded)"
    raise ValueError(msg)


def _dtype_name(code_or_dtype: Any) -> str:
    import jax.numpy as jnp

    codes = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
    if isinstance(code_or_dtype, str) and code_or_dtype in codes:
        return codes[code_or_dtype]
    if isinstance(code_or_dtype, str) and code_or_dtype.isupper():
        return code_or_dtype  # a non-float safetensors code (I64, BOOL, ...)
    return jnp.dtype(code_or_dtype).name


def _is_float_code(code: str) -> bool:
    return code in ("BF16", "F16", "F32", "F64")


def _promote(names: Sequence[str]) -> str:
    import jax.numpy as jnp

    out = jnp.dtype(names[0])
    for n in names[1:]:
        out = jnp.promote_types(out, jnp.dtype(n))
    return jnp.dtype(out).name


def _layer_count(names: Sequence[str], where: str) -> int | None:
    idx = {parts[1] for n in names if (parts := layer_of(n)) is not None}
    if not idx:
        return None
    if idx != set(range(max(idx) + 1)):
        msg = f"{where}: layer indices are not contiguous from 0: {sorted(idx)}"
        raise ValueError(msg)
    return max(idx) + 1


def _check_della(name: str, spec: Any, per_input: Sequence[Mapping[str, Any]]) -> None:
    if spec.parameter("epsilon") is None:
        return
    for d in per_input:
        if "density" in d and 0 < d["density"] < 1:
            lo, hi = d["density"] - d["epsilon"], d["density"] + d["epsilon"]
            if lo <= 0 or hi >= 1:
                msg = f"tensor {name!r}: {spec.name} needs density ± epsilon in (0, 1), got density={d['density']}, epsilon={d['epsilon']}"
                raise ValueError(msg)


def plan_merge(recipe: Any, readers: Mapping[pathlib.Path, Any], paths: Mapping[str, pathlib.Path]) -> MergePlan:
    """Plan every output tensor of ``recipe`` (no tensor data is read).

    Args:
        recipe: a validated :class:`~landscape.merge.recipe.Recipe`.
        readers: an open checkpoint reader per resolved model path.
        paths: resolved path of every model reference in the recipe.

    Raises:
        ValueError: a tensor missing from a model, disagreeing shapes, layer ranges beyond a
            model's layers, a parameter without value, naming the tensor, model and recipe key.
    """
    from landscape.merge.recipe import resolve_parameters

    spec = recipe.spec
    model_list: list[pathlib.Path] = []

    def index_of(ref: str) -> int:
        p = paths[ref]
        if p not in model_list:
            model_list.append(p)
        return model_list.index(p)

    def check_same(name_by_input: Sequence[tuple[int, str]], out_name: str) -> tuple[tuple[int, ...], str, bool]:
        shapes, codes = [], []
        for mi, tn in name_by_input:
            r = readers[model_list[mi]]
            if tn not in r:
                msg = f"tensor {tn!r} (output {out_name!r}) is missing from model {str(model_list[mi])!r}"
                raise ValueError(msg)
            shapes.append(tuple(r.shape(tn)))
            codes.append(r.dtype(tn))
        if len(set(shapes)) != 1:
            detail = ", ".join(f"{str(model_list[mi])!r}: {s}" for (mi, _), s in zip(name_by_input, shapes, strict=True))
            msg = f"tensor {out_name!r} has different shapes in the models ({detail})"
            raise ValueError(msg)
        floating = [_is_float_code(c) for c in codes]
        if any(floating) and not all(floating):
            msg = f"tensor {out_name!r} is floating-point in some models and not in others ({codes})"
            raise ValueError(msg)
        if all(floating):
            out = recipe.out_dtype or recipe.dtype or _promote([_dtype_name(c) for c in codes])
        else:
            out = codes[0]
        return shapes[0], out, all(floating)

    tensors: list[PlannedTensor] = []

    def add(
        out_name: str,
        inputs: list[tuple[int, str]],
        base_index: int | None,
        t: float,
        shared_chain: Sequence[Mapping[str, Any]],
        input_chains: Sequence[Sequence[Mapping[str, Any]]],
    ) -> None:
        shape, out_dtype, floating = check_same(inputs, out_name)
        shared, per_input = resolve_parameters(
            spec,
            tensor_name=out_name,
            t=t,
            shared_sources=shared_chain,
            input_sources=input_chains,
            input_names=[tn for _, tn in inputs],
            base_index=base_index,
            input_labels=[str(model_list[mi]) for mi, _ in inputs],
        )
        if spec.name == "linear" and shared["normalize"]:
            if sum(d["weight"] for d in per_input) == 0:
                msg = f"tensor {out_name!r}: linear weights sum to 0 with normalize: true; set normalize: false for signed combinations"
                raise ValueError(msg)
        _check_della(out_name, spec, per_input)
        tensors.append(
            PlannedTensor(out_name, tuple(inputs), base_index, t, shape, out_dtype, floating, shared, tuple(per_input))
        )

    top = recipe.parameters
    if recipe.models is not None:
        refs = [m.model for m in recipe.models]
        chains: list[list[Mapping[str, Any]]] = [[m.parameters, top] for m in recipe.models]
        if recipe.base_model is not None and recipe.base_model not in refs:
            refs.append(recipe.base_model)
            chains.append([top])
        idx = [index_of(r) for r in refs]
        if len(set(idx)) != len(idx):
            msg = f"{recipe.source or '<recipe>'}: two model entries name the same checkpoint"
            raise ValueError(msg)
        base_pos = refs.index(recipe.base_model) if recipe.base_model is not None else None
        donor = paths[recipe.base_model] if recipe.base_model is not None else paths[refs[0]]
        ref_reader = readers[donor]
        names = ref_reader.keys()
        for mi in idx:
            extra = sorted(set(readers[model_list[mi]].keys()) - set(names))
            if extra:
                msg = f"model {str(model_list[mi])!r} has tensor {extra[0]!r} that {str(donor)!r} lacks ({len(extra)} such tensors); the models must hold the same tensors"
                raise ValueError(msg)
        n_layers = _layer_count(names, str(donor))
        for name in names:
            parts = layer_of(name)
            t = 0.0 if parts is None else (parts[1] / (n_layers - 1) if n_layers and n_layers > 1 else 1.0)
            add(name, [(mi, name) for mi in idx], base_pos, t, [top], chains)
        changed = False
    else:
        first = recipe.slices[0].sources[0]
        donor_ref = recipe.base_model or first.model
        donor = paths[donor_ref]
        ref_names = readers[paths[first.model]].keys()
        outside = [n for n in ref_names if layer_of(n) is None]
        pre = [n for n in outside if any(h in n for h in _PRE_HINTS)]
        post = [n for n in outside if n not in pre]

        def slice_inputs(s: Any) -> tuple[list[int], int | None, list[list[Mapping[str, Any]]], list[Mapping[str, Any]]]:
            base_ref = s.base_model or recipe.base_model
            refs = [src.model for src in s.sources]
            if spec.base != "ignored" and base_ref is not None and base_ref not in refs:
                msg = f"{s.where}: the base model {base_ref!r} must be one of the slice's sources for {spec.name!r}"
                raise ValueError(msg)
            base_pos = refs.index(base_ref) if base_ref in refs else None
            chains = [[src.parameters, s.parameters, top] for src in s.sources]
            return [index_of(r) for r in refs], base_pos, chains, [s.parameters, top]

        def outside_tensor(name: str, s: Any) -> None:
            idx, base_pos, chains, shared_chain = slice_inputs(s)
            add(name, [(mi, name) for mi in idx], base_pos, 0.0, shared_chain, chains)

        for name in pre:
            outside_tensor(name, recipe.slices[0])
        out_layer = 0
        for s in recipe.slices:
            idx, base_pos, chains, shared_chain = slice_inputs(s)
            n = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
            layer_names = []
            for src, mi in zip(s.sources, idx, strict=True):
                names = readers[model_list[mi]].keys()
                count = _layer_count(names, str(model_list[mi])) or 0
                if src.layer_range[1] > count:
                    msg = f"{src.where}: layer_range {list(src.layer_range)} goes beyond the {count} layers of {src.model!r}"
                    raise ValueError(msg)
                by_layer: dict[int, list[tuple[str, str, str]]] = {}
                for nm in names:
                    parts = layer_of(nm)
                    if parts is not None:
                        by_layer.setdefault(parts[1], []).append(parts)
                layer_names.append(by_layer)
            for off in range(n):
                t = off / (n - 1) if n > 1 else 1.0
                first_parts = layer_names[0][s.sources[0].layer_range[0] + off]
                for pre_s, _, post_s in first_parts:
                    inputs = []
                    for src, mi, by_layer in zip(s.sources, idx, layer_names, strict=True):
                        li = src.layer_range[0] + off
                        match = [p for p in by_layer.get(li, []) if p[2] == post_s]
                        name_in = f"{match[0][0]}{li}{post_s}" if match else f"{pre_s}{li}{post_s}"
                        inputs.append((mi, name_in))
                    add(f"{pre_s}{out_layer}{post_s}", inputs, base_pos, t, shared_chain, chains)
                out_layer += 1
        for name in post:
            outside_tensor(name, recipe.slices[-1])
        n_layers = out_layer
        donor_layers = _layer_count(readers[donor].keys(), str(donor))
        changed = donor_layers != n_layers
    tok = None
    if recipe.tokenizer_source is not None:
        tok = donor if recipe.tokenizer_source == "base" else paths[recipe.tokenizer_source]
    else:
        tok = donor
    return MergePlan(
        method=spec.name,
        models=tuple(model_list),
        tensors=tuple(tensors),
        config_source=donor if donor.is_dir() else None,
        tokenizer_source=tok if tok.is_dir() else None,
        num_layers=n_layers,
        changed_layers=changed,
    )


# --------------------------------------------------------------------------------------------
# Streaming


def _device(kind: str) -> Any:
    import jax

    if kind not in ("cpu", "gpu"):
        msg = f"--device must be 'cpu' or 'gpu', got {kind!r}"
        raise ValueError(msg)
    try:
        devs = jax.devices(kind)
    except RuntimeError:
        devs = []
    if not devs:
        msg = f"--device {kind}: JAX sees no {kind.upper()} (devices: {[d.platform for d in jax.devices()]})"
        raise ValueError(msg)
    return devs[0]


def _output_config(src: pathlib.Path, plan: MergePlan, out_dtype: str | None) -> dict[str, Any] | None:
    path = src / "config.json"
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        msg = f"cannot read {str(path)!r}: {e}"
        raise ValueError(msg) from e
    changed = False
    if plan.changed_layers and plan.num_layers is not None:
        for k in _LAYER_KEYS:
            if k in cfg:
                cfg[k] = plan.num_layers
                changed = True
    if out_dtype is not None:
        for k in ("torch_dtype", "dtype"):
            if k in cfg or k == "torch_dtype":
                cfg[k] = out_dtype
        changed = True
    return cfg if changed else None


def _compute_input(a: np.ndarray, dtype: str | None) -> np.ndarray:
    """Host-side cast: to the recipe's ``dtype`` (rounding, as mergekit does), then to the compute
    dtype (float32; float64 for float64 under x64), so kernels compile once per shape."""
    import jax
    import jax.numpy as jnp

    a = np.asarray(a)
    if dtype is not None:
        a = a.astype(jnp.dtype(dtype))
    wide = a.dtype == np.float64 and jax.config.jax_enable_x64
    return a.astype(np.float64 if wide else np.float32)


def run_merge(
    recipe: Any,
    out_dir: str | pathlib.Path,
    *,
    seed: int | None = None,
    device: str = "cpu",
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    progress: bool | None = None,
    masks: Callable[[str], Any] | None = None,
    open_fn: Callable[[pathlib.Path], Any] | None = None,
) -> MergeResult:
    """Merge the models of ``recipe`` into ``out_dir``, one tensor at a time.

    Args:
        recipe: a :class:`~landscape.merge.recipe.Recipe` or the path of a recipe file.
        out_dir: the model folder to write (atomically).
        seed: seed of random masks (overrides the recipe's ``seed``; default 0).
        device: ``"cpu"`` or ``"gpu"`` for the tensor arithmetic.
        max_shard_bytes: largest shard size.
        overwrite: replace an existing ``out_dir``.
        progress: show a tqdm bar (default: when stderr is a terminal).
        masks: ``masks(tensor_name) -> (non_base, *shape) bool array or None``: explicit DARE /
            DELLA keep masks (for comparisons with recorded masks).
        open_fn: checkpoint opener (default :func:`landscape.checkpoints.open_checkpoint`).

    Returns:
        :class:`MergeResult`.

    Raises:
        ValueError: on any configuration problem, before anything is written; or when a merged
            tensor comes out non-finite from finite inputs (nothing is left written).
    """
    import jax
    import jax.numpy as jnp
    from tqdm.auto import tqdm

    from landscape.checkpoints import CheckpointWriter, open_checkpoint
    from landscape.merge import tensorwise
    from landscape.merge.recipe import Recipe, load_recipe

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        msg = f"--seed must be a non-negative int, got {seed!r}"
        raise ValueError(msg)
    dev = _device(device)
    opener = open_fn or open_checkpoint
    out_dir = pathlib.Path(out_dir)
    if out_dir.exists() and not overwrite:
        msg = f"output folder {str(out_dir)!r} already exists; pass --overwrite to replace it"
        raise ValueError(msg)

    paths: dict[str, pathlib.Path] = {}
    where = {recipe.base_model: "base_model"} if recipe.base_model else {}
    for m in recipe.models or ():
        where.setdefault(m.model, m.where)
    for s in recipe.slices or ():
        for src in s.sources:
            where.setdefault(src.model, src.where)
        if s.base_model:
            where.setdefault(s.base_model, s.where)
    if recipe.tokenizer_source not in (None, "base"):
        where.setdefault(recipe.tokenizer_source, "tokenizer_source")
    label = str(recipe.source) if recipe.source else "<recipe>"
    for ref in list(where):
        paths[ref] = _resolve_model_path(ref, recipe, f"{label}: {where[ref]}" if where[ref] in ("base_model", "tokenizer_source") else where[ref])
    if recipe.tokenizer_source not in (None, "base") and not paths[recipe.tokenizer_source].is_dir():
        msg = f"{label}: tokenizer_source {recipe.tokenizer_source!r} is not a model folder"
        raise ValueError(msg)
    if recipe.tokenizer_source == "base" and recipe.base_model is None:
        msg = f"{label}: tokenizer_source: base needs a base_model"
        raise ValueError(msg)

    with contextlib.ExitStack() as stack:
        readers: dict[pathlib.Path, Any] = {}
        for ref, p in paths.items():
            if ref == recipe.tokenizer_source and ref not in recipe.referenced_models():
                continue
            if p not in readers:
                readers[p] = stack.enter_context(opener(p))
        plan = plan_merge(recipe, readers, paths)
        used_seed = None
        if recipe.spec.random:
            used_seed = seed if seed is not None else (recipe.seed if recipe.seed is not None else 0)
        root_key = jax.random.key(used_seed if used_seed is not None else 0)
        out_dtype_cfg = recipe.out_dtype or recipe.dtype

        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="landscape-merge-"))
        tmp = pathlib.Path(tmp)
        cfg = _output_config(plan.config_source, plan, out_dtype_cfg) if plan.config_source else None
        show = sys.stderr.isatty() if progress is None else progress
        t0 = time.perf_counter()
        n_bytes = 0
        meta = {"merge_method": plan.method, "merged_with": "landscape"}
        writer = stack.enter_context(
            CheckpointWriter(out_dir, max_shard_bytes=max_shard_bytes, metadata=meta, overwrite=overwrite)
        )
        for pt in tqdm(plan.tensors, desc=f"merge ({plan.method})", unit="tensor", disable=not show):
            arrays = [readers[plan.models[mi]].get(tn) for mi, tn in pt.inputs]
            if not pt.floating:
                out = np.array(arrays[pt.base_index if pt.base_index is not None else 0])
            else:
                xs = [jax.device_put(_compute_input(a, recipe.dtype), dev) for a in arrays]
                key = tensorwise.tensor_key(root_key, pt.name) if used_seed is not None else None
                mk = masks(pt.name) if masks is not None else None
                merged = tensorwise.apply(
                    plan.method,
                    key,
                    xs,
                    base_index=pt.base_index,
                    shared=pt.shared,
                    per_input=pt.per_input,
                    masks=None if mk is None else jnp.asarray(mk, bool),
                )
                out32 = np.asarray(jax.device_get(merged))
                if not np.all(np.isfinite(out32)) and all(np.all(np.isfinite(np.asarray(a, np.float32))) for a in arrays):
                    msg = f"tensor {pt.name!r}: {plan.method} gave non-finite values from finite inputs (degenerate inputs for this method?); nothing was written"
                    raise ValueError(msg)
                out = out32.astype(jnp.dtype(pt.out_dtype))
                del xs, merged, out32
            del arrays
            writer.add(pt.name, out)
            n_bytes += out.nbytes
            del out
        if plan.config_source is not None:
            if cfg is not None:
                (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
                writer.copy_files_from(tmp, names=("config.json",))
                writer.copy_files_from(plan.config_source, names=("generation_config.json",))
            else:
                writer.copy_files_from(plan.config_source, names=_CONFIG_FILES)
        if plan.tokenizer_source is not None:
            writer.copy_files_from(plan.tokenizer_source, names=_TOKENIZER_FILES)
        if recipe.source is not None and recipe.source.is_file():
            ext = ".toml" if recipe.source.suffix.lower() == ".toml" else ".yml"
            (tmp / f"landscape_recipe{ext}").write_bytes(recipe.source.read_bytes())
            writer.copy_files_from(tmp, names=(f"landscape_recipe{ext}",))
        seconds = time.perf_counter() - t0
    return MergeResult(out_dir, plan.method, len(plan.tensors), n_bytes, seconds, used_seed, str(dev))


# --------------------------------------------------------------------------------------------
# Command line


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``merge`` subcommand to ``landscape``'s subparsers."""
    from landscape.merge import tensorwise

    p = sub.add_parser(
        "merge",
        help="merge safetensors checkpoints with a mergekit recipe",
        description=(
            "Merge Hugging Face safetensors checkpoints with a mergekit-format recipe (YAML, or the "
            "same keys in a .toml file), streaming one tensor at a time. Recipe keys: models "
            "(model, parameters), base_model, merge_method, parameters, slices (sources with "
            "layer_range), dtype, out_dtype, tokenizer_source, seed."
        ),
        epilog="methods and their parameters:\n" + tensorwise.describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", help="recipe file (.yml/.yaml mergekit format, or .toml)")
    p.add_argument("--out", required=True, help="output model folder (written atomically)")
    p.add_argument("--seed", type=int, default=None, help="seed of DARE / DELLA masks (overrides the recipe's; default 0)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="where the tensor arithmetic runs")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard (e.g. 5GB, 500MB, 2GiB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def main(args: argparse.Namespace) -> int:
    """Run ``landscape merge`` from parsed arguments; configuration errors exit 2 with one line."""
    try:
        result = run_merge(
            args.recipe,
            args.out,
            seed=args.seed,
            device=args.device,
            max_shard_bytes=parse_size(args.max_shard_size),
            overwrite=args.overwrite,
            progress=None if not args.quiet else False,
        )
    except (ValueError, FileNotFoundError) as err:
        print(f"landscape: error: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        seed = "" if result.seed is None else f", seed {result.seed}"
        print(
            f"merged {result.num_tensors} tensors ({result.num_bytes / 1e6:.1f} MB) with {result.method}{seed} "
            f"on {result.device} in {result.seconds:.1f} s -> {result.out_dir}",
            flush=True,
        )
    return 0
