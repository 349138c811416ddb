"""Tests for landscape.checkpoints: HF-style safetensors read lazily / written sharded, layout mapping."""

import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from landscape import models
from landscape.checkpoints import (
    DTYPES,
    INDEX_NAME,
    SINGLE_NAME,
    ZOO_MAPPING,
    ZOO_RULES,
    CheckpointWriter,
    Layout,
    LayoutMapping,
    Rule,
    dtype_code,
    from_torch_state_dict,
    open_checkpoint,
    remove_stale_temps,
    to_torch_state_dict,
)

REPO = pathlib.Path(__file__).resolve().parents[2]


def _tensors(seed=0):
    """One tensor per dtype of interest, with the awkward values (NaN payloads, -0.0, inf, subnormals)."""
    rng = np.random.default_rng(seed)
    bf16_bits = np.array([0x7FC1, 0xFF81, 0x8000, 0x0001, 0x7F80, 0x3F80], np.uint16)  # NaNs, -0, subnormal, inf, 1
    return {
        "embed.weight": rng.standard_normal((7, 5)).astype(ml_dtypes.bfloat16),
        "odd.bf16": bf16_bits.view(ml_dtypes.bfloat16),
        "layers.0.weight": rng.standard_normal((4, 3)).astype(np.float16),
        "layers.0.f16_specials": np.array([np.nan, -0.0, np.inf, 6e-8], np.float16),
        "layers.0.bias": rng.standard_normal(4).astype(np.float32),
        "f32_nan": np.array([0x7FC00001, 0xFF800000], np.uint32).view(np.float32),
        "position_ids": np.arange(-3, 9, dtype=np.int64).reshape(1, 12),
        "scalar": np.array(2.5, np.float64),
        "empty": np.zeros((0, 3), np.float32),
        "mask": np.array([True, False, True]),
    }


def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _write(out, tensors, **kwargs):
    with CheckpointWriter(out, **kwargs) as w:
        for k, v in tensors.items():
            w.add(k, v)
    return out


def _listing(folder):
    return sorted(p.name for p in pathlib.Path(folder).iterdir())


# ------------------------------------------------------------------------------ round trips


def test_single_file_round_trip_is_bit_exact_and_readable_by_safetensors(tmp_path):
    tensors = _tensors()
    out = _write(tmp_path / "m", tensors)
    assert _listing(out) == [SINGLE_NAME]
    assert _listing(tmp_path) == ["m"]  # no temporary left beside it
    with open_checkpoint(out) as ckpt:
        assert sorted(ckpt.keys()) == sorted(tensors) and len(ckpt) == len(tensors)
        for name, want in tensors.items():
            got = ckpt.get(name)
            assert _same(got, want), name
            assert ckpt.shape(name) == want.shape
            assert ckpt.dtype(name) == dtype_code(want.dtype)
        assert ckpt.dtype("embed.weight") == "BF16" and ckpt.dtype("position_ids") == "I64"
        assert ckpt.dtype("layers.0.weight") == "F16" and ckpt.dtype("layers.0.bias") == "F32"
        assert ckpt.metadata() == {"format": "pt"}
    # safetensors' own reader sees the same tensors and plain "pt" metadata
    with safetensors.safe_open(out / SINGLE_NAME, framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        for name, want in tensors.items():
            assert _same(f.get_tensor(name), want), name
    # keys() is file order: ascending data offsets
    raw = (out / SINGLE_NAME).read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header["__metadata__"] == {"format": "pt"}  # a plain string, not '"pt"'
    by_offset = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    with open_checkpoint(out / SINGLE_NAME) as ckpt:
        assert ckpt.keys() == [k for _, k in by_offset]


def test_sharded_round_trip_and_index_in_transformers_format(tmp_path):
    tensors = _tensors(1)
    out = _write(tmp_path / "m", tensors, max_shard_bytes=64, metadata={"merged_by": "landscape"})
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index) == {"metadata", "weight_map"}
    assert index["metadata"] == {"total_size": sum(a.nbytes for a in tensors.values())}
    weight_map = index["weight_map"]
    assert list(weight_map) == sorted(tensors)
    shards = sorted(set(weight_map.values()))
    n = len(shards)
    assert n > 3
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert _listing(out) == sorted([*shards, INDEX_NAME])
    # the text is what transformers writes: json.dumps(index, indent=2, sort_keys=True) + "\n"
    assert (out / INDEX_NAME).read_text() == json.dumps(index, indent=2, sort_keys=True) + "\n"
    for shard in shards:
        with safetensors.safe_open(out / shard, framework="numpy") as f:
            assert f.metadata() == {"format": "pt", "merged_by": "landscape"}
            assert sorted(f.keys()) == sorted(k for k, v in weight_map.items() if v == shard)
    with open_checkpoint(out) as ckpt:
        assert ckpt.keys() == list(weight_map)  # index order
        assert ckpt.path == out
        for name, want in tensors.items():
            assert _same(ckpt.get(name), want), name
            assert ckpt.file(name).name == weight_map[name]
        assert ckpt.metadata() == {"format": "pt", "merged_by": "landscape"}
    with open_checkpoint(out / INDEX_NAME) as ckpt:
        assert sorted(ckpt.keys()) == sorted(tensors)


