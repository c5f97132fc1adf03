"""Two memory savings of HessianCallback against independent references: the kept first-order
graph without the gradient's values (``keep_grad=False``: products bitwise those of the graph with
them, also on nn.TransformerEncoder and a tiny Hugging Face BERT against a float64 brute force; a
gradient the graph saved kept), and eigenvectors stored in bfloat16 (:class:`Span`: the
exact projector onto what is stored, checked against the dense float64 projector; the top-k with
them against exact eigenvalues; the trace deflated by them in ``test_spectrum_bounded``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_bn.diagnostics.hvp import HessianVectorProduct
from lightning_bn.diagnostics.span import Span, deflated_exact_trace
from lightning_bn.diagnostics.spectrum import top_eigenvalues
from tests.diagnostics.test_spectrum_bounded import _known, _layout

DTYPE = torch.float64


# --- keep_grad=False ---------------------------------------------------------------------------
def _net_loss() -> tuple[nn.Module, dict[str, Tensor], object]:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv1d(2, 4, 3),
        nn.BatchNorm1d(4),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(24, 5),
        nn.LayerNorm(5),
        nn.Sigmoid(),
        nn.Linear(5, 3),
    )
    x, y = torch.randn(7, 2, 8), torch.randint(0, 3, (7,))
    params = {k: p.detach() for k, p in net.named_parameters()}

    def loss_fn(p: dict[str, Tensor]) -> Tensor:
        return nn.functional.cross_entropy(torch.func.functional_call(net, p, (x,)), y)

    return net, params, loss_fn


def test_products_without_the_gradient_values_are_bitwise_those_with_them() -> None:
    _, params, loss_fn = _net_loss()
    kept = HessianVectorProduct(loss_fn, params)  # type: ignore[arg-type]
    freed = HessianVectorProduct(loss_fn, params, keep_grad=False)  # type: ignore[arg-type]
    assert freed.grad == {} and kept.grad.keys() == params.keys()
    graph = freed._flat_graph
    assert graph is not None and graph.outputs
    assert all(g.untyped_storage().nbytes() == 0 for g in graph.outputs)  # the values are gone
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(kept.layout.numel, generator=gen)
        assert torch.equal(freed.matvec(v), kept.matvec(v))
        into = torch.randn(kept.layout.numel, generator=gen)
        assert torch.equal(
            freed.matvec(v, into.clone(), accumulate=True),
            kept.matvec(v, into.clone(), accumulate=True),
        )


def _encoder() -> tuple[nn.Module, dict[str, Any]]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2), {"src": torch.randn(3, 5, 16)}


def _bert() -> tuple[nn.Module, dict[str, Any]]:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    ids, labels = torch.randint(0, 50, (2, 7)), torch.tensor([0, 2])
    return BertForSequenceClassification(config), {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("build", [_encoder, _bert], ids=["nn.TransformerEncoder", "hf-bert"])
def test_products_without_the_gradient_values_on_attention_models(
    build: Callable[[], tuple[nn.Module, dict[str, Any]]],
) -> None:
    """Models this package did not write (attention by the math backend, which has second
    derivatives): bitwise the products with the values, and a float64 brute force."""
    if build is _bert:
        pytest.importorskip("transformers")
    net, kwargs = build()
    net = net.double()
    kwargs = {k: v.double() if v.is_floating_point() else v for k, v in kwargs.items()}
    params = {k: p.detach() for k, p in net.named_parameters()}

    def loss_fn(p: dict[str, Tensor]) -> Tensor:
        with sdpa_kernel(SDPBackend.MATH):
            out = torch.func.functional_call(net, p, (), kwargs)
        return out.loss if hasattr(out, "loss") else (out**2).mean()

    kept = HessianVectorProduct(loss_fn, params)  # type: ignore[arg-type]
    freed = HessianVectorProduct(loss_fn, params, keep_grad=False)  # type: ignore[arg-type]
    graph = freed._flat_graph
    assert graph is not None and all(g.untyped_storage().nbytes() == 0 for g in graph.outputs)
    v = torch.randn(kept.layout.numel, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    product = freed.matvec(v)
    assert torch.equal(product, kept.matvec(v))
    flat = kept.layout.flat(params)
    brute = torch.autograd.functional.hvp(lambda w: loss_fn(kept.layout.unflat(w)), flat, v)[1]
    torch.testing.assert_close(product, brute, rtol=1e-10, atol=1e-12)


class _ExpGrad(torch.autograd.Function):
    """L = Σ exp(w) whose backward returns exp(w + log g): the gradient is exp's output, which
    the graph of that backward saves (d exp = exp)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, w: Tensor) -> Tensor:
        ctx.save_for_backward(w)
        return w.exp().sum()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: Tensor) -> Tensor:
        (w,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return torch.exp(w + torch.log(g))


def test_a_gradient_the_graph_saved_is_kept_and_the_product_stays_exact() -> None:
    w = torch.linspace(-1.0, 1.0, 6, dtype=DTYPE)
    op = HessianVectorProduct(
        lambda p: _ExpGrad.apply(p["w"]),  # type: ignore[no-untyped-call]
        {"w": w},
        keep_grad=False,
    )
    graph = op._flat_graph
    assert graph is not None and graph.outputs[0].untyped_storage().nbytes() > 0
    v = torch.arange(1.0, 7.0, dtype=DTYPE)
    torch.testing.assert_close(op.matvec(v), w.exp() * v, rtol=1e-14, atol=0)  # H = diag(exp w)


def test_keep_grad_is_checked() -> None:
    with pytest.raises(TypeError, match="keep_grad"):
        HessianVectorProduct(lambda p: p["w"].sum(), {"w": torch.ones(2)}, keep_grad=1)  # type: ignore[arg-type]


# --- Span: bfloat16 storage, exact projector ---------------------------------------------------
def _orthonormal(n: int, k: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=DTYPE))[0]


