"""CIFAR-10 from the standard python-pickle batch files in a folder the user names (no download)."""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn._validation import check_bool
from lightning_bn.experiments.data._common import (
    _check_non_negative_int,
    _check_positive_int,
    _check_seed,
    _loader,
)

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_TEST_FILE",
    "CIFAR10_TRAIN_FILES",
    "CIFAR10DataModule",
    "find_cifar10_dir",
    "random_crop_flip",
    "read_cifar10_batch",
    "write_cifar10_like",
]


#: Training files of the CIFAR-10 python version, in order.
CIFAR10_TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
#: Test file of the CIFAR-10 python version.
CIFAR10_TEST_FILE = "test_batch"
#: Per-channel mean of the CIFAR-10 training images (RGB, pixels scaled to [0, 1]).
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
#: Per-channel standard deviation of the CIFAR-10 training images (RGB, pixels in [0, 1]).
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
#: Class names, in label order.
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_CIFAR_SUBDIR = "cifar-10-batches-py"  # the folder the official archive extracts to
_CIFAR_PIXELS = 3 * 32 * 32


def find_cifar10_dir(data_dir: str | os.PathLike[str]) -> Path:
    """Return the folder holding the CIFAR-10 batch files: ``data_dir`` or its ``cifar-10-batches-py``.

    Args:
        data_dir: the folder the user named.

    Returns:
        The folder with ``data_batch_1`` … ``data_batch_5`` and ``test_batch``.

    Raises:
        FileNotFoundError: ``data_dir`` is not a folder, or files are missing (all listed).
    """
    root = Path(data_dir).expanduser()
    needed = [*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE]
    if not root.is_dir():
        raise FileNotFoundError(
            f"CIFAR-10 folder {str(root)!r} does not exist or is not a folder; expected the "
            f"python-version batch files {', '.join(needed)} in it (nothing is downloaded)"
        )
    candidates = [root, root / _CIFAR_SUBDIR]
    for folder in candidates:
        if all((folder / name).is_file() for name in needed):
            return folder
    # Report against the folder that holds more of the files (the user's folder on a tie).
    best = max(candidates, key=lambda f: sum((f / n).is_file() for n in needed))
    missing = [name for name in needed if not (best / name).is_file()]
    raise FileNotFoundError(
        f"CIFAR-10 files missing in {str(best)!r}: {', '.join(missing)}. Expected the python-version "
        f"batch files {', '.join(needed)} (as extracted from cifar-10-python.tar.gz); "
        "nothing is downloaded"
    )


def _get(entry: dict[Any, Any], key: str) -> Any:
    if key.encode() in entry:
        return entry[key.encode()]
    return entry.get(key)


def read_cifar10_batch(path: str | os.PathLike[str]) -> tuple[Tensor, Tensor]:
    """Read one CIFAR-10 python batch file.

    The file is a pickle of a dict with ``b"data"``: uint8 ``(N, 3072)``, each row the red, green
    and blue 32×32 planes in row-major order, and ``b"labels"``: ``N`` integers in 0-9 (string keys
    are accepted too).

    Args:
        path: the batch file.

    Returns:
        ``(images, labels)``: uint8 ``(N, 3, 32, 32)`` and int64 ``(N,)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a batch in that format (the message says what is wrong).
    """
    path = Path(path)
    with path.open("rb") as f:
        try:
            entry = pickle.load(f, encoding="bytes")
        except Exception as err:  # any unpickling failure means "not a batch file"
            raise ValueError(f"{str(path)!r} is not a CIFAR-10 pickle batch file: {err}") from err
    if not isinstance(entry, dict):
        raise ValueError(f"{str(path)!r}: expected a pickled dict, got {type(entry).__name__}")
    data, labels = _get(entry, "data"), _get(entry, "labels")
    if data is None or labels is None:
        raise ValueError(f"{str(path)!r}: expected keys b'data' and b'labels', got {list(entry)}")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
        raise ValueError(
            f"{str(path)!r}: expected b'data' of dtype uint8 and shape (N, {_CIFAR_PIXELS}), "
            f"got {data.dtype} {data.shape}"
        )
    label_array = np.asarray(labels, dtype=np.int64).reshape(-1)
    if label_array.shape[0] != data.shape[0]:
        raise ValueError(f"{str(path)!r}: {data.shape[0]} images but {label_array.shape[0]} labels")
    if label_array.size and (label_array.min() < 0 or label_array.max() > 9):
        raise ValueError(f"{str(path)!r}: labels must lie in 0-9")
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(label_array.copy())


