"""Checkpoints of parameter pytrees as ``.safetensors`` or ``.npz`` files, with metadata; never pickle.

``save(path, params, metadata=...)`` writes every leaf as one named tensor, the name being its key
path (:func:`landscape.tree.key_name`, e.g. ``"layers/0/kernel"``), together with a JSON record of
the tree structure (dicts with ``str`` or ``int`` keys in their insertion order, lists, tuples,
``None``), so ``load(path)`` rebuilds nested dicts / lists exactly. ``load(path, like=template)``
instead takes the structure from ``template`` (any pytree, e.g. an ``nnx.State`` or the output of
``jax.eval_shape``) and checks key paths, shapes and dtypes against it.

Formats, chosen by the suffix:

* ``.safetensors`` (https://github.com/huggingface/safetensors): tensors in the file body; user
  metadata as header entries, strings as they are (``{"format": "pt"}`` reads back in any
  safetensors tool as ``"pt"``, as transformers expects) and numbers / booleans as JSON text, the
  structure record (which also lists the string-valued keys, so ``"1"`` stays a string) under the
  reserved header key ``"__landscape__"``. A leaf may not be named ``"__metadata__"`` (the header
  key safetensors reserves). Supports bool, (u)int8-64, float16/32/64, bfloat16, the float8 types
  and complex64.
* ``.npz``: one ``.npy`` entry per tensor, written and read with ``allow_pickle=False``, and the
  record (structure, metadata, and the true dtype of ml_dtypes leaves such as bfloat16, which are
  stored as same-width unsigned integers) as UTF-8 JSON bytes in the entry ``"__landscape__"``.

The record also holds a CRC-32 of every tensor, checked on load, so a corrupted data byte is
caught even in safetensors (which has no checksum of its own). Round trips are bit-exact and keep
dtypes. Loaded leaves are host ``numpy.ndarray`` s (exact for
every dtype, including float64 when JAX runs without x64); wrap with ``jax.device_put`` to move them
to a device. Python scalars among the leaves are stored as NumPy would store them (a float becomes a
0-d float64 array). Writes are atomic (temporary file in the target folder, ``fsync``,
``os.replace``): a crash or error mid-write leaves any previous file intact. The temporary file is
named ``.<name>.landscape-tmp-<pid>-<random>.tmp``; one left by a process that was killed (its pid
no longer runs) is removed by the next save to the same target. Files written by other
tools load too: without a structure record, tensor names are split on ``"/"`` into nested dicts.
For Hugging Face / PyTorch model folders (sharded, read lazily tensor by tensor, written as
transformers expects, PyTorch <-> Flax layouts) see :mod:`landscape.checkpoints`, whose main names
are re-exported here.

Example:
    >>> import tempfile, pathlib, numpy as np
    >>> from landscape import io
    >>> params = {"layers": [{"kernel": np.ones((2, 3), np.float32), "bias": np.zeros(3, np.float32)}]}
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "model.safetensors"
    >>> _ = io.save(path, params, metadata={"step": 100, "seed": 0})
    >>> loaded, meta = io.load(path)
    >>> loaded["layers"][0]["kernel"].shape, meta
    ((2, 3), {'seed': 0, 'step': 100})
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import stat
import zipfile
import zlib
from collections.abc import Callable, Mapping
from typing import IO, Any

import jax
import ml_dtypes
import numpy as np
import safetensors
from jax.tree_util import DictKey, SequenceKey

from landscape._types import Params
from landscape.checkpoints import (
    CheckpointReader,
    CheckpointWriter,
    LayoutMapping,
    Rule,
    from_torch_state_dict,
    open_checkpoint,
    remove_stale_temps,
    temp_name,
    to_torch_state_dict,
)
from landscape.tree import key_name, named_leaves

__all__ = [
    "FORMATS",
    "CheckpointReader",
    "CheckpointWriter",
    "LayoutMapping",
    "Rule",
    "from_torch_state_dict",
    "load",
    "open_checkpoint",
    "read_metadata",
    "save",
    "to_torch_state_dict",
]

FORMATS = (".safetensors", ".npz")
"""Accepted file suffixes."""

_RECORD = "__landscape__"
_SAFETENSORS_RESERVED = "__metadata__"
_FORMAT = "landscape.io"
_VERSION = 1
_MetaValue = str | int | float | bool

# ml_dtypes types that .npy cannot describe (they would come back as raw void bytes).
_ML_DTYPES = {
    np.dtype(t).name: np.dtype(t)
    for t in (
        getattr(ml_dtypes, n, None)
        for n in (
            "bfloat16",
            "float8_e3m4",
            "float8_e4m3",
            "float8_e4m3b11fnuz",
            "float8_e4m3fn",
            "float8_e4m3fnuz",
            "float8_e5m2",
            "float8_e5m2fnuz",
            "float8_e8m0fnu",
            "int2",
            "int4",
            "uint2",
            "uint4",
        )
    )
    if t is not None
}


# --------------------------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------------------------


@functools.cache
def _safetensors_codes() -> dict[str, np.dtype]:
    """Safetensors dtype code (``"BF16"``) -> numpy dtype, for every dtype the library accepts."""
    candidates = [
        np.dtype(t)
        for t in (np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64)
        + (np.uint64, np.float16, np.float32, np.float64, np.complex64)
    ] + list(_ML_DTYPES.values())
    codes: dict[str, np.dtype] = {}
    for dt in candidates:
        code = _safetensors_code(dt)
        if code is not None:
            codes[code] = dt
    return codes


def _safetensors_code(dt: np.dtype) -> str | None:
    try:
        spec = safetensors.TensorSpec(dtype=dt.name, shape=[1], data_ptr=0, data_len=dt.itemsize)
    except safetensors.SafetensorError:
        return None
    return spec.dtype


def _storable(dt: np.dtype) -> bool:
    return dt.kind in "biufc" or dt.name in _ML_DTYPES


# --------------------------------------------------------------------------------------------
# structure record
# --------------------------------------------------------------------------------------------


def _encode(node: Any, path: tuple[Any, ...], leaves: list[tuple[str, Any]]) -> Any:
    """JSON description of ``node``; appends ``(name, leaf)`` for every leaf under it."""
    if node is None:
        return {"none": None}
    kind = type(node)
    if kind is dict:
        items = []
        for k, v in node.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                msg = (
                    f"cannot save dict key {k!r} ({type(k).__name__}) under "
                    f"{key_name(path)!r}: only str and int keys are stored"
                )
                raise ValueError(msg)
            items.append([k, _encode(v, (*path, DictKey(k)), leaves)])
        return {"dict": items}
    if kind is list or kind is tuple:
        return {kind.__name__: [_encode(v, (*path, SequenceKey(i)), leaves) for i, v in enumerate(node)]}
    children, treedef = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda y: y is not node)
    if jax.tree_util.treedef_is_leaf(treedef) and len(children) == 1 and children[0][0] == ():
        name = key_name(path)
        leaves.append((name, node))
        return {"leaf": name}
    return {
        "node": kind.__qualname__,
        "children": [[key_name(p), _encode(child, (*path, *p), leaves)] for p, child in children],
    }


def _decode(rec: Any, tensors: dict[str, np.ndarray], used: set[str], where: str) -> Any:
    """Rebuild the tree described by ``rec`` (generic nodes come back as dicts)."""
    bad = f"{where}: malformed structure record"
    if isinstance(rec, dict) and set(rec) == {"node", "children"}:
        return _decode_pairs(rec["children"], tensors, used, where, str_keys=True)
    if not isinstance(rec, dict) or len(rec) != 1:
        msg = f"{bad} (node {rec!r})"
        raise ValueError(msg)
    ((kind, val),) = rec.items()
    if kind == "leaf":
        if not isinstance(val, str) or val not in tensors or val in used:
            msg = f"{bad}: leaf {val!r} has no (unused) tensor in the file"
            raise ValueError(msg)
        used.add(val)
        return tensors[val]
    if kind == "none":
        return None
    if kind in ("list", "tuple"):
        if not isinstance(val, list):
            msg = f"{bad} ({kind} {val!r})"
            raise ValueError(msg)
        items = [_decode(v, tensors, used, where) for v in val]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return _decode_pairs(val, tensors, used, where, str_keys=False)
    msg = f"{bad} (unknown node kind {kind!r})"
    raise ValueError(msg)


def _decode_pairs(
    pairs: Any, tensors: dict[str, np.ndarray], used: set[str], where: str, *, str_keys: bool
) -> dict[Any, Any]:
    bad = f"{where}: malformed structure record"
    if not isinstance(pairs, list):
        msg = f"{bad} (mapping {pairs!r})"
        raise ValueError(msg)
    out: dict[Any, Any] = {}
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2):
            msg = f"{bad} (mapping entry {pair!r})"
            raise ValueError(msg)
        k, v = pair
        if isinstance(k, bool) or not isinstance(k, str if str_keys else (str, int)) or k in out:
            msg = f"{bad} (key {k!r})"
            raise ValueError(msg)
        out[k] = _decode(v, tensors, used, where)
    return out


def _nest(tensors: dict[str, np.ndarray], where: str) -> dict[str, Any]:
    """Nested dicts from ``/``-separated tensor names (files without a structure record)."""
    root: dict[str, Any] = {}
    for name in sorted(tensors):
        parts = name.split("/")
        node = root
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if last:
                if part in node:
                    msg = f"{where}: tensor {name!r} collides with another tensor's key path"
                    raise ValueError(msg)
                node[part] = tensors[name]
            else:
                child = node.setdefault(part, {})
                if not isinstance(child, dict):
                    msg = f"{where}: tensor {'/'.join(parts[: i + 1])!r} is also a prefix of {name!r}"
                    raise ValueError(msg)
                node = child
    return root


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------


def _format_of(path: pathlib.Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        msg = f"unsupported checkpoint suffix {path.suffix!r} in {str(path)!r}; accepted: {list(FORMATS)}"
        raise ValueError(msg)
    return suffix


def _check_metadata(metadata: Mapping[str, Any] | None) -> dict[str, _MetaValue]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        msg = f"metadata must be a dict of str -> str|int|float|bool, got {type(metadata).__name__}"
        raise ValueError(msg)
    out: dict[str, _MetaValue] = {}
    for k, v in metadata.items():
        if not isinstance(k, str) or not k:
            msg = f"metadata keys must be non-empty strings, got {k!r}"
            raise ValueError(msg)
        if k == _RECORD:
            msg = f"metadata key {_RECORD!r} is reserved for the structure record"
            raise ValueError(msg)
        if isinstance(v, np.generic) and v.dtype.kind in "biufU":
            v = v.item()
        if not isinstance(v, (str, int, float, bool)):
            msg = f"metadata[{k!r}] must be str, int, float or bool, got {type(v).__name__} {v!r}"
            raise ValueError(msg)
        out[k] = v
    return out


def _leaf_array(name: str, leaf: Any, fmt: str) -> np.ndarray:
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        msg = (
            f"cannot save leaf {name!r}: it is a typed PRNG key array; store "
            "jax.random.key_data(key) instead"
        )
        raise ValueError(msg)
    try:
        arr = np.asarray(leaf)
    except (TypeError, ValueError, RuntimeError) as e:
        msg = f"cannot save leaf {name!r} of type {type(leaf).__name__}: not convertible to an array"
        raise ValueError(msg) from e
    if not _storable(arr.dtype):
        msg = (
            f"cannot save leaf {name!r} with dtype {arr.dtype}: only bool, integer, float, complex and "
            "ml_dtypes (bfloat16, float8, int4) leaves can be stored"
        )
        raise ValueError(msg)
    if fmt == ".safetensors" and _safetensors_code(arr.dtype) is None:
        accepted = sorted(d.name for d in _safetensors_codes().values())
        msg = f"cannot save leaf {name!r}: safetensors does not store dtype {arr.dtype} (accepted: {accepted}); use .npz"
        raise ValueError(msg)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return arr if arr.flags.c_contiguous else arr.copy(order="C")


def _flatten_for_save(params: Params, fmt: str) -> tuple[Any, dict[str, np.ndarray]]:
    leaves: list[tuple[str, Any]] = []
    structure = _encode(params, (), leaves)
    arrays: dict[str, np.ndarray] = {}
    for name, leaf in leaves:
        if name in arrays:
            msg = f"two leaves share the tensor name {name!r} (key paths must stay distinct when joined with '/')"
            raise ValueError(msg)
        if not name or name == _RECORD:
            msg = f"cannot save a leaf named {name!r}: that name is empty or reserved"
            raise ValueError(msg)
        if fmt == ".safetensors" and name == _SAFETENSORS_RESERVED:
            msg = (
                f"cannot save a leaf named {name!r} to .safetensors: safetensors reserves that header "
                "key for metadata, so the file could not be read back; rename the leaf or use .npz"
            )
            raise ValueError(msg)
        arrays[name] = _leaf_array(name, leaf, fmt)
    expected = sorted(n for n, _ in named_leaves(params))
    if sorted(arrays) != expected:
        msg = f"cannot save params: leaf names {sorted(arrays)} differ from JAX's key paths {expected}"
        raise ValueError(msg)
    return structure, arrays


def _crc32(arr: np.ndarray) -> int:
    return zlib.crc32(memoryview(arr.reshape(-1).view(np.uint8)))


def _record(structure: Any, arrays: dict[str, np.ndarray], **extra: Any) -> dict[str, Any]:
    crc = {name: _crc32(arr) for name, arr in arrays.items()}
    return {"format": _FORMAT, "version": _VERSION, "structure": structure, "crc32": crc, **extra}


def _verify_crc(record: dict[str, Any], tensors: dict[str, np.ndarray], where: str) -> None:
    crc = record.get("crc32", {})
    if not isinstance(crc, dict):
        msg = f"{where}: malformed checksum table in the {_RECORD!r} record"
        raise ValueError(msg)
    for name, want in crc.items():
        if name not in tensors:
            msg = f"{where}: tensor {name!r} named in the record is missing from the file"
            raise ValueError(msg)
        if _crc32(tensors[name]) != want:
            msg = f"{where}: tensor {name!r} fails its CRC-32 checksum; the file is corrupt"
            raise ValueError(msg)


def _write_safetensors(f: IO[bytes], arrays: dict[str, np.ndarray], structure: Any, meta: dict[str, _MetaValue]) -> None:
    header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    strings = sorted(k for k, v in meta.items() if isinstance(v, str))
    header[_RECORD] = json.dumps(_record(structure, arrays, strings=strings))
    specs = {
        name: safetensors.TensorSpec(
            dtype=arr.dtype.name, shape=list(arr.shape), data_ptr=arr.ctypes.data, data_len=arr.nbytes
        )
        for name, arr in arrays.items()
    }
    f.write(safetensors.serialize(specs, metadata=header))


def _write_npz(f: IO[bytes], arrays: dict[str, np.ndarray], structure: Any, meta: dict[str, _MetaValue]) -> None:
    dtypes = {name: arr.dtype.name for name, arr in arrays.items() if arr.dtype.name in _ML_DTYPES}
    record = _record(structure, arrays, metadata=meta, dtypes=dtypes)
    payload = np.frombuffer(json.dumps(record).encode("utf-8"), dtype=np.uint8)
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in [(_RECORD, payload), *arrays.items()]:
            if name in dtypes:
                arr = arr.view(np.dtype(f"<u{arr.dtype.itemsize}"))
            with zf.open(f"{name}.npy", mode="w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, arr, allow_pickle=False)


def _atomic_write(path: pathlib.Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write via a temporary file in ``path``'s folder, fsync it, then ``os.replace`` it into place."""
    remove_stale_temps(path)
    tmp = f"{temp_name(path)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    done = False
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        done = True
    finally:
        if not done and os.path.lexists(tmp):
            os.unlink(tmp)
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def save(
    path: str | os.PathLike[str],
    params: Params,
    *,
    metadata: Mapping[str, _MetaValue] | None = None,
) -> pathlib.Path:
    """Write ``params`` (any pytree of arrays) and ``metadata`` to ``path``, atomically.

    Args:
        path: Target file; the suffix picks the format (``.safetensors`` or ``.npz``). Missing
            parent folders are created. An existing regular file is replaced atomically; a folder,
            symlink or other special file at ``path`` is refused.
        params: Pytree of arrays (jax or numpy; bool / int / float / complex / bfloat16 / float8).
            Dict keys must be ``str`` or ``int``; other pytree nodes (namedtuples, ``nnx.State``,
            dataclasses) are saved by their key paths and load back as dicts unless ``like`` is given.
        metadata: Flat ``{str: str | int | float | bool}`` (numpy scalars are accepted).

    Returns:
        The path written.

    Raises:
        ValueError: On an unsupported suffix, a bad target, unsupported leaves or dtypes, colliding
            key-path names, or bad metadata, all checked before anything is written.

    Example:
        >>> import tempfile, pathlib, numpy as np
        >>> from landscape import io
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "w.npz"
        >>> io.save(p, {"w": np.arange(3.0)}).name
        'w.npz'
    """
    path = pathlib.Path(path)
    fmt = _format_of(path)
    meta = _check_metadata(metadata)
    structure, arrays = _flatten_for_save(params, fmt)
    if os.path.lexists(path):
        mode = os.lstat(path).st_mode
        if not stat.S_ISREG(mode):
            kind = "folder" if stat.S_ISDIR(mode) else "symlink" if stat.S_ISLNK(mode) else "special file"
            msg = f"refusing to overwrite {str(path)!r}: it is a {kind}, not a regular file"
            raise ValueError(msg)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        msg = f"cannot create the folder for {str(path)!r}: a parent path is not a folder"
        raise ValueError(msg) from e
    writer = _write_safetensors if fmt == ".safetensors" else _write_npz
    _atomic_write(path, lambda f: writer(f, arrays, structure, meta))
    return path


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------