def _dense_projector(y: Tensor) -> Tensor:
    return y @ torch.linalg.solve(y.T @ y, y.T)


def test_span_projects_off_exactly_what_it_stores() -> None:
    y = _orthonormal(30, 4, seed=0)
    span = Span(list(y.T), dtype=torch.bfloat16)
    rounded = torch.stack(list(span), 1).to(DTYPE)
    assert span[0].dtype == torch.bfloat16 and span.work == DTYPE
    assert not torch.equal(rounded, y)  # 30 entries: the rounding shows in the Gram matrix
    assert float((span.gram - torch.eye(4, dtype=DTYPE)).abs().max()) > 1e-5
    w = torch.randn(30, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    want = w - _dense_projector(rounded) @ w
    span.project_off(w)
    torch.testing.assert_close(w, want, rtol=0, atol=1e-13)
    assert float((rounded.T @ w).abs().max()) < 1e-13


def test_exact_part_deflated_by_rounded_vectors_against_the_dense_projector() -> None:
    a, _ = _known(30, seed=2)
    span = Span(list(_orthonormal(30, 4, seed=3).T), dtype=torch.bfloat16)
    rounded = torch.stack(list(span), 1).to(DTYPE)
    blocks = {"a": torch.arange(0, 7), "b": torch.arange(7, 30)}
    exact, parts = deflated_exact_trace(lambda v: a @ v, span, blocks)
    p = _dense_projector(rounded)
    rest = (torch.eye(30, dtype=DTYPE) - p) @ a @ (torch.eye(30, dtype=DTYPE) - p)
    assert exact == pytest.approx(float(torch.trace(p @ a @ p)), rel=1e-12)
    for name, idx in blocks.items():  # tr(E_b A E_bᵀ) minus the part the probes see
        want = float(a[idx][:, idx].trace() - rest[idx][:, idx].trace())
        assert parts[name] == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_top_k_with_eigenvectors_stored_in_bfloat16_on_a_known_spectrum() -> None:
    a, eigs = _known(40, seed=4)
    gen = torch.Generator().manual_seed(5)
    kw = {"max_iters": 400, "tol": 1e-6, "basis_size": 0, "warn": False}
    res = top_eigenvalues(
        lambda v: a @ v, _layout(40), 3, generator=gen, store=torch.bfloat16, **kw
    )
    assert res.converged and all(v.dtype == torch.bfloat16 for v in res.eigenvectors)
    # later eigenvalues are those off the rounded vectors' span: rounding turns a vector by about
    # 1e-3, which moves a later eigenvalue by at most about 1e-6 of the first (here λ_1 = 10)
    assert res.eigenvalues[0] == pytest.approx(float(eigs[0]), rel=1e-9)
    assert res.eigenvalues[1:] == pytest.approx(eigs[1:3].tolist(), abs=1e-5)
    for value, vector in zip(res.eigenvalues, res.eigenvectors, strict=True):
        y = vector.to(DTYPE)
        assert float(torch.linalg.vector_norm(a @ y - value * y)) < 0.02 * abs(value)
