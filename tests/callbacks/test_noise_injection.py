"""NoiseInjectionCallback in real Trainer runs: train-only noise, hooks, RNG, resume, logging, DDP."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_bn.callbacks.noise_injection import NoiseInjectionCallback
from lightning_bn.layers import BatchNorm, LayerNorm, LpNorm
from lightning_bn.noise import NoiseSample, NoiseSampler

_DIGITS = load_digits()
X = torch.tensor(_DIGITS.data, dtype=torch.float32) / 16.0
Y = torch.tensor(_DIGITS.target)


def _loader(n: int = 128, batch_size: int = 32, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(X[:n], Y[:n]), batch_size=batch_size, shuffle=shuffle)


def _trainer(**kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "logger": False,
        "log_every_n_steps": 1,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
    }
    options.update(kwargs)
    return L.Trainer(**options)


class Block(nn.Module):
    def __init__(self, d_in: int, d_out: int, norm: bool, dropout: float) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)
        self.norm: nn.Module = nn.BatchNorm1d(d_out) if norm else nn.Identity()
        self.act = nn.ReLU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.act(self.norm(self.linear(x))))


class MLP(L.LightningModule):
    """An MLP on digits; ``norm=False`` keeps ``nn.Identity`` placeholders where BN would be."""

    def __init__(
        self,
        norm: bool = True,
        width: int = 32,
        depth: int = 2,
        lr: float = 0.1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        dims = [64] + [width] * depth
        self.blocks = nn.ModuleList(Block(a, b, norm, dropout) for a, b in itertools.pairwise(dims))
        self.head = nn.Linear(width, 10)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class RecordingSampler(NoiseSampler):
    """The default sampler, keeping every draw it makes (a spy on the callback's noise)."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: list[NoiseSample] = []

    def __call__(self, x: Tensor, generator: torch.Generator, **kwargs: Any) -> NoiseSample:
        sample = super().__call__(x, generator, **kwargs)
        self.draws.append(NoiseSample(*(t.detach().clone() for t in sample)))
        return sample


def _recording_callback(**kwargs: Any) -> tuple[NoiseInjectionCallback, RecordingSampler]:
    callback = NoiseInjectionCallback(**kwargs)
    callback.sampler = RecordingSampler()
    return callback, callback.sampler


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs)
        for m in model.modules()
    )