@settings(max_examples=20, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=8),
    max_shard=st.integers(1, 120),
)
def test_sharding_is_greedy_and_bounded(tmp_path_factory, sizes, max_shard):
    """Shards keep insertion order; a shard exceeds the limit only when it is one tensor."""
    out = tmp_path_factory.mktemp("s") / "m"
    tensors = {f"t{i}": np.arange(s, dtype=np.float32) for i, s in enumerate(sizes)}
    _write(out, tensors, max_shard_bytes=max_shard)
    with open_checkpoint(out) as ckpt:
        groups: dict[str, list[str]] = {}
        for name in tensors:
            groups.setdefault(ckpt.file(name).name, []).append(name)
            assert _same(ckpt.get(name), tensors[name])
    order = [groups[k] for k in sorted(groups)]
    assert [n for g in order for n in g] == list(tensors)  # consecutive runs in insertion order
    for i, g in enumerate(order):
        total = sum(tensors[n].nbytes for n in g)
        assert total <= max_shard or len(g) == 1
        if i + 1 < len(order):  # greedy: the next tensor did not fit (or this one filled the shard)
            assert total + tensors[order[i + 1][0]].nbytes > max_shard or total >= max_shard
    assert (len(order) == 1) == (out / SINGLE_NAME).exists()


def test_foreign_files_and_read_only_arrays(tmp_path):
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / "foreign.safetensors"
    safetensors.numpy.save_file({"a": w, "b": w.astype(ml_dtypes.bfloat16)}, path, metadata={"k": "v"})
    with open_checkpoint(path) as ckpt:
        a = ckpt.get("a")
        assert _same(a, w) and ckpt.metadata() == {"k": "v"} and "b" in ckpt and "c" not in ckpt
        with pytest.raises(ValueError, match="read-only"):
            a[0, 0] = 1.0
        b = ckpt.get("b")
    # arrays outlive the reader (each owns its mapping)
    assert _same(b, w.astype(ml_dtypes.bfloat16)) and float(a.sum()) == 66.0


def test_reader_writer_interop_passthrough(tmp_path):
    """Read-only arrays from a reader can be written straight back (a passthrough merge)."""
    src = _write(tmp_path / "src", _tensors(2), max_shard_bytes=50)
    with open_checkpoint(src) as ckpt, CheckpointWriter(tmp_path / "dst") as w:
        for name in ckpt.keys():
            w.add(name, ckpt.get(name))
    with open_checkpoint(src) as a, open_checkpoint(tmp_path / "dst") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(_same(a.get(k), b.get(k)) for k in a.keys())


def test_writer_copies_the_caller_array(tmp_path):
    x = np.zeros(3, np.float32)
    with CheckpointWriter(tmp_path / "m") as w:
        w.add("x", x)
        x[:] = 7.0
    with open_checkpoint(tmp_path / "m") as ckpt:
        assert np.array_equal(ckpt.get("x"), np.zeros(3))


def test_copy_files_from_source_model(tmp_path):
    src = tmp_path / "base"
    src.mkdir()
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "other.txt").write_text("not copied")
    with CheckpointWriter(tmp_path / "m") as w:
        w.add("w", np.ones(2, np.float32))
        assert w.copy_files_from(src) == ["config.json", "tokenizer.json"]
        assert w.copy_files_from(src, names=("other.txt",)) == ["other.txt"]
        with pytest.raises(ValueError, match=r"'\.\./x' is not a plain file name"):
            w.copy_files_from(src, names=("../x",))
        with pytest.raises(ValueError, match="clash with the weight files"):
            w.copy_files_from(src, names=(SINGLE_NAME,))
        with pytest.raises(ValueError, match="nowhere.*is not a folder"):
            w.copy_files_from(tmp_path / "nowhere")
    assert _listing(tmp_path / "m") == ["config.json", SINGLE_NAME, "other.txt", "tokenizer.json"]
    assert (tmp_path / "m" / "config.json").read_bytes() == (src / "config.json").read_bytes()


# ------------------------------------------------------------------------------ laziness


