"""Data loaders, preprocessing, augmentation and batching of the test problems."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from msvag_mb.problems import data as data_module
from msvag_mb.problems.data import (
    CharBatches,
    DataFileError,
    DataNotFoundError,
    ImageBatches,
    char_windows,
    colour_jitter,
    encode_text,
    load_cifar,
    load_fashion_mnist,
    load_war_and_peace,
    per_image_standardization,
    random_crop_flip,
    read_idx,
)

#: War and Peace in the data folders (conftest.py lists this repository's in $MSVAG_DATA_DIR)
WAR_AND_PEACE = next((folder / data_module.WAR_AND_PEACE_FILE
                      for folder in data_module.search_dirs(None)
                      if (folder / data_module.WAR_AND_PEACE_FILE).is_file()), None)
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def test_data_folders_come_from_the_environment_then_the_standard_places(monkeypatch, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("MSVAG_DATA_DIR", f"{first}{os.pathsep}{second}")
    folders = data_module.search_dirs(None)
    assert folders[:2] == [first, second]
    assert folders[2:] == [Path("~/data").expanduser(), Path("data"),
                           Path("/usr/share/datasets")]
    monkeypatch.delenv("MSVAG_DATA_DIR")
    assert data_module.search_dirs(None) == folders[2:]
    assert data_module.search_dirs(first) == [first]  # --data-dir: that folder only


# -- War and Peace (real file, skipped when absent) ------------------------------------------
@pytest.mark.skipif(WAR_AND_PEACE is None,
                    reason="war_and_peace.txt is in none of the data folders ($MSVAG_DATA_DIR)")
def test_war_and_peace_preprocessing_matches_deepobs():
    text = load_war_and_peace(WAR_AND_PEACE.parent)
    assert len(text.vocabulary) == 83
    assert len(text.train) + len(text.test) == 3_266_185
    assert len(text.test) == 653_237
    assert "\r" in text.vocabulary and "\n" in text.vocabulary  # read without translation
    batches = CharBatches(text, batch_size=50, seq_len=50)
    assert batches.batches_per_epoch == 1045
    assert batches.test_x.shape == (261, 50, 50)
    # vocabulary sorted by descending frequency: the space is the most frequent character
    assert text.vocabulary[0] == " "
    counts = torch.bincount(torch.cat([text.train, text.test]), minlength=83)
    assert bool((counts[:-1] >= counts[1:]).all())


def test_war_and_peace_line_deletion_is_sed_like():
    lines = [f"l{i}" for i in range(1, 65_100)]
    kept = data_module.preprocess_war_and_peace("\n".join(lines)).split("\n")
    # 29 + 771 + 358 lines deleted; the first kept line is original line 30
    assert len(kept) == len(lines) - 29 - 771 - 358
    assert kept[:4] == ["l30", "l31", "l32", "l33"]
    assert kept[4] == "l805"  # lines 5..775 of the result = originals 34..804


# -- character batching ---------------------------------------------------------------------
def test_char_windows_continue_rows_across_batches():
    ids = torch.arange(1001)
    x, y = char_windows(ids, batch_size=4, seq_len=5)
    n = (1001 - 1) // 20
    assert x.shape == y.shape == (n, 4, 5)
    assert torch.equal(y[:, :, :-1], x[:, :, 1:])  # y is x shifted by one
    # row i of window t+1 continues row i of window t (what the carried state needs)
    assert torch.equal(x[1:, :, 0], x[:-1, :, -1] + 1)
    assert torch.equal(x.transpose(0, 1).reshape(-1), ids[: n * 20])


def test_char_windows_refuses_too_short_corpus():
    with pytest.raises(ValueError, match="too short"):
        char_windows(torch.arange(10), 4, 5)


def test_vocabulary_by_descending_frequency():
    text = encode_text("abbcccdddd" * 3)
    assert text.vocabulary == ["d", "c", "b", "a"]
    assert len(text.train) == 24 and len(text.test) == 6


# -- Fashion-MNIST ----------------------------------------------------------------------------
def _write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim,
                                                                      *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_files_gzipped_or_not(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 28, 28))
    labels = rng.integers(0, 10, (7,))
    for key, stem in data_module.FASHION_MNIST_FILES.items():
        _write_idx(tmp_path / stem, images if key.endswith("x") else labels, gz)
    loaded = load_fashion_mnist(tmp_path)
    assert loaded.train_x.shape == (7, 1, 28, 28)
    assert torch.allclose(loaded.train_x[:, 0], torch.from_numpy(images / 255.0).float())
    assert torch.equal(loaded.test_y, torch.from_numpy(labels))
    assert read_idx(next(tmp_path.iterdir())).shape[0] == 7


def test_missing_file_message_names_file_place_and_fix(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        load_fashion_mnist(tmp_path)
    message = str(info.value)
    assert "train-images-idx3-ubyte" in message
    assert str(tmp_path) in message
    assert "dataset-fashion-mnist" in message and "--download" in message
    with pytest.raises(DataNotFoundError, match="war_and_peace.txt"):
        load_war_and_peace(tmp_path)
    with pytest.raises(DataNotFoundError, match="cifar-10-batches-py"):
        load_cifar(10, tmp_path)


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    loaded = load_fashion_mnist(FASHION_MNIST)
    assert loaded.train_x.shape == (60_000, 1, 28, 28)
    assert loaded.test_x.shape == (10_000, 1, 28, 28)
    assert 0.0 <= float(loaded.train_x.min()) and float(loaded.train_x.max()) <= 1.0
    assert torch.equal(torch.bincount(loaded.test_y), torch.full((10,), 1000))


# -- CIFAR (torchvision's pickled layout, written here) -------------------------------------
def _write_cifar(folder: Path, names: list[str], label_key: bytes, classes: int,
                 per_file: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    all_data, all_labels = [], []
    for name in names:
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, classes, per_file).tolist()
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": data, label_key: labels}, handle)
        all_data.append(data)
        all_labels += labels
    return np.concatenate(all_data), np.array(all_labels)


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_pickled_layout(tmp_path, classes):
    if classes == 10:
        folder, train, test, key = ("cifar-10-batches-py",
                                    [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                                    b"labels")
    else:
        folder, train, test, key = "cifar-100-python", ["train"], ["test"], b"fine_labels"
    train_data, train_labels = _write_cifar(tmp_path / folder, train, key, classes, 3, 0)
    _, test_labels = _write_cifar(tmp_path / "test_part", test, key, classes, 3, 1)
    for name in test:
        (tmp_path / "test_part" / name).rename(tmp_path / folder / name)
    loaded = load_cifar(classes, tmp_path)
    assert loaded.num_classes == classes
    assert loaded.train_x.shape == (3 * len(train), 3, 32, 32)
    # channel-major rows: the first 1024 bytes are the red plane
    expected = torch.from_numpy(train_data.reshape(-1, 3, 32, 32) / 255.0).float()
    assert torch.allclose(loaded.train_x, expected)
    assert torch.equal(loaded.train_y, torch.from_numpy(train_labels))
    assert loaded.test_x.shape == (3, 3, 32, 32)
    assert torch.equal(loaded.test_y, torch.from_numpy(test_labels))


def test_cifar_missing_batch_is_named(tmp_path):
    names = [f"data_batch_{i}" for i in range(1, 5)]  # data_batch_5 and test_batch missing
    _write_cifar(tmp_path / "cifar-10-batches-py", names, b"labels", 10, 2, 0)
    with pytest.raises(DataNotFoundError, match="data_batch_5"):
        load_cifar(10, tmp_path)


# -- augmentation and preprocessing ----------------------------------------------------------
def test_random_crop_flip_is_a_shifted_window_of_the_padded_image():
    x = torch.rand(16, 3, 8, 8)
    out = random_crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = 0
    for image, result in zip(padded, out):
        windows = [image[:, i:i + 8, j:j + 8] for i in range(5) for j in range(5)]
        plain = any(torch.equal(w, result) for w in windows)
        flipped = any(torch.equal(w.flip(2), result) for w in windows)
        assert plain or flipped
        flips += flipped and not plain
    assert 0 < flips < 16


def test_colour_jitter_ranges():
    x = torch.full((64, 3, 4, 4), 0.5)  # gray, uniform: saturation and contrast do nothing
    out = colour_jitter(x, torch.Generator().manual_seed(1))
    delta = out[:, 0, 0, 0] - 0.5
    assert float(delta.abs().max()) <= 63 / 255 + 1e-6
    assert float(delta.std()) > 0.05  # random brightness per image
    assert torch.allclose(out, out[:, :1, :1, :1].expand_as(out))


def test_per_image_standardization():
    x = torch.rand(5, 3, 32, 32) * 3 + 1
    out = per_image_standardization(x)
    assert torch.allclose(out.flatten(1).mean(1), torch.zeros(5), atol=1e-5)
    assert torch.allclose(out.flatten(1).std(1, unbiased=False), torch.ones(5), atol=1e-4)
    constant = per_image_standardization(torch.ones(1, 3, 4, 4))
    assert torch.equal(constant, torch.zeros(1, 3, 4, 4))  # no division by zero


# -- image batching ---------------------------------------------------------------------------
def test_image_batches_are_a_pure_function_of_seed_and_step():
    data = data_module.synthetic_images((1, 4, 4), 10, 50, 20, seed=0)
    batches = ImageBatches(data, batch_size=8, seed=3)
    assert batches.batches_per_epoch == 6
    epoch = torch.cat([batches.train_batch(s)[1] for s in range(6)])
    seen = torch.cat([batches.train_batch(s)[0] for s in range(6)]).flatten(1)
    # one epoch: 48 distinct examples (the last 2 dropped)
    assert len({tuple(row.tolist()) for row in seen}) == 48
    fresh = ImageBatches(data, batch_size=8, seed=3)
    assert torch.equal(fresh.train_batch(4)[0], batches.train_batch(4)[0])  # any order
    other_seed = ImageBatches(data, batch_size=8, seed=4)
    assert not torch.equal(other_seed.train_batch(0)[0], batches.train_batch(0)[0])
    next_epoch = torch.cat([batches.train_batch(s)[1] for s in range(6, 12)])
    assert not torch.equal(epoch, next_epoch)  # reshuffled
    test = list(batches.eval_batches("test"))
    train = list(batches.eval_batches("train"))
    assert sum(len(y) for _, y in test) == sum(len(y) for _, y in train) == 20


# -- damaged or inconsistent files: refused on load, naming the file (issue 12) ---------------
def _fashion_mnist_folder(tmp_path: Path, labels=None) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for key, stem in data_module.FASHION_MNIST_FILES.items():
        array = rng.integers(0, 256, (7, 28, 28)) if key.endswith("x") else \
            (rng.integers(0, 10, (7,)) if labels is None or key != "train_y" else labels)
        _write_idx(tmp_path / stem, array, gz=True)
    return tmp_path


@pytest.mark.parametrize("damage", ["truncated", "empty", "not gzip", "short header"])
def test_a_damaged_idx_file_is_named(tmp_path, damage):
    folder = _fashion_mnist_folder(tmp_path)
    path = folder / "train-images-idx3-ubyte.gz"
    good = path.read_bytes()
    if damage == "short header":
        with gzip.open(path, "wb") as handle:
            handle.write(b"\x00\x00")
    else:
        path.write_bytes({"truncated": good[:len(good) // 2], "empty": b"",
                          "not gzip": b"<html>404</html>"}[damage])
    with pytest.raises(DataFileError, match="train-images-idx3-ubyte.gz") as info:
        load_fashion_mnist(folder)
    assert "--download" in str(info.value)


def test_labels_out_of_range_or_not_one_per_image_are_named(tmp_path):
    folder = _fashion_mnist_folder(tmp_path / "range", labels=np.array([0, 1, 2, 3, 4, 5, 12]))
    with pytest.raises(DataFileError, match=r"train-labels-idx1-ubyte.gz holds labels .* 0\.\.9"):
        load_fashion_mnist(folder)
    folder = _fashion_mnist_folder(tmp_path / "count", labels=np.array([0, 1, 2]))
    with pytest.raises(DataFileError, match="3 labels for the 7 images"):
        load_fashion_mnist(folder)


def test_a_damaged_cifar_batch_is_named(tmp_path):
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    _write_cifar(tmp_path / "cifar-10-batches-py", names, b"labels", 10, 2, 0)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(DataFileError, match="data_batch_3"):
        load_cifar(10, tmp_path)
    with open(batch, "wb") as handle:  # labels beyond CIFAR-10's ten classes
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 10]}, handle)
    with pytest.raises(DataFileError, match=r"data_batch_3 holds labels from 3 to 10"):
        load_cifar(10, tmp_path)


def test_a_damaged_data_file_refuses_the_run_in_one_line(tmp_path, capsys):
    from msvag_mb.cli import train_main

    folder = _fashion_mnist_folder(tmp_path / "data")
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08truncated")
    code = train_main(["--problem", "fmnist_2c2d", "--data-dir", str(folder), "--out",
                       str(tmp_path / "runs"), "--no-progress"])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "t10k-labels-idx1-ubyte.gz" in error
    assert not (tmp_path / "runs").exists()