def write_cifar10_like(
    data_dir: str | os.PathLike[str],
    n_per_batch: int = 20,
    seed: int = 0,
) -> Path:
    """Write small CIFAR-10 batch files in the python-pickle format, for tests and demos.

    Writes ``data_batch_1`` … ``data_batch_5``, ``test_batch`` (each ``n_per_batch`` images) and
    ``batches.meta`` into ``data_dir`` (created if needed), with the keys of the real files
    (``b"batch_label"``, ``b"labels"``, ``b"data"``, ``b"filenames"``). Labels cycle through the 10
    classes in a shuffled order; each image mixes a fixed per-class colour pattern with noise, so
    a small network can learn the classes.

    Args:
        data_dir: destination folder.
        n_per_batch: images per file.
        seed: seed of the images and labels.

    Returns:
        ``data_dir`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``n_per_batch`` not a positive integer or a negative seed.
    """
    _check_positive_int("n_per_batch", n_per_batch)
    _check_seed(seed)
    root = Path(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, size=(10, _CIFAR_PIXELS)).astype(np.float64)
    names = [*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE]
    for i, name in enumerate(names):
        labels = rng.permutation(np.arange(n_per_batch) % 10)
        noise = rng.integers(0, 256, size=(n_per_batch, _CIFAR_PIXELS)).astype(np.float64)
        data = np.clip(0.6 * templates[labels] + 0.4 * noise, 0, 255).astype(np.uint8)
        title = (
            "testing batch 1 of 1" if name == CIFAR10_TEST_FILE else f"training batch {i + 1} of 5"
        )
        entry = {
            b"batch_label": title.encode(),
            b"labels": [int(v) for v in labels],
            b"data": data,
            b"filenames": [f"{name}_{j:05d}.png".encode() for j in range(n_per_batch)],
        }
        with (root / name).open("wb") as f:
            pickle.dump(entry, f, protocol=2)
    meta = {
        b"num_cases_per_batch": n_per_batch,
        b"label_names": [c.encode() for c in CIFAR10_CLASSES],
        b"num_vis": _CIFAR_PIXELS,
    }
    with (root / "batches.meta").open("wb") as f:
        pickle.dump(meta, f, protocol=2)
    return root


