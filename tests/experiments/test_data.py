"""Tests of the experiment data: digits, the deep linear problem, CIFAR-10 batch files."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from lightning_bn.experiments.data import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10DataModule,
    DeepLinearDataModule,
    DigitsDataModule,
    make_deep_linear_data,
    random_crop_flip,
    read_cifar10_batch,
    write_cifar10_like,
)

ALL_CIFAR_FILES = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]


# --- digits ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def raw_digits() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    return np.asarray(digits.data, dtype=np.float64), np.asarray(digits.target)


@pytest.fixture(scope="module")
def digits_dm() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=64, val_fraction=0.2, seed=0)
    dm.setup("fit")
    return dm


def test_digits_shapes_and_dtypes(digits_dm: DigitsDataModule) -> None:
    assert digits_dm.train_dataset is not None and digits_dm.val_dataset is not None
    x_train, y_train = digits_dm.train_dataset.tensors
    x_val, y_val = digits_dm.val_dataset.tensors
    assert x_train.shape == (1437, 64) and x_val.shape == (360, 64)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert y_val.shape == (360,)
    x, y = next(iter(digits_dm.train_dataloader()))
    assert x.shape == (64, 64) and x.dtype == torch.float32 and y.shape == (64,)
    assert digits_dm.input_shape == (64,)


def test_digits_as_images_matches_flat(digits_dm: DigitsDataModule) -> None:
    dm = DigitsDataModule(as_images=True, seed=0)
    dm.setup()
    assert dm.train_dataset is not None and digits_dm.train_dataset is not None
    images = dm.train_dataset.tensors[0]
    assert images.shape == (1437, 1, 8, 8) and images.dtype == torch.float32
    assert torch.equal(images.reshape(-1, 64), digits_dm.train_dataset.tensors[0])
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (64, 1, 8, 8)
    assert dm.input_shape == (1, 8, 8)


def test_digits_split_deterministic_disjoint_and_stratified(
    digits_dm: DigitsDataModule, raw_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    again = DigitsDataModule(seed=0)
    again.setup()
    other = DigitsDataModule(seed=1)
    other.setup()
    assert digits_dm.train_indices is not None and digits_dm.val_indices is not None
    assert np.array_equal(again.train_indices, digits_dm.train_indices)  # type: ignore[arg-type]
    assert np.array_equal(again.val_indices, digits_dm.val_indices)  # type: ignore[arg-type]
    assert not np.array_equal(other.val_indices, digits_dm.val_indices)  # type: ignore[arg-type]
    train, val = digits_dm.train_indices, digits_dm.val_indices
    assert len(np.intersect1d(train, val)) == 0
    assert np.array_equal(np.union1d(train, val), np.arange(1797))
    labels = raw_digits[1]
    per_class = np.bincount(labels, minlength=10)
    val_per_class = np.bincount(labels[val], minlength=10)
    # Stratified: each class's share of the validation set is its share of the data, up to rounding.
    assert np.all(np.abs(val_per_class - 0.2 * per_class) <= 1.0)
    assert digits_dm.val_dataset is not None
    assert np.array_equal(digits_dm.val_dataset.tensors[1].numpy(), labels[val])


def test_digits_standardised_with_training_statistics(
    digits_dm: DigitsDataModule, raw_digits: tuple[np.ndarray, np.ndarray]
) -> None:
    data = raw_digits[0] / 16.0
    train, val = digits_dm.train_indices, digits_dm.val_indices
    assert train is not None and val is not None
    mean = data[train].mean(axis=0)
    std = data[train].std(axis=0)
    std[std == 0] = 1.0
    np.testing.assert_allclose(digits_dm.mean, mean)  # type: ignore[arg-type]
    np.testing.assert_allclose(digits_dm.std, std)  # type: ignore[arg-type]
    assert digits_dm.train_dataset is not None and digits_dm.val_dataset is not None
    np.testing.assert_allclose(
        digits_dm.train_dataset.tensors[0].numpy(), (data[train] - mean) / std, atol=1e-5
    )
    np.testing.assert_allclose(
        digits_dm.val_dataset.tensors[0].numpy(), (data[val] - mean) / std, atol=1e-5
    )
    # The validation split is not standardised with its own statistics.
    val_std = data[val].std(axis=0)
    assert not np.allclose(std[val_std > 0], val_std[val_std > 0])
    train_x = digits_dm.train_dataset.tensors[0].double()
    assert train_x.mean(0).abs().max() < 1e-6


def test_digits_shuffle_order_ignores_global_rng() -> None:
    def first_labels(global_seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        dm = DigitsDataModule(batch_size=32, seed=3)
        return next(iter(dm.train_dataloader()))[1]

    assert torch.equal(first_labels(0), first_labels(123))


def test_digits_never_yields_a_training_batch_of_one() -> None:
    dm = DigitsDataModule(batch_size=718)  # 1437 = 2 * 718 + 1
    sizes = [len(y) for _, y in dm.train_dataloader()]
    assert sizes == [718, 718]
    dm = DigitsDataModule(batch_size=100)
    assert [len(y) for _, y in dm.train_dataloader()][-1] == 37


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": 0}, "val_fraction"),
        ({"seed": -1}, "seed"),
        ({"num_workers": -2}, "num_workers"),
    ],
)
def test_digits_bad_arguments(kwargs: dict[str, object], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        DigitsDataModule(**kwargs)  # type: ignore[arg-type]


# --- deep linear problem ---------------------------------------------------------------------------
def test_deep_linear_data_shapes_targets_and_seed() -> None:
    data = make_deep_linear_data(n_samples=7, dim=10, seed=5)
    assert data.A.shape == (10, 10) and data.x.shape == (7, 10) and data.y.shape == (7, 10)
    assert data.x.dtype == torch.float32
    torch.testing.assert_close(data.y, (data.A.double() @ data.x.double().T).T.float())
    same = make_deep_linear_data(n_samples=7, dim=10, seed=5)
    assert torch.equal(same.A, data.A) and torch.equal(same.x, data.x)
    bigger = make_deep_linear_data(n_samples=20, dim=10, seed=5)
    assert torch.equal(bigger.A, data.A)
    assert not torch.equal(make_deep_linear_data(7, 10, seed=6).A, data.A)
    assert make_deep_linear_data(3, 4, dtype=torch.float64).x.dtype == torch.float64


def test_deep_linear_datamodule_repeats_the_full_batch() -> None:
    dm = DeepLinearDataModule(n_samples=12, dim=4, seed=1, steps_per_epoch=5)
    batches = list(dm.train_dataloader())
    assert len(batches) == 5
    for x, y in batches:
        assert torch.equal(x, dm.data.x) and torch.equal(y, dm.data.y)
        assert x.shape == (12, 4)
    assert len(list(dm.val_dataloader())) == 1
    with pytest.raises(ValueError, match="steps_per_epoch"):
        DeepLinearDataModule(steps_per_epoch=0)


# --- CIFAR-10 --------------------------------------------------------------------------------------
def _write_raw_batch(path: Path, data: np.ndarray, labels: list[int]) -> None:
    """Write a batch file exactly as the CIFAR-10 python version stores it (bytes keys)."""
    with path.open("wb") as f:
        pickle.dump({b"batch_label": b"x", b"labels": labels, b"data": data}, f, protocol=2)


def test_cifar_reader_on_files_written_with_pickle(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    written = {}
    for name in ALL_CIFAR_FILES:
        data = rng.integers(0, 256, size=(6, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=6)]
        _write_raw_batch(tmp_path / name, data, labels)
        written[name] = (data, labels)
    images, read_labels = read_cifar10_batch(tmp_path / "data_batch_2")
    data, expected = written["data_batch_2"]
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.uint8
    assert read_labels.dtype == torch.int64 and read_labels.tolist() == expected
    # Row-major RGB planes: entry c * 1024 + r * 32 + col is channel c, row r, column col.
    for i, c, r, col in [(0, 0, 0, 0), (1, 1, 5, 7), (5, 2, 31, 30), (3, 0, 17, 31)]:
        assert images[i, c, r, col].item() == data[i, c * 1024 + r * 32 + col]

    dm = CIFAR10DataModule(tmp_path, batch_size=4, augment=False)
    dm.setup("fit")
    assert dm.train_dataset is not None and dm.test_dataset is not None
    assert len(dm.train_dataset) == 30 and len(dm.test_dataset) == 6
    assert dm.classes == CIFAR10_CLASSES  # no batches.meta
    train_images = dm.train_dataset.tensors[0].reshape(30, 3072).numpy()
    expected_train = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    assert np.array_equal(train_images, expected_train)

    x, y = next(iter(dm.val_dataloader()))
    test_data, test_labels = written["test_batch"]
    mean = np.array(CIFAR10_MEAN).reshape(1, 3, 1, 1)
    std = np.array(CIFAR10_STD).reshape(1, 3, 1, 1)
    expected_x = (test_data[:4].reshape(4, 3, 32, 32) / 255.0 - mean) / std
    assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32)
    np.testing.assert_allclose(x.numpy(), expected_x, atol=1e-5)
    assert y.tolist() == test_labels[:4]


def test_cifar_round_trip_of_the_writer(tmp_path: Path) -> None:
    folder = write_cifar10_like(tmp_path / "cifar", n_per_batch=20, seed=3)
    with (folder / "data_batch_4").open("rb") as f:
        entry = pickle.load(f, encoding="bytes")
    assert set(entry) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (20, 3072)
    assert sorted(entry[b"labels"]) == sorted(list(range(10)) * 2)
    images, labels = read_cifar10_batch(folder / "data_batch_4")
    assert np.array_equal(images.reshape(20, 3072).numpy(), entry[b"data"])
    assert labels.tolist() == entry[b"labels"]
    again = write_cifar10_like(tmp_path / "again", n_per_batch=20, seed=3)
    assert torch.equal(read_cifar10_batch(again / "data_batch_4")[0], images)

    dm = CIFAR10DataModule(folder, batch_size=16, augment=True)
    assert dm.classes == CIFAR10_CLASSES  # from batches.meta
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert sum(len(y) for _, y in batches) == 100
    x, y = batches[0]
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.isfinite(x).all()
    assert len(list(dm.test_dataloader())) == 2


def test_cifar_parent_folder_of_the_archive_is_accepted(tmp_path: Path) -> None:
    write_cifar10_like(tmp_path / "cifar-10-batches-py", n_per_batch=2)
    dm = CIFAR10DataModule(tmp_path)
    assert dm.data_dir == tmp_path / "cifar-10-batches-py"


def test_cifar_missing_files_are_listed(tmp_path: Path) -> None:
    write_cifar10_like(tmp_path, n_per_batch=2)
    (tmp_path / "data_batch_3").unlink()
    (tmp_path / "test_batch").unlink()
    with pytest.raises(FileNotFoundError) as info:
        CIFAR10DataModule(tmp_path)
    message = str(info.value)
    assert "data_batch_3" in message and "test_batch" in message
    assert "missing" in message and str(tmp_path) in message
    assert "data_batch_1," not in message.split("Expected")[0]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CIFAR10DataModule(tmp_path / "nowhere")


def test_cifar_bad_batch_content(tmp_path: Path) -> None:
    _write_raw_batch(tmp_path / "bad", np.zeros((2, 100), dtype=np.uint8), [0, 1])
    with pytest.raises(ValueError, match="3072"):
        read_cifar10_batch(tmp_path / "bad")
    _write_raw_batch(tmp_path / "bad", np.zeros((2, 3072), dtype=np.uint8), [0])
    with pytest.raises(ValueError, match="labels"):
        read_cifar10_batch(tmp_path / "bad")
    (tmp_path / "bad").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a CIFAR-10"):
        read_cifar10_batch(tmp_path / "bad")


def test_random_crop_flip_is_a_crop_of_the_padded_image() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (16, 3, 6, 5), generator=gen, dtype=torch.uint8)
    out = random_crop_flip(images, padding=2, generator=gen)
    assert out.shape == images.shape and out.dtype == images.dtype
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flipped = 0
    for i in range(16):
        candidates = [
            (padded[i, :, oy : oy + 6, ox : ox + 5], flip)
            for oy in range(5)
            for ox in range(5)
            for flip in (False, True)
        ]
        matches = [
            flip
            for crop, flip in candidates
            if torch.equal(crop.flip(-1) if flip else crop, out[i])
        ]
        assert matches, f"image {i} is not a (flipped) crop of its padded input"
        flipped += matches[0]
    assert 0 < flipped < 16
    assert torch.equal(random_crop_flip(images, padding=0, flip_prob=0.0), images)
    assert torch.equal(random_crop_flip(images, padding=0, flip_prob=1.0), images.flip(-1))
    with pytest.raises(ValueError, match="flip_prob"):
        random_crop_flip(images, flip_prob=2.0)
