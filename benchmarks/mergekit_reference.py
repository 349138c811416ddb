"""Generate the committed mergekit 0.1.5 reference outputs in ``tests/data/mergekit/``.

Run by hand (not in CI)::

    python benchmarks/mergekit_reference.py

1. creates ``benchmarks/.venv-mergekit`` (once) and installs ``torch==2.13.0`` first (the local CPU
   wheel; never an unpinned torch), then ``mergekit==0.1.5``;
2. re-runs itself inside that environment to build tiny fixed checkpoints with real architecture
   names (Llama: 2 layers, hidden 6, MLP 6, vocab 16; GPT-2: 2 layers; float32, and a bf16 Llama
   set), written as Hugging Face model folders (``model.safetensors`` + ``config.json``);
3. runs mergekit's own ``run_merge`` on one small recipe per method (plus gradient / filter / dtype /
   slices variants) and saves each output as ``expected/<recipe>.safetensors``;
4. for DARE / DELLA it records the Bernoulli masks mergekit drew (``torch.bernoulli`` wrapped, per
   tensor and model) in ``expected/<recipe>.masks.safetensors``, so the tests replay them exactly
   (mergekit's torch RNG stream cannot be reproduced in JAX).

``tests/probes/test_merge_command.py`` runs ``landscape merge`` on the same recipes and compares.
Total size of ``tests/data/mergekit`` stays well under 1 MB.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
VENV = ROOT / "benchmarks" / ".venv-mergekit"
DATA = ROOT / "tests" / "data" / "mergekit"
PY = VENV / "bin" / "python"


def setup_venv() -> None:
    """Create the venv and install the pinned torch, then mergekit 0.1.5 (skipped if present)."""
    if PY.exists():
        ok = subprocess.run([str(PY), "-c", "import mergekit, torch; assert torch.__version__.startswith('2.13.0')"], check=False)
        if ok.returncode == 0:
            return
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(VENV)], check=True)
    pip = [str(PY), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "mergekit==0.1.5"], check=True)


# ----------------------------------------------------------------------------------------------
# Everything below runs inside the mergekit venv.

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 6,
    "intermediate_size": 6,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "vocab_size": 16,
    "max_position_embeddings": 32,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
GPT2_CONFIG = {
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "n_embd": 6,
    "n_head": 2,
    "n_layer": 2,
    "n_positions": 8,
    "vocab_size": 16,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}


def llama_shapes() -> dict[str, tuple[int, ...]]:
    h, f, v = 6, 6, 16
    out = {"model.embed_tokens.weight": (v, h)}
    for i in range(2):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (h, h),
            p + "self_attn.v_proj.weight": (h, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
        }
    out |= {"model.norm.weight": (h,), "lm_head.weight": (v, h)}
    return out


def gpt2_shapes() -> dict[str, tuple[int, ...]]:
    h, v = 6, 16
    out = {"transformer.wte.weight": (v, h), "transformer.wpe.weight": (8, h)}
    for i in range(2):
        p = f"transformer.h.{i}."
        out |= {
            p + "ln_1.weight": (h,),
            p + "ln_1.bias": (h,),
            p + "attn.c_attn.weight": (h, 3 * h),
            p + "attn.c_attn.bias": (3 * h,),
            p + "attn.c_proj.weight": (h, h),
            p + "attn.c_proj.bias": (h,),
            p + "ln_2.weight": (h,),
            p + "ln_2.bias": (h,),
            p + "mlp.c_fc.weight": (h, 4 * h),
            p + "mlp.c_fc.bias": (4 * h,),
            p + "mlp.c_proj.weight": (4 * h, h),
            p + "mlp.c_proj.bias": (h,),
        }
    out |= {"transformer.ln_f.weight": (h,), "transformer.ln_f.bias": (h,)}
    return out


def build_models() -> None:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    models = DATA / "models"
    if models.exists():
        shutil.rmtree(models)
    sets = [
        ("llama", llama_shapes(), LLAMA_CONFIG, torch.float32, ("base", "a", "b", "c")),
        ("gpt2", gpt2_shapes(), GPT2_CONFIG, torch.float32, ("base", "a", "b")),
        ("llama_bf16", llama_shapes(), {**LLAMA_CONFIG, "torch_dtype": "bfloat16"}, torch.bfloat16, ("base", "a", "b")),
    ]
    for s_i, (family, shapes, cfg, dtype, names) in enumerate(sets):
        rng = np.random.default_rng(1000 + s_i)
        base = {k: rng.normal(size=shp).astype(np.float32) for k, shp in shapes.items()}
        for m_i, name in enumerate(names):
            if name == "base":
                ts = base
            else:
                ts = {k: v + 0.3 * (m_i + 1) / 2 * rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()}
            folder = models / f"{family}_{name}"
            folder.mkdir(parents=True)
            save_file({k: torch.from_numpy(v).to(dtype).contiguous() for k, v in ts.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
            (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def recipes() -> dict[str, dict]:
    """One recipe per method (and variants), models as paths relative to recipes/."""

    def m(family: str, name: str) -> str:
        return f"../models/{family}_{name}"

    L = "llama"
    ab = [m(L, "a"), m(L, "b")]
    abc = [m(L, "a"), m(L, "b"), m(L, "c")]

    def models(paths, **per):
        out = []
        for i, p in enumerate(paths):
            params = {k: (v[i] if isinstance(v, list) and len(v) == len(paths) and not isinstance(v[0], (list, dict)) else v) for k, v in per.items()}
            out.append({"model": p, "parameters": params} if params else {"model": p})
        return out

    r: dict[str, dict] = {}
    r["linear"] = {"merge_method": "linear", "models": models(abc, weight=[0.2, 0.5, 0.3])}
    r["linear_nonorm_gradient"] = {
        "merge_method": "linear",
        "models": [
            {"model": m(L, "a"), "parameters": {"weight": [0.2, 0.8]}},
            {"model": m(L, "b"), "parameters": {"weight": [{"filter": "self_attn", "value": 0.9}, {"value": 0.4}]}},
        ],
        "parameters": {"normalize": False},
    }
    r["slerp"] = {"merge_method": "slerp", "base_model": m(L, "base"), "models": models([m(L, "base"), m(L, "a")]), "parameters": {"t": 0.3}}
    r["slerp_filters"] = {
        "merge_method": "slerp",
        "base_model": m(L, "base"),
        "models": models([m(L, "base"), m(L, "a")]),
        "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"filter": "mlp", "value": [1.0, 0.5, 0.0]}, {"value": 0.5}]},
    }
    r["nuslerp"] = {"merge_method": "nuslerp", "base_model": m(L, "base"), "models": models(ab, weight=[0.3, 0.7])}
    r["nuslerp_rows"] = {"merge_method": "nuslerp", "models": models(ab, weight=[0.6, 0.4]), "parameters": {"nuslerp_flatten": False}}
    r["nuslerp_row_wise"] = {"merge_method": "nuslerp", "base_model": m(L, "base"), "models": models(ab, weight=[0.5, 0.5]), "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}}
    r["multislerp"] = {"merge_method": "multislerp", "base_model": m(L, "base"), "models": models(abc, weight=[0.2, 0.5, 0.3])}
    r["multislerp_nobase"] = {"merge_method": "multislerp", "models": models(abc, weight=[1.0, 2.0, 1.0])}
    r["karcher"] = {"merge_method": "karcher", "models": models(abc)}
    r["task_arithmetic"] = {"merge_method": "task_arithmetic", "base_model": m(L, "base"), "models": models(abc, weight=[0.5, 0.3, 0.2]), "parameters": {"lambda": 0.8}}
    r["ties"] = {"merge_method": "ties", "base_model": m(L, "base"), "models": models(abc, weight=[0.5, 0.3, 0.2], density=[0.3, 0.5, 0.7])}
    r["ties_gradient"] = {
        "merge_method": "ties",
        "base_model": m(L, "base"),
        "models": [
            {"model": m(L, "a"), "parameters": {"weight": 1.0, "density": [0.2, 0.8]}},
            {"model": m(L, "b"), "parameters": {"weight": [0.5, 1.5], "density": 0.5}},
        ],
        "parameters": {"normalize": False, "lambda": 1.2},
    }
    r["dare_linear"] = {"merge_method": "dare_linear", "base_model": m(L, "base"), "models": models(abc, weight=[0.5, 0.3, 0.2], density=[0.5, 0.6, 0.7])}
    r["dare_ties"] = {"merge_method": "dare_ties", "base_model": m(L, "base"), "models": models(abc, weight=[0.5, 0.3, 0.2], density=0.5)}
    r["breadcrumbs"] = {"merge_method": "breadcrumbs", "base_model": m(L, "base"), "models": models(abc, weight=[0.5, 0.3, 0.2], density=0.5, gamma=0.1)}
    r["breadcrumbs_ties"] = {"merge_method": "breadcrumbs_ties", "base_model": m(L, "base"), "models": models(abc, weight=[0.5, 0.3, 0.2], density=0.6, gamma=0.05)}
    r["della"] = {"merge_method": "della", "base_model": m(L, "base"), "models": models(abc, weight=[0.5, 0.3, 0.2], density=0.5, epsilon=0.2)}
    r["della_linear"] = {"merge_method": "della_linear", "base_model": m(L, "base"), "models": models(abc, weight=[0.5, 0.3, 0.2], density=0.6, epsilon=0.1)}
    r["sce"] = {"merge_method": "sce", "base_model": m(L, "base"), "models": models(abc), "parameters": {"select_topk": 0.5}}
    r["model_stock"] = {"merge_method": "model_stock", "base_model": m(L, "base"), "models": models(abc)}
    r["model_stock_filter_wise"] = {"merge_method": "model_stock", "base_model": m(L, "base"), "models": models(abc), "parameters": {"filter_wise": True}}
    r["nearswap"] = {"merge_method": "nearswap", "base_model": m(L, "base"), "models": models([m(L, "base"), m(L, "a")]), "parameters": {"t": 0.5}}
    r["passthrough_scale"] = {"merge_method": "passthrough", "models": [{"model": m(L, "a"), "parameters": {"scale": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}}]}
    r["passthrough_slices"] = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": m(L, "a"), "layer_range": [0, 2]}]},
            {"sources": [{"model": m(L, "b"), "layer_range": [1, 2]}]},
        ],
    }
    G = "gpt2"
    r["gpt2_ties"] = {"merge_method": "ties", "base_model": m(G, "base"), "models": models([m(G, "a"), m(G, "b")], weight=[0.6, 0.4], density=0.5)}
    r["gpt2_slerp"] = {"merge_method": "slerp", "base_model": m(G, "base"), "models": models([m(G, "base"), m(G, "a")]), "parameters": {"t": [0.2, 0.8]}}
    r["gpt2_della"] = {"merge_method": "della", "base_model": m(G, "base"), "models": models([m(G, "a"), m(G, "b")], weight=1.0, density=0.4, epsilon=0.1)}
    B = "llama_bf16"
    bab = [m(B, "a"), m(B, "b")]
    r["bf16_linear"] = {"merge_method": "linear", "models": models(bab, weight=[0.3, 0.7])}
    # (no magnitude top-k on bf16: equal |delta| are common in bf16 and torch's unstable argsort
    # breaks such ties arbitrarily; we break them by lower index)
    r["bf16_dare_ties_f32"] = {"merge_method": "dare_ties", "base_model": m(B, "base"), "models": models(bab, weight=[0.5, 0.5], density=0.5), "dtype": "float32", "out_dtype": "bfloat16"}
    r["bf16_task_arithmetic"] = {"merge_method": "task_arithmetic", "base_model": m(B, "base"), "models": models(bab, weight=[0.7, 0.3])}
    r["bf16_slerp_out_f32"] = {"merge_method": "slerp", "base_model": m(B, "base"), "models": models([m(B, "base"), m(B, "a")]), "parameters": {"t": 0.6}, "out_dtype": "float32"}
    return r


def run_all() -> None:
    import torch
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.merge_methods import generalized_task_arithmetic as gta
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file, save_file

    build_models()
    rec_dir = DATA / "recipes"
    exp_dir = DATA / "expected"
    for d in (rec_dir, exp_dir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)

    state: dict = {"tensor": None, "index": 0, "masks": {}}
    real_bernoulli = torch.bernoulli
    real_merge_group = gta.GeneralizedTaskArithmeticMerge.merge_group

    def recording_bernoulli(p, *a, **k):
        out = real_bernoulli(p, *a, **k)
        state["masks"][f"{state['tensor']}::{state['index']}"] = (out != 0).to(torch.uint8)
        state["index"] += 1
        return out

    def recording_merge_group(self, group, /, **parameters):
        state["tensor"] = group.metadata.name
        state["index"] = 0
        return real_merge_group(self, group, **parameters)

    torch.bernoulli = recording_bernoulli
    gta.GeneralizedTaskArithmeticMerge.merge_group = recording_merge_group
    manifest = {}
    cwd = os.getcwd()
    try:
        os.chdir(rec_dir)
        for name, recipe in recipes().items():
            text = yaml.safe_dump(recipe, sort_keys=False)
            (rec_dir / f"{name}.yml").write_text(text)
            state["masks"] = {}
            out = DATA / "_out" / name
            if out.exists():
                shutil.rmtree(out)
            config = MergeConfiguration.model_validate(yaml.safe_load(text))
            run_merge(config, str(out), MergeOptions(copy_tokenizer=False, write_model_card=False, random_seed=0, quiet=True))
            tensors = {}
            for f in sorted(out.glob("*.safetensors")):
                tensors.update(load_file(str(f)))
            save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(exp_dir / f"{name}.safetensors"), metadata={"format": "pt"})
            entry = {"tensors": len(tensors), "dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in tensors.values()})}
            cfg = json.loads((out / "config.json").read_text())
            entry["config_layers"] = cfg.get("num_hidden_layers", cfg.get("n_layer"))
            if state["masks"]:
                save_file(dict(sorted(state["masks"].items())), str(exp_dir / f"{name}.masks.safetensors"), metadata={"format": "pt"})
                entry["masks"] = len(state["masks"])
            manifest[name] = entry
            print(f"{name}: {entry}", flush=True)
    finally:
        os.chdir(cwd)
        torch.bernoulli = real_bernoulli
        gta.GeneralizedTaskArithmeticMerge.merge_group = real_merge_group
        shutil.rmtree(DATA / "_out", ignore_errors=True)
    import mergekit

    info = {"mergekit": getattr(mergekit, "__version__", "0.1.5"), "torch": torch.__version__, "recipes": manifest}
    (DATA / "manifest.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    total = sum(f.stat().st_size for f in DATA.rglob("*") if f.is_file())
    print(f"wrote {len(manifest)} references, {total / 1e3:.0f} kB in {DATA}")


if __name__ == "__main__":
    if "--inside" in sys.argv:
        run_all()
    else:
        setup_venv()
        subprocess.run([str(PY), str(pathlib.Path(__file__).resolve()), "--inside"], check=True)
