"""Tests for landscape.io: exact round trips, metadata, refusing pickles / corrupt files, atomic writes."""

import os
import pathlib
import pickle
import tempfile
from collections import namedtuple

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from landscape import io

FORMATS = [".safetensors", ".npz"]


def _same(a, b):
    """Bit-identical trees: same structure (incl. container types), shapes, dtypes and bytes."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x = np.asarray(x)
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            return False
    return True


def _example():
    return {
        "layers": [
            {"kernel": jnp.arange(6.0, dtype=jnp.float32).reshape(2, 3), "bias": jnp.zeros(3, jnp.bfloat16)},
            {"kernel": np.full((3, 1), -0.0, np.float16), "bias": None},
        ],
        "count": np.array(7, np.int32),
        "mask": (np.array([True, False]), np.arange(3, dtype=np.uint8)),
        "f64": np.array([np.pi, np.nan, -np.inf]),
    }


# ----------------------------------------------------------------------------- exact round trip


leaf_arrays = st.one_of(
    hnp.arrays(
        st.sampled_from([np.float32, np.float64, np.float16, np.int32, np.int64, np.uint8, np.bool_]),
        hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3),
    ),
    hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=2, max_side=3)).map(
        lambda a: a.astype(ml_dtypes.bfloat16)
    ),
)
keys = st.text(alphabet="abcxyz_0", min_size=1, max_size=3)
trees = st.recursive(
    leaf_arrays | st.none(),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(keys, children, max_size=3),
    ),
    max_leaves=6,
)


@pytest.mark.parametrize("suffix", FORMATS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees)
def test_round_trip_is_exact(suffix, tree):
    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / f"ckpt{suffix}"
        io.save(path, tree)
        loaded, meta = io.load(path)
        assert _same(tree, loaded)
        assert meta == {}
        assert sorted(os.listdir(d)) == [path.name]


@pytest.mark.parametrize("suffix", FORMATS)
def test_round_trip_nested_example_with_bfloat16_and_ints(tmp_path, suffix):
    params = _example()
    path = io.save(tmp_path / f"m{suffix}", params)
    loaded, _ = io.load(path)
    assert _same(params, loaded)
    assert loaded["layers"][0]["bias"].dtype == jnp.bfloat16
    assert isinstance(loaded["mask"], tuple) and isinstance(loaded["layers"], list)
    assert list(loaded) == list(params)  # dict insertion order kept
    # loaded leaves work in jitted code
    total = jax.jit(lambda p: p["layers"][0]["kernel"].sum())(loaded)
    assert float(total) == 15.0


@pytest.mark.parametrize("suffix", FORMATS)
def test_int_keys_and_other_nodes(tmp_path, suffix):
    params = {0: np.ones(2, np.float32), 1: {"w": np.zeros((1, 1), np.float32)}}
    loaded, _ = io.load(io.save(tmp_path / f"a{suffix}", params))
    assert _same(params, loaded) and list(loaded) == [0, 1]
    Pair = namedtuple("Pair", "u v")
    nt = Pair(np.ones(2, np.float32), {"q": np.arange(2, dtype=np.int32)})
    path = io.save(tmp_path / f"b{suffix}", nt)
    plain, _ = io.load(path)
    assert set(plain) == {"u", "v"} and np.array_equal(plain["v"]["q"], [0, 1])
    exact, _ = io.load(path, like=nt)
    assert isinstance(exact, Pair) and _same(nt, exact)


@pytest.mark.parametrize("suffix", FORMATS)
def test_tensor_names_are_key_paths(tmp_path, suffix):
    params = {"layers": [{"kernel": np.ones((2, 2), np.float32)}], "head": {"bias": np.zeros(2, np.float32)}}
    path = io.save(tmp_path / f"n{suffix}", params)
    if suffix == ".safetensors":
        names = set(safetensors.numpy.load_file(path))
    else:
        with np.load(path, allow_pickle=False) as f:
            names = set(f.files) - {"__landscape__"}
    assert names == {"layers/0/kernel", "head/bias"}


# ------------------------------------------------------------------------------------- metadata


meta_values = st.one_of(
    st.text(max_size=20),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.booleans(),
)


@pytest.mark.parametrize("suffix", FORMATS)
@settings(max_examples=25, deadline=None)
@given(meta=st.dictionaries(st.text(min_size=1, max_size=10).filter(lambda k: k != "__landscape__"), meta_values, max_size=5))
def test_metadata_round_trip(suffix, meta):
    with tempfile.TemporaryDirectory() as d:
        path = pathlib.Path(d) / f"m{suffix}"
        io.save(path, {"w": np.ones(1, np.float32)}, metadata=meta)
        _, got = io.load(path)
        assert got == meta
        assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in meta.items()}
        assert io.read_metadata(path) == meta


def test_metadata_accepts_numpy_scalars_and_rejects_others(tmp_path):
    io.save(tmp_path / "a.npz", {"w": np.ones(1)}, metadata={"lr": np.float32(0.5), "step": np.int64(3)})
    assert io.load(tmp_path / "a.npz")[1] == {"lr": 0.5, "step": 3}
    for bad in ({"x": [1]}, {"x": None}, {1: "a"}, {"__landscape__": "a"}):
        with pytest.raises(ValueError, match="metadata"):
            io.save(tmp_path / "b.npz", {"w": np.ones(1)}, metadata=bad)
    assert not (tmp_path / "b.npz").exists()


def test_foreign_safetensors_file_loads_as_nested_dicts(tmp_path):
    path = tmp_path / "foreign.safetensors"
    w = np.arange(4, dtype=np.float32).reshape(2, 2)
    safetensors.numpy.save_file({"enc/w": w, "enc/b": np.ones(2, np.float32), "head": w}, path, metadata={"format": "pt"})
    params, meta = io.load(path)
    assert meta == {"format": "pt"}
    assert set(params) == {"enc", "head"} and np.array_equal(params["enc"]["w"], w)


# ------------------------------------------------------------------------------- refusing files


class _Marker:
    """Unpickling this object would create a file: proof that a loader ran pickle."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.target),))