_RSS_PROBE = textwrap.dedent(
    """
    import sys, psutil
    from landscape.checkpoints import open_checkpoint
    proc = psutil.Process()
    base = proc.memory_info().rss
    ckpt = open_checkpoint(sys.argv[1])
    small = ckpt.get("small")
    total = float(small.astype("float64").sum())
    after_small = proc.memory_info().rss - base
    big = ckpt.get("big")
    touched = int(big.sum(dtype="uint64"))
    after_big = proc.memory_info().rss - base
    del big
    after_release = proc.memory_info().rss - base
    print(total, touched, after_small, after_big, after_release)
    """
)


def test_reading_one_tensor_does_not_read_the_others(tmp_path):
    """RSS of a subprocess: one small tensor of a 256 MB file costs kilobytes; the big one is released."""
    big_bytes = 256 * 2**20
    small = np.arange(16, dtype=np.float32)
    header = {
        "__metadata__": {"format": "pt"},
        "small": {"dtype": "F32", "shape": [16], "data_offsets": [0, small.nbytes]},
        "big": {"dtype": "U8", "shape": [big_bytes], "data_offsets": [small.nbytes, small.nbytes + big_bytes]},
    }
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:  # the big tensor is a sparse run of zero bytes: cheap to create
        f.write(len(blob).to_bytes(8, "little") + blob + small.tobytes())
        f.truncate(8 + len(blob) + small.nbytes + big_bytes)
    with safetensors.safe_open(path, framework="numpy") as f:  # a valid file for safetensors too
        assert f.metadata() == {"format": "pt"} and np.array_equal(f.get_tensor("small"), small)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(
        [sys.executable, "-c", _RSS_PROBE, str(path)], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    total, touched, after_small, after_big, after_release = res.stdout.split()
    mb = 2**20
    assert float(total) == float(small.sum()) and int(touched) == 0
    assert int(after_small) < 16 * mb, res.stdout  # not the 256 MB file
    assert int(after_big) > 200 * mb, res.stdout  # the measurement can see the big tensor ...
    assert int(after_release) < 16 * mb, res.stdout  # ... and its mapping is gone once the array is


# ------------------------------------------------------------------------------ atomic writer


def test_error_inside_the_writer_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), CheckpointWriter(tmp_path / "m", max_shard_bytes=8) as w:
        w.add("a", np.ones(4, np.float32))
        w.add("b", np.ones(4, np.float32))
        (tmp,) = tmp_path.iterdir()  # full shards are on disk already (streamed), in the temporary folder
        assert tmp.name.startswith(".m.landscape-tmp-") and len(_listing(tmp)) == 2
        assert not (tmp_path / "m").exists()
        raise RuntimeError("boom")
    assert _listing(tmp_path) == []


def test_finish_without_a_with_block_and_a_dropped_writer(tmp_path):
    w = CheckpointWriter(tmp_path / "m")
    w.add("a", np.ones(2, np.float32))
    assert w.finish() == tmp_path / "m" and _listing(tmp_path / "m") == [SINGLE_NAME]
    with pytest.raises(ValueError, match="is closed"):
        w.finish()
    dropped = CheckpointWriter(tmp_path / "n")
    dropped.add("a", np.ones(2, np.float32))
    assert len(_listing(tmp_path)) == 2
    del dropped  # never finished: its temporary folder goes with it
    assert _listing(tmp_path) == ["m"]


def test_error_keeps_an_existing_folder_and_overwrite_replaces_it_whole(tmp_path):
    out = _write(tmp_path / "m", {"a": np.ones(4, np.float32), "b": np.zeros(4, np.float32)}, max_shard_bytes=16)
    before = {n: (out / n).read_bytes() for n in _listing(out)}
    assert len(before) == 3  # two shards and the index
    with pytest.raises(RuntimeError, match="boom"), CheckpointWriter(out, overwrite=True) as w:
        w.add("c", np.ones(1, np.float32))
        raise RuntimeError("boom")
    assert {n: (out / n).read_bytes() for n in _listing(out)} == before
    _write(out, {"c": np.full(2, 3.0, np.float32)}, overwrite=True)
    assert _listing(out) == [SINGLE_NAME]  # no stale shard or index of the old model
    assert _listing(tmp_path) == ["m"]
    with open_checkpoint(out) as ckpt:
        assert ckpt.keys() == ["c"] and np.array_equal(ckpt.get("c"), [3.0, 3.0])


