"""Data for the test problems: file loaders, preprocessing, augmentation and batching.

Loaders read the standard files from a data directory (see :func:`search_dirs`): the
Fashion-MNIST IDX files (gzipped or not), torchvision's pickled CIFAR layouts
(``cifar-10-batches-py``, ``cifar-100-python``) and the Gutenberg *War and Peace* text.
A missing file raises :class:`DataNotFoundError` naming the file, the folders searched and
how to get it; a damaged or inconsistent one (truncated, not gzip, labels out of range or
not one per image) raises :class:`DataFileError` naming the file, when it is loaded.

Batching is a pure function of the step index and the seed (the permutation of epoch ``e``
and the augmentation of step ``k`` come from generators seeded by ``(seed, e)`` and
``(seed, k)``), so a resumed run sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import tarfile
import urllib.request
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

#: folders searched for data files (separated by ``os.pathsep``) before the standard places
DATA_PATH_VARIABLE = "MSVAG_DATA_DIR"


class DataNotFoundError(FileNotFoundError):
    """A data file is missing; the message says which, where we looked, and how to get it."""


class DataFileError(ValueError):
    """A data file is damaged or does not fit its companions; the message names it."""


_GET_AGAIN = "download it again (delete it and pass --download, or copy it anew)"


def check_labels(images: Tensor, labels: Tensor, num_classes: int, images_file: str,
                 labels_file: str) -> None:
    """One label per image, each in ``[0, num_classes)``; a :class:`DataFileError` naming
    the files otherwise."""
    if labels.dim() != 1 or len(labels) != len(images):
        raise DataFileError(f"{labels_file} holds {labels.numel()} labels for the "
                            f"{len(images)} images of {images_file}: the files do not belong "
                            "together; download both again (delete them and pass "
                            "--download, or copy them anew)")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataFileError(f"{labels_file} holds labels from {int(labels.min())} to "
                            f"{int(labels.max())}, outside 0..{num_classes - 1}; {_GET_AGAIN}")


def search_dirs(data_dir: str | os.PathLike | None) -> list[Path]:
    """Folders searched for data files, in order.

    With ``data_dir`` given, only that folder. Otherwise: the folders listed in
    ``$MSVAG_DATA_DIR`` (one, or several separated by ``os.pathsep``, ``:`` on POSIX),
    then ``~/data``, ``./data`` and ``/usr/share/datasets`` (Debian's ``dataset-*``
    packages). Each folder is also searched in the dataset's usual subfolders (e.g.
    ``fashion-mnist``).
    """
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    listed = os.environ.get(DATA_PATH_VARIABLE, "").split(os.pathsep)
    candidates = [Path(folder).expanduser() for folder in listed if folder]
    candidates += [Path("~/data").expanduser(), Path("data"), Path("/usr/share/datasets")]
    unique: list[Path] = []
    for path in candidates:
        if path not in unique:
            unique.append(path)
    return unique


def _find(names: Sequence[str], subdirs: Sequence[str], data_dir, what: str,
          how_to_get: str) -> Path:
    """First existing ``dir/sub/name`` over :func:`search_dirs`, else a clear error."""
    tried = []
    for base in search_dirs(data_dir):
        for sub in ("", *subdirs):
            folder = base / sub if sub else base
            tried.append(str(folder))
            for name in names:
                if (folder / name).is_file():
                    return folder / name
    raise DataNotFoundError(
        f"{what}: file {' or '.join(repr(n) for n in names)} not found. Searched: "
        f"{', '.join(tried)}. {how_to_get} Or pass --data synthetic for a smoke run on "
        "random tensors of the same shapes."
    )


def _download(url: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} -> {target}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:
            out.write(response.read())
    except OSError as error:
        raise DataNotFoundError(
            f"could not download {url} ({error}); fetch it by hand into {target.parent}."
        ) from error


def _download_dir(data_dir) -> Path:
    return Path(data_dir).expanduser() if data_dir is not None else Path("~/data").expanduser()


# ---------------------------------------------------------------------------------------
# Containers
# ---------------------------------------------------------------------------------------
@dataclass
class ImageData:
    """Images ``(N, C, H, W)`` float32 in [0, 1] and integer labels."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int