def random_crop_flip(
    images: Tensor,
    padding: int = 4,
    flip_prob: float = 0.5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random crop after zero padding, and random horizontal flip, for a batch (vectorised).

    Each image of ``(N, C, H, W)`` is padded with ``padding`` zeros on every side, cropped back to
    ``H × W`` at an offset drawn uniformly from ``{0, …, 2·padding}²``, and mirrored left-right
    with probability ``flip_prob`` (torchvision's ``RandomCrop(H, padding)`` +
    ``RandomHorizontalFlip()`` applied per image, before normalisation: the padding is black).

    Args:
        images: batch ``(N, C, H, W)`` of any dtype.
        padding: zero padding on each side.
        flip_prob: probability of the horizontal flip.
        generator: source of randomness (the global RNG when ``None``).

    Returns:
        A new ``(N, C, H, W)`` tensor of the same dtype.

    Raises:
        ValueError: ``images`` not 4-D, a negative ``padding`` or ``flip_prob`` outside [0, 1].
    """
    if images.dim() != 4:
        raise ValueError(f"Expected images of shape (N, C, H, W), got {tuple(images.shape)}")
    _check_non_negative_int("padding", padding)
    if isinstance(flip_prob, bool) or not isinstance(flip_prob, (int, float)):
        raise ValueError(
            f"Expected argument `flip_prob` to be a number in [0, 1], but got {flip_prob!r}"
        )
    if not 0 <= flip_prob <= 1:
        raise ValueError(
            f"Expected argument `flip_prob` to be a number in [0, 1], but got {flip_prob!r}"
        )
    n, _, h, w = images.shape
    device = images.device
    out = images
    if padding > 0:
        padded = F.pad(images, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(device)
        ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(device)
        rows = oy[:, None] + torch.arange(h, device=device)  # (N, H)
        cols = ox[:, None] + torch.arange(w, device=device)  # (N, W)
        batch = torch.arange(n, device=device)[:, None, None]
        # Index (N, Hp, Wp, C) with (N, H, W) grids -> (N, H, W, C).
        out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
        out = out.permute(0, 3, 1, 2)
    if flip_prob > 0:
        flip = (torch.rand(n, generator=generator) < flip_prob).to(device)
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out.contiguous()


class _CifarCollate:
    """Stack uint8 images, optionally augment, scale to [0, 1] and normalise per channel.

    A module-level class so that worker processes can pickle it; its randomness comes from the
    global RNG, which the DataLoader seeds differently in each worker.
    """

    def __init__(
        self, mean: Sequence[float], std: Sequence[float], augment: bool, padding: int
    ) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.augment = augment
        self.padding = padding

    def __call__(self, batch: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        images = torch.stack([item[0] for item in batch])
        labels = torch.stack([item[1] for item in batch])
        if self.augment:
            images = random_crop_flip(images, self.padding)
        x = images.to(torch.float32).div_(255.0)
        return (x - self.mean) / self.std, labels


def _check_channel_stats(name: str, values: Sequence[float]) -> tuple[float, float, float]:
    vals = tuple(float(v) for v in values)
    if len(vals) != 3 or not all(math.isfinite(v) for v in vals):
        raise ValueError(f"Expected argument `{name}` to be 3 finite numbers, but got {values!r}")
    if name == "std" and min(vals) <= 0:
        raise ValueError(f"Expected argument `std` to be 3 positive numbers, but got {values!r}")
    return vals[0], vals[1], vals[2]


class CIFAR10DataModule(pl.LightningDataModule):
    """CIFAR-10 from the python-pickle batch files in a local folder (no download).

    Training uses ``data_batch_1`` … ``data_batch_5``; validation and test use ``test_batch`` (the
    paper reports test accuracy). Batches are float32 ``(N, 3, 32, 32)`` normalised per channel,
    ``(x / 255 − mean) / std``, with int64 labels. With ``augment`` the training images get the
    standard random crop (zero padding ``padding``) and horizontal flip, drawn per image from the
    global RNG (seed it with ``lightning.seed_everything``).

    The files are checked when the module is built (a clear :class:`FileNotFoundError` listing the
    missing ones) and read in :meth:`setup`. ``data_dir`` may also be the parent of the
    ``cifar-10-batches-py`` folder of the official archive. ``batches.meta``, when present, gives
    :attr:`classes`.

    Args:
        data_dir: folder with the batch files.
        batch_size: samples per batch.
        augment: random crop + flip for training batches.
        num_workers: worker processes of the data loaders (0: load in the main process).
        mean: per-channel mean of the normalisation (pixels in [0, 1]).
        std: per-channel standard deviation of the normalisation.
        padding: zero padding of the random crop.
        seed: seed of the shuffling order (a private generator).

    Raises:
        FileNotFoundError: the folder or some batch files are missing.
        ValueError: an argument outside its range.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     dm = CIFAR10DataModule(write_cifar10_like(folder, n_per_batch=4), batch_size=8)
        ...     dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), x.dtype
        ((8, 3, 32, 32), torch.float32)
    """

    num_classes: int = 10

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        batch_size: int = 128,
        augment: bool = True,
        num_workers: int = 0,
        mean: Sequence[float] = CIFAR10_MEAN,
        std: Sequence[float] = CIFAR10_STD,
        padding: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size = _check_positive_int("batch_size", batch_size)
        self.augment = check_bool("augment", augment)
        self.num_workers = _check_non_negative_int("num_workers", num_workers)
        self.mean = _check_channel_stats("mean", mean)
        self.std = _check_channel_stats("std", std)
        self.padding = _check_non_negative_int("padding", padding)
        self.seed = _check_seed(seed)
        self.data_dir = find_cifar10_dir(data_dir)
        self.save_hyperparameters()
        self.classes: tuple[str, ...] = self._read_classes()
        self.train_dataset: TensorDataset | None = None
        self.test_dataset: TensorDataset | None = None

    def _read_classes(self) -> tuple[str, ...]:
        meta = self.data_dir / "batches.meta"
        if not meta.is_file():
            return CIFAR10_CLASSES
        try:
            with meta.open("rb") as f:
                entry = pickle.load(f, encoding="bytes")
            names = _get(entry, "label_names")
            decoded = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
        except Exception:  # optional file: fall back to the standard names
            return CIFAR10_CLASSES
        return decoded if len(decoded) == 10 else CIFAR10_CLASSES

    def setup(self, stage: str | None = None) -> None:
        """Read the training files (for ``fit``) and the test file (idempotent)."""
        if self.train_dataset is None and stage in (None, "fit"):
            parts = [read_cifar10_batch(self.data_dir / name) for name in CIFAR10_TRAIN_FILES]
            self.train_dataset = TensorDataset(
                torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            )
        if self.test_dataset is None:
            self.test_dataset = TensorDataset(
                *read_cifar10_batch(self.data_dir / CIFAR10_TEST_FILE)
            )

    def _loader(self, dataset: TensorDataset, train: bool) -> DataLoader:
        collate = _CifarCollate(self.mean, self.std, train and self.augment, self.padding)
        return _loader(
            dataset, self.batch_size, self.seed, self.num_workers, train=train, collate_fn=collate
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled (and, with ``augment``, augmented) training batches."""
        if self.train_dataset is None:
            self.setup("fit")
        assert self.train_dataset is not None
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        """Batches of ``test_batch``, in file order, without augmentation."""
        if self.test_dataset is None:
            self.setup("validate")
        assert self.test_dataset is not None
        return self._loader(self.test_dataset, train=False)

    def test_dataloader(self) -> DataLoader:
        """Same batches as :meth:`val_dataloader`."""
        return self.val_dataloader()