@pytest.mark.parametrize("suffix", FORMATS)
def test_refuses_pickle_files(tmp_path, suffix):
    marker = tmp_path / "unpickled"
    path = tmp_path / f"evil{suffix}"
    path.write_bytes(pickle.dumps({"w": np.ones(3), "trap": _Marker(marker)}))
    with pytest.raises(ValueError, match="evil"):
        io.load(path)
    with pytest.raises(ValueError, match="evil"):
        io.read_metadata(path)
    assert not marker.exists()


def test_refuses_npz_with_pickled_object_array(tmp_path):
    marker = tmp_path / "unpickled"
    path = tmp_path / "objects.npz"
    np.savez(path, w=np.ones(2), trap=np.array([_Marker(marker)], dtype=object))
    with pytest.raises(ValueError, match=r"objects\.npz.*allow_pickle"):
        io.load(path)
    assert not marker.exists()


def test_refuses_single_npy_and_text(tmp_path):
    p = tmp_path / "single.npz"
    with open(p, "wb") as f:
        np.save(f, np.ones(3))
    with pytest.raises(ValueError, match="single .npy array"):
        io.load(p)
    t = tmp_path / "notes.safetensors"
    t.write_text("not a checkpoint at all")
    with pytest.raises(ValueError, match="notes.safetensors"):
        io.load(t)


@pytest.mark.parametrize("suffix", FORMATS)
def test_refuses_truncated_files(tmp_path, suffix):
    path = io.save(tmp_path / f"full{suffix}", _example(), metadata={"step": 1})
    blob = path.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    for n in sorted({0, 1, 7, 8, 9, 40, len(blob) // 3, len(blob) // 2, len(blob) - 50, len(blob) - 1}):
        cut.write_bytes(blob[:n])
        with pytest.raises(ValueError, match=f"cut{suffix}"):
            io.load(cut)


@pytest.mark.parametrize("suffix", FORMATS)
def test_refuses_a_flipped_data_byte(tmp_path, suffix):
    params = {"w": np.arange(256, dtype=np.float32)}
    path = io.save(tmp_path / f"w{suffix}", params)
    blob = bytearray(path.read_bytes())
    # the tensor bytes are the only place these four bytes (float32 200.0) occur
    at = bytes(blob).find(np.float32(200.0).tobytes())
    blob[at] ^= 0x01
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"w\.(safetensors|npz).*(checksum|CRC)"):
        io.load(path)


def test_refuses_unknown_suffix_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"accepted: \['.safetensors', '.npz'\]"):
        io.save(tmp_path / "m.pt", {"w": np.ones(1)})
    with pytest.raises(ValueError, match="accepted"):
        io.load(tmp_path / "m.ckpt")
    with pytest.raises(FileNotFoundError, match="nothing.npz"):
        io.load(tmp_path / "nothing.npz")


def test_refuses_unstorable_leaves(tmp_path):
    with pytest.raises(ValueError, match="PRNG key"):
        io.save(tmp_path / "k.npz", {"key": jax.random.key(0)})
    with pytest.raises(ValueError, match="dtype <U"):
        io.save(tmp_path / "s.npz", {"s": np.array(["a"])})
    with pytest.raises(ValueError, match="use .npz"):
        io.save(tmp_path / "c.safetensors", {"c": np.ones(1, np.complex128)})
    with pytest.raises(ValueError, match="share the tensor name 'a/b'"):
        io.save(tmp_path / "d.npz", {"a/b": np.ones(1), "a": {"b": np.ones(1)}})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ like


