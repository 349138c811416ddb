r"""Merge recipes in mergekit's YAML format (and the same recipe as TOML), validated up front.

A recipe names the models, the method and its parameters (mergekit 0.1.5's ``MergeConfiguration``)::

    merge_method: ties
    base_model: ./base
    models:
      - model: ./math
        parameters: {weight: 0.5, density: [0.2, 0.5, 0.8]}   # gradient over layers
      - model: ./code
        parameters:
          weight: 0.5
          density:
            - filter: self_attn        # substring of the tensor name
              value: 0.3
            - value: 0.6               # everything else
    parameters: {lambda: 1.0, normalize: true}
    dtype: float32                      # inputs are cast to this before merging
    out_dtype: bfloat16                 # dtype of the written tensors
    tokenizer_source: base              # or a model path
    seed: 0                             # landscape: seed of DARE / DELLA masks (default 0)

or ``slices`` instead of ``models`` (``- sources: [{model: ./a, layer_range: [0, 16]}]``, one output
slice after the other; passthrough frankenmerges).

**Parameters** resolve as in mergekit, highest precedence first: the model's (or slice source's)
own ``parameters``, the slice's, the top-level ``parameters``; a value that resolves to nothing
(a filter list with no matching entry) falls through to the next level, then to the method's
default. A value is a scalar, a *gradient* list ``[v_0, ..., v_{K-1}]`` interpolated linearly at
the layer position :math:`t = i/(L-1)` of tensor layer i of L (:math:`t = 1` for a 1-layer model,
:math:`t = 0` for tensors outside the layers, e.g. embeddings): with :math:`s = t(K-1)`,
:math:`v = (1-\{s\})v_{\lfloor s\rfloor} + \{s\}v_{\lfloor s\rfloor+1}` (booleans pick
:math:`v_{\lfloor s\rfloor}`), or a list of ``{filter, value}`` conditions, the first whose filter
is a substring of the tensor name (or is absent / ``"*"``) winning.

**Validation** (:func:`load_recipe`, :func:`parse_recipe`): an unknown key, method or parameter,
a parameter of the wrong type or scope, a value out of range, a bad dtype, a method's input
contract (a base model where it is required, the number of models) are ``ValueError`` naming the
recipe key and, for YAML, the line. Model paths and tensors are checked by the driver
(:mod:`probes.merge_command`) before any tensor is written.

Not supported (a clear error): mergekit's ``modules``, ``tokenizer`` (vocabulary surgery),
``chat_template``, ``tokenizer_source: union``, Hub model ids and ``model+lora`` references.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import tomllib
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from landscape.merge.tensorwise import METHODS, REQUIRED, MethodSpec, Parameter

__all__ = [
    "DTYPES",
    "ModelInput",
    "OutputSlice",
    "Recipe",
    "Setting",
    "SliceSource",
    "evaluate_setting",
    "load_recipe",
    "parse_recipe",
    "resolve_parameters",
]

DTYPES = ("float32", "float16", "bfloat16", "float64")
"""Accepted ``dtype`` / ``out_dtype`` names."""

_TOP = (
    "merge_method",
    "base_model",
    "models",
    "slices",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "seed",
)
_UNSUPPORTED = {
    "modules": "per-module recipes",
    "tokenizer": "tokenizer / vocabulary surgery",
    "chat_template": "chat templates",
}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One parameter's value as written: a scalar, a gradient tuple, or ``{filter, value}``
    conditions (``conditions`` is then a tuple of ``(filter or None, scalar or gradient)``).

    Attributes:
        name: the parameter name.
        conditions: ``((None, value),)`` for a plain value.
        where: recipe location (``"models[0].parameters.weight"`` and line) for error messages.
    """

    name: str
    conditions: tuple[tuple[str | None, Any], ...]
    where: str


@dataclasses.dataclass(frozen=True)
class ModelInput:
    """A ``models`` entry: ``model`` path and its own ``parameters``."""

    model: str
    parameters: Mapping[str, Setting]
    where: str


@dataclasses.dataclass(frozen=True)
class SliceSource:
    """A slice source: ``model``, ``layer_range = (start, stop)`` (stop exclusive), parameters."""

    model: str
    layer_range: tuple[int, int]
    parameters: Mapping[str, Setting]
    where: str


