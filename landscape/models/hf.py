"""Hugging Face GPT-2 and Llama checkpoints <-> the zoo's :class:`~landscape.models.GPT`.

No torch or transformers is imported: checkpoints are read with
:func:`landscape.checkpoints.open_checkpoint` (tensor by tensor, memory-mapped) and written with
:class:`~landscape.checkpoints.CheckpointWriter` (``model.safetensors`` or shards + index, ``format:
pt``, ``config.json``), names and layouts translated by a :class:`~landscape.checkpoints.LayoutMapping`
(``docs/transformers.md`` has the full table).

* **GPT-2** (``GPT2LMHeadModel``): ``Conv1D`` stores weights as ``(in, out)``, the Flax layout, so
  every kernel maps with the identity layout; the fused ``attn.c_attn`` ``(D, 3D)`` (bias ``(3D,)``)
  holds ``[query | key | value]`` column blocks and is split into our three projections on import
  and concatenated back on export. The unembedding is tied to ``wte`` (``lm_head.weight`` is not
  stored by ``save_pretrained``; when present it must equal ``wte``). GELU is ``gelu_new`` (tanh),
  LayerNorm ``ε = layer_norm_epsilon``, positions learned (``wpe``).
* **Llama** (``LlamaForCausalLM``): ``nn.Linear`` weights ``(out, in)`` map with the ``"kernel"``
  layout (a transpose); RMSNorm, rotary positions (``rope_theta``, Hugging Face's rotate-half
  layout, which is ours), SwiGLU MLP (``gate_proj`` -> ``mlp/gate``, ``up_proj`` -> ``mlp/fc``,
  ``down_proj`` -> ``mlp/proj``), no biases unless ``attention_bias`` / ``mlp_bias``. Grouped-query
  attention (``num_key_value_heads < num_attention_heads``) and rope scaling are not supported and
  are refused naming the config key.

Example:
    >>> import jax, pathlib, tempfile
    >>> from landscape import models
    >>> from landscape.models import hf
    >>> config = hf.hf_config("gpt2", vocab_size=32, context=8, width=16, depth=2, heads=2)
    >>> _, params, _ = models.functional(models.build("gpt", jax.random.key(0), **hf.gpt_settings(config)))
    >>> out = hf.gpt_to_hf(params, config, pathlib.Path(tempfile.mkdtemp()) / "tiny-gpt2")
    >>> apply_fn, loaded = hf.gpt_from_hf(out)
    >>> all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)))
    True
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from landscape.checkpoints import (
    CheckpointReader,
    CheckpointWriter,
    LayoutMapping,
    Rule,
    from_torch_state_dict,
    open_checkpoint,
    to_torch_state_dict,
)
from landscape.models.functional import FunctionalModel, functional
from landscape.models.transformer import GPT
from landscape.tree import named_leaves

__all__ = [
    "GPT2_MAPPING",
    "LLAMA_MAPPING",
    "MODEL_TYPES",
    "gpt_from_hf",
    "gpt_settings",
    "gpt_to_hf",
    "hf_config",
    "params_from_state_dict",
    "state_dict_from_params",
]

MODEL_TYPES = ("gpt2", "llama")
"""Hugging Face ``model_type`` values mapped onto :class:`~landscape.models.GPT`."""

_QKV = ("query", "key", "value")

GPT2_MAPPING = LayoutMapping(
    (
        Rule("embed/embedding", "transformer.wte.weight"),
        Rule("pos/embedding", "transformer.wpe.weight"),
        Rule("blocks/{i}/ln1/scale", "transformer.h.{i}.ln_1.weight"),
        Rule("blocks/{i}/ln1/bias", "transformer.h.{i}.ln_1.bias"),
        Rule("blocks/{i}/attn/out/kernel", "transformer.h.{i}.attn.c_proj.weight"),
        Rule("blocks/{i}/attn/out/bias", "transformer.h.{i}.attn.c_proj.bias"),
        # the fused c_attn is split into query / key / value by params_from_state_dict (and fused back)
        *(Rule(f"blocks/{{i}}/attn/{w}/kernel", f"transformer.h.{{i}}.attn.c_attn.{w}.weight") for w in _QKV),
        *(Rule(f"blocks/{{i}}/attn/{w}/bias", f"transformer.h.{{i}}.attn.c_attn.{w}.bias") for w in _QKV),
        Rule("blocks/{i}/ln2/scale", "transformer.h.{i}.ln_2.weight"),
        Rule("blocks/{i}/ln2/bias", "transformer.h.{i}.ln_2.bias"),
        Rule("blocks/{i}/mlp/fc/kernel", "transformer.h.{i}.mlp.c_fc.weight"),
        Rule("blocks/{i}/mlp/fc/bias", "transformer.h.{i}.mlp.c_fc.bias"),
        Rule("blocks/{i}/mlp/proj/kernel", "transformer.h.{i}.mlp.c_proj.weight"),
        Rule("blocks/{i}/mlp/proj/bias", "transformer.h.{i}.mlp.c_proj.bias"),
        Rule("ln_f/scale", "transformer.ln_f.weight"),
        Rule("ln_f/bias", "transformer.ln_f.bias"),
        Rule("head/kernel", "lm_head.weight", layout="kernel"),
    ),
    drop_torch=("transformer.h.*.attn.bias", "transformer.h.*.attn.masked_bias"),
)
"""GPT-2 names (after splitting ``c_attn``) <-> ours. Conv1D kernels are ``(in, out)``: identity layout.
The causal-mask buffers ``attn.bias`` / ``attn.masked_bias`` of old checkpoints are dropped."""

_LLAMA_PROJ = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "out": "o_proj"}
_LLAMA_MLP = {"gate": "gate_proj", "fc": "up_proj", "proj": "down_proj"}

LLAMA_MAPPING = LayoutMapping(
    (
        Rule("embed/embedding", "model.embed_tokens.weight"),
        Rule("blocks/{i}/ln1/scale", "model.layers.{i}.input_layernorm.weight"),
        Rule("blocks/{i}/ln2/scale", "model.layers.{i}.post_attention_layernorm.weight"),
        *(
            Rule(f"blocks/{{i}}/attn/{ours}/{kind}", f"model.layers.{{i}}.self_attn.{theirs}.{w}", layout=lay)
            for ours, theirs in _LLAMA_PROJ.items()
            for kind, w, lay in (("kernel", "weight", "kernel"), ("bias", "bias", "identity"))
        ),
        *(
            Rule(f"blocks/{{i}}/mlp/{ours}/{kind}", f"model.layers.{{i}}.mlp.{theirs}.{w}", layout=lay)
            for ours, theirs in _LLAMA_MLP.items()
            for kind, w, lay in (("kernel", "weight", "kernel"), ("bias", "bias", "identity"))
        ),
        Rule("ln_f/scale", "model.norm.weight"),
        Rule("head/kernel", "lm_head.weight", layout="kernel"),
    ),
    drop_torch=("model.layers.*.self_attn.rotary_emb.inv_freq",),
)
"""Llama names <-> ours. ``nn.Linear`` weights are ``(out, in)``: the ``"kernel"`` layout transposes."""

_MAPPINGS = {"gpt2": GPT2_MAPPING, "llama": LLAMA_MAPPING}
_GPT2_ACTS = ("gelu_new", "gelu_pytorch_tanh")


# ------------------------------------------------------------------------------ configs
def _get(config: Mapping[str, Any], key: str, default: Any = None, *, required: bool = False) -> Any:
    if required and key not in config:
        msg = f"config.json has no {key!r} (model_type {config.get('model_type')!r})"
        raise ValueError(msg)
    value = config.get(key, default)
    return default if value is None else value


def _model_type(config: Mapping[str, Any]) -> str:
    if not isinstance(config, Mapping):
        msg = f"config must be a mapping (the contents of config.json), got {type(config).__name__}"
        raise TypeError(msg)
    mt = config.get("model_type")
    if mt not in MODEL_TYPES:
        msg = f"config.json model_type {mt!r} is not supported; accepted: {list(MODEL_TYPES)}"
        raise ValueError(msg)
    return mt


def _rope_theta(config: Mapping[str, Any]) -> float:
    params = config.get("rope_parameters")
    scaling = config.get("rope_scaling")
    if isinstance(params, Mapping):
        if params.get("rope_type", "default") != "default":
            msg = (
                f"config.json rope_parameters.rope_type {params.get('rope_type')!r} is not supported; "
                "accepted: 'default'"
            )
            raise ValueError(msg)
        if "rope_theta" in params:
            return float(params["rope_theta"])
    if scaling is not None and (not isinstance(scaling, Mapping) or scaling.get("rope_type", "default") != "default"):
        msg = f"config.json rope_scaling {scaling!r} is not supported (only plain rotary positions)"
        raise ValueError(msg)
    return float(_get(config, "rope_theta", 10000.0))


def gpt_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`~landscape.models.GPT` constructor arguments (except ``rngs``) of a Hugging Face config.

    Args:
        config: the contents of ``config.json`` with ``model_type`` ``"gpt2"`` or ``"llama"``.

    Raises:
        ValueError: an unsupported ``model_type``, a missing size key, or a setting the GPT does not
            implement (GPT-2: ``activation_function`` other than ``gelu_new``,
            ``scale_attn_by_inverse_layer_idx``, ``scale_attn_weights=False``; Llama: grouped-query
            attention, a ``head_dim`` other than ``hidden_size / num_attention_heads``, rope scaling,
            ``hidden_act`` other than ``silu``), naming the key.
    """
    mt = _model_type(config)
    if mt == "gpt2":
        act = _get(config, "activation_function", "gelu_new")
        if act not in _GPT2_ACTS:
            msg = f"config.json activation_function {act!r} is not supported; accepted: {list(_GPT2_ACTS)}"
            raise ValueError(msg)
        if _get(config, "scale_attn_by_inverse_layer_idx", False) or not _get(config, "scale_attn_weights", True):
            msg = "config.json scale_attn_by_inverse_layer_idx=True / scale_attn_weights=False is not supported"
            raise ValueError(msg)
        width = int(_get(config, "n_embd", required=True))
        inner = _get(config, "n_inner")
        return {
            "vocab_size": int(_get(config, "vocab_size", required=True)),
            "context": int(_get(config, "n_positions", required=True)),
            "width": width,
            "depth": int(_get(config, "n_layer", required=True)),
            "heads": int(_get(config, "n_head", required=True)),
            "mlp_width": int(inner) if inner is not None else 4 * width,
            "tied": bool(_get(config, "tie_word_embeddings", True)),
            "positions": "learned",
            "norm": "layer",
            "norm_eps": float(_get(config, "layer_norm_epsilon", 1e-5)),
            "mlp": "gelu",
            "bias": True,
        }
    width = int(_get(config, "hidden_size", required=True))
    heads = int(_get(config, "num_attention_heads", required=True))
    kv = int(_get(config, "num_key_value_heads", heads))
    if kv != heads:
        msg = (
            f"config.json num_key_value_heads={kv} != num_attention_heads={heads}: "
            "grouped-query attention is not supported"
        )
        raise ValueError(msg)
    head_dim = int(_get(config, "head_dim", width // heads))
    if head_dim * heads != width:
        msg = f"config.json head_dim={head_dim} * num_attention_heads={heads} != hidden_size={width}; not supported"
        raise ValueError(msg)
    act = _get(config, "hidden_act", "silu")
    if act != "silu":
        msg = f"config.json hidden_act {act!r} is not supported; accepted: 'silu'"
        raise ValueError(msg)
    if bool(_get(config, "attention_bias", False)) != bool(_get(config, "mlp_bias", False)):
        msg = "config.json attention_bias and mlp_bias differ; the GPT has one bias setting for both"
        raise ValueError(msg)
    return {
        "vocab_size": int(_get(config, "vocab_size", required=True)),
        "context": int(_get(config, "max_position_embeddings", required=True)),
        "width": width,
        "depth": int(_get(config, "num_hidden_layers", required=True)),
        "heads": heads,
        "mlp_width": int(_get(config, "intermediate_size", required=True)),
        "tied": bool(_get(config, "tie_word_embeddings", False)),
        "positions": "rotary",
        "rope_theta": _rope_theta(config),
        "norm": "rms",
        "norm_eps": float(_get(config, "rms_norm_eps", 1e-6)),
        "mlp": "gated",
        "bias": bool(_get(config, "attention_bias", False)),
    }


def hf_config(model_type: str, **settings: Any) -> dict[str, Any]:
    """A Hugging Face ``config.json`` (as a dict) for a GPT with the given constructor settings.

    ``hf_config("gpt2", vocab_size=, context=, width=, depth=, heads=, mlp_ratio=4 | mlp_width=,
    norm_eps=1e-5, tied=True)`` or ``hf_config("llama", ..., mlp_width=, rope_theta=10000.0,
    norm_eps=1e-6, tied=False, bias=False)``; ``gpt_settings(hf_config(t, **s))`` gives the full
    settings back. Settings the format cannot hold (e.g. ``positions="rotary"`` for GPT-2) are a
    ``ValueError``.
    """
    if model_type not in MODEL_TYPES:
        msg = f"model_type {model_type!r} is not supported; accepted: {list(MODEL_TYPES)}"
        raise ValueError(msg)
    fixed = (
        {"positions": "learned", "norm": "layer", "mlp": "gelu", "bias": True}
        if model_type == "gpt2"
        else {"positions": "rotary", "norm": "rms", "mlp": "gated"}
    )
    for key, value in fixed.items():
        if key in settings and settings[key] != value:
            msg = f"a {model_type} checkpoint needs {key}={value!r}, got {settings[key]!r}"
            raise ValueError(msg)
    known = {"vocab_size", "context", "width", "depth", "heads", "mlp_ratio", "mlp_width", "norm_eps", "tied",
             "rope_theta", "bias", *fixed}  # fmt: skip
    unknown = sorted(set(settings) - known)
    missing = [k for k in ("vocab_size", "context", "width", "depth", "heads") if k not in settings]
    if unknown or missing:
        msg = f"hf_config({model_type!r}): unknown settings {unknown}, missing {missing}; accepted: {sorted(known)}"
        raise ValueError(msg)
    s = settings
    hidden = s.get("mlp_width") or s.get("mlp_ratio", 4) * s["width"]
    if model_type == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": s["vocab_size"],
            "n_positions": s["context"],
            "n_embd": s["width"],
            "n_layer": s["depth"],
            "n_head": s["heads"],
            "n_inner": hidden,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": s.get("norm_eps", 1e-5),
            "tie_word_embeddings": s.get("tied", True),
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "torch_dtype": "float32",
        }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": s["vocab_size"],
        "max_position_embeddings": s["context"],
        "hidden_size": s["width"],
        "num_hidden_layers": s["depth"],
        "num_attention_heads": s["heads"],
        "num_key_value_heads": s["heads"],
        "intermediate_size": hidden,
        "hidden_act": "silu",
        "rms_norm_eps": s.get("norm_eps", 1e-6),
        "rope_theta": s.get("rope_theta", 10000.0),
        "tie_word_embeddings": s.get("tied", False),
        "attention_bias": s.get("bias", False),
        "mlp_bias": s.get("bias", False),
        "torch_dtype": "float32",
    }


