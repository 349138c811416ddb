"""Generate the committed FusionBench 0.2.33 reference outputs in ``tests/data/fusionbench/``.

Run by hand (not in CI)::

    python benchmarks/fusionbench_reference.py

1. creates ``benchmarks/.venv-fusionbench`` (once): ``torch==2.13.0`` first (the local CPU wheel;
   never an unpinned torch), then ``fusion-bench==0.2.33`` with ``--no-deps`` (its dependencies
   would pull a CUDA torch) and only what the imported algorithm modules need (packaging,
   omegaconf, bidict, hydra-core, lightning-utilities, rich, lightning, transformers, accelerate,
   datasets, peft, with the installed torch kept);
2. re-runs itself inside that venv and builds small fixed PyTorch-layout state dicts (seeded numpy):
   a base and 3 fine-tuned models (task vectors of scale 0.05) with a tall ``(8, 5)`` and a wide
   ``(4, 9)`` ``Linear.weight``, a bias ``(8,)`` and a conv weight ``(4, 3, 3, 3)`` (which FusionBench
   averages, its matrix test being ``len(shape) == 2``), written as ``inputs.safetensors`` with keys
   ``<model>/<param>``;
3. calls FusionBench's own algorithm functions on the task vectors, on the CPU:
   ``task_singular_vector.utils.TSVM_utils.compute_and_sum_svd_mem_reduction`` (TSV-Merge, 3 and 2
   tasks), ``isotropic_merging.iso_utils.iso_c`` and ``iso_cts`` (``common_space_fraction`` 0.8 and
   0.5), ``wudi.wudi.wudi_merging`` (``iter_num`` 300, its lr 1e-5), and saves each merged model
   ``base + merged_tv`` (scaling 1, as the configs) as ``expected/<case>.safetensors``.

FusionBench has no CART (tests use closed forms for it). ``tests/landscape/test_merge_subspace.py``
compares ``landscape.merge`` (``out_axis=0``, ``conv="average"``) with these files.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
VENV = ROOT / "benchmarks" / ".venv-fusionbench"
DATA = ROOT / "tests" / "data" / "fusionbench"
PY = VENV / "bin" / "python"
EXTRA = [
    "packaging", "omegaconf", "bidict", "hydra-core", "lightning-utilities", "rich", "lightning",
    "transformers", "accelerate", "datasets", "peft",
]
IMPORT_CHECK = (
    "import torch, fusion_bench.method.isotropic_merging.iso_utils, fusion_bench.method.wudi.wudi, "
    "fusion_bench.method.task_singular_vector.utils.TSVM_utils; assert torch.__version__.startswith('2.13.0')"
)

SHAPES = {
    "tall.weight": (8, 5),
    "wide.weight": (4, 9),
    "tall.bias": (8,),
    "conv.weight": (4, 3, 3, 3),
}
MODELS = ("a", "b", "c")


def setup_venv() -> None:
    """Create the venv: pinned torch, fusion-bench --no-deps, then the modules' imports."""
    if PY.exists() and subprocess.run([str(PY), "-c", IMPORT_CHECK], check=False).returncode == 0:
        return
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(VENV)], check=True)
    pip = [str(PY), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, "--no-deps", "fusion-bench==0.2.33"], check=True)
    subprocess.run([*pip, *EXTRA, "torch==2.13.0"], check=True)
    subprocess.run([str(PY), "-c", IMPORT_CHECK], check=True)


def inputs() -> dict[str, object]:
    import numpy as np
    import torch

    rng = np.random.default_rng(20250515)
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    out = {f"base/{k}": torch.from_numpy(v) for k, v in base.items()}
    for m in MODELS:
        for k, s in SHAPES.items():
            out[f"{m}/{k}"] = torch.from_numpy(base[k] + 0.05 * rng.normal(size=s).astype(np.float32))
    return out


def generate() -> None:
    import fusion_bench
    import torch
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
    from fusion_bench.method.wudi.wudi import wudi_merging
    from safetensors.torch import save_file

    torch.manual_seed(0)
    DATA.mkdir(parents=True, exist_ok=True)
    (DATA / "expected").mkdir(exist_ok=True)
    data = inputs()
    save_file(data, str(DATA / "inputs.safetensors"))
    base = {k: data[f"base/{k}"] for k in SHAPES}
    tvs = [{k: data[f"{m}/{k}"] - base[k] for k in SHAPES} for m in MODELS]

    cases = {
        "tsv": lambda: compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu"),
        "tsv_2tasks": lambda: compute_and_sum_svd_mem_reduction(tvs[:2], accelerator="cpu"),
        "iso_c": lambda: iso_c(tvs, accelerator="cpu"),
        "iso_cts": lambda: iso_cts(tvs, common_space_fraction=0.8, accelerator="cpu"),
        "iso_cts_f05": lambda: iso_cts(tvs, common_space_fraction=0.5, accelerator="cpu"),
        "wudi": lambda: wudi_merging(tvs, accelerator="cpu", iter_num=300),
    }
    manifest = {"fusion_bench": fusion_bench.__version__ if hasattr(fusion_bench, "__version__") else "0.2.33",
                "torch": torch.__version__, "models": list(MODELS), "shapes": SHAPES, "cases": {}}
    for name, run in cases.items():
        merged_tv = run()
        merged = {k: (base[k] + merged_tv[k].detach()).contiguous() for k in SHAPES}
        save_file(merged, str(DATA / "expected" / f"{name}.safetensors"))
        manifest["cases"][name] = {k: list(v.shape) for k, v in merged.items()}
        print(f"{name}: ok")
    (DATA / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    total = sum(p.stat().st_size for p in DATA.rglob("*") if p.is_file())
    print(f"wrote {DATA} ({total / 1024:.1f} KB)")


def main() -> None:
    if os.environ.get("LANDSCAPE_FUSIONBENCH_CHILD") == "1":
        generate()
        return
    setup_venv()
    env = {**os.environ, "LANDSCAPE_FUSIONBENCH_CHILD": "1", "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run([str(PY), str(pathlib.Path(__file__).resolve())], check=True, env=env)


if __name__ == "__main__":
    main()
