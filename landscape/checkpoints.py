"""Hugging Face / PyTorch safetensors checkpoints: lazy reading, sharded atomic writing, layout mapping.

Three pieces, none of which imports torch or transformers:

* :func:`open_checkpoint` opens a ``.safetensors`` file, or a folder holding ``model.safetensors``
  or a sharded ``model.safetensors.index.json`` (transformers' layout). Only the JSON headers are
  read when opening; :meth:`CheckpointReader.get` memory-maps the bytes of *one* tensor (a private
  mapping of just that byte range, released when the array is garbage collected), so reading a
  tensor never reads, copies or keeps resident any other tensor. Values are bit exact for every
  dtype, bf16 coming back as ``ml_dtypes.bfloat16``. Pickle checkpoints (``pytorch_model.bin``,
  ``.pt``, ``.ckpt``) are refused, never unpickled.
* :class:`CheckpointWriter` streams tensors into shards of at most ``max_shard_bytes`` (a shard is
  written as soon as it is full, so at most one shard is held in memory), names them
  ``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json`` exactly as
  ``transformers.PreTrainedModel.save_pretrained`` does (or one ``model.safetensors``), puts the
  header metadata ``{"format": "pt"}`` (a plain string) in every file, copies ``config.json`` /
  tokenizer files from a source model, and moves the finished folder into place atomically.
* :class:`LayoutMapping` translates between PyTorch ``state_dict`` names / layouts and the
  toolkit's Flax NNX params (:func:`to_torch_state_dict`, :func:`from_torch_state_dict`).

The layout rule (which axis is the output unit): PyTorch stores a Linear weight as ``(out, in)``
and a Conv weight as ``(out, in, kh, kw)``, output unit first; Flax stores a kernel as
``(in, out)`` / ``(kh, kw, in, out)``, output unit last. The ``"kernel"`` layout maps Flax
``(*spatial, in, out)`` to PyTorch ``(out, in, *spatial)`` and back:

.. math::  W^{\\text{torch}}_{o,i,s} = K^{\\text{flax}}_{s,i,o}, \\qquad
           y = x W^{\\text{torch}\\top} + b = x K^{\\text{flax}} + b .

:data:`ZOO_MAPPING` covers the zoo (MLP, CNN, ResNet): ``a/b/kernel <-> a.b.weight`` (kernel
layout), LayerNorm / BatchNorm ``scale <-> weight`` and ``bias <-> bias``, BatchNorm state
``mean <-> running_mean`` and ``var <-> running_var``; PyTorch's ``num_batches_tracked`` is
dropped on import and not written on export (``torch.nn.BatchNorm*.load_state_dict`` fills it in).
An ``nnx.Embed`` ``embedding`` is PyTorch's ``nn.Embedding.weight`` with the same layout: add
``Rule("embed/embedding", "embed.weight")`` before the generic rules for your own model.

Example:
    >>> import tempfile, pathlib, numpy as np, ml_dtypes
    >>> from landscape.checkpoints import CheckpointWriter, open_checkpoint
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "model"
    >>> with CheckpointWriter(out, max_shard_bytes=64) as w:
    ...     w.add("a.weight", np.ones((4, 4), np.float32))
    ...     w.add("b.weight", np.arange(8, dtype=np.float32).astype(ml_dtypes.bfloat16))
    >>> sorted(p.name for p in out.iterdir())
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json']
    >>> with open_checkpoint(out) as ckpt:
    ...     ckpt.keys(), ckpt.dtype("b.weight"), float(ckpt.get("b.weight")[3]), ckpt.metadata()
    (['a.weight', 'b.weight'], 'BF16', 3.0, {'format': 'pt'})
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import fnmatch
import functools
import json
import math
import mmap
import os
import pathlib
import re
import secrets
import shutil
import stat
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import safetensors

__all__ = [
    "DTYPES",
    "INDEX_NAME",
    "LAYOUTS",
    "SINGLE_NAME",
    "ZOO_MAPPING",
    "ZOO_RULES",
    "CheckpointReader",
    "CheckpointWriter",
    "Layout",
    "LayoutMapping",
    "Rule",
    "dtype_code",
    "from_torch_state_dict",
    "open_checkpoint",
    "remove_stale_temps",
    "temp_name",
    "to_torch_state_dict",
]

SINGLE_NAME = "model.safetensors"
"""File name of an unsharded checkpoint inside a model folder (transformers' ``SAFE_WEIGHTS_NAME``)."""

INDEX_NAME = "model.safetensors.index.json"
"""File name of a sharded checkpoint's index (transformers' ``SAFE_WEIGHTS_INDEX_NAME``)."""

DEFAULT_COPY_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
"""Files :meth:`CheckpointWriter.copy_files_from` copies by default (those that exist)."""

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
_HEADER_LIMIT = 100_000_000  # safetensors' own limit on the JSON header size
_HEADER_METADATA = {"format": "pt"}
_TMP_MARK = ".landscape-tmp-"
_OLD_MARK = ".landscape-old-"


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------


def _build_dtypes() -> dict[str, np.dtype]:
    names = (
        "bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
        "float16", "float32", "float64", "complex64",
    )  # fmt: skip
    candidates = [np.dtype(n) for n in names] + [
        np.dtype(t)
        for t in (getattr(ml_dtypes, n, None) for n in ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu"))
        if t is not None
    ]
    table: dict[str, np.dtype] = {}
    for dt in candidates:
        try:
            spec = safetensors.TensorSpec(dtype=dt.name, shape=[1], data_ptr=0, data_len=dt.itemsize)
        except (safetensors.SafetensorError, ValueError, TypeError):
            continue
        table.setdefault(spec.dtype, dt)
    return table


DTYPES: Mapping[str, np.dtype] = types.MappingProxyType(_build_dtypes())
"""Safetensors dtype code (``"BF16"``, ``"F32"``, ...) -> numpy dtype, for the codes read and written here."""

_CODES = {dt: code for code, dt in DTYPES.items()}


def dtype_code(dtype: Any) -> str:
    """The safetensors code of a numpy dtype (``np.float32 -> "F32"``, ``bfloat16 -> "BF16"``).

    Raises:
        ValueError: If safetensors has no code for ``dtype`` (the accepted dtypes are listed).
    """
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    code = _CODES.get(dt)
    if code is None:
        accepted = sorted(d.name for d in DTYPES.values())
        msg = f"dtype {dt} cannot be stored in a safetensors checkpoint; accepted: {accepted}"
        raise ValueError(msg)
    return code


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Entry:
    """Where one tensor lives: file, dtype, shape and absolute byte range."""

    file: pathlib.Path
    code: str
    shape: tuple[int, ...]
    start: int
    stop: int


def _refuse_pickle(path: pathlib.Path) -> None:
    msg = (
        f"{str(path)!r} is a pickle (PyTorch .bin / .pt) checkpoint, which can run arbitrary code and "
        "is never read here; convert it to safetensors with the tools you trust, or ask its "
        "publisher for model.safetensors"
    )
    raise ValueError(msg)


def _looks_like_pickle(head: bytes) -> bool:
    """A zip container (``torch.save``) or a pickle stream (protocol 2-5) rather than a header length."""
    return head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def _read_header(path: pathlib.Path) -> tuple[dict[str, _Entry], list[str], dict[str, str]]:
    """Parse and validate a safetensors header: ``(entries, names in file order, metadata)``."""
    where = f"safetensors file {str(path)!r}"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                msg = f"{where}: too short to be a safetensors file ({size} bytes)"
                raise ValueError(msg)
            n = int.from_bytes(head, "little")
            fits = n <= _HEADER_LIMIT and 8 + n <= size
            raw = f.read(n) if fits else b""
    except OSError as e:
        msg = f"{where}: cannot be read ({e})"
        raise ValueError(msg) from e
    try:
        header = json.loads(raw) if fits and raw[:1] == b"{" else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if header is None:
        if _looks_like_pickle(head):
            _refuse_pickle(path)
        if not fits:
            msg = f"{where}: header length {n} does not fit the file ({size} bytes); not a safetensors file or truncated"
            raise ValueError(msg)
        msg = f"{where}: the header is not valid JSON; not a safetensors file"
        raise ValueError(msg)
    if not isinstance(header, dict):
        msg = f"{where}: the header is not a JSON object"
        raise ValueError(msg)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        msg = f"{where}: __metadata__ must map strings to strings"
        raise ValueError(msg)
    data_start, data_len = 8 + n, size - 8 - n
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        bad = f"{where}: tensor {name!r}"
        if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= set(info)):
            msg = f"{bad} has a malformed header entry {info!r}"
            raise ValueError(msg)
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if code not in DTYPES:
            msg = f"{bad} has dtype {code!r}, which is not supported here; supported: {sorted(DTYPES)}"
            raise ValueError(msg)
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            msg = f"{bad} has a malformed shape {shape!r}"
            raise ValueError(msg)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            msg = f"{bad} has malformed data_offsets {offsets!r}"
            raise ValueError(msg)
        begin, end = offsets
        want = math.prod(shape) * DTYPES[code].itemsize
        if not 0 <= begin <= end <= data_len or end - begin != want:
            msg = (
                f"{bad}: data_offsets {offsets} do not hold {want} bytes within the "
                f"{data_len}-byte data section (truncated or corrupt file)"
            )
            raise ValueError(msg)
        entries[name] = _Entry(path, code, tuple(shape), data_start + begin, data_start + end)
    order = sorted(entries, key=lambda k: (entries[k].start, entries[k].stop))
    pos = data_start
    for name in order:
        if entries[name].start != pos:
            msg = f"{where}: tensor {name!r} overlaps another or leaves a gap in the data section (corrupt file)"
            raise ValueError(msg)
        pos = entries[name].stop
    if pos != size:
        msg = f"{where}: {size - pos} bytes after the last tensor (corrupt file)"
        raise ValueError(msg)
    return entries, order, dict(meta)


def _map_tensor(fd: int, entry: _Entry) -> np.ndarray:
    """A read-only array over exactly the tensor's bytes (its own mapping, released with the array)."""
    dt = DTYPES[entry.code]
    if dt.kind in "biufc" and dt.itemsize > 1:
        dt = dt.newbyteorder("<")
    length = entry.stop - entry.start
    if length == 0:
        out = np.zeros(entry.shape, dt)
        out.flags.writeable = False
        return out
    gran = mmap.ALLOCATIONGRANULARITY
    base = entry.start - entry.start % gran
    mm = mmap.mmap(fd, entry.stop - base, access=mmap.ACCESS_READ, offset=base)
    return np.frombuffer(mm, dtype=dt, count=length // dt.itemsize, offset=entry.start - base).reshape(entry.shape)


class CheckpointReader:
    """A lazily read safetensors checkpoint (one file or a sharded folder); see :func:`open_checkpoint`.

    Attributes:
        path: The file or folder that was opened.
    """

    def __init__(self, path: pathlib.Path, entries: dict[str, _Entry], order: list[str], meta: dict[str, str]) -> None:
        self.path = path
        self._entries = entries
        self._order = order
        self._meta = meta
        self._fds: dict[pathlib.Path, int] = {}
        self._closed = False

    def __repr__(self) -> str:
        files = len({e.file for e in self._entries.values()})
        return f"CheckpointReader({str(self.path)!r}, tensors={len(self._order)}, files={files})"

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def _entry(self, name: str) -> _Entry:
        if self._closed:
            msg = f"checkpoint {str(self.path)!r} is closed"
            raise ValueError(msg)
        entry = self._entries.get(name)
        if entry is None:
            near = [k for k in self._order if k.split(".")[-1] == str(name).split(".")[-1]][:5]
            msg = f"checkpoint {str(self.path)!r} has no tensor {name!r} (it holds {len(self._order)} tensors, e.g. {near or self._order[:5]})"
            raise ValueError(msg)
        return entry

    def keys(self) -> list[str]:
        """Tensor names: file order for one file, the index's order for a sharded checkpoint."""
        return list(self._order)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` (from the header; reads no data)."""
        return self._entry(name).shape

    def dtype(self, name: str) -> str:
        """Safetensors dtype code of tensor ``name`` (``"BF16"``, ``"F16"``, ``"F32"``, ``"I64"``, ...)."""
        return self._entry(name).code

    def nbytes(self, name: str) -> int:
        """Size of tensor ``name``'s data in bytes."""
        e = self._entry(name)
        return e.stop - e.start

    def file(self, name: str) -> pathlib.Path:
        """The file that holds tensor ``name``."""
        return self._entry(name).file

    def get(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a read-only, memory-mapped numpy array (bit exact; ``.copy()`` to modify).

        Only this tensor's byte range is mapped; the mapping is released when the array (and every
        view of it) is garbage collected. bf16 comes back as ``ml_dtypes.bfloat16``.
        """
        entry = self._entry(name)
        fd = self._fds.get(entry.file)
        if fd is None:
            try:
                fd = os.open(entry.file, os.O_RDONLY)
            except OSError as e:
                msg = f"checkpoint {str(self.path)!r}: cannot open {str(entry.file)!r} ({e})"
                raise ValueError(msg) from e
            self._fds[entry.file] = fd
        if os.fstat(fd).st_size < entry.stop:  # mapping past the end would crash with SIGBUS on access
            msg = f"checkpoint file {str(entry.file)!r} shrank after it was opened (truncated); tensor {name!r} is gone"
            raise ValueError(msg)
        return _map_tensor(fd, entry)

    def metadata(self) -> dict[str, str]:
        """Header metadata (``__metadata__``) of the file; of the first shard for a sharded checkpoint."""
        return dict(self._meta)

    def close(self) -> None:
        """Close the files. Arrays already returned by :meth:`get` stay valid (they own their mappings)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._closed = True

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown; never raise from a finaliser
            pass


def _open_index(index_path: pathlib.Path) -> CheckpointReader:
    folder = index_path.parent
    where = f"checkpoint index {str(index_path)!r}"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        msg = f"{where} is not readable JSON ({e})"
        raise ValueError(msg) from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        msg = f'{where} has no "weight_map" object of tensor name -> shard file'
        raise ValueError(msg)
    if not weight_map:
        msg = f"{where} lists no tensors"
        raise ValueError(msg)
    shards: dict[str, tuple[dict[str, _Entry], list[str], dict[str, str]]] = {}
    for shard in dict.fromkeys(weight_map.values()):
        if shard != pathlib.PurePosixPath(shard).name or shard in ("", ".", "..") or "\\" in shard:
            msg = f"{where} names shard {shard!r}, which is not a plain file name in {str(folder)!r}"
            raise ValueError(msg)
        shard_path = folder / shard
        if not shard_path.is_file():
            msg = f"{where} names shard file {shard!r}, which is missing from {str(folder)!r}"
            raise ValueError(msg)
        if shard_path.suffix.lower() in _PICKLE_SUFFIXES:
            _refuse_pickle(shard_path)
        shards[shard] = _read_header(shard_path)
    entries: dict[str, _Entry] = {}
    for name, shard in weight_map.items():
        found = shards[shard][0].get(name)
        if found is None:
            msg = f"{where} lists tensor {name!r} in shard {shard!r}, but {str(folder / shard)!r} does not hold it"
            raise ValueError(msg)
        entries[name] = found
    for shard, (shard_entries, _, _) in shards.items():
        extra = sorted(set(shard_entries) - {k for k, v in weight_map.items() if v == shard})
        if extra:
            msg = f"shard {str(folder / shard)!r} holds tensor {extra[0]!r}, which {where} does not assign to it"
            raise ValueError(msg)
    first = shards[next(iter(shards))][2]
    return CheckpointReader(index_path if index_path.name != INDEX_NAME else folder, entries, list(weight_map), first)


def open_checkpoint(path: str | os.PathLike[str]) -> CheckpointReader:
    """Open a safetensors checkpoint for lazy, tensor-by-tensor reading.

    Args:
        path: A ``.safetensors`` file; or a folder holding ``model.safetensors`` (read first, as
            transformers does) or ``model.safetensors.index.json`` with its shards
            (``{"metadata": {"total_size": N}, "weight_map": {name: shard_file}}``).

    Returns:
        A :class:`CheckpointReader` (also a context manager). Only headers have been read.

    Raises:
        FileNotFoundError: If nothing exists at ``path``.
        ValueError: On an unknown folder layout, a pickle checkpoint, a corrupt or truncated file,
            an index naming a missing shard or a tensor its shard lacks; the message names the file.
    """
    path = pathlib.Path(path)
    if not os.path.lexists(path):
        msg = f"no checkpoint at {str(path)!r}"
        raise FileNotFoundError(msg)
    if path.is_dir():
        if (path / SINGLE_NAME).is_file():
            entries, order, meta = _read_header(path / SINGLE_NAME)
            return CheckpointReader(path, entries, order, meta)
        if (path / INDEX_NAME).is_file():
            return _open_index(path / INDEX_NAME)
        pickles = [n for n in _PICKLE_NAMES if (path / n).exists()]
        if pickles:
            _refuse_pickle(path / pickles[0])
        present = sorted(p.name for p in path.iterdir())[:10]
        msg = (
            f"folder {str(path)!r} holds neither {SINGLE_NAME!r} nor {INDEX_NAME!r} "
            f"(it holds {present}); not a Hugging Face safetensors model folder"
        )
        raise ValueError(msg)
    if not path.is_file():
        msg = f"{str(path)!r} is not a regular file or folder"
        raise ValueError(msg)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        _refuse_pickle(path)
    if path.name.endswith(".index.json"):
        if path.name.removesuffix(".index.json").lower().endswith(_PICKLE_SUFFIXES):
            _refuse_pickle(path)
        return _open_index(path)
    entries, order, meta = _read_header(path)
    return CheckpointReader(path, entries, order, meta)


# --------------------------------------------------------------------------------------------
# temporary files and folders
# --------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temp_name(target: pathlib.Path) -> pathlib.Path:
    """A fresh, recognisable temporary path beside ``target``: ``.<name>.landscape-tmp-<pid>-<random>``."""
    return target.parent / f".{target.name}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"


def remove_stale_temps(target: pathlib.Path) -> list[pathlib.Path]:
    """Remove temporaries beside ``target`` left by writers that were killed (their process is gone).

    A temporary is named ``.<target name>.landscape-tmp-<pid>-<random>`` (see :func:`temp_name`);
    one whose ``pid`` is no longer running is removed, as is a ``.landscape-old-`` folder of an
    interrupted overwrite. Temporaries of live processes (a concurrent save) are left alone.

    Returns:
        The paths removed.
    """
    removed = []
    pattern = re.compile(re.escape(f".{target.name}") + r"\.landscape-(tmp|old)-(\d+)-[0-9a-f]+(\.tmp)?$")
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = pattern.match(p.name)
        if m is None or _pid_alive(int(m.group(2))):
            continue
        try:
            if m.group(1) == "old" and not os.path.lexists(target):
                os.replace(p, target)  # an overwrite died between its two renames: restore the old folder
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except FileNotFoundError:
            continue
        removed.append(p)
    return removed


_RENAME_EXCHANGE = 2


@functools.cache
def _renameat2() -> Any:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` if unsupported."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _fsync_dir(folder: pathlib.Path) -> None:
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        msg = f"tensor names must be non-empty strings, got {name!r}"
        raise ValueError(msg)
    if name == "__metadata__":
        msg = "cannot write a tensor named '__metadata__': safetensors reserves that header key"
        raise ValueError(msg)
    return name


class CheckpointWriter:
    """Write a Hugging Face style safetensors model folder, streamed shard by shard, atomically.

    Tensors are written into a temporary folder beside ``out_dir``; each shard is serialised as
    soon as adding the next tensor would exceed ``max_shard_bytes`` (a tensor larger than that gets
    a shard of its own, as in ``huggingface_hub.split_torch_state_dict_into_shards``), so at most
    one shard is held in memory. On a clean ``__exit__`` the shards are named
    ``model-0000i-of-0000N.safetensors`` with ``model.safetensors.index.json``
    (``{"metadata": {"total_size": bytes}, "weight_map": {name: shard}}``, names sorted, 2-space
    indent like transformers) or, for one shard, ``model.safetensors``; then the folder is moved
    into place (an existing one, with ``overwrite=True``, is swapped out atomically where the OS
    allows and then removed). On an exception nothing is left but any previous ``out_dir``.

    Args:
        out_dir: The model folder to create.
        max_shard_bytes: Largest shard data size in bytes (default 5 GiB, transformers' default).
        metadata: Extra header metadata ``{str: str}`` for every file; ``"format": "pt"`` is always
            written (plain string, as transformers checks) and cannot be overridden.
        overwrite: Replace an existing ``out_dir`` (a folder) instead of refusing.

    Raises:
        ValueError: If ``out_dir`` exists (without ``overwrite``) or is not a folder, on bad
            metadata, a duplicate or reserved tensor name, or an unstorable dtype, before writing.

    Example:
        >>> import tempfile, pathlib, numpy as np
        >>> from landscape.checkpoints import CheckpointWriter
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "merged"
        >>> with CheckpointWriter(out) as w:
        ...     w.add("lm_head.weight", np.zeros((3, 2), np.float16))
        >>> [p.name for p in out.iterdir()]
        ['model.safetensors']
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        max_shard_bytes: int = 5 * 2**30,
        metadata: Mapping[str, str] | None = None,
        overwrite: bool = False,
    ) -> None:
        self.out_dir = pathlib.Path(out_dir)
        if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
            msg = f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}"
            raise ValueError(msg)
        if not isinstance(overwrite, bool):
            msg = f"overwrite must be a bool, got {overwrite!r}"
            raise ValueError(msg)
        self.max_shard_bytes = max_shard_bytes
        self.overwrite = overwrite
        self._header = {**_HEADER_METADATA, **self._check_metadata(metadata)}
        self._check_target()
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.out_dir)
        self._tmp = temp_name(self.out_dir)
        self._tmp.mkdir()
        self._names: set[str] = set()
        self._pending: list[tuple[str, np.ndarray]] = []
        self._pending_bytes = 0
        self._shards: list[tuple[pathlib.Path, list[str]]] = []
        self._total = 0
        self._copied: set[str] = set()
        self._state = "open"

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
        if metadata is None:
            return {}
        if not isinstance(metadata, Mapping):
            msg = f"metadata must be a dict of str -> str, got {type(metadata).__name__}"
            raise ValueError(msg)
        for k, v in metadata.items():
            if not isinstance(k, str) or not k or not isinstance(v, str):
                msg = f"metadata must map non-empty str keys to str values, got {k!r}: {v!r}"
                raise ValueError(msg)
            if k == "format":
                msg = "metadata key 'format' is reserved: every file carries format 'pt'"
                raise ValueError(msg)
        return dict(metadata)

    def _check_target(self) -> None:
        out = self.out_dir
        if os.path.lexists(out):
            mode = os.lstat(out).st_mode
            if not stat.S_ISDIR(mode):
                kind = "symlink" if stat.S_ISLNK(mode) else "file"
                msg = f"output {str(out)!r} exists and is a {kind}, not a model folder; refusing to replace it"
                raise ValueError(msg)
            if not self.overwrite:
                msg = f"output folder {str(out)!r} already exists; pass overwrite=True to replace it"
                raise ValueError(msg)
        elif os.path.lexists(out.parent) and not out.parent.is_dir():
            msg = f"cannot create {str(out)!r}: its parent is not a folder"
            raise ValueError(msg)

    def _check_open(self) -> None:
        if self._state != "open":
            msg = f"checkpoint writer for {str(self.out_dir)!r} is {self._state}; nothing more can be added"
            raise ValueError(msg)

    # ------------------------------------------------------------------ adding
    def add(self, name: str, array: Any) -> None:
        """Queue tensor ``name`` for the current shard, writing the shard first if it would overflow.

        The array is copied unless it is a read-only array (e.g. from :meth:`CheckpointReader.get`),
        so later changes by the caller do not reach the file.
        """
        self._check_open()
        _check_name(name)
        if name in self._names:
            msg = f"tensor {name!r} was already added to {str(self.out_dir)!r}"
            raise ValueError(msg)
        try:
            arr = np.asarray(array)
            dtype_code(arr.dtype)
        except (TypeError, ValueError) as e:
            msg = f"cannot write tensor {name!r}: {e}"
            raise ValueError(msg) from e
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        if arr.flags.writeable or not arr.flags.c_contiguous:
            arr = np.array(arr, order="C", copy=True)
        size = arr.nbytes
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._names.add(name)
        self._pending.append((name, arr))
        self._pending_bytes += size
        self._total += size
        if self._pending_bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        path = self._tmp / f"shard-{len(self._shards) + 1:05d}.safetensors"
        specs = {
            name: safetensors.TensorSpec(
                dtype=arr.dtype.name, shape=list(arr.shape), data_ptr=arr.ctypes.data, data_len=arr.nbytes
            )
            for name, arr in self._pending
        }
        # serialize_file streams header and tensors to disk: no second in-memory copy of the shard
        safetensors.serialize_file(specs, path, metadata=dict(self._header))
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        self._shards.append((path, [n for n, _ in self._pending]))
        self._pending = []
        self._pending_bytes = 0

    def copy_files_from(
        self, source_dir: str | os.PathLike[str], names: Sequence[str] = DEFAULT_COPY_FILES
    ) -> list[str]:
        """Copy ``config.json``, tokenizer files and the like from ``source_dir`` (those that exist).

        Returns:
            The names copied.

        Raises:
            ValueError: If ``source_dir`` is not a folder, a name is not a plain file name or would
                clash with the weight files.
        """
        self._check_open()
        src = pathlib.Path(source_dir)
        if not src.is_dir():
            msg = f"copy_files_from: source {str(src)!r} is not a folder"
            raise ValueError(msg)
        if isinstance(names, str):
            names = (names,)
        copied = []
        for name in names:
            if not isinstance(name, str) or name != pathlib.PurePosixPath(name).name or name in ("", ".", ".."):
                msg = f"copy_files_from: {name!r} is not a plain file name"
                raise ValueError(msg)
            if name == SINGLE_NAME or name == INDEX_NAME or name.endswith(".safetensors"):
                msg = f"copy_files_from: {name!r} would clash with the weight files written here"
                raise ValueError(msg)
            if (src / name).is_file():
                shutil.copyfile(src / name, self._tmp / name)
                self._copied.add(name)
                copied.append(name)
        return copied

    # ------------------------------------------------------------------ finishing
    def finish(self) -> pathlib.Path:
        """Write the last shard and the index and move the folder into place (what a clean
        ``__exit__`` does); on any error everything is discarded and the error re-raised.

        Returns:
            ``out_dir``.
        """
        self._check_open()
        try:
            self._finish()
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        return self.out_dir

    def _finish(self) -> None:
        self._flush()
        if not self._shards:
            msg = f"no tensors were added; refusing to write an empty checkpoint to {str(self.out_dir)!r}"
            raise ValueError(msg)
        n = len(self._shards)
        if n == 1:
            os.replace(self._shards[0][0], self._tmp / SINGLE_NAME)
        else:
            weight_map: dict[str, str] = {}
            for i, (path, names) in enumerate(self._shards, start=1):
                final = f"model-{i:05d}-of-{n:05d}.safetensors"
                os.replace(path, self._tmp / final)
                weight_map.update(dict.fromkeys(names, final))
            index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))}
            with open(self._tmp / INDEX_NAME, "w", encoding="utf-8") as f:
                f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
                f.flush()
                os.fsync(f.fileno())
        _fsync_dir(self._tmp)
        self._check_target()
        if os.path.lexists(self.out_dir):
            old = self.out_dir.parent / f".{self.out_dir.name}{_OLD_MARK}{os.getpid()}-{secrets.token_hex(4)}"
            if _exchange(self._tmp, self.out_dir):
                shutil.rmtree(self._tmp, ignore_errors=True)  # now the previous folder
            else:
                os.replace(self.out_dir, old)
                os.replace(self._tmp, self.out_dir)
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self._tmp, self.out_dir)
        _fsync_dir(self.out_dir.parent)

    def abort(self) -> None:
        """Discard everything written so far (the temporary folder); any existing ``out_dir`` stays."""
        self._pending = []
        if self._state == "open":
            self._state = "aborted"
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self._state != "open":
            return
        if exc_type is not None:
            self.abort()
            return
        self.finish()

    def __del__(self) -> None:
        # a writer dropped without finish(): discard its temporary folder (nothing was promised)
        try:
            if getattr(self, "_state", None) == "open":
                self.abort()
        except Exception:  # noqa: BLE001 - interpreter shutdown; never raise from a finaliser
            pass


# --------------------------------------------------------------------------------------------
# name and layout mapping
# --------------------------------------------------------------------------------------------


def _kernel_to_torch(a: np.ndarray) -> np.ndarray:
    n = a.ndim
    return np.ascontiguousarray(np.transpose(a, (n - 1, n - 2, *range(n - 2))))


def _kernel_from_torch(a: np.ndarray) -> np.ndarray:
    n = a.ndim
    return np.ascontiguousarray(np.transpose(a, (*range(2, n), 1, 0)))


def _identity(a: np.ndarray) -> np.ndarray:
    return a


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one kind of tensor is laid out in PyTorch vs Flax.

    Attributes:
        name: A label for messages.
        to_torch: Flax array -> PyTorch array.
        from_torch: PyTorch array -> Flax array (the inverse of ``to_torch``).
        ndims: The numbers of dimensions the layout accepts (``None``: any).
    """

    name: str
    to_torch: Callable[[np.ndarray], np.ndarray]
    from_torch: Callable[[np.ndarray], np.ndarray]
    ndims: tuple[int, ...] | None = None


LAYOUTS: Mapping[str, Layout] = types.MappingProxyType(
    {
        "identity": Layout("identity", _identity, _identity),
        "kernel": Layout("kernel", _kernel_to_torch, _kernel_from_torch, (2, 3, 4, 5)),
    }
)
"""Built-in layouts: ``"identity"``; ``"kernel"``: Flax ``(*spatial, in, out)`` <-> PyTorch ``(out, in, *spatial)``."""

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(\*?)\}")
COLLECTIONS = ("params", "state")


@functools.cache
def _compile(pattern: str, sep: str) -> tuple[re.Pattern[str], dict[str, bool]]:
    esc = re.escape(sep)
    seg = f"[^{esc}]+"
    groups: dict[str, bool] = {}
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(pattern):
        out.append(re.escape(pattern[pos : m.start()]))
        name, multi = m.group(1), bool(m.group(2))
        if name in groups:
            msg = f"pattern {pattern!r} uses placeholder {{{name}}} twice"
            raise ValueError(msg)
        groups[name] = multi
        out.append(f"(?P<{name}>{seg}(?:{esc}{seg})*)" if multi else f"(?P<{name}>{seg})")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out) + r"\Z"), groups


