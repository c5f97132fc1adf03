"""ICS G′ passes under torch.func.vmap (compute_ics with a batching probe) against the sequential
passes and against brute force (a deep copy of the model per mixed point, plain autograd)."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_bn.callbacks.ics import ICSCallback
from lightning_bn.diagnostics.ics import compute_ics, measured_layers
from lightning_bn.probe import Probe, RNGState, StepRecord
from lightning_bn.probe.batched import BatchedFallbackWarning, uses_vmap
from tests.probe.test_batched import CPU, Encoder, TinyBert, ce
from tests.support.models import Classifier, MemoryLogger, cnn, fit, mlp

F64 = torch.float64


def points(net: nn.Module, batch: Any) -> tuple[dict[str, Tensor], dict[str, Tensor], StepRecord]:
    """W^t, W^{t+1} (one SGD step of lr 0.5 plus a random nudge) and the step (its RNG)."""
    probe = Probe(net, loss_fn=ce, vmap_chunk_size=None)
    step = StepRecord(batch, rng=RNGState.capture())
    before = probe.parameters()
    _, g = probe.loss_and_grad(before, step)
    gen = torch.Generator().manual_seed(1)
    after = {
        n: t - 0.5 * g[n] + 0.01 * torch.randn(t.shape, generator=gen, dtype=t.dtype)
        if n in g
        else t
        for n, t in before.items()
    }
    return before, after, step


def counting(fn: Any, calls: list[int]) -> Any:
    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return fn(*args, **kwargs)

    return counted


def check_ics(
    net: nn.Module,
    batch: Any,
    *,
    chunks: tuple[int, ...] = (1, 2, 100),
    fallback: bool | None = False,
    tol: float = 1e-9,
) -> dict[str, dict[str, float]]:
    """compute_ics with a batching probe (each chunk size) = with a sequential one; one call of
    ``loss_and_grad`` (the pass at W^t) on a batching probe; the buffers untouched. ``fallback``
    ``None`` accepts either outcome (then the values still agree). Returns the sequential values."""
    net.train()
    before, after, step = points(net, batch)
    layers = measured_layers(net, None)
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    ref = compute_ics(Probe(net, loss_fn=ce, vmap_chunk_size=None), layers, before, after, step)
    assert len(ref) >= 2
    for chunk in chunks:
        probe = Probe(net, loss_fn=ce, vmap_chunk_size=chunk)
        calls: list[int] = []
        probe.loss_and_grad = counting(probe.loss_and_grad, calls)  # type: ignore[method-assign]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = compute_ics(probe, layers, before, after, step)
        fell = [w for w in caught if issubclass(w.category, BatchedFallbackWarning)]
        if fallback is not None:
            assert len(fell) == (1 if fallback else 0), [str(w.message) for w in caught]
        assert len(fell) <= 1
        assert uses_vmap(probe, CPU) is not bool(fell)
        # batched: only the pass at W^t goes through loss_and_grad; fallback: one per G' too
        assert len(calls) == (len(ref) if fell else 1), calls
        assert set(got) == set(ref)
        for name, vals in ref.items():
            assert set(got[name]) == set(vals), name
            for key, v in vals.items():
                assert got[name][key] == pytest.approx(v, rel=tol, abs=tol), (chunk, name, key)
    for n, b in net.named_buffers():
        assert torch.equal(b, buffers[n]), n
    return ref


def test_mlp_batchnorm_with_dropout_all_chunk_sizes() -> None:
    torch.manual_seed(0)
    ref = check_ics(
        mlp(dropout=0.3).double(), (torch.randn(32, 8, dtype=F64), torch.randint(0, 3, (32,)))
    )
    assert set(ref) == {"0", "4", "8"}
    assert set(ref["4"]) == {"l2", "cos", "l2_rel", "mean_shift", "std_shift", "emd"}
    assert ref["4"]["l2"] > 1e-3 and ref["4"]["mean_shift"] > 1e-3  # not trivially zero


def test_cnn_batchnorm2d() -> None:
    torch.manual_seed(0)
    ref = check_ics(
        cnn().double(), (torch.randn(16, 1, 6, 6, dtype=F64), torch.randint(0, 3, (16,)))
    )
    assert "emd" in ref["3"]  # the second conv's input (channels) is captured under vmap


def test_transformer_encoder_layer_without_dropout() -> None:
    torch.manual_seed(0)
    ref = check_ics(
        Encoder(0.0).double(), (torch.randn(4, 5, 16, dtype=F64), torch.randint(0, 3, (4,)))
    )
    # in_proj of nn.MultiheadAttention, its out_proj (no input of its own), the feed-forward
    assert {"layer.self_attn", "layer.self_attn.out_proj", "layer.linear1", "head"} <= set(ref)
    assert set(ref["layer.self_attn.out_proj"]) == {"l2", "cos", "l2_rel"}
    assert "emd" in ref["layer.linear2"]


def test_tiny_bert_batched_or_fallback_same_values() -> None:
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    ref = check_ics(
        TinyBert().double(),
        (torch.randint(0, 40, (4, 8)), torch.randint(0, 3, (4,))),
        chunks=(3, 100),
        fallback=None,
    )
    assert len(ref) > 10


class ItemNet(nn.Module):
    """Two layers and data-dependent control flow (``.item()``), which vmap cannot run."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        return self.b(h * 2 if h.sum().item() > 0 else h)