# ------------------------------------------------------------------------------ state dicts
def _gpt2_canonical(name: str) -> str:
    """GPT-2 keys saved from ``GPT2Model`` lack the ``transformer.`` prefix: add it."""
    if name.startswith(("transformer.", "lm_head.")):
        return name
    return "transformer." + name


def _split_gpt2(state_dict: Mapping[str, Any] | CheckpointReader) -> dict[str, np.ndarray]:
    """Canonical names, ``c_attn`` split into ``c_attn.{query,key,value}``, tied ``lm_head`` checked and dropped."""
    names = state_dict.keys() if isinstance(state_dict, CheckpointReader) else list(state_dict)
    out: dict[str, Any] = {}
    for raw in names:
        name = _gpt2_canonical(raw)
        arr = state_dict.get(raw) if isinstance(state_dict, CheckpointReader) else np.asarray(state_dict[raw])
        if name in out:
            msg = f"GPT-2 tensors {raw!r} and another one both name {name!r}"
            raise ValueError(msg)
        if ".attn.c_attn." in name:
            stem, kind = name.rsplit(".", 1)
            axis = arr.ndim - 1
            if arr.shape[axis] % 3:
                msg = f"GPT-2 tensor {raw!r} has shape {arr.shape}; c_attn needs a last axis of 3 * n_embd"
                raise ValueError(msg)
            for w, part in zip(_QKV, np.split(arr, 3, axis=axis)):
                out[f"{stem}.{w}.{kind}"] = np.ascontiguousarray(part)
        else:
            out[name] = arr
    return out