@dataclass
class TextData:
    """A character corpus as token ids, split into train and test, with its vocabulary."""

    train: Tensor
    test: Tensor
    vocabulary: list[str]


# ---------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files)
# ---------------------------------------------------------------------------------------
FASHION_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
_FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_FASHION_MNIST_SUBDIRS = ("fashion-mnist", "FashionMNIST/raw", "fashion_mnist", "FashionMNIST")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain) into an array of its declared shape; a damaged
    file raises :class:`DataFileError` naming it."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    except (OSError, EOFError, zlib.error, struct.error) as error:  # BadGzipFile: OSError
        reason = str(error) or type(error).__name__
        raise DataFileError(f"{path} is not a readable IDX file ({reason}): it is truncated "
                            f"or damaged; {_GET_AGAIN}") from error
    if zero != 0 or dtype_code != 0x08:
        raise DataFileError(f"{path} is not an unsigned-byte IDX file (header {data[:4]!r}); "
                            f"{_GET_AGAIN}")
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != math.prod(shape):
        raise DataFileError(f"{path} is truncated: {array.size} bytes for shape {shape}; "
                            f"{_GET_AGAIN}")
    return array.reshape(shape)


def load_fashion_mnist(data_dir=None, download: bool = False) -> ImageData:
    """Fashion-MNIST from its four IDX files, inputs scaled to [0, 1], shape (N, 1, 28, 28)."""
    arrays, paths = {}, {}
    for key, stem in FASHION_MNIST_FILES.items():
        names = (stem + ".gz", stem)
        how = ("Install the Debian package 'dataset-fashion-mnist' (files in "
               "/usr/share/datasets/fashion-mnist), download the files from "
               f"{_FASHION_MNIST_URL} into --data-dir, or pass --download.")
        try:
            path = _find(names, _FASHION_MNIST_SUBDIRS, data_dir, "Fashion-MNIST", how)
        except DataNotFoundError:
            if not download:
                raise
            path = _download_dir(data_dir) / "fashion-mnist" / (stem + ".gz")
            _download(_FASHION_MNIST_URL + stem + ".gz", path)
        arrays[key] = read_idx(path)
        paths[key] = path
    for key in ("train_x", "test_x"):
        if arrays[key].ndim != 3 or arrays[key].shape[1:] != (28, 28):
            raise DataFileError(f"{paths[key]} holds images of shape {arrays[key].shape[1:]}, "
                                f"not 28x28: it is not a Fashion-MNIST file; {_GET_AGAIN}")
    images = {k: torch.from_numpy(arrays[k].astype(np.float32) / 255.0).unsqueeze(1)
              for k in ("train_x", "test_x")}
    labels = {k: torch.from_numpy(arrays[k].astype(np.int64)) for k in ("train_y", "test_y")}
    for split in ("train", "test"):
        check_labels(images[f"{split}_x"], labels[f"{split}_y"], 10, paths[f"{split}_x"],
                     paths[f"{split}_y"])
    return ImageData(images["train_x"], labels["train_y"], images["test_x"],
                     labels["test_y"], 10)


# ---------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (torchvision's pickled python layouts)
# ---------------------------------------------------------------------------------------
_CIFAR = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
         b"labels", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    100: ("cifar-100-python", ["train"], ["test"], b"fine_labels",
          "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}


def _read_cifar_files(paths: list[Path], label_key: bytes,
                      num_classes: int) -> tuple[Tensor, Tensor]:
    images, labels = [], []
    for path in paths:
        try:
            with open(path, "rb") as handle:
                entry = pickle.load(handle, encoding="bytes")
            file_images = np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            file_labels = np.asarray(entry[label_key], dtype=np.int64)
        except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError,
                ValueError) as error:
            raise DataFileError(f"{path} is not a readable CIFAR-{num_classes} batch "
                                f"({type(error).__name__}: {error}); {_GET_AGAIN}") from error
        check_labels(file_images, torch.from_numpy(file_labels), num_classes, str(path),
                     str(path))
        images.append(file_images)
        labels.append(file_labels)
    x = torch.from_numpy(np.concatenate(images).astype(np.float32) / 255.0)
    return x, torch.from_numpy(np.concatenate(labels))