@pytest.mark.parametrize("suffix", FORMATS)
def test_like_restores_structure_and_checks_it(tmp_path, suffix):
    params = {"layers": [{"kernel": np.ones((2, 3), np.float32), "bias": np.zeros(3, np.float32)}]}
    path = io.save(tmp_path / f"m{suffix}", params)
    loaded, _ = io.load(path, like=params)
    assert _same(params, loaded)
    shapes = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, params))
    assert _same(params, io.load(path, like=shapes)[0])

    wrong_shape = {"layers": [{"kernel": np.ones((2, 4), np.float32), "bias": np.zeros(3, np.float32)}]}
    with pytest.raises(ValueError, match=rf"'layers/0/kernel'.*\(2, 4\).*m{suffix}.*\(2, 3\)"):
        io.load(path, like=wrong_shape)
    wrong_dtype = {"layers": [{"kernel": np.ones((2, 3), np.float32), "bias": np.zeros(3, np.float64)}]}
    with pytest.raises(ValueError, match=rf"'layers/0/bias'.*float64.*m{suffix}.*float32"):
        io.load(path, like=wrong_dtype)
    missing = {"layers": [{"kernel": np.ones((2, 3), np.float32)}]}
    with pytest.raises(ValueError, match=rf"m{suffix}.*'layers/0/bias' that like lacks"):
        io.load(path, like=missing)
    extra = {"layers": [{"kernel": np.ones((2, 3), np.float32), "bias": np.zeros(3, np.float32), "scale": np.ones(3, np.float32)}]}
    with pytest.raises(ValueError, match=rf"m{suffix}.*no tensor for key path 'layers/0/scale'"):
        io.load(path, like=extra)


# ------------------------------------------------------------------------------------ atomicity


@pytest.mark.parametrize("suffix", FORMATS)
def test_overwrite_is_atomic_and_leaves_no_temp_files(tmp_path, suffix):
    path = tmp_path / f"m{suffix}"
    io.save(path, {"w": np.zeros(3, np.float32)}, metadata={"v": 1})
    io.save(path, {"w": np.ones(3, np.float32)}, metadata={"v": 2})
    assert os.listdir(tmp_path) == [path.name]
    loaded, meta = io.load(path)
    assert meta == {"v": 2} and np.array_equal(loaded["w"], np.ones(3))


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("fail_at", ["fsync", "replace", "write"])
def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch, suffix, fail_at):
    path = io.save(tmp_path / f"m{suffix}", {"w": np.zeros(3, np.float32)}, metadata={"v": 1})
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    if fail_at == "write":
        target = (safetensors, "serialize") if suffix == ".safetensors" else (np.lib.format, "write_array")
        monkeypatch.setattr(*target, boom)
    else:
        monkeypatch.setattr(io.os, fail_at, boom)
    with pytest.raises(OSError, match="simulated"):
        io.save(path, {"w": np.ones(3, np.float32)}, metadata={"v": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]
    assert io.load(path)[1] == {"v": 1}


def test_refuses_to_overwrite_a_folder_or_symlink(tmp_path):
    folder = tmp_path / "m.npz"
    folder.mkdir()
    with pytest.raises(ValueError, match="folder"):
        io.save(folder, {"w": np.ones(1)})
    assert folder.is_dir()
    with pytest.raises(ValueError, match="not a regular file"):
        io.load(folder)
    real = io.save(tmp_path / "real.npz", {"w": np.ones(1)})
    link = tmp_path / "link.npz"
    link.symlink_to(real)
    with pytest.raises(ValueError, match="symlink"):
        io.save(link, {"w": np.zeros(1)})
    assert link.is_symlink() and np.array_equal(io.load(link)[0]["w"], np.ones(1))


def test_creates_missing_parent_folders(tmp_path):
    path = io.save(tmp_path / "a" / "b" / "m.safetensors", {"w": np.ones(1, np.float32)})
    assert path.exists()
    with pytest.raises(ValueError, match="not a folder"):
        io.save(path / "x.npz", {"w": np.ones(1)})


def test_refuses_a_foreign_or_newer_structure_record(tmp_path):
    import json

    w = {"w": np.ones(2, np.float32)}
    cases = {
        "badjson": "{not json",
        "foreign": json.dumps({"format": "other", "structure": {}}),
        "newer": json.dumps({"format": "landscape.io", "version": 99, "structure": {"leaf": "w"}}),
        "dangling": json.dumps({"format": "landscape.io", "version": 1, "structure": {"leaf": "v"}}),
    }
    for name, record in cases.items():
        path = tmp_path / f"{name}.safetensors"
        safetensors.numpy.save_file(w, path, metadata={"__landscape__": record})
        with pytest.raises(ValueError, match=rf"{name}\.safetensors.*(record|version)"):
            io.load(path)


# ------------------------------------------------------------------ issue 12: file safety, plain metadata


def test_leaf_named_metadata_is_refused_before_writing(tmp_path):
    path = io.save(tmp_path / "m.safetensors", {"w": np.ones(2, np.float32)})
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"leaf named '__metadata__' to \.safetensors"):
        io.save(path, {"__metadata__": np.zeros(2, np.float32)})
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]
    # .npz has no such reserved name: the leaf round-trips there
    tree = {"__metadata__": np.arange(3, dtype=np.int32)}
    assert _same(tree, io.load(io.save(tmp_path / "m.npz", tree))[0])