def params_from_state_dict(
    state_dict: Mapping[str, Any] | CheckpointReader, config: Mapping[str, Any]
) -> dict[str, Any]:
    """A Hugging Face ``state_dict`` (or opened checkpoint) as GPT params (nested dicts, stored dtypes).

    Checks that every GPT leaf is present with the shape the config implies and nothing else is
    (naming the tensor); GPT-2's fused ``c_attn`` is split, a tied GPT-2 ``lm_head.weight`` must equal
    ``wte`` (it is then dropped); a tied Llama's ``lm_head.weight``, if stored, likewise.
    """
    mt = _model_type(config)
    settings = gpt_settings(config)
    if mt == "gpt2":
        flat = _split_gpt2(state_dict)
    else:
        names = state_dict.keys() if isinstance(state_dict, CheckpointReader) else list(state_dict)
        reader = isinstance(state_dict, CheckpointReader)
        flat = {n: (state_dict.get(n) if reader else np.asarray(state_dict[n])) for n in names}
    if settings["tied"] and "lm_head.weight" in flat:
        embed = flat.get("transformer.wte.weight" if mt == "gpt2" else "model.embed_tokens.weight")
        if embed is None or not np.array_equal(np.asarray(flat["lm_head.weight"]), np.asarray(embed)):
            msg = "lm_head.weight differs from the token embeddings, but config.json has tie_word_embeddings=True"
            raise ValueError(msg)
        del flat["lm_head.weight"]
    params, _ = from_torch_state_dict(flat, mapping=_MAPPINGS[mt])
    want = _abstract_params(settings)
    got = {n: np.shape(a) for n, a in named_leaves(params)}
    for name, shape in want.items():
        if name not in got:
            msg = f"the {mt} checkpoint has no tensor for GPT param {name!r} (shape {shape})"
            raise ValueError(msg)
        if got[name] != shape:
            msg = f"the {mt} checkpoint gives GPT param {name!r} shape {got[name]}; config.json implies {shape}"
            raise ValueError(msg)
    extra = sorted(set(got) - set(want))
    if extra:
        msg = f"the {mt} checkpoint has tensors for {extra[:5]}, which a GPT with this config.json does not have"
        raise ValueError(msg)
    return params