def load_cifar(num_classes: int, data_dir=None, download: bool = False) -> ImageData:
    """CIFAR-10 or CIFAR-100 from torchvision's pickled layout, inputs in [0, 1]."""
    if num_classes not in _CIFAR:
        raise ValueError(f"Invalid CIFAR variant: {num_classes} (use 10 or 100)")
    folder, train_names, test_names, label_key, url = _CIFAR[num_classes]
    how = (f"Put torchvision's '{folder}' folder (from {url}) into --data-dir, or pass "
           "--download.")
    what = f"CIFAR-{num_classes}"
    try:
        first = _find([train_names[0]], (folder,), data_dir, what, how)
    except DataNotFoundError:
        if not download:
            raise
        archive = _download_dir(data_dir) / Path(url).name
        _download(url, archive)
        with tarfile.open(archive) as tar:
            try:
                tar.extractall(archive.parent, filter="data")  # refuses unsafe members
            except TypeError:  # Python < 3.10.12 / 3.11.4: no filter argument
                tar.extractall(archive.parent)
        first = _find([train_names[0]], (folder,), data_dir or archive.parent, what, how)
    directory = first.parent
    for name in train_names + test_names:
        if not (directory / name).is_file():
            raise DataNotFoundError(f"{what}: file '{name}' is missing in {directory}. {how}")
    train_x, train_y = _read_cifar_files([directory / n for n in train_names], label_key,
                                         num_classes)
    test_x, test_y = _read_cifar_files([directory / n for n in test_names], label_key,
                                       num_classes)
    return ImageData(train_x, train_y, test_x, test_y, num_classes)


# ---------------------------------------------------------------------------------------
# scikit-learn's digits (bundled with scikit-learn: always available)
# ---------------------------------------------------------------------------------------
def load_digits_data(test_fraction: float = 0.2) -> ImageData:
    """The 1,797 8x8 digits, scaled to [0, 1]; a fixed shuffled split (seed 0), 20% test."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    # the split must not depend on the run's seed: seeds vary the training, not the task
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return ImageData(x[train], y[train], x[test], y[test], 10)


# ---------------------------------------------------------------------------------------
# Character corpora
# ---------------------------------------------------------------------------------------
WAR_AND_PEACE_FILE = "war_and_peace.txt"
_WAR_AND_PEACE_URL = "http://www.gutenberg.org/files/2600/2600-0.txt"
#: checks of the preprocessing (docs/problems.md): characters, vocabulary, test characters
WAR_AND_PEACE_CHARS = 3_266_185
WAR_AND_PEACE_VOCAB = 83
WAR_AND_PEACE_TEST_CHARS = 653_237


def _delete_lines(lines: list[str], first: int, last: int) -> list[str]:
    """Delete 1-based lines ``first..last`` inclusive (``sed 'first,lastd'``)."""
    return lines[:first - 1] + lines[last:]


def preprocess_war_and_peace(raw: str) -> str:
    """DeepOBS's preprocessing of Gutenberg #2600: strip the licence header and footer.

    ``raw`` must be read without newline translation (``newline=''``), so CR stays a
    character of the vocabulary. Lines are split at LF as ``sed`` does.
    """
    lines = raw.split("\n")
    lines = _delete_lines(lines, 1, 29)
    lines = _delete_lines(lines, 5, 775)
    lines = _delete_lines(lines, 63850, 64207)
    return "\n".join(lines)


def build_vocabulary(text: str) -> list[str]:
    """Distinct characters by descending frequency (ties by code point, for determinism)."""
    counts = Counter(text)
    return sorted(counts, key=lambda ch: (-counts[ch], ord(ch)))


def encode_text(text: str, test_fraction: float = 0.2) -> TextData:
    """Token ids over :func:`build_vocabulary`; train = first ceil(0.8 N) characters."""
    vocabulary = build_vocabulary(text)
    index = {ch: i for i, ch in enumerate(vocabulary)}
    ids = torch.tensor([index[ch] for ch in text], dtype=torch.long)
    n_train = math.ceil((1.0 - test_fraction) * len(ids))
    return TextData(ids[:n_train], ids[n_train:], vocabulary)


def load_war_and_peace(data_dir=None, download: bool = False) -> TextData:
    """War and Peace as in DeepOBS ``tolstoi``: 3,266,185 characters, vocabulary 83."""
    how = ("It is Project Gutenberg's #2600 (UTF-8, CRLF, 3,291,641 bytes). Pass --data-dir "
           "DIR holding it, list DIR in $MSVAG_DATA_DIR, or pass --download.")
    try:
        path = _find([WAR_AND_PEACE_FILE], ("tolstoi",), data_dir, "War and Peace", how)
    except DataNotFoundError:
        if not download:
            raise
        path = _download_dir(data_dir) / WAR_AND_PEACE_FILE
        _download(_WAR_AND_PEACE_URL, path)
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            text = preprocess_war_and_peace(handle.read())
    except UnicodeDecodeError as error:
        raise DataFileError(f"{path} is not UTF-8 text ({error}): it is not Gutenberg's "
                            f"#2600 or it is damaged; {_GET_AGAIN}") from error
    if len(text) != WAR_AND_PEACE_CHARS:
        raise ValueError(
            f"{path} gives {len(text)} characters after preprocessing, expected "
            f"{WAR_AND_PEACE_CHARS}: it is not the edition DeepOBS used (Gutenberg #2600, "
            "3,291,641 bytes, CRLF line ends; do not convert line ends)."
        )
    return encode_text(text)


def load_pydoc_text() -> TextData:
    """CPython's bundled documentation topics (``pydoc_data.topics``), ~465k characters."""
    try:
        from pydoc_data.topics import topics
    except ImportError as error:  # some distributions strip it
        raise DataNotFoundError(
            "pydoc_data.topics is missing from this Python installation (some distributions "
            "package it separately, e.g. Debian's 'python3-doc'); use problem "
            "tolstoi_char_rnn or --data synthetic."
        ) from error
    return encode_text("".join(topics[key] for key in sorted(topics)))