@dataclasses.dataclass(frozen=True)
class OutputSlice:
    """A ``slices`` entry: its ``sources`` (equal layer counts), optional ``base_model`` and
    ``parameters``."""

    sources: tuple[SliceSource, ...]
    base_model: str | None
    parameters: Mapping[str, Setting]
    where: str


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated merge recipe (see the module docstring).

    Attributes:
        merge_method: a key of :data:`landscape.merge.tensorwise.METHODS`.
        models: the ``models`` entries (None for a ``slices`` recipe).
        slices: the ``slices`` entries (None for a ``models`` recipe).
        base_model: path of the base model, or None.
        parameters: top-level parameters.
        dtype: dtype the inputs are cast to before merging, or None (keep).
        out_dtype: dtype of the written tensors, or None (``dtype``, else the inputs').
        tokenizer_source: ``"base"``, a model path, or None (the base / first model's files).
        seed: seed of random masks (DARE, DELLA), or None.
        source: the recipe file, or None.
    """

    merge_method: str
    models: tuple[ModelInput, ...] | None
    slices: tuple[OutputSlice, ...] | None
    base_model: str | None
    parameters: Mapping[str, Setting]
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None
    seed: int | None
    source: pathlib.Path | None = None

    @property
    def spec(self) -> MethodSpec:
        """The method's :class:`~landscape.merge.tensorwise.MethodSpec`."""
        return METHODS[self.merge_method]

    def referenced_models(self) -> list[str]:
        """Every model path the recipe names, first occurrence order (base first)."""
        out: list[str] = []
        names = [self.base_model] if self.base_model else []
        if self.models:
            names += [m.model for m in self.models]
        for s in self.slices or ():
            names += ([s.base_model] if s.base_model else []) + [src.model for src in s.sources]
        for n in names:
            if n not in out:
                out.append(n)
        return out


# --------------------------------------------------------------------------------------------
# Reading YAML with line numbers


def _yaml_lines(text: str) -> dict[tuple[Any, ...], int]:
    """Map every key path (tuple of str keys / int indices) to its 1-based line in the YAML."""
    lines: dict[tuple[Any, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[Any, ...]) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else str(k.value)
                lines[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (i,))

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


class _Ctx:
    """Where-strings for error messages: key path plus file and line when known."""

    def __init__(self, source: str, lines: Mapping[tuple[Any, ...], int]) -> None:
        self.source = source
        self.lines = lines

    def where(self, path: tuple[Any, ...]) -> str:
        key = "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(path))
        key = key or "<top level>"
        line = None
        for n in range(len(path), -1, -1):
            if path[:n] in self.lines:
                line = self.lines[path[:n]]
                break
        loc = f"{self.source}:{line}" if line is not None else self.source
        return f"{loc}: {key}"

    def fail(self, path: tuple[Any, ...], what: str) -> None:
        msg = f"{self.where(path)}: {what}"
        raise ValueError(msg)


# --------------------------------------------------------------------------------------------
# Validation


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_scalar(ctx: _Ctx, path: tuple[Any, ...], p: Parameter, v: Any) -> Any:
    if p.kind is bool:
        if not isinstance(v, bool):
            ctx.fail(path, f"{p.name} must be true or false, got {v!r}")
        return v
    if p.kind is int:
        if not isinstance(v, int) or isinstance(v, bool):
            ctx.fail(path, f"{p.name} must be an integer, got {v!r}")
        return v
    if isinstance(v, str):
        try:
            v = float(v)  # YAML 1.1 reads "1e-3" as a string; mergekit accepts it as a number
        except ValueError:
            ctx.fail(path, f"{p.name} must be a number, got {v!r}")
    if not _is_num(v) or not math.isfinite(float(v)):
        ctx.fail(path, f"{p.name} must be a finite number, got {v!r}")
    return float(v)


def _check_value(ctx: _Ctx, path: tuple[Any, ...], p: Parameter, v: Any) -> Any:
    if isinstance(v, list):
        if not v:
            ctx.fail(path, f"{p.name}: an empty gradient list")
        return tuple(_check_scalar(ctx, path + (i,), p, e) for i, e in enumerate(v))
    if isinstance(v, dict):
        ctx.fail(path, f"{p.name}: a mapping here must be inside a list of {{filter, value}} entries")
    return _check_scalar(ctx, path, p, v)


def _parse_setting(ctx: _Ctx, path: tuple[Any, ...], p: Parameter, v: Any) -> Setting:
    if isinstance(v, dict):
        v = [v]
    if isinstance(v, list) and v and all(isinstance(e, dict) for e in v):
        conds = []
        for i, e in enumerate(v):
            unknown = sorted(set(e) - {"filter", "value"})
            if unknown:
                ctx.fail(path + (i, unknown[0]), f"unknown key {unknown[0]!r} in a conditional parameter; accepted: ['filter', 'value']")
            if "value" not in e:
                ctx.fail(path + (i,), f"{p.name}: a conditional entry needs a 'value'")
            f = e.get("filter")
            if f is not None and not isinstance(f, str):
                ctx.fail(path + (i, "filter"), f"filter must be a string (a substring of tensor names), got {f!r}")
            conds.append((None if f in (None, "*") else f, _check_value(ctx, path + (i, "value"), p, e["value"])))
        return Setting(p.name, tuple(conds), ctx.where(path))
    if isinstance(v, list) and any(isinstance(e, dict) for e in v):
        ctx.fail(path, f"{p.name}: mixes {{filter, value}} entries with plain values")
    return Setting(p.name, ((None, _check_value(ctx, path, p, v)),), ctx.where(path))


def _parse_parameters(
    ctx: _Ctx, path: tuple[Any, ...], raw: Any, spec: MethodSpec, *, per_model: bool
) -> dict[str, Setting]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        ctx.fail(path, f"parameters must be a mapping of name -> value, got {type(raw).__name__}")
    out = {}
    accepted = [p.name for p in spec.parameters]
    for name, v in raw.items():
        p = spec.parameter(str(name))
        if p is None:
            ctx.fail(path + (name,), f"unknown parameter {name!r} for merge_method {spec.name!r}; accepted: {accepted}")
        if per_model and p.scope == "shared":
            ctx.fail(path + (name,), f"{name!r} is one value for all models: give it in the top-level (or slice) parameters, not per model")
        out[p.name] = _parse_setting(ctx, path + (name,), p, v)
    return out


def _model_ref(ctx: _Ctx, path: tuple[Any, ...], v: Any) -> str:
    if isinstance(v, dict):
        ctx.fail(path, "model must be a path (mergekit's {model: {path: ...}} / lora forms are not supported)")
    if not isinstance(v, str) or not v.strip():
        ctx.fail(path, f"model must be a path to a local safetensors checkpoint, got {v!r}")
    if "+" in v and not pathlib.Path(v).exists():
        ctx.fail(path, f"{v!r}: model+lora references are not supported")
    return v


def _check_keys(ctx: _Ctx, path: tuple[Any, ...], raw: Any, accepted: Sequence[str], what: str) -> None:
    if not isinstance(raw, dict):
        ctx.fail(path, f"{what} must be a mapping, got {type(raw).__name__}")
    for k in raw:
        if k not in accepted:
            ctx.fail(path + (k,), f"unknown key {k!r} in {what}; accepted: {list(accepted)}")


def _check_contract(ctx: _Ctx, path: tuple[Any, ...], spec: MethodSpec, inputs: list[str], base: str | None) -> None:
    has_base = base is not None and spec.base != "ignored"
    total = len(set(inputs) | ({base} if base else set()))
    non_base = total - int(has_base)
    if spec.base == "required" and not has_base:
        ctx.fail(path, f"merge_method {spec.name!r} needs a base_model")
    if total < spec.min_inputs or (spec.max_inputs is not None and total > spec.max_inputs):
        hi = "" if spec.max_inputs is None else f" and at most {spec.max_inputs}"
        ctx.fail(path, f"merge_method {spec.name!r} takes at least {spec.min_inputs}{hi} models (base included), got {total}")
    if non_base < spec.min_non_base or (spec.max_non_base is not None and non_base > spec.max_non_base):
        hi = "" if spec.max_non_base is None else f" and at most {spec.max_non_base}"
        ctx.fail(path, f"merge_method {spec.name!r} takes at least {spec.min_non_base}{hi} models besides the base, got {non_base}")
    if len(inputs) != len(set(inputs)):
        ctx.fail(path, "a model is listed twice")


def _recipe_from_data(data: Any, ctx: _Ctx, source: pathlib.Path | None) -> Recipe:
    if not isinstance(data, dict):
        ctx.fail((), f"a recipe is a mapping with at least 'merge_method', got {type(data).__name__}")
    for k in data:
        if k in _UNSUPPORTED:
            ctx.fail((k,), f"mergekit's {k!r} ({_UNSUPPORTED[k]}) is not supported by landscape merge")
        if k not in _TOP:
            ctx.fail((k,), f"unknown key {k!r}; accepted: {list(_TOP)}")
    method = data.get("merge_method")
    if method is None:
        ctx.fail((), "missing 'merge_method'")
    if method not in METHODS:
        ctx.fail(("merge_method",), f"unknown merge_method {method!r}; accepted: {sorted(METHODS)}")
    spec = METHODS[method]
    if ("models" in data) == ("slices" in data):
        ctx.fail((), "give exactly one of 'models' or 'slices'")
    for key in ("dtype", "out_dtype"):
        v = data.get(key)
        if v is not None and v not in DTYPES:
            ctx.fail((key,), f"{key} must be one of {list(DTYPES)}, got {v!r}")
    seed = data.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        ctx.fail(("seed",), f"seed must be a non-negative integer, got {seed!r}")
    base = data.get("base_model")
    if base is not None:
        base = _model_ref(ctx, ("base_model",), base)
    tok = data.get("tokenizer_source")
    if tok is not None:
        if tok == "union":
            ctx.fail(("tokenizer_source",), "tokenizer_source 'union' (vocabulary merging) is not supported; use 'base' or a model path")
        tok = _model_ref(ctx, ("tokenizer_source",), tok)
    params = _parse_parameters(ctx, ("parameters",), data.get("parameters"), spec, per_model=False)

    models = slices = None
    if "models" in data:
        raw = data["models"]
        if not isinstance(raw, list) or not raw:
            ctx.fail(("models",), "models must be a non-empty list of {model, parameters}")
        models = []
        for i, m in enumerate(raw):
            if isinstance(m, str):
                m = {"model": m}
            _check_keys(ctx, ("models", i), m, ("model", "parameters"), "a models entry")
            if "model" not in m:
                ctx.fail(("models", i), "a models entry needs 'model'")
            models.append(
                ModelInput(
                    _model_ref(ctx, ("models", i, "model"), m["model"]),
                    _parse_parameters(ctx, ("models", i, "parameters"), m.get("parameters"), spec, per_model=True),
                    ctx.where(("models", i)),
                )
            )
        models = tuple(models)
        _check_contract(ctx, ("merge_method",), spec, [m.model for m in models], base)
    else:
        raw = data["slices"]
        if not isinstance(raw, list) or not raw:
            ctx.fail(("slices",), "slices must be a non-empty list of {sources: [...]}")
        slices = []
        for i, s in enumerate(raw):
            _check_keys(ctx, ("slices", i), s, ("sources", "base_model", "parameters"), "a slices entry")
            srcs = s.get("sources")
            if not isinstance(srcs, list) or not srcs:
                ctx.fail(("slices", i, "sources"), "a slice needs a non-empty 'sources' list")
            sources = []
            for j, src in enumerate(srcs):
                p = ("slices", i, "sources", j)
                _check_keys(ctx, p, src, ("model", "layer_range", "parameters"), "a slice source")
                if "model" not in src or "layer_range" not in src:
                    ctx.fail(p, "a slice source needs 'model' and 'layer_range'")
                lr = src["layer_range"]
                if not (isinstance(lr, list) and len(lr) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in lr)) or not 0 <= lr[0] < lr[1]:
                    ctx.fail(p + ("layer_range",), f"layer_range must be [start, stop] with 0 <= start < stop, got {lr!r}")
                sources.append(
                    SliceSource(
                        _model_ref(ctx, p + ("model",), src["model"]),
                        (lr[0], lr[1]),
                        _parse_parameters(ctx, p + ("parameters",), src.get("parameters"), spec, per_model=True),
                        ctx.where(p),
                    )
                )
            lengths = {b - a for a, b in (x.layer_range for x in sources)}
            if len(lengths) != 1:
                ctx.fail(("slices", i, "sources"), f"all sources of a slice must span the same number of layers, got {sorted(lengths)}")
            sb = s.get("base_model")
            if sb is not None:
                sb = _model_ref(ctx, ("slices", i, "base_model"), sb)
            sparams = _parse_parameters(ctx, ("slices", i, "parameters"), s.get("parameters"), spec, per_model=False)
            slices.append(OutputSlice(tuple(sources), sb, sparams, ctx.where(("slices", i))))
            srcs_models = [x.model for x in sources]
            b = sb or base
            if spec.base != "ignored" and b is not None and b not in srcs_models:
                ctx.fail(("slices", i, "sources"), f"the base model {b!r} must be one of the slice's sources for {spec.name!r}")
            _check_contract(ctx, ("slices", i), spec, srcs_models, b if b in srcs_models else None)
        slices = tuple(slices)
    return Recipe(
        merge_method=method,
        models=models,
        slices=slices,
        base_model=base,
        parameters=params,
        dtype=data.get("dtype"),
        out_dtype=data.get("out_dtype"),
        tokenizer_source=tok,
        seed=seed,
        source=source,
    )


def parse_recipe(text: str, *, format: str = "yaml", source: str | None = None) -> Recipe:
    """Parse and validate a recipe from text.

    Args:
        text: the recipe.
        format: ``"yaml"`` (mergekit's format) or ``"toml"`` (the same keys: ``[[models]]`` tables,
            ``[parameters]``, conditional values as arrays of inline tables).
        source: name used in error messages (default ``"<recipe>"``).

    Raises:
        ValueError: naming the recipe key (and YAML line) on any invalid content.
    """
    name = source or "<recipe>"
    if format == "yaml":
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            msg = f"{name}: not valid YAML: {e}"
            raise ValueError(msg) from e
        lines = _yaml_lines(text)
    elif format == "toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            msg = f"{name}: not valid TOML: {e}"
            raise ValueError(msg) from e
        lines = {}
    else:
        msg = f"format must be 'yaml' or 'toml', got {format!r}"
        raise ValueError(msg)
    return _recipe_from_data(data, _Ctx(name, lines), pathlib.Path(source) if source else None)


def load_recipe(path: str | pathlib.Path) -> Recipe:
    """Read and validate a recipe file: ``.toml`` as TOML, anything else as YAML."""
    p = pathlib.Path(path)
    if not p.is_file():
        msg = f"recipe {str(p)!r} does not exist or is not a file"
        raise ValueError(msg)
    fmt = "toml" if p.suffix.lower() == ".toml" else "yaml"
    return parse_recipe(p.read_text(encoding="utf-8"), format=fmt, source=str(p))


# --------------------------------------------------------------------------------------------
# Resolution per tensor


def _interpolate(values: tuple[Any, ...], t: float) -> Any:
    if not all(_is_num(v) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def evaluate_setting(setting: Setting, tensor_name: str, t: float) -> Any:
    """The value of ``setting`` for ``tensor_name`` at layer position ``t`` in [0, 1], or None when
    no condition matches (mergekit's ``evaluate_setting``)."""
    for filt, value in setting.conditions:
        if filt is None or filt in tensor_name:
            if isinstance(value, tuple):
                return _interpolate(value, t)
            return value
    return None


def resolve_parameters(
    spec: MethodSpec,
    *,
    tensor_name: str,
    t: float,
    shared_sources: Sequence[Mapping[str, Setting]],
    input_sources: Sequence[Sequence[Mapping[str, Setting]]],
    input_names: Sequence[str],
    base_index: int | None,
    input_labels: Sequence[str] | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Resolve every parameter of ``spec`` for one output tensor (mergekit's precedence).

    Args:
        spec: the method.
        tensor_name: the output tensor's name (filters of shared parameters match it).
        t: layer position in [0, 1].
        shared_sources: settings for shared parameters, highest precedence first.
        input_sources: per input model, its settings chain (own parameters first).
        input_names: per input model, the name of the tensor read from it (filters match it).
        base_index: position of the base model among the inputs, or None.
        input_labels: per input model, how errors name it (default ``model #i``).

    Returns:
        ``(shared, per_input)``: shared values and one dict per input (the base's holds only
        ``"input"``-scope parameters).

    Raises:
        ValueError: a required parameter without value, naming the model and tensor.
    """

    def resolve(p: Parameter, chain: Sequence[Mapping[str, Setting]], name: str, who: str) -> Any:
        for scope in chain:
            if p.name in scope:
                v = evaluate_setting(scope[p.name], name, t)
                if v is not None:
                    return float(v) if p.kind is float else v
        if p.default is REQUIRED:
            msg = f"merge_method {spec.name!r} needs parameter {p.name!r} for {who}tensor {name!r}; give it in the model's or the top-level parameters"
            raise ValueError(msg)
        return p.default

    shared = {p.name: resolve(p, shared_sources, tensor_name, "") for p in spec.parameters if p.scope == "shared"}
    ignore_base = spec.base == "ignored"
    per_input = []
    for i, (chain, name) in enumerate(zip(input_sources, input_names, strict=True)):
        is_base = i == base_index and not ignore_base
        per_input.append(
            {
                p.name: resolve(p, chain, name, f"model {input_labels[i]!r}, " if input_labels else f"model #{i}, ")
                for p in spec.parameters
                if p.scope == "input" or (p.scope == "non_base" and not is_base)
            }
        )
    return shared, per_input
