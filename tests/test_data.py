"""Data loading: npz layouts and refusals, embedded digits, offline torchvision errors, ImageFolder trees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from qrobust.data import Split, check_images, load_dataset, load_image_folder, load_npz
from qrobust.errors import QrobustError


def _write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _keras(n_train=6, n_test=4, shape=(28, 28), dtype=np.uint8, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, *shape)).astype(dtype),
        "y_train": rng.integers(0, 10, n_train),
        "x_test": rng.integers(0, 256, (n_test, *shape)).astype(dtype),
        "y_test": rng.integers(0, 10, n_test).astype(np.uint8),
    }


def test_npz_hw(tmp_path):
    arrays = _keras()
    ds = load_npz(_write_npz(tmp_path / "tiny.npz", **arrays))
    assert ds.train.x.shape == (6, 1, 28, 28) and ds.test.x.shape == (4, 1, 28, 28)
    assert torch.equal(ds.train.x[:, 0], torch.from_numpy(arrays["x_train"]))
    assert ds.test.y.dtype == torch.int64 and ds.test.y.tolist() == arrays["y_test"].tolist()
    x, y = ds.test.tensors()
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert torch.allclose(x[:, 0] * 255, torch.from_numpy(arrays["x_test"]).float())
    assert ds.name == "tiny" and ds.image_shape == (1, 28, 28)


def test_npz_hwc_is_transposed_to_nchw(tmp_path):
    arrays = _keras(shape=(32, 32, 3))
    ds = load_npz(_write_npz(tmp_path / "c.npz", **arrays))
    assert ds.train.x.shape == (6, 3, 32, 32)
    # pixel (n, h, w, c) lands at (n, c, h, w)
    assert ds.train.x[2, 1, 5, 7].item() == arrays["x_train"][2, 5, 7, 1]
    assert ds.train.x[0, 2, 31, 0].item() == arrays["x_train"][0, 31, 0, 2]


def test_npz_nchw_kept(tmp_path):
    arrays = _keras(shape=(3, 8, 8))
    ds = load_npz(_write_npz(tmp_path / "n.npz", **arrays))
    assert torch.equal(ds.train.x, torch.from_numpy(arrays["x_train"]))


def test_npz_missing_keys(tmp_path):
    arrays = _keras()
    del arrays["y_test"], arrays["x_test"]
    with pytest.raises(QrobustError, match=r"lacks key\(s\) x_test, y_test.*x_train, y_train, x_test, "
                                            "y_test"):
        load_npz(_write_npz(tmp_path / "m.npz", **arrays))


def test_npz_wrong_dtype_and_nan(tmp_path):
    arrays = _keras(dtype=np.float32)
    with pytest.raises(QrobustError, match="expected uint8 pixels.*float32.*astype"):
        load_npz(_write_npz(tmp_path / "f.npz", **arrays))
    arrays["x_train"][0, 3, 3] = np.nan
    with pytest.raises(QrobustError, match="x_train contains NaN"):
        load_npz(_write_npz(tmp_path / "nan.npz", **arrays))


def test_npz_bad_labels(tmp_path):
    arrays = _keras()
    arrays["y_train"] = arrays["y_train"].astype(np.float32)
    with pytest.raises(QrobustError, match="labels must be integers"):
        load_npz(_write_npz(tmp_path / "a.npz", **arrays))
    arrays = _keras()
    arrays["y_test"] = np.array([0, -1, 2, 3])
    with pytest.raises(QrobustError, match=">= 0"):
        load_npz(_write_npz(tmp_path / "b.npz", **arrays))
    arrays = _keras()
    arrays["y_test"] = np.array([0, 1])
    with pytest.raises(QrobustError, match="4 images but labels of shape"):
        load_npz(_write_npz(tmp_path / "c.npz", **arrays))
    arrays = _keras(shape=(5, 28, 28))  # 5 channels: not an image layout
    with pytest.raises(QrobustError, match="expected images of shape"):
        load_npz(_write_npz(tmp_path / "d.npz", **arrays))


def test_npz_unreadable_files(tmp_path):
    with pytest.raises(QrobustError, match="does not exist"):
        load_npz(tmp_path / "nope.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(QrobustError, match="not a readable .npz"):
        load_npz(junk)
    good = _write_npz(tmp_path / "good.npz", **_keras())
    truncated = tmp_path / "trunc.npz"
    truncated.write_bytes(good.read_bytes()[:300])
    with pytest.raises(QrobustError, match=r"not a readable \.npz|cannot read"):
        load_npz(truncated)
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    with pytest.raises(QrobustError):
        load_npz(empty)
    pickled = tmp_path / "obj.npz"
    np.savez(pickled, x_train=np.array([object()]), y_train=[0], x_test=np.zeros((1, 2, 2), np.uint8),
             y_test=[0])
    with pytest.raises(QrobustError, match="cannot read x_train"):
        load_npz(pickled)


def test_digits_embedded(digits):
    assert len(digits.train) == 4000 and len(digits.test) == 1000
    assert digits.image_shape == (1, 28, 28)
    assert sorted(torch.unique(digits.test.y).tolist()) == list(range(10))
    again = load_dataset("digits")
    assert torch.equal(again.test.x, digits.test.x)  # fixed shuffle
    assert len(set(digits.train.y[:100].tolist())) == 10  # shuffled, not sorted by class


@pytest.mark.parametrize(("name", "folder"), [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST"),
                                              ("cifar10", "CIFAR10")])
def test_torchvision_offline_error_says_how_to_point_at_files(tmp_path, name, folder):
    with pytest.raises(QrobustError) as info:
        load_dataset(name, root=tmp_path, download=False)
    msg = str(info.value)
    assert "downloading is off" in msg and "--data-root" in msg and f"{name}.npz" in msg and folder in msg
    assert "\n" not in msg


def test_named_dataset_found_as_npz_in_root(tmp_path):
    _write_npz(tmp_path / "mnist.npz", **_keras())
    ds = load_dataset("mnist", root=tmp_path)
    assert len(ds.train) == 6


def test_unknown_dataset(tmp_path):
    with pytest.raises(QrobustError, match="not found: no such file or folder"):
        load_dataset(str(tmp_path / "missing_dir"))
    with pytest.raises(QrobustError, match="no dataset given"):
        load_dataset("")


def _image_tree(root: Path, spec: dict[str, dict[str, int]]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for part, classes in spec.items():
        for cls, count in classes.items():
            (root / part / cls).mkdir(parents=True)
            for i in range(count):
                size = (int(rng.integers(20, 50)), int(rng.integers(20, 50)))
                if i % 2:  # grayscale files are converted to RGB
                    img = Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8), mode="L")
                else:
                    img = Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8), mode="RGB")
                img.save(root / part / cls / f"{i}.png")


def test_image_folder(tmp_path):
    _image_tree(tmp_path, {"train": {"ant": 3, "bee": 2, "cat": 3}, "val": {"ant": 1, "cat": 2}})
    ds = load_image_folder(tmp_path, size=16)
    assert ds.train.x.shape == (8, 3, 16, 16) and ds.train.x.dtype == torch.uint8
    assert ds.train.y.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    # val/ lacks "bee": "cat" must keep train's id 2, not shift to 1
    assert ds.test.y.tolist() == [0, 2, 2]
    ds2 = load_dataset(str(tmp_path))  # a directory spec dispatches to the ImageFolder loader
    assert ds2.train.x.shape == (8, 3, 224, 224)
    limited = load_image_folder(tmp_path, size=16, limit=4)
    assert len(limited.train) == 4 and len(set(limited.train.y.tolist())) >= 2  # a mix, not the first class


def test_image_folder_refusals(tmp_path):
    with pytest.raises(QrobustError, match="train/ and val/"):
        load_image_folder(tmp_path)
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(QrobustError, match="no class folders"):
        load_image_folder(tmp_path)
    _image_tree(tmp_path / "x", {"train": {"a": 1}, "val": {"a": 1, "zebra": 1}})
    with pytest.raises(QrobustError, match="zebra.*same class names"):
        load_image_folder(tmp_path / "x", size=8)
    _image_tree(tmp_path / "y", {"train": {"a": 1}, "val": {"a": 1}})
    (tmp_path / "y" / "train" / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(QrobustError, match="cannot read an image"):
        load_image_folder(tmp_path / "y", size=8)


def test_split_batches_and_head(digits):
    split = digits.test.head(50)
    xs, ys = zip(*split.batches(16), strict=True)
    assert [len(y) for y in ys] == [16, 16, 16, 2]
    assert torch.equal(torch.cat(ys), split.y)
    a = torch.cat([y for _, y in split.batches(16, shuffle=True, generator=torch.Generator().manual_seed(3))])
    b = torch.cat([y for _, y in split.batches(16, shuffle=True, generator=torch.Generator().manual_seed(3))])
    assert torch.equal(a, b) and not torch.equal(a, split.y)
    assert sorted(a.tolist()) == sorted(split.y.tolist())
    with pytest.raises(QrobustError):
        split.head(0)
    with pytest.raises(QrobustError):
        next(split.batches(0))
    with pytest.raises(QrobustError, match="uint8"):
        Split(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), "bad")


def test_check_images():
    x = torch.rand(2, 1, 28, 28)
    check_images(x, (1, 28, 28))
    with pytest.raises(QrobustError, match="shape"):
        check_images(x, (3, 32, 32))
    with pytest.raises(QrobustError, match=r"\[0, 1\]"):
        check_images(x * 255)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(QrobustError, match="NaN"):
        check_images(x)


def test_data_digest_tells_data_apart():
    from qrobust.data import data_digest

    x = torch.randint(0, 256, (4, 1, 2, 2), dtype=torch.uint8)
    y = torch.arange(4)
    split = Split(x, y, "s")
    assert split.digest() == data_digest(x.clone(), y.clone())  # same content, same identity
    assert split.digest() != data_digest(x.flip(0), y)  # other order
    assert split.digest() != data_digest(x, y.flip(0))  # other labels
    assert split.digest() != data_digest(x.reshape(4, 1, 1, 4), y)  # same bytes, other shape