# ---------------------------------------------------------------------------------------
# Synthetic data (smoke runs and tests)
# ---------------------------------------------------------------------------------------
def synthetic_images(shape: tuple[int, int, int], num_classes: int, n_train: int,
                     n_test: int, seed: int = 0) -> ImageData:
    """Uniform random images of ``shape`` (C, H, W) in [0, 1] with random labels."""
    generator = torch.Generator().manual_seed(seed)
    return ImageData(
        torch.rand(n_train, *shape, generator=generator, dtype=torch.float32),
        torch.randint(num_classes, (n_train,), generator=generator),
        torch.rand(n_test, *shape, generator=generator, dtype=torch.float32),
        torch.randint(num_classes, (n_test,), generator=generator),
        num_classes,
    )


def synthetic_text(vocab_size: int, n_train: int, n_test: int, seed: int = 0) -> TextData:
    """Uniform random token ids (a corpus with ``vocab_size`` symbols)."""
    generator = torch.Generator().manual_seed(seed)
    return TextData(
        torch.randint(vocab_size, (n_train,), generator=generator),
        torch.randint(vocab_size, (n_test,), generator=generator),
        [chr(ord("a") + i % 26) for i in range(vocab_size)],
    )


# ---------------------------------------------------------------------------------------
# Augmentation (P2, P3): DeepOBS's CIFAR pipeline, batched
# ---------------------------------------------------------------------------------------
def per_image_standardization(x: Tensor) -> Tensor:
    """TensorFlow's ``per_image_standardization``: (x - mean) / max(std, 1/sqrt(numel))."""
    flat = x.flatten(1)
    mean = flat.mean(1)
    std = flat.std(1, unbiased=False).clamp(min=1.0 / math.sqrt(flat.shape[1]))
    shape = (-1,) + (1,) * (x.dim() - 1)
    return (x - mean.view(shape)) / std.view(shape)