def _fill(pattern: str, values: dict[str, str]) -> str:
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], pattern)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One name-and-layout correspondence between a Flax key path and a PyTorch ``state_dict`` key.

    Patterns may hold placeholders: ``{i}`` matches one path component, ``{path*}`` one or more
    (``/``-separated on the Flax side, ``.``-separated on the PyTorch side); both sides must use
    the same placeholders. E.g. ``Rule("layers/{i}/kernel", "layers.{i}.weight", layout="kernel")``.

    Attributes:
        flax: Flax key-path pattern (components joined by ``/``, as :func:`landscape.tree.key_name`).
        torch: PyTorch ``state_dict`` key pattern.
        layout: A name in :data:`LAYOUTS` or a :class:`Layout`.
        collection: ``"params"`` (trainable) or ``"state"`` (e.g. BatchNorm running statistics).
    """

    flax: str
    torch: str
    layout: str | Layout = "identity"
    collection: str = "params"

    def __post_init__(self) -> None:
        for side in ("flax", "torch"):
            if not isinstance(getattr(self, side), str) or not getattr(self, side):
                msg = f"Rule.{side} must be a non-empty string, got {getattr(self, side)!r}"
                raise ValueError(msg)
        if self.collection not in COLLECTIONS:
            msg = f"Rule collection {self.collection!r} is unknown; accepted: {list(COLLECTIONS)}"
            raise ValueError(msg)
        if isinstance(self.layout, str) and self.layout not in LAYOUTS:
            msg = f"Rule layout {self.layout!r} is unknown; accepted: {sorted(LAYOUTS)} or a Layout"
            raise ValueError(msg)
        if not isinstance(self.layout, (str, Layout)):
            msg = f"Rule layout must be a name in {sorted(LAYOUTS)} or a Layout, got {self.layout!r}"
            raise ValueError(msg)
        (_, gf), (_, gt) = _compile(self.flax, "/"), _compile(self.torch, ".")
        if gf != gt:
            msg = f"Rule {self.flax!r} <-> {self.torch!r}: both sides must use the same placeholders, got {gf} and {gt}"
            raise ValueError(msg)

    @property
    def layout_obj(self) -> Layout:
        return LAYOUTS[self.layout] if isinstance(self.layout, str) else self.layout

    def match_flax(self, name: str) -> str | None:
        """The PyTorch key for Flax path ``name``, or ``None`` if the rule does not apply."""
        return self._translate(name, self.flax, "/", self.torch, ".")

    def match_torch(self, name: str) -> str | None:
        """The Flax path for PyTorch key ``name``, or ``None`` if the rule does not apply."""
        return self._translate(name, self.torch, ".", self.flax, "/")

    @staticmethod
    def _translate(name: str, src: str, src_sep: str, dst: str, dst_sep: str) -> str | None:
        regex, groups = _compile(src, src_sep)
        m = regex.match(name)
        if m is None:
            return None
        raw = m.groupdict()
        if any(dst_sep in v for v in raw.values()):  # "a.b" as one Flax component: no unique inverse
            return None
        return _fill(dst, {k: (v.replace(src_sep, dst_sep) if groups[k] else v) for k, v in raw.items()})


@dataclasses.dataclass(frozen=True)
class LayoutMapping:
    """An ordered list of :class:`Rule`; the first rule that matches a name (and whose layout
    accepts the tensor's number of dimensions) decides, in either direction.

    Attributes:
        rules: The rules, most specific first.
        drop_torch: ``fnmatch``-style patterns of PyTorch keys to ignore on import (default:
            BatchNorm's ``*num_batches_tracked``).
    """

    rules: tuple[Rule, ...]
    drop_torch: tuple[str, ...] = ("*num_batches_tracked",)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))
        object.__setattr__(self, "drop_torch", tuple(self.drop_torch))
        if not self.rules or not all(isinstance(r, Rule) for r in self.rules):
            msg = f"LayoutMapping needs a non-empty sequence of Rule, got {self.rules!r}"
            raise ValueError(msg)

    def to_torch_name(self, name: str, ndim: int, collection: str = "params") -> tuple[str, Layout]:
        """PyTorch key and layout of Flax leaf ``name`` (``ndim`` dimensions, in ``collection``)."""
        for rule in self.rules:
            if rule.collection != collection:
                continue
            target = rule.match_flax(name)
            if target is not None and _fits(rule.layout_obj, ndim):
                return target, rule.layout_obj
        msg = f"{collection} leaf {name!r} ({ndim}-d) matches no rule of the layout mapping; add a Rule for it"
        raise ValueError(msg)

    def from_torch_name(self, name: str, ndim: int) -> tuple[str, str, Layout]:
        """Flax path, collection and layout of PyTorch key ``name`` (``ndim`` dimensions)."""
        for rule in self.rules:
            target = rule.match_torch(name)
            if target is not None and _fits(rule.layout_obj, ndim):
                return target, rule.collection, rule.layout_obj
        msg = f"PyTorch tensor {name!r} ({ndim}-d) matches no rule of the layout mapping; add a Rule for it"
        raise ValueError(msg)

    def dropped(self, name: str) -> bool:
        """Whether PyTorch key ``name`` is ignored on import."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.drop_torch)


def _convert(layout: Layout, direction: str, arr: np.ndarray, what: str) -> np.ndarray:
    try:
        out = getattr(layout, direction)(arr)
    except (ValueError, TypeError, IndexError) as e:
        msg = f"{what} of shape {arr.shape} does not fit layout {layout.name!r} ({e})"
        raise ValueError(msg) from e
    out = np.asarray(out)
    if out.size != arr.size or out.dtype != arr.dtype:
        msg = f"layout {layout.name!r} turned {what} {arr.shape} {arr.dtype} into {out.shape} {out.dtype}; a layout only rearranges"
        raise ValueError(msg)
    return out


def _fits(layout: Layout, ndim: int) -> bool:
    return layout.ndims is None or ndim in layout.ndims


ZOO_RULES: tuple[Rule, ...] = (
    Rule("{path*}/kernel", "{path*}.weight", layout="kernel"),
    Rule("{path*}/scale", "{path*}.weight"),
    Rule("{path*}/bias", "{path*}.bias"),
    Rule("{path*}/mean", "{path*}.running_mean", collection="state"),
    Rule("{path*}/var", "{path*}.running_var", collection="state"),
)
"""Rules for the zoo (MLP, CNN, ResNet) and any model built from Linear / Conv / LayerNorm / BatchNorm."""

ZOO_MAPPING = LayoutMapping(ZOO_RULES)
"""The :class:`LayoutMapping` of :data:`ZOO_RULES`."""


def _flat_leaves(tree: Any, what: str, *, template: bool = False) -> list[tuple[str, Any]]:
    """``(name, array)`` of a nested dict (or any pytree, via key paths) of arrays."""
    import jax

    from landscape.tree import key_name

    if tree is None:
        return []
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out.append((key_name(path), leaf if template else np.asarray(leaf)))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        msg = f"{what} has two leaves with the same key-path name"
        raise ValueError(msg)
    return out


def to_torch_state_dict(
    params: Any, state: Any = None, *, mapping: LayoutMapping = ZOO_MAPPING
) -> dict[str, np.ndarray]:
    """Flax/NNX ``params`` (and ``state``) as a PyTorch-style ``state_dict`` of numpy arrays.

    Args:
        params: Params pytree, e.g. from :func:`landscape.models.functional`.
        state: Non-trainable variables (BatchNorm running statistics), or ``None`` / ``{}``.
        mapping: The :class:`LayoutMapping` (default :data:`ZOO_MAPPING`).

    Returns:
        ``{torch_key: array}`` in the params' leaf order, then the state's; layouts converted
        (contiguous copies), dtypes kept.

    Raises:
        ValueError: If a leaf matches no rule, its layout does not accept its shape, or two leaves
            map to the same PyTorch key; the message names the leaf.

    Example:
        >>> import numpy as np
        >>> from landscape.checkpoints import to_torch_state_dict
        >>> sd = to_torch_state_dict({"layers": {"0": {"kernel": np.zeros((3, 2)), "bias": np.zeros(2)}}})
        >>> {k: v.shape for k, v in sd.items()}
        {'layers.0.bias': (2,), 'layers.0.weight': (2, 3)}
    """
    out: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for collection, tree in (("params", params), ("state", state)):
        for name, arr in _flat_leaves(tree, collection):
            key, layout = mapping.to_torch_name(name, arr.ndim, collection)
            if key in out:
                msg = f"{collection} leaf {name!r} and {origin[key]!r} both map to PyTorch key {key!r}"
                raise ValueError(msg)
            out[key] = _convert(layout, "to_torch", arr, f"{collection} leaf {name!r}")
            origin[key] = name
    return out


def _nest(flat: dict[str, np.ndarray], what: str) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for name, value in flat.items():
        parts = name.split("/")
        node = root
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                msg = f"{what} path {'/'.join(parts[: i + 1])!r} is both a tensor and a prefix of {name!r}"
                raise ValueError(msg)
            node = child
        if parts[-1] in node:
            msg = f"{what} path {name!r} collides with another tensor's path"
            raise ValueError(msg)
        node[parts[-1]] = value
    return root


def from_torch_state_dict(
    state_dict: Mapping[str, Any] | CheckpointReader,
    *,
    mapping: LayoutMapping = ZOO_MAPPING,
    like: tuple[Any, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A PyTorch-style ``state_dict`` (or an opened checkpoint) as Flax/NNX ``(params, state)``.

    Args:
        state_dict: ``{torch_key: array}`` or a :class:`CheckpointReader`.
        mapping: The :class:`LayoutMapping` (default :data:`ZOO_MAPPING`).
        like: Optional ``(params, state)`` template (e.g. from :func:`landscape.models.functional`
            or ``jax.eval_shape``): every leaf must then be present with the template's shape and
            dtype, and nothing else.

    Returns:
        ``(params, state)`` as nested dicts with string keys (``params["layers"]["0"]["kernel"]``),
        exactly the structure :func:`landscape.models.functional` produces; ``state`` is ``{}``
        when there is none. Leaves keep the stored dtypes; identity-layout leaves read from a
        :class:`CheckpointReader` are its read-only memory-mapped arrays (``jax.device_put``
        or ``.copy()`` them as needed).

    Raises:
        ValueError: If a key matches no rule (and is not dropped), its shape does not fit the
            layout or the template, a template leaf is missing, or two keys map to one leaf; the
            message names the tensor.
    """
    flat: dict[str, dict[str, np.ndarray]] = {"params": {}, "state": {}}
    origin: dict[tuple[str, str], str] = {}
    names = state_dict.keys() if isinstance(state_dict, CheckpointReader) else list(state_dict)
    for key in names:
        if not isinstance(key, str):
            msg = f"state_dict keys must be strings, got {key!r}"
            raise ValueError(msg)
        if mapping.dropped(key):
            continue
        arr = state_dict.get(key) if isinstance(state_dict, CheckpointReader) else np.asarray(state_dict[key])
        path, collection, layout = mapping.from_torch_name(key, arr.ndim)
        if path in flat[collection]:
            msg = f"PyTorch tensors {origin[(collection, path)]!r} and {key!r} both map to {collection} leaf {path!r}"
            raise ValueError(msg)
        flat[collection][path] = _convert(layout, "from_torch", arr, f"PyTorch tensor {key!r}")
        origin[(collection, path)] = key
    if like is not None:
        for collection, template in zip(COLLECTIONS, like):
            _check_like(flat[collection], _flat_leaves(template, collection, template=True), collection, origin)
    return _nest(flat["params"], "params"), _nest(flat["state"], "state")


def _check_like(
    got: dict[str, np.ndarray], want: list[tuple[str, Any]], collection: str, origin: dict[tuple[str, str], str]
) -> None:
    names = {n for n, _ in want}
    for name, tmpl in want:
        if name not in got:
            msg = f"the state_dict has no tensor for {collection} leaf {name!r} (shape {tuple(np.shape(tmpl))})"
            raise ValueError(msg)
        arr = got[name]
        src = origin[(collection, name)]
        shape, dtype = tuple(np.shape(tmpl)), np.dtype(getattr(tmpl, "dtype", None) or np.asarray(tmpl).dtype)
        if arr.shape != shape:
            msg = f"PyTorch tensor {src!r} gives {collection} leaf {name!r} shape {arr.shape}; the model needs {shape}"
            raise ValueError(msg)
        if arr.dtype != dtype:
            msg = f"PyTorch tensor {src!r} has dtype {arr.dtype}; {collection} leaf {name!r} needs {dtype}"
            raise ValueError(msg)
    extra = sorted(set(got) - names)
    if extra:
        msg = f"PyTorch tensor {origin[(collection, extra[0])]!r} maps to {collection} leaf {extra[0]!r}, which the model does not have"
        raise ValueError(msg)