def state_dict_from_params(params: Any, config: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """GPT params as a Hugging Face ``state_dict`` of numpy arrays (``c_attn`` fused for GPT-2).

    Tied models store no ``lm_head.weight`` (``save_pretrained`` does the same; ``from_pretrained``
    ties it to the embeddings).
    """
    mt = _model_type(config)
    want = _abstract_params(gpt_settings(config))
    got = {n: np.shape(a) for n, a in named_leaves(params)}
    if got != want:
        diff = sorted(set(got) ^ set(want)) or [n for n in want if got[n] != want[n]]
        msg = f"params do not fit config.json ({mt}): first differing leaf {diff[0]!r}"
        raise ValueError(msg)
    sd = to_torch_state_dict(params, mapping=_MAPPINGS[mt])
    if mt == "llama":
        return sd
    out: dict[str, np.ndarray] = {}
    for name, arr in sd.items():
        if ".attn.c_attn." not in name:
            out[name] = arr
            continue
        stem, w, kind = name.rsplit(".", 2)
        if w != "query":
            continue
        parts = [sd[f"{stem}.{v}.{kind}"] for v in _QKV]
        out[f"{stem}.{kind}"] = np.ascontiguousarray(np.concatenate(parts, axis=-1))
    return out


def _abstract_params(settings: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Leaf name -> shape of a GPT with ``settings`` (no arrays are allocated)."""
    model = nnx.eval_shape(lambda: GPT(**settings, rngs=nnx.Rngs(0)))
    _, params_state, _ = nnx.split(model, nnx.Param, ...)
    return {"/".join(str(k) for k in p): tuple(v.get_value().shape) for p, v in nnx.to_flat_state(params_state)}


# ------------------------------------------------------------------------------ folders
def _read_config(folder: pathlib.Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        msg = f"{str(folder)!r} has no config.json (a Hugging Face model folder needs one)"
        raise ValueError(msg)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        msg = f"{str(path)!r} is not valid JSON: {e}"
        raise ValueError(msg) from e


def gpt_from_hf(checkpoint_dir: str | os.PathLike[str]) -> tuple[FunctionalModel, dict[str, Any]]:
    """Load a Hugging Face GPT-2 / Llama model folder into the zoo's GPT.

    Args:
        checkpoint_dir: a folder with ``config.json`` and ``model.safetensors`` (or shards and
            ``model.safetensors.index.json``), as ``save_pretrained`` writes.

    Returns:
        ``(apply_fn, params)``: ``apply_fn`` the GPT's :class:`~landscape.models.FunctionalModel`
        (``apply_fn(params, ids)`` -> logits equal to ``transformers``' on the same ids), ``params``
        the checkpoint's tensors as numpy arrays in their stored dtypes (bf16 stays bf16). No
        random initialisation is run.

    Raises:
        ValueError: no ``config.json``, an unsupported config (see :func:`gpt_settings`), a
            missing / extra / misshapen tensor, or a pickle checkpoint, naming the file or tensor.
    """
    folder = pathlib.Path(checkpoint_dir)
    config = _read_config(folder)
    settings = gpt_settings(config)
    with open_checkpoint(folder) as ckpt:
        params = params_from_state_dict(ckpt, config)
    params = jax.tree.map(np.asarray, params)
    apply_fn, _, _ = functional(nnx.eval_shape(lambda: GPT(**settings, rngs=nnx.Rngs(0))))
    return apply_fn, params


def gpt_to_hf(
    params: Any,
    config: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write GPT params as a Hugging Face model folder that ``transformers`` loads.

    Args:
        params: the GPT's params (e.g. from :func:`gpt_from_hf` or :func:`landscape.models.functional`).
        config: the Hugging Face config (e.g. from :func:`hf_config`, or the source folder's
            ``config.json``); written as ``config.json``.
        out_dir: the folder to create (atomically, see :class:`~landscape.checkpoints.CheckpointWriter`).
        max_shard_bytes: shard size limit (sharded with an index above it).
        overwrite: replace an existing ``out_dir``.

    Returns:
        ``out_dir``. Dtypes are kept; ``params_from_state_dict`` of the result is bit-exact.
    """
    sd = state_dict_from_params(jax.tree.map(np.asarray, params), config)
    out = pathlib.Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        (pathlib.Path(tmp) / "config.json").write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        with CheckpointWriter(out, max_shard_bytes=max_shard_bytes, overwrite=overwrite) as writer:
            for name, arr in sd.items():
                writer.add(name, arr)
            writer.copy_files_from(tmp, ["config.json"])
    return out