def _check_readable(path: pathlib.Path) -> None:
    if not os.path.lexists(path):
        msg = f"no checkpoint at {str(path)!r}"
        raise FileNotFoundError(msg)
    if not path.is_file():
        msg = f"{str(path)!r} is not a regular file"
        raise ValueError(msg)


def _parse_record(text: str | bytes, where: str) -> dict[str, Any]:
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = f"{where}: the {_RECORD!r} record is not valid JSON"
        raise ValueError(msg) from e
    if not isinstance(record, dict) or record.get("format") != _FORMAT or "structure" not in record:
        msg = f"{where}: the {_RECORD!r} record is not a {_FORMAT} record"
        raise ValueError(msg)
    version = record.get("version")
    if not isinstance(version, int) or version > _VERSION:
        msg = f"{where}: record version {version!r} is newer than this reader (version {_VERSION})"
        raise ValueError(msg)
    return record


def _decode_meta(raw: dict[str, str], record: dict[str, Any] | None, where: str) -> dict[str, _MetaValue]:
    """Header metadata values: plain strings where the record lists them, JSON text otherwise."""
    strings = record.get("strings") if record is not None else None
    if strings is None:  # foreign files and files written before plain strings
        return {k: _decode_meta_value(v) for k, v in sorted(raw.items())}
    if not isinstance(strings, list) or not all(isinstance(k, str) for k in strings):
        msg = f"{where}: malformed string-key list in the {_RECORD!r} record"
        raise ValueError(msg)
    plain = set(strings)
    out: dict[str, _MetaValue] = {}
    for k, v in sorted(raw.items()):
        if k in plain:
            out[k] = v
            continue
        try:
            value = json.loads(v)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, str) or not isinstance(value, (int, float, bool)):
            msg = f"{where}: metadata {k!r} = {v!r} is not the JSON number / boolean the record says it is"
            raise ValueError(msg)
        out[k] = value
    return out