def _grayscale(x: Tensor) -> Tensor:
    weights = x.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def random_crop_flip(x: Tensor, generator: torch.Generator, pad: int = 2) -> Tensor:
    """Zero-pad by ``pad``, crop a random window of the original size, flip half the images."""
    batch, channels, height, width = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    top = torch.randint(2 * pad + 1, (batch,), generator=generator)
    left = torch.randint(2 * pad + 1, (batch,), generator=generator)
    rows = (top[:, None] + torch.arange(height)).view(batch, 1, height, 1)
    cols = (left[:, None] + torch.arange(width)).view(batch, 1, 1, width)
    out = padded[torch.arange(batch).view(batch, 1, 1, 1),
                 torch.arange(channels).view(1, channels, 1, 1), rows, cols]
    flip = torch.rand(batch, generator=generator) < 0.5
    return torch.where(flip.view(batch, 1, 1, 1), out.flip(3), out)


def colour_jitter(x: Tensor, generator: torch.Generator) -> Tensor:
    """DeepOBS's colour jitter, per image: brightness delta uniform in ±63/255 (additive),
    saturation factor in [0.5, 1.5], contrast factor in [0.2, 1.8], in that order, no
    clipping. Saturation blends with the grayscale image (torchvision's definition) instead
    of TensorFlow's HSV scaling: the same at factor 1 and for gray pixels, close otherwise.
    Contrast scales the deviation from each channel's mean (TensorFlow's definition).
    """
    batch, channels = x.shape[:2]

    def factor(low: float, high: float) -> Tensor:
        draw = torch.rand(batch, generator=generator, dtype=x.dtype)
        return (low + (high - low) * draw).view(batch, 1, 1, 1)

    out = x + factor(-63.0 / 255.0, 63.0 / 255.0)
    if channels == 3:
        gray = _grayscale(out)
        out = gray + factor(0.5, 1.5) * (out - gray)
    mean = out.mean(dim=(2, 3), keepdim=True)
    return mean + factor(0.2, 1.8) * (out - mean)


def augment_cifar(x: Tensor, generator: torch.Generator) -> Tensor:
    """P2/P3 training augmentation: :func:`random_crop_flip` (pad 2), then
    :func:`colour_jitter`; per-image standardisation follows as preprocessing."""
    return colour_jitter(random_crop_flip(x, generator, pad=2), generator)


# ---------------------------------------------------------------------------------------
# Batch providers used by the runner
# ---------------------------------------------------------------------------------------
def _mix(seed: int, *values: int) -> int:
    """A 63-bit seed from the run's seed and step/epoch indices (deterministic, no hash())."""
    state = (seed * 6364136223846793005 + 1442695040888963407) % (1 << 63)
    for value in values:
        state = (state * 6364136223846793005 + value * 2654435761 + 1) % (1 << 63)
    return state


def step_seed(seed: int, step: int) -> int:
    """Seed of the global RNG at training step ``step`` (dropout masks)."""
    return _mix(seed, 1, step)