def test_failure_while_finishing_keeps_the_old_folder(tmp_path, monkeypatch):
    out = _write(tmp_path / "m", {"a": np.ones(4, np.float32)})
    before = (out / SINGLE_NAME).read_bytes()
    import landscape.checkpoints as ck

    monkeypatch.setattr(ck, "_exchange", lambda a, b: False)  # the two-rename fallback path
    real_replace = os.replace

    def failing_replace(src, dst):
        if pathlib.Path(dst) == out:
            raise OSError("disk gone (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"), CheckpointWriter(out, overwrite=True) as w:
        w.add("b", np.zeros(2, np.float32))
    monkeypatch.undo()
    # the old folder was moved aside and could not be put back by the failing rename; the next
    # writer's stale-temporary cleanup restores it (this process is alive, so mark it as dead)
    leftovers = [p for p in tmp_path.iterdir() if p.name != "m"]
    for p in leftovers:
        p.rename(p.with_name(p.name.replace(f"-{os.getpid()}-", "-0-")))
    remove_stale_temps(out)
    assert _listing(tmp_path) == ["m"] and (out / SINGLE_NAME).read_bytes() == before


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    stale_dir = tmp_path / f".m.landscape-tmp-{pid}-deadbeef"
    stale_dir.mkdir()
    (stale_dir / "shard-00001.safetensors").write_bytes(b"x" * 10)
    live = tmp_path / f".m.landscape-tmp-{os.getpid()}-0badcafe"  # a concurrent writer: kept
    live.mkdir()
    other = tmp_path / f".n.landscape-tmp-{pid}-deadbeef"  # another target: kept
    other.mkdir()
    _write(tmp_path / "m", {"a": np.ones(1, np.float32)})
    assert _listing(tmp_path) == sorted(["m", live.name, other.name])


