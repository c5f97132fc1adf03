"""Data of the built-in experiments: scikit-learn digits, the deep linear problem, CIFAR-10 files.

Everything here works offline: the digits ship with scikit-learn, the deep linear problem is
synthetic, and CIFAR-10 is read from the standard python-pickle batch files in a folder the user
names (nothing is downloaded).
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_TEST_FILE",
    "CIFAR10_TRAIN_FILES",
    "CIFAR10DataModule",
    "DeepLinearData",
    "DeepLinearDataModule",
    "DigitsDataModule",
    "find_cifar10_dir",
    "make_deep_linear_data",
    "random_crop_flip",
    "read_cifar10_batch",
    "write_cifar10_like",
]


# --- argument checks ---------------------------------------------------------------------------
def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"Expected argument `{name}` to be a positive integer, but got {value!r}")
    return value


def _check_non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Expected argument `{name}` to be an integer >= 0, but got {value!r}")
    return value


def _check_seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Expected argument `seed` to be an integer >= 0, but got {value!r}")
    return value


def _drop_last(n: int, batch_size: int) -> bool:
    """Drop the last training batch only when it would hold a single sample.

    A batch of one breaks every batch-statistics layer in training ("Expected more than 1 value
    per channel"), and dropping a larger remainder would waste data for no reason.
    """
    return n > batch_size and n % batch_size == 1


def _seeded_generator(seed: int) -> torch.Generator:
    # A private generator makes the shuffling order independent of the global RNG, so code that
    # draws random numbers during training (a diagnostic, a noise layer) cannot change the data order.
    return torch.Generator().manual_seed(seed)


# --- scikit-learn digits -------------------------------------------------------------------------
class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's handwritten digits (1797 real 8×8 grey images, 10 classes) for Lightning.

    Pixels (0-16) are scaled to [0, 1], then standardised per pixel with the mean and the (biased)
    standard deviation of the *training* split; a pixel that is constant over the training split
    keeps its centred value (its standard deviation is replaced by 1). The train/validation split
    is stratified by class and depends on ``seed`` only (``sklearn.model_selection
    .train_test_split``); the training order is shuffled with a private generator seeded with
    ``seed``, so it does not depend on the global RNG.

    Attributes after :meth:`setup`: ``train_dataset`` and ``val_dataset`` (``TensorDataset`` of
    float32 inputs and int64 labels), ``train_indices`` and ``val_indices`` (rows of
    ``load_digits()``), ``mean`` and ``std`` (float64 numpy arrays of shape ``(64,)``, statistics of
    the scaled training pixels).

    Args:
        batch_size: samples per training and validation batch.
        val_fraction: share of the 1797 samples held out for validation, in (0, 1).
        seed: seed of the split and of the shuffling.
        as_images: yield ``(N, 1, 8, 8)`` images instead of flat ``(N, 64)`` vectors.
        num_workers: worker processes of the data loaders.

    Raises:
        ValueError: an argument outside its range.

    Example:
        >>> dm = DigitsDataModule(batch_size=32, as_images=True)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), x.dtype, y.dtype
        ((32, 1, 8, 8), torch.float32, torch.int64)
    """

    num_classes: int = 10
    num_features: int = 64
    image_shape: tuple[int, int, int] = (1, 8, 8)

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        seed: int = 0,
        as_images: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size = _check_positive_int("batch_size", batch_size)
        if (
            isinstance(val_fraction, bool)
            or not isinstance(val_fraction, (int, float))
            or not 0 < val_fraction < 1
        ):
            raise ValueError(
                f"Expected argument `val_fraction` to be a number in (0, 1), but got {val_fraction!r}"
            )
        self.val_fraction = float(val_fraction)
        self.seed = _check_seed(seed)
        self.as_images = bool(as_images)
        self.num_workers = _check_non_negative_int("num_workers", num_workers)
        self.save_hyperparameters()
        self.train_dataset: TensorDataset | None = None
        self.val_dataset: TensorDataset | None = None
        self.train_indices: np.ndarray | None = None
        self.val_indices: np.ndarray | None = None
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample: ``(1, 8, 8)`` with ``as_images``, else ``(64,)``."""
        return self.image_shape if self.as_images else (self.num_features,)

    def setup(self, stage: str | None = None) -> None:
        """Load the digits, split them and standardise with the training statistics (idempotent)."""
        if self.train_dataset is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = np.asarray(digits.data, dtype=np.float64) / 16.0
        labels = np.asarray(digits.target, dtype=np.int64)
        train_idx, val_idx = train_test_split(
            np.arange(len(labels)),
            test_size=self.val_fraction,
            stratify=labels,
            random_state=self.seed,
        )
        train_idx, val_idx = np.sort(train_idx), np.sort(val_idx)
        mean = images[train_idx].mean(axis=0)
        std = images[train_idx].std(axis=0)
        std = np.where(std > 0, std, 1.0)
        self.train_indices, self.val_indices = train_idx, val_idx
        self.mean, self.std = mean, std
        self.train_dataset = self._dataset((images[train_idx] - mean) / std, labels[train_idx])
        self.val_dataset = self._dataset((images[val_idx] - mean) / std, labels[val_idx])

    def _dataset(self, x: np.ndarray, y: np.ndarray) -> TensorDataset:
        inputs = torch.as_tensor(x, dtype=torch.float32)
        if self.as_images:
            inputs = inputs.reshape(-1, *self.image_shape)
        return TensorDataset(inputs.contiguous(), torch.as_tensor(y, dtype=torch.int64))

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches ``(x, y)``."""
        self.setup()
        assert self.train_dataset is not None
        n = len(self.train_dataset)
        return DataLoader(
            self.train_dataset,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=_drop_last(n, self.batch_size),
            generator=_seeded_generator(self.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        """Validation batches ``(x, y)`` in a fixed order."""
        self.setup()
        assert self.val_dataset is not None
        return DataLoader(
            self.val_dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


# --- deep linear network problem -----------------------------------------------------------------
@dataclass(frozen=True)
class DeepLinearData:
    """The deep linear network problem of the paper (spec §6): recover ``A`` from ``(x, A x)``.

    Attributes:
        A: the target map, ``(dim, dim)``, entries i.i.d. ``N(0, 1)``.
        x: inputs, ``(n_samples, dim)``, entries i.i.d. ``N(0, 1)``.
        y: targets ``A x`` for every sample, ``(n_samples, dim)`` (``y = x @ A.T`` row-wise).
    """

    A: Tensor
    x: Tensor
    y: Tensor


def make_deep_linear_data(
    n_samples: int = 1000,
    dim: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> DeepLinearData:
    """Draw ``A`` and ``x`` from a seeded generator and return them with the targets ``A x``.

    ``A`` is drawn first, then ``x`` (both standard Gaussian, drawn in float64 and cast to
    ``dtype``), so the same seed gives the same ``A`` for any ``n_samples``.

    Args:
        n_samples: number of samples ``n`` (the full batch).
        dim: dimension of ``x`` and of the square matrix ``A``.
        seed: seed of the private generator.
        dtype: floating dtype of the returned tensors.

    Returns:
        :class:`DeepLinearData` with ``A`` ``(dim, dim)``, ``x`` and ``y`` ``(n_samples, dim)``.

    Raises:
        ValueError: a non-positive size or a negative seed.

    Example:
        >>> data = make_deep_linear_data(n_samples=5, dim=3)
        >>> torch.allclose(data.y, data.x @ data.A.T)
        True
    """
    _check_positive_int("n_samples", n_samples)
    _check_positive_int("dim", dim)
    _check_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    x = torch.randn(n_samples, dim, generator=gen, dtype=torch.float64)
    y = x @ a.T
    return DeepLinearData(A=a.to(dtype), x=x.to(dtype), y=y.to(dtype))


class _RepeatedBatch(Dataset):
    """A map-style dataset whose every item is the same full batch ``(x, y)``."""

    def __init__(self, x: Tensor, y: Tensor, length: int) -> None:
        self.x, self.y, self.length = x, y, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return self.x, self.y


class DeepLinearDataModule(pl.LightningDataModule):
    """Full-batch data of the deep linear network experiment (spec §6).

    The training loader yields the same full batch ``(x, A x)`` at each of its ``steps_per_epoch``
    steps (``batch_size=None``: no collation, no shuffling), so a ``Trainer`` with
    ``max_steps=10_000`` runs 10k steps of full-batch gradient descent. The validation loader
    yields the same batch once (with BatchNorm, this evaluates the network with its running
    statistics).

    Args:
        n_samples: number of samples in the full batch.
        dim: dimension of ``x`` and ``A``.
        seed: seed of ``A`` and ``x`` (see :func:`make_deep_linear_data`).
        steps_per_epoch: training steps per epoch.

    Raises:
        ValueError: an argument outside its range.

    Example:
        >>> dm = DeepLinearDataModule(n_samples=8, dim=3, steps_per_epoch=2)
        >>> [tuple(x.shape) for x, _ in dm.train_dataloader()]
        [(8, 3), (8, 3)]
    """

    def __init__(
        self,
        n_samples: int = 1000,
        dim: int = 10,
        seed: int = 0,
        steps_per_epoch: int = 100,
    ) -> None:
        super().__init__()
        self.n_samples = _check_positive_int("n_samples", n_samples)
        self.dim = _check_positive_int("dim", dim)
        self.seed = _check_seed(seed)
        self.steps_per_epoch = _check_positive_int("steps_per_epoch", steps_per_epoch)
        self.save_hyperparameters()
        self.data = make_deep_linear_data(n_samples, dim, seed)

    def train_dataloader(self) -> DataLoader:
        """``steps_per_epoch`` copies of the full batch ``(x, y)``."""
        return DataLoader(
            _RepeatedBatch(self.data.x, self.data.y, self.steps_per_epoch), batch_size=None
        )

    def val_dataloader(self) -> DataLoader:
        """The full batch, once."""
        return DataLoader(_RepeatedBatch(self.data.x, self.data.y, 1), batch_size=None)


# --- CIFAR-10 python-pickle files ----------------------------------------------------------------
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
        self.augment = bool(augment)
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
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and _drop_last(len(dataset), self.batch_size),
            generator=_seeded_generator(self.seed) if train else None,
            collate_fn=_CifarCollate(self.mean, self.std, train and self.augment, self.padding),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
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