def _decode_meta_value(raw: str) -> _MetaValue:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return raw
    return value if isinstance(value, (str, int, float, bool)) else raw


def _read_safetensors(path: pathlib.Path, where: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    data = path.read_bytes()
    try:
        views = safetensors.deserialize(data)
    except safetensors.SafetensorError as e:
        msg = f"{where}: not a valid safetensors file ({e})"
        raise ValueError(msg) from e
    size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + size])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = f"{where}: unreadable safetensors header"
        raise ValueError(msg) from e
    codes = _safetensors_codes()
    tensors: dict[str, np.ndarray] = {}
    for name, view in views:
        dt = codes.get(view["dtype"])
        if dt is None:
            msg = f"{where}: tensor {name!r} has dtype {view['dtype']!r}, which has no numpy equivalent here"
            raise ValueError(msg)
        tensors[name] = np.frombuffer(view["data"], dtype=dt).reshape(view["shape"])
    raw_meta = header.get("__metadata__") or {}
    return tensors, {str(k): str(v) for k, v in raw_meta.items()}


_NPZ_ERRORS = (ValueError, zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError)


def _open_npz(path: pathlib.Path, where: str) -> np.lib.npyio.NpzFile:
    try:
        npz = np.load(path, allow_pickle=False)
    except _NPZ_ERRORS as e:
        msg = f"{where}: not a valid .npz checkpoint ({e})"
        raise ValueError(msg) from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        msg = f"{where}: holds a single .npy array, not an .npz archive of named tensors"
        raise ValueError(msg)
    return npz


