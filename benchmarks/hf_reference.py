"""Generate the committed Hugging Face reference models in ``tests/data/hf/`` (run by hand, not in CI).

::

    python benchmarks/hf_reference.py

1. creates ``benchmarks/.venv-hf`` (once) and installs ``torch==2.13.0`` first (the local CPU wheel;
   never an unpinned torch), then ``transformers==5.*``;
2. re-runs itself inside that environment and, for each of a tiny random GPT-2 (``n_embd`` 16, 2
   layers, 2 heads, vocab 64, ``n_positions`` 16) and a tiny random Llama (hidden 16, MLP 24, 2
   layers, 2 heads, vocab 64, untied head), seeded with ``torch.manual_seed``, redraws every weight
   at a scale where all terms matter (``N(0, 0.3²)``; norm weights ``1 + N(0, 0.1²)``), saves the
   model with ``save_pretrained`` (safetensors) into ``tests/data/hf/<name>/`` and, beside it,
   ``ids.npy`` (a fixed ``(3, 10)`` batch), ``mask.npy`` (right- and left-padded attention mask)
   and ``logits.npy`` / ``logits_masked.npy``: the float32 logits ``transformers`` computes (eager
   attention) without and with the mask;
3. back in the project's venv, loads each folder with :func:`landscape.models.hf.gpt_from_hf` and prints
   the largest logit difference to ``transformers``, writes our export with
   :func:`~landscape.models.hf.gpt_to_hf`, and has the HF venv load that export with
   ``from_pretrained`` and compare its logits to the reference (``--check-export DIR NAME``).

The folder stays well under 200 KB.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
VENV = ROOT / "benchmarks" / ".venv-hf"
DATA = ROOT / "tests" / "data" / "hf"
PY = VENV / "bin" / "python"

GPT2 = {
    "architectures": ["GPT2LMHeadModel"],
    "vocab_size": 64,
    "n_positions": 16,
    "n_embd": 16,
    "n_layer": 2,
    "n_head": 2,
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-5,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 0,
}
LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 64,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 16,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}


def setup_venv() -> None:
    """Create the venv with the pinned torch, then transformers 5 (skipped when present)."""
    if PY.exists():
        ok = subprocess.run(
            [str(PY), "-c", "import transformers, torch; assert torch.__version__.startswith('2.13.0')"], check=False
        )
        if ok.returncode == 0:
            return
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(VENV)], check=True)
    pip = [str(PY), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "transformers==5.*"], check=True)


# ----------------------------------------------------------------------------------------------
# Below, functions named hf_* run inside the HF venv.


def _inputs():
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, size=(3, 10)).astype(np.int64)
    mask = np.ones((3, 10), np.int64)
    mask[0, 7:] = 0  # right padding
    mask[1, :3] = 0  # left padding
    return ids, mask


def _build(name: str):
    import torch
    import transformers

    torch.manual_seed(0)
    if name == "gpt2-tiny":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "ln" in pname or "norm" in pname:
                if pname.endswith("weight"):
                    p.copy_(1 + 0.1 * torch.randn_like(p))
                else:
                    p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model.eval()


def _logits(model, ids, mask=None):
    import torch

    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.from_numpy(mask)}
        return model(input_ids=torch.from_numpy(ids), **kwargs).logits.float().numpy()


def hf_generate() -> None:
    import numpy as np
    import torch

    torch.set_default_dtype(torch.float32)
    ids, mask = _inputs()
    for name in ("gpt2-tiny", "llama-tiny"):
        model = _build(name)
        model.config._attn_implementation = "eager"
        out = DATA / name
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        for extra in ("generation_config.json",):
            (out / extra).unlink(missing_ok=True)
        np.save(out / "ids.npy", ids)
        np.save(out / "mask.npy", mask)
        np.save(out / "logits.npy", _logits(model, ids))
        np.save(out / "logits_masked.npy", _logits(model, ids, mask))
        size = sum(p.stat().st_size for p in out.iterdir())
        print(f"{name}: {sorted(p.name for p in out.iterdir())}, {size} bytes")


def hf_check_export(folder: str, name: str) -> None:
    """Load our export with from_pretrained and compare its logits to the reference."""
    import numpy as np
    import transformers

    cls = transformers.GPT2LMHeadModel if name.startswith("gpt2") else transformers.LlamaForCausalLM
    model = cls.from_pretrained(folder, attn_implementation="eager").eval()
    ids = np.load(DATA / name / "ids.npy")
    got = _logits(model, ids)
    want = np.load(DATA / name / "logits.npy")
    print(f"{name}: transformers loads our export; max |logits - reference| = {np.abs(got - want).max():.3g}")


# ----------------------------------------------------------------------------------------------
def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--inside":
        hf_generate()
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--check-export":
        hf_check_export(sys.argv[2], sys.argv[3])
        return
    setup_venv()
    subprocess.run([str(PY), __file__, "--inside"], check=True)
    # our side: load, compare, export, and let transformers load the export
    import numpy as np

    from landscape.models import hf

    for name in ("gpt2-tiny", "llama-tiny"):
        apply_fn, params = hf.gpt_from_hf(DATA / name)
        ids = np.load(DATA / name / "ids.npy")
        diff = np.abs(np.asarray(apply_fn(params, ids)) - np.load(DATA / name / "logits.npy")).max()
        print(f"{name}: max |ours - transformers| = {diff:.3g}")
        with tempfile.TemporaryDirectory() as tmp:
            config = json.loads((DATA / name / "config.json").read_text())
            out = hf.gpt_to_hf(params, config, pathlib.Path(tmp) / name)
            subprocess.run([str(PY), __file__, "--check-export", str(out), name], check=True)


if __name__ == "__main__":
    main()