def test_fallback_once_and_same_values() -> None:
    torch.manual_seed(0)
    net = ItemNet().double()
    batch = (torch.randn(8, 8, dtype=F64), torch.randint(0, 3, (8,)))
    check_ics(net, batch, chunks=(4,), fallback=True)
    # remembered per probe: the second measurement neither tries vmap nor warns again
    probe = Probe(net, loss_fn=ce, vmap_chunk_size=4)
    before, after, step = points(net, batch)
    layers = measured_layers(net, None)
    with pytest.warns(BatchedFallbackWarning):
        compute_ics(probe, layers, before, after, step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_ics(probe, layers, before, after, step)


def brute_force_ics(
    net: nn.Sequential, before: dict[str, Tensor], after: dict[str, Tensor], step: StepRecord
) -> dict[str, dict[str, float]]:
    """G, G' and the layer inputs on deep copies of a Sequential (earlier = lower index),
    autograd and sorting written out here."""

    def run(point: dict[str, Tensor], index: int) -> tuple[list[Tensor], Tensor]:
        other = copy.deepcopy(net)
        with torch.no_grad():
            for n, p in other.named_parameters():
                p.copy_(point[n])
        seen: list[Tensor] = []
        other[index].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
        assert step.rng is not None
        with step.rng.replay():
            loss = ce(other, step.batch)
        grads = torch.autograd.grad(loss, list(other[index].parameters()))
        return [g.reshape(-1) for g in grads], seen[0]

    out: dict[str, dict[str, float]] = {}
    for i, module in enumerate(net):
        if not isinstance(module, nn.Linear):
            continue
        mixed = {n: after[n] if int(n.split(".")[0]) < i else t for n, t in before.items()}
        g, x0 = run(before, i)
        gp, x1 = run(mixed, i)
        g_all, gp_all = torch.cat(g), torch.cat(gp)
        diff = float((g_all - gp_all).norm())
        cos = float(g_all @ gp_all / (g_all.norm() * gp_all.norm()))
        s0, s1 = x0.sort(dim=0).values, x1.sort(dim=0).values  # (batch, features)
        out[str(i)] = {
            "l2": diff,
            "cos": cos,
            "l2_rel": diff / float(g_all.norm()),
            "mean_shift": float((x1.mean(0) - x0.mean(0)).abs().mean()),
            "std_shift": float((x1.std(0, correction=0) - x0.std(0, correction=0)).abs().mean()),
            "emd": float((s1 - s0).abs().mean()),
        }
    return out


def test_against_brute_force() -> None:
    torch.manual_seed(0)
    net = mlp(dropout=0.3).double().train()
    before, after, step = points(net, (torch.randn(32, 8, dtype=F64), torch.randint(0, 3, (32,))))
    probe = Probe(net, loss_fn=ce, vmap_chunk_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BatchedFallbackWarning)
        got = compute_ics(probe, measured_layers(net, None), before, after, step)
    expected = brute_force_ics(net, before, after, step)
    assert set(got) == set(expected) == {"0", "4", "8"}
    assert expected["0"]["l2"] == 0 and expected["8"]["l2"] > 1e-3
    for name, vals in expected.items():
        assert set(got[name]) == set(vals)
        for key, v in vals.items():
            assert got[name][key] == pytest.approx(v, rel=1e-9, abs=1e-12), (name, key)


def test_callback_logs_the_same_values_batched() -> None:
    def run(chunk: int | None) -> dict[int, dict[str, float]]:
        logger = MemoryLogger()
        callback = ICSCallback(every_n_steps=2, vmap_chunk_size=chunk)
        assert callback.vmap_chunk_size == chunk
        with warnings.catch_warnings():
            warnings.simplefilter("error", BatchedFallbackWarning)
            fit(lambda: Classifier(mlp(dropout=0.2).double()), [callback], 4, logger=logger)
        return logger.history

    seq, bat = run(None), run(1)
    assert sorted(seq) == sorted(bat) == [0, 2]
    for step, metrics in seq.items():
        assert set(metrics) == set(bat[step])
        assert any(k.endswith("/emd") for k in metrics) and any(k.endswith("/l2") for k in metrics)
        for k, v in metrics.items():
            assert bat[step][k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


@pytest.mark.parametrize("bad", [0, 1.5, "Auto"])
def test_bad_chunk_sizes(bad: Any) -> None:
    with pytest.raises(ValueError, match="vmap_chunk_size"):
        ICSCallback(vmap_chunk_size=bad)