class ImageBatches:
    """Shuffled mini-batches of an :class:`ImageData`; epoch ``e`` uses permutation ``(seed, e)``.

    Incomplete last batches are dropped (``N // B`` batches per epoch). ``augment`` is
    applied to training batches only; ``preprocess`` to every batch (training and
    evaluation). Evaluation uses the full test set and the first ``len(test)`` training
    examples (no augmentation).
    """

    def __init__(self, data: ImageData, batch_size: int, seed: int,
                 augment: Callable[[Tensor, torch.Generator], Tensor] | None = None,
                 preprocess: Callable[[Tensor], Tensor] | None = None,
                 eval_batch_size: int = 1000) -> None:
        if batch_size > len(data.train_y):
            raise ValueError(f"batch size {batch_size} exceeds the {len(data.train_y)} "
                             "training examples; use a smaller --batch-size.")
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.augment = augment
        self.preprocess = preprocess
        self.eval_batch_size = eval_batch_size
        self.batches_per_epoch = len(data.train_y) // batch_size
        self._epoch = -1
        self._order: Tensor | None = None

    def train_batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The training batch of step ``step`` (a pure function of seed and step)."""
        epoch, position = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(_mix(self.seed, 2, epoch))
            self._order = torch.randperm(len(self.data.train_y), generator=generator)
            self._epoch = epoch
        index = self._order[position * self.batch_size:(position + 1) * self.batch_size]
        x, y = self.data.train_x[index], self.data.train_y[index]
        if self.augment is not None:
            x = self.augment(x, torch.Generator().manual_seed(_mix(self.seed, 3, step)))
        if self.preprocess is not None:
            x = self.preprocess(x)
        return x, y

    def is_epoch_start(self, step: int) -> bool:
        """Whether step ``step`` draws the first batch of an epoch."""
        return step % self.batches_per_epoch == 0

    def eval_batches(self, split: str) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches of the test set (``"test"``) or the equally sized training slice."""
        n_test = len(self.data.test_y)
        if split == "test":
            x, y = self.data.test_x, self.data.test_y
        elif split == "train":
            x, y = self.data.train_x[:n_test], self.data.train_y[:n_test]
        else:
            raise ValueError(f"Invalid split: {split!r} (use 'train' or 'test')")
        for start in range(0, len(y), self.eval_batch_size):
            xb, yb = x[start:start + self.eval_batch_size], y[start:start + self.eval_batch_size]
            yield (self.preprocess(xb) if self.preprocess else xb), yb


def char_windows(ids: Tensor, batch_size: int, seq_len: int) -> tuple[Tensor, Tensor]:
    """DeepOBS's character batching: ``n`` windows of shape ``(B, T)`` for x and y.

    ``n = floor((len - 1) / (B T))``; ``x = a[:nBT]``, ``y = a[1:nBT+1]``, each reshaped to
    ``(B, -1)`` and cut into ``n`` windows along time, so row ``i`` of window ``t+1``
    continues row ``i`` of window ``t`` (what the carried LSTM state needs).
    Returns ``(x, y)`` of shape ``(n, B, T)``.
    """
    n = (len(ids) - 1) // (batch_size * seq_len)
    if n == 0:
        raise ValueError(f"a corpus of {len(ids)} characters is too short for one batch of "
                         f"{batch_size}x{seq_len}; use a smaller --batch-size.")
    length = n * batch_size * seq_len
    x = ids[:length].view(batch_size, n, seq_len).transpose(0, 1).contiguous()
    y = ids[1:length + 1].view(batch_size, n, seq_len).transpose(0, 1).contiguous()
    return x, y


class CharBatches:
    """Sequential windows of a :class:`TextData` for stateful truncated BPTT.

    Training walks through the windows in order, epoch after epoch; the LSTM state is reset
    at each epoch start. Evaluation walks through all test windows and through equally many
    training windows, each pass from a zero state.
    """

    def __init__(self, data: TextData, batch_size: int, seq_len: int = 50) -> None:
        self.data = data
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.train_x, self.train_y = char_windows(data.train, batch_size, seq_len)
        self.test_x, self.test_y = char_windows(data.test, batch_size, seq_len)
        self.batches_per_epoch = self.train_x.shape[0]

    def train_batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The training window of step ``step``: ``(x, y)`` of shape ``(B, T)``, in order."""
        position = step % self.batches_per_epoch
        return self.train_x[position], self.train_y[position]

    def is_epoch_start(self, step: int) -> bool:
        """Whether step ``step`` is at the first window of an epoch (reset the LSTM state)."""
        return step % self.batches_per_epoch == 0

    def eval_batches(self, split: str) -> Iterator[tuple[Tensor, Tensor]]:
        """The test windows (``"test"``) or as many training windows (``"train"``), in order."""
        if split == "test":
            x, y = self.test_x, self.test_y
        elif split == "train":
            count = min(self.test_x.shape[0], self.train_x.shape[0])
            x, y = self.train_x[:count], self.train_y[:count]
        else:
            raise ValueError(f"Invalid split: {split!r} (use 'train' or 'test')")
        for window in range(x.shape[0]):
            yield x[window], y[window]
