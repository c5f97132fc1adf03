"""Grid evaluation under torch.func.vmap (lightning_bn.probe.batched) against the sequential path and
against brute force (a deep copy of the model per point, plain autograd, the RNG state replayed)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_bn.callbacks.lipschitz import LipschitzCallback
from lightning_bn.callbacks.smoothness import SmoothnessCallback
from lightning_bn.diagnostics.landscape import DEFAULT_STEP_SIZES
from lightning_bn.probe import Probe, RNGState, StepRecord
from lightning_bn.probe.batched import BatchedFallbackWarning, check_vmap_chunk_size, uses_vmap
from tests.support.models import Classifier, MemoryLogger, cnn, fit, mlp

CPU = torch.device("cpu")
ETAS = [0.02 * s for s in DEFAULT_STEP_SIZES]  # 13 points


def ce(module: nn.Module, batch: Any) -> Tensor:
    return nn.functional.cross_entropy(module(batch[0]), batch[1])


def brute_force(
    net: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    step: StepRecord,
    eta: float,
    d: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss and gradient at W - eta d on a deep copy of ``net``: plain module call, autograd."""
    other = copy.deepcopy(net)
    with torch.no_grad():
        for n, p in other.named_parameters():
            if n in d:
                p.add_(d[n], alpha=-eta)
    assert step.rng is not None
    with step.rng.replay():
        loss = loss_fn(other, step.batch)
    names = [n for n, _ in other.named_parameters()]
    grads = torch.autograd.grad(loss, list(other.parameters()), allow_unused=True)
    return loss.detach(), {
        n: g if g is not None else torch.zeros_like(p)
        for n, g, p in zip(names, grads, other.parameters(), strict=True)
    }


def check_agreement(
    net: nn.Module, batch: Any, *, chunk: int = 5, tol: float = 1e-10, fallback: bool = False
) -> Probe:
    """Batched (``chunk`` points per call) = sequential = brute force on the 13-point grid; the
    module's buffers are untouched. Returns the batched probe."""
    net.train()
    seq = Probe(net, loss_fn=ce, vmap_chunk_size=None)
    bat = Probe(net, loss_fn=ce, vmap_chunk_size=chunk)
    params = seq.parameters()
    step = StepRecord(batch, rng=RNGState.capture())
    _, d = seq.loss_and_grad(params, step)
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        l_bat = bat.losses_along(params, d, ETAS, step)
        g_bat = bat.loss_and_grad_along(params, d, ETAS, step)
    fallbacks = [w for w in caught if issubclass(w.category, BatchedFallbackWarning)]
    assert len(fallbacks) == (1 if fallback else 0), [str(w.message) for w in caught]
    assert uses_vmap(bat, CPU) is not fallback
    l_seq = seq.losses_along(params, d, ETAS, step)
    g_seq = seq.loss_and_grad_along(params, d, ETAS, step)
    torch.testing.assert_close(l_bat, l_seq, rtol=tol, atol=tol)
    for j, eta in enumerate(ETAS):
        loss, grads = brute_force(net, ce, step, eta, d)
        torch.testing.assert_close(l_bat[j], loss, rtol=tol, atol=tol)
        torch.testing.assert_close(g_bat[j][0], loss, rtol=tol, atol=tol)
        torch.testing.assert_close(g_seq[j][1], grads, rtol=tol, atol=tol)
        torch.testing.assert_close(g_bat[j][1], grads, rtol=tol, atol=tol)
    for n, b in net.named_buffers():
        assert torch.equal(b, buffers[n]), n
    return bat


def test_mlp_batchnorm_float32_and_running_stats_untouched() -> None:
    torch.manual_seed(0)
    net = mlp(dropout=0.0)
    check_agreement(net, (torch.randn(32, 8), torch.randint(0, 3, (32,))), tol=1e-5)
    assert int(net[1].num_batches_tracked) == 0


def test_cnn_batchnorm2d() -> None:
    # float64: a ReLU input within float32 rounding of 0 would make the two paths' gradients
    # differ by the kink (see benchmarks/batched_probes.py)
    torch.manual_seed(0)
    check_agreement(
        cnn().double(), (torch.randn(16, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (16,)))
    )


def test_dropout_masks_are_the_real_steps() -> None:
    torch.manual_seed(0)
    net = mlp(dropout=0.5).double()
    batch = (torch.randn(32, 8, dtype=torch.float64), torch.randint(0, 3, (32,)))
    probe = check_agreement(net, batch)
    # the masks matter: another random state gives other losses
    step = StepRecord(batch, rng=RNGState.capture())
    other = StepRecord(batch, rng=RNGState(torch.manual_seed(123).get_state()))
    params = probe.parameters()
    d = {n: torch.ones_like(p) for n, p in params.items()}
    a = probe.losses_along(params, d, ETAS[:3], step)
    b = probe.losses_along(params, d, ETAS[:3], other)
    assert (a - b).abs().min() > 1e-6