def test_sigkill_mid_write_leaves_no_output_and_the_next_write_cleans_up(tmp_path):
    out = tmp_path / "m"
    script = textwrap.dedent(
        f"""
        import time, numpy as np
        from landscape.checkpoints import CheckpointWriter
        w = CheckpointWriter({str(out)!r}, max_shard_bytes=8).__enter__()
        w.add("a", np.ones(4, np.float32))
        print("written", flush=True)
        time.sleep(60)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "written"
        leftover = [p.name for p in tmp_path.iterdir()]
        assert len(leftover) == 1 and leftover[0].startswith(".m.landscape-tmp-")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert not out.exists()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the pid is gone once the process is reaped
        _write(out, {"b": np.ones(1, np.float32)}, overwrite=True)
        if _listing(tmp_path) == ["m"]:
            break
    assert _listing(tmp_path) == ["m"]


def test_writer_errors_before_anything_is_written(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        CheckpointWriter(out)
    afile = tmp_path / "f"
    afile.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a model folder"):
        CheckpointWriter(afile, overwrite=True)
    with pytest.raises(ValueError, match="its parent is not a folder"):
        CheckpointWriter(afile / "sub")
    with pytest.raises(ValueError, match="max_shard_bytes must be a positive int"):
        CheckpointWriter(tmp_path / "n", max_shard_bytes=0)
    with pytest.raises(ValueError, match="metadata key 'format' is reserved"):
        CheckpointWriter(tmp_path / "n", metadata={"format": "flax"})
    with pytest.raises(ValueError, match="metadata must map non-empty str keys to str values"):
        CheckpointWriter(tmp_path / "n", metadata={"step": 3})
    assert _listing(tmp_path) == ["f", "m"]

    with pytest.raises(ValueError, match="already added"), CheckpointWriter(tmp_path / "n") as w:
        w.add("a", np.ones(1, np.float32))
        w.add("a", np.ones(1, np.float32))
    with pytest.raises(ValueError, match="'__metadata__'"), CheckpointWriter(tmp_path / "n") as w:
        w.add("__metadata__", np.ones(1, np.float32))
    with pytest.raises(ValueError, match="tensor 'c'.*complex128 cannot be stored"), CheckpointWriter(tmp_path / "n") as w:
        w.add("c", np.ones(1, np.complex128))
    with pytest.raises(ValueError, match="tensor 's'.*<U1 cannot be stored"), CheckpointWriter(tmp_path / "n") as w:
        w.add("s", np.array(["a"]))
    with pytest.raises(ValueError, match="non-empty strings"), CheckpointWriter(tmp_path / "n") as w:
        w.add("", np.ones(1))
    with pytest.raises(ValueError, match="no tensors were added"), CheckpointWriter(tmp_path / "n"):
        pass
    w = CheckpointWriter(tmp_path / "n")
    w.add("w", np.ones(1))
    w.__exit__(None, None, None)
    with pytest.raises(ValueError, match="is closed; nothing more can be added"):
        w.add("late", np.ones(1))
    assert _listing(tmp_path) == ["f", "m", "n"]
    assert _listing(out) == ["keep"]


# ------------------------------------------------------------------------------ reader errors


def test_reader_refuses_bad_layouts_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing"):
        open_checkpoint(tmp_path / "nothing")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"empty.*neither 'model.safetensors' nor.*config.json"):
        open_checkpoint(empty)

    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    torch_dir = tmp_path / "torch_model"
    torch_dir.mkdir()
    (torch_dir / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Trap()}))
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*pickle"):
        open_checkpoint(torch_dir)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*pickle"):
        open_checkpoint(torch_dir / "pytorch_model.bin")
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(pickle.dumps({"w": Trap()}))
    with pytest.raises(ValueError, match=r"disguised\.safetensors.*pickle"):
        open_checkpoint(disguised)
    zipped = tmp_path / "zipped.safetensors"  # torch.save's zip container
    zipped.write_bytes(b"PK\x03\x04" + b"\x00" * 60)
    with pytest.raises(ValueError, match=r"zipped\.safetensors.*pickle"):
        open_checkpoint(zipped)
    assert not marker.exists()

    good = _write(tmp_path / "good", {"a": np.arange(8, dtype=np.float32)}) / SINGLE_NAME
    blob = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    for n in (0, 5, 8, 20, len(blob) - 1):
        cut.write_bytes(blob[:n])
        with pytest.raises(ValueError, match=r"cut\.safetensors"):
            open_checkpoint(cut)
    cut.write_bytes(blob + b"\x00")
    with pytest.raises(ValueError, match=r"cut\.safetensors.*1 bytes after the last tensor"):
        open_checkpoint(cut)
    bad_json = tmp_path / "badjson.safetensors"
    bad_json.write_bytes((6).to_bytes(8, "little") + b"{nope}")
    with pytest.raises(ValueError, match=r"badjson\.safetensors.*not valid JSON"):
        open_checkpoint(bad_json)
    odd = tmp_path / "odd.safetensors"
    hdr = json.dumps({"x": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}).encode()
    odd.write_bytes(len(hdr).to_bytes(8, "little") + hdr + b"\x00")
    with pytest.raises(ValueError, match=r"odd\.safetensors.*'x' has dtype 'F4'"):
        open_checkpoint(odd)


def _sharded(tmp_path, name="m"):
    tensors = {"a": np.ones(4, np.float32), "b": np.zeros(4, np.float32), "c": np.arange(4, dtype=np.int64)}
    return _write(tmp_path / name, tensors, max_shard_bytes=16)


def test_reader_refuses_broken_indexes(tmp_path):
    out = _sharded(tmp_path, "missing_shard")
    index = json.loads((out / INDEX_NAME).read_text())
    (out / index["weight_map"]["b"]).unlink()
    with pytest.raises(ValueError, match=r"names shard file 'model-00002-of-00003\.safetensors', which is missing"):
        open_checkpoint(out)

    out = _sharded(tmp_path, "ghost")
    index = json.loads((out / INDEX_NAME).read_text())
    index["weight_map"]["ghost.weight"] = index["weight_map"]["a"]
    (out / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"lists tensor 'ghost\.weight' in shard 'model-00001-of-00003\.safetensors'.*does not hold it"):
        open_checkpoint(out)

    out = _write(tmp_path / "unlisted", {"a": np.ones(4, np.float32), "b": np.ones(4, np.float32), "c": np.ones(8, np.float32)}, max_shard_bytes=32)
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["weight_map"]["b"] == index["weight_map"]["a"] != index["weight_map"]["c"]
    del index["weight_map"]["b"]
    (out / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"holds tensor 'b', which .* does not assign to it"):
        open_checkpoint(out)

    out = _sharded(tmp_path, "escape")
    index = json.loads((out / INDEX_NAME).read_text())
    index["weight_map"]["a"] = "../good/model.safetensors"
    (out / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"not a plain file name"):
        open_checkpoint(out)

    for text, match in (("{not json", "not readable JSON"), ('{"metadata": {}}', 'no "weight_map"'), ('{"weight_map": {}}', "lists no tensors")):
        (out / INDEX_NAME).write_text(text)
        with pytest.raises(ValueError, match=rf"escape.*{match}"):
            open_checkpoint(out)


def test_reader_errors_on_unknown_names_and_after_close(tmp_path):
    ckpt = open_checkpoint(_sharded(tmp_path))
    with pytest.raises(ValueError, match=r"has no tensor 'nope'"):
        ckpt.get("nope")
    with pytest.raises(ValueError, match=r"has no tensor 'nope'"):
        ckpt.shape("nope")
    ckpt.close()
    with pytest.raises(ValueError, match="is closed"):
        ckpt.get("a")
    out = _write(tmp_path / "t", {"a": np.ones(4, np.float32), "b": np.ones(4096, np.float32)})
    with open_checkpoint(out) as ckpt:
        first = ckpt.keys()[0]
        ckpt.get(first)
        os.truncate(out / SINGLE_NAME, os.path.getsize(out / SINGLE_NAME) - 100)
        last = ckpt.keys()[-1]
        with pytest.raises(ValueError, match=rf"shrank after it was opened.*tensor '{last}' is gone"):
            ckpt.get(last)  # not a SIGBUS


def test_dtype_codes():
    assert {dtype_code(np.float32), dtype_code(ml_dtypes.bfloat16), dtype_code(np.int64)} == {"F32", "BF16", "I64"}
    assert DTYPES["BF16"] == np.dtype(ml_dtypes.bfloat16) and DTYPES["F16"] == np.float16
    assert dtype_code(np.dtype(">f4")) == "F32"
    with pytest.raises(ValueError, match="float128|longdouble|cannot be stored"):
        dtype_code(np.longdouble)


# ------------------------------------------------------------------------------ layout mapping


def _zoo(name, seed=0, **kwargs):
    """A zoo model's apply_fn with random (params, state) of its layout (abstract init: no eager ops)."""
    module = nnx.eval_shape(lambda: models.build(name, jax.random.key(0), **kwargs))
    apply_fn, params, state = models.functional(module)
    rng = np.random.default_rng(seed)
    fill = lambda s: (0.5 * rng.standard_normal(s.shape)).astype(s.dtype)  # noqa: E731
    return apply_fn, jax.tree.map(fill, params), jax.tree.map(fill, state)


def _zoo_shapes_filled(name, seed=0, **kwargs):
    return _zoo(name, seed, **kwargs)[1:]


def _np_tree(t):
    return jax.tree.map(np.asarray, t)


def _tree_same(a, b):
    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        pa == pb and _same(np.asarray(x), np.asarray(y)) for (pa, x), (pb, y) in zip(la, lb)
    )


