"""Several callbacks of one class in one Trainer (issue 14): distinct state keys from their
settings, distinct key prefixes where their keys would collide, resume, and noise refused twice
on one layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_bn import ICSCallback, LipschitzCallback, NoiseInjectionCallback
from tests.support.models import Classifier, MemoryLogger, loader, mlp, trainer


def _make() -> Classifier:
    return Classifier(mlp(dropout=0.0).double(), optimizer="adam", lr=0.01)


def _fit(
    callbacks: list[Any],
    epochs: int = 1,
    ckpt_path: Path | None = None,
    save: Path | None = None,
) -> MemoryLogger:
    pl.seed_everything(0, verbose=False)
    logger = MemoryLogger()
    t = trainer(callbacks, -1, logger=logger, max_epochs=epochs)
    t.fit(_make(), loader(n=128, batch_size=32), ckpt_path=ckpt_path)  # 4 batches per epoch
    if save is not None:
        t.save_checkpoint(save)
    return logger


def _keys(logger: MemoryLogger, prefix: str) -> dict[tuple[int, str], float]:
    return {
        (step, k): v
        for step, metrics in logger.history.items()
        for k, v in metrics.items()
        if k.startswith(prefix)
    }


def test_two_ics_callbacks_on_different_layers_with_resume(tmp_path: Path) -> None:
    # reference: one callback measuring both layers (a diagnostic leaves training untouched)
    reference = _keys(_fit([ICSCallback(every_n_steps=1, layers=["net.0", "net.4"])], 2), "ics/")
    first = ICSCallback(every_n_steps=1, layers=["net.0"])
    second = ICSCallback(every_n_steps=1, layers=["net.4"])
    assert first.state_key != second.state_key
    assert "net.0" in first.state_key and "net.4" in second.state_key
    together = _keys(_fit([first, second], 2), "ics/")
    assert together == reference  # same keys (no collision: no prefix change), same values
    assert {k.split("/")[1] for _, k in together} == {"net.0", "net.4"}

    # resume from the end of epoch 0: each callback gets its own state back
    _fit(
        [
            ICSCallback(every_n_steps=1, layers=["net.0"]),
            second_cb := ICSCallback(every_n_steps=1, layers=["net.4"]),
        ],
        1,
        save=tmp_path / "e0.ckpt",
    )
    assert second_cb.measured_steps == [0, 1, 2, 3]
    state = torch.load(tmp_path / "e0.ckpt", weights_only=False)["callbacks"]
    assert first.state_key in state and second.state_key in state
    resumed = [
        ICSCallback(every_n_steps=1, layers=["net.0"]),
        ICSCallback(every_n_steps=1, layers=["net.4"]),
    ]
    after = _keys(_fit(resumed, 2, ckpt_path=tmp_path / "e0.ckpt"), "ics/")
    assert resumed[0].measured_steps == resumed[1].measured_steps == list(range(8))
    assert after == {key: v for key, v in reference.items() if key[0] >= 4}


def test_named_callbacks_on_one_layer_log_under_their_names() -> None:
    a = ICSCallback(every_n_steps=1, layers=["net.0"], name="a")
    b = ICSCallback(every_n_steps=2, layers=["net.0"], name="b")
    logged = _fit([a, b])
    reference = _keys(_fit([ICSCallback(every_n_steps=1, layers=["net.0"])]), "ics/")
    got_a, got_b = _keys(logged, "ics@a/"), _keys(logged, "ics@b/")
    assert not _keys(logged, "ics/")
    assert got_a == {(s, k.replace("ics/", "ics@a/")): v for (s, k), v in reference.items()}
    assert got_b == {
        (s, k.replace("ics/", "ics@b/")): v for (s, k), v in reference.items() if s % 2 == 0
    }


def test_unnamed_colliding_callbacks_get_derived_prefixes() -> None:
    one, two = LipschitzCallback(every_n_steps=1), LipschitzCallback(every_n_steps=2)
    with pytest.warns(UserWarning, match="would log the same keys"):
        logged = _fit([one, two])
    assert (one.key_prefix, two.key_prefix) == ("lipschitz@1", "lipschitz@2")
    reference = _keys(_fit([LipschitzCallback(every_n_steps=1)]), "lipschitz/")
    assert _keys(logged, "lipschitz@1/") == {
        (s, k.replace("lipschitz/", "lipschitz@1/")): v for (s, k), v in reference.items()
    }
    assert {s for s, _ in _keys(logged, "lipschitz@2/")} == {0, 2}


def test_indistinguishable_callbacks_are_refused() -> None:
    # same settings: the same state key, which Lightning itself refuses when the Trainer is built
    with pytest.raises(RuntimeError, match="state_key` must be unique"):
        _fit([ICSCallback(every_n_steps=2), ICSCallback(every_n_steps=2)])
    # one name for two: their keys would mix, refused at setup
    with pytest.raises(ValueError, match="distinct `name=`"):
        _fit([ICSCallback(every_n_steps=1, name="x"), ICSCallback(every_n_steps=2, name="x")])


def test_two_noise_callbacks_on_one_layer_are_refused() -> None:
    both = [NoiseInjectionCallback(seed=1), NoiseInjectionCallback(targets="net.1", seed=2)]
    with pytest.raises(ValueError, match=r"same layer.*net\.1"):
        _fit(both)


def test_noise_callbacks_on_different_layers_work_side_by_side() -> None:
    a = NoiseInjectionCallback(targets="net.1", seed=1, log_every_n_steps=1)
    b = NoiseInjectionCallback(targets="net.5", seed=2, log_every_n_steps=1)
    assert a.state_key != b.state_key
    logged = _fit([a, b])
    keys = {k for _, k in _keys(logged, "noise/")}
    assert {k.split("/")[1] for k in keys} == {"net.1", "net.5"}
    assert a.target_names == ["net.1"] and b.target_names == ["net.5"]
    # each draws from its own stream: net.1's noise is what a lone callback with that seed gives
    alone = _keys(
        _fit([NoiseInjectionCallback(targets="net.1", seed=1, log_every_n_steps=1)]),
        "noise/net.1/mu_mean",
    )
    assert _keys(logged, "noise/net.1/mu_mean") == alone


def test_state_key_is_derived_once_per_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    # Lightning reads `state_key` at every hook call; deriving it from the settings each time cost
    # 5% of a small model's step, so it is frozen from `setup` to `teardown`
    ics = ICSCallback(every_n_steps=2, layers=["net.0"])
    noise = NoiseInjectionCallback(seed=3)
    expected = (ics.state_key, noise.state_key)
    calls = {"ics": 0, "noise": 0}
    for label, cb in (("ics", ics), ("noise", noise)):
        original = cb._state_key_settings

        def counted(_label: str = label, _original: Any = original) -> dict[str, Any]:
            calls[_label] += 1
            return _original()

        monkeypatch.setattr(cb, "_state_key_settings", counted)
    _fit([ics, noise])  # 4 training steps, a dozen hooks each
    assert 1 <= calls["ics"] <= 5 and 1 <= calls["noise"] <= 5  # not once per hook call (~50)
    assert (ics.state_key, noise.state_key) == expected
    ics.layers = ["net.4"]  # outside a run the key follows the settings again
    assert "net.4" in ics.state_key


class _FailsAtStep2(Classifier):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.global_step == 2:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_state_key_follows_the_settings_again_after_a_failed_fit() -> None:
    ics = ICSCallback(every_n_steps=1, layers=["net.0"])
    noise = NoiseInjectionCallback(seed=3)
    pl.seed_everything(0, verbose=False)
    t = trainer([ics, noise], -1, logger=MemoryLogger(), max_epochs=1)
    with pytest.raises(RuntimeError, match="boom"):
        t.fit(_FailsAtStep2(mlp(dropout=0.0).double()), loader(n=128, batch_size=32))
    ics.layers = ["net.4"]  # Lightning skips `teardown` after an exception
    noise.seed = 4
    assert "net.4" in ics.state_key and "net.0" not in ics.state_key
    assert noise.state_key == NoiseInjectionCallback(seed=4).state_key
