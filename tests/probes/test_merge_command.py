"""``landscape merge``: equality with committed mergekit 0.1.5 outputs, errors, atomicity, streaming.

The references in ``tests/data/mergekit`` come from ``benchmarks/mergekit_reference.py`` (mergekit
0.1.5 on torch 2.13.0 CPU); DARE / DELLA are compared through the Bernoulli masks mergekit drew,
recorded there and replayed here.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import weakref

import ml_dtypes
import numpy as np
import pytest

from landscape.checkpoints import CheckpointWriter, open_checkpoint
from probes import cli
from probes.merge_command import layer_of, parse_size, run_merge

DATA = pathlib.Path(__file__).resolve().parent.parent / "data" / "mergekit"
MANIFEST = json.loads((DATA / "manifest.json").read_text())["recipes"]


def _masks_for(name: str):
    path = DATA / "expected" / f"{name}.masks.safetensors"
    if not path.exists():
        return None
    with open_checkpoint(path) as r:
        masks = {k: np.asarray(r.get(k)).astype(bool) for k in r.keys()}

    def get(tensor: str):
        n = sum(1 for k in masks if k.rsplit("::", 1)[0] == tensor)
        return np.stack([masks[f"{tensor}::{i}"] for i in range(n)]) if n else None

    return get


def _bf16_spacing(x: np.ndarray) -> np.ndarray:
    return np.spacing(np.abs(x).astype(np.float32)).astype(np.float64) * 2.0**16


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_matches_mergekit_reference(name: str, tmp_path: pathlib.Path) -> None:
    recipe = DATA / "recipes" / f"{name}.yml"
    out = tmp_path / "out"
    run_merge(recipe, out, masks=_masks_for(name), progress=False)
    text = recipe.read_text()
    compute_bf16 = name.startswith("bf16") and "dtype: float32" not in text
    with open_checkpoint(out) as ours, open_checkpoint(DATA / "expected" / f"{name}.safetensors") as ref:
        assert sorted(ours.keys()) == sorted(ref.keys())
        for k in ref.keys():
            a, b = np.asarray(ours.get(k)), np.asarray(ref.get(k))
            assert a.dtype == b.dtype, k
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            if b.dtype == ml_dtypes.bfloat16 and compute_bf16:
                # mergekit does this method's arithmetic in bf16; we compute in float32 and round once
                assert np.max(np.abs(a64 - b64)) <= 2 * 2.0**-8 * np.max(np.abs(b64)), k
            elif b.dtype == ml_dtypes.bfloat16:
                assert np.all(np.abs(a64 - b64) <= _bf16_spacing(b)), k  # within one ulp
            elif name.startswith("bf16"):
                # float32 output of bf16 inputs: mergekit's slerp rounds to the input dtype first
                assert np.all(np.abs(a64 - b64) <= _bf16_spacing(b)), k
            else:
                assert np.max(np.abs(a64 - b64)) <= 1e-6 * np.max(np.abs(b64)), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("num_hidden_layers", cfg.get("n_layer")) == MANIFEST[name]["config_layers"]
    assert (out / "landscape_recipe.yml").read_text() == text


def test_bf16_task_arithmetic_is_the_rounded_exact_value(tmp_path: pathlib.Path) -> None:
    """Where we differ from mergekit on bf16 (its bf16 arithmetic), we equal the float64 answer."""
    run_merge(DATA / "recipes" / "bf16_task_arithmetic.yml", tmp_path / "out", progress=False)
    models = {m: open_checkpoint(DATA / "models" / f"llama_bf16_{m}") for m in ("base", "a", "b")}
    with open_checkpoint(tmp_path / "out") as ours:
        for k in ours.keys():
            x = {m: np.asarray(r.get(k)).astype(np.float64) for m, r in models.items()}
            exact = x["base"] + 0.7 * (x["a"] - x["base"]) + 0.3 * (x["b"] - x["base"])
            got = np.asarray(ours.get(k)).astype(np.float64)
            assert np.all(np.abs(got - exact) <= _bf16_spacing(exact.astype(ml_dtypes.bfloat16)) * 0.5 + 1e-7 * np.abs(exact)), k
    for r in models.values():
        r.close()


def _write_model(folder: pathlib.Path, tensors: dict[str, np.ndarray], layers: int = 2) -> None:
    with CheckpointWriter(folder) as w:
        for k, v in tensors.items():
            w.add(k, v)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers}))


def _tiny(seed: int, *, drop: str | None = None, reshape: str | None = None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(2):
        for part in ("self_attn.q_proj.weight", "mlp.up_proj.weight"):
            out[f"model.layers.{i}.{part}"] = rng.normal(size=(4, 3)).astype(np.float32)
    out["model.norm.weight"] = rng.normal(size=(3,)).astype(np.float32)
    if drop:
        del out[drop]
    if reshape:
        out[reshape] = out[reshape].reshape(3, 4)
    return out


@pytest.fixture
def models(tmp_path: pathlib.Path) -> pathlib.Path:
    for i, name in enumerate(("base", "a", "b")):
        _write_model(tmp_path / name, _tiny(i))
    return tmp_path


def _recipe(root: pathlib.Path, body: str, name: str = "r.yml") -> pathlib.Path:
    p = root / name
    p.write_text(body)
    return p


_DARE = "merge_method: dare_ties\nbase_model: base\nmodels:\n  - model: a\n    parameters: {weight: 1.0, density: 0.5}\n  - model: b\n    parameters: {weight: 0.5, density: 0.5}\n"


def test_dare_is_reproducible_with_a_seed(models: pathlib.Path) -> None:
    r = _recipe(models, _DARE)

    def merged(out: str, seed: int | None) -> dict[str, np.ndarray]:
        run_merge(r, models / out, seed=seed, progress=False)
        with open_checkpoint(models / out) as c:
            return {k: np.array(c.get(k)) for k in c.keys()}

    a, b, c = merged("o1", 3), merged("o2", 3), merged("o3", 4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    # the recipe's own seed is used when --seed is absent
    _recipe(models, _DARE + "seed: 3\n", "seeded.yml")
    run_merge(models / "seeded.yml", models / "o4", progress=False)
    with open_checkpoint(models / "o4") as d:
        assert all(np.array_equal(a[k], np.asarray(d.get(k))) for k in a)


def test_cli_config_error_exits_2_with_one_line_and_writes_nothing(models: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = _recipe(models, "merge_method: ties\nbase_model: base\nmodels:\n  - model: a\n    parameters: {weight: 1, densty: 0.5}\n")
    assert cli.main(["merge", str(r), "--out", str(models / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and ":5: models[0].parameters.densty: unknown parameter 'densty'" in err
    assert not (models / "out").exists()


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"drop": "model.layers.1.mlp.up_proj.weight"}, r"tensor 'model.layers.1.mlp.up_proj.weight' .* is missing from model"),
        ({"reshape": "model.layers.0.self_attn.q_proj.weight"}, r"tensor 'model.layers.0.self_attn.q_proj.weight' has different shapes"),
    ],
)
def test_tensor_errors_before_anything_is_written(models: pathlib.Path, bad: dict, match: str, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(models / "b")
    _write_model(models / "b", _tiny(2, **bad))
    r = _recipe(models, "merge_method: ties\nbase_model: base\nmodels:\n  - model: a\n  - model: b\nparameters: {weight: 1.0}\n")
    assert cli.main(["merge", str(r), "--out", str(models / "out")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match=match):
        run_merge(r, models / "out", progress=False)
    assert not (models / "out").exists()
    assert [p.name for p in models.iterdir() if p.name.startswith(".")] == []


def test_missing_model_path_names_the_recipe_entry(models: pathlib.Path) -> None:
    r = _recipe(models, "merge_method: linear\nmodels:\n  - model: a\n  - model: nowhere\nparameters: {weight: 1.0}\n")
    with pytest.raises(ValueError, match=r"r.yml:4: models\[1\]: no checkpoint at 'nowhere'"):
        run_merge(r, models / "out", progress=False)


class _Counting:
    """A reader stub over a real reader: counts arrays handed out that are still alive."""

    live: list[weakref.ref] = []
    peak = 0

    def __init__(self, path: pathlib.Path) -> None:
        self.inner = open_checkpoint(path)

    def __enter__(self) -> _Counting:
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.close()

    def __contains__(self, name: object) -> bool:
        return name in self.inner

    def keys(self) -> list[str]:
        return self.inner.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(name)

    def dtype(self, name: str) -> str:
        return self.inner.dtype(name)

    def get(self, name: str) -> np.ndarray:
        arr = np.array(self.inner.get(name))
        type(self).live = [r for r in type(self).live if r() is not None] + [weakref.ref(arr)]
        type(self).peak = max(type(self).peak, len(type(self).live))
        return arr


def test_streaming_holds_one_tensor_per_model(models: pathlib.Path) -> None:
    r = _recipe(models, "merge_method: ties\nbase_model: base\nmodels:\n  - model: a\n  - model: b\nparameters: {weight: 1.0, density: 0.5}\n")
    _Counting.live = []
    _Counting.peak = 0
    res = run_merge(r, models / "out", open_fn=_Counting, progress=False)
    assert res.num_tensors == 5
    assert _Counting.peak == 3  # at any read, only the current tensor of each of the 3 models is alive


def test_failure_midway_leaves_no_output_and_rerun_works(models: pathlib.Path) -> None:
    r = _recipe(models, "merge_method: linear\nmodels:\n  - model: a\n  - model: b\nparameters: {weight: 1.0}\n")

    class Failing(_Counting):
        calls = 0

        def get(self, name: str) -> np.ndarray:
            type(self).calls += 1
            if type(self).calls == 5:
                raise RuntimeError("disk went away")
            return super().get(name)

    with pytest.raises(RuntimeError, match="disk went away"):
        run_merge(r, models / "out", open_fn=Failing, progress=False, max_shard_bytes=40)
    assert not (models / "out").exists()
    assert [p.name for p in models.iterdir() if p.name.startswith(".")] == []
    run_merge(r, models / "out", progress=False, max_shard_bytes=40)
    assert (models / "out" / "model.safetensors.index.json").exists()
    with open_checkpoint(models / "out") as c, open_checkpoint(models / "a") as a, open_checkpoint(models / "b") as b:
        for k in c.keys():
            np.testing.assert_allclose(c.get(k), (a.get(k) + b.get(k)) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="already exists; pass --overwrite"):
        run_merge(r, models / "out", progress=False)


def test_toml_recipe_gives_the_yaml_result(models: pathlib.Path) -> None:
    y = _recipe(models, "merge_method: slerp\nbase_model: base\nmodels: [base, a]\nparameters:\n  t: [{filter: mlp, value: [0.0, 1.0]}, {value: 0.5}]\n")
    t = _recipe(models, 'merge_method = "slerp"\nbase_model = "base"\nmodels = ["base", "a"]\n[parameters]\nt = [{filter = "mlp", value = [0.0, 1.0]}, {value = 0.5}]\n', "r.toml")
    run_merge(y, models / "y", progress=False)
    run_merge(t, models / "t", progress=False)
    with open_checkpoint(models / "y") as a, open_checkpoint(models / "t") as b, open_checkpoint(models / "base") as base:
        for k in a.keys():
            np.testing.assert_array_equal(a.get(k), b.get(k))
        # layer 0's mlp tensor is at t = 0: the base model exactly
        np.testing.assert_array_equal(a.get("model.layers.0.mlp.up_proj.weight"), base.get("model.layers.0.mlp.up_proj.weight"))
    assert (models / "t" / "landscape_recipe.toml").exists()


def test_help_lists_methods_and_parameters(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="0"):
        cli.main(["merge", "--help"])
    text = capsys.readouterr().out
    from landscape.merge.tensorwise import METHODS

    for name, spec in METHODS.items():
        assert f"  {name}  (" in text
        for p in spec.parameters:
            assert f"      {p.name} (" in text


def test_small_helpers() -> None:
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(123) == 123
    with pytest.raises(ValueError, match="--max-shard-size must look like"):
        parse_size("lots")
    assert layer_of("transformer.h.11.attn.c_attn.weight") == ("transformer.h.", 11, ".attn.c_attn.weight")
    assert layer_of("lm_head.weight") is None


def test_gpu_device_without_a_gpu_is_a_config_error(models: pathlib.Path) -> None:
    import jax

    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("a GPU is present")
    r = _recipe(models, "merge_method: linear\nmodels: [a, b]\nparameters: {weight: 1.0}\n")
    with pytest.raises(ValueError, match="--device gpu: JAX sees no GPU"):
        run_merge(r, models / "out", device="gpu", progress=False)
    assert not (models / "out").exists()



_RSS_SCRIPT = """
import resource, sys
from probes.merge_command import run_merge
run_merge(sys.argv[1], sys.argv[2], progress=False, max_shard_bytes=8 * 2**20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_peak_memory_does_not_grow_with_the_model(tmp_path: pathlib.Path) -> None:
    """Peak resident memory (subprocess) of a streamed task-arithmetic merge of 3 models: 4 tensors vs 16
    tensors of 4 MiB (48 vs 192 MiB of inputs). Streaming keeps the difference near zero; loading
    the models would add the 144 MiB. glibc is told to return freed large blocks to the OS
    (``MALLOC_MMAP_THRESHOLD_``), so RSS measures what is live rather than allocator caching."""
    import os
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    shape = (1024, 1024)

    def peak(n: int) -> int:
        for m in ("a", "b", "c"):
            with CheckpointWriter(tmp_path / f"{m}{n}", max_shard_bytes=16 * 2**20) as w:
                for i in range(n):
                    w.add(f"model.layers.{i}.mlp.up_proj.weight", rng.standard_normal(shape, dtype=np.float32))
        r = _recipe(tmp_path, f"merge_method: task_arithmetic\nbase_model: a{n}\nmodels: [b{n}, c{n}]\nparameters: {{weight: 0.5}}\n", f"r{n}.yml")
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
        out = subprocess.run(
            [sys.executable, "-c", _RSS_SCRIPT, str(r), str(tmp_path / f"out{n}")],
            capture_output=True, text=True, check=True, cwd=tmp_path, env=env,
        )
        for m in ("a", "b", "c"):
            shutil.rmtree(tmp_path / f"{m}{n}")
        return int(out.stdout.strip().splitlines()[-1])

    small, big = peak(4), peak(16)
    grown = 3 * 12 * 4 * 2**20
    assert big - small < grown / 6, f"peak grew by {(big - small) / 2**20:.0f} MiB for {grown / 2**20:.0f} MiB more input"
    with open_checkpoint(tmp_path / "out16") as c:
        assert len(c.keys()) == 16