ZOO = {
    "mlp": ("mlp", {"in_features": 12, "widths": (8, 6, 3)}),
    "cnn-layer": ("cnn", {"in_channels": 2, "num_classes": 3, "widths": (4, 5)}),
    "cnn-batch": ("cnn", {"in_channels": 2, "num_classes": 3, "widths": (4, 5), "norm": "batch"}),
    "resnet-batch": ("resnet", {"in_channels": 1, "num_classes": 3, "base_width": 4, "blocks_per_stage": (1, 1), "norm": "batch"}),
}


@pytest.mark.parametrize("key", list(ZOO))
def test_zoo_round_trip_through_torch_layout_is_identical(key, tmp_path):
    name, kwargs = ZOO[key]
    params, state = _zoo_shapes_filled(name, **kwargs)
    assert bool(state) == (kwargs.get("norm") == "batch")
    sd = to_torch_state_dict(params, state)
    n_leaves = len(jax.tree.leaves(params)) + len(jax.tree.leaves(state))
    assert len(sd) == n_leaves
    for path, leaf in jax.tree.leaves_with_path(params):
        flax_name = "/".join(p.key for p in path)
        torch_name = flax_name.replace("/", ".").replace(".kernel", ".weight").replace(".scale", ".weight")
        want = leaf.shape if leaf.ndim == 1 else (leaf.shape[-1], leaf.shape[-2], *leaf.shape[:-2])
        assert sd[torch_name].shape == want, flax_name
    back_params, back_state = from_torch_state_dict(sd, like=(params, state))
    assert _tree_same(back_params, params) and _tree_same(back_state, state)
    # through a checkpoint on disk, with PyTorch's num_batches_tracked present
    if state:
        sd = {**sd, **{k.replace("running_mean", "num_batches_tracked"): np.array(5, np.int64) for k in sd if k.endswith("running_mean")}}
        assert any(k.endswith("norms.0.running_var") or k.endswith("norm1.running_var") for k in sd)
    out = _write(tmp_path / key, sd, max_shard_bytes=512)
    with open_checkpoint(out) as ckpt:
        assert len({ckpt.file(k) for k in ckpt.keys()}) > 1
        p2, s2 = from_torch_state_dict(ckpt, like=(params, state))
    assert _tree_same(p2, params) and _tree_same(s2, state)


def test_torch_layout_mlp_computes_the_flax_logits():
    apply_fn, params, _ = _zoo("mlp", in_features=12, widths=(8, 6, 3))
    sd = to_torch_state_dict(_np_tree(params))
    x = np.random.default_rng(1).normal(size=(5, 12)).astype(np.float32)
    h = x
    for i in range(3):
        h = h @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]  # torch.nn.Linear
        if i < 2:
            h = np.maximum(h, 0.0)
    np.testing.assert_allclose(h, np.asarray(jax.jit(apply_fn)(params, x)), rtol=1e-5, atol=1e-5)


def _torch_conv2d_same(x, w, b):
    """torch.nn.Conv2d(padding=1) on NCHW input with an (out, in, 3, 3) weight, in numpy."""
    n, _, hgt, wid = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], hgt, wid), np.float64)
    for dh in range(3):
        for dw in range(3):
            out += np.einsum("nihw,oi->nohw", xp[:, :, dh : dh + hgt, dw : dw + wid], w[:, :, dh, dw])
    return out + (0.0 if b is None else b[None, :, None, None])