def _read_npz(path: pathlib.Path, where: str) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    with _open_npz(path, where) as npz:
        try:
            arrays = {name: npz[name] for name in npz.files}
        except _NPZ_ERRORS as e:
            msg = f"{where}: corrupt or unreadable .npz entry ({e})"
            raise ValueError(msg) from e
    record = None
    if _RECORD in arrays:
        payload = arrays.pop(_RECORD)
        if payload.dtype != np.uint8 or payload.ndim != 1:
            msg = f"{where}: the {_RECORD!r} entry is not a JSON byte string"
            raise ValueError(msg)
        record = _parse_record(payload.tobytes(), where)
        dtypes = record.get("dtypes", {})
        if not isinstance(dtypes, dict):
            msg = f"{where}: malformed dtype table in the {_RECORD!r} record"
            raise ValueError(msg)
        for name, dname in dtypes.items():
            if name not in arrays or dname not in _ML_DTYPES:
                msg = f"{where}: dtype table names unknown tensor {name!r} or dtype {dname!r}"
                raise ValueError(msg)
            want = _ML_DTYPES[dname]
            if arrays[name].dtype.itemsize != want.itemsize or arrays[name].dtype.kind != "u":
                msg = f"{where}: tensor {name!r} cannot be viewed as {dname}"
                raise ValueError(msg)
            arrays[name] = arrays[name].view(want)
    for name, arr in arrays.items():
        if not _storable(arr.dtype):
            msg = f"{where}: tensor {name!r} has unsupported dtype {arr.dtype}"
            raise ValueError(msg)
    return arrays, record