def test_string_metadata_is_written_plain_for_other_tools(tmp_path):
    meta = {"format": "pt", "digits": "12", "quoted": '"x"', "step": 12, "lr": 0.5, "ok": True}
    path = io.save(tmp_path / "m.safetensors", {"w": np.ones(1, np.float32)}, metadata=meta)
    with safetensors.safe_open(path, framework="numpy") as f:
        raw = f.metadata()
    assert raw["format"] == "pt" and raw["digits"] == "12" and raw["quoted"] == '"x"'
    assert raw["step"] == "12" and raw["lr"] == "0.5" and raw["ok"] == "true"
    assert io.load(path)[1] == meta and io.read_metadata(path) == meta
    assert type(io.load(path)[1]["digits"]) is str


def test_files_with_json_quoted_strings_still_load(tmp_path):
    """Files written before plain strings (no string-key list in the record) read as before."""
    import json

    record = {"format": "landscape.io", "version": 1, "structure": {"dict": [["w", {"leaf": "w"}]]}, "crc32": {}}
    path = tmp_path / "old.safetensors"
    safetensors.numpy.save_file(
        {"w": np.ones(1, np.float32)}, path, metadata={"name": json.dumps("run"), "step": "3", "__landscape__": json.dumps(record)}
    )
    assert io.load(path)[1] == {"name": "run", "step": 3} == io.read_metadata(path)


@pytest.mark.parametrize("suffix", FORMATS)
def test_stale_temporary_of_a_killed_save_is_removed_by_the_next_save(tmp_path, suffix):
    import subprocess
    import sys

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    name = f"m{suffix}"
    stale = tmp_path / f".{name}.landscape-tmp-{dead}-0123abcd.tmp"
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / f".{name}.landscape-tmp-{os.getpid()}-0123abcd.tmp"  # a save in progress: kept
    live.write_bytes(b"in progress")
    other = tmp_path / f".other{suffix}.landscape-tmp-{dead}-0123abcd.tmp"  # another target: kept
    other.write_bytes(b"x")
    io.save(tmp_path / name, {"w": np.ones(1, np.float32)})
    assert sorted(os.listdir(tmp_path)) == sorted([name, live.name, other.name])


def test_sigkill_mid_save_leaves_the_old_file_and_the_orphan_is_cleaned(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    path = io.save(tmp_path / "m.safetensors", {"w": np.zeros(2, np.float32)})
    before = path.read_bytes()
    script = f"""
import time, numpy as np, safetensors
from landscape import io
def slow(*args, **kwargs):
    print("writing", flush=True)
    time.sleep(60)
safetensors.serialize = slow
io.save({str(path)!r}, {{"w": np.ones(2, np.float32)}})
"""
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "writing"
        orphans = [n for n in os.listdir(tmp_path) if n != path.name]
        assert len(orphans) == 1 and orphans[0].startswith(".m.safetensors.landscape-tmp-")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert path.read_bytes() == before
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(os.listdir(tmp_path)) > 1:
        io.save(path, {"w": np.ones(2, np.float32)})
    assert os.listdir(tmp_path) == [path.name]
    assert np.array_equal(io.load(path)[0]["w"], np.ones(2))


def test_refuses_metadata_that_contradicts_the_record(tmp_path):
    import re

    path = io.save(tmp_path / "m.safetensors", {"w": np.ones(1, np.float32)}, metadata={"step": 3})
    tensors = safetensors.numpy.load_file(path)
    with safetensors.safe_open(path, framework="numpy") as f:
        raw = dict(f.metadata())
    for bad in ("[1, 2]", "three"):
        safetensors.numpy.save_file(tensors, path, metadata={**raw, "step": bad})
        with pytest.raises(ValueError, match=rf"m\.safetensors.*metadata 'step' = {re.escape(repr(bad))} is not the JSON number"):
            io.load(path)