def test_torch_layout_cnn_computes_the_flax_logits():
    apply_fn, params, _ = _zoo("cnn", in_channels=2, num_classes=3, widths=(4, 5), norm=None)
    sd = to_torch_state_dict(_np_tree(params))
    assert sd["convs.0.weight"].shape == (4, 2, 3, 3) and sd["head.weight"].shape == (3, 5)
    x = np.random.default_rng(2).normal(size=(2, 8, 8, 2)).astype(np.float32)
    h = x.transpose(0, 3, 1, 2).astype(np.float64)  # NCHW
    for s in range(2):
        h = np.maximum(_torch_conv2d_same(h, sd[f"convs.{s}.weight"], sd[f"convs.{s}.bias"]), 0.0)
        if s == 0:
            n, c, hh, ww = h.shape
            h = h.reshape(n, c, hh // 2, 2, ww // 2, 2).max(axis=(3, 5))  # MaxPool2d(2)
    pooled = h.mean(axis=(2, 3))
    logits = pooled @ sd["head.weight"].T + sd["head.bias"]
    np.testing.assert_allclose(logits, np.asarray(jax.jit(apply_fn)(params, x)), rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=2, max_size=5))
def test_kernel_layout_round_trip_and_axes(shape):
    k = np.random.default_rng(len(shape)).normal(size=shape).astype(np.float32)
    sd = to_torch_state_dict({"l": {"kernel": k}})
    w = sd["l.weight"]
    assert w.shape == (shape[-1], shape[-2], *shape[:-2]) and w.flags.c_contiguous
    idx = tuple(s - 1 for s in shape)  # W[o, i, *s] == K[*s, i, o]
    assert w[(idx[-1], idx[-2], *idx[:-2])] == k[idx]
    back, state = from_torch_state_dict(sd)
    assert _same(back["l"]["kernel"], k) and state == {}


def test_custom_rules_embedding_and_custom_layout():
    params = {
        "embed": {"embedding": np.arange(12.0).reshape(4, 3)},
        "attn": {"qkv": {"kernel": np.arange(24.0).reshape(3, 2, 4)}},  # (in, heads, head_dim)
        "head": {"kernel": np.ones((3, 4))},
    }
    heads = Layout(
        "heads",
        to_torch=lambda a: np.ascontiguousarray(a.reshape(a.shape[0], -1).T),
        from_torch=lambda a: np.ascontiguousarray(a.T.reshape(a.shape[1], 2, -1)),
        ndims=None,
    )
    mapping = LayoutMapping((Rule("embed/embedding", "tok.weight"), Rule("{m*}/qkv/kernel", "{m*}.in_proj_weight", layout=heads), *ZOO_RULES))
    sd = to_torch_state_dict(params, mapping=mapping)
    assert list(sd) == ["attn.in_proj_weight", "tok.weight", "head.weight"]
    assert _same(sd["tok.weight"], params["embed"]["embedding"])  # nn.Embedding: same layout
    assert sd["attn.in_proj_weight"].shape == (8, 3)
    back, _ = from_torch_state_dict(sd, mapping=mapping, like=(params, {}))
    assert _tree_same(back, params)
    # without the specific rule, "tok.weight" would be read as a Linear kernel (first match wins)
    generic, _ = from_torch_state_dict({"tok.weight": sd["tok.weight"]})
    assert generic["tok"]["kernel"].shape == (3, 4)