def _weights(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bitwise_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- train-only, hooks ------------------------------------------------------------------------
class TwinCheckedMLP(MLP):
    """Compares its outputs with a hook-free twin that gets a copy of its weights."""

    def __init__(self) -> None:
        super().__init__()
        self.twin = [MLP()]  # in a list: not a submodule, so the callback never sees it
        self.checks: dict[str, list[bool]] = {
            "train": [],
            "eval": [],
            "val_eval": [],
            "val_train": [],
        }

    def _twin(self, train: bool) -> MLP:
        twin = self.twin[0]
        twin.load_state_dict(self.state_dict())
        return twin.train(train)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        with torch.no_grad():
            self.checks["train"].append(torch.equal(logits, self._twin(True)(x)))
        return nn.functional.cross_entropy(logits, y)

    def on_train_batch_end(
        self, outputs: Any, batch: tuple[Tensor, Tensor], batch_idx: int
    ) -> None:
        with torch.no_grad():
            self.eval()
            self.checks["eval"].append(torch.equal(self(batch[0]), self._twin(False)(batch[0])))
            self.train()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x = batch[0]
        self.checks["val_eval"].append(torch.equal(self(x), self._twin(False)(x)))
        state = _weights(self)  # the train-mode pass below updates running statistics
        self.train()
        self.checks["val_train"].append(torch.equal(self(x), self._twin(True)(x)))
        self.eval()
        self.load_state_dict(state)


def test_noise_in_training_only_and_no_hook_left_after_fit() -> None:
    model = TwinCheckedMLP()
    callback = NoiseInjectionCallback(seed=0)
    trainer = _trainer(
        max_epochs=2, limit_val_batches=1, num_sanity_val_steps=1, callbacks=[callback]
    )
    trainer.fit(model, _loader(), _loader())
    assert callback.target_names == ["blocks.0.norm", "blocks.1.norm"]
    checks = model.checks
    assert len(checks["train"]) == 8 and not any(checks["train"])  # noise in every training pass
    assert len(checks["eval"]) == 8 and all(checks["eval"])  # model.eval() inside fit: untouched
    # sanity check + 2 validation runs; a train-mode pass during validation gets no noise either
    assert len(checks["val_eval"]) == 3 and all(checks["val_eval"])
    assert len(checks["val_train"]) == 3 and all(checks["val_train"])
    assert _hook_count(model) == 0
    x = X[:64]
    twin = model._twin(True)
    assert torch.equal(model.train()(x), twin(x))

    predictions = trainer.predict(model, _loader(64))
    assert predictions is not None
    assert torch.equal(torch.cat(predictions), model._twin(False)(x))  # type: ignore[arg-type]
    assert _hook_count(model) == 0


class FailingMLP(MLP):
    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if batch_idx == 2:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_hooks_are_removed_when_training_fails() -> None:
    model = FailingMLP()
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(max_epochs=1, callbacks=[NoiseInjectionCallback()]).fit(model, _loader())
    assert _hook_count(model) == 0


def test_every_forward_pass_of_a_batch_sees_the_same_noise() -> None:
    class TwiceMLP(MLP):
        same: ClassVar[list[bool]] = []

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            first = self(batch[0])
            self.same.append(torch.equal(first, self(batch[0])))  # e.g. an LBFGS closure re-run
            return nn.functional.cross_entropy(first, batch[1])

    model = TwiceMLP()
    callback, sampler = _recording_callback(targets="blocks.0.norm")
    _trainer(max_steps=3, callbacks=[callback]).fit(model, _loader())
    assert model.same == [True, True, True]
    mus = [d.mu for d in sampler.draws]
    assert len(mus) == 6
    assert all(torch.equal(mus[2 * k], mus[2 * k + 1]) for k in range(3))
    assert not torch.equal(mus[0], mus[2]) and not torch.equal(mus[2], mus[4])


# --- targets ----------------------------------------------------------------------------------
class ManyNorms(L.LightningModule):
    """Every kind of default target, with layouts where a wrong unit dimension cannot broadcast."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn2d = nn.BatchNorm2d(6)
        self.gn = nn.GroupNorm(2, 6)
        self.ours_bn = BatchNorm(6)
        self.l1 = LpNorm(6, p=1)
        self.proj = nn.Linear(8, 5)  # (N, 8 rows, 8 cols · 6) -> tokens (N, T=8·6, C=5)
        self.ln = nn.LayerNorm(5)
        self.ours_ln = LayerNorm(5)
        self.head = nn.Linear(5, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.l1(self.ours_bn(self.gn(self.bn2d(self.conv(x.view(-1, 1, 8, 8))))))
        tokens = self.ours_ln(self.ln(self.proj(h.reshape(h.shape[0], -1, 8))))
        return self.head(tokens.mean(dim=1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_default_targets_are_every_normalisation_layer() -> None:
    callback, sampler = _recording_callback()
    model = ManyNorms()
    _trainer(max_steps=2, callbacks=[callback]).fit(model, _loader())
    assert callback.target_names == ["bn2d", "gn", "ours_bn", "l1", "ln", "ours_ln"]
    assert [d.mu.numel() for d in sampler.draws] == [6, 6, 6, 6, 5, 5] * 2
    ln_draw = sampler.draws[4]  # nn.LayerNorm on (N, T, C): a unit is the last dimension
    assert ln_draw.shift.shape[-1] == 5 and ln_draw.shift.shape[1] == 48
    assert _hook_count(model) == 0


def test_targets_by_glob_and_by_type() -> None:
    callback = NoiseInjectionCallback(targets=["blocks.*.norm"])
    _trainer(max_steps=1, callbacks=[callback]).fit(MLP(norm=False), _loader())
    assert callback.target_names == ["blocks.0.norm", "blocks.1.norm"]
    callback = NoiseInjectionCallback(targets=[nn.ReLU, "head"])
    _trainer(max_steps=1, callbacks=[callback]).fit(MLP(), _loader())
    assert callback.target_names == ["blocks.0.act", "blocks.1.act", "head"]


@pytest.mark.parametrize(
    ("targets", "model", "match"),
    [
        (
            ["blocks.*.norm", "*.bn"],
            MLP(),
            r"the glob\(s\) '\*\.bn' in `targets` matched no module name\. "
            r"The model contains: .*blocks\.1\.norm \(BatchNorm1d\)",
        ),
        (nn.Conv2d, MLP(), r"found no module of the types in targets=\['torch\.nn\.modules"),
    ],
)
def test_setup_errors_name_what_the_model_contains(
    targets: Any, model: L.LightningModule, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        _trainer(max_steps=1, callbacks=[NoiseInjectionCallback(targets=targets)]).fit(
            model, _loader()
        )
    assert _hook_count(model) == 0


def test_default_targets_finding_nothing_warn_and_training_goes_on() -> None:
    model = MLP(norm=False)
    callback = NoiseInjectionCallback()
    with pytest.warns(UserWarning, match=r"found no normalisation layer.*`targets=`"):
        _trainer(max_steps=2, callbacks=[callback]).fit(model, _loader())
    assert callback.target_names == [] and _hook_count(model) == 0
    assert model.trainer.global_step == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"std_range": 0.5},
            ValueError,
            r"Expected argument `std_range` to be a finite number in \[1, 10000\], but got 0.5",
        ),
        (
            {"mean_range": -1.0},
            ValueError,
            r"`mean_range` to be a finite number in \[0, 10000\], but got -1.0",
        ),
        ({"mean_jitter": float("nan")}, ValueError, r"`mean_jitter` to be a finite number"),
        (
            {"std_jitter": -0.1},
            ValueError,
            r"`std_jitter` to be a finite number in \[0, 10000\], but got -0.1",
        ),
        ({"seed": -1}, ValueError, r"`seed` to be an integer in \[0, 2\*\*63\), but got -1"),
        ({"seed": 1.5}, ValueError, r"`seed` to be an integer in \[0, 2\*\*63\), but got 1.5"),
        ({"log_every_n_steps": 0}, ValueError, r"`log_every_n_steps` to be a positive integer"),
        ({"log_every_n_steps": True}, ValueError, r"positive integer, but got True"),
        ({"targets": []}, ValueError, r"`targets` to name at least one module, but got \[\]"),
        ({"targets": [""]}, ValueError, r"non-empty glob strings"),
        (
            {"targets": [nn.ReLU()]},
            TypeError,
            r"glob strings or nn.Module subclasses, but got ReLU",
        ),
        ({"targets": [int]}, TypeError, r"nn.Module subclasses, but got <class 'int'>"),
        ({"targets": 3}, TypeError, r"`targets` to be None, a glob string, an nn.Module subclass"),
    ],
)
def test_bad_arguments_raise(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        NoiseInjectionCallback(**kwargs)


# --- randomness -------------------------------------------------------------------------------
def _fit_weights(callbacks: list[Callback], dropout: float = 0.0, shuffle: bool = False) -> Any:
    L.seed_everything(0, verbose=False)
    model = MLP(dropout=dropout)
    _trainer(max_epochs=2, callbacks=callbacks).fit(model, _loader(shuffle=shuffle))
    return _weights(model)


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    first = _fit_weights([NoiseInjectionCallback(seed=0)])
    again = _fit_weights([NoiseInjectionCallback(seed=0)])
    other = _fit_weights([NoiseInjectionCallback(seed=1)])
    clean = _fit_weights([])
    assert _bitwise_equal(first, again)
    assert not _bitwise_equal(first, other)
    assert not _bitwise_equal(first, clean)


class GlobalRandomCallback(Callback):
    """A negative control: a callback that draws from the global RNG at every batch."""

    def on_train_batch_start(self, *args: Any) -> None:
        torch.rand(1)


def test_global_rng_stream_is_the_same_as_without_the_callback() -> None:
    # Dropout and a shuffling loader draw from the global RNG during training, so the stream
    # after fit depends on every global draw made during the run.
    def stream_after(callbacks: list[Callback]) -> Tensor:
        _fit_weights(callbacks, dropout=0.2, shuffle=True)
        return torch.rand(8)

    without = stream_after([])
    assert torch.equal(stream_after([NoiseInjectionCallback(seed=3)]), without)
    assert not torch.equal(stream_after([GlobalRandomCallback()]), without)  # the check can fail


def test_state_dict_round_trip_continues_the_stream() -> None:
    a = NoiseInjectionCallback(seed=4)
    torch.rand(5, generator=a._generator)
    state = a.state_dict()
    b = NoiseInjectionCallback(seed=99)
    b.load_state_dict(state)
    assert torch.equal(torch.rand(5, generator=a._generator), torch.rand(5, generator=b._generator))
    assert a.state_key == NoiseInjectionCallback(seed=4).state_key != b.state_key


def test_resumed_run_continues_the_same_noise_sequence(tmp_path: Path) -> None:
    def run(max_epochs: int, ckpt: Path | None = None) -> tuple[MLP, RecordingSampler, L.Trainer]:
        L.seed_everything(0, verbose=False)
        model = MLP()
        callback, sampler = _recording_callback(targets="blocks.0.norm", seed=5)
        trainer = _trainer(max_epochs=max_epochs, callbacks=[callback])
        trainer.fit(model, _loader(), ckpt_path=ckpt)
        return model, sampler, trainer

    full_model, full, _ = run(2)
    _, half, half_trainer = run(1)
    ckpt = tmp_path / "half.ckpt"
    half_trainer.save_checkpoint(ckpt)
    resumed_model, resumed, _ = run(2, ckpt)

    assert len(full.draws) == 8 and len(half.draws) == len(resumed.draws) == 4
    for a, b in zip(full.draws[:4], half.draws, strict=True):
        assert torch.equal(a.shift, b.shift)
    for a, b in zip(full.draws[4:], resumed.draws, strict=True):
        assert torch.equal(a.mu, b.mu) and torch.equal(a.shift, b.shift)
    assert not torch.equal(resumed.draws[0].mu, full.draws[0].mu)  # not a restart from the seed
    assert _bitwise_equal(_weights(full_model), _weights(resumed_model))


# --- logging ----------------------------------------------------------------------------------
class CapturingMLP(MLP):
    """Keeps each training output of ``blocks.0.norm`` and the input of the next layer."""

    def __init__(self) -> None:
        super().__init__()
        self.clean: list[Tensor] = []
        self.noisy: list[Tensor] = []
        # registered before the callback's hook, so this one sees the output before the noise
        block = self.blocks[0]
        assert isinstance(block, Block)
        block.norm.register_forward_hook(self._keep_clean)
        block.act.register_forward_pre_hook(self._keep_noisy)

    def _keep_clean(self, module: nn.Module, args: Any, output: Tensor) -> None:
        if module.training:
            self.clean.append(output.detach().clone())

    def _keep_noisy(self, module: nn.Module, args: tuple[Tensor]) -> None:
        if module.training:
            self.noisy.append(args[0].detach().clone())


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_logged_metrics_match_the_outputs_before_and_after_noise(tmp_path: Path) -> None:
    model = CapturingMLP()
    callback, sampler = _recording_callback(log_every_n_steps=2)
    logger = CSVLogger(tmp_path, name="noise", version=0)
    _trainer(max_steps=5, logger=logger, callbacks=[callback]).fit(model, _loader())
    rows = [
        r
        for r in _read_csv(tmp_path / "noise" / "version_0" / "metrics.csv")
        if r.get("noise/blocks.0.norm/mu_mean")
    ]
    keys = {
        f"noise/blocks.{b}.norm/{s}"
        for b in (0, 1)
        for s in ("mu_mean", "sigma_mean", "clean_mean", "clean_std", "out_mean", "out_std")
    }
    assert keys <= set(rows[0])
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    for row in rows:
        batch = int(row["step"])
        clean, noisy = model.clean[batch].double(), model.noisy[batch].double()
        draw = sampler.draws[2 * batch]  # two targets per batch, blocks.0.norm first
        torch.testing.assert_close(noisy, (draw.scale * model.clean[batch] + draw.shift).double())
        expected = {
            "mu_mean": draw.mu.mean().item(),
            "sigma_mean": draw.sigma.mean().item(),
            "clean_mean": clean.mean().item(),
            "clean_std": clean.std(correction=0).item(),
            "out_mean": noisy.mean().item(),
            "out_std": noisy.std(correction=0).item(),
        }
        for name, value in expected.items():
            assert float(row[f"noise/blocks.0.norm/{name}"]) == pytest.approx(
                value, rel=1e-5, abs=1e-6
            )
        assert 1.0 <= float(row["noise/blocks.1.norm/sigma_mean"]) <= 1.25
        assert float(row["noise/blocks.0.norm/out_std"]) > float(
            row["noise/blocks.0.norm/clean_std"]
        )


def test_nothing_is_recorded_without_a_logger() -> None:
    callback = NoiseInjectionCallback(log_every_n_steps=1)
    _trainer(max_steps=2, callbacks=[callback]).fit(MLP(), _loader())
    assert callback._records == {}


# --- DDP --------------------------------------------------------------------------------------
class RankRecordingMLP(CapturingMLP):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir

    def on_train_end(self) -> None:
        callback = next(
            c
            for c in self.trainer.callbacks  # type: ignore[attr-defined]
            if isinstance(c, NoiseInjectionCallback)
        )
        draws = callback.sampler.draws  # type: ignore[attr-defined]
        torch.save(
            {"mu": [d.mu for d in draws], "shift": [d.shift for d in draws], "noisy": self.noisy},
            Path(self.out_dir) / f"rank{self.global_rank}.pt",
        )


@pytest.mark.slow
def test_ddp_ranks_share_unit_noise_draw_their_own_entry_noise_and_log_global_stats(
    tmp_path: Path,
) -> None:
    model = RankRecordingMLP(str(tmp_path))
    callback, _ = _recording_callback(targets="blocks.0.norm", log_every_n_steps=1)
    logger = CSVLogger(tmp_path, name="ddp", version=0)
    trainer = _trainer(
        max_steps=2,
        devices=2,
        strategy="ddp_spawn",
        logger=logger,
        callbacks=[callback],
        use_distributed_sampler=False,
    )
    data = TensorDataset(X[:128], Y[:128])
    # ddp_spawn pickles the model to the workers; file descriptors cannot be shared here
    sharing = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        trainer.fit(model, DataLoader(data, batch_size=16))  # same batches on both ranks
    finally:
        torch.multiprocessing.set_sharing_strategy(sharing)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert len(ranks[0]["mu"]) == len(ranks[1]["mu"]) == 2
    for step in range(2):
        assert torch.equal(ranks[0]["mu"][step], ranks[1]["mu"][step])
        assert not torch.equal(ranks[0]["shift"][step], ranks[1]["shift"][step])
    rows = [
        r
        for r in _read_csv(tmp_path / "ddp" / "version_0" / "metrics.csv")
        if r.get("noise/blocks.0.norm/out_mean")
    ]
    assert [int(r["step"]) for r in rows] == [0, 1]
    for row, step in zip(rows, range(2), strict=True):
        both = torch.cat([ranks[0]["noisy"][step], ranks[1]["noisy"][step]]).double()
        assert float(row["noise/blocks.0.norm/out_mean"]) == pytest.approx(
            both.mean().item(), rel=1e-5
        )
        assert float(row["noise/blocks.0.norm/out_std"]) == pytest.approx(
            both.std(correction=0).item(), rel=1e-5
        )


# --- the paper's finding on a real task -------------------------------------------------------
def _digits_accuracy(norm: bool, noise: bool, seed: int = 3, steps: int = 300) -> float:
    L.seed_everything(seed, verbose=False)
    model = MLP(norm=norm, width=64, depth=3, lr=0.1)
    train, test = torch.randperm(len(X), generator=torch.Generator().manual_seed(0)).split(1400)
    loader = DataLoader(
        TensorDataset(X[train], Y[train]),
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    targets = None if norm else "blocks.*.norm"  # the standard net: noise where BN would be
    callbacks = [NoiseInjectionCallback(targets=targets, seed=seed)] if noise else []
    _trainer(max_steps=steps, callbacks=callbacks).fit(model, loader)
    with torch.no_grad():
        return (model.eval()(X[test]).argmax(1) == Y[test]).float().mean().item()


def test_noisy_batchnorm_trains_like_batchnorm_and_far_better_than_noisy_standard() -> None:
    bn = _digits_accuracy(norm=True, noise=False)
    noisy_bn = _digits_accuracy(norm=True, noise=True)
    noisy_standard = _digits_accuracy(norm=False, noise=True)
    print(
        f"digits test accuracy: BN {bn:.3f}, noisy BN {noisy_bn:.3f}, noisy standard {noisy_standard:.3f}"
    )
    assert noisy_bn > 0.9  # chance: 0.1
    assert bn - noisy_bn < 0.03
    assert noisy_bn - noisy_standard > 0.15