def _read(path: pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, Any] | None, dict[str, _MetaValue]]:
    """``(tensors, record or None, metadata)`` from a checkpoint file."""
    fmt = _format_of(path)
    _check_readable(path)
    where = f"checkpoint {str(path)!r}"
    if fmt == ".safetensors":
        tensors, raw = _read_safetensors(path, where)
        record = _parse_record(raw.pop(_RECORD), where) if _RECORD in raw else None
        if record is not None:
            _verify_crc(record, tensors, where)
        return tensors, record, _decode_meta(raw, record, where)
    tensors, record = _read_npz(path, where)
    if record is not None:
        _verify_crc(record, tensors, where)
    meta = record.get("metadata", {}) if record is not None else {}
    if not isinstance(meta, dict) or not all(
        isinstance(v, (str, int, float, bool)) for v in meta.values()
    ):
        msg = f"{where}: malformed metadata in the {_RECORD!r} record"
        raise ValueError(msg)
    return tensors, record, dict(sorted(meta.items()))


def _dtype_of(leaf: Any) -> np.dtype:
    dtype = getattr(leaf, "dtype", None)
    return np.dtype(dtype) if dtype is not None else np.asarray(leaf).dtype


def _fill_like(like: Params, tensors: dict[str, np.ndarray], where: str) -> Params:
    named = named_leaves(like)
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        msg = f"like has two leaves with the same key-path name; cannot match them to {where}"
        raise ValueError(msg)
    for name in names:
        if name not in tensors:
            msg = f"{where} has no tensor for key path {name!r} that like expects (file holds {sorted(tensors)})"
            raise ValueError(msg)
    extra = sorted(set(tensors) - set(names))
    if extra:
        msg = f"{where} holds tensor {extra[0]!r} that like lacks (like has {names})"
        raise ValueError(msg)
    treedef = jax.tree.structure(like)
    loaded = jax.tree.unflatten(treedef, [tensors[n] for n in names])
    # shapes and dtypes by hand: like may hold jax.ShapeDtypeStruct leaves (from jax.eval_shape)
    for (name, want), got in zip(named, (tensors[n] for n in names)):
        if tuple(np.shape(want)) != got.shape:
            msg = f"params do not match at {name!r}: like has shape {tuple(np.shape(want))}, {where} has shape {got.shape}"
            raise ValueError(msg)
        if _dtype_of(want) != got.dtype:
            msg = f"params do not match at {name!r}: like has dtype {_dtype_of(want)}, {where} has dtype {got.dtype}"
            raise ValueError(msg)
    return loaded


