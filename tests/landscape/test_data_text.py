"""Byte-level text corpora: the standard-library corpus and a user's files, read from disk only."""

import hashlib
import os
import platform
import sysconfig

import numpy as np
import pytest

from landscape import data
from landscape.objective import IGNORE_INDEX


def _check_windows(x, y, run, context):
    """Rebuild the windows of one contiguous byte run by hand and compare."""
    n = len(run)
    rows = -(-n // context)
    ids = np.zeros(rows * context, np.int64)
    ids[:n] = run
    tgt = np.full(rows * context, IGNORE_INDEX)
    tgt[: n - 1] = run[1:]
    np.testing.assert_array_equal(x, ids.reshape(rows, context))
    np.testing.assert_array_equal(y, tgt.reshape(rows, context))


def test_stdlib_corpus_sizes_split_targets_and_sha():
    ds = data.stdlib_text(context=48, test_fraction=0.25)
    root = sysconfig.get_paths()["stdlib"]
    blobs = [open(os.path.join(root, f), "rb").read() for f in data.STDLIB_FILES]
    assert ds.files == data.STDLIB_FILES and len(ds.files) == 12
    assert ds.sha256 == hashlib.sha256(b"".join(blobs)).hexdigest()
    assert ds.python_version == platform.python_version() == ds.to_dict()["python_version"]
    assert ds.num_bytes == sum(len(b) for b in blobs) and ds.metadata["sha256"] == ds.sha256
    assert ds.num_classes == 256 and ds.input_shape == (48,) and ds.x_train.dtype == np.int32
    x, y = np.asarray(ds.x_train), np.asarray(ds.y_train)
    # every file split on its own: train = first floor(0.75 L) bytes, test = the rest, windows by hand
    for part in ("train", "test"):
        fid = np.asarray(getattr(ds, f"file_{part}"))
        for i, b in enumerate(blobs):
            arr = np.frombuffer(b, np.uint8)
            cut = int(np.floor(0.75 * len(arr)))
            run = arr[:cut] if part == "train" else arr[cut:]
            _check_windows(np.asarray(getattr(ds, f"x_{part}"))[fid == i],
                           np.asarray(getattr(ds, f"y_{part}"))[fid == i], run, 48)
    # shift by one: y[:, t] = x[:, t + 1] wherever the target is real
    real = y[:, :-1] != IGNORE_INDEX
    assert np.array_equal(y[:, :-1][real], x[:, 1:][real])
    n_tokens = int((y != IGNORE_INDEX).sum() + (np.asarray(ds.y_test) != IGNORE_INDEX).sum())
    assert n_tokens == ds.num_bytes - 2 * 12  # one byte per part has no next byte
    # deterministic
    again = data.load("stdlib_text", context=48, test_fraction=0.25)
    assert again.sha256 == ds.sha256 and np.array_equal(np.asarray(again.x_train), x)
    assert np.array_equal(np.asarray(again.y_test), np.asarray(ds.y_test))


def test_file_tasks_and_user_files(tmp_path):
    ds = data.stdlib_text(context=32)
    task = data.file_subset(ds, ["bisect.py", "heapq.py"])
    fid = np.asarray(ds.file_train)
    want = np.isin(fid, [ds.files.index("bisect.py"), ds.files.index("heapq.py")])
    assert task.files == ("bisect.py", "heapq.py") and task.name == "stdlib_text[bisect.py,heapq.py]"
    np.testing.assert_array_equal(np.asarray(task.x_train), np.asarray(ds.x_train)[want])
    assert set(np.asarray(task.file_train).tolist()) == {0, 1}
    with pytest.raises(ValueError, match="among"):
        data.file_subset(ds, ["nope.py"])

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("héllo wörld\n" * 3, encoding="utf-8")
    b.write_bytes(b"abc")
    own = data.text_files([a, b], context=8, test_fraction=0.5)
    blob_a = a.read_bytes()
    arr = np.frombuffer(blob_a, np.uint8)
    cut = len(arr) // 2
    _check_windows(np.asarray(own.x_train)[np.asarray(own.file_train) == 0],
                   np.asarray(own.y_train)[np.asarray(own.file_train) == 0], arr[:cut], 8)
    assert own.sha256 == hashlib.sha256(blob_a + b"abc").hexdigest() and own.files == (str(a), str(b))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        data.text_files([a, tmp_path / "missing.txt"])
    with pytest.raises(FileNotFoundError, match="no_such_module.py"):
        data.stdlib_text(files=["textwrap.py", "no_such_module.py"])
    (tmp_path / "bin.dat").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="not valid UTF-8"):
        data.text_files([tmp_path / "bin.dat"])
    with pytest.raises(ValueError, match="context"):
        data.stdlib_text(context=1)
