"""Image data a user already has on disk, in the standard formats; never downloads, never unpickles.

* **IDX** (MNIST, Fashion-MNIST; LeCun et al.): a big-endian header ``0 0 <type> <ndim>``, then
  ``ndim`` big-endian uint32 sizes, then the values. Files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (also spelled
  ``train-images.idx3-ubyte``), each raw or gzipped (``.gz``; detected from the content).
* **CIFAR-10 / CIFAR-100 binary version** ("for C programs"; Krizhevsky 2009): fixed-size records
  of one label byte (CIFAR-100: a coarse then a fine label byte) and 3072 pixel bytes, the 1024
  red, then green, then blue values of a 32x32 image in row-major order (CHW), converted to HWC.
  CIFAR-10 files ``data_batch_1.bin`` ... ``data_batch_5.bin`` and ``test_batch.bin``; CIFAR-100
  ``train.bin`` and ``test.bin``. The *python* version of CIFAR (``data_batch_1`` without
  ``.bin``, ``cifar-10-batches-py``) is a pickle and is refused.
* **NumPy arrays**, loaded with ``allow_pickle=False``: a folder holding ``x_train.npy``,
  ``y_train.npy``, ``x_test.npy``, ``y_test.npy`` (optionally ``x_val.npy``, ``y_val.npy``), or
  ``train.npz`` and ``test.npz`` (optionally ``val.npz``) each holding arrays ``x`` and ``y``; or a
  single ``.npz`` file with the keys ``x_train``, ``y_train``, ``x_test``, ``y_test`` (optionally
  ``x_val``, ``y_val``) -- Keras' ``mnist.npz`` has exactly this form.

Every loader returns a :class:`~landscape.data.Dataset` preprocessed as
:func:`~landscape.data.preprocess_images` describes (grey levels / 255, NHWC or flat, optional
standardisation with training statistics). IDX and CIFAR keep their official train / test split.
A wrong magic number, a truncated or over-long file or train / label counts that disagree raise a
``ValueError`` naming the file.

Example:
    >>> import numpy as np, tempfile, pathlib
    >>> from landscape import data
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> rng = np.random.default_rng(0)
    >>> for part, n in (("train", 6), ("test", 2)):
    ...     np.save(folder / f"x_{part}.npy", rng.integers(0, 256, (n, 4, 4), dtype=np.uint8))
    ...     np.save(folder / f"y_{part}.npy", np.arange(n) % 2)
    >>> ds = data.arrays(folder)
    >>> ds.x_train.shape, ds.num_classes, float(ds.x_train.max()) <= 1.0
    ((6, 4, 4, 1), 2, True)
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from landscape.data.dataset import Dataset, make_dataset
from landscape.data.images import _check_standardize, preprocess_images

__all__ = [
    "arrays",
    "cifar10",
    "cifar100",
    "fashion_mnist",
    "mnist_idx",
    "read_cifar_binary",
    "read_idx",
]

_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CIFAR_PIXELS = 3 * 32 * 32
_PYTHON_CIFAR = (
    "this is the python version of CIFAR, a pickle, which landscape never loads; download the "
    "binary version ('CIFAR-10 binary version (suitable for C programs)', cifar-10-binary.tar.gz / "
    "cifar-100-binary.tar.gz) and point at its folder"
)


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic ``1f 8b``."""
    if not path.is_file():
        msg = f"{path}: no such file"
        raise ValueError(msg)
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        msg = f"{path}: corrupt or truncated gzip file ({err})"
        raise ValueError(msg) from err


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (raw or gzipped) into a native-endian numpy array.

    Format: bytes ``0, 0``, a type code (``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C``
    int32, ``0x0D`` float32, ``0x0E`` float64), the number of dimensions ``d``, then ``d``
    big-endian uint32 sizes and ``prod(sizes)`` big-endian values.

    Args:
        path: The file, e.g. ``train-images-idx3-ubyte`` or ``train-images-idx3-ubyte.gz``.

    Returns:
        The array, shape ``sizes`` (MNIST images ``(N, 28, 28)`` uint8, labels ``(N,)``).

    Raises:
        ValueError: Naming the file, on a wrong magic number, an unknown type code, or a file
            shorter or longer than its header says.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        msg = (
            f"{path}: not an IDX file (magic number {raw[:4].hex() or 'missing'}; expected "
            f"00 00 <type in {sorted(f'{t:02x}' for t in _IDX_TYPES)}> <ndim>)"
        )
        raise ValueError(msg)
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        msg = f"{path}: truncated IDX header ({len(raw)} bytes, need {header} for {ndim} dimensions)"
        raise ValueError(msg)
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        msg = f"{path}: IDX file {what}: {len(raw)} bytes, the header {shape} of {dtype.name} needs {expected}"
        raise ValueError(msg)
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find(folder: Path, stems: tuple[str, ...]) -> Path:
    for stem in stems:
        for name in (stem, f"{stem}.gz"):
            if (folder / name).is_file():
                return folder / name
    present = sorted(p.name for p in folder.iterdir())[:12] if folder.is_dir() else []
    msg = f"{folder}: no file {stems[0]!r} (or {list(stems[1:])}, with or without .gz); found {present}"
    raise ValueError(msg)


