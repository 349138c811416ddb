"""Byte-level language modelling on text already on the machine: the Python standard library's own
source (:func:`stdlib_text`) or a user's UTF-8 text files (:func:`text_files`). Nothing downloads.

A corpus is a list of files read as bytes (vocabulary 256: token id = byte value). Each file is
split on its own into a **train** part (its first ``1 − test_fraction`` of bytes, rounded down) and a
**test** part (the rest), so both parts see every file. Each part is cut into non-overlapping
windows of ``context`` tokens; the inputs of a window are ``ids = b[s : s + context]`` and its
next-token targets ``y = b[s + 1 : s + context + 1]``, i.e. ``y[:, t] = ids[:, t + 1]`` inside the
part. The last window of a part is padded with id 0 after its real tokens, and every position
without a real next token (the last byte of a part and the padding) has target
:data:`~landscape.objective.IGNORE_INDEX` ``= −100``, so ``Objective(apply_fn, x, y,
loss="next_token")`` averages over exactly the ``len(part) − 1`` real next-token predictions per
part. Padding sits after the real tokens, so a causal model's real positions never see it and no
attention mask is needed (``x`` is a plain ``(N, context)`` int32 array).

The standard-library corpus is the fixed list :data:`STDLIB_FILES` of pure-Python modules, read
from ``sysconfig.get_paths()["stdlib"]``. Their text changes between Python releases, so the
dataset records the Python version and the sha256 of the files' bytes concatenated in list order
(no separator): two machines have the same corpus exactly when the hashes agree. With Python 3.11.7
the 12 files hold 126,090 bytes.

Sequences remember their source file (``file_train``, ``file_test``: index into ``files``), so
:func:`file_subset` makes one task per file or group of files for directedness and merging studies.

Example:
    >>> from landscape import data
    >>> ds = data.stdlib_text(context=32)
    >>> ds.x_train.shape[1], ds.num_classes, len(ds.files)
    (32, 256, 12)
    >>> bool((ds.y_train[:, :-1] == ds.x_train[:, 1:])[ds.y_train[:, :-1] >= 0].all())
    True
    >>> task = data.file_subset(ds, ["heapq.py"])
    >>> task.files
    ('heapq.py',)
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import platform
import sysconfig
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from landscape.data.dataset import Dataset, _check_fraction
from landscape.objective import IGNORE_INDEX

__all__ = ["STDLIB_FILES", "TextDataset", "file_subset", "stdlib_text", "text_files"]

STDLIB_FILES: tuple[str, ...] = (
    "textwrap.py",
    "heapq.py",
    "bisect.py",
    "colorsys.py",
    "fnmatch.py",
    "shlex.py",
    "string.py",
    "glob.py",
    "graphlib.py",
    "copy.py",
    "queue.py",
    "sched.py",
)
"""The modules of the standard-library corpus, relative to ``sysconfig.get_paths()["stdlib"]``:
small, stable, pure-Python, present in every CPython 3.9+ install."""

VOCAB_SIZE = 256
"""Byte-level vocabulary: token id = byte value."""


@dataclasses.dataclass(frozen=True, eq=False)
class TextDataset(Dataset):
    """A byte-level next-token dataset: a :class:`~landscape.data.Dataset` whose inputs are token ids.

    ``x_*`` are int32 ids ``(N, context)``, ``y_*`` int32 next-token targets ``(N, context)``
    (``−100`` where no real next token exists), ``num_classes`` the vocabulary size 256 and
    ``input_shape`` ``(context,)``.

    Attributes (besides :class:`~landscape.data.Dataset`'s):
        file_train: ``(N_train,)`` index into ``files`` of each training sequence's source file.
        file_test: the same for the test sequences.
        files: the source files' names (relative to ``root``).
        root: the folder the names are relative to (``""`` when they are absolute paths).
        python_version: ``platform.python_version()`` of the interpreter that read the files.
        sha256: hex digest of the files' bytes concatenated in ``files`` order.
        num_bytes: the total number of bytes read.
        context: tokens per sequence.
        test_fraction: the share of every file's bytes (its tail) in the test part.
    """

    file_train: Any = None
    file_test: Any = None
    files: tuple[str, ...] = ()
    root: str = ""
    python_version: str = ""
    sha256: str = ""
    num_bytes: int = 0
    context: int = 0
    test_fraction: float = 0.0

    @property
    def metadata(self) -> dict[str, Any]:
        """What fixes the corpus: files, root, Python version, sha256, sizes and the split."""
        return {
            "files": list(self.files),
            "root": self.root,
            "python_version": self.python_version,
            "sha256": self.sha256,
            "num_bytes": int(self.num_bytes),
            "context": int(self.context),
            "test_fraction": float(self.test_fraction),
            "split": "per file: first (1 - test_fraction) of its bytes train, the rest test",
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary: name, vocabulary, shapes, real-token counts and :attr:`metadata`."""
        return {
            "name": self.name,
            "num_classes": int(self.num_classes),
            "input_shape": [int(s) for s in self.input_shape],
            "num_train": int(np.shape(self.y_train)[0]),
            "num_test": int(np.shape(self.y_test)[0]),
            "train_tokens": int(np.sum(np.asarray(self.y_train) != IGNORE_INDEX)),
            "test_tokens": int(np.sum(np.asarray(self.y_test) != IGNORE_INDEX)),
            **self.metadata,
        }


jax.tree_util.register_dataclass(
    TextDataset,
    data_fields=["x_train", "y_train", "x_test", "y_test", "x_val", "y_val", "file_train", "file_test"],
    meta_fields=["num_classes", "name", "input_shape", "files", "root", "python_version", "sha256", "num_bytes",
                 "context", "test_fraction"],
)


def _windows(b: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, targets)`` of shape ``(ceil(len / context), context)`` for one contiguous byte run."""
    n = len(b)
    if n == 0:
        return np.zeros((0, context), np.int32), np.zeros((0, context), np.int32)
    rows = -(-n // context)
    ids = np.zeros(rows * context, np.int32)
    ids[:n] = b
    tgt = np.full(rows * context, IGNORE_INDEX, np.int32)
    tgt[: n - 1] = b[1:]
    return ids.reshape(rows, context), tgt.reshape(rows, context)


def _read(path: str, label: str) -> bytes:
    if not os.path.isfile(path):
        msg = f"text file {label!r} not found at {path!r} (the corpus reads files that are on this machine)"
        raise FileNotFoundError(msg)
    data = open(path, "rb").read()  # noqa: SIM115 - read whole file, closed by refcount
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        msg = f"text file {path!r} is not valid UTF-8 (byte {e.start}: {e.reason}); pass text files"
        raise ValueError(msg) from None
    if not data:
        msg = f"text file {path!r} is empty"
        raise ValueError(msg)
    return data


def _build(paths: Sequence[str], labels: Sequence[str], root: str, *, context: int, test_fraction: float,
           name: str) -> TextDataset:
    if isinstance(context, bool) or not isinstance(context, (int, np.integer)) or context < 2:
        msg = f"context must be an integer >= 2 (tokens per sequence), got {context!r}"
        raise ValueError(msg)
    context = int(context)
    test_fraction = _check_fraction(test_fraction, "test_fraction")
    if len(set(labels)) != len(labels):
        msg = f"the text files must be distinct, got {list(labels)}"
        raise ValueError(msg)
    blobs = [_read(p, lab) for p, lab in zip(paths, labels)]
    parts: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    for i, blob in enumerate(blobs):
        b = np.frombuffer(blob, np.uint8).astype(np.int32)
        cut = int(np.floor((1.0 - test_fraction) * len(b)))
        for part, run in (("train", b[:cut]), ("test", b[cut:])):
            ids, tgt = _windows(run, context)
            parts[part].append((ids, tgt, np.full(len(ids), i, np.int32)))
    out: dict[str, Any] = {}
    for part, chunks in parts.items():
        out[f"x_{part}"] = jnp.asarray(np.concatenate([c[0] for c in chunks]))
        out[f"y_{part}"] = jnp.asarray(np.concatenate([c[1] for c in chunks]))
        out[f"file_{part}"] = jnp.asarray(np.concatenate([c[2] for c in chunks]))
    if out["x_train"].shape[0] == 0:
        msg = f"the training part of {list(labels)} is empty; lower test_fraction={test_fraction}"
        raise ValueError(msg)
    joined = b"".join(blobs)
    return TextDataset(
        num_classes=VOCAB_SIZE, name=name, input_shape=(context,), files=tuple(labels), root=root,
        python_version=platform.python_version(), sha256=hashlib.sha256(joined).hexdigest(), num_bytes=len(joined),
        context=context, test_fraction=test_fraction, **out,
    )


def stdlib_text(
    *, context: int = 64, test_fraction: float = 0.1, files: Sequence[str] = STDLIB_FILES
) -> TextDataset:
    """Byte-level language modelling on the Python standard library's source (no download).

    Args:
        context: tokens (bytes) per sequence.
        test_fraction: share of every file's bytes (its tail) held out as the test part.
        files: module files relative to ``sysconfig.get_paths()["stdlib"]``; default
            :data:`STDLIB_FILES` (change it and the corpus is no longer the documented one).

    Returns:
        A :class:`TextDataset` named ``"stdlib_text"`` whose :attr:`~TextDataset.metadata` records
        the Python version and the sha256 of the files' bytes.

    Raises:
        FileNotFoundError: a listed file is not in this interpreter's standard library (names the path).
        ValueError: a bad ``context`` / ``test_fraction``, an empty training part.
    """
    if isinstance(files, str) or not all(isinstance(f, str) for f in files) or not files:
        msg = f"files must be a non-empty sequence of file names, got {files!r}"
        raise ValueError(msg)
    root = sysconfig.get_paths()["stdlib"]
    return _build([os.path.join(root, f) for f in files], list(files), root, context=context,
                  test_fraction=test_fraction, name="stdlib_text")


def text_files(
    paths: Sequence[str | os.PathLike[str]], *, context: int = 64, test_fraction: float = 0.1
) -> TextDataset:
    """Byte-level language modelling on a user's own UTF-8 text files, split as :func:`stdlib_text`.

    Args:
        paths: the files (read as bytes, checked to be UTF-8); their order fixes the sha256.
        context: tokens per sequence.
        test_fraction: share of every file's bytes (its tail) held out as the test part.

    Raises:
        FileNotFoundError: a path that is not a file (named in the message).
        ValueError: a file that is empty or not UTF-8, a bad ``context`` / ``test_fraction``.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    names = [os.fspath(p) for p in paths]
    if not names:
        msg = "text_files needs at least one path"
        raise ValueError(msg)
    return _build(names, names, "", context=context, test_fraction=test_fraction, name="text_files")


def file_subset(ds: TextDataset, files: Sequence[str]) -> TextDataset:
    """The sequences of ``ds`` that come from ``files`` (a task: e.g. one source file per task).

    The vocabulary, context and metadata are kept (``sha256`` and ``num_bytes`` stay those of the
    whole corpus; ``files`` becomes the chosen names and the file indices are renumbered to them);
    the name becomes ``"stdlib_text[heapq.py]"``.

    Raises:
        TypeError: ``ds`` is not a :class:`TextDataset`.
        ValueError: an unknown or repeated file name (the message lists the accepted ones).
    """
    if not isinstance(ds, TextDataset):
        msg = f"file_subset needs a TextDataset (from stdlib_text or text_files), got {type(ds).__name__}"
        raise TypeError(msg)
    if isinstance(files, str):
        files = [files]
    unknown = [f for f in files if f not in ds.files]
    if unknown or not files or len(set(files)) != len(files):
        msg = f"files must be distinct names among {list(ds.files)}, got {list(files)}"
        raise ValueError(msg)
    chosen = [ds.files.index(f) for f in files]
    remap = np.full(len(ds.files), -1, np.int32)
    remap[chosen] = np.arange(len(chosen))
    out: dict[str, Any] = {}
    for part in ("train", "test"):
        fid = np.asarray(getattr(ds, f"file_{part}"))
        keep = np.isin(fid, chosen)
        out[f"x_{part}"] = jnp.asarray(np.asarray(getattr(ds, f"x_{part}"))[keep])
        out[f"y_{part}"] = jnp.asarray(np.asarray(getattr(ds, f"y_{part}"))[keep])
        out[f"file_{part}"] = jnp.asarray(remap[fid[keep]])
    return dataclasses.replace(ds, name=f"{ds.name}[{','.join(files)}]", files=tuple(files), **out)
