"""MNIST-1D: the offline generator, its cache (keyed by the arguments, written atomically), the
data module, the one-line error without the package, and the 1-D CNN."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lightning_bn.experiments.cnn1d import SmallCNN1d
from lightning_bn.experiments.data.mnist1d import (
    MNIST1DDataModule,
    load_mnist1d,
    mnist1d_args,
    mnist1d_cache_dir,
)

N = 300  # samples: 240 training, 60 test


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _reference(num_samples: int, seed: int = 42) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    return make_dataset(args)


def test_arrays_equal_the_generator_output_and_are_cached(tmp_path: Path) -> None:
    data = load_mnist1d(N)
    ref = _reference(N)
    assert data["x"].shape == (240, 40) and data["x_test"].shape == (60, 40)
    assert data["x"].dtype == np.float32 and data["y"].dtype == np.int64
    np.testing.assert_allclose(data["x"], ref["x"].astype(np.float32))
    np.testing.assert_array_equal(data["y_test"], ref["y_test"])
    folder = mnist1d_cache_dir()
    assert folder == tmp_path / "cache" / "lightning-bn" / "mnist1d"
    files = sorted(folder.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # no temporary file left behind


def test_a_second_load_reads_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    first = load_mnist1d(N)

    def fail(args: object) -> None:
        raise AssertionError("generated again")

    monkeypatch.setattr("lightning_bn.experiments.data.mnist1d._generate", fail)
    second = load_mnist1d(N)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


def test_other_arguments_get_another_cache_file() -> None:
    a = load_mnist1d(N)
    b = load_mnist1d(N, seed=7)
    assert len(list(mnist1d_cache_dir().glob("*.npz"))) == 2
    assert not np.array_equal(a["x"], b["x"])
    assert mnist1d_args(N)["num_samples"] == N and "url" not in mnist1d_args(N)


def test_generation_leaves_the_global_generators_alone() -> None:
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    load_mnist1d(N)
    assert np.random.rand() == expected_np and random.random() == expected_py


def test_missing_package_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError) as err:
        load_mnist1d(N)
    assert str(err.value) == "MNIST-1D needs the `mnist1d` package: pip install mnist1d"


def test_data_module_batches() -> None:
    flat = MNIST1DDataModule(batch_size=32, num_samples=N)
    x, y = next(iter(flat.train_dataloader()))
    assert tuple(x.shape) == (32, 40) and y.dtype == torch.int64
    signals = MNIST1DDataModule(batch_size=16, num_samples=N, as_signals=True)
    x, _ = next(iter(signals.val_dataloader()))
    assert tuple(x.shape) == (16, 1, 40)
    # the order depends on the seed only
    a = next(iter(MNIST1DDataModule(batch_size=8, seed=3, num_samples=N).train_dataloader()))
    b = next(iter(MNIST1DDataModule(batch_size=8, seed=3, num_samples=N).train_dataloader()))
    assert torch.equal(a[0], b[0])
    with pytest.raises(ValueError, match="batch_size"):
        MNIST1DDataModule(batch_size=0)


def test_cnn1d_equals_its_functional_form() -> None:
    torch.manual_seed(0)
    model = SmallCNN1d(norm="none", widths=(3, 5))
    x = torch.randn(4, 1, 40)
    h = x
    for stage in model.features:
        assert isinstance(stage.norm, nn.Identity)
        h = nn.functional.conv1d(h, stage.conv.weight, stage.conv.bias, padding=1)
        h = nn.functional.max_pool1d(torch.relu(h), 2)
    expected = h.flatten(1) @ model.head.weight.T + model.head.bias
    torch.testing.assert_close(model(x), expected)
    assert model.head.in_features == 5 * 10  # 40 → 20 → 10 points


def test_cnn1d_batchnorm_matches_torch() -> None:
    torch.manual_seed(0)
    ours = SmallCNN1d(norm="batchnorm", widths=(4,))
    x = torch.randn(6, 1, 40)
    h = nn.functional.conv1d(x, ours.features[0].conv.weight, ours.features[0].conv.bias, padding=1)
    ref = nn.BatchNorm1d(4)
    torch.testing.assert_close(ours.features[0].norm(h), ref(h))