def test_chunk_smaller_than_grid_gives_the_same_values() -> None:
    torch.manual_seed(0)
    net = mlp(dropout=0.3).double()
    batch = (torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 3, (16,)))
    step = StepRecord(batch, rng=RNGState.capture())
    probes = [Probe(net, loss_fn=ce, vmap_chunk_size=c) for c in (None, 1, 4, 13, 100)]
    params = probes[0].parameters()
    _, d = probes[0].loss_and_grad(params, step)
    ref = probes[0].loss_and_grad_along(params, d, ETAS, step)
    for probe in probes[1:]:
        got = probe.loss_and_grad_along(params, d, ETAS, step)
        torch.testing.assert_close(
            torch.stack([g[0] for g in got]),
            torch.stack([r[0] for r in ref]),
            rtol=1e-12,
            atol=1e-12,
        )
        for (_, g), (_, r) in zip(got, ref, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            probe.losses_along(params, d, ETAS, step),
            torch.stack([r[0] for r in ref]),
            rtol=1e-12,
            atol=1e-12,
        )


class Encoder(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=dropout, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x).mean(1))


def test_transformer_encoder_layer_without_dropout_is_batched() -> None:
    torch.manual_seed(0)
    net = Encoder(0.0).double()
    check_agreement(net, (torch.randn(4, 5, 16, dtype=torch.float64), torch.randint(0, 3, (4,))))


def test_transformer_encoder_layer_dropout_falls_back() -> None:
    # its dropouts draw their masks in another layout under vmap: the check of the first grid
    # sees it, the probe falls back (one warning) and gives the sequential values
    torch.manual_seed(0)
    net = Encoder(0.1).double()
    check_agreement(
        net,
        (torch.randn(4, 5, 16, dtype=torch.float64), torch.randint(0, 3, (4,))),
        fallback=True,
    )


class TinyBert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(
            vocab_size=40,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
            num_labels=3,
        )
        self.bert = BertForSequenceClassification(config)

    def forward(self, ids: Tensor) -> Tensor:
        return self.bert(input_ids=ids).logits


def test_tiny_bert_with_dropout() -> None:
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    net = TinyBert().double()
    assert net.bert.config.hidden_dropout_prob > 0  # random ops: the draw check runs
    check_agreement(net, (torch.randint(0, 40, (4, 8)), torch.randint(0, 3, (4,))))


class ItemNet(nn.Module):
    """Data-dependent control flow (``.item()``), which vmap cannot run."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        out = self.lin(x)
        return out * 2 if out.sum().item() > 0 else out


def test_fallback_once_for_a_model_vmap_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    net = ItemNet().double()
    batch = (torch.randn(8, 8, dtype=torch.float64), torch.randint(0, 3, (8,)))
    bat = check_agreement(net, batch, fallback=True)
    # remembered: no second try (vmap is not called again) and no second warning
    import lightning_bn.probe.batched as batched

    def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("tried vmap again")

    monkeypatch.setattr(batched, "_run", fail)
    step = StepRecord(batch, rng=RNGState.capture())
    params = bat.parameters()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bat.losses_along(params, params, ETAS, step)


def test_auto_batches_on_cuda_only() -> None:
    net = mlp()
    probe = Probe(net, loss_fn=ce)
    assert probe.vmap_chunk_size == "auto"
    assert not uses_vmap(probe, CPU)
    assert uses_vmap(probe, torch.device("cuda"))
    assert not uses_vmap(Probe(net, loss_fn=ce, vmap_chunk_size=None), torch.device("cuda"))
    assert uses_vmap(Probe(net, loss_fn=ce, vmap_chunk_size=3), CPU)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "yes", "Auto", [4]])
def test_bad_chunk_sizes(bad: Any) -> None:
    with pytest.raises(ValueError, match="vmap_chunk_size"):
        check_vmap_chunk_size(bad)
    with pytest.raises(ValueError, match="vmap_chunk_size"):
        Probe(mlp(), loss_fn=ce, vmap_chunk_size=bad)
    with pytest.raises(ValueError, match="vmap_chunk_size"):
        LipschitzCallback(vmap_chunk_size=bad)
    with pytest.raises(ValueError, match="vmap_chunk_size"):
        SmoothnessCallback(vmap_chunk_size=bad)


def test_callbacks_log_the_same_values_batched() -> None:
    def run(chunk: int | None) -> dict[int, dict[str, float]]:
        logger = MemoryLogger()
        callbacks = [
            LipschitzCallback(every_n_steps=2, vmap_chunk_size=chunk),
            SmoothnessCallback(every_n_steps=2, hessian=False, vmap_chunk_size=chunk),
        ]
        with warnings.catch_warnings():
            warnings.simplefilter("error", BatchedFallbackWarning)
            fit(lambda: Classifier(mlp(dropout=0.2).double()), callbacks, 4, logger=logger)
        probes = [cb._probe for cb in callbacks]
        assert all(p is None for p in probes)  # torn down
        return logger.history

    seq, bat = run(None), run(5)
    assert sorted(seq) == sorted(bat) == [0, 2]
    for step, metrics in seq.items():
        assert set(metrics) == set(bat[step])
        assert any(k.startswith("lipschitz/loss_max") for k in metrics)
        assert any(k.startswith("smoothness/beta_eff") for k in metrics)
        for k, v in metrics.items():
            assert bat[step][k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