def test_mapping_errors_name_the_tensor():
    with pytest.raises(ValueError, match=r"params leaf 'layers/0/weird' \(2-d\) matches no rule"):
        to_torch_state_dict({"layers": {"0": {"weird": np.ones((2, 2))}}})
    with pytest.raises(ValueError, match=r"params leaf 'l/kernel' \(1-d\) matches no rule"):
        to_torch_state_dict({"l": {"kernel": np.ones(3)}})  # a kernel must have 2-5 dims
    with pytest.raises(ValueError, match=r"state leaf 'bn/count'"):
        to_torch_state_dict({}, {"bn": {"count": np.ones(3)}})
    with pytest.raises(ValueError, match=r"PyTorch tensor 'fc\.alpha' \(1-d\) matches no rule"):
        from_torch_state_dict({"fc.alpha": np.ones(3)})
    with pytest.raises(ValueError, match=r"PyTorch tensor 'fc\.weight' \(1-d\) matches no rule"):
        from_torch_state_dict({"fc.weight": np.ones(3)}, mapping=LayoutMapping(ZOO_RULES[:1]))
    apply_fn, params, state = _zoo("mlp", in_features=4, widths=(3, 2))
    sd = to_torch_state_dict(_np_tree(params))
    like = (_np_tree(params), {})
    with pytest.raises(ValueError, match=r"'layers\.0\.weight' gives params leaf 'layers/0/kernel' shape \(3, 5\); the model needs \(4, 3\)"):
        from_torch_state_dict({**sd, "layers.0.weight": np.ones((5, 3), np.float32)}, like=like)
    with pytest.raises(ValueError, match=r"'layers\.1\.bias' has dtype float16; params leaf 'layers/1/bias' needs float32"):
        from_torch_state_dict({**sd, "layers.1.bias": np.ones(2, np.float16)}, like=like)
    with pytest.raises(ValueError, match=r"no tensor for params leaf 'layers/1/bias'"):
        from_torch_state_dict({k: v for k, v in sd.items() if k != "layers.1.bias"}, like=like)
    with pytest.raises(ValueError, match=r"'extra\.bias' maps to params leaf 'extra/bias', which the model does not have"):
        from_torch_state_dict({**sd, "extra.bias": np.ones(2, np.float32)}, like=like)
    shapes = jax.eval_shape(lambda: params)  # ShapeDtypeStruct templates work too
    assert _tree_same(from_torch_state_dict(sd, like=(shapes, {}))[0], _np_tree(params))
    two = LayoutMapping((Rule("a/kernel", "x.weight", layout="kernel"), Rule("b/kernel", "x.weight", layout="kernel")))
    with pytest.raises(ValueError, match=r"'b/kernel' and 'a/kernel' both map to PyTorch key 'x\.weight'"):
        to_torch_state_dict({"a": {"kernel": np.ones((2, 2))}, "b": {"kernel": np.ones((2, 2))}}, mapping=two)
    with pytest.raises(ValueError, match="unknown; accepted"):
        Rule("a", "b", layout="rotate")
    with pytest.raises(ValueError, match="same placeholders"):
        Rule("{i}/kernel", "{j}.weight")
    with pytest.raises(ValueError, match="collection 'buffers' is unknown"):
        Rule("a", "b", collection="buffers")
    with pytest.raises(ValueError, match="non-empty sequence of Rule"):
        LayoutMapping(())
    bad = Layout("bad", to_torch=lambda a: a.reshape(7, -1), from_torch=lambda a: a)
    with pytest.raises(ValueError, match=r"params leaf 'q/kernel' of shape \(2, 3\) does not fit layout 'bad'"):
        to_torch_state_dict({"q": {"kernel": np.ones((2, 3))}}, mapping=LayoutMapping((Rule("q/kernel", "q.w", layout=bad),)))
    lossy = Layout("lossy", to_torch=lambda a: a[:1], from_torch=lambda a: a)
    with pytest.raises(ValueError, match=r"layout 'lossy' turned params leaf 'q/kernel'.*only rearranges"):
        to_torch_state_dict({"q": {"kernel": np.ones((2, 3))}}, mapping=LayoutMapping((Rule("q/kernel", "q.w", layout=lossy),)))
    with pytest.raises(ValueError, match=r"params leaf 'a\.b/kernel' \(2-d\) matches no rule"):
        to_torch_state_dict({"a.b": {"kernel": np.ones((2, 2))}})  # 'a.b.weight' would read back as a/b/kernel


def test_placeholders_single_and_multi_segment():
    r = Rule("blocks/{i}/mlp/kernel", "h.{i}.mlp.weight", layout="kernel")
    assert r.match_flax("blocks/3/mlp/kernel") == "h.3.mlp.weight"
    assert r.match_flax("blocks/3/x/mlp/kernel") is None  # {i} is one component
    assert r.match_torch("h.12.mlp.weight") == "blocks/12/mlp/kernel"
    m = Rule("{path*}/kernel", "{path*}.weight")
    assert m.match_flax("a/b/0/kernel") == "a.b.0.weight" and m.match_torch("a.b.0.weight") == "a/b/0/kernel"
    assert m.match_flax("kernel") is None
    assert ZOO_MAPPING.dropped("bn.num_batches_tracked") and not ZOO_MAPPING.dropped("bn.running_mean")


def test_nnx_linear_equals_torch_linear_formula():
    """The mapping's convention is nnx.Linear's: y = x K + b = x W^T + b."""
    lin = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    k, b = np.asarray(lin.kernel.get_value()), np.asarray(lin.bias.get_value())
    sd = to_torch_state_dict({"fc": {"kernel": k, "bias": b}})
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    np.testing.assert_allclose(x @ sd["fc.weight"].T + sd["fc.bias"], np.asarray(lin(jnp.asarray(x))), rtol=1e-6, atol=1e-6)


def test_docs_page_code_blocks_run():
    import re

    page = (REPO / "docs" / "checkpoints.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert len(blocks) == 4
    for block in blocks:
        exec(compile(block, "docs/checkpoints.md", "exec"), {"__name__": "__docs__"})