def load(path: str | os.PathLike[str], *, like: Params | None = None) -> tuple[Params, dict[str, _MetaValue]]:
    """Read a checkpoint written by :func:`save` (or any safetensors / npz file of named tensors).

    Args:
        path: ``.safetensors`` or ``.npz`` file.
        like: Optional template pytree (arrays or ``jax.ShapeDtypeStruct`` leaves). When given, the
            result has ``like``'s exact tree structure and every key path, shape and dtype is
            checked against the file; without it, nested dicts / lists / tuples are rebuilt from
            the stored structure record (other node types come back as dicts keyed by their key
            names; files without a record become nested dicts split on ``"/"``).

    Returns:
        ``(params, metadata)``: leaves are ``numpy.ndarray`` with the stored dtypes, bit-exact;
        metadata is ``{str: str | int | float | bool}`` sorted by key (empty if none).

    Raises:
        FileNotFoundError: If nothing exists at ``path``.
        ValueError: On an unsupported suffix, a folder, a corrupt / truncated / foreign or
            pickle-containing file, or (with ``like``) the first mismatching key path, shape or
            dtype. The message names the file.

    Example:
        >>> import tempfile, pathlib, numpy as np
        >>> from landscape import io
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "w.safetensors"
        >>> _ = io.save(p, {"w": np.zeros(2, np.float32)})
        >>> io.load(p, like={"w": np.zeros(3, np.float32)})
        Traceback (most recent call last):
        ...
        ValueError: params do not match at 'w': like has shape (3,), checkpoint '...' has shape (2,)
    """
    path = pathlib.Path(path)
    tensors, record, meta = _read(path)
    where = f"checkpoint {str(path)!r}"
    if like is not None:
        return _fill_like(like, tensors, where), meta
    if record is None:
        return _nest(tensors, where), meta
    used: set[str] = set()
    params = _decode(record["structure"], tensors, used, where)
    unused = sorted(set(tensors) - used)
    if unused:
        msg = f"{where}: tensor {unused[0]!r} is not part of the stored structure"
        raise ValueError(msg)
    return params, meta


def read_metadata(path: str | os.PathLike[str]) -> dict[str, _MetaValue]:
    """Only the metadata of a checkpoint (safetensors: reads the header, not the tensors).

    Raises the same errors as :func:`load` for missing, foreign or corrupt files.
    """
    path = pathlib.Path(path)
    fmt = _format_of(path)
    _check_readable(path)
    where = f"checkpoint {str(path)!r}"
    if fmt == ".npz":
        return _read(path)[2]
    try:
        with safetensors.safe_open(path, framework="np") as f:
            raw = dict(f.metadata() or {})
    except safetensors.SafetensorError as e:
        msg = f"{where}: not a valid safetensors file ({e})"
        raise ValueError(msg) from e
    record = _parse_record(raw.pop(_RECORD), where) if _RECORD in raw else None
    return _decode_meta(raw, record, where)