def _idx_pair(folder: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    images_path = _find(folder, (f"{part}-images-idx3-ubyte", f"{part}-images.idx3-ubyte"))
    labels_path = _find(folder, (f"{part}-labels-idx1-ubyte", f"{part}-labels.idx1-ubyte"))
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        msg = f"{images_path}: expected uint8 images (N, H, W), got {images.dtype} {images.shape}"
        raise ValueError(msg)
    if labels.ndim != 1 or labels.dtype != np.uint8:
        msg = f"{labels_path}: expected uint8 labels (N,), got {labels.dtype} {labels.shape}"
        raise ValueError(msg)
    if images.shape[0] != labels.shape[0]:
        msg = f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels"
        raise ValueError(msg)
    return images[..., None], labels.astype(np.int32)


def _folder(path: Any) -> Path:
    folder = Path(os.fspath(path)).expanduser()
    if not folder.is_dir():
        msg = f"{folder}: not a folder"
        raise ValueError(msg)
    return folder


def mnist_idx(
    path: str | os.PathLike[str],
    *,
    image: bool = True,
    standardize: bool | str | None = False,
    name: str = "mnist-idx",
) -> Dataset:
    """MNIST-format IDX files in a folder (MNIST, Fashion-MNIST, KMNIST, ...), official split.

    Reads ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
    ``t10k-labels-idx1-ubyte`` (``.gz`` or not; see :func:`read_idx`); 10 classes.

    Args:
        path: The folder.
        image: NHWC ``(N, 28, 28, 1)`` (default) or flat ``(N, 784)``.
        standardize: ``False`` (default), ``True`` / ``"channel"`` or ``"pixel"``.
        name: The dataset's name in reports.

    Raises:
        ValueError: On a missing file or a malformed one (naming it), or counts that disagree.
    """
    _check_standardize(standardize)
    folder = _folder(path)
    (x_tr, y_tr), (x_te, y_te) = _idx_pair(folder, "train"), _idx_pair(folder, "t10k")
    x_tr, x_te = preprocess_images(x_tr, x_te, image=image, standardize=standardize)
    return make_dataset((x_tr, y_tr), (x_te, y_te), num_classes=10, name=name)


def fashion_mnist(
    path: str | os.PathLike[str], *, image: bool = True, standardize: bool | str | None = False
) -> Dataset:
    """Fashion-MNIST (Xiao et al. 2017, arXiv:1708.07747) IDX files: :func:`mnist_idx` named ``"fashion-mnist"``."""
    return mnist_idx(path, image=image, standardize=standardize, name="fashion-mnist")


def read_cifar_binary(
    path: str | os.PathLike[str], *, label_bytes: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR binary batch into images ``(N, 32, 32, 3)`` uint8 HWC and labels ``(N, label_bytes)``.

    Every record is ``label_bytes`` label bytes (CIFAR-10: 1; CIFAR-100: 2, coarse then fine)
    followed by 3072 pixel bytes in CHW order (1024 red, 1024 green, 1024 blue, each 32x32
    row-major); the pixels are transposed to HWC.

    Raises:
        ValueError: Naming the file, when it is missing, empty, gzipped, a python-version pickle,
            or not a whole number of records.
    """
    path = Path(path)
    if label_bytes not in (1, 2):
        msg = f"label_bytes must be 1 (CIFAR-10) or 2 (CIFAR-100), got {label_bytes!r}"
        raise ValueError(msg)
    if not path.is_file():
        msg = f"{path}: no such file"
        raise ValueError(msg)
    raw = path.read_bytes()
    if raw[:1] == b"\x80":  # pickle protocol 2+ opcode PROTO
        msg = f"{path}: {_PYTHON_CIFAR}"
        raise ValueError(msg)
    if raw[:2] == b"\x1f\x8b":
        msg = f"{path}: gzip-compressed; extract the .tar.gz archive first"
        raise ValueError(msg)
    record = label_bytes + _CIFAR_PIXELS
    if not raw or len(raw) % record:
        msg = (
            f"{path}: {len(raw)} bytes is not a whole number of {record}-byte records "
            f"({label_bytes} label byte(s) + {_CIFAR_PIXELS} pixels): truncated, or not a "
            f"CIFAR-{'10' if label_bytes == 1 else '100'} binary batch"
        )
        raise ValueError(msg)
    table = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    images = table[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), table[:, :label_bytes].astype(np.int32)


def _cifar_folder(path: Any, binary_dir: str, python_dir: str, python_files: tuple[str, ...]) -> Path:
    folder = _folder(path)
    if (folder / binary_dir).is_dir():
        folder = folder / binary_dir
    if (folder / python_dir).is_dir() or any((folder / f).is_file() for f in python_files):
        msg = f"{folder}: {_PYTHON_CIFAR}"
        raise ValueError(msg)
    return folder


def _cifar_labels(path: Path, labels: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    bad = np.flatnonzero(labels >= num_classes)
    if bad.size:
        msg = (
            f"{path}: record {int(bad[0])} has {what} label {int(labels[bad[0]])}, outside "
            f"0..{num_classes - 1}; not a {what} CIFAR batch?"
        )
        raise ValueError(msg)
    return labels


def cifar10(
    path: str | os.PathLike[str],
    *,
    image: bool = True,
    standardize: bool | str | None = False,
) -> Dataset:
    """CIFAR-10 (Krizhevsky 2009) from its binary batches, official 50000 / 10000 split.

    ``path`` is the folder holding ``data_batch_1.bin`` ... ``data_batch_5.bin`` and
    ``test_batch.bin`` (``cifar-10-batches-bin``) or the folder above it. Images
    ``(N, 32, 32, 3)``, RGB in ``[0, 1]``; ``standardize=True`` gives per-channel mean / std of the
    training set.

    Raises:
        ValueError: On a missing or malformed batch (naming it), or the python (pickle) version.
    """
    _check_standardize(standardize)
    folder = _cifar_folder(
        path, "cifar-10-batches-bin", "cifar-10-batches-py", ("data_batch_1", "test_batch", "batches.meta")
    )
    parts = []
    for names in ([f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"]):
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            msg = f"{folder}: missing CIFAR-10 binary batch(es) {missing}"
            raise ValueError(msg)
        read = [read_cifar_binary(folder / n, label_bytes=1) for n in names]
        y = [_cifar_labels(folder / n, r[1][:, 0], 10, "CIFAR-10") for n, r in zip(names, read)]
        parts.append((np.concatenate([r[0] for r in read]), np.concatenate(y)))
    (x_tr, y_tr), (x_te, y_te) = parts
    x_tr, x_te = preprocess_images(x_tr, x_te, image=image, standardize=standardize)
    return make_dataset((x_tr, y_tr), (x_te, y_te), num_classes=10, name="cifar10")


def cifar100(
    path: str | os.PathLike[str],
    *,
    labels: str = "fine",
    image: bool = True,
    standardize: bool | str | None = False,
) -> Dataset:
    """CIFAR-100 (Krizhevsky 2009) from its binary files ``train.bin`` / ``test.bin``, official split.

    ``path`` is the folder holding them (``cifar-100-binary``) or the folder above it. Each record
    carries a coarse (20 super-classes) and a fine (100 classes) label; ``labels`` picks one.

    Raises:
        ValueError: On a missing or malformed file (naming it), an unknown ``labels``, or the
            python (pickle) version.
    """
    if labels not in ("fine", "coarse"):
        msg = f"unknown labels {labels!r}; accepted: ['fine', 'coarse']"
        raise ValueError(msg)
    _check_standardize(standardize)
    folder = _cifar_folder(path, "cifar-100-binary", "cifar-100-python", ("train", "test", "meta"))
    column, num_classes = (1, 100) if labels == "fine" else (0, 20)
    parts = []
    for n in ("train.bin", "test.bin"):
        x, y = read_cifar_binary(folder / n, label_bytes=2)
        _cifar_labels(folder / n, y[:, 0], 20, "coarse CIFAR-100")
        _cifar_labels(folder / n, y[:, 1], 100, "fine CIFAR-100")
        parts.append((x, y[:, column]))
    (x_tr, y_tr), (x_te, y_te) = parts
    x_tr, x_te = preprocess_images(x_tr, x_te, image=image, standardize=standardize)
    name = "cifar100" if labels == "fine" else "cifar100-coarse"
    return make_dataset((x_tr, y_tr), (x_te, y_te), num_classes=num_classes, name=name)


_PARTS = ("train", "test", "val")


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as err:  # object arrays need pickle; malformed headers
        msg = f"{path}: cannot load without pickle ({err})"
        raise ValueError(msg) from err
    except (OSError, EOFError) as err:
        msg = f"{path}: not a readable .npy file ({err})"
        raise ValueError(msg) from err


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as err:
        msg = f"{path}: cannot load without pickle ({err})"
        raise ValueError(msg) from err
    except (OSError, EOFError, zlib.error) as err:
        msg = f"{path}: not a readable .npz file ({err})"
        raise ValueError(msg) from err


def _array_parts(path: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], str]:
    """``{part: (x, y)}`` and a description of where each came from (for error messages)."""
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if path.is_file():
        table = _load_npz(path)
        for part in _PARTS:
            keys = (f"x_{part}", f"y_{part}")
            if any(k in table for k in keys):
                if not all(k in table for k in keys):
                    msg = f"{path}: has only one of {list(keys)}; it holds {sorted(table)}"
                    raise ValueError(msg)
                found[part] = (table[keys[0]], table[keys[1]])
        return found, str(path)
    folder = _folder(path)
    npy = any((folder / f"{a}_{p}.npy").is_file() for a in "xy" for p in _PARTS)
    npz = any((folder / f"{p}.npz").is_file() for p in _PARTS)
    if npy and npz:
        msg = f"{folder}: holds both x_<part>.npy and <part>.npz files; keep one form"
        raise ValueError(msg)
    for part in _PARTS:
        if npz and (folder / f"{part}.npz").is_file():
            table = _load_npz(folder / f"{part}.npz")
            if "x" not in table or "y" not in table:
                msg = f"{folder / f'{part}.npz'}: needs arrays 'x' and 'y', holds {sorted(table)}"
                raise ValueError(msg)
            found[part] = (table["x"], table["y"])
        elif npy:
            files = [folder / f"{a}_{part}.npy" for a in "xy"]
            exists = [f.is_file() for f in files]
            if any(exists) and not all(exists):
                msg = f"{folder}: has {files[exists.index(True)].name} but not {files[exists.index(False)].name}"
                raise ValueError(msg)
            if all(exists):
                found[part] = (_load_npy(files[0]), _load_npy(files[1]))
    return found, str(folder)


def arrays(
    path: str | os.PathLike[str],
    *,
    num_classes: int | None = None,
    image: bool = True,
    standardize: bool | str | None = False,
    name: str | None = None,
) -> Dataset:
    """A dataset stored as NumPy arrays (see the module docstring for the accepted file names).

    Inputs are ``(N, H, W)`` grey images (a channel axis is added), ``(N, H, W, C)`` NHWC images,
    or ``(N, F)`` vectors. ``uint8`` inputs are grey levels and are divided by 255; float inputs
    are kept as stored; other dtypes are refused. Labels are integers ``(N,)``. Preprocessing as
    in :func:`~landscape.data.preprocess_images`.

    Args:
        path: A folder (``x_train.npy``, ... or ``train.npz``, ...) or one ``.npz`` file.
        num_classes: Number of classes (default: largest label + 1).
        image: Keep the image layout (default) or flatten every example.
        standardize: ``False`` (default), ``True`` / ``"channel"`` or ``"pixel"``.
        name: The dataset's name (default: the file's or folder's stem).

    Raises:
        ValueError: On missing parts, arrays that need pickle, bad dtypes or shapes, or counts
            that disagree -- naming the file or folder.
    """
    _check_standardize(standardize)
    path = Path(os.fspath(path)).expanduser()
    found, where = _array_parts(path)
    missing = [p for p in ("train", "test") if p not in found]
    if missing:
        msg = (
            f"{where}: no {missing} arrays; expected x_train.npy, y_train.npy, x_test.npy, y_test.npy "
            "(a folder), train.npz / test.npz with arrays 'x' and 'y' (a folder), or one .npz with "
            "keys x_train, y_train, x_test, y_test"
        )
        raise ValueError(msg)
    dtypes = {p: found[p][0].dtype for p in found}
    if len(set(dtypes.values())) > 1:
        msg = f"{where}: inputs of all parts must share one dtype, got {dtypes}"
        raise ValueError(msg)
    dtype = dtypes["train"]
    if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
        msg = f"{where}: inputs must be uint8 grey levels or floats, got {dtype}"
        raise ValueError(msg)
    parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for part, (x, y) in found.items():
        if x.ndim not in (2, 3, 4):
            msg = f"{where}: x_{part} must be (N, F), (N, H, W) or (N, H, W, C), got shape {x.shape}"
            raise ValueError(msg)
        if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
            msg = (
                f"{where}: y_{part} must be {x.shape[0]} integer labels to match x_{part} "
                f"{x.shape}, got {y.dtype} {y.shape}"
            )
            raise ValueError(msg)
        parts[part] = (x[..., None] if x.ndim == 3 else x, y)
    if num_classes is None:
        num_classes = int(max(int(y.max()) for _, y in parts.values() if y.size)) + 1
    scale = 1.0 / 255.0 if dtype == np.uint8 else None
    x_tr, x_te = preprocess_images(
        parts["train"][0], parts["test"][0], image=image, standardize=standardize, scale=scale
    )
    val = None
    if "val" in parts:
        _, x_va = preprocess_images(
            parts["train"][0], parts["val"][0], image=image, standardize=standardize, scale=scale
        )
        val = (x_va, parts["val"][1])
    return make_dataset(
        (x_tr, parts["train"][1]),
        (x_te, parts["test"][1]),
        num_classes=num_classes,
        name=name if name is not None else path.stem,
        val=val,
    )
